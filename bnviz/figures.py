"""Plotly figures of the dashboard: pure functions from view data to ``go.Figure``.

Every builder takes the condensed data of :mod:`bnviz.dashboard` (a ``ViewData`` or a
``LayerView``) and returns a figure; nothing here touches Streamlit or runs a network,
so the figures are unit-tested against PyTorch's numbers directly (a trace's ``y`` *is* the
report's ``batch_mean``). Arrays leave as plain JSON lists with a content digest as
``layout.datarevision`` (exact float32 values; see :func:`_plain_data` for why not base64):
the whole page stays far below the 2 MB per rerun budget.

Speed: figures are written as plain dict specs with explicit subplot domains and wrapped in
``go.Figure(spec, _validate=False)``. Plotly's per-property validation (and
``make_subplots``) costs more than the rest of a rerun; the unit tests validate every
figure instead, once, with ``go.Figure(fig.to_dict())``.

Colours mean the same thing everywhere: orange = batch statistics, blue = running
statistics, green = the manual (literal formula) computation, grey = reference lines.
When the network is not pretrained, every title carries ``random init (not pretrained)``
so a screenshot can never be mistaken for a trained network's statistics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

# Imported whole before this process builds any figure: plotly does not import pandas or
# PIL.Image itself but looks them up in ``sys.modules`` while it builds and serialises every
# figure, and a module that another thread is still importing is half-initialised there
# (charts crashed with "partially initialized module 'pandas'"; tests/test_imports.py).
import pandas  # noqa: F401
import PIL.Image  # noqa: F401
import plotly.graph_objects as go

if TYPE_CHECKING:
    from .dashboard import LayerView, ViewData

BATCH = "#ff7f0e"
RUNNING = "#1f77b4"
MANUAL = "#2ca02c"
NATIVE = "#9467bd"
REFERENCE = "#7f7f7f"
HIGHLIGHT = "#d62728"
HEATMAP_SCALE = "RdBu_r"

RANDOM_INIT_LABEL = "random init (not pretrained)"

#: Above this many channels a per-channel trace is drawn as one step line (one SVG path)
#: instead of one SVG node per channel: a wide layer would otherwise put thousands of nodes
#: on the page and a layer switch would spend most of its time in the browser. WebGL is no
#: better: without a GPU, as in headless browsers and many school laptops, it is emulated.
MANY_CHANNELS = 64
#: Above this many channels, per-channel bars become one step-shaped filled line.
BAR_CHANNELS = 128


# -- small spec helpers ----------------------------------------------------------------------


def titled(text: str, label: str = "") -> str:
    """``text`` with the weights label appended (``"... - random init (not pretrained)"``)."""
    return f"{text} - {label}" if label else text


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _nan_if_none(a, n: int) -> np.ndarray:
    return np.full(n, np.nan, dtype=np.float32) if a is None else _f32(a)


def _axis_name(i: int, letter: str) -> str:
    return letter if i == 1 else f"{letter}{i}"


class _Grid:
    """Subplot layout as plain dicts: what ``make_subplots`` builds, without its cost."""

    def __init__(self, rows: int, cols: int, titles: Sequence[str] = (), hspace: float = 0.08,
                 vspace: float = 0.12, col_widths: Sequence[float] | None = None,
                 shared_x: bool = False):
        self.rows, self.cols = rows, cols
        widths = list(col_widths or [1.0] * cols)
        total = sum(widths)
        usable_w = 1.0 - hspace * (cols - 1)
        usable_h = 1.0 - vspace * (rows - 1)
        self.layout: dict[str, Any] = {"annotations": [], "shapes": []}
        self.cells: dict[tuple[int, int], int] = {}
        x0 = 0.0
        xdomains = []
        for w in widths:
            x1 = x0 + usable_w * w / total
            xdomains.append([x0, min(x1, 1.0)])
            x0 = x1 + hspace
        h = usable_h / rows
        for r in range(1, rows + 1):
            top = 1.0 - (r - 1) * (h + vspace)
            for c in range(1, cols + 1):
                i = (r - 1) * cols + c
                self.cells[(r, c)] = i
                xa, ya = _axis_name(i, "xaxis"), _axis_name(i, "yaxis")
                self.layout[xa] = {"domain": xdomains[c - 1], "anchor": _axis_name(i, "y")}
                self.layout[ya] = {"domain": [max(top - h, 0.0), top],
                                   "anchor": _axis_name(i, "x")}
                if shared_x and r < rows:
                    self.layout[xa]["matches"] = _axis_name(rows * cols - cols + c, "x")
                    self.layout[xa]["showticklabels"] = False
                k = i - 1
                if k < len(titles) and titles[k]:
                    self.layout["annotations"].append({
                        "text": titles[k], "showarrow": False, "font": {"size": 13},
                        "x": sum(xdomains[c - 1]) / 2, "y": top, "xref": "paper",
                        "yref": "paper", "xanchor": "center", "yanchor": "bottom"})

    def refs(self, row: int = 1, col: int = 1) -> dict[str, str]:
        i = self.cells[(row, col)]
        return {"xaxis": _axis_name(i, "x"), "yaxis": _axis_name(i, "y")}

    def axis(self, row: int, col: int, letter: str) -> dict:
        return self.layout[_axis_name(self.cells[(row, col)], f"{letter}axis")]

    def vline(self, x: float, row: int = 1, col: int = 1, **line) -> None:
        r = self.refs(row, col)
        self.layout["shapes"].append({"type": "line", "x0": x, "x1": x, "y0": 0, "y1": 1,
                                      "xref": r["xaxis"], "yref": f"{r['yaxis']} domain",
                                      "line": line})

    def hline(self, y: float, row: int = 1, col: int = 1, **line) -> None:
        r = self.refs(row, col)
        self.layout["shapes"].append({"type": "line", "y0": y, "y1": y, "x0": 0, "x1": 1,
                                      "yref": r["yaxis"], "xref": f"{r['xaxis']} domain",
                                      "line": line})


def _figure(data: list[dict], layout: dict, title: str, height: int,
            label: str = "", legend: bool = True, plain: bool = True) -> go.Figure:
    layout = dict(layout)
    if plain:
        data, layout["datarevision"] = _plain_data(data)
    layout.update(
        # no template: plotly.js's plain defaults; saves bytes and a merge per chart. A
        # string, not {}: see _plain_data for why every value must compare equal by value.
        template="none",
        title={"text": titled(title, label), "x": 0.0, "xanchor": "left", "font": {"size": 15}},
        height=height,
        # Fixed margins unless a colour bar needs room: with autoexpand plotly.js measures
        # every legend and label and lays the chart out a second time.
        margin={"l": 55, "r": 20, "t": 80, "b": 45,
                "autoexpand": _has_colorbar(data, layout)},
        showlegend=legend,
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.06, "x": 1.0,
                "xanchor": "right"},
    )
    return go.Figure({"data": data, "layout": layout}, _validate=False)


def _has_colorbar(data: list[dict], layout: dict) -> bool:
    if any(k.startswith("coloraxis") for k in layout):
        return True
    return any(t.get("type") == "heatmap" and t.get("showscale", True) and "coloraxis" not in t
               for t in data)


def _plain(value: Any, digest) -> Any:
    if isinstance(value, np.ndarray):
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v, digest) for k, v in value.items()}
    digest.update(repr(value).encode())
    return value


def _plain_data(data: list[dict]) -> tuple[list[dict], str]:
    """Traces with every numpy array as a plain list, and a digest of their content.

    Why: Streamlit's chart component draws every new figure twice -- ``Plotly.react`` on
    mount, then again with a JSON copy of the same figure. Plotly redraws everything on
    that second call unless it can tell nothing changed: data arrays must be plain arrays
    (base64 typed arrays always count as changed), ``layout.datarevision`` must be set (then
    arrays are compared through it) and no layout value may be an object compared by
    identity (``template: {}`` was one). With all three the second call is nearly free.

    The revision is a digest of the arrays' bytes (and the other trace values), so a figure
    with other numbers always gets another revision. Lists of float32 values are exact:
    each becomes the double equal to it.
    """
    digest = hashlib.blake2b(digest_size=10)
    plain = [_plain(trace, digest) for trace in data]
    return plain, digest.hexdigest()


def _points(x, y, name: str, color: str, refs: dict, symbol: str = "circle",
            size: int = 5, dash: str = "solid") -> dict:
    """Per-channel values: a marker per channel, or one step line for many channels."""
    if len(x) > MANY_CHANNELS:
        return {"type": "scatter", "x": x, "y": _f32(y), "mode": "lines", "name": name,
                "line": {"color": color, "width": 1.2, "shape": "hvh", "dash": dash},
                **refs}
    return {"type": "scatter", "x": x, "y": _f32(y), "mode": "markers", "name": name,
            "marker": {"color": color, "size": size, "symbol": symbol}, **refs}


def _bars(x, y, name: str, color: str, refs: dict) -> dict:
    """Per-channel bars; a step-shaped filled line when there are too many for bars."""
    if len(x) > BAR_CHANNELS:  # one path instead of one bar node per channel
        return {"type": "scatter", "x": x, "y": _f32(y), "mode": "lines", "name": name,
                "line": {"color": color, "width": 1, "shape": "hvh"}, "fill": "tozeroy",
                **refs}
    return {"type": "bar", "x": x, "y": _f32(y), "name": name, "marker": {"color": color},
            **refs}


def _heat(z, rows, cols, name: str, refs: dict, zmid: float | None = 0.0,
          coloraxis: str | None = None) -> dict:
    trace = {"type": "heatmap", "z": _f32(z), "x": np.asarray(cols, dtype=np.int32),
             "y": np.asarray(rows, dtype=np.int32), "name": name,
             "hovertemplate": "h=%{y}, w=%{x}<br>" + name + " = %{z:.6g}<extra></extra>",
             **refs}
    if coloraxis:
        trace["coloraxis"] = coloraxis
    else:
        trace.update(colorscale=HEATMAP_SCALE, zmid=zmid, showscale=False)
    return trace


# -- 1. network overview ---------------------------------------------------------------------


def overview_figure(view: ViewData) -> go.Figure:
    """One point per BN layer: mean shift, log variance ratio, manual-vs-native difference.

    Every point carries its layer label as ``customdata`` so a click can select the layer.
    Marker colour says which statistics the layer normalised with.
    """
    rows = view.overview_rows
    names = [r["name"] if r["calls"] == 1 else f"{r['name']}#{r['call']}" for r in rows]
    x = np.array([r["index"] for r in rows], dtype=np.int32)
    used = [r["stats_used"] for r in rows]
    colors = [BATCH if u == "batch" else RUNNING for u in used]
    custom = [[n, u, r["mode"]] for n, u, r in zip(names, used, rows)]
    grid = _Grid(3, 1, vspace=0.07, shared_x=True, titles=(
        "mean shift |batch mean - running mean| / running std (mean over channels)",
        "log(batch var / running var) (mean over channels)",
        "max |manual - native| of the BN output"))
    series = (
        ("mean_shift", "mean shift", "%{y:.4g} running stds"),
        ("log_var_ratio", "log var ratio", "%{y:.4g}"),
        ("max_abs_diff", "max |manual - native|", "%{y:.3g}"),
    )
    data = []
    for row, (col, name, fmt) in enumerate(series, start=1):
        y = np.array([np.nan if r[col] is None else r[col] for r in rows], dtype=np.float64)
        data.append({
            "type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": name,
            "customdata": custom, "line": {"color": REFERENCE, "width": 1},
            "marker": {"color": colors, "size": 8}, "showlegend": False,
            "hovertemplate": ("%{customdata[0]}<br>" + fmt + "<br>stats used: "
                              "%{customdata[1]}<br>%{customdata[2]}<extra></extra>"),
            **grid.refs(row, 1)})
    for used_kind, color in (("batch", BATCH), ("running", RUNNING)):
        data.append({"type": "scatter", "x": [None], "y": [None], "mode": "markers",
                     "name": f"normalised with {used_kind} stats",
                     "marker": {"color": color, "size": 8}, **grid.refs(1, 1)})
    grid.hline(0, 2, 1, color=REFERENCE, dash="dot", width=1)
    grid.axis(3, 1, "y").update(type="log", exponentformat="e")
    grid.axis(3, 1, "x").update(title={"text": "BN layer (in forward order; click a point)"})
    layout = grid.layout
    layout.update(hovermode="closest")
    return _figure(data, layout, f"Network overview: {len(names)} BatchNorm layers of "
                   f"{view.model}", 620, view.weights_label)


# -- 2. layer view ----------------------------------------------------------------------------


def channel_stats_figure(layer: LayerView, channel: int | None = None,
                         label: str = "") -> go.Figure:
    """Per channel: batch mean/variance (biased, what BN normalises with) against running."""
    c = np.arange(layer.num_features, dtype=np.int32)
    grid = _Grid(2, 1, vspace=0.12, shared_x=True,
                 titles=("mean per channel", "variance per channel (log scale)"))
    data = [_points(c, layer.batch_mean, "batch mean", BATCH, grid.refs(1, 1))]
    if layer.running_mean_before is not None:
        data.append(_points(c, layer.running_mean_before, "running mean", RUNNING,
                            grid.refs(1, 1), "diamond", dash="dot"))
    data.append(_points(c, layer.batch_var, "batch var (biased)", BATCH, grid.refs(2, 1)))
    if layer.running_var_before is not None:
        data.append(_points(c, layer.running_var_before, "running var", RUNNING,
                            grid.refs(2, 1), "diamond", dash="dot"))
    grid.axis(2, 1, "y").update(type="log", exponentformat="e")
    grid.axis(2, 1, "x").update(title={"text": "channel"})
    if channel is not None:
        for r in (1, 2):
            grid.vline(int(channel), r, 1, color=HIGHLIGHT, width=1, dash="dot")
    return _figure(data, grid.layout, f"{layer.label}: batch vs running statistics "
                   f"(BN used the {layer.stats_used} ones)", 480, label)


def running_update_figure(layer: LayerView, channel: int | None = None,
                          label: str = "") -> go.Figure:
    """The running-statistics update this forward makes: before, after and their change."""
    if not layer.updates_running_stats or layer.running_mean_after is None:
        why = ("the layer has no running statistics" if not layer.has_running_stats
               else "eval mode reads them" if not layer.training
               else "track_running_stats is off")
        layout = {"xaxis": {"visible": False}, "yaxis": {"visible": False},
                  "annotations": [{"text": "This forward does not update the running "
                                           f"statistics ({why}).", "showarrow": False,
                                   "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper"}]}
        return _figure([], layout, f"{layer.label}: no running-stat update", 200, label)
    c = np.arange(layer.num_features, dtype=np.int32)
    grid = _Grid(1, 2, hspace=0.1, titles=(
        "running mean: after - before, per channel",
        "running var: after - before, per channel (unbiased batch var)"))
    rows = (
        ("mean", layer.running_mean_before, layer.running_mean_after,
         layer.manual_running_mean_after),
        ("var", layer.running_var_before, layer.running_var_after,
         layer.manual_running_var_after),
    )
    data = []
    for col, (what, before, after, manual) in enumerate(rows, start=1):
        data.append(_bars(c, _f32(after) - _f32(before), f"{what}: PyTorch's change", RUNNING,
                          grid.refs(1, col)))
        if manual is not None:
            data.append({"type": "scatter", "x": c, "y": _f32(manual) - _f32(before),
                         "mode": "lines", "name": f"{what}: factor * (batch - before), by hand",
                         "line": {"color": MANUAL, "width": 1.5, "dash": "dot",
                                  "shape": "hvh"}, **grid.refs(1, col)})
        grid.axis(1, col, "x").update(title={"text": "channel"})
        grid.axis(1, col, "y").update(exponentformat="e")
    if channel is not None:
        for col in (1, 2):
            grid.vline(int(channel), 1, col, color=HIGHLIGHT, width=1, dash="dot")
    momentum = "None (cumulative average)" if layer.momentum is None else f"{layer.momentum:g}"
    factor = "" if layer.update_factor is None else f", factor {layer.update_factor:.4g}"
    return _figure(data, grid.layout, f"{layer.label}: running-stat update (momentum "
                   f"{momentum}{factor})", 400, label)


def _square_axes(grid: _Grid, cols: int, ticks: bool = True) -> None:
    for c in range(1, cols + 1):
        y = grid.axis(1, c, "y")
        y.update(autorange="reversed", scaleanchor=grid.refs(1, c)["xaxis"], constrain="domain")
        grid.axis(1, c, "x").update(constrain="domain")
        if not ticks:
            y["showticklabels"] = False
            grid.axis(1, c, "x")["showticklabels"] = False


def _grid_text(layer: LayerView) -> str:
    h, w = layer.spatial
    step = int(layer.rows[1] - layer.rows[0]) if len(layer.rows) > 1 else 1
    return f"every {step}-th row and column of {h}x{w}" if step > 1 else f"all {h}x{w} pixels"


def feature_map_figure(layer: LayerView, channel: int, label: str = "") -> go.Figure:
    """Image 0, one channel: conv output entering BN, BN output, activation output."""
    c = int(channel)
    panels = [("conv output (BN input)", layer.map_input[c]),
              ("after BN", layer.map_output[c])]
    if layer.map_activation is not None:
        panels.append((f"after {layer.activation}", layer.map_activation[c]))
    grid = _Grid(1, len(panels), hspace=0.05, titles=[p[0] for p in panels])
    data = [_heat(z, layer.rows, layer.cols, name, grid.refs(1, i))
            for i, (name, z) in enumerate(panels, start=1)]
    _square_axes(grid, len(panels))
    return _figure(data, grid.layout, f"{layer.label}, channel {c}, image 0 "
                   f"({_grid_text(layer)})", 370, label, legend=False)


def channel_gallery_figure(layer: LayerView, channels: Sequence[int], stage: str = "input",
                           label: str = "") -> go.Figure:
    """Small multiples of several channels of image 0 (one colour scale per map)."""
    maps = {"input": layer.map_input, "output": layer.map_output,
            "activation": layer.map_activation}[stage]
    if maps is None:
        raise ValueError(f"layer {layer.label} has no {stage} maps")
    chans = [int(c) for c in channels][:8] or [0]
    grid = _Grid(1, len(chans), hspace=0.015, titles=[f"ch {c}" for c in chans])
    data = [_heat(maps[c], layer.rows, layer.cols, f"channel {c}", grid.refs(1, i))
            for i, c in enumerate(chans, start=1)]
    _square_axes(grid, len(chans), ticks=False)
    what = {"input": "conv output (BN input)", "output": "after BN",
            "activation": f"after {layer.activation}"}[stage]
    return _figure(data, grid.layout, f"{layer.label}: {what}, channels "
                   f"{', '.join(map(str, chans))}, image 0", 250, label, legend=False)


def _hist_trace(edges: np.ndarray, counts: np.ndarray, name: str, color: str,
                refs: dict) -> dict:
    centres = (edges[:-1] + edges[1:]) / 2
    return {"type": "bar", "x": _f32(centres), "y": np.asarray(counts, dtype=np.int32),
            "width": float(edges[1] - edges[0]), "name": name, "marker": {"color": color},
            "hovertemplate": "%{x:.4g}: %{y} values<extra></extra>", **refs}


def distribution_figure(layer: LayerView, channel: int, label: str = "") -> go.Figure:
    """Histograms of one channel before BN, after BN and after the activation."""
    c = int(channel)
    panels = [("conv output (BN input)", layer.hist_input, REFERENCE),
              ("after BN", layer.hist_output, NATIVE)]
    if layer.hist_activation is not None:
        panels.append((f"after {layer.activation}", layer.hist_activation, MANUAL))
    grid = _Grid(1, len(panels), hspace=0.06, titles=[p[0] for p in panels])
    data = [_hist_trace(edges, counts[c], name, color, grid.refs(1, i))
            for i, (name, (edges, counts), color) in enumerate(panels, start=1)]
    grid.vline(float(layer.batch_mean[c]), 1, 1, color=BATCH, width=2)
    data.append({"type": "scatter", "x": [None], "y": [None], "mode": "lines",
                 "name": "batch mean", "line": {"color": BATCH, "width": 2}, **grid.refs()})
    if layer.running_mean_before is not None:
        grid.vline(float(layer.running_mean_before[c]), 1, 1, color=RUNNING, width=2,
                   dash="dash")
        data.append({"type": "scatter", "x": [None], "y": [None], "mode": "lines",
                     "name": "running mean", "line": {"color": RUNNING, "dash": "dash"},
                     **grid.refs()})
    layout = grid.layout
    layout["bargap"] = 0
    what = (f"all {layer.count} values" if layer.hist_count >= layer.count
            else f"{layer.hist_count} sampled of {layer.count} values")
    return _figure(data, layout, f"{layer.label}, channel {c}: distribution over the batch "
                   f"({what})", 340, label)


def all_channels_figure(layer: LayerView, channel: int | None = None,
                        label: str = "") -> go.Figure:
    """Every channel's histogram of the conv output as one heatmap row (log counts)."""
    edges, counts = layer.hist_input
    centres = (edges[:-1] + edges[1:]) / 2
    chans = np.arange(layer.num_features, dtype=np.int32)
    grid = _Grid(1, 1)
    data = [
        # colour only (the hover says so): 4 decimals keep the JSON small for wide layers
        {"type": "heatmap", "z": np.round(np.log1p(np.asarray(counts, dtype=np.float64)), 4),
         "x": _f32(centres), "y": chans, "colorscale": "Viridis",
         "colorbar": {"title": {"text": "log(1+n)"}, "thickness": 12},
         "hovertemplate": "channel %{y}<br>value %{x:.4g}<br>log(1+count) %{z:.3g}"
                          "<extra></extra>", "name": "histograms", **grid.refs()},
        {"type": "scatter", "x": _f32(layer.batch_mean), "y": chans,
         "mode": "lines" if len(chans) > MANY_CHANNELS else "markers", "name": "batch mean",
         "marker": {"color": BATCH, "size": 3}, "line": {"color": BATCH, "width": 1},
         **grid.refs()},
    ]
    if channel is not None:
        grid.hline(int(channel), color=HIGHLIGHT, width=1, dash="dot")
    grid.axis(1, 1, "x").update(title={"text": "conv output value"})
    grid.axis(1, 1, "y").update(title={"text": "channel"})
    return _figure(data, grid.layout, f"{layer.label}: every channel's distribution", 420,
                   label)


def manual_vs_native_figure(layer: LayerView, channel: int | None = None,
                            label: str = "") -> go.Figure:
    """Manual formula against native BN output (sampled elements), and the per-channel max
    difference over *all* elements (computed by the core during the forward).

    The sample is drawn as SVG ``scatter``, not ``scattergl``: without a GPU (headless
    browsers, many school laptops) WebGL is emulated and its set-up alone costs more than
    drawing :data:`bnviz.dashboard.SAMPLE_POINTS` SVG points."""
    native = _f32(layer.sample_native)
    manual = _f32(layer.sample_manual)
    grid = _Grid(1, 2, hspace=0.1, col_widths=(0.45, 0.55), titles=(
        f"{len(native)} sampled elements", "max |manual - native| per channel (all elements)"))
    both = np.concatenate([native, manual])
    finite = both[np.isfinite(both)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    data = [
        {"type": "scatter", "x": [lo, hi], "y": [lo, hi], "mode": "lines",
         "name": "identity y = x", "line": {"color": REFERENCE, "dash": "dash"},
         **grid.refs(1, 1)},
        {"type": "scatter", "x": native, "y": manual, "mode": "markers", "name": "elements",
         "customdata": np.asarray(layer.sample_index, dtype=np.int32),
         "marker": {"color": MANUAL, "size": 3, "opacity": 0.6},
         "hovertemplate": ("x[%{customdata[0]},%{customdata[1]},%{customdata[2]},"
                           "%{customdata[3]}]<br>native %{x:.6g}<br>manual %{y:.6g}"
                           "<extra></extra>"), **grid.refs(1, 1)},
        _bars(np.arange(layer.num_features, dtype=np.int32), layer.channel_max_abs_diff,
              "max |diff|", NATIVE, grid.refs(1, 2)),
    ]
    if channel is not None:
        grid.vline(int(channel), 1, 2, color=HIGHLIGHT, width=1, dash="dot")
    grid.axis(1, 1, "x").update(title={"text": "native BN output"})
    grid.axis(1, 1, "y").update(title={"text": f"manual ({layer.stats_used} statistics)"})
    grid.axis(1, 2, "x").update(title={"text": "channel"})
    grid.axis(1, 2, "y").update(exponentformat="e")
    return _figure(data, grid.layout, f"{layer.label}: manual formula vs native BatchNorm "
                   f"(max diff {layer.max_abs_diff:.2e})", 420, label, legend=False)


# -- 3. in-place ReLU -------------------------------------------------------------------------


def inplace_figure(layer: LayerView, channel: int, label: str = "") -> go.Figure:
    """What a forward hook keeping a *reference* sees, against a clone taken right after BN."""
    if layer.map_reference is None:
        raise ValueError(f"layer {layer.label} is not overwritten in place")
    c = int(channel)
    clone = _f32(layer.map_output[c])
    ref = _f32(layer.map_reference[c])
    changed = (clone != ref).astype(np.float32)
    grid = _Grid(1, 3, hspace=0.05, titles=(
        "clone right after BN (true output)", f"reference seen after {layer.overwritten_by}",
        "overwritten (1 = changed)"))
    data = [
        _heat(clone, layer.rows, layer.cols, "clone", grid.refs(1, 1), coloraxis="coloraxis"),
        _heat(ref, layer.rows, layer.cols, "reference", grid.refs(1, 2), coloraxis="coloraxis"),
        {"type": "heatmap", "z": changed, "x": np.asarray(layer.cols, dtype=np.int32),
         "y": np.asarray(layer.rows, dtype=np.int32), "colorscale": "Greys", "zmin": 0,
         "zmax": 1, "showscale": False, "name": "overwritten",
         "hovertemplate": "h=%{y}, w=%{x}: %{z}<extra></extra>", **grid.refs(1, 3)},
    ]
    _square_axes(grid, 3)
    both = np.abs(np.concatenate([clone.ravel(), ref.ravel()]))
    vmax = float(np.nanmax(both)) if both.size and np.isfinite(both).any() else 1.0
    layout = grid.layout
    layout["coloraxis"] = {"colorscale": HEATMAP_SCALE, "cmin": -(vmax or 1.0),
                           "cmax": vmax or 1.0, "colorbar": {"thickness": 12}}
    frac = layer.overwritten_fraction or 0.0
    return _figure(data, layout, f"{layer.label}, channel {c}: {frac:.1%} of the BN output "
                   f"overwritten by {layer.overwritten_by}", 370, label, legend=False)


# -- 4. predictions ---------------------------------------------------------------------------


def predictions_figure(current, reference, image: int = 0, label: str = "") -> go.Figure:
    """Top-5 classes of one image under the current settings and with every BN in eval."""
    grid = _Grid(1, 2, hspace=0.3, titles=("current settings", "all BN layers in eval"))
    data = []
    for col, (preds, color, name) in enumerate(((current, BATCH, "current"),
                                                (reference, RUNNING, "all eval")), start=1):
        grid.axis(1, col, "x").update(range=[0, 1], tickformat=".0%")
        grid.axis(1, col, "y").update(tickfont={"size": 11})
        if not preds:
            continue
        row = list(preds[image])[::-1]
        data.append({"type": "bar", "orientation": "h", "x": [p[2] for p in row],
                     "y": [p[1] for p in row], "marker": {"color": color}, "name": name,
                     "hovertemplate": "%{y}: %{x:.2%}<extra></extra>", **grid.refs(1, col)})
    fig = _figure(data, grid.layout, f"Top-5 predictions for image {image}", 330, label,
                  legend=False)
    # room for the longest ImageNet name (30 characters) without automargin's second layout
    fig.layout.margin.l = 200
    return fig


def input_figure(z: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                 label: str = "") -> go.Figure:
    """The network's actual input (after preprocessing), image 0, per colour channel, from
    a :class:`~bnviz.dashboard.InputPreview` (the app draws it before the forward runs)."""
    n = z.shape[0]
    grid = _Grid(1, n, hspace=0.03, titles=[f"channel {i}" for i in range(n)])
    data = [_heat(z[i], rows, cols, f"channel {i}", grid.refs(1, i + 1),
                  coloraxis="coloraxis") for i in range(n)]
    _square_axes(grid, n, ticks=False)
    layout = grid.layout
    layout["coloraxis"] = {"colorscale": "Greys_r", "colorbar": {"thickness": 10}}
    # base64 arrays (plain=False): several times smaller than JSON lists of this many exact
    # values, and this chart only changes with the input, never on a layer, channel or mode
    # change, so the second draw it costs once is cheaper than the bytes
    fig = _figure(data, layout, "network input (after preprocessing), image 0", 210,
                  label, legend=False, plain=False)
    fig.update_layout(margin={"l": 10, "r": 10, "t": 60, "b": 10}, title_font_size=13)
    return fig
