"""Which picture of a layer's values fits its shape.

BatchNorm2d layers see images (N, C, H, W) and the layer view draws their feature maps.
Other shapes get views that make sense for them:

- a table (N, C) (``BatchNorm1d`` after a linear layer): no map at all (one number per
  feature and sample), but per-feature box plots of the batch, before and after BN;
- a sequence (N, C, L) (``BatchNorm1d`` after a ``Conv1d``): one channel x position heatmap
  of sample 0;
- a volume (N, C, D, H, W) (``BatchNorm3d``): the feature maps of the middle depth slice,
  titled so.

The chart registry (:mod:`.charts`) calls the makers here; a maker that returns None has
nothing to draw for that shape (the app skips it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..figures import (
    channel_gallery_figure,
    feature_boxes_figure,
    feature_map_figure,
    sequence_map_figure,
    volume_gallery_figure,
    volume_slice_figure,
)
from .selection import gallery_channels
from .texts import EXPLAIN

if TYPE_CHECKING:
    from .charts import ChartInput

TABLE, SEQUENCE, IMAGE, VOLUME = "table", "sequence", "image", "volume"

SENTENCES = {
    TABLE: (
        "This layer normalises a table: one value per feature and sample, so there is no "
        "map to draw. Each box is one feature over the batch (the box: quartiles and "
        "median; the whiskers: minimum and maximum), before BatchNorm, after it, and after "
        "the activation that follows; orange dots: the batch mean, blue: the running mean. "
        "In train mode every feature comes out with mean 0 and variance 1 over the batch, "
        "then scaled by its weight and shifted by its bias."
    ),
    SEQUENCE: (
        "This layer normalises a sequence: each row is one channel of sample 0 along its "
        "positions, before BatchNorm, after it, and after the activation. BatchNorm1d keeps "
        "one mean and variance per channel, over the batch and every position, so a whole "
        "row is shifted and scaled together."
    ),
    VOLUME: (
        "This layer normalises a volume (a clip or a 3-D scan): the selected channel's "
        "middle depth slice of sample 0, before BatchNorm, after it, and after the "
        "activation. BatchNorm3d keeps one mean and variance per channel, over the batch and "
        "every depth, row and column."
    ),
}


def layer_kind(layer) -> str:
    """``table``, ``sequence``, ``image`` or ``volume``, from the layer's input shape."""
    dims = len(layer.input_shape)
    return {2: TABLE, 3: SEQUENCE, 4: IMAGE}.get(dims, VOLUME)


def has_maps(layer) -> bool:
    """Whether the layer's values form maps worth a heatmap (not a table's)."""
    return layer_kind(layer) != TABLE


def maps_figure(c: ChartInput):
    """The layer's values as its shape shows them best (see the module docstring)."""
    kind = layer_kind(c.layer)
    if kind == TABLE:
        return feature_boxes_figure(c.layer, c.channel, c.label)
    if kind == SEQUENCE:
        return sequence_map_figure(c.layer, c.channel, c.label)
    build = volume_slice_figure if kind == VOLUME else feature_map_figure
    return build(c.layer, c.channel, c.label, shared_scale=c.shared_scale)


def maps_sentence(c: ChartInput) -> str:
    return SENTENCES.get(layer_kind(c.layer), EXPLAIN["feature_maps"])


def gallery_figure(c: ChartInput):
    """Neighbouring channels side by side: for images and volumes (None otherwise: the
    table and sequence views already show every channel)."""
    kind = layer_kind(c.layer)
    if kind not in (IMAGE, VOLUME):
        return None
    channels = gallery_channels(c.channel, c.layer.num_features)
    if kind == VOLUME:
        return volume_gallery_figure(c.layer, channels, c.label)
    return channel_gallery_figure(c.layer, channels, "input", c.label)


def gallery_sentence(c: ChartInput) -> str | None:
    return EXPLAIN["gallery"] if layer_kind(c.layer) in (IMAGE, VOLUME) else None
