"""The Training lab's plotly figures: pure functions of a :class:`TrainResult`.

Data in, figure out, no Streamlit: the page only places them, and a headless run with the
same configuration draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .results import TrainResult

COLORS = {"native": "#1f77b4", "manual": "#2ca02c", "detached": "#d62728", "frozen": "#9467bd"}
# manual lies exactly on native when all is well: native is drawn first as a wide pale band
# and manual as a thin dashed line on top of it, so both stay visible (the legend says so).
DASH = {"manual": "dash"}
WIDTH = {"native": 6.0}
OPACITY = {"native": 0.45}
#: The legend's heading wherever native and manual are both drawn.
OVERLAP_NOTE = "native: wide pale line · manual: thin line drawn on top of it"
MOMENTUM_COLORS = {"0.1": "#ff7f0e", "0.01": "#17becf", "None": "#8c564b", "0.3": "#e377c2",
                   "0.001": "#bcbd22"}


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 340) -> go.Figure:
    names = {t.name for t in fig.data}
    overlap = {"native", "manual"} <= names or {"native eval mode", "manual eval mode"} <= names
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", y=-0.22,
                                  title=dict(text=OVERLAP_NOTE if overlap else "",
                                             side="top")),
                      hovermode="x unified")
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y)
    return fig


def _native_first(result: TrainResult) -> list[tuple[str, object]]:
    """The variants' histories with native first: drawn first, it lies under the others."""
    return sorted(result.histories.items(), key=lambda item: item[0] != "native")


def _line(variant: str, **extra) -> dict:
    return dict(color=COLORS[variant], width=WIDTH.get(variant, 1.5),
                dash=DASH.get(variant), **extra)


def _arr(values) -> np.ndarray:
    """Plotly validates numpy arrays much faster than lists (and sends them as binary)."""
    return np.asarray(values, dtype=np.float64)


def _figure(traces: list[go.Scatter]) -> go.Figure:
    fig = go.Figure()
    fig.add_traces(traces)  # one batched call: far cheaper than one add_trace per line
    return fig


def fig_loss(result: TrainResult) -> go.Figure:
    """Each variant's training loss, one point per kept step (every step of a short run)."""
    fig = _figure([go.Scatter(x=_arr(h.step), y=_arr(h.loss), name=v, mode="lines",
                              line=_line(v), opacity=OPACITY.get(v, 1.0))
                   for v, h in _native_first(result)])
    return _layout(fig, "Training loss (cross-entropy of each step's batch)", "step", "loss")


def fig_val_acc(result: TrainResult) -> go.Figure:
    """Each variant's eval-mode validation accuracy at every evaluation point, and chance."""
    fig = _figure([go.Scatter(x=_arr(h.eval_step), y=_arr(h.val_acc_eval), name=v,
                              mode="lines+markers", line=_line(v), opacity=OPACITY.get(v, 1.0),
                              marker=dict(size=9 if v == "native" else 5))
                   for v, h in _native_first(result)])
    fig.add_hline(y=result.chance, line_dash="dot", line_color="gray",
                  annotation_text=f"chance {result.chance:.0%}")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "Validation accuracy, eval mode (running statistics)", "step",
                   "accuracy")


def fig_train_eval(result: TrainResult) -> go.Figure:
    """Each variant's validation accuracy in train mode (dotted) and eval mode (solid)."""
    traces = []
    for v, h in _native_first(result):
        width, opacity = WIDTH.get(v, 1.5), OPACITY.get(v, 1.0)
        traces.append(go.Scatter(x=_arr(h.eval_step), y=_arr(h.val_acc_eval),
                                 name=f"{v} eval mode", mode="lines", opacity=opacity,
                                 line=dict(color=COLORS[v], width=width)))
        traces.append(go.Scatter(x=_arr(h.eval_step), y=_arr(h.val_acc_train),
                                 name=f"{v} train mode", mode="lines", opacity=opacity,
                                 line=dict(color=COLORS[v], dash="dot", width=width)))
    fig = _figure(traces)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "Validation accuracy: train mode (dotted)<br>vs eval mode (solid)",
                   "step", "accuracy")


def fig_weight_norm(result: TrainResult) -> go.Figure:
    """Each variant's L2 norm of all conv weights at every evaluation point."""
    fig = _figure([go.Scatter(x=_arr(h.eval_step), y=_arr(h.conv_weight_norm), name=v,
                              mode="lines+markers", line=_line(v), opacity=OPACITY.get(v, 1.0),
                              marker=dict(size=9 if v == "native" else 5))
                   for v, h in _native_first(result)])
    return _layout(fig, "Norm of all conv weights", "step", "‖W‖₂")


def fig_running(result: TrainResult, layer: str, channels: Sequence[int]) -> go.Figure | None:
    """Per channel of ``layer``, one row: each step's batch mean and unbiased variance (dots)
    and the running statistics of every studied momentum (lines). None without a momentum
    study, before the first step, or without a channel."""
    trace = result.traces.get(layer)
    if trace is None or not trace.batch_mean or not channels:
        return None
    steps = _arr(trace.step)
    fig = make_subplots(rows=len(channels), cols=2, shared_xaxes=True,
                        subplot_titles=[t for c in channels
                                        for t in (f"{layer} channel {c}: mean",
                                                  f"{layer} channel {c}: variance")])
    batch = {"running_mean": trace.stacked("batch_mean").numpy(),
             "running_var": trace.stacked("batch_var_unbiased").numpy()}
    running = {(which, label): trace.stacked(which, label).numpy()
               for which in batch for label in trace.running_mean}
    traces, rows, cols = [], [], []
    for row, c in enumerate(channels, start=1):
        first = row == 1
        for col, which in ((1, "running_mean"), (2, "running_var")):
            traces.append(go.Scatter(
                x=steps, y=_arr(batch[which][:, c]), mode="markers", name="batch statistic",
                legendgroup="batch", showlegend=first and col == 1,
                marker=dict(color="rgba(120,120,120,0.45)", size=3)))
            rows.append(row)
            cols.append(col)
            for label in trace.running_mean:
                traces.append(go.Scatter(
                    x=steps, y=_arr(running[which, label][:, c]), mode="lines",
                    name=f"momentum {label}", legendgroup=label,
                    showlegend=first and col == 1,
                    line=dict(color=MOMENTUM_COLORS.get(label, "#333"), width=2)))
                rows.append(row)
                cols.append(col)
    fig.add_traces(traces, rows=rows, cols=cols)
    fig.update_xaxes(title_text="step", row=len(channels))
    return _layout(fig, "Running statistics (lines) vs each step's batch statistics (dots);"
                        "<br>variance: unbiased, as the running update uses", "step", "",
                   height=260 * len(channels) + 80)


def fig_momentum_acc(result: TrainResult) -> go.Figure | None:
    """The native network's eval-mode validation accuracy with each momentum's running
    statistics, against its train-mode accuracy. None without a momentum study."""
    if not result.momentum_val_acc_eval:
        return None
    native = result.histories.get("native") or result.study_history
    traces = [go.Scatter(x=_arr(result.momentum_eval_step), y=_arr(accs),
                         name=f"eval mode, momentum {label}", mode="lines+markers",
                         line=dict(color=MOMENTUM_COLORS.get(label, "#333")))
              for label, accs in result.momentum_val_acc_eval.items()]
    if native is not None:
        traces.append(go.Scatter(x=_arr(native.eval_step), y=_arr(native.val_acc_train),
                                 name="train mode (batch statistics)", mode="lines",
                                 line=dict(color="black", dash="dot")))
    fig = _figure(traces)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, f"Native network, validation accuracy:<br>eval mode with each "
                        f"momentum's running statistics vs train mode (batch size "
                        f"{result.config.batch_size})", "step", "accuracy")


def lab_figures(result: TrainResult, layer: str,
                channels: Sequence[int]) -> dict[str, go.Figure | None]:
    """Every figure of the Training lab page, by its place on the page; ``channels`` of
    ``layer`` are drawn in ascending order."""
    return {
        "loss": fig_loss(result), "acc": fig_val_acc(result), "gap": fig_train_eval(result),
        "norm": fig_weight_norm(result), "momentum": fig_momentum_acc(result),
        "running": fig_running(result, layer, sorted(channels)),
    }


__all__ = [
    "COLORS",
    "DASH",
    "MOMENTUM_COLORS",
    "OPACITY",
    "OVERLAP_NOTE",
    "WIDTH",
    "fig_loss",
    "fig_momentum_acc",
    "fig_running",
    "fig_train_eval",
    "fig_val_acc",
    "fig_weight_norm",
    "lab_figures",
]
