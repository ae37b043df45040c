"""What a click or a number picks: the layer of an overview point, a valid channel, the
block of channels the gallery shows, the weights a model starts with."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def layer_from_selection(selection: Mapping[str, Any] | None,
                         layer_names: Iterable[str]) -> str | None:
    """The layer a click on the overview chart picked (its points carry the layer name as
    ``customdata``), or None when the selection names no known layer."""
    names = set(layer_names)
    points = (selection or {}).get("points") or []
    for point in points:
        data = point.get("customdata")
        if isinstance(data, list | tuple):
            data = data[0] if data else None
        if isinstance(data, str) and data in names:
            return data
    return None


def clamp_channel(channel: int, num_features: int) -> int:
    return int(min(max(int(channel), 0), max(num_features - 1, 0)))


def gallery_channels(channel: int, num_features: int, size: int = 8) -> list[int]:
    """The block of ``size`` channels that contains ``channel`` (0-7, 8-15, ...).

    A block rather than "the next eight": moving to a neighbouring channel usually keeps
    the same block, so the gallery chart stays as it is and is not drawn again."""
    start = (int(channel) // size) * size
    return list(range(start, min(start + size, num_features)))


#: Where pretrained weights are at hand without a download.
WEIGHTS_AT_HAND = ("bundled", "cached")


def random_init_for(model: str, remembered: Mapping[str, bool], current: bool,
                    weights_status: str) -> bool:
    """Whether ``model`` starts with random init when the student switches to it: as they
    last left it; else pretrained when its weights are at hand (random init ticked because
    another model's weights were missing must not stick to one that has them); else as
    the box is (offline, the next model's weights are likely missing too)."""
    if model in remembered:
        return bool(remembered[model])
    if weights_status in WEIGHTS_AT_HAND:
        return False
    return bool(current)
