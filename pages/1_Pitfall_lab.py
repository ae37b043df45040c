"""Pitfall lab: the classic BatchNorm confusions, reproduced live on real networks.

The page is generic: it lists every experiment of :data:`bnviz.pitfalls.EXPERIMENTS` and, for
the selected one (``?experiment=<name>``, with its settings under their ``run()`` keywords:
``&model=resnet18&layer=bn1``), shows the story, the plain-language explanation,
the experiment's controls (drawn by :mod:`bnviz.pitfalls.controls`), a verdict computed from
PyTorch's own numbers, the table and the figures. Runs are cached per (experiment, settings)
with ``st.cache_data`` so revisiting is instant. The explainer (experiment 1) additionally
diagnoses an output the user computed themselves.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st

from ui.chart_preload import preload_chart_code
from ui.errors import report_uncaught
from ui.navigation import run_through_the_app

st.set_page_config(page_title="bnviz · Pitfall lab", layout="wide")
run_through_the_app()  # named in the page list (ui/navigation.py)
preload_chart_code()  # the browser loads plotly.js while this page imports PyTorch
report_uncaught("running the Pitfall lab")

# The whole package first: a page opened while another session is still importing bnviz
# then waits for that import instead of racing into its submodules (tests/test_imports.py).
import bnviz  # noqa: E402, F401
import bnviz.figures  # noqa: E402, F401 - pandas and PIL.Image before any chart (see there)
from bnviz.dashboard.literal import literal, message, plain  # noqa: E402
from bnviz.dashboard.texts import format_momentum  # noqa: E402
from bnviz.errors import BnvizError  # noqa: E402
from bnviz.pitfalls import REGISTRY  # noqa: E402
from bnviz.pitfalls.controls import UrlSettings, draw_controls, settings_query  # noqa: E402


@st.cache_data(show_spinner=False, max_entries=64)
def run_cached(name: str, kwargs: dict):
    """One experiment run; cached on its name and settings (results are plain data)."""
    return REGISTRY[name].run(**kwargs)


def display_frame(rows: list[dict]) -> pd.DataFrame:
    """The result table, with mixed-type or nested cells turned into text (Arrow-safe)."""
    frame = pd.DataFrame(rows)
    for col in frame.columns:
        values = [v for v in frame[col] if v is not None and not (isinstance(v, float) and
                                                                  np.isnan(v))]
        kinds = {type(v) for v in values}
        nested = any(isinstance(v, (list, dict, tuple)) for v in values)
        if nested or (len(kinds) > 1 and not kinds <= {int, float}):
            frame[col] = [None if v is None else str(v) for v in frame[col]]
    return frame


def show_verdict(result) -> None:
    box = st.success if result.reproduced else st.info
    box(f"**Verdict.** {result.verdict}")
    facts = [f"{k}: **{v}**" for k, v in
             (("model", result.model), ("weights", result.weights), ("device", result.device))
             if v]
    if facts:
        st.caption(" · ".join(facts))
    if result.weights and "random init" in str(result.weights):
        st.caption("Random init: pretrained weights for this model are not available here "
                   "(offline). The effect shown does not depend on the weights.")


def show_result(name: str, experiment, result) -> None:
    show_verdict(result)
    st.dataframe(display_frame(result.table), hide_index=True)
    for i, fig in enumerate(experiment.figures(result)):
        st.plotly_chart(fig, key=f"{name}:figure:{i}")
    st.download_button("Download result (JSON)", result.to_json(),
                       file_name=f"bnviz-pitfall-{name}.json", mime="application/json",
                       key=f"{name}:json")


def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def user_output_section(experiment, kwargs: dict, result) -> None:
    """Experiment 1: upload your own output and learn which formula produced it."""
    from bnviz.pitfalls.user_output import load_user_output

    st.subheader("Why doesn't *my* manual BN match?")
    data = result.data
    shape = tuple(data["output_shape"])
    st.markdown(
        f"1. Download the input of **{data['layer']}** (the conv output it normalises, shape "
        f"`{tuple(data['input_shape'])}`) for the settings above.\n"
        "2. Apply your own BatchNorm formula to it (the layer's parameters are below).\n"
        f"3. Upload the result as `.npy` (np.save) or `.csv`: the whole output `{shape}`, "
        f"one image `{shape[1:]}` or one channel map `{shape[2:]}` (image 0, channel "
        f"{data['channel']}). bnviz says which formula explains it."
    )
    st.download_button("Download the layer input (.npy)", npy_bytes(result.arrays["input"]),
                       file_name=f"bnviz-{data['layer']}-input.npy",
                       mime="application/octet-stream", key="explain:input-npy")
    with st.expander(f"Layer parameters for channel {data['channel']}"):
        momentum = data["momentum"]  # 0.01, not 0.010000000000000009 (1 - 0.99)
        st.json({"eps": data["eps"],
                 "momentum": None if momentum is None else float(format_momentum(momentum)),
                 **data["channel_params"]})
    upload = st.file_uploader("Your output (.npy or .csv)", type=["npy", "csv", "txt"],
                              key="explain:upload")
    if upload is None:
        return
    try:
        array = load_user_output(upload.getvalue(), upload.name)
        mine = run_cached("explain", {**kwargs, "user_output": array})
    except BnvizError as exc:  # it may quote the file's name: shown as typed, never rendered
        st.error(message(str(exc), [upload.name]))
        return
    user = mine.data["user"]
    box = st.success if user["explained_by"] else st.warning
    box(f"**Your output.** {user['verdict']}")
    cols = ["candidate", "yours_rel_err", "explains_yours", "matches"]
    st.dataframe(display_frame([{c: r.get(c) for c in cols} for r in mine.table]),
                 hide_index=True)
    for i, fig in enumerate(experiment.figures(mine)[1:]):
        st.plotly_chart(fig, key=f"explain:user-figure:{i}")


st.title("Pitfall lab")
st.markdown(
    "The classic BatchNorm confusions, reproduced on real networks. Every verdict below is "
    "computed live from PyTorch's own numbers; pick an experiment, change its settings, and "
    "watch the numbers change."
)

names = list(REGISTRY)
# The experiment and its settings live in the address: a link (the main page's "Why
# doesn't my manual BN match?", say) opens them, and every change is written back.
given = st.query_params.to_dict()
wanted = given.get("experiment")
if "pitfall:experiment" not in st.session_state and wanted is not None:
    if wanted in names:
        st.session_state["pitfall:experiment"] = wanted
    else:
        st.warning(f"Ignored link parameter experiment={literal(wanted)} (use one of "
                   f"{plain(', '.join(names))}); showing {literal(names[0])}.")


def experiment_changed() -> None:
    """Another experiment: its own settings start from their defaults, not from the link's."""
    st.query_params.clear()


name = st.selectbox(
    "Experiment", names, on_change=experiment_changed,
    format_func=lambda n: f"{names.index(n) + 1}. {REGISTRY[n].title}  ({n})",
    key="pitfall:experiment",
)
experiment = REGISTRY[name]
st.header(experiment.title)
st.markdown(f"> {experiment.story}")
st.markdown(experiment.explanation)

url = UrlSettings({k: v for k, v in given.items() if k != "experiment"}, st.session_state)
# Open when the session started from a link with settings (the main page's explain link):
# fixed for the session, since the page writes its settings into the address on every run.
st.session_state.setdefault("pitfall:linked", bool(url.given))
with st.expander("Settings", expanded=st.session_state["pitfall:linked"]):
    try:
        kwargs = draw_controls(st, name, experiment.page, url)
    except BnvizError as exc:
        st.error(str(exc))
        kwargs = {}
for keyword, text, why in url.ignored:
    st.warning(f"Ignored link parameter {plain(keyword)}={literal(text)} ({plain(why)}); "
               "using the default.")
address = {"experiment": name, **settings_query(kwargs)}
if st.query_params.to_dict() != address:
    st.query_params.from_dict(address)

try:
    with st.spinner(f"Running '{experiment.title}' ..."):
        result = run_cached(name, kwargs)
except BnvizError as exc:
    st.error(str(exc))
    st.stop()

show_result(name, experiment, result)
if name == "explain":
    st.divider()
    user_output_section(experiment, kwargs, result)
