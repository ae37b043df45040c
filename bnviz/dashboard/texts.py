"""The words of the dashboard: the sentences for students under each chart
(:data:`EXPLAIN`) and the sentences written with a layer's own numbers.

Kept together so the wording can be read and checked in one place; each text is two to
four sentences that say what a chart shows and what to notice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..stimuli import PHOTOS

if TYPE_CHECKING:
    from .config import DashConfig
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
        "the activation that follows. Every pixel is the tensor's own value (up to 112 x 112; "
        "a larger map shows the means of small blocks, and its title says so); hover to read "
        "it. Each panel has its own colour bar; tick the box above to put all panels on one "
        "scale, where equal colours are equal numbers."
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


#: The first lines of the main page.
INTRO = (
    "Every BatchNorm layer of a real network, measured in one forward pass: which statistics "
    "it normalised with, what it did to its running statistics, and PyTorch's output next to "
    "the formula worked out by hand. Start with the **network overview**, click a layer, and "
    "read its charts; the address bar holds the whole view, so a link reproduces it."
)

#: The invitation under the introduction, for the global mode in use.
MODE_INVITATION = {
    "eval": (
        "Every layer runs in **eval**, as the network is meant to run: it normalises with the "
        "running statistics it learned in training, so the predictions below are the "
        "network's real answers. A freshly built torchvision model is in **train** mode until "
        "`model.eval()` is called: flip to train and see what changes (which statistics each "
        "layer uses, its running statistics, the predictions)."
    ),
    "train": (
        "Every layer runs in **train**, as a model does before `model.eval()`: it normalises "
        "with *this batch's* statistics and updates its running ones, so each image's "
        "prediction depends on the other images of the batch (section 4 sets them beside the "
        "all-eval ones). Flip back to eval to see the network as it is meant to run."
    ),
}
#: The button under the invitation: the mode it switches to, and its label.
MODE_FLIP = {"eval": ("train", "Flip to train and see what changes"),
             "train": ("eval", "Back to eval")}


# -- the dashboard's words for bnviz's messages ------------------------------------------------

#: Messages are written for the CLI and the Python API; on the page their fixes name the
#: dashboard's controls instead. Specific phrasings first, then any flag left.
_DASHBOARD_FIXES = (
    (re.compile(r"use --device cpu \(or auto\), or install a CUDA build of PyTorch on a GPU "
                r"machine\."),
     "pick cpu (or auto) under Device in the sidebar; this server has no CUDA device."),
    (re.compile(r"(?:use )?weights=None \(CLI: --weights random\)"),
     "tick 'Use random init (not pretrained)' in the sidebar"),
    (re.compile(r"--device cpu"), "cpu under Device in the sidebar"),
)
_FLAG_WORDS = {
    "layer-mode": "the Per-layer settings table",
    "batch-size": "Batch size", "batch": "Batch size", "size": "Image size",
    "device": "Device", "mode": "Global mode", "stimulus": "the stimulus controls",
    "seed": "Seed", "model": "Model", "weights": "'Use random init (not pretrained)'",
    "layer": "Layer", "channel": "Channel", "composition": "Composition",
}
_FLAG = re.compile(r"--(" + "|".join(sorted(map(re.escape, _FLAG_WORDS), key=len,
                                             reverse=True)) + r")\b")


def dashboard_message(text: str) -> str:
    """A bnviz message with its CLI words (``--device cpu``, ``weights=None (CLI: ...)``)
    replaced by the dashboard control that does the same."""
    for pattern, words in _DASHBOARD_FIXES:
        text = pattern.sub(words, text)
    return _FLAG.sub(lambda m: _FLAG_WORDS[m.group(1)], text)


# -- the batch, described -----------------------------------------------------------------------


def _listed(values: list[str], most: int = 6) -> str:
    shown = values if len(values) <= most else [*values[: most - 1], "…", values[-1]]
    return ", ".join(shown)


def describe_batch(cfg: DashConfig, upload_name: str = "") -> str:
    """The stimulus as the batch really holds it: with composition 'different' each image
    is another one (the stimulus spec alone names image 0)."""
    from .uploads import describe_config_stimulus  # it needs the config, which needs this

    first = describe_config_stimulus(cfg, upload_name)
    n, p = cfg.batch_size, cfg.param_dict
    if cfg.composition != "different" or n < 2:
        return first
    if cfg.stimulus == "uniform":
        levels = []
        for i in range(n):  # as bnviz.stimuli.batch makes them: 1/n apart, wrapping
            v = float(p["value"]) - i / n
            levels.append(f"{v + 1.0 if v < 0 else v:.3g}")
        return f"uniform, a different level per image ({_listed(levels)})"
    if cfg.stimulus == "image":
        start = PHOTOS.index(p["name"]) if p.get("name") in PHOTOS else 0
        names = [PHOTOS[(start + i) % len(PHOTOS)] for i in range(n)]
        return f"photos {_listed(names)} (one per image)"
    if cfg.stimulus == "noise":
        return (f"noise (gaussian, mean {float(p['mean']):g}, std {float(p['std']):g}), "
                f"seeds {cfg.seed} to {cfg.seed + n - 1}, one per image")
    if cfg.stimulus == "grating":
        angles = [f"{float(p['orientation']) + 180.0 * i / n:.3g}°" for i in range(n)]
        return f"{first}, orientation per image {_listed(angles)}"
    if cfg.stimulus == "checkerboard":
        counts = [int(p["squares"])]  # doubling to one-pixel squares, then inverted
        while counts[-1] * 2 <= cfg.size:
            counts.append(counts[-1] * 2)
        boards = [f"{c}×{c}" for c in counts] + [f"{c}×{c} inverted" for c in counts]
        per_image = [boards[i % len(boards)] for i in range(n)]
        return f"checkerboards of {_listed(per_image)} squares (one per image)"
    return first


# -- sentences written with a layer's numbers --------------------------------------------------


def format_momentum(momentum: float | None) -> str:
    """A momentum as people write it: up to 6 significant digits (0.01, not
    0.010000000000000009, which is what 1 - 0.99 is in floating point); 'none' for the
    cumulative average."""
    return "none" if momentum is None else f"{momentum:.6g}"


def _g(v: float | None, digits: int = 6) -> str:
    return "None" if v is None else f"{v:.{digits}g}"


def layer_status_text(layer: LayerView, overridden: bool) -> str:
    """One sentence: the layer's state, which statistics it used and whether it updated."""
    stats = ("**batch** statistics (mean and biased variance over N x H x W = "
             f"{layer.count} values per channel)" if layer.stats_used == "batch"
             else "its **running** statistics")
    if not layer.has_running_stats:
        update = ("; it has **no running statistics** (track=none, as if built with "
                  "track_running_stats=False), so it normalises with batch statistics in "
                  "train and eval alike")
    elif layer.updates_running_stats:
        update = (" and **updated** its running statistics (momentum "
                  f"{format_momentum(layer.momentum)})")
    else:
        update = " and left its running statistics unchanged"
    source = "a per-layer override" if overridden else "the global mode"
    act = (f"followed by `{layer.activation}`"
           + (" **in place**" if layer.activation_inplace else " (not in place)")
           if layer.activation else "not directly followed by an activation")
    return (f"`{layer.label}` ({layer.type}, {layer.num_features} channels, input "
            f"{'x'.join(str(s) for s in layer.input_shape)}) ran as `{layer.mode}` "
            f"(from {source}). It normalised with {stats}{update}; it is {act}.")


def running_update_text(layer: LayerView, channel: int) -> str:
    """The update of one channel written out with its numbers: before -> after."""
    c = int(channel)
    if not layer.updates_running_stats or layer.running_mean_after is None:
        if not layer.has_running_stats:
            return (f"`{layer.label}` has no running statistics (track=none: as if built with "
                    "track_running_stats=False), so there is nothing to update; it normalises "
                    "with batch statistics in train *and* eval.")
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
