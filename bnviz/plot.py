"""The dashboard's figures for a report, without Streamlit (a notebook, a script).

::

    report = bnviz.inspect(model, x, modes="train")
    report.figure("overview")
    report.figure("statistics", layer="_bn0", channel=3)   # = bnviz.plot.figure(report, ...)

Each figure is the one the dashboard draws for the same configuration, made by the same
builders from the same condensed data: the layer is condensed exactly as the dashboard
condenses it (:func:`bnviz.dashboard.layer_view`) and the chart is drawn by its entry in the
dashboard's chart registry (:data:`bnviz.dashboard.LAYER_CHARTS`). Importing this module
loads plotly; ``import bnviz`` does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

import numpy as np
import plotly.graph_objects as go

from . import figures
from .dashboard.charts import LAYER_CHARTS, ChartInput
from .dashboard.condense import CondensedTensors
from .dashboard.pipeline import build_view_data
from .dashboard.views import (
    REPORT_FIELDS,
    LayerView,
    ViewData,
    _np,
    _view_value,
    layer_view,
    prediction_rows,
    strip_tensors,
)
from .errors import BnvizError, LayerError
from .inspection import InspectionReport, LayerReport

#: The figure blocks of the chart registry that are not the first of their chart, by the
#: name a notebook asks for them with.
_SECOND_FIGURES = {"chart_gallery": "gallery", "chart_allch": "all-channels"}


def _registry_kinds() -> dict[str, tuple[str, int]]:
    """kind -> (chart slug, index of the figure among the chart's blocks)."""
    kinds = {}
    for spec in LAYER_CHARTS:
        first = True
        for i, block in enumerate(spec.blocks):
            if block.kind != "figure":
                continue
            name = spec.slug if first else _SECOND_FIGURES.get(
                block.key, block.key.removeprefix("chart_"))
            kinds[name] = (spec.slug, i)
            first = False
    return kinds


_LAYER_KINDS = _registry_kinds()
#: The figures read from the condensed activations: they need the layer's kept tensors.
_NEEDS_TENSORS = frozenset(
    {*(k for k in _LAYER_KINDS if k not in ("statistics", "running-update")), "inplace"})
#: Every kind :func:`figure` draws.
FIGURE_KINDS: tuple[str, ...] = ("overview", *_LAYER_KINDS, "inplace", "predictions")
_ALIASES = {"stats": "statistics", "maps": "feature-maps", "update": "running-update",
            "manual": "manual-vs-native", "in-place": "inplace", "distribution": "distributions"}


def figure(report: InspectionReport, kind: str = "overview", layer: str | None = None,
           channel: int = 0, *, reference: InspectionReport | None = None, image: int = 0,
           random_init: bool | None = None) -> go.Figure:
    """The dashboard's figure ``kind`` for ``report`` (a plotly ``go.Figure``).

    Kinds (:data:`FIGURE_KINDS`): ``"overview"`` (every layer); for one ``layer`` (its label,
    default the first) and ``channel``: ``"statistics"`` (batch vs running per channel),
    ``"running-update"``, ``"feature-maps"`` (image 0 before/after BN), ``"gallery"``,
    ``"distributions"``, ``"all-channels"``, ``"manual-vs-native"``, and ``"inplace"``
    (what a hook keeping a reference sees; default layer: the first one overwritten);
    ``"predictions"`` (top-5 of ``image``, beside those of ``reference``, e.g. the same
    input with every BN in eval).

    Only ``statistics``, ``running-update``, ``overview`` and ``predictions`` work on a
    report made with ``keep_tensors=False``; the others need the layer's tensors.
    ``random_init``: whether titles say "random init (not pretrained)"; by default when the
    report's weights say so.
    """
    if not isinstance(report, InspectionReport):
        raise BnvizError(f"figure() needs an InspectionReport, got {type(report).__name__}.",
                         "pass the result of bnviz.inspect(...).")
    kind = _kind(kind)
    view = _view_data(report, random_init)
    if kind == "overview":
        return figures.overview_figure(view)
    if kind == "predictions":
        return _predictions(report, view, reference, image)
    if kind == "inplace":
        entry = _inplace_layer(report, layer)
    else:
        entry = report.layer(layer) if layer is not None else _first_layer(report)
        if kind in _NEEDS_TENSORS:
            _need_tensors(kind, entry)
    channel = _channel(channel, entry)
    # the statistics charts read no activation: condensing one would only cost time
    shown = layer_view(entry) if kind in _NEEDS_TENSORS else _stats_view(entry)
    if kind == "inplace":
        if shown.map_reference is None:
            raise BnvizError(f"The report kept no reference view of {entry.label!r} to compare "
                             "with its BatchNorm output.",
                             "inspect again with keep_tensors=True.")
        return figures.inplace_figure(shown, channel, view.weights_label)
    slug, block = _LAYER_KINDS[kind]
    spec = next(s for s in LAYER_CHARTS if s.slug == slug)
    return spec.blocks[block].make(ChartInput(view, shown, channel))


def view_data(report: InspectionReport, *, random_init: bool | None = None) -> ViewData:
    """The dashboard's condensed :class:`~bnviz.dashboard.ViewData` of a report made with
    ``keep_tensors=True`` (every layer condensed, as the dashboard does after a forward)."""
    return build_view_data(report, random_init=_random_init(report, random_init))


def _kind(kind: str) -> str:
    text = str(kind).strip().lower().replace("_", "-")
    text = _ALIASES.get(text, text)
    if text not in FIGURE_KINDS:
        raise BnvizError(f"Unknown figure kind {kind!r}.",
                         f"use one of: {', '.join(FIGURE_KINDS)}.")
    return text


def _random_init(report: InspectionReport, random_init: bool | None) -> bool:
    return "random init" in str(report.weights) if random_init is None else bool(random_init)


def _view_data(report: InspectionReport, random_init: bool | None) -> ViewData:
    """What the charts read of the whole configuration, without condensing any activation:
    the overview rows, the weights label and the statistics-only report."""
    return ViewData(
        model=report.model, weights=report.weights,
        random_init=_random_init(report, random_init), device=report.device,
        input_shape=tuple(report.input_shape), preprocessing=report.preprocessing,
        notes={}, forward_ms=report.forward_ms, build_ms=0.0,
        layers=(), predictions=prediction_rows(report),
        overview_rows=tuple(report.overview_rows()), stats_report=strip_tensors(report))


_CONDENSED = tuple(f.name for f in fields(CondensedTensors))


def _stats_view(layer: LayerReport) -> LayerView:
    """A :class:`LayerView` without activations: the statistics exactly as
    :func:`~bnviz.dashboard.layer_view` copies them, no condensed tensors (only the charts
    that never read those are drawn from it)."""
    stats = {name: _view_value(getattr(layer, name)) for name in REPORT_FIELDS}
    return LayerView(**stats, mean_shift=_np(layer.mean_shift()),
                     log_var_ratio=_np(layer.log_var_ratio()), sample_manual=None,
                     **dict.fromkeys(_CONDENSED))


def _first_layer(report: InspectionReport) -> LayerReport:
    if not report.layers:
        raise BnvizError(f"{report.model} has no BatchNorm layer: there is no layer to draw.",
                         "inspect a model with BatchNorm layers.")
    return report.layers[0]


def _channel(channel: int, layer: LayerReport) -> int:
    n = layer.num_features
    if isinstance(channel, bool) or not isinstance(channel, int | np.integer) \
            or not 0 <= int(channel) < n:
        raise BnvizError(f"Channel {channel!r} does not exist in layer {layer.label!r}, which "
                         f"has {n} channels.", f"pass channel=0 to {n - 1}.")
    return int(channel)


def _need_tensors(kind: str, entry: LayerReport) -> None:
    if entry.input is None:
        raise LayerError(
            f"The {kind!r} figure of layer {entry.label!r} is drawn from its tensors, and the "
            "report was made without keeping them.",
            f"call bnviz.inspect(..., keep_tensors=True), or keep_tensors=[{entry.name!r}]"
            " for this layer only.")


def _inplace_layer(report: InspectionReport, layer: str | None) -> LayerReport:
    """The layer of the in-place figure: ``layer``, or the first kept layer overwritten."""
    overwritten = [ly for ly in report.layers
                   if ly.overwritten_by is not None and ly.input is not None]
    if layer is not None:
        entry = report.layer(layer)
        _need_tensors("inplace", entry)
        if entry.overwritten_by is None:
            others = ", ".join(ly.label for ly in overwritten[:5]) or "none of its layers"
            raise BnvizError(
                f"Layer {entry.label!r} of {report.model} is not overwritten in place, so a "
                "hook keeping a reference sees exactly its BatchNorm output.",
                f"pick a layer whose output is overwritten ({others}).")
        return entry
    if not any(ly.input is not None for ly in report.layers):
        _need_tensors("inplace", _first_layer(report))
    if not overwritten:
        raise BnvizError(
            f"No kept BatchNorm output of {report.model} is overwritten in place: a hook "
            "keeping a reference sees exactly each BatchNorm output.",
            "inspect a model with ReLU(inplace=True), such as resnet18, with keep_tensors=True.")
    return overwritten[0]


def _predictions(report: InspectionReport, view: ViewData,
                 reference: InspectionReport | None, image: int) -> go.Figure:
    if view.predictions is None:
        raise BnvizError(f"The output of {report.model} is not a vector of class scores: the "
                         "report has no predictions.", "pick another figure kind.")
    n = len(view.predictions)
    if isinstance(image, bool) or not isinstance(image, int | np.integer) \
            or not 0 <= int(image) < n:
        raise BnvizError(f"Image {image!r} is not in the batch of {n}.",
                         f"pass image=0 to {n - 1}.")
    other = None if reference is None else prediction_rows(reference)
    if other is not None and len(other) <= int(image):
        raise BnvizError(f"The reference report has {len(other)} images, not {int(image) + 1}.",
                         "pass a reference inspected on the same input.")
    return figures.predictions_figure(view.predictions, other, int(image), view.weights_label)


# -- comparisons ------------------------------------------------------------------------------

#: What :func:`compare_figure` draws from a :func:`bnviz.compare` frame: relative differences.
_COMPARED = (
    ("used_mean_rel", "mean BN normalised with", figures.HIGHLIGHT),
    ("batch_mean_rel", "batch mean", figures.BATCH),
    ("batch_var_rel", "batch var", "#ffbb78"),
    ("running_mean_rel", "running mean", figures.RUNNING),
    ("running_var_rel", "running var", "#aec7e8"),
)


def compare_figure(frame, *, label: str = "") -> go.Figure:
    """A figure of a :func:`bnviz.compare` frame: per layer (in its rows' order), the
    relative differences of the statistics, and the largest difference of the BN outputs
    where both reports kept them, coloured by which statistics the two layers used (orange:
    both batch, blue: both running, red: different). Exact zeros are not drawn (log axes)."""
    la, lb = _labels(frame)
    x = np.arange(len(frame), dtype=np.int32)
    names = [str(v) for v in frame["layer"]]
    grid = figures._Grid(2, 1, vspace=0.1, shared_x=True, titles=(
        "relative difference: max |a - b| / max(|a|, |b|) per layer (0 not drawn)",
        f"max |{la} - {lb}| of the BN output (where both kept it)"))
    data = []
    for col, name, color in _COMPARED:
        if col not in frame:
            continue
        data.append({"type": "scatter", "x": x, "y": _positive(frame[col]), "mode": "markers",
                     "name": name, "customdata": names,
                     "marker": {"color": color, "size": 6},
                     "hovertemplate": "%{customdata}<br>" + name + ": %{y:.3g}<extra></extra>",
                     **grid.refs(1, 1)})
    used_a, used_b = frame[f"stats_used_{la}"], frame[f"stats_used_{lb}"]
    colors = [figures.HIGHLIGHT if u != v else figures.BATCH if u == "batch"
              else figures.RUNNING for u, v in zip(used_a, used_b)]
    custom = [[n, str(u), str(v)] for n, u, v in zip(names, used_a, used_b)]
    data.append({"type": "scatter", "x": x, "y": _positive(frame["output_diff"]),
                 "mode": "markers", "name": "output", "customdata": custom,
                 "marker": {"color": colors, "size": 7, "symbol": "square"},
                 "showlegend": False,
                 "hovertemplate": ("%{customdata[0]}<br>max |diff| %{y:.3g}<br>" + la
                                   + ": %{customdata[1]} stats, " + lb
                                   + ": %{customdata[2]} stats<extra></extra>"),
                 **grid.refs(2, 1)})
    for text, color in (("output: both batch stats", figures.BATCH),
                        ("output: both running stats", figures.RUNNING),
                        ("output: different stats", figures.HIGHLIGHT)):
        data.append({"type": "scatter", "x": [None], "y": [None], "mode": "markers",
                     "name": text, "marker": {"color": color, "size": 7, "symbol": "square"},
                     **grid.refs(2, 1)})
    for row in (1, 2):
        grid.axis(row, 1, "y").update(type="log", exponentformat="e")
    grid.axis(2, 1, "x").update(title={"text": "BN layer (rows of the comparison)"})
    return figures._figure(data, grid.layout, f"{la} vs {lb}: how the BatchNorm layers differ",
                           600, label)


def _labels(frame) -> tuple[str, str]:
    labels = frame.attrs.get("labels") if isinstance(frame.attrs, Mapping) else None
    if labels and len(labels) == 2:
        return str(labels[0]), str(labels[1])
    found = [c.removeprefix("stats_used_") for c in frame.columns
             if str(c).startswith("stats_used_")]
    if len(found) != 2 or "output_diff" not in frame:
        raise BnvizError("compare_figure() needs a frame made by bnviz.compare(a, b).",
                         "pass bnviz.compare(a, b) (rows may be filtered, columns kept).")
    return found[0], found[1]


def _positive(values) -> np.ndarray:
    """The values as float64, with NaN where a log axis cannot draw them (0, missing)."""
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    v[~(v > 0)] = np.nan
    return v


__all__: list[str] = ["FIGURE_KINDS", "compare_figure", "figure", "view_data"]

