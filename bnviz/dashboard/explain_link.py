""""Why doesn't my manual BN match?": the Pitfall lab's explain experiment for the layer and
configuration on screen, as the query parameters of a link to that page.

The explain experiment offers fewer choices than the main page (four modes, five image
sizes, batches up to 16, no uploads); each value is mapped to the nearest one it offers,
and the page reads them back (:mod:`bnviz.pitfalls.controls`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..pitfalls.common import SIZE_CHOICES
from ..pitfalls.controls import MAX_BATCH
from .config import UPLOAD_KIND
from .query import stimulus_spec

if TYPE_CHECKING:
    from .config import DashConfig
    from .views import LayerView

def explain_mode(layer: LayerView) -> str:
    """The explain experiment's mode closest to how the layer ran: what matters to the
    formula is which statistics it normalised with."""
    if not layer.training:
        return "eval,track=none" if not layer.has_running_stats else "eval"
    if layer.has_running_stats and not layer.track_running_stats:
        return "train,track=off"
    return "train"


def nearest_size(size: int) -> int:
    return min(SIZE_CHOICES, key=lambda s: (abs(s - int(size)), s))


def explain_query(cfg: DashConfig, layer: LayerView, channel: int) -> dict[str, str]:
    """The link parameters that open the explain experiment on ``layer`` (its module: a
    module called twice is explained at its first call) as the dashboard runs it."""
    query = {
        "experiment": "explain",
        "model": cfg.model,
        "weights": "random" if cfg.random_init else "pretrained",
        "layer": layer.name,
        "composition": cfg.composition,
        "batch_size": str(min(max(cfg.batch_size, 1), MAX_BATCH)),
        "size": str(nearest_size(cfg.size)),
        "device": cfg.device,
        "mode": explain_mode(layer),
        "channel": str(int(channel)),
    }
    if cfg.stimulus != UPLOAD_KIND:  # an upload cannot travel in a link
        spec = stimulus_spec(cfg.stimulus, cfg.param_dict)
        if cfg.seed:  # the experiment has no seed box: the spec carries it
            spec += f"{',' if ':' in spec else ':'}seed={cfg.seed}"
        query["stimulus"] = spec
    return query
