"""The layer view's charts: one registry, in the order the chart picker shows them.

Each :class:`ChartSpec` is everything the app needs to draw one chart of a layer: its slug
(what the ``tab`` parameter of a link carries), its title (the picker's label) and its
blocks in page order, figures built from the condensed view and the sentences under them.
The app looks the picked chart up here and draws its blocks; nothing else names a chart.

Adding a chart: a builder in :mod:`bnviz.figures` and one :class:`ChartSpec` below (its
sentence for students goes into :data:`bnviz.dashboard.texts.EXPLAIN`, with the others).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..figures import (
    all_channels_figure,
    channel_stats_figure,
    distribution_figure,
    manual_vs_native_figure,
    running_update_figure,
)
from . import shapes
from .texts import EXPLAIN, formula_text, manual_check_note, running_update_text

if TYPE_CHECKING:
    from .views import LayerView, ViewData


@dataclass(frozen=True)
class ChartInput:
    """What a chart is drawn from: the view, the picked layer, channel and formula element
    (an index into ``FORMULA_ELEMENTS``), and whether the feature maps share one colour
    scale."""

    view: ViewData
    layer: LayerView
    channel: int
    element: int = 0
    shared_scale: bool = False

    @property
    def label(self) -> str:
        """The weights label every chart title carries (empty when pretrained)."""
        return self.view.weights_label


@dataclass(frozen=True)
class Block:
    """One element of a chart, in page order: a figure, or a sentence."""

    kind: str  # "figure" | "markdown" | "caption"
    make: Callable[[ChartInput], Any]  # the plotly figure, or the text
    key: str = ""  # a figure's Streamlit element key (unique on the page)
    explains: str = ""  # for an explanation: its key in EXPLAIN


def figure(key: str, build: Callable[[ChartInput], Any]) -> Block:
    """A plotly figure made by ``build`` (see :func:`per_channel` for the common builders)."""
    return Block("figure", build, key=key)


def per_channel(builder: Callable[..., Any]) -> Callable[[ChartInput], Any]:
    """A builder of the common form ``builder(layer, channel, label)`` as a block's maker."""
    return lambda c: builder(c.layer, c.channel, c.label)


def markdown(write: Callable[[ChartInput], str]) -> Block:
    return Block("markdown", write)


def caption(write: Callable[[ChartInput], str]) -> Block:
    return Block("caption", write)


def explanation(key: str) -> Block:
    """The student sentence ``EXPLAIN[key]`` as a caption (an unknown key fails at import)."""
    text = EXPLAIN[key]
    return Block("caption", lambda c: text, explains=key)


@dataclass(frozen=True)
class ChartSpec:
    """One chart of the layer view (only the picked one is built and sent)."""

    slug: str  # in links: ?tab=<slug>
    title: str  # the picker's label
    blocks: tuple[Block, ...]


LAYER_CHARTS: tuple[ChartSpec, ...] = (
    ChartSpec("statistics", "Batch vs running statistics", (
        figure("chart_stats", per_channel(channel_stats_figure)),
        explanation("channel_stats"),
    )),
    # what a layer's values look like depends on their shape (table, sequence, image,
    # volume): .shapes picks the figures and sentences; None means nothing to draw
    ChartSpec("feature-maps", "Feature maps", (
        figure("chart_maps", shapes.maps_figure),
        caption(shapes.maps_sentence),
        figure("chart_gallery", shapes.gallery_figure),
        caption(shapes.gallery_sentence),
    )),
    ChartSpec("distributions", "Distributions", (
        figure("chart_dist", per_channel(distribution_figure)),
        explanation("distribution"),
        figure("chart_allch", per_channel(all_channels_figure)),
        explanation("all_channels"),
    )),
    ChartSpec("running-update", "Running-stat update", (
        figure("chart_update", per_channel(running_update_figure)),
        markdown(lambda c: running_update_text(c.layer, c.channel)),
        explanation("running_update"),
    )),
    ChartSpec("manual-vs-native", "Manual vs native", (
        figure("chart_manual", per_channel(manual_vs_native_figure)),
        explanation("manual"),
        caption(lambda c: manual_check_note(c.view.stats_report.manual_check)),
        markdown(lambda c: formula_text(c.layer.element(c.channel, c.element))),
        explanation("formula"),
    )),
)

#: What ``tab=<index>`` meant in links made before charts had slugs: never reorder.
LEGACY_TAB_ORDER = ("statistics", "feature-maps", "distributions", "running-update",
                    "manual-vs-native")
#: The picker's labels, in registry order.
LAYER_TABS = tuple(spec.title for spec in LAYER_CHARTS)
#: The chart a view opens on.
DEFAULT_CHART = LAYER_CHARTS[0].slug

_BY_SLUG = {spec.slug: spec for spec in LAYER_CHARTS}
_BY_TITLE = {spec.title: spec for spec in LAYER_CHARTS}


def chart(slug: str) -> ChartSpec:
    """The chart with this slug (KeyError if there is none)."""
    return _BY_SLUG[slug]


def chart_titled(title: str | None) -> ChartSpec:
    """The chart the picker labels ``title``; the first chart for None or an unknown title
    (the picker's state is gone after a run that stopped before it)."""
    return _BY_TITLE.get(title or "", LAYER_CHARTS[0])


def chart_from_link(value: str) -> str | None:
    """The slug a link's ``tab`` names: a slug, or an old link's index; None if neither."""
    text = value.strip().lower()
    if text in _BY_SLUG:
        return text
    if text.isdigit() and int(text) < len(LEGACY_TAB_ORDER):
        return LEGACY_TAB_ORDER[int(text)]
    return None
