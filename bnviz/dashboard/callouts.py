"""Traps in the numbers of one layer, pointed out where they happen.

Each function reads a :class:`~bnviz.dashboard.views.LayerView` (and the picked channel)
and returns a :class:`Callout` when the trap is there, with the layer's own numbers in it;
the app draws a layer chart's callouts next to it (:func:`callouts_for`). The traps are
those of docs/stories.md that sit in real weights: a cumulative average that starts from
zero, channels whose running variance is 0, few values per channel (where biased and
unbiased variance part), and one channel far from the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .views import LayerView

#: Below this many values per channel the unbiased variance is more than 1% above the
#: biased one (n/(n-1) > 1.01): a manual calculation with torch.var() is visibly off.
FEW_VALUES = 101


def _g(v: float | None, digits: int = 6) -> str:
    return "None" if v is None else f"{v:.{digits}g}"


@dataclass(frozen=True)
class Callout:
    """One trap, shown with the charts named by their slugs (``bnviz.dashboard.charts``)."""

    key: str
    charts: tuple[str, ...]
    level: str  # "warning": it changes the numbers you compare; "info": how to read them
    text: str  # Markdown


def replaced_statistics(layer: LayerView, channel: int) -> Callout | None:
    """A running-statistics update with factor 1: the batch's statistics *replace* the
    stored ones in one forward. That is ``momentum=None`` (a cumulative average, factor
    1/num_batches_tracked) on weights whose num_batches_tracked is 0, as the bundled and
    torchvision weights are, or a momentum of 1."""
    if (not layer.updates_running_stats or layer.running_var_after is None
            or layer.update_factor is None or layer.update_factor != 1.0):
        return None
    c = int(channel)
    before, batch = float(layer.running_var_before[c]), layer.batch_var_unbiased
    unbiased = None if batch is None else float(batch[c])
    after = float(layer.running_var_after[c])
    if layer.momentum is None:
        why = (f"momentum=None averages every batch seen so far, with factor "
               f"1/num_batches_tracked; these weights say num_batches_tracked = "
               f"{layer.num_batches_tracked_before}, so after this forward it is "
               f"1/{layer.num_batches_tracked_after} = 1")
    else:
        why = "momentum is 1"
    return Callout(
        "replaced", ("running-update", "statistics"), "warning",
        f"**One forward replaces the stored statistics.** {why}: the running statistics "
        f"become this batch's, and what the weights had learned is gone. Channel {c}: "
        f"running_var (1 - 1) * {_g(before)} + 1 * {_g(unbiased)} = **{_g(after)}**.")


def zero_variance_channels(layer: LayerView) -> list[int]:
    """Channels whose stored running variance is exactly 0."""
    if layer.running_var_before is None:
        return []
    return [int(c) for c in np.flatnonzero(np.asarray(layer.running_var_before) == 0)]


def zero_variance(layer: LayerView) -> Callout | None:
    """Channels with running_var 0: a log scale cannot place them, and in eval they are
    scaled by 1/sqrt(eps)."""
    zeros = zero_variance_channels(layer)
    if not zeros:
        return None
    listed = ", ".join(str(c) for c in zeros[:12]) + (
        f" and {len(zeros) - 12} more" if len(zeros) > 12 else "")
    word = "Channel" if len(zeros) == 1 else "Channels"
    scale = 1.0 / np.sqrt(layer.eps)
    return Callout(
        "zero-variance", ("statistics",), "warning",
        f"**{word} {listed} of `{layer.label}` have running_var 0** in these weights. A log "
        "scale has no place for 0 (the chart marks them at its floor), and in eval each of "
        f"them is divided by sqrt(0 + eps) = sqrt({_g(layer.eps)}): scaled by {_g(scale, 4)}.")


def unbiased_factor(count: int) -> float | None:
    """n/(n-1): the unbiased variance over n values divided by the biased one."""
    return None if count < 2 else count / (count - 1)


def _values_per_channel(layer: LayerView) -> str:
    shape = tuple(layer.input_shape)
    dims = [shape[0], *shape[2:]]
    letters = {1: "N", 2: "N x L", 3: "N x H x W", 4: "N x D x H x W"}.get(len(dims))
    if letters is None or len(dims) < 1:
        return f"n = {layer.count}"
    return f"n = {letters} = {' x '.join(str(d) for d in dims)} = {layer.count}"


def few_values(layer: LayerView) -> Callout | None:
    """Few values per channel: the biased variance BatchNorm normalises with and the
    unbiased one (running_var, torch.var()) differ by more than 1%."""
    factor = unbiased_factor(layer.count)
    if factor is None or layer.count >= FEW_VALUES or layer.stats_used != "batch":
        return None
    n = layer.count
    return Callout(
        "few-values", ("statistics", "running-update", "manual-vs-native"), "warning",
        f"**Only {_values_per_channel(layer)} values per channel.** BatchNorm normalises "
        "with the *biased* variance (divided by n), while running_var stores the *unbiased* "
        f"one (divided by n - 1), and so does `torch.var()` by default: they differ by "
        f"n/(n - 1) = {n}/{n - 1} = **{_g(factor, 4)}** here. A manual calculation with "
        "`x.var(dim)` is off by that factor; use `x.var(dim, unbiased=False)`.")


def unbiased_update(layer: LayerView) -> Callout | None:
    """Where the running update is shown: running_var is updated with the unbiased variance."""
    factor = unbiased_factor(layer.count)
    if not layer.updates_running_stats or factor is None:
        return None
    n = layer.count
    return Callout(
        "unbiased", ("running-update",), "info",
        "running_var is updated with the **unbiased** batch variance (divided by n - 1), "
        "while this forward normalised with the biased one (divided by n): "
        f"{_values_per_channel(layer)} values per channel, so the variance that goes into "
        f"the running average is n/(n - 1) = {n}/{n - 1} = {_g(factor, 6)} times the one "
        "BatchNorm used.")


def largest_shift(layer: LayerView) -> tuple[int, float, float] | None:
    """``(channel, shift, mean |shift|)``: the channel whose batch mean is farthest from
    its running mean, in running standard deviations, and the average over the channels
    (the overview's number)."""
    if layer.mean_shift is None:
        return None
    shift = np.asarray(layer.mean_shift, dtype=np.float64)
    finite = np.isfinite(shift)
    if not finite.any():
        return None
    magnitude = np.where(finite, np.abs(shift), -1.0)
    c = int(np.argmax(magnitude))
    return c, float(shift[c]), float(np.abs(shift[finite]).mean())


def shift_outlier(layer: LayerView, channel: int) -> Callout | None:
    """The channel with the largest mean shift, next to the mean shift over channels."""
    found = largest_shift(layer)
    if found is None or layer.num_features < 2:
        return None
    c, shift, mean = found
    where = "this channel" if c == int(channel) else f"set Channel to {c} to see it"
    return Callout(
        "largest-shift", ("statistics", "distributions"), "info",
        f"**Largest shift: channel {c}**, whose batch mean is {_g(shift, 3)} running standard "
        f"deviations from its running mean; the mean over all {layer.num_features} channels "
        f"(the overview's top row) is {_g(mean, 3)} ({where}).")


def layer_callouts(layer: LayerView, channel: int) -> list[Callout]:
    """Every callout of the layer, warnings first."""
    found = [replaced_statistics(layer, channel), zero_variance(layer), few_values(layer),
             unbiased_update(layer), shift_outlier(layer, channel)]
    found = [c for c in found if c is not None]
    if any(c.key == "few-values" for c in found):  # it already says what this one says
        found = [c for c in found if c.key != "unbiased"]
    return sorted(found, key=lambda c: c.level != "warning")


def callouts_for(slug: str, layer: LayerView, channel: int) -> list[Callout]:
    """The callouts shown with the chart ``slug``."""
    return [c for c in layer_callouts(layer, channel) if slug in c.charts]
