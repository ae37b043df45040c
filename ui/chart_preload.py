"""Start loading the browser's chart code before a page imports PyTorch.

Shared by every page of the dashboard (``app.py`` and ``pages/``). It lives next to them,
not in :mod:`bnviz`: importing anything from the package imports PyTorch (seconds in a
fresh process), and the point is to run *before* that.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st


def preload_chart_code() -> None:
    """Have the browser fetch and run Streamlit's plotly.js chunk *now*, before this script
    imports PyTorch, instead of when the first chart arrives.

    Streamlit's frontend loads its chart component (plotly.js, several MB) lazily, on the
    first plotly element it is sent. That element comes only after the script has imported
    torch and loaded the model and the stimulus, and only then would the browser spend its
    time evaluating plotly.js. A dynamic ``import()`` of the same chunk URL now runs that
    work while the browser would otherwise wait for the imports; the real chart later finds
    the module already loaded (one URL, one module instance). It draws nothing. (What it
    saves on a cold start: docs/dashboard.md.)

    If a Streamlit upgrade renames the chunk, nothing is preloaded and nothing breaks
    (``tests/test_app.py`` checks the chunk exists, so the loss would be noticed).

    Call it right after ``st.set_page_config`` and before importing torch or bnviz.
    """
    chunk = plotly_chunk_name()
    if chunk is None:
        return
    grid = grid_chunk_name()
    later = "" if grid is None else GRID_LATER_JS.replace("GRID", grid)
    # Resolved against Streamlit's own entry script, so it also works under a base URL path.
    st.html(
        "<script>(() => { const entry = document.querySelector("
        "'script[type=\"module\"][src*=\"/static/js/index.\"]');"
        f" if (!entry) return; import(new URL('./{chunk}', entry.src).href).catch(() => {{}});"
        f"{later} }})();"
        "</script>",
        unsafe_allow_javascript=True,
    )


#: Streamlit's table grid (st.dataframe / st.data_editor: a large chunk of JavaScript with
#: its Arrow code) is not on the first page any more: load it once the page has been idle
#: for 2 s with a chart on it (the charts are drawn and being read), when the browser has
#: nothing else to do, once per page.
GRID_LATER_JS = (
    " if (window.__bnvizGridCode) return; window.__bnvizGridCode = true;"
    " const drawn = () => document.querySelector('[data-testid=\"stPlotlyChart\"] .main-svg')"
    " && !document.querySelector('[data-testid=\"stStatusWidget\"]');"
    " const load = () => import(new URL('./GRID', entry.src).href).catch(() => {});"
    " let calm = 0; const poll = () => { calm = drawn() ? calm + 1 : 0;"
    " if (calm >= 4) { if (window.requestIdleCallback) requestIdleCallback(load, {timeout: 2000});"
    " else setTimeout(load, 0); }"
    " else { setTimeout(poll, 500); } }; setTimeout(poll, 500);"
)


def plotly_chunk_name() -> str | None:
    """File name of the frontend chunk holding Streamlit's plotly chart (hashed per release)."""
    return _chunk("PlotlyChart")


def grid_chunk_name() -> str | None:
    """File name of the frontend chunk holding Streamlit's table grid (hashed per release)."""
    return _chunk("DataFrame")


def _chunk(stem: str) -> str | None:
    js = Path(st.__file__).parent / "static" / "static" / "js"
    found = sorted(js.glob(f"{stem}.*.js"))
    return found[0].name if found else None
