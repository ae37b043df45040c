"""The words of the dashboard: the sentences for students under each chart
(:data:`EXPLAIN`) and the sentences written with a layer's own numbers.

Kept together so the wording can be read and checked in one place; each text is two to
four sentences that say what a chart shows and what to notice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .views import LayerView, ViewData

EXPLAIN: dict[str, str] = {
    "overview": (
        "Each point is one BatchNorm layer, in the order the forward pass reaches it. The top "
        "row says how far this batch's mean is from the running mean the layer learned in "
        "training (in running standard deviations), the middle row compares the variances "
        "(0 = equal), and the bottom row checks that the literal formula reproduces PyTorch's "
        "output. Orange points normalised with the batch statistics, blue points with the "
        "running ones: click a point to open that layer below."
    ),
    "channel_stats": (
        "One dot per channel: the mean and (biased) variance of this batch's conv output, "
        "next to the running mean and variance stored in the layer. In train mode BatchNorm "
        "uses the orange (batch) numbers, in eval mode the blue (running) ones; where the two "
        "differ a lot, train and eval give different outputs for the same image."
    ),
    "distribution": (
        "Histograms of the selected channel over the whole batch: the conv output that "
        "enters BatchNorm, the normalised output, and what the activation makes of it. "
        "BatchNorm only shifts and scales each channel, so the shape stays the same while the "
        "axis changes; notice where the batch mean and the running mean sit."
    ),
    "all_channels": (
        "Every row is one channel's histogram of the conv output, with its batch mean marked. "
        "Channels live on very different scales, which is why BatchNorm keeps one mean and "
        "one variance per channel (not one per layer, and not a history of batches)."
    ),
    "feature_maps": (
        "The selected channel of image 0 as a heatmap: before BatchNorm, after it, and after "
        "the activation that follows. Each pixel is a real value of the tensor (a regular "
        "subset of positions, never averaged); hover to read it."
    ),
    "gallery": (
        "The block of eight channels around the selected one (conv output, image 0), each on "
        "its own colour scale. Different channels respond to different patterns of the "
        "stimulus; change the channel above to move to another block."
    ),
    "running_update": (
        "What this forward pass does to the stored running statistics: running = (1 - "
        "momentum) * running + momentum * batch statistic, with the unbiased variance. With "
        "a small momentum the change per batch is tiny; momentum=None averages all batches "
        "seen so far. In eval mode (or with tracking off) nothing is updated."
    ),
    "manual": (
        "Left: the formula (x - mean) / sqrt(var + eps) * gamma + beta, applied by hand with "
        "the statistics the layer actually used, against PyTorch's output: the dots lie on the "
        "identity line. Right: the largest difference per channel over every element, about "
        "a millionth of the size of the values: float32 rounding and nothing else."
    ),
    "formula": (
        "The same formula for one element with its actual numbers. In train mode the mean and "
        "variance are this batch's (per channel, over N x H x W values, biased variance); in "
        "eval mode they are the running ones."
    ),
    "inplace": (
        "A forward hook that stores a reference to BatchNorm's output does not keep what "
        "BatchNorm computed if the next module works in place: the ReLU overwrites the same "
        "memory. Left is a clone taken right after BatchNorm, middle is what the stored "
        "reference holds at the end of the forward, right marks the overwritten values."
    ),
    "predictions": (
        "The network's five most likely ImageNet classes for the selected image, with the "
        "current BatchNorm settings (left) and with every BatchNorm layer in eval mode "
        "(right), which is how the network is meant to run at inference. Train mode makes an "
        "image's prediction depend on the other images in its batch."
    ),
    "preprocess": (
        "What the network actually receives: the raw pixels after the model's normalisation, "
        "one map per colour channel (hover for values)."
    ),
}


# -- sentences written with a layer's numbers --------------------------------------------------


def _g(v: float | None, digits: int = 6) -> str:
    return "None" if v is None else f"{v:.{digits}g}"


def layer_status_text(layer: LayerView, overridden: bool) -> str:
    """One sentence: the layer's state, which statistics it used and whether it updated."""
    stats = ("**batch** statistics (mean and biased variance over N x H x W = "
             f"{layer.count} values per channel)" if layer.stats_used == "batch"
             else "its **running** statistics")
    update = ("and **updated** its running statistics" if layer.updates_running_stats
              else "and left its running statistics unchanged")
    source = "a per-layer override" if overridden else "the global mode"
    act = (f"followed by `{layer.activation}`"
           + (" **in place**" if layer.activation_inplace else " (not in place)")
           if layer.activation else "not directly followed by an activation")
    return (f"`{layer.label}` ({layer.type}, {layer.num_features} channels, input "
            f"{'x'.join(str(s) for s in layer.input_shape)}) ran as `{layer.mode}` "
            f"(from {source}). It normalised with {stats} {update}; it is {act}.")


def running_update_text(layer: LayerView, channel: int) -> str:
    """The update of one channel written out with its numbers: before -> after."""
    c = int(channel)
    if not layer.updates_running_stats or layer.running_mean_after is None:
        if not layer.has_running_stats:
            return (f"`{layer.label}` has no running statistics (track_running_stats=None "
                    "behaviour): it uses batch statistics in train *and* eval.")
        return (f"No update: in `{layer.mode}` the running statistics of `{layer.label}` are "
                f"{'read' if layer.stats_used == 'running' else 'ignored'}, not written. "
                f"Channel {c}: running mean {_g(float(layer.running_mean_before[c]))}, "
                f"running var {_g(float(layer.running_var_before[c]))}.")
    f = layer.update_factor
    why = ("momentum" if layer.momentum is not None
           else f"1/num_batches_tracked = 1/{layer.num_batches_tracked_after}")
    unb = layer.batch_var_unbiased
    return (
        f"Channel {c}, factor {_g(f)} ({why}):  \n"
        f"running_mean: (1 - {_g(f)}) * {_g(float(layer.running_mean_before[c]))} + {_g(f)} * "
        f"{_g(float(layer.batch_mean[c]))} -> **{_g(float(layer.running_mean_after[c]))}**  \n"
        f"running_var: (1 - {_g(f)}) * {_g(float(layer.running_var_before[c]))} + {_g(f)} * "
        f"{_g(None if unb is None else float(unb[c]))} (unbiased batch var) -> "
        f"**{_g(float(layer.running_var_after[c]))}**  \n"
        f"num_batches_tracked: {layer.num_batches_tracked_before} -> "
        f"{layer.num_batches_tracked_after}; largest difference between this manual update "
        f"and PyTorch's over all channels: {_g(layer.running_update_max_abs_diff, 3)}."
    )


def formula_text(ex: Mapping[str, Any]) -> str:
    """Markdown for :meth:`LayerView.element`'s dict."""
    n, c, h, w = ex["index"]
    stats = "this batch's" if ex["stats"] == "batch" else "the running"
    lines = [
        f"Element x[{n}, {c}, {h}, {w}] ({ex['label']}), normalised with {stats} statistics "
        f"of channel {c}:",
        "",
        f"- x = {ex['x']:.7g}, mean = {ex['mean']:.7g}, var = {ex['var']:.7g}, "
        f"eps = {ex['eps']:g}, gamma = {ex['weight']:.7g}, beta = {ex['bias']:.7g}",
        f"- `{ex['equation']}`",
        f"- PyTorch's BatchNorm output: **{ex['native']:.7g}** (|manual - native| = "
        f"{ex['abs_diff']:.2g})",
    ]
    if ex.get("after_activation") is not None:
        lines.append(f"- after `{ex['activation']}`: {ex['after_activation']:.7g}")
    return "\n".join(lines)


def inplace_layers(view: ViewData) -> list[dict[str, Any]]:
    """Layers whose BN output a reference-keeping hook would see changed (table rows)."""
    rows = []
    for layer in view.layers:
        if layer.overwritten_by is not None:
            rows.append({"layer": layer.label, "activation": layer.activation,
                         "in place": bool(layer.activation_inplace),
                         "overwritten by": layer.overwritten_by,
                         "overwritten fraction": layer.overwritten_fraction})
    return rows


def inplace_text(view: ViewData, layer: LayerView) -> str:
    """Plain words for the in-place view, also (especially) when nothing is in place."""
    rows = inplace_layers(view)
    if not rows:
        acts = sorted({f"{ly.activation}" for ly in view.layers if ly.activation})
        return (f"No BatchNorm output of {view.model} is overwritten in place: its "
                f"activations ({', '.join(acts) or 'none'}) are **not** in place, so a forward "
                "hook that keeps a reference sees exactly the BatchNorm output. Pick a model "
                "with `ReLU(inplace=True)` such as resnet18 to see the effect.")
    if layer.overwritten_by is None:
        consumer = (f"consumed by {layer.activation} out of place" if layer.activation
                    else "not followed by an activation")
        return (f"`{layer.label}` is not overwritten in place (its output is {consumer}). "
                f"{len(rows)} of {len(view.layers)} layers of {view.model} are: pick one in "
                "the table.")
    frac = layer.overwritten_fraction or 0.0
    return (f"`{layer.label}` is followed by `{layer.activation or layer.overwritten_by}`"
            f"{' in place' if layer.activation_inplace else ''}: `{layer.overwritten_by}` "
            f"rewrote **{frac:.1%}** of its output in the same memory. A hook that kept "
            "a reference sees the rewritten values; `output.clone()` in the hook (or a "
            "forward pre-hook on the next module) sees the true BatchNorm output.")


def manual_check_note(manual_check: str) -> str:
    """Which code computed the right-hand chart's differences (``report.manual_check``)."""
    return {
        "compiled": "Differences computed by bnviz's compiled check (bnviz/csrc/probe.cpp: the "
                    "same formula, reading each activation once or twice).",
        "eager": "Differences computed with eager PyTorch ops (the compiled check is not built "
                 "on this server: `bnviz build-kernel`).",
    }.get(manual_check, f"Differences computed by: {manual_check} (per layer, whichever applies).")
