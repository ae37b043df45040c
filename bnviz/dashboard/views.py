"""What the dashboard keeps of one configuration: a :class:`LayerView` per BatchNorm layer
and the whole :class:`ViewData`, read-only and shared by every session that shows it.

Numbers are PyTorch's own, copied from the report, except the manual-formula values of the
scatter sample, which are the literal formula evaluated on the stored inputs (the same
thing :meth:`LayerReport.manual_output` computes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, make_dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..inspection import InspectionReport, LayerReport
from ..manual_bn import explain_element
from ..modes import unknown_layer_error
from .condense import (
    FORMULA_ELEMENTS,
    CondensedTensors,
    condense_layer_tensors,
    frozen,
)

#: The :class:`LayerReport` fields a view leaves out: the activation-sized tensors (what the
#: charts need of them is in :class:`CondensedTensors`).
ACTIVATION_FIELDS = ("input", "output", "activation_output", "output_reference")
#: What a view computes itself: from the activations, and per channel from the statistics.
_VIEW_FIELDS = (*(f.name for f in fields(CondensedTensors)),
                "mean_shift", "log_var_ratio", "sample_manual")
#: The :class:`LayerReport` fields every :class:`LayerView` carries (tensors as numpy).
REPORT_FIELDS = tuple(f.name for f in fields(LayerReport)
                      if f.name not in ACTIVATION_FIELDS and f.name not in _VIEW_FIELDS)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    a = t.detach().cpu().numpy().copy()
    a.flags.writeable = False  # shared by sessions through the cache: read-only
    return a


def _view_value(value: Any) -> Any:
    """A report field as a view keeps it: tensors as read-only numpy copies."""
    if isinstance(value, torch.Tensor):
        return _np(value)
    if isinstance(value, tuple):  # torch.Size and the like: a plain tuple
        return tuple(value)
    return value


class _LayerViewMethods:
    """What a :class:`LayerView` computes from its fields (the fields are made below)."""

    label = LayerReport.label

    @property
    def used_mean(self) -> np.ndarray:
        """The mean the layer normalised with (batch or running, as it used)."""
        return self.batch_mean if self.stats_used == "batch" else self.running_mean_before

    @property
    def used_var(self) -> np.ndarray:
        """The variance the layer normalised with (biased batch variance, or running)."""
        return self.batch_var if self.stats_used == "batch" else self.running_var_before

    @property
    def spatial(self) -> tuple[int, int]:
        """(height, width) of the maps the charts show (a volume's: of its middle slice,
        :func:`~bnviz.dashboard.condense.map_plane`)."""
        shape = self.input_shape
        if len(shape) == 4:
            return shape[2], shape[3]
        if len(shape) == 2:
            return 1, 1
        if len(shape) == 3:
            return 1, shape[2]
        return shape[-2], shape[-1]

    def element(self, channel: int, which: int) -> dict:
        """The formula for stored element ``which`` of ``channel`` with its actual numbers
        (:func:`bnviz.manual_bn.explain_element`, as :meth:`LayerReport.explain` does)."""
        c = int(channel)
        out = explain_element(
            float(self.element_input[c, which]),
            mean=float(self.used_mean[c]),
            var=float(self.used_var[c]),
            eps=self.eps,
            weight=None if self.weight is None else float(self.weight[c]),
            bias=None if self.bias is None else float(self.bias[c]),
            native=float(self.element_native[c, which]),
            stats=self.stats_used,
        )
        out["index"] = tuple(int(v) for v in self.element_index[c, which])
        out["label"] = FORMULA_ELEMENTS[which]
        out["activation"] = self.activation
        out["after_activation"] = (None if self.element_activation is None
                                   else float(self.element_activation[c, which]))
        return out


# The fields are derived from LayerReport's, so a field added to the report reaches the
# dashboard without an edit here; a frozen dataclass keeps the view picklable and read-only.
LayerView = make_dataclass(
    "LayerView",
    [*((name, "Any") for name in REPORT_FIELDS),
     ("mean_shift", "np.ndarray | None"),
     ("log_var_ratio", "np.ndarray | None"),
     ("sample_manual", "np.ndarray")],
    bases=(_LayerViewMethods, CondensedTensors),
    frozen=True,
)
LayerView.__module__ = __name__
LayerView.__doc__ = """What the dashboard shows of one BatchNorm layer (one call of it): no
activations.

Every :class:`LayerReport` field except :data:`ACTIVATION_FIELDS`, tensors as read-only
numpy arrays; what was read from the activations (:class:`CondensedTensors`); the report's
``mean_shift()`` and ``log_var_ratio()`` per channel; and ``sample_manual``, the scatter
sample through the literal formula with the statistics BN used."""


def literal_bn(x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
               weight: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` elementwise in float32 (the formula
    exactly as :func:`bnviz.manual_bn.manual_batch_norm` writes it, on gathered values)."""
    def t(a) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    y = (t(x) - t(mean)) / torch.sqrt(t(var) + eps)
    if weight is not None:
        y = y * t(weight)
    if bias is not None:
        y = y + t(bias)
    return y.numpy()


def layer_view(layer: LayerReport, condensed: CondensedTensors | None = None) -> LayerView:
    """Condense one kept :class:`LayerReport` (its tensors are read, not kept).

    ``condensed``: its tensors already condensed (during the forward); read them otherwise.
    """
    c = condense_layer_tensors(layer) if condensed is None else condensed
    stats = {name: _view_value(getattr(layer, name)) for name in REPORT_FIELDS}
    batch = stats["stats_used"] == "batch"
    mean = stats["batch_mean"] if batch else stats["running_mean_before"]
    var = stats["batch_var"] if batch else stats["running_var_before"]
    weight, bias = stats["weight"], stats["bias"]
    ch = c.sample_index[:, 1]
    manual = literal_bn(c.sample_input, mean[ch], var[ch], stats["eps"],
                        None if weight is None else weight[ch],
                        None if bias is None else bias[ch])
    return LayerView(
        **stats,
        mean_shift=_np(layer.mean_shift()), log_var_ratio=_np(layer.log_var_ratio()),
        sample_manual=frozen(manual),
        **{f.name: getattr(c, f.name) for f in fields(CondensedTensors)},
    )


def strip_tensors(report: InspectionReport) -> InspectionReport:
    """A copy of ``report`` without activation-sized tensors: statistics vectors only.

    ``to_dict()``/``to_json()`` of the copy equal the original's (they never read the
    activations); keeping it costs a few hundred KB instead of hundreds of MB.
    """
    layers = [replace(layer, **dict.fromkeys(ACTIVATION_FIELDS)) for layer in report.layers]
    return replace(report, layers=layers, model_input=torch.empty(0))


def prediction_rows(report: InspectionReport
                    ) -> tuple[tuple[tuple[int, str, float], ...], ...] | None:
    """The report's top-k per image as plain ``(index, label, probability)`` tuples."""
    if report.predictions is None:
        return None
    return tuple(tuple((p.index, p.label, float(p.probability)) for p in row)
                 for row in report.predictions)


@dataclass(frozen=True)
class ViewData:
    """One configuration's condensed inspection: everything the views draw, picklable."""

    model: str
    weights: str
    random_init: bool
    device: str
    input_shape: tuple[int, ...]
    preprocessing: str | None
    notes: dict[str, Any]
    forward_ms: float
    build_ms: float
    layers: tuple[LayerView, ...]
    predictions: tuple[tuple[tuple[int, str, float], ...], ...] | None
    #: ``report.overview_rows()``: one plain dict per layer, read-only (shared by sessions)
    overview_rows: tuple[dict[str, Any], ...]
    stats_report: InspectionReport  # the report without activation tensors (for JSON export)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        """Every layer's label (``name#k`` for the calls of a module called twice or more)."""
        return [layer.label for layer in self.layers]

    # The per-layer table as pandas objects is made on first use, not with the view: the
    # charts need only the rows; only the opened table and the CSV need a DataFrame. Two
    # sessions racing here build equal values; either is kept.
    @functools.cached_property
    def overview(self):
        """The per-layer table, equal to ``report.to_frame()`` (shared: do not modify)."""
        return pd.DataFrame(list(self.overview_rows))

    @functools.cached_property
    def table_csv(self) -> str:
        """The per-layer table as CSV (the dashboard's export)."""
        return self.overview.to_csv(index=False)

    def overview_frame(self):
        """A private copy of the per-layer table (the cached one is shared by sessions)."""
        return self.overview.copy()

    def layer(self, name: str) -> LayerView:
        """The layer labelled ``name``; a module's plain name gives its first call (as
        :meth:`InspectionReport.layer` does)."""
        for layer in self.layers:
            if layer.label == name:
                return layer
        for layer in self.layers:
            if layer.name == name and layer.call == 1:
                return layer
        raise unknown_layer_error(name, self.layer_names)

    def report_json(self) -> str:
        """The full report in the CLI's schema: ``report.to_json()``, serialised on demand
        (it takes a while for a large network, so only when someone downloads it)."""
        return self.stats_report.to_json()

    @property
    def weights_label(self) -> str:
        """The label every chart carries when the network is not pretrained."""
        return "random init (not pretrained)" if self.random_init else ""

    def nbytes(self) -> int:
        """Approximate memory of the arrays held (for the benchmark's memory report)."""
        total = len(repr(self.overview_rows))
        seen: set[int] = set()
        for layer in self.layers:
            for f in fields(layer):
                v = getattr(layer, f.name)
                arrays = [v] if isinstance(v, np.ndarray) else (
                    list(v) if isinstance(v, tuple) and v and isinstance(v[0], np.ndarray)
                    else [])
                for a in arrays:
                    if id(a) not in seen:  # shared arrays count once
                        seen.add(id(a))
                        total += a.nbytes
        return total
