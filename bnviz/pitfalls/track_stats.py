"""Experiment 4: what ``track_running_stats`` really does ("eval() still uses my batch").

docs/stories.md section 4: a layer *built* with ``track_running_stats=False`` has no running
buffers and normalises with batch statistics in train *and* eval. Switching the attribute
off on an *existing* layer is different: its buffers stay, eval keeps using them, and train
stops updating them.

The experiment takes a real BatchNorm layer and its real input (one forward of a private
copy of the model), builds three variants -- the layer as it is, a layer built with
``track_running_stats=False`` (same weight and bias), and a copy with the flag switched off
-- and runs each in train and in eval. For every row it *measures* which statistics were
used (the native output is compared with the batch-statistics and the running-statistics
formula, :func:`bnviz.pitfalls.formulas.candidate_outputs`) and whether the buffers changed
(compared element by element before and after). :mod:`bnviz.modes`' prediction is shown
next to the measurement, so a disagreement would be visible.
"""

from __future__ import annotations

import copy
from typing import Any

import plotly.graph_objects as go
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..devices import resolve_device
from ..errors import LayerError
from ..models import DEFAULT_MODEL
from ..modes import bn_layers, stats_used, unknown_layer_error, updates_running_stats
from .base import PageControls, PitfallResult, StimulusInputs
from .cli import add_stimulus_options, stimulus_kwargs
from .common import load_experiment_model, make_batch
from .figures import grouped_bars
from .formulas import MATCH_RTOL, candidate_outputs, relative_error

__all__ = ["SETUPS", "figures", "measure", "run"]

NAME = "track-stats"
TITLE = "What does track_running_stats do?"
STORY = (
    "\"eval() still uses my batch\": a layer with track_running_stats=False kept normalising "
    "with batch statistics after model.eval(); and flipping the flag on an existing layer "
    "behaved differently again (docs/stories.md section 4)."
)
EXPLANATION = (
    "`track_running_stats` means two things depending on *when* it is set. A layer "
    "**built** with `track_running_stats=False` has no `running_mean`/`running_var` "
    "buffers at all, so it can only normalise with batch statistics -- in train *and* in "
    "eval.\n\n"
    "Switching the attribute **off on an existing layer** keeps its buffers: eval still "
    "normalises with them, and train uses batch statistics but no longer updates them. "
    "Each cell below is measured: the native output is compared with both formulas, and "
    "the buffers are compared before and after the forward."
)

SETUPS = {
    "default": "layer as built (track_running_stats=True)",
    "built_without": "built with track_running_stats=False",
    "flag_off": "flag switched off on the existing layer",
}
MODES = ("train", "eval")


def _plain_bn_class(bn: _BatchNorm, x: torch.Tensor) -> type[_BatchNorm]:
    if type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return type(bn)
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]


def make_variant(setup: str, bn: _BatchNorm, x: torch.Tensor) -> _BatchNorm:
    """A new layer for ``setup`` (never ``bn`` itself)."""
    if setup == "default":
        return copy.deepcopy(bn)
    if setup == "flag_off":
        layer = copy.deepcopy(bn)
        layer.track_running_stats = False
        return layer
    if setup == "built_without":
        layer = _plain_bn_class(bn, x)(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                       affine=bn.affine, track_running_stats=False)
        if bn.affine:
            with torch.no_grad():
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
        return layer.to(x.device)
    raise ValueError(f"unknown setup {setup!r}")


def _snapshot(bn: _BatchNorm) -> dict[str, torch.Tensor | None]:
    def c(t):
        return None if t is None else t.detach().clone()

    return {"running_mean": c(bn.running_mean), "running_var": c(bn.running_var),
            "num_batches_tracked": c(bn.num_batches_tracked)}


def measure(bn: _BatchNorm, x: torch.Tensor, training: bool,
            rtol: float = MATCH_RTOL) -> dict[str, Any]:
    """Run ``bn`` once in train/eval on ``x`` and measure what it did (mutates ``bn``)."""
    bn.train(training)
    predicted_stats, predicted_update = stats_used(bn), updates_running_stats(bn)
    before = _snapshot(bn)
    with torch.no_grad():
        y = bn(x)
    after = _snapshot(bn)
    cands = candidate_outputs(
        x, stats_used="batch", weight=bn.weight, bias=bn.bias, eps=bn.eps,
        running_mean=before["running_mean"], running_var=before["running_var"])
    err_batch = relative_error(cands["batch"], y)[1]
    err_running = None if cands["running"] is None else relative_error(cands["running"], y)[1]
    batch_ok = err_batch <= rtol
    running_ok = err_running is not None and err_running <= rtol
    measured = ("batch = running (indistinguishable)" if batch_ok and running_ok else
                "batch" if batch_ok else "running" if running_ok else "neither")
    has_buffers = before["running_mean"] is not None

    def changed(key):
        if before[key] is None:
            return None
        return not torch.equal(before[key], after[key])

    nbt = (None if before["num_batches_tracked"] is None else
           f"{int(before['num_batches_tracked'])} -> {int(after['num_batches_tracked'])}")
    mean_change = (None if not has_buffers else
                   float((after["running_mean"] - before["running_mean"]).abs().max()))
    buffers_changed = has_buffers and any(
        changed(k) for k in ("running_mean", "running_var", "num_batches_tracked"))
    return {
        "mode": "train" if training else "eval",
        "has_buffers": has_buffers,
        "track_running_stats": bn.track_running_stats,
        "stats_used": measured,
        "rel_err_vs_batch": err_batch,
        "rel_err_vs_running": err_running,
        "running_mean_changed": changed("running_mean"),
        "running_var_changed": changed("running_var"),
        "num_batches_tracked": nbt,
        "buffers_changed": bool(buffers_changed),
        "running_mean_max_change": mean_change,
        "bnviz_predicts_stats": predicted_stats,
        "bnviz_predicts_update": predicted_update,
        "prediction_ok": measured == predicted_stats and predicted_update == buffers_changed,
    }


def run(
    model: Any = DEFAULT_MODEL,
    weights: Any = "auto",
    layer: str | None = None,
    stimulus: str = "image:chelsea",
    composition: str = "different",
    batch_size: int = 2,
    size: int = 112,
    seed: int = 0,
    device: str = "auto",
) -> PitfallResult:
    """Measure the three ``track_running_stats`` setups in train and eval on a real layer."""
    dev = resolve_device(device)
    loaded = load_experiment_model(model, weights)
    module = loaded.module.to(dev).eval()
    bns = dict(bn_layers(module))
    if not bns:
        raise LayerError(f"{loaded.name} has no BatchNorm layers.",
                         f"pick a model with BatchNorm, e.g. {DEFAULT_MODEL}.")
    layer = next(iter(bns)) if layer is None else layer
    if layer not in bns:
        raise unknown_layer_error(layer, list(bns))
    bn = bns[layer]
    if bn.running_mean is None:
        raise LayerError(f"Layer {layer!r} has no running statistics to begin with.",
                         "pick a layer built with track_running_stats=True.")
    _, x = make_batch(loaded, stimulus, batch_size=batch_size, size=size,
                      composition=composition, seed=seed)
    box: dict[str, torch.Tensor] = {}
    def keep_input(module, args):  # returns None: a pre-hook's return value replaces args
        box["x"] = args[0].detach().clone()

    handle = bn.register_forward_pre_hook(keep_input)
    try:
        with torch.no_grad():
            module(x.to(dev))
    finally:
        handle.remove()
    bn_input = box["x"]

    rows = []
    for key, label in SETUPS.items():
        for mode in MODES:
            variant = make_variant(key, bn, bn_input)  # fresh per row: train writes buffers
            rows.append({"setup": label, "key": key, **measure(variant, bn_input,
                                                              mode == "train")})
    fresh = nn.BatchNorm2d(bn.num_features)
    fresh_init = {"running_mean": sorted({float(v) for v in fresh.running_mean}),
                  "running_var": sorted({float(v) for v in fresh.running_var})}
    verdict, reproduced = _verdict(loaded.name, loaded.weights, layer, rows, fresh_init,
                                   bn.momentum)
    return PitfallResult(
        name=NAME,
        title=TITLE,
        verdict=verdict,
        reproduced=reproduced,
        table=rows,
        data={"layer": layer, "momentum": bn.momentum, "eps": bn.eps,
              "input_shape": list(bn_input.shape), "rtol": MATCH_RTOL,
              "fresh_layer_buffers": fresh_init},
        model=loaded.name,
        weights=loaded.weights,
        device=str(dev),
    )


def _row(rows, key, mode):
    return next(r for r in rows if r["key"] == key and r["mode"] == mode)


def _setup_sentence(label: str, train: dict, ev: dict, momentum) -> str:
    s = f"{label[0].upper()}{label[1:]}: "
    if not train["has_buffers"]:
        s += "no running buffers; "
    if train["stats_used"] == ev["stats_used"]:
        s += f"train and eval both normalise with {train['stats_used']} statistics"
    else:
        s += (f"train normalises with {train['stats_used']} statistics, eval with "
              f"{ev['stats_used']} statistics")
    if train["has_buffers"]:
        changed = [r["mode"] for r in (train, ev) if r["buffers_changed"]]
        if changed:
            s += (f"; {' and '.join(changed)} updates the running buffers "
                  f"(momentum {_fmt_momentum(momentum)}, running_mean moved by up to "
                  f"{train['running_mean_max_change']:.3g}, num_batches_tracked "
                  f"{train['num_batches_tracked']})")
        else:
            s += "; the running buffers are kept but never change (train no longer updates them)"
    return s + "."


def _fmt_momentum(momentum) -> str:
    return "None (cumulative average)" if momentum is None else f"{momentum:g}"


def _verdict(model, weights, layer, rows, fresh_init, momentum) -> tuple[str, bool]:
    parts = [f"{layer} of {model} ({weights}), measured:"]
    for key, label in SETUPS.items():
        parts.append(_setup_sentence(label, _row(rows, key, "train"), _row(rows, key, "eval"),
                                     momentum))
    if fresh_init["running_mean"] == [0.0] and fresh_init["running_var"] == [1.0]:
        parts.append("A freshly built layer starts with running_mean 0 and running_var 1.")
    mismatches = [f"{r['setup']}/{r['mode']}" for r in rows if not r["prediction_ok"]]
    if mismatches:
        parts.append(f"bnviz.modes predicted differently for: {', '.join(mismatches)}.")
    reproduced = (
        _row(rows, "built_without", "eval")["stats_used"] == "batch"
        and _row(rows, "flag_off", "eval")["stats_used"] == "running"
        and not _row(rows, "flag_off", "train")["buffers_changed"]
        and _row(rows, "default", "train")["buffers_changed"]
    )
    return " ".join(parts), bool(reproduced)


def figures(result: PitfallResult) -> list:
    rows = result.table
    setups = list(SETUPS.values())
    code = {"batch": 0.0, "running": 1.0}
    z, text = [], []
    for label in setups:
        zr, tr = [], []
        for mode in MODES:
            r = next(r for r in rows if r["setup"] == label and r["mode"] == mode)
            zr.append(code.get(r["stats_used"], 0.5))
            buffers = ("no buffers" if not r["has_buffers"] else
                       "buffers updated" if r["buffers_changed"] else "buffers unchanged")
            tr.append(f"{r['stats_used']} statistics<br>{buffers}")
        z.append(zr)
        text.append(tr)
    grid = go.Figure(go.Heatmap(
        z=z, x=list(MODES), y=setups, text=text, texttemplate="%{text}", zmin=0, zmax=1,
        colorscale=[[0, "#ffcc80"], [0.5, "#e0e0e0"], [1, "#90caf9"]], showscale=False,
        hoverinfo="text"))
    grid.update_layout(title=f"{result.data['layer']}: which statistics, do buffers change?",
                       yaxis_autorange="reversed", margin={"t": 60, "b": 10})
    labels = [f"{r['setup']} / {r['mode']}" for r in rows]
    errs = grouped_bars(
        labels,
        {"vs batch-statistics formula": [r["rel_err_vs_batch"] for r in rows],
         "vs running-statistics formula": [r["rel_err_vs_running"] for r in rows]},
        title="Native output vs each formula (a match is <= 1e-5)", yaxis="max relative error",
        log=True, threshold=result.data.get("rtol", MATCH_RTOL))
    return [grid, errs]


def add_arguments(parser) -> None:
    add_stimulus_options(parser, model=DEFAULT_MODEL, stimulus="image:chelsea")


def kwargs_from_args(args) -> dict:
    return stimulus_kwargs(args)


CONTROLS = PageControls(StimulusInputs(model=DEFAULT_MODEL, stimulus="image:chelsea"))
