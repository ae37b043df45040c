"""Experiment 8: three ways to "freeze" BatchNorm, and what each one actually stops.

docs/stories.md section 3 (follow-up): people say "freeze BN" and mean different things.

* ``requires_grad=False`` on weight/bias stops the optimizer from changing gamma and beta, but
  the layer is still in train mode: it normalises with batch statistics and keeps updating
  its running statistics on every forward.
* ``bn.eval()`` switches the layer to its running statistics and stops updating them, but
  gamma and beta still receive gradients and the optimizer still changes them.
* ``affine=False`` builds a layer without weight and bias at all; in train mode it still
  normalises with batch statistics and updates its running statistics.

The experiment does what a training loop does - one SGD step on a real batch with a real
loss - on a fresh copy of a real model for each variant, and then *measures* the three
answers: did any BN weight/bias change (parameters before vs after), did any running
statistic change (buffers before vs after), and which statistics did each layer's output
use (its output compared with the BN formula evaluated with the batch statistics and with
the running statistics of that moment).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BnvizError
from ..inspection import logits_of
from ..models import DEFAULT_MODEL, LoadedModel
from ..modes import bn_layers
from .base import PageControls, PhotoInputs, PitfallResult, Widget
from .cli import add_photo_options, photo_kwargs
from .common import DEFAULT_SIZE, prepare_photo, replace_module, single_value_errors

__all__ = ["VARIANTS", "StepReport", "configure", "figures", "one_step", "run",
           "without_affine"]

NAME = "freeze"
TITLE = "Freezing BN: requires_grad=False vs eval() vs affine=False"
STORY = ("How to freeze BN - requires_grad, eval() or affine=False (docs/stories.md "
         "section 3)")
EXPLANATION = """\
A BatchNorm layer has two kinds of state. Gamma and beta (weight and bias) are *parameters*:
the optimizer changes them from their gradients. The running mean and variance are
*buffers*: the layer itself overwrites them during every forward in train mode, no optimizer
involved. Which statistics the output uses (batch or running) depends only on the mode.

So `requires_grad=False` freezes gamma and beta but the layer keeps normalising with batch
statistics and keeps updating its running statistics. `bn.eval()` switches to the running
statistics and stops updating them, but gamma and beta still get gradients and change. Only
both together freeze the layer completely. `affine=False` builds a layer with no gamma and
beta at all. The table is measured, not written down: each row is a fresh copy of the model,
one real SGD step, then parameters and buffers compared with their values before, and each
layer's output compared with the BN formula using batch and running statistics.
"""

#: key -> (label, the code a user would write)
VARIANTS: dict[str, tuple[str, str]] = {
    "train": ("train (nothing frozen)", "bn.train()  # as after model.train()"),
    "requires_grad": ("requires_grad=False",
                      "bn.weight.requires_grad_(False); bn.bias.requires_grad_(False)"),
    "eval": ("eval()", "bn.eval()"),
    "eval_requires_grad": ("eval() + requires_grad=False", "both of the above"),
    "affine_false": ("affine=False",
                     "BatchNorm2d(C, affine=False) in place of each BN (running stats copied)"),
}


def without_affine(bn: _BatchNorm) -> _BatchNorm:
    """A copy of ``bn`` built with ``affine=False`` (no weight/bias), same running stats."""
    kwargs = dict(eps=bn.eps, momentum=bn.momentum, affine=False,
                  track_running_stats=bn.track_running_stats)
    try:
        new = type(bn)(bn.num_features, **kwargs)
    except TypeError:  # a subclass with another constructor: use the plain class
        new = nn.BatchNorm2d(bn.num_features, **kwargs)
    if bn.running_mean is not None and new.running_mean is not None:
        new.running_mean.copy_(bn.running_mean)
        new.running_var.copy_(bn.running_var)
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    device = bn.running_mean.device if bn.running_mean is not None else None
    return new.to(device) if device is not None else new


def configure(base: nn.Module, variant: str) -> nn.Module:
    """A fresh copy of ``base`` frozen the ``variant`` way.

    Every module other than BN stays in eval (dropout and drop-connect off), so that the
    variants differ only in what is done to the BatchNorm layers.
    """
    if variant not in VARIANTS:
        raise BnvizError(f"Unknown freeze variant {variant!r}.",
                         f"choose one of: {', '.join(VARIANTS)}.")
    net = copy.deepcopy(base).eval()
    if variant == "affine_false":
        for name, bn in bn_layers(net):
            replace_module(net, name, without_affine(bn))
    for _, bn in bn_layers(net):
        bn.train(variant not in ("eval", "eval_requires_grad"))
        if variant in ("requires_grad", "eval_requires_grad"):
            for p in (bn.weight, bn.bias):
                if p is not None:
                    p.requires_grad_(False)
    return net


@dataclass
class LayerCheck:
    """Per BN layer: which formula reproduces its output (relative max error of each)."""

    err_batch: float
    err_running: float | None

    @property
    def stats(self) -> str:
        if self.err_running is None or self.err_batch <= self.err_running:
            return "batch"
        return "running"


@dataclass
class StepReport:
    """What one optimizer step did to every BN layer of one variant."""

    layers: list[str]
    affine: list[bool | None]  # per layer: weight/bias changed (None: layer has none)
    affine_change: list[float | None]
    running: list[bool | None]  # per layer: running stats changed (None: no buffers)
    running_change: list[float | None]
    checks: list[LayerCheck]
    other_changed: int
    other_total: int
    loss: float
    extra: dict[str, Any] = field(default_factory=dict)


def _snapshot(bn: _BatchNorm) -> dict[str, torch.Tensor | None]:
    keys = ("weight", "bias", "running_mean", "running_var")
    return {k: None if getattr(bn, k) is None else getattr(bn, k).detach().clone() for k in keys}


def _max_change(before: dict, bn: _BatchNorm, keys: tuple[str, str]) -> float | None:
    diffs = [float((getattr(bn, k).detach() - before[k]).abs().max())
             for k in keys if before[k] is not None and getattr(bn, k) is not None]
    return max(diffs) if diffs else None


def _formula_err(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 bn: _BatchNorm) -> float:
    """max |BN formula with (mean, var) - y|, in as few passes as possible.

    ``(x - mean) / sqrt(var + eps) * w + b`` is evaluated as ``x * a + c`` per channel (one
    fused pass), because this check runs on every layer of every variant.
    """
    a = torch.rsqrt(var.to(x.dtype) + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach()
    c = -mean.to(x.dtype) * a
    if bn.bias is not None:
        c = c + bn.bias.detach()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    t = torch.addcmul(c.view(shape), x, a.view(shape))
    return float(t.sub_(y).abs_().max())


def one_step(net: nn.Module, x: torch.Tensor, label: int, lr: float) -> StepReport:
    """One SGD step (cross-entropy against ``label``) on ``net``; measure every BN layer."""
    layers = bn_layers(net)
    before = {name: _snapshot(bn) for name, bn in layers}
    bn_params = {id(p) for _, bn in layers for p in (bn.weight, bn.bias) if p is not None}
    others = [p for p in net.parameters() if id(p) not in bn_params]
    others_before = [p.detach().clone() for p in others]
    running_at_forward: dict[str, tuple] = {}
    checks: dict[str, LayerCheck] = {}
    handles = []

    def pre(name):
        def hook(bn, _inp):
            running_at_forward[name] = (
                None if bn.running_mean is None else bn.running_mean.detach().clone(),
                None if bn.running_var is None else bn.running_var.detach().clone())
        return hook

    def post(name):
        def hook(bn, inp, out):
            with torch.no_grad():
                x_in, y = inp[0].detach(), out.detach()
                dims = [0, *range(2, x_in.dim())]
                var, mean = torch.var_mean(x_in, dim=dims, correction=0)  # biased, as BN
                scale = max(float(y.abs().max()), 1e-30)
                err_b = _formula_err(x_in, y, mean, var, bn) / scale
                run_mean, run_var = running_at_forward[name]
                err_r = None if run_mean is None else (
                    _formula_err(x_in, y, run_mean, run_var, bn) / scale)
            checks[name] = LayerCheck(err_b, err_r)
        return hook

    for name, bn in layers:
        handles.append(bn.register_forward_pre_hook(pre(name)))
        handles.append(bn.register_forward_hook(post(name)))
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    optimizer.zero_grad()
    try:
        with single_value_errors():
            logits = logits_of(net(x))
    finally:
        for h in handles:
            h.remove()
    if logits is None or logits.dim() != 2:
        raise BnvizError("The model output is not a batch of class logits.",
                         "use a classification model from 'bnviz models'.")
    if not 0 <= label < logits.shape[1]:
        raise BnvizError(f"Label {label} is not a class of this model ({logits.shape[1]} "
                         "classes).", f"pass a label from 0 to {logits.shape[1] - 1}.")
    loss = F.cross_entropy(logits, torch.full((logits.shape[0],), label, device=logits.device))
    loss.backward()
    optimizer.step()

    report = StepReport([n for n, _ in layers], [], [], [], [], [], 0, len(others),
                        float(loss.detach()))
    for name, bn in layers:
        snap = before[name]
        has_affine = snap["weight"] is not None or snap["bias"] is not None
        has_running = snap["running_mean"] is not None
        affine_change = _max_change(snap, bn, ("weight", "bias"))
        running_change = _max_change(snap, bn, ("running_mean", "running_var"))
        report.affine.append(bool(affine_change) if has_affine else None)
        report.affine_change.append(affine_change)
        report.running.append(bool(running_change) if has_running else None)
        report.running_change.append(running_change)
        report.checks.append(checks[name])
    report.other_changed = sum(bool((p.detach() != b).any()) for p, b in zip(others,
                                                                                 others_before))
    return report


def _count(flags: list[bool | None]) -> tuple[int, int]:
    known = [f for f in flags if f is not None]
    return sum(known), len(known)


def _answer(flags: list[bool | None]) -> str:
    yes, total = _count(flags)
    if total == 0:
        return "n/a"
    return "yes" if yes == total else ("no" if yes == 0 else "partly")


def _row(key: str, rep: StepReport) -> dict[str, Any]:
    label, code = VARIANTS[key]
    a_yes, a_total = _count(rep.affine)
    r_yes, r_total = _count(rep.running)
    used = [c.stats for c in rep.checks]
    n_batch = used.count("batch")
    if n_batch == len(used):
        uses = "batch statistics"
    elif n_batch == 0:
        uses = "running statistics"
    else:
        uses = f"mixed ({n_batch} batch, {len(used) - n_batch} running)"
    errs_r = [c.err_running for c in rep.checks if c.err_running is not None]
    affine_vals = [v for v in rep.affine_change if v is not None]
    running_vals = [v for v in rep.running_change if v is not None]
    return {
        "variant": label,
        "code": code,
        "affine_params_change": _answer(rep.affine) if a_total else "n/a (no weight/bias)",
        "layers_affine_changed": f"{a_yes}/{a_total}" if a_total else "n/a",
        "max_affine_change": max(affine_vals) if affine_vals else None,
        "running_stats_change": _answer(rep.running),
        "layers_running_changed": f"{r_yes}/{r_total}",
        "max_running_change": max(running_vals) if running_vals else None,
        "output_uses_batch_stats": "yes" if n_batch == len(used) else (
            "no" if n_batch == 0 else "partly"),
        "output_uses": uses,
        "max_rel_err_batch_formula": max(c.err_batch for c in rep.checks),
        "max_rel_err_running_formula": max(errs_r) if errs_r else None,
        "other_params_changed": f"{rep.other_changed}/{rep.other_total}",
        "loss": rep.loss,
    }


def run(model: str | LoadedModel = DEFAULT_MODEL, weights: Any = "auto",
        photo: str = "chelsea", batch_size: int = 4, size: int | None = DEFAULT_SIZE, seed: int = 0,
        device: str = "auto", lr: float = 0.1, label: int = 281,
        variants: list[str] | tuple[str, ...] | None = None) -> PitfallResult:
    """One SGD step per freeze variant on a fresh copy of the model; measure what changed."""
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        lr = float("nan")
    if not 0.0 < lr <= 10.0:
        raise BnvizError(f"Learning rate must be a number in (0, 10], got {lr!r}.",
                         "pass e.g. lr=0.1.")
    keys = list(VARIANTS) if not variants else list(dict.fromkeys(variants))
    for key in keys:
        if key not in VARIANTS:
            raise BnvizError(f"Unknown freeze variant {key!r}.",
                             f"choose from: {', '.join(VARIANTS)}.")
    setup = prepare_photo(model, weights, photo, batch_size, size, seed, device)
    base = setup.private_module()
    reports = {key: one_step(configure(base, key), setup.x, int(label), lr) for key in keys}
    table = [_row(key, reports[key]) for key in keys]
    by = dict(zip(keys, table))
    expected = _expectations(by)
    reproduced = bool(expected) and all(expected.values())
    n_layers = len(next(iter(reports.values())).layers)
    data = {
        **setup.data_fields(),
        "lr": lr,
        "label": int(label),
        "optimizer": f"torch.optim.SGD(trainable parameters, lr={lr:g})",
        "bn_layers": n_layers,
        "other_modules": "eval (dropout off) in every variant, so only BatchNorm differs",
        "story_checks": expected,
        "per_layer": {key: {
            "layers": rep.layers,
            "affine_changed": rep.affine,
            "running_changed": rep.running,
            "stats_used": [c.stats for c in rep.checks],
        } for key, rep in reports.items()},
    }
    arrays = {"matrix": [[_flag(row[c]) for c in _MATRIX_COLUMNS] for row in table],
              "variants": [row["variant"] for row in table]}
    verdict = _verdict(setup.label, n_layers, lr, int(label), by, expected)
    return PitfallResult(name=NAME, title=TITLE, verdict=verdict, reproduced=reproduced,
                         table=table, data=data, arrays=arrays, **setup.result_fields())


_MATRIX_COLUMNS = ("affine_params_change", "running_stats_change", "output_uses_batch_stats")


def _flag(answer: str) -> float | None:
    return {"yes": 1.0, "no": 0.0, "partly": 0.5}.get(answer)


def _expectations(by: dict[str, dict]) -> dict[str, bool]:
    """The story's claims, each checked against the measured rows present (keyed by variant)."""
    checks = {}
    if "requires_grad" in by:
        r = by["requires_grad"]
        checks["requires_grad=False stops affine updates but not running-stat updates"] = (
            r["affine_params_change"] == "no" and r["running_stats_change"] == "yes"
            and r["output_uses_batch_stats"] == "yes")
    if "eval" in by:
        r = by["eval"]
        checks["eval() stops running-stat updates and uses the running statistics"] = (
            r["running_stats_change"] == "no" and r["output_uses_batch_stats"] == "no")
    if "affine_false" in by:
        r = by["affine_false"]
        checks["affine=False removes weight/bias; running stats still update"] = (
            r["affine_params_change"].startswith("n/a") and r["running_stats_change"] == "yes")
    return checks


def _sentence(row: dict) -> str:
    if row["affine_params_change"].startswith("n/a"):
        affine = "no weight/bias exist"
    else:
        affine = f"weight/bias changed in {row['layers_affine_changed']} layers"
    return (f"{row['variant']}: {affine}, running statistics changed in "
            f"{row['layers_running_changed']}, outputs used {row['output_uses']}")


def _verdict(label: str, n_layers: int, lr: float, target: int, by: dict[str, dict],
             expected: dict[str, bool]) -> str:
    parts = [f"After one SGD step (lr {lr:g}, cross-entropy against class {target}) on {label} "
             f"({n_layers} BN layers):"]
    parts.append("; ".join(_sentence(row) for row in by.values()) + ".")
    ev = by.get("eval")
    if ev and ev["affine_params_change"] in ("yes", "partly"):
        parts.append("Note that eval() alone does not stop the optimizer from changing gamma "
                     "and beta.")
    rg = by.get("requires_grad")
    if rg and rg["running_stats_change"] in ("yes", "partly"):
        parts.append("And requires_grad=False alone does not stop the running statistics from "
                     "drifting: the layer is still in train mode.")
    if expected:
        held = sum(expected.values())
        parts.append(f"{held} of {len(expected)} claims of the story hold as measured.")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Figures, command line, page controls
# --------------------------------------------------------------------------------------------


def figures(result: PitfallResult) -> list:
    import plotly.graph_objects as go

    rows = result.table
    if not rows:
        return []
    cols = ["weight/bias changed", "running stats changed", "output used batch stats"]
    keys = list(_MATRIX_COLUMNS)
    z = [[_flag(r[k]) for k in keys] for r in rows]
    text = [[r[k] for k in keys] for r in rows]
    heat = go.Figure(go.Heatmap(
        z=z, x=cols, y=[r["variant"] for r in rows], text=text, texttemplate="%{text}",
        zmin=0, zmax=1, colorscale=[[0, "#4c78a8"], [0.5, "#eeca3b"], [1, "#e45756"]],
        showscale=False, hovertemplate="%{y}: %{x} = %{text}<extra></extra>"))
    heat.update_layout(title="After one optimizer step (measured on every BN layer)",
                       yaxis_autorange="reversed", height=180 + 40 * len(rows))
    floor = 1e-12
    bars = go.Figure([
        go.Bar(name="max |change| of weight/bias", x=[r["variant"] for r in rows],
               y=[max(r["max_affine_change"] or 0.0, floor) for r in rows]),
        go.Bar(name="max |change| of running stats", x=[r["variant"] for r in rows],
               y=[max(r["max_running_change"] or 0.0, floor) for r in rows]),
    ])
    bars.update_layout(barmode="group", yaxis_type="log",
                       title=f"How much changed (log scale, 0 shown at {floor:g})")
    return [heat, bars]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_photo_options(parser, batch_size=4)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument("--label", type=int, default=281,
                        help="target class of the cross-entropy loss (default: 281, tabby cat)")
    parser.add_argument("--variant", action="append", default=None, choices=list(VARIANTS),
                        help="only these variants (repeatable; default: all)")


def kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {**photo_kwargs(args), "lr": args.lr, "label": args.label,
            "variants": args.variant or None}


CONTROLS = PageControls(
    PhotoInputs(batch_size=4),
    rows=((
        Widget("lr", "Learning rate", "float", default=0.1, low=0.0001, high=10.0,
               format="%.4f"),
        Widget("label", "Target class", "int", default=281, low=0, high=999),
    ),),
)
