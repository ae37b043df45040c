"""What :func:`bnviz.inspect` returns: one :class:`LayerReport` per BatchNorm call, gathered
in an :class:`InspectionReport`, with the CLI's JSON schema (see README)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..errors import LayerError
from ..manual_bn import explain_element, manual_batch_norm
from ..modes import unknown_layer_error
from ..serialize import to_json


@dataclass
class Prediction:
    index: int
    label: str
    probability: float


@dataclass
class LayerReport:
    """Everything measured for one BatchNorm layer in one forward.

    Tensors live on the CPU. ``input``/``output``/``activation_output`` are ``None`` unless
    the layer was kept (``keep_tensors``). Quantities that do not exist for this layer
    (running statistics of a layer without buffers, weight of ``affine=False``) are None.
    The tensors are bnviz's copies, never the model's own, and some are shared (weight and
    bias between reports of one model, "after" and "before" where nothing wrote a buffer):
    treat them as read-only, clone before an in-place edit.
    """

    name: str
    type: str
    index: int
    num_features: int
    input_shape: tuple[int, ...]
    mode: str  # effective state, e.g. "train,track=on,momentum=0.1"
    mode_source: str  # "model" (the model's own setting) or "override"
    training: bool
    track_running_stats: bool
    has_running_stats: bool
    momentum: float | None
    eps: float
    affine: bool
    stats_used: str  # "batch" or "running"
    updates_running_stats: bool
    count: int  # values per channel the batch statistics are taken over (N*H*W)
    batch_mean: torch.Tensor
    batch_var: torch.Tensor  # biased
    batch_var_unbiased: torch.Tensor | None
    running_mean_before: torch.Tensor | None
    running_var_before: torch.Tensor | None
    running_mean_after: torch.Tensor | None
    running_var_after: torch.Tensor | None
    num_batches_tracked_before: int | None
    num_batches_tracked_after: int | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    update_factor: float | None  # momentum (or 1/num_batches_tracked) actually applied
    manual_running_mean_after: torch.Tensor | None
    manual_running_var_after: torch.Tensor | None
    running_update_max_abs_diff: float | None
    max_abs_diff: float  # manual vs native output
    max_rel_diff: float  # max_abs_diff / largest per-channel RMS of the native output
    channel_max_abs_diff: torch.Tensor
    #: which call of this module in the forward this entry describes (1-based) and how many
    #: calls it had: a module used twice (weight sharing, a loop) has one entry per call
    call: int = 1
    calls: int = 1
    activation: str | None = None  # e.g. "relu", "hardtanh" (ReLU6), None if none follows
    activation_inplace: bool | None = None
    #: the activation the layer's own forward applies after normalising (timm's
    #: BatchNormAct2d: "SiLU", "ReLU", ...), None for plain BatchNorm; ``output`` is then the
    #: normalised value before it and ``activation_output`` the activation's result
    fused_activation: str | None = None
    overwritten_by: str | None = None  # in-place op that later overwrote the BN output
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None  # native BN output, as it was right after BN
    activation_output: torch.Tensor | None = None
    output_reference: torch.Tensor | None = None  # what a hook keeping a reference sees at the end

    @property
    def used_mean(self) -> torch.Tensor | None:
        """The mean this layer normalised with: the batch's or the running one."""
        return self.batch_mean if self.stats_used == "batch" else self.running_mean_before

    @property
    def used_var(self) -> torch.Tensor | None:
        """The (biased) variance this layer normalised with: the batch's or the running one."""
        return self.batch_var if self.stats_used == "batch" else self.running_var_before

    @property
    def label(self) -> str:
        """``name``, or ``name#k`` for the k-th call of a module called more than once."""
        return self.name if self.calls == 1 else f"{self.name}#{self.call}"

    # -- derived quantities -------------------------------------------------------------
    def mean_shift(self) -> torch.Tensor | None:
        """(batch mean - running mean) / sqrt(running var + eps): shift in running-std units."""
        if self.running_mean_before is None:
            return None
        return (self.batch_mean - self.running_mean_before) / torch.sqrt(
            self.running_var_before + self.eps
        )

    def log_var_ratio(self) -> torch.Tensor | None:
        """log(batch var / running var) per channel; 0 means the variances agree."""
        if self.running_var_before is None:
            return None
        return torch.log((self.batch_var + self.eps) / (self.running_var_before + self.eps))

    def manual_output(self) -> torch.Tensor:
        """The literal formula applied to the kept input with the statistics BN used."""
        if self.input is None:
            raise LayerError(
                f"Layer {self.name!r} was inspected without keeping tensors.",
                "call inspect(..., keep_tensors=True) or name this layer in keep_tensors.",
            )
        return manual_batch_norm(
            self.input, self.used_mean, self.used_var, self.weight, self.bias, self.eps
        )

    def explain(self, index: tuple[int, ...]) -> dict:
        """The BN formula for one element ``index`` (n, c, h, w...) with its actual numbers."""
        if self.input is None or self.output is None:
            raise LayerError(
                f"Layer {self.name!r} was inspected without keeping tensors.",
                "call inspect(..., keep_tensors=True) or name this layer in keep_tensors.",
            )
        c = index[1]
        return explain_element(
            float(self.input[index]),
            mean=float(self.used_mean[c]),
            var=float(self.used_var[c]),
            eps=self.eps,
            weight=None if self.weight is None else float(self.weight[c]),
            bias=None if self.bias is None else float(self.bias[c]),
            native=float(self.output[index]),
            stats=self.stats_used,
        )

    def overwritten_fraction(self) -> float | None:
        """Fraction of BN output values that a reference-keeping hook sees changed."""
        if self.output is None or self.output_reference is None:
            return None
        return float((self.output != self.output_reference).float().mean())

    def to_dict(self) -> dict:
        """The CLI's JSON schema for one layer (see README)."""
        return {
            "name": self.name,
            "call": self.call,
            "calls": self.calls,
            "type": self.type,
            "num_features": self.num_features,
            "input_shape": list(self.input_shape),
            "mode": self.mode,
            "mode_source": self.mode_source,
            "training": self.training,
            "track_running_stats": self.track_running_stats,
            "momentum": self.momentum,
            "eps": self.eps,
            "stats_used": self.stats_used,
            "updates_running_stats": self.updates_running_stats,
            "count": self.count,
            "batch_mean": _list(self.batch_mean),
            "batch_var": _list(self.batch_var),
            "running_mean_before": _list(self.running_mean_before),
            "running_var_before": _list(self.running_var_before),
            "running_mean_after": _list(self.running_mean_after),
            "running_var_after": _list(self.running_var_after),
            "weight": _list(self.weight),
            "bias": _list(self.bias),
            "num_batches_tracked_before": self.num_batches_tracked_before,
            "num_batches_tracked_after": self.num_batches_tracked_after,
            "update_factor": self.update_factor,
            "running_update_max_abs_diff": _num(self.running_update_max_abs_diff),
            "max_abs_diff": _num(self.max_abs_diff),
            "max_rel_diff": _num(self.max_rel_diff),
            "activation": self.activation,
            "activation_inplace": self.activation_inplace,
            "fused_activation": self.fused_activation,
            "overwritten_by": self.overwritten_by,
        }


def _num(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(v)


def _list(t: torch.Tensor | None) -> list | None:
    if t is None:
        return None
    return [None if not math.isfinite(v) else v for v in t.detach().double().cpu().tolist()]


@dataclass
class InspectionReport:
    """The result of :func:`inspect`: one :class:`LayerReport` per BatchNorm layer."""

    model: str
    weights: str
    device: str
    input_shape: tuple[int, ...]
    preprocessing: str | None
    model_input: torch.Tensor  # what the network received (after preprocessing), CPU
    predictions: list[list[Prediction]] | None  # top-k per image
    layers: list[LayerReport]
    notes: dict[str, Any] = field(default_factory=dict)
    committed: bool = False
    forward_ms: float = 0.0
    #: which code ran the manual-vs-native check: "compiled" (bnviz.probe_kernel), "eager",
    #: or "compiled+eager" when some layers (CUDA, float64, non-contiguous) needed eager ops
    manual_check: str = "eager"

    def layer(self, name: str, call: int | None = None) -> LayerReport:
        """The entry of layer ``name``.

        A module called more than once in the forward has one entry per call, labelled
        ``name#1``, ``name#2``, ...: pass that label, or ``name`` with ``call=k``. Plain
        ``name`` without ``call`` gives its first call (all of them: :meth:`calls_of`).
        """
        for layer in self.layers:
            if layer.label == name and call in (None, layer.call):
                return layer
        for layer in self.layers:
            if layer.name == name and (call or 1) == layer.call:
                return layer
        if call is not None and any(layer.name == name for layer in self.layers):
            calls = next(layer.calls for layer in self.layers if layer.name == name)
            raise LayerError(f"Layer {name!r} was called {calls} time(s), not {call}.",
                             f"pass call=1..{calls}.")
        raise unknown_layer_error(name, self.layer_names)

    def calls_of(self, name: str) -> list[LayerReport]:
        """Every entry of module ``name``, one per call, in forward order."""
        found = [layer for layer in self.layers if layer.name == name]
        if not found:
            raise unknown_layer_error(name, self.layer_names)
        return found

    @property
    def layer_names(self) -> list[str]:
        """Every entry's :attr:`LayerReport.label` (the module name, ``name#k`` for the
        calls of a module called more than once)."""
        return [layer.label for layer in self.layers]

    def figure(self, kind: str = "overview", layer: str | None = None, channel: int = 0,
               **options):
        """The dashboard's plotly figure ``kind`` of this report (``"overview"``,
        ``"statistics"``, ``"running-update"``, ``"manual-vs-native"``, ``"feature-maps"``,
        ``"inplace"``, ...): :func:`bnviz.plot.figure`, which lists them and ``options``."""
        from ..plot import figure  # plotly is loaded on first use, never by import bnviz

        return figure(self, kind, layer, channel, **options)

    def to_frame(self):
        """A pandas DataFrame, one row per BN layer (the network overview):
        :meth:`overview_rows` as a table."""
        return pd.DataFrame(self.overview_rows())

    def overview_rows(self) -> list[dict[str, Any]]:
        """One plain dict per BN layer, the rows of :meth:`to_frame` (None where a value
        does not exist, e.g. no running statistics).

        Plain dicts: the dashboard draws its first page from these without building a
        DataFrame.
        """
        rows = []
        for layer in self.layers:
            shift = layer.mean_shift()
            ratio = layer.log_var_ratio()
            rows.append(
                {
                    "index": layer.index,
                    "name": layer.name,
                    "call": layer.call,
                    "calls": layer.calls,
                    "type": layer.type,
                    "channels": layer.num_features,
                    "mode": layer.mode,
                    "mode_source": layer.mode_source,
                    "stats_used": layer.stats_used,
                    "updates_running": layer.updates_running_stats,
                    "momentum": layer.momentum,
                    "eps": layer.eps,
                    "mean_shift": None if shift is None else float(shift.abs().mean()),
                    "mean_shift_max": None if shift is None else float(shift.abs().max()),
                    "log_var_ratio": None if ratio is None else float(ratio.mean()),
                    "log_var_ratio_absmax": None if ratio is None else float(ratio.abs().max()),
                    "max_abs_diff": layer.max_abs_diff,
                    "max_rel_diff": layer.max_rel_diff,
                    "running_update_diff": layer.running_update_max_abs_diff,
                    "activation": layer.activation,
                    "activation_inplace": layer.activation_inplace,
                    "fused_activation": layer.fused_activation,
                    "overwritten_by": layer.overwritten_by,
                }
            )
        return rows

    def to_dict(self) -> dict:
        """The CLI's public JSON schema (documented in the README)."""
        return {
            "model": self.model,
            "weights": self.weights,
            "device": self.device,
            "input_shape": list(self.input_shape),
            "preprocessing": self.preprocessing,
            "committed": self.committed,
            "manual_check": self.manual_check,
            "notes": {k: v for k, v in self.notes.items() if _jsonable(v)},
            "predictions": None
            if self.predictions is None
            else [
                [{"index": p.index, "label": p.label, "probability": p.probability} for p in row]
                for row in self.predictions
            ],
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON of :meth:`to_dict`: a NaN or infinity anywhere (NaN weights give NaN
        probabilities) is written as ``null``, never an error that leaves an export empty."""
        return to_json(self.to_dict(), indent=indent)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def _new_report(fields: dict) -> LayerReport:
    """``LayerReport(**fields)`` without the generated ``__init__``.

    Binding its ~45 keyword arguments costs more than the rest of a layer's report; the
    dict becomes the instance's ``__dict__`` instead. Every field must be given, and
    nothing else.
    """
    if fields.keys() != _REPORT_FIELDS:
        raise TypeError(f"LayerReport fields differ: {sorted(fields.keys() ^ _REPORT_FIELDS)}")
    report = object.__new__(LayerReport)
    report.__dict__ = fields
    return report


_REPORT_FIELDS = {f.name for f in dataclasses.fields(LayerReport)}

