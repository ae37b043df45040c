"""Plotly figure helpers shared by the pitfall experiments.

Every helper is a pure function of arrays that an experiment put into its result, so a
figure always shows the numbers the verdict was computed from. Errors are drawn on a log
scale (a correct formula is ~1e-7 off, a wrong one ~1): exact zeros are lifted to
:data:`LOG_FLOOR` and labelled "0" so they stay visible. Maps have a colour bar each (or one
shared bar), and "changed" masks use the dashboard's one convention
(:func:`bnviz.chart_style.mask_heatmap`: red = changed, light grey = unchanged).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..chart_style import SUBPLOT_TITLE_CHARS, mask_heatmap, wrap_words

__all__ = [
    "LOG_FLOOR",
    "MATCH_COLOR",
    "MISMATCH_COLOR",
    "downsample",
    "error_bars",
    "grouped_bars",
    "heatmaps",
    "line_curves",
    "to_numpy",
]

LOG_FLOOR = 1e-12
MATCH_COLOR = "#2e7d32"
MISMATCH_COLOR = "#c62828"
NEUTRAL_COLOR = "#607d8b"


def to_numpy(a) -> np.ndarray:
    """Tensor / array / list -> float64 numpy (CPU, detached)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def downsample(a, max_size: int = 64) -> np.ndarray:
    """Block-average a 2-D map so its larger side is at most ``max_size`` (keeps the look of
    the map while keeping the page's JSON small)."""
    arr = to_numpy(a)
    if arr.ndim != 2:
        raise ValueError(f"downsample needs a 2-D map, got shape {arr.shape}")
    h, w = arr.shape
    step = max(1, int(np.ceil(max(h, w) / max_size)))
    if step == 1:
        return arr
    hh, ww = (h // step) * step, (w // step) * step
    if hh == 0 or ww == 0:
        return arr[::step, ::step]
    return arr[:hh, :ww].reshape(hh // step, step, ww // step, step).mean(axis=(1, 3))


def _log_values(values: Sequence[float | None]) -> tuple[list[float | None], list[str]]:
    ys, texts = [], []
    for v in values:
        if v is None or not np.isfinite(v):
            ys.append(None)
            texts.append("n/a")
        elif v <= 0:
            ys.append(LOG_FLOOR)
            texts.append("0")
        else:
            ys.append(max(float(v), LOG_FLOOR))
            texts.append(f"{v:.1e}")
    return ys, texts


def error_bars(labels: Sequence[str], values: Sequence[float | None], *, title: str,
               yaxis: str, threshold: float | None = None,
               ok: Sequence[bool] | None = None) -> go.Figure:
    """Bars on a log axis, green where ``ok`` else red, optional dashed threshold line."""
    ys, texts = _log_values(values)
    colors = [NEUTRAL_COLOR] * len(ys) if ok is None else [
        MATCH_COLOR if good else MISMATCH_COLOR for good in ok]
    fig = go.Figure(go.Bar(x=list(labels), y=ys, text=texts, textposition="outside",
                           marker_color=colors, cliponaxis=False))
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", line_color="black",
                      annotation_text=f"match threshold {threshold:g}",
                      annotation_position="top left")
    fig.update_layout(title=title, yaxis_title=yaxis, yaxis_type="log",
                      margin={"t": 60, "b": 10}, showlegend=False)
    return fig


def grouped_bars(categories: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
                 title: str, yaxis: str, log: bool = False,
                 threshold: float | None = None) -> go.Figure:
    """Several bar series over the same categories (e.g. methods per case)."""
    fig = go.Figure()
    for name, values in series.items():
        if log:
            ys, texts = _log_values(values)
        else:
            ys = [None if v is None else float(v) for v in values]
            texts = ["n/a" if v is None else f"{v:.3g}" for v in values]
        fig.add_trace(go.Bar(name=name, x=list(categories), y=ys, text=texts,
                             textposition="outside", cliponaxis=False))
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", line_color="black",
                      annotation_text=f"threshold {threshold:g}",
                      annotation_position="top left")
    fig.update_layout(title=title, yaxis_title=yaxis, barmode="group",
                      yaxis_type="log" if log else "linear", margin={"t": 60, "b": 10})
    return fig


def _abs_max(a: np.ndarray) -> float:
    finite = np.abs(a[np.isfinite(a)])
    return float(finite.max()) if finite.size else 0.0


def _colorbar(domains: Sequence[Sequence[float]], **extra) -> dict:
    """A horizontal colour bar under the panels spanning ``domains`` (readable on a phone)."""
    x0, x1 = domains[0][0], domains[-1][1]
    return {"orientation": "h", "x": (x0 + x1) / 2, "xanchor": "center", "len": x1 - x0,
            "y": -0.03, "yanchor": "top", "thickness": 9, "tickfont": {"size": 10},
            "nticks": 5, **extra}


def heatmaps(maps: Mapping[str, object], *, title: str, max_size: int = 112,
             shared_scale: bool = True, colorscale: str = "RdBu_r",
             masks: Collection[str] = ()) -> go.Figure:
    """Side-by-side heatmaps of 2-D maps (block means when larger than ``max_size``), each
    with a colour bar under it, or one bar under them all when ``shared_scale`` (equal
    values then look equal across panels).

    The maps named in ``masks`` are 0/1 "changed" masks: drawn as every page draws them
    (:func:`bnviz.figures.mask_heatmap`), outside the shared scale; a block of a mask
    larger than ``max_size`` counts as changed when any value in it is.
    """
    names = list(maps)
    arrays = {n: downsample(maps[n], max_size) for n in names}
    values = [n for n in names if n not in masks]
    chars = SUBPLOT_TITLE_CHARS.get(len(names), 9)
    fig = make_subplots(rows=1, cols=len(names), horizontal_spacing=0.06,
                        subplot_titles=[wrap_words(n, chars) for n in names])
    domains = {n: fig.layout["xaxis" if i == 1 else f"xaxis{i}"].domain
               for i, n in enumerate(names, start=1)}
    lim = max((_abs_max(arrays[n]) for n in values), default=0.0) or 1.0
    for i, n in enumerate(names, start=1):
        a = arrays[n]
        if n in masks:
            spec = mask_heatmap(a > 0, colorbar=_colorbar([domains[n]]))
            spec.pop("type")
            trace = go.Heatmap(spec)
        else:
            bound = lim if shared_scale else (_abs_max(a) or 1.0)
            shown = [domains[v] for v in values] if shared_scale else [domains[n]]
            trace = go.Heatmap(z=a, zmin=-bound, zmax=bound, colorscale=colorscale,
                               showscale=not shared_scale or n == values[-1],
                               colorbar=_colorbar(shown), name=n)
        fig.add_trace(trace, row=1, col=i)
        fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=i,
                         scaleanchor="x" if i == 1 else f"x{i}")  # square pixels
        fig.update_xaxes(showticklabels=False, row=1, col=i)
    # room for two-line panel titles under the chart's title
    fig.update_layout(title=title, margin={"t": 105, "b": 50})
    return fig


def line_curves(curves: Mapping[str, object], *, title: str, xaxis: str, yaxis: str,
                emphasize: str | None = None) -> go.Figure:
    """Lines over a shared x axis; ``emphasize`` is drawn thick and solid, the rest dashed."""
    fig = go.Figure()
    for name, values in curves.items():
        y = to_numpy(values)
        main = name == emphasize
        fig.add_trace(go.Scatter(
            x=np.arange(y.size), y=y, name=name, mode="lines",
            line={"width": 4 if main else 1.5, "dash": "solid" if main else "dash"},
        ))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis,
                      margin={"t": 60, "b": 10})
    return fig
