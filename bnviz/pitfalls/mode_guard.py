"""Experiment 5: per-layer BN modes silently lost, and a guard that keeps them.

docs/stories.md section 4: a user set only ``net.bn.eval()`` (to freeze one layer of a model
that is otherwise training) and then called ``torch.onnx.export(net, ...)``. The exporter
switches the whole model to eval and back with ``net.train(originally_training)`` - the
*top-level* flag - and ``train()`` recurses, so the frozen layer silently returned to
training mode and the next forward updated its running statistics.

This module provides the two helpers that make the problem visible and avoidable:

* :func:`audit_modes` lists the BatchNorm layers whose ``training`` flag differs from their
  model's (the layers a recursive ``train()``/``eval()`` would overwrite);
* :func:`preserve_modes` is a context manager that snapshots every module's ``training`` flag
  and restores it on exit, even when the operation raises.

The experiment runs the real ``torch.onnx.export`` with both exporters
(:mod:`bnviz.pitfalls.onnx_export`): it watches the calls each makes to ``net.train`` and
which layers' flags it changes, reads what the exported graph holds for each frozen layer,
and runs the file with onnxruntime against PyTorch's eval, train and as-configured outputs.
The table and the next forward follow the legacy exporter (``dynamo=False``), the one with
the mode round trip. Should no exporter run (``onnx`` missing, say), the experiment
performs that round trip, ``net.train(net.training)``, itself and says so in the result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import BnvizError
from ..models import DEFAULT_MODEL, LoadedModel
from ..modes import bn_layers, stats_used, unknown_layer_error
from . import onnx_export
from .base import PageControls, PhotoInputs, PitfallResult, Widget
from .cli import add_photo_options, photo_kwargs
from .common import DEFAULT_SIZE, prepare_photo, single_value_errors

__all__ = [
    "ModeRow",
    "audit_modes",
    "figures",
    "preserve_modes",
    "round_trip",
    "run",
    "try_onnx_export",
]

NAME = "mode-guard"
TITLE = "Per-layer modes lost by export, and a guard"
STORY = "net.bn.eval(), then torch.onnx.export(net, ...) (docs/stories.md section 4)"
EXPLANATION = """\
`model.train()` and `model.eval()` recurse: they set *every* submodule to the same mode.
So if you freeze one BatchNorm layer with `net.bn.eval()` while the rest of the model
trains, any later recursive call undoes it. `torch.onnx.export` makes such a call: it
switches the model to eval for tracing and then restores only the *top-level* flag with
`net.train(originally_training)`, which pushes "train" back into your frozen layer.

The table shows each frozen layer before and after the operation, and what the very next
forward did to its running statistics: back in train mode, the layer normalises with batch
statistics and overwrites its running mean and variance. `audit_modes(net)` lists the BN
layers whose mode differs from the model's (the ones at risk); wrapping the operation in
`with preserve_modes(net):` snapshots every module's flag and writes it back afterwards,
even if the operation raises.

The export is real, with both exporters (`dynamo=False`, the legacy one, and
`dynamo=True`): the page lists the `net.train` calls each made, which layers' flags it
changed, what its ONNX graph holds for each frozen layer (a `BatchNormalization` node and
its `training_mode`, or nothing because the layer was folded into the convolution), and the
exported file run with onnxruntime against PyTorch on the same input, with BatchNorm in
eval, in train, and as configured.
"""

# ============================================================================================
# Public helpers: audit and guard
# ============================================================================================


class ModeRow(NamedTuple):
    """One BatchNorm layer whose mode differs from its model's (a row of the audit)."""

    layer: str
    layer_training: bool
    model_training: bool


def audit_modes(model: nn.Module) -> list[ModeRow]:
    """BatchNorm layers whose ``training`` flag differs from ``model.training``.

    These are exactly the layers that any recursive ``model.train(...)``/``model.eval()``
    (including the one hidden inside ``torch.onnx.export``) would silently overwrite.
    An empty list means every BN layer follows the model.
    """
    return [
        ModeRow(name, bool(bn.training), bool(model.training))
        for name, bn in bn_layers(model)
        if bool(bn.training) != bool(model.training)
    ]


@contextlib.contextmanager
def preserve_modes(model: nn.Module) -> Iterator[dict[str, bool]]:
    """Restore every module's ``training`` flag on exit, even if the body raises.

    Flags are written back directly (``module.training = flag``) rather than through
    ``train()``, because ``train()`` recurses and would overwrite the children again - the
    very bug this guards against. Yields the snapshot ``{module name: training}``.
    """
    saved = [(name, module, module.training) for name, module in model.named_modules()]
    try:
        yield {name: flag for name, _, flag in saved}
    finally:
        for _, module, flag in saved:
            module.training = flag


def round_trip(model: nn.Module) -> None:
    """``model.train(model.training)``: what exporters do after switching to eval.

    Looks like a no-op but is not: ``train()`` recurses, so every submodule (including a BN
    layer the user set to eval) gets the top-level flag.
    """
    model.train(model.training)


ExportAttempt = onnx_export.ExportAttempt


def try_onnx_export(model: nn.Module, x: torch.Tensor, dynamo: bool = False) -> ExportAttempt:
    """``torch.onnx.export(model, (x,), <in-memory file>, dynamo=dynamo)``, watched
    (:func:`bnviz.pitfalls.onnx_export.export_model`). The legacy exporter is the default:
    it is the one with the ``model.train(originally_training)`` round trip of the story."""
    return onnx_export.export_model(model, x, dynamo=dynamo)


# ============================================================================================
# The experiment
# ============================================================================================

METHODS = ("auto", "export", "round-trip")
_EXPORT_CODE = "torch.onnx.export(net, (x,), f, dynamo=False)"
_ROUND_TRIP_CODE = "net.train(net.training)"


def _bn_state(bn: nn.Module) -> dict[str, torch.Tensor | None]:
    return {k: (None if getattr(bn, k) is None else getattr(bn, k).detach().clone())
            for k in ("running_mean", "running_var", "num_batches_tracked")}


def _changes(before: dict, bn: nn.Module) -> dict[str, float | int | None]:
    after = _bn_state(bn)
    if before["running_mean"] is None or after["running_mean"] is None:
        return {"mean": None, "var": None, "batches": None}
    return {
        "mean": float((after["running_mean"] - before["running_mean"]).abs().max()),
        "var": float((after["running_var"] - before["running_var"]).abs().max()),
        "batches": int(after["num_batches_tracked"] - before["num_batches_tracked"]),
    }


def _operate(net: nn.Module, x: torch.Tensor, method: str) -> dict[str, Any]:
    """Run the mode-losing operation; ``method`` is "export" or "round-trip"."""
    if method == "export":
        attempt = try_onnx_export(net, x)
        return {"method": "export", "code": _EXPORT_CODE, "export_completed": attempt.completed,
                "export_error": attempt.error, "train_calls": attempt.train_calls,
                "attempt": attempt}
    round_trip(net)
    return {"method": "round-trip", "code": _ROUND_TRIP_CODE, "train_calls": [net.training]}


def _configure(base: nn.Module, layers: list[str]) -> nn.Module:
    net = copy.deepcopy(base)
    net.train()
    for name in layers:
        net.get_submodule(name).eval()
    return net


def _next_forward(net: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, dict]:
    """One forward of the (train-mode) model; running-stat change of each named layer."""
    before = {n: _bn_state(net.get_submodule(n)) for n in layers}
    with single_value_errors(), torch.no_grad():
        net(x)
    return {n: _changes(before[n], net.get_submodule(n)) for n in layers}


def _resolve_layers(layers: Any, names: list[str]) -> list[str]:
    if layers is None or layers == [] or layers == "":
        return names[:1]
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    out = []
    for name in layers:
        if name not in names:
            raise unknown_layer_error(name, names)
        if name not in out:
            out.append(name)
    return out


def run(model: str | LoadedModel = DEFAULT_MODEL, weights: Any = "auto",
        layers: list[str] | str | None = None, photo: str = "chelsea", batch_size: int = 2,
        size: int | None = DEFAULT_SIZE, seed: int = 0, device: str = "auto",
        method: str = "auto") -> PitfallResult:
    """Freeze ``layers`` with ``bn.eval()`` in a training model, lose the modes, guard them.

    ``method``: "export" (the real ``torch.onnx.export``), "round-trip"
    (``net.train(net.training)``) or "auto": the export, unless it failed before touching
    the modes, in which case the round trip is used and the result says so.
    """
    if method not in METHODS:
        raise BnvizError(f"Unknown method {method!r}.", f"choose one of: {', '.join(METHODS)}.")
    setup = prepare_photo(model, weights, photo, batch_size, size, seed, device)
    base = setup.private_module()
    names = [n for n, _ in bn_layers(base)]
    frozen = _resolve_layers(layers, names)
    x = setup.x

    # Without the guard.
    net = _configure(base, frozen)
    audit_before = audit_modes(net)
    op = _operate(net, x, "round-trip" if method == "round-trip" else "export")
    if method == "auto" and not op["train_calls"] and not op["export_completed"]:
        failed_export = op
        net = _configure(base, frozen)
        op = _operate(net, x, "round-trip")
        op["export_error"] = failed_export["export_error"]
        op["fallback"] = True
    audit_after = audit_modes(net)
    flags_after = {n: net.get_submodule(n).training for n in frozen}
    stats_after = {n: stats_used(net.get_submodule(n)) for n in frozen}
    change = _next_forward(net, x, frozen)

    # The same operation inside the guard.
    guarded = _configure(base, frozen)
    with preserve_modes(guarded):
        guard_op = _operate(guarded, x, op["method"])  # exporter errors come back as data
    guard_error = guard_op.get("export_error")
    audit_guarded = audit_modes(guarded)
    flags_guarded = {n: guarded.get_submodule(n).training for n in frozen}
    change_guarded = _next_forward(guarded, x, frozen)

    table = [_row(n, flags_after[n], stats_after[n], flags_guarded[n], change[n],
                  change_guarded[n]) for n in frozen]
    lost = [n for n in frozen if flags_after[n]]
    kept = [n for n in frozen if not flags_guarded[n]]
    moved = [n for n in lost if (change[n]["batches"] or 0) > 0]
    still = [n for n in kept if change_guarded[n]["batches"] == 0
             and change_guarded[n]["mean"] == 0.0 and change_guarded[n]["var"] == 0.0]
    reproduced = (bool(lost) and bool(moved) and [tuple(r) for r in audit_guarded]
                  == [tuple(r) for r in audit_before] and len(still) == len(frozen))

    exporters = []
    if method != "round-trip":
        first = op.get("attempt")
        exporters = [_exporter_finding(
            first if first is not None and not dynamo
            else try_onnx_export(_configure(base, frozen), x, dynamo=dynamo),
            _configure(base, frozen), x, frozen) for dynamo in onnx_export.EXPORTERS]

    data = {
        **setup.data_fields(),
        "exporters": exporters,
        "layers": frozen,
        "method": op["method"],
        "operation": op["code"],
        "fallback_to_round_trip": bool(op.get("fallback")),
        "export_completed": op.get("export_completed"),
        "export_error": op.get("export_error"),
        "exporter_train_calls": op["train_calls"] if op["method"] == "export" else None,
        "guarded_operation_error": guard_error,
        "audit_before": [r._asdict() for r in audit_before],
        "audit_after": [r._asdict() for r in audit_after],
        "audit_guarded": [r._asdict() for r in audit_guarded],
        "layers_lost": lost,
        "layers_kept_by_guard": kept,
    }
    verdict = _verdict(setup.label, frozen, op, audit_before, audit_after, lost, moved,
                       change, kept, still)
    verdict = " ".join([verdict, *(_exporter_sentence(e, frozen) for e in exporters)])
    return PitfallResult(name=NAME, title=TITLE, verdict=verdict, reproduced=reproduced,
                         table=table, data=data, **setup.result_fields())


def _exporter_finding(attempt: ExportAttempt, configured: nn.Module, x: torch.Tensor,
                      frozen: list[str]) -> dict[str, Any]:
    """One exporter's result as data: the flags it changed, what its graph holds for each
    frozen layer, and onnxruntime's output against PyTorch's on the same input."""
    found: dict[str, Any] = {
        "exporter": attempt.exporter, "completed": attempt.completed, "error": attempt.error,
        "train_calls": attempt.train_calls, "flags_changed": attempt.flags_changed,
        "layers_lost": [n for n in frozen if n in attempt.flags_changed],
        "seconds": round(attempt.seconds, 2), "graph": [], "batchnorm_nodes": None,
        "onnxruntime_max_diff": {}, "onnxruntime_matches": None,
    }
    if attempt.onnx_bytes is None:
        return found
    names = [n for n, _ in bn_layers(configured)]
    graph = onnx_export.graph_batchnorms(attempt.onnx_bytes, names)
    found["batchnorm_nodes"] = sum(row["node"] is not None for row in graph)
    found["batchnorm_layers"] = len(names)
    found["graph"] = [row for row in graph if row["layer"] in frozen]
    try:
        out = onnx_export.run_onnx(attempt.onnx_bytes, x)
    except Exception as exc:  # noqa: BLE001 - an unrunnable file is a finding too
        found["onnxruntime_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return found
    diffs = onnx_export.compare_with_pytorch(out, onnx_export.pytorch_outputs(configured, x))
    found["onnxruntime_max_diff"] = diffs
    found["onnxruntime_matches"] = onnx_export.closest(diffs)
    return found


def _exporter_sentence(found: dict[str, Any], frozen: list[str]) -> str:
    head = f"With `{found['exporter']}`"
    if not found["completed"]:
        return f"{head} the export failed: {found['error']}."
    calls = ", ".join(f"net.train({c})" for c in found["train_calls"]) or "no net.train() call"
    lost = found["layers_lost"]
    parts = [f"{head} ({found['seconds']:.1f} s) the exporter made {calls} and left "
             f"{len(lost)} of {len(frozen)} frozen layer(s) in train mode."]
    first = found["graph"][0] if found["graph"] else None
    if first is not None:
        parts.append(f"Its graph has {found['batchnorm_nodes']} BatchNormalization node(s) for "
                     f"{found['batchnorm_layers']} BatchNorm layers; for {first['layer']}: "
                     f"{first['in_graph']}.")
    diffs = found["onnxruntime_max_diff"]
    if diffs:
        shown = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        parts.append(f"onnxruntime's output is closest to PyTorch with BatchNorm "
                     f"{found['onnxruntime_matches']} (max |difference|: {shown}).")
    elif found.get("onnxruntime_error"):
        parts.append(f"onnxruntime could not run it: {found['onnxruntime_error']}.")
    return " ".join(parts)


def _mode(training: bool) -> str:
    return "train" if training else "eval"


def _row(name, after, stats_after, guarded, change, change_guarded) -> dict[str, Any]:
    return {
        "layer": name,
        "set_by_user": "eval",
        "model": "train",
        "after_operation": _mode(after),
        "stats_used_after": stats_after,
        "after_operation_with_guard": _mode(guarded),
        "running_mean_change": change["mean"],
        "running_var_change": change["var"],
        "batches_tracked_change": change["batches"],
        "running_mean_change_with_guard": change_guarded["mean"],
        "running_var_change_with_guard": change_guarded["var"],
        "batches_tracked_change_with_guard": change_guarded["batches"],
    }


def _describe_op(op: dict) -> str:
    if op["method"] == "round-trip":
        why = ""
        if op.get("fallback"):
            why = (f" (torch.onnx.export is not usable here - {op.get('export_error')} - and "
                   "it failed before touching the modes, so bnviz ran the round trip that "
                   "the exporter performs)")
        return f"The round trip `{_ROUND_TRIP_CODE}`{why}"
    calls = ", ".join(f"net.train({c})" for c in op["train_calls"]) or "no net.train() call"
    if op["export_completed"]:
        return f"`{_EXPORT_CODE}` (which called {calls})"
    return (f"`{_EXPORT_CODE}` (which called {calls} and then failed: {op['export_error']} - "
            "the mode switch had already happened)")


def _verdict(label, frozen, op, audit_before, audit_after, lost, moved, change, kept,
             still) -> str:
    n = len(frozen)
    first = frozen[0]
    parts = [
        f"{label} was put in train mode with {n} BatchNorm layer(s) set to eval "
        f"(audit: {len(audit_before)} layer(s) differ from the model).",
        f"{_describe_op(op)} left {len(lost)} of them in train mode "
        f"(audit afterwards: {len(audit_after)} differ).",
    ]
    c = change[first]
    if first in moved:
        parts.append(
            f"The next forward therefore updated {first}'s running statistics "
            f"(running_mean moved by up to {c['mean']:.2e}, running_var by {c['var']:.2e}, "
            f"num_batches_tracked +{c['batches']})."
        )
    else:
        parts.append(f"The next forward left {first}'s running statistics unchanged.")
    parts.append(
        f"Inside preserve_modes() the same operation left {len(kept)} of {n} layer(s) in "
        f"eval, and the next forward changed the running statistics of "
        f"{n - len(still)} of them."
    )
    return " ".join(parts)


# ============================================================================================
# Figures, command line, page controls
# ============================================================================================


def figures(result: PitfallResult) -> list:
    import plotly.graph_objects as go

    rows = result.table
    if not rows:
        return []
    layers = [r["layer"] for r in rows]
    cols = ["set by user", "after operation", "after operation + guard"]
    keys = ["set_by_user", "after_operation", "after_operation_with_guard"]
    z = [[1 if r[k] == "train" else 0 for k in keys] for r in rows]
    text = [[r[k] for k in keys] for r in rows]
    heat = go.Figure(go.Heatmap(
        z=z, x=cols, y=layers, text=text, texttemplate="%{text}", zmin=0, zmax=1,
        colorscale=[[0, "#4c78a8"], [1, "#e45756"]], showscale=False,
        hovertemplate="%{y}: %{text}<extra>%{x}</extra>"))
    heat.update_layout(title=f"BN layer modes ({result.data.get('operation')}); model in train",
                       yaxis_autorange="reversed", height=160 + 30 * len(rows))
    bars = go.Figure([
        go.Bar(name="without guard", x=layers, y=[r["running_mean_change"] or 0 for r in rows],
               text=[f"{(r['running_mean_change'] or 0):.2e}" for r in rows]),
        go.Bar(name="with preserve_modes()", x=layers,
               y=[r["running_mean_change_with_guard"] or 0 for r in rows],
               text=[f"{(r['running_mean_change_with_guard'] or 0):.2e}" for r in rows]),
    ])
    bars.update_layout(barmode="group", yaxis_title="max |change of running_mean|",
                       title="What the next forward did to the frozen layer's running_mean")
    return [heat, bars, *_exporter_figures(result.data.get("exporters") or [])]


def _exporter_figures(exporters: list[dict]) -> list:
    """onnxruntime against PyTorch, one group of bars per exporter (log scale)."""
    import plotly.graph_objects as go

    runs = [e for e in exporters if e.get("onnxruntime_max_diff")]
    if not runs:
        return []
    refs = list(runs[0]["onnxruntime_max_diff"])
    fig = go.Figure([
        go.Bar(name=f"PyTorch, BatchNorm {ref}", x=[e["exporter"] for e in runs],
               y=[max(e["onnxruntime_max_diff"].get(ref, float("nan")), 1e-12) for e in runs],
               text=[f"{e['onnxruntime_max_diff'].get(ref, float('nan')):.2e}" for e in runs])
        for ref in refs])
    fig.update_layout(barmode="group", yaxis_type="log",
                      yaxis_title="max |onnxruntime - PyTorch| (log)",
                      title="The exported file run by onnxruntime, against PyTorch on the same "
                            "input")
    return [fig]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_photo_options(parser, batch_size=2)
    parser.add_argument("--layer", action="append", default=None, metavar="NAME",
                        help="BN layer to set to eval (repeatable; default: the first BN "
                             "layer)")
    parser.add_argument("--method", default="auto", choices=list(METHODS),
                        help="export: torch.onnx.export; round-trip: net.train(net.training); "
                             "auto: export, or the round trip when no exporter runs here")


def kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {**photo_kwargs(args), "layers": args.layer or None, "method": args.method}


CONTROLS = PageControls(
    PhotoInputs(batch_size=2),
    rows=(
        (Widget("layers", "BN layers set to eval while the model trains", "layers"),),
        (Widget("method", "Operation", "radio", options=METHODS,
                help="export: torch.onnx.export; round-trip: net.train(net.training); auto: "
                     "the export when it runs"),),
    ),
)
