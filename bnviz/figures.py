"""Plotly figures of the dashboard: pure functions from view data to ``go.Figure``.

Every builder takes the condensed data of :mod:`bnviz.dashboard` (a ``ViewData`` or a
``LayerView``) and returns a figure; nothing here touches Streamlit or runs a network,
so the figures are unit-tested against PyTorch's numbers directly (a trace's ``y`` *is* the
report's ``batch_mean``). Arrays leave as plain JSON lists with a content digest as
``layout.datarevision`` (exact float32 values; see :func:`_plain_data` for why not base64),
except large heatmaps, whose float32 values travel as base64 (a quarter of the bytes): a
channel's 112 x 112 feature maps are ~70 KB each, and a rerun stays well under 1 MB.

Speed: figures are written as plain dict specs with explicit subplot domains and wrapped in
``go.Figure(spec, _validate=False)``. Plotly's per-property validation (and
``make_subplots``) costs more than the rest of a rerun; the unit tests validate every
figure instead, once, with ``go.Figure(fig.to_dict())``.

Colours mean the same thing everywhere: orange = batch statistics, blue = running
statistics, green = the manual (literal formula) computation, grey = reference lines, red =
the selected layer or channel, and in every "overwritten" mask red = changed, light grey =
unchanged (:func:`bnviz.chart_style.mask_heatmap`, also used by the Pitfall lab). Every
heatmap has a colour bar. When the network is not pretrained, every title carries ``random
init (not pretrained)`` so a screenshot can never be mistaken for a trained network's
statistics.

Phone-sized screens (390 px) get the same figures: titles are broken into lines of about
:data:`TITLE_CHARS` characters, legends sit below the plot with room for the rows they
need at that width, and the colour bars of maps lie right above their panels.
"""

from __future__ import annotations

import hashlib
import math
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

from .chart_style import (  # noqa: F401 - the mask convention, shared with the Pitfall lab
    CHANGED,
    MASK_COLORSCALE,
    MASK_TITLE,
    SUBPLOT_TITLE_CHARS,
    UNCHANGED,
    mask_heatmap,
    wrap_words,
)

if TYPE_CHECKING:
    from .dashboard import LayerView, ViewData

BATCH = "#ff7f0e"
RUNNING = "#1f77b4"
MANUAL = "#2ca02c"
NATIVE = "#9467bd"
REFERENCE = "#7f7f7f"
HIGHLIGHT = "#d62728"
HEATMAP_SCALE = "RdBu_r"
# the variance series: darker shades of the same meaning, so mean and variance never share
# a legend symbol
BATCH_VAR = "#b35000"
RUNNING_VAR = "#0d4a80"

RANDOM_INIT_LABEL = "random init (not pretrained)"

#: Above this many channels a per-channel trace is drawn as one step line (one SVG path)
#: instead of one SVG node per channel: a wide layer would otherwise put thousands of nodes
#: on the page and a layer switch would spend most of its time in the browser. WebGL is no
#: better: without a GPU, as in headless browsers and many school laptops, it is emulated.
MANY_CHANNELS = 64
#: Above this many channels, per-channel bars become one step-shaped filled line.
BAR_CHANNELS = 128
#: Heatmaps of more float32 (or 0/1 mask) values than this travel as base64 (5.3 bytes a
#: value instead of ~20 as a JSON list); the browser then draws them a second time, which
#: for a heatmap costs far less than the bytes would. (The all-channels histogram heatmap
#: is rounded on purpose and stays a short plain list.)
PLAIN_HEATMAP_VALUES = 4096
#: The gallery's small multiples are averaged down to at most this many pixels a side.
GALLERY_SIDE = 56
#: A title line holds about this many characters: what fits a phone (390 px) at 15 px.
TITLE_CHARS = 48
#: The width legends are laid out for: the plot area of a phone's chart (390 px screen, 358
#: px chart, less the margins), so they never cover the plot there.
PHONE_WIDTH = 280
#: Where a title starts (px from the top), and the height of its first and further lines at
#: 15 px. Plotly places a title of several lines by its first line whatever ``yanchor`` says,
#: so the title is placed by hand: its top ``TITLE_PAD`` below the top of the figure.
TITLE_PAD, TITLE_LINE, TITLE_NEXT_LINE = 8, 17, 20


# -- small spec helpers ----------------------------------------------------------------------


def titled(text: str, label: str = "") -> str:
    """``text`` with the weights label appended (``"... - random init (not pretrained)"``)."""
    return f"{text} - {label}" if label else text


def wrap_title(text: str, width: int = TITLE_CHARS) -> str:
    """``text`` with every line longer than ``width`` broken before its `` (`` and `` - ``
    joints (a line break the builder wrote, ``<br>``, stays). The space before a break is
    kept, so the title's text content still reads as one sentence."""
    whole = RANDOM_INIT_LABEL.replace(" (", "\x01(")  # the label is never broken
    lines = []
    for line in text.replace(RANDOM_INIT_LABEL, whole).split("<br>"):
        pieces = [""]
        for i, part in enumerate(line.replace(" - ", " \x00- ").replace(" (", " \x00(")
                                 .split("\x00")):
            if i and len(pieces[-1]) + len(part) > width:
                pieces.append(part)
            else:
                pieces[-1] += part
        lines.extend(pieces)
    return "<br>".join(lines).replace("\x01", " ")


def _lines(text: str) -> int:
    return text.count("<br>") + 1


def _legend_rows(data: list[dict], width: int = PHONE_WIDTH) -> int:
    """How many rows a horizontal legend of these traces needs on a phone (12 px font:
    ~7 px a character plus 40 px for the symbol and gap)."""
    rows, used = 0, width
    for t in data:
        if not t.get("name") or t.get("showlegend") is False:
            continue
        lines = str(t["name"]).split("<br>")
        entry = 40 + 7 * max(len(line) for line in lines)
        if used + entry > width or len(lines) > 1:
            rows, used = rows + len(lines), 0
        used += entry
    return rows


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
                 shared_x: bool = False, title_size: int = 12, bar_room: float = 0.0):
        """``bar_room``: the fraction of the plot's height kept free above each row's
        panels, under their titles, for the colour bars (:func:`_hbar`)."""
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
                self.layout[ya] = {"domain": [max(top - h, 0.0), top - bar_room],
                                   "anchor": _axis_name(i, "x")}
                if shared_x and r < rows:
                    self.layout[xa]["matches"] = _axis_name(rows * cols - cols + c, "x")
                    self.layout[xa]["showticklabels"] = False
                k = i - 1
                if k < len(titles) and titles[k]:
                    text = wrap_words(titles[k], SUBPLOT_TITLE_CHARS.get(cols, 9))
                    self.layout["annotations"].append({
                        "text": text, "showarrow": False, "font": {"size": title_size},
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
            label: str = "", legend: bool = True, plain: bool = True,
            bottom: int = 45, left: int = 55) -> go.Figure:
    """The figure with the shared layout: the title (wrapped) at the top left, the legend
    below the plot, fixed margins sized for both (``bottom``: what the plot needs under it
    besides the legend, e.g. axis titles or colour bars)."""
    layout = dict(layout)
    if plain:
        data, layout["datarevision"] = _plain_data(data)
    text = wrap_title(titled(title, label))
    # room above the plot: the title's lines, then the subplot titles' (annotations sitting
    # on top of a subplot)
    subtitles = [a for a in layout.get("annotations", ())
                 if a.get("yanchor") == "bottom" and a.get("yref") == "paper"]
    sub = max((16 * _lines(a["text"]) + 6 for a in subtitles), default=0)
    title_bottom = TITLE_PAD + TITLE_LINE + TITLE_NEXT_LINE * (_lines(text) - 1)
    top = title_bottom + 10 + sub
    rows = _legend_rows(data) if legend else 0
    # taller by what the title and legend take, so the plot keeps its size
    height = height + max(top - 80, 0) + 22 * rows
    layout.update(
        # no template: plotly.js's plain defaults; saves bytes and a merge per chart. A
        # string, not {}: see _plain_data for why every value must compare equal by value.
        template="none",
        # plotly puts the first line of a title 14 px above its anchor, whatever the anchor
        title={"text": text, "x": 0.0, "xanchor": "left", "xref": "container", "pad": {"l": 8},
               "y": 1.0 - (TITLE_PAD + 14) / height, "yref": "container",
               "yanchor": "bottom", "font": {"size": 15}},
        height=height,
        # Fixed margins unless a vertical colour bar needs room: with autoexpand plotly.js
        # measures every legend and label and lays the chart out a second time.
        margin={"l": left, "r": 20, "t": top, "b": bottom + 22 * rows,
                "autoexpand": _has_colorbar(data, layout)},
        showlegend=legend,
        # below the plot, from the left: on a phone a legend beside the title covered it
        legend={"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom",
                "x": 0.0, "xanchor": "left"},
    )
    return go.Figure({"data": data, "layout": layout}, _validate=False)


def _vertical_bar(colorbar: Any) -> bool:
    return not (isinstance(colorbar, dict) and colorbar.get("orientation") == "h")


def _has_colorbar(data: list[dict], layout: dict) -> bool:
    if any(k.startswith("coloraxis") and _vertical_bar(v.get("colorbar"))
           and v.get("showscale", True) for k, v in layout.items()):
        return True
    return any(t.get("type") == "heatmap" and t.get("showscale", True) and "coloraxis" not in t
               and _vertical_bar(t.get("colorbar")) for t in data)


def _binary_maps(data: list[dict]) -> bool:
    """Whether the figure's heatmaps travel as base64 (see PLAIN_HEATMAP_VALUES)."""
    return sum(t["z"].size for t in data
               if isinstance(t.get("z"), np.ndarray) and t["z"].dtype in (np.float32, np.uint8)
               ) > PLAIN_HEATMAP_VALUES


def _plain(value: Any, digest, binary_z: bool = False, key: str = "") -> Any:
    if isinstance(value, np.ndarray):
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
        if binary_z and key == "z" and value.dtype in (np.float32, np.uint8):
            return value  # base64 (see PLAIN_HEATMAP_VALUES)
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v, digest, binary_z, k) for k, v in value.items()}
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
    binary_z = _binary_maps(data)
    plain = [_plain(trace, digest, binary_z) for trace in data]
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
          coloraxis: str | None = None, block: int = 1) -> dict:
    where = "h=%{y}, w=%{x}" if block == 1 else f"{block}x{block} block at h=%{{y}}, w=%{{x}}"
    what = name if block == 1 else f"mean {name}"
    trace = {"type": "heatmap", "z": _f32(z), "x": np.asarray(cols, dtype=np.int32),
             "y": np.asarray(rows, dtype=np.int32), "name": name,
             "hovertemplate": where + "<br>" + what + " = %{z:.6g}<extra></extra>",
             **refs}
    if coloraxis:
        trace["coloraxis"] = coloraxis
    else:
        trace.update(colorscale=HEATMAP_SCALE, zmid=zmid, showscale=False)
    return trace


#: Pixels kept free above a row of maps for their colour bars (bar and tick labels).
BAR_ROOM = 32


def _bar_room(height: int, bottom: int) -> float:
    """:data:`BAR_ROOM` as a fraction of the plot's height in a figure of ``height`` (the
    plot is about ``height - 80 - bottom`` tall, see :func:`_figure`)."""
    return BAR_ROOM / max(height - 80 - bottom, 100)


def _hbar(grid: _Grid, first: int, last: int | None = None, row: int = 1, **extra) -> dict:
    """A horizontal colour bar right above the panels ``first``..``last`` of ``row``, in the
    room :class:`_Grid` keeps under their titles (``bar_room``): there it can be read on a
    phone, where bars beside narrow panels would cover them, and it stays next to its maps
    however the square maps shrink (they keep to the top of their cells). Inside the plot
    area, not in the margin: plotly moves the chart's title out of the way of a colour bar
    in the top margin, off the top of the figure."""
    x0 = grid.axis(row, first, "x")["domain"][0]
    x1 = grid.axis(row, last or first, "x")["domain"][1]
    y1 = grid.axis(row, first, "y")["domain"][1]
    return {"orientation": "h", "x": (x0 + x1) / 2, "xanchor": "center", "len": x1 - x0,
            "lenmode": "fraction", "y": y1, "yanchor": "bottom", "ypad": 4, "thickness": 8,
            "ticklabelposition": "outside top", "tickangle": 0, "tickfont": {"size": 10},
            "nticks": 4, "exponentformat": "power", **extra}


def _diverging(colorbar: dict, vmax: float | None = None) -> dict:
    """A coloraxis of the heatmap scale, centred on 0: its own range, or +-``vmax``."""
    if vmax is None:
        return {"colorscale": HEATMAP_SCALE, "cmid": 0.0, "colorbar": colorbar}
    return {"colorscale": HEATMAP_SCALE, "cmin": -vmax, "cmax": vmax, "colorbar": colorbar}


def _abs_max(*maps) -> float:
    """Largest finite |value| of the maps (1 when there is none, or it is 0)."""
    finite = [np.abs(m[np.isfinite(m)]) for m in (np.asarray(z) for z in maps)]
    top = max((float(f.max()) for f in finite if f.size), default=0.0)
    return top or 1.0


def block_means(z: np.ndarray, block: int) -> np.ndarray:
    """The mean of every ``block`` x ``block`` block of a 2-D map (edge blocks: of the
    pixels they have), in float64 then float32."""
    z = np.asarray(z, dtype=np.float64)
    if block <= 1:
        return _f32(z)
    h, w = z.shape
    hb, wb = -(-h // block), -(-w // block)
    padded, real = np.zeros((hb * block, wb * block)), np.zeros((hb * block, wb * block))
    padded[:h, :w], real[:h, :w] = z, 1.0  # a NaN pixel makes its block NaN: never hidden
    sums = padded.reshape(hb, block, wb, block).sum(axis=(1, 3))
    return _f32(sums / real.reshape(hb, block, wb, block).sum(axis=(1, 3)))


# -- log axes ---------------------------------------------------------------------------------


def _log_range(*series) -> tuple[float, float] | None:
    """log10 of the smallest and the largest finite positive value of the series."""
    pos = [a[np.isfinite(a) & (a > 0)] for a in
           (np.asarray(v, dtype=np.float64) for v in series if v is not None)]
    pos = [a for a in pos if a.size]
    if not pos:
        return None
    return (math.log10(min(float(a.min()) for a in pos)),
            math.log10(max(float(a.max()) for a in pos)))


def _log_floor(*series) -> float:
    """Where a log axis draws exact zeros: the decade below its smallest positive value."""
    span = _log_range(*series)
    return 10.0 ** (math.floor(span[0]) - 1 if span else -1)


def _log_axis(lo: float, hi: float, px: float) -> dict:
    """Log-axis settings whose tick labels never overlap in a panel ``px`` pixels tall:
    from ``lo`` to ``hi`` (log10 units, padded), whole decades, every k-th decade so that
    labels are at least 24 px apart, written as powers of ten. Under 2 decades: 1, 2 and 5
    of each decade, over at least 1.2 decades (plotly's own choice there printed every
    digit, and on a short panel the labels ran into each other)."""
    span = hi - lo
    pad = max(0.08 * span, (1.2 - span) / 2, 0.08)
    axis: dict[str, Any] = {"type": "log", "exponentformat": "power",
                            "range": [lo - pad, hi + pad]}
    if span + 2 * pad < 2:
        axis["dtick"] = "D2"
    else:
        labels = max(2, int(px // 24))
        axis["dtick"] = max(1, math.ceil((span + 2 * pad) / labels))
    return axis


def _zeros_at_floor(x: np.ndarray, y, floor: float, name: str, color: str,
                    refs: dict) -> dict | None:
    """Markers for the values of ``y`` that are exactly 0 (or below), which a log axis
    cannot draw: at ``floor``, open downward triangles, a legend entry of their own."""
    y = np.asarray(y, dtype=np.float64)
    zero = np.flatnonzero(y <= 0)
    if not zero.size:
        return None
    return {"type": "scatter", "x": np.asarray(x)[zero], "y": np.full(zero.size, floor),
            "mode": "markers", "name": f"{name} = 0 (drawn at the axis floor)",
            "marker": {"color": color, "symbol": "triangle-down-open", "size": 11,
                       "line": {"width": 2, "color": color}},
            "hovertemplate": "%{x}: " + name + " = 0 exactly (a log axis has no 0; drawn "
                             "at the floor)<extra></extra>", **refs}


def _channel_list(channels: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(c)) for c in channels[:limit])
    return shown + (f" and {len(channels) - limit} more" if len(channels) > limit else "")


# -- 1. network overview ---------------------------------------------------------------------


def overview_figure(view: ViewData, selected: str | None = None) -> go.Figure:
    """One point per BN layer: mean shift, log variance ratio, manual-vs-native difference.

    Every point carries its layer label as ``customdata`` so a click can select the layer.
    Marker colour says which statistics the layer normalised with. ``selected``: the label
    of the layer shown below, marked by a red ring and a dotted line in every row.
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
    ys = []
    for row, (col, name, fmt) in enumerate(series, start=1):
        y = np.array([np.nan if r[col] is None else r[col] for r in rows], dtype=np.float64)
        ys.append(y)
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
    # a manual result identical to PyTorch's (difference 0) is the best result there is:
    # drawn at the floor of the log axis instead of vanishing from it
    floor = _log_floor(ys[2])
    zeros = _zeros_at_floor(x, ys[2], floor, "max |manual - native|", MANUAL, grid.refs(3, 1))
    if zeros is not None:
        data.append(zeros)
    if selected in names:
        i = names.index(selected)
        for row, y in enumerate(ys, start=1):
            grid.vline(int(x[i]), row, 1, color=HIGHLIGHT, width=1.5, dash="dot")
            value = y[i] if row < 3 or y[i] > 0 else floor
            data.append({"type": "scatter", "x": [int(x[i])], "y": [float(value)],
                         "mode": "markers", "name": f"shown below: {selected}",
                         "legendgroup": "selected", "showlegend": row == 1,
                         "hoverinfo": "skip",
                         "marker": {"symbol": "circle-open", "size": 17, "color": HIGHLIGHT,
                                    "line": {"width": 2.5, "color": HIGHLIGHT}},
                         **grid.refs(row, 1)})
    grid.hline(0, 2, 1, color=REFERENCE, dash="dot", width=1)
    span = _log_range(ys[2])
    lo, hi = span if span else (-8.0, 0.0)
    grid.axis(3, 1, "y").update(_log_axis(min(lo, math.log10(floor)) if zeros else lo, hi,
                                          150))
    grid.axis(3, 1, "x").update(title={"text": "BN layer (in forward order; click a point)"})
    layout = grid.layout
    layout.update(hovermode="closest")
    return _figure(data, layout, f"Network overview: <br>{len(names)} BatchNorm layers of "
                   f"{view.model}", 620, view.weights_label)


# -- 2. layer view ----------------------------------------------------------------------------


def channel_stats_figure(layer: LayerView, channel: int | None = None,
                         label: str = "") -> go.Figure:
    """Per channel: batch mean/variance (biased, what BN normalises with) against running.

    Every series has its own legend symbol (and line style, for many channels). A variance
    of exactly 0 -- ``_bn0`` of the bundled efficientnet_lite0 has four such channels in
    ``running_var`` -- cannot be drawn on the log axis: it is marked at the axis floor, and
    its legend entry names the channels, instead of silently missing.
    """
    c = np.arange(layer.num_features, dtype=np.int32)
    grid = _Grid(2, 1, vspace=0.13, shared_x=True,
                 titles=("mean per channel", "variance per channel (log scale)"))
    data = [_points(c, layer.batch_mean, "batch mean", BATCH, grid.refs(1, 1))]
    if layer.running_mean_before is not None:
        data.append(_points(c, layer.running_mean_before, "running mean", RUNNING,
                            grid.refs(1, 1), "diamond", dash="dot"))
    variances = [("batch var (biased)", "batch var", layer.batch_var, BATCH_VAR, "square",
                  "dash")]
    if layer.running_var_before is not None:
        variances.append(("running var", "running var", layer.running_var_before,
                          RUNNING_VAR, "triangle-up", "dashdot"))
    floor = _log_floor(*(v for _, _, v, *_ in variances))
    zeros_shown = False
    for name, short, values, color, symbol, dash in variances:
        data.append(_points(c, values, name, color, grid.refs(2, 1), symbol, dash=dash))
        zeros = _zeros_at_floor(c, values, floor, short, color, grid.refs(2, 1))
        if zeros is not None:
            # the legend names the channels: the note sits where the reader looks for
            # what the symbols mean, and never covers a point
            zeros["name"] = (f"{short} = 0 in channel{'s' if len(zeros['x']) > 1 else ''} "
                             f"{_channel_list(zeros['x'])}<br>(▽: drawn at the axis floor)")
            data.append(zeros)
            zeros_shown = True
    span = _log_range(*(v for _, _, v, *_ in variances))
    lo, hi = span if span else (math.log10(floor), math.log10(floor) + 1)
    grid.axis(2, 1, "y").update(_log_axis(min(lo, math.log10(floor)) if zeros_shown else lo,
                                          hi, 160))
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


def _square_axes(grid: _Grid, cols: int, ticks: bool = True, rows: int = 1) -> None:
    """Square pixels, row 0 at the top, each map at the top of its cell (under its title)."""
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            y = grid.axis(r, c, "y")
            y.update(autorange="reversed", scaleanchor=grid.refs(r, c)["xaxis"],
                     constrain="domain", constraintoward="top")
            grid.axis(r, c, "x").update(constrain="domain")
            if not ticks:
                y["showticklabels"] = False
                grid.axis(r, c, "x")["showticklabels"] = False


def map_block(layer: LayerView) -> int:
    """Side of the pixel blocks the layer's kept maps average (1: every pixel)."""
    steps = [int(a[1] - a[0]) for a in (layer.rows, layer.cols) if len(a) > 1]
    return max(steps, default=1)


def _grid_text(layer: LayerView, block: int | None = None) -> str:
    h, w = layer.spatial
    block = map_block(layer) if block is None else block
    return f"means of {block}x{block} blocks of {h}x{w}" if block > 1 else f"all {h}x{w} pixels"


def feature_map_figure(layer: LayerView, channel: int, label: str = "",
                       shared_scale: bool = False) -> go.Figure:
    """Image 0, one channel: conv output entering BN, BN output, activation output, every
    pixel up to 112 x 112 (larger maps: block means, and the title says so).

    Each panel has its colour bar. ``shared_scale``: one colour scale (and bar) for all
    panels, so equal colours are equal numbers before and after BN; by default each panel
    spans its own range, centred on 0.
    """
    c = int(channel)
    panels = [("conv output (BN input)", layer.map_input[c]),
              ("after BN", layer.map_output[c])]
    if layer.map_activation is not None:
        panels.append((f"after {layer.activation}", layer.map_activation[c]))
    n = len(panels)
    block = map_block(layer)
    grid = _Grid(1, n, hspace=0.07, titles=[p[0] for p in panels],
                 bar_room=_bar_room(370, 40))
    axes = ["coloraxis"] * n if shared_scale else [
        "coloraxis" if i == 1 else f"coloraxis{i}" for i in range(1, n + 1)]
    data = [_heat(z, layer.rows, layer.cols, name, grid.refs(1, i), coloraxis=axes[i - 1],
                  block=block) for i, (name, z) in enumerate(panels, start=1)]
    _square_axes(grid, n)
    layout = grid.layout
    if shared_scale:
        layout["coloraxis"] = _diverging(_hbar(grid, 1, n, title={
            "text": "one scale for all panels", "side": "top", "font": {"size": 11}}),
            _abs_max(*(z for _, z in panels)))
    else:
        for i, name in enumerate(axes, start=1):
            layout[name] = _diverging(_hbar(grid, i))
    scale = "one colour scale" if shared_scale else "own colour scale each"
    return _figure(data, layout, f"{layer.label}, channel {c}, image 0 "
                   f"({_grid_text(layer, block)}; {scale})", 370, label, legend=False,
                   bottom=40)


def channel_gallery_figure(layer: LayerView, channels: Sequence[int], stage: str = "input",
                           label: str = "") -> go.Figure:
    """Small multiples of several channels of image 0, in rows of 4, each with its own
    colour scale and bar; maps averaged down to at most :data:`GALLERY_SIDE` pixels a side
    (the title says so)."""
    maps = {"input": layer.map_input, "output": layer.map_output,
            "activation": layer.map_activation}[stage]
    if maps is None:
        raise ValueError(f"layer {layer.label} has no {stage} maps")
    chans = [int(c) for c in channels][:8] or [0]
    cols = min(4, len(chans))
    nrows = -(-len(chans) // cols)
    height = 60 + 230 * nrows
    grid = _Grid(nrows, cols, hspace=0.04, vspace=0.1 if nrows > 1 else 0.0,
                 titles=[f"ch {c}" for c in chans], bar_room=_bar_room(height, 15))
    step = max(1, math.ceil(max(len(layer.rows), len(layer.cols)) / GALLERY_SIDE))
    block = map_block(layer) * step
    data, layout = [], grid.layout
    for k, c in enumerate(chans):
        r, col = divmod(k, cols)
        axis = "coloraxis" if k == 0 else f"coloraxis{k + 1}"
        data.append(_heat(block_means(maps[c], step), layer.rows[::step], layer.cols[::step],
                          f"channel {c}", grid.refs(r + 1, col + 1), coloraxis=axis,
                          block=block))
        layout[axis] = _diverging(_hbar(grid, col + 1, row=r + 1))
    _square_axes(grid, cols, ticks=False, rows=nrows)
    what = {"input": "conv output (BN input)", "output": "after BN",
            "activation": f"after {layer.activation}"}[stage]
    h, w = layer.spatial
    pixels = f"means of {block}x{block} blocks of {h}x{w}" if block > 1 else f"{h}x{w}"
    return _figure(data, layout, f"{layer.label}: {what}, image 0, <br>channels "
                   f"{', '.join(map(str, chans))} ({pixels}; own colour scale each)",
                   height, label, legend=False, bottom=15)


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
    block = map_block(layer)
    grid = _Grid(1, 3, hspace=0.07, bar_room=_bar_room(370, 40), titles=(
        "clone after BN (true output)", f"reference seen after {layer.overwritten_by}",
        MASK_TITLE))
    data = [
        _heat(clone, layer.rows, layer.cols, "clone", grid.refs(1, 1), coloraxis="coloraxis",
              block=block),
        _heat(ref, layer.rows, layer.cols, "reference", grid.refs(1, 2), coloraxis="coloraxis",
              block=block),
        {**mask_heatmap(clone != ref, layer.cols, layer.rows, _hbar(grid, 3)),
         **grid.refs(1, 3)},
    ]
    _square_axes(grid, 3)
    layout = grid.layout
    # clone and reference on one scale: the colours of the two maps compare directly
    layout["coloraxis"] = _diverging(_hbar(grid, 1, 2), _abs_max(clone, ref))
    frac = layer.overwritten_fraction or 0.0
    where = "" if block == 1 else f" <br>({_grid_text(layer, block)})"
    return _figure(data, layout, f"{layer.label}, channel {c}: <br>{frac:.1%} of the BN output "
                   f"overwritten by {layer.overwritten_by}{where}", 370, label, legend=False,
                   bottom=40)


# -- 4. predictions ---------------------------------------------------------------------------


#: Class names longer than this are cut on the axis (the hover shows them whole): the
#: names' margin must leave a phone room for the bars.
CLASS_NAME_CHARS = 24


def _percent(p: float) -> str:
    """A probability as a percentage with three significant digits (``0.0512%``)."""
    return f"{100 * p:.3g}%"


def _class_names(labels: list[str]) -> list[str]:
    cut = [n if len(n) <= CLASS_NAME_CHARS else n[:CLASS_NAME_CHARS - 1] + "…" for n in labels]
    return cut if len(set(cut)) == len(cut) else labels  # never merge two classes' bars


def predictions_figure(current, reference, image: int = 0, label: str = "") -> go.Figure:
    """Top-5 classes of one image under the current settings and with every BN in eval.

    The two panels are stacked (side by side they ran into each other on a phone), each bar
    carries its percentage, and each panel's axis spans its own largest probability: in
    train mode a pretrained network's best guess may be ~1%, invisible on a 0-100% axis.
    """
    grid = _Grid(2, 1, vspace=0.2, titles=("current settings", "all BN layers in eval"))
    data = []
    for row, (preds, color, name) in enumerate(((current, BATCH, "current"),
                                                (reference, RUNNING, "all eval")), start=1):
        grid.axis(row, 1, "y").update(tickfont={"size": 11})
        if not preds:
            grid.axis(row, 1, "x").update(visible=False)
            continue
        top = list(preds[image])[::-1]
        probs = [float(p[2]) for p in top]
        # room on the right for the text outside the longest bar
        grid.axis(row, 1, "x").update(range=[0, max(max(probs), 1e-6) * 1.3],
                                      tickformat=".2~%", nticks=4)
        data.append({"type": "bar", "orientation": "h", "x": probs,
                     "y": _class_names([p[1] for p in top]), "marker": {"color": color},
                     "name": name, "text": [_percent(p) for p in probs],
                     "textposition": "outside", "cliponaxis": False,
                     "textfont": {"size": 11}, "customdata": [p[1] for p in top],
                     "hovertemplate": "%{customdata}: %{x:.3%}<extra></extra>",
                     **grid.refs(row, 1)})
    # room for CLASS_NAME_CHARS characters of 11 px without automargin's second layout
    return _figure(data, grid.layout, f"Top-5 predictions for image {image}", 430, label,
                   legend=False, left=165, bottom=30)


def input_figure(z: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                 label: str = "") -> go.Figure:
    """The network's actual input (after preprocessing), image 0, per colour channel, from
    a :class:`~bnviz.dashboard.InputPreview` (the app draws it before the forward runs)."""
    n = z.shape[0]
    # short titles, far enough apart: in the 300 px sidebar "channel 0channel 1channel 2"
    # ran together
    grid = _Grid(1, n, hspace=0.1, title_size=11, titles=[f"ch {i}" for i in range(n)],
                 bar_room=_bar_room(210, 10))
    data = [_heat(z[i], rows, cols, f"channel {i}", grid.refs(1, i + 1),
                  coloraxis="coloraxis") for i in range(n)]
    _square_axes(grid, n, ticks=False)
    layout = grid.layout
    layout["coloraxis"] = {"colorscale": "Greys_r", "colorbar": _hbar(grid, 1, n)}
    title = "network input (after preprocessing), <br>image 0"  # two lines in the sidebar
    # base64 arrays (plain=False): several times smaller than JSON lists of this many exact
    # values, and this chart only changes with the input, never on a layer, channel or mode
    # change, so the second draw it costs once is cheaper than the bytes
    fig = _figure(data, layout, title + (f"<br>{label}" if label else ""), 210, "",
                  legend=False, plain=False, bottom=10, left=10)
    fig.update_layout(margin_r=10, title_font_size=13)
    return fig


# -- layers that are not images (BatchNorm1d, BatchNorm3d) ------------------------------------


def feature_boxes_figure(layer: LayerView, channel: int | None = None,
                         label: str = "") -> go.Figure:
    """A table's layer (N, C): every feature's values over the batch, before BN, after it
    (and after the activation), as box plots of their exact quantiles (the box: quartiles
    and median; the whiskers: minimum and maximum), with the batch and running means."""
    panels = [("BN input", layer.quantiles_input, REFERENCE),
              ("after BN", layer.quantiles_output, NATIVE)]
    if layer.quantiles_activation is not None:
        panels.append((f"after {layer.activation}", layer.quantiles_activation, MANUAL))
    feats = np.arange(layer.num_features, dtype=np.int32)
    grid = _Grid(len(panels), 1, vspace=0.1, shared_x=True, titles=[p[0] for p in panels])
    data = []
    for row, (name, q, color) in enumerate(panels, start=1):
        q = _f32(q)
        data.append({"type": "box", "x": feats, "lowerfence": q[:, 0], "q1": q[:, 1],
                     "median": q[:, 2], "q3": q[:, 3], "upperfence": q[:, 4], "name": name,
                     "marker": {"color": color}, "line": {"color": color, "width": 1},
                     "boxpoints": False, **grid.refs(row, 1)})
    data.append(_points(feats, layer.batch_mean, "batch mean", BATCH, grid.refs(1, 1)))
    if layer.running_mean_before is not None:
        data.append(_points(feats, layer.running_mean_before, "running mean", RUNNING,
                            grid.refs(1, 1), "diamond", dash="dot"))
    grid.axis(len(panels), 1, "x").update(title={"text": "feature (channel)"})
    if channel is not None:
        for row in range(1, len(panels) + 1):
            grid.vline(int(channel), row, 1, color=HIGHLIGHT, width=1, dash="dot")
    return _figure(data, grid.layout, f"{layer.label}: every feature over the batch of "
                   f"{layer.input_shape[0]} (box: quartiles and median, whiskers: minimum and "
                   "maximum)", 160 + 170 * len(panels), label)


def sequence_map_figure(layer: LayerView, channel: int | None = None,
                        label: str = "") -> go.Figure:
    """A sequence's layer (N, C, L): sample 0 as a channel x position heatmap, before BN,
    after it (and after the activation), each with its own colour bar."""
    panels = [("BN input", layer.map_input), ("after BN", layer.map_output)]
    if layer.map_activation is not None:
        panels.append((f"after {layer.activation}", layer.map_activation))
    chans = np.arange(layer.num_features, dtype=np.int32)
    positions = np.asarray(layer.cols, dtype=np.int32)
    step = int(positions[1] - positions[0]) if len(positions) > 1 else 1
    grid = _Grid(len(panels), 1, vspace=0.12, shared_x=True, titles=[p[0] for p in panels])
    data = []
    for row, (name, maps) in enumerate(panels, start=1):
        y0, y1 = grid.axis(row, 1, "y")["domain"]
        what = name if step == 1 else f"mean {name} of {step} positions"
        data.append({"type": "heatmap", "z": _f32(maps[:, 0, :]), "x": positions,
                     "y": chans, "name": name, "colorscale": HEATMAP_SCALE, "zmid": 0.0,
                     "colorbar": {"thickness": 10, "len": y1 - y0, "lenmode": "fraction",
                                  "y": (y0 + y1) / 2, "yanchor": "middle"},
                     "hovertemplate": "channel %{y}, position %{x}<br>" + what
                                      + " = %{z:.6g}<extra></extra>", **grid.refs(row, 1)})
        grid.axis(row, 1, "y").update(title={"text": "channel"}, autorange="reversed")
        if channel is not None:
            grid.hline(int(channel), row, 1, color=HIGHLIGHT, width=1, dash="dot")
    grid.axis(len(panels), 1, "x").update(title={"text": "position in the sequence"})
    length = layer.input_shape[-1]
    shown = (f"all {length} positions" if step == 1
             else f"{length} positions as means of {step}")
    return _figure(data, grid.layout, f"{layer.label}: sample 0, every channel along the "
                   f"sequence ({shown})", 140 + 200 * len(panels), label, legend=False)


def volume_title(layer: LayerView, what: str) -> str:
    """``<layer>, <what>, sample 0: middle depth slice d = 4 of 8 (16x16)``: a volume's
    maps are one slice, and the title says which."""
    d, h, w = layer.input_shape[2:5]
    return (f"{layer.label}, {what}, sample 0: middle depth slice d = {d // 2} of {d} "
            f"({h}x{w})")


def volume_slice_figure(layer: LayerView, channel: int, label: str = "",
                        **kw: Any) -> go.Figure:
    """A volume's layer (N, C, D, H, W): :func:`feature_map_figure` (``kw``: its options)
    of the middle depth slice of sample 0, titled so."""
    fig = feature_map_figure(layer, channel, label, **kw)
    fig.layout.title.text = wrap_title(titled(volume_title(layer, f"channel {int(channel)}"),
                                              label))
    return fig


def volume_gallery_figure(layer: LayerView, channels: Sequence[int],
                          label: str = "") -> go.Figure:
    """:func:`channel_gallery_figure` (BN input) of a volume's middle depth slice."""
    fig = channel_gallery_figure(layer, channels, "input", label)
    shown = ", ".join(str(int(c)) for c in list(channels)[:8])
    fig.layout.title.text = wrap_title(titled(volume_title(
        layer, f"BN input, channels {shown}"), label))
    return fig
