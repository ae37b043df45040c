"""Training lab: watch BatchNorm's statistics learn, live (USER_STORIES.md sections 2 and 5).

Trains :class:`bnviz.training.SmallCNN` on generated images with native, manual, detached
and frozen BatchNorm side by side (same weights, same batches), and draws the curves while
it trains. Everything shown comes from :func:`bnviz.training.train_lab`; the figures below
are pure functions of its result, so a headless run with the same configuration gives the
same numbers.

How it stays live without blocking anyone: Start launches a
:class:`bnviz.training.TrainingJob`, i.e. ``train_lab`` in a background thread owned by this
browser session (kept in ``st.session_state``), and returns at once. While the job runs, a
fragment reruns every second and redraws the charts from the job's latest snapshot; the
rest of the page stays responsive (the display controls work during a run). Stop sets the
job's ``should_stop`` flag: training ends after the current step, evaluates once more and
is marked stopped. torch releases the GIL inside its ops and each job trains with one CPU
thread (``TrainConfig.threads``), so the jobs of several sessions share the cores instead of
stalling each other. The finished job stays in the session state: reruns redraw, they never
retrain.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from chart_preload import preload_chart_code

st.set_page_config(page_title="bnviz · Training lab", layout="wide")
preload_chart_code()  # the browser loads plotly.js while this page imports PyTorch

import torch  # noqa: E402

# The whole package first: a page opened while another session is still importing bnviz
# then waits for that import instead of racing into its submodules (tests/test_imports.py).
import bnviz  # noqa: E402, F401
from bnviz.devices import available_devices  # noqa: E402
from bnviz.errors import BnvizError  # noqa: E402
from bnviz.training import (  # noqa: E402
    LAYERS,
    VARIANT_DESCRIPTIONS,
    VARIANTS,
    TrainConfig,
    TrainingJob,
    TrainResult,
    parse_momenta,
)

COLORS = {"native": "#1f77b4", "manual": "#2ca02c", "detached": "#d62728", "frozen": "#9467bd"}
# manual lies on top of native when all is well: dashed, so both stay visible.
DASH = {"manual": "dash"}
MOMENTUM_COLORS = {"0.1": "#ff7f0e", "0.01": "#17becf", "None": "#8c564b", "0.3": "#e377c2",
                   "0.001": "#bcbd22"}
MOMENTUM_CHOICES = ["0.1", "0.01", "None", "0.3", "0.001"]
BATCH_SIZES = [2, 4, 8, 16, 32, 64, 128]
MAX_STEPS = 3000
JOB_KEY = "tl_job"
# While a job runs the status line refreshes every second; the charts are redrawn when the
# job has published new numbers, at most every two seconds (building and validating six
# plotly figures costs a few hundred ms of CPU that the training would otherwise use).
STATUS_REFRESH_S = 1.0
CHARTS_REFRESH_S = 2.0


# --------------------------------------------------------------------------------------
# Figures: pure functions of a TrainResult
# --------------------------------------------------------------------------------------


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 340) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", y=-0.22), hovermode="x unified")
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y)
    return fig


def _arr(values) -> np.ndarray:
    """Plotly validates numpy arrays much faster than lists (and sends them as binary)."""
    return np.asarray(values, dtype=np.float64)


def _figure(traces: list[go.Scatter]) -> go.Figure:
    fig = go.Figure()
    fig.add_traces(traces)  # one batched call: far cheaper than one add_trace per line
    return fig


def fig_loss(result: TrainResult) -> go.Figure:
    fig = _figure([go.Scatter(x=_arr(h.step), y=_arr(h.loss), name=v, mode="lines",
                              line=dict(color=COLORS[v], width=1.5, dash=DASH.get(v)))
                   for v, h in result.histories.items()])
    return _layout(fig, "Training loss (cross-entropy of each step's batch)", "step", "loss")


def fig_val_acc(result: TrainResult) -> go.Figure:
    fig = _figure([go.Scatter(x=_arr(h.eval_step), y=_arr(h.val_acc_eval), name=v,
                              mode="lines+markers", line=dict(color=COLORS[v], dash=DASH.get(v)))
                   for v, h in result.histories.items()])
    fig.add_hline(y=result.chance, line_dash="dot", line_color="gray",
                  annotation_text=f"chance {result.chance:.0%}")
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "Validation accuracy, eval mode (running statistics)", "step",
                   "accuracy")


def fig_train_eval(result: TrainResult) -> go.Figure:
    traces = []
    for v, h in result.histories.items():
        traces.append(go.Scatter(x=_arr(h.eval_step), y=_arr(h.val_acc_eval),
                                 name=f"{v} eval mode", mode="lines",
                                 line=dict(color=COLORS[v])))
        traces.append(go.Scatter(x=_arr(h.eval_step), y=_arr(h.val_acc_train),
                                 name=f"{v} train mode", mode="lines",
                                 line=dict(color=COLORS[v], dash="dot")))
    fig = _figure(traces)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return _layout(fig, "Validation accuracy: train mode (dotted) vs eval mode (solid)", "step",
                   "accuracy")


def fig_weight_norm(result: TrainResult) -> go.Figure:
    fig = _figure([go.Scatter(x=_arr(h.eval_step), y=_arr(h.conv_weight_norm), name=v,
                              mode="lines+markers", line=dict(color=COLORS[v]))
                   for v, h in result.histories.items()])
    return _layout(fig, "Norm of all conv weights", "step", "‖W‖₂")


def fig_running(result: TrainResult, layer: str, channels: list[int]) -> go.Figure | None:
    trace = result.traces.get(layer)
    if trace is None or not trace.batch_mean:
        return None
    steps = np.arange(1, len(trace.batch_mean) + 1)
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
    return _layout(fig, "Running statistics (lines) vs each step's batch statistics (dots); "
                        "variance: unbiased, as the running update uses", "step", "",
                   height=260 * len(channels) + 80)


def fig_momentum_acc(result: TrainResult) -> go.Figure | None:
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
    return _layout(fig, f"Native network, validation accuracy: eval mode with each momentum's "
                        f"running statistics vs train mode (batch size "
                        f"{result.config.batch_size})", "step", "accuracy")


PERCENT = st.column_config.NumberColumn(format="percent")
FINAL_COLUMNS = {
    "train-batch acc": PERCENT, "val acc, eval mode": PERCENT, "val acc, train mode": PERCENT,
    "train − eval (points)": st.column_config.NumberColumn(format="%+.1f"),
}
SCI = st.column_config.NumberColumn(format="%.2e")


def _height(frame: pd.DataFrame) -> int:
    return 36 * (len(frame) + 1) + 4


def final_frame(result: TrainResult) -> pd.DataFrame:
    rows = [{"variant": r["variant"], "what it is": VARIANT_DESCRIPTIONS[r["variant"]],
             f"loss (mean of last {result.window} steps)": r["loss"],
             "train-batch acc": r["train_acc"], "val acc, eval mode": r["val_acc_eval"],
             "val acc, train mode": r["val_acc_train"],
             "train − eval (points)": None if r["train_minus_eval"] is None
             else 100 * r["train_minus_eval"]} for r in result.final_rows()]
    return pd.DataFrame(rows)


def gradient_frame(result: TrainResult) -> pd.DataFrame | None:
    if result.gradient is None:
        return None
    return pd.DataFrame(result.gradient.rows).rename(columns={
        "native_norm": "‖grad‖ native", "manual_max_abs_diff": "manual: max |Δ|",
        "manual_rel_diff": "manual: relative Δ", "detached_max_abs_diff": "detached: max |Δ|",
        "detached_rel_diff": "detached: relative Δ"})


# --------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _warm_up_optimizer_imports() -> threading.Thread:
    """Once per server process, in the background: constructing the first torch optimizer
    imports torch._dynamo (about 2 s of CPU). Paying that while the user reads the page
    keeps it out of the first training run."""

    def work() -> None:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    thread = threading.Thread(target=work, name="bnviz-warm-up", daemon=True)
    thread.start()
    return thread


_warm_up_optimizer_imports()
st.title("Training lab: watch BatchNorm learn")
st.markdown(
    "A small CNN (three conv → BatchNorm → ReLU blocks, then a linear layer) learns to tell "
    "six kinds of generated images apart: gratings at 0°, 45°, 90°, 135°, checkerboards and "
    "rings, with random frequency, phase, contrast, brightness and pixel noise. It is trained "
    "once per BatchNorm variant, **from the same initial weights on the same batches**, so "
    "any difference between the curves is caused by BatchNorm alone: "
    + "; ".join(f"**{v}**: {d}" for v, d in VARIANT_DESCRIPTIONS.items()) + ". "
    "The default run takes about 10 seconds on a 2-core CPU (longer on a busy machine); the "
    "charts update while it trains."
)

state = st.session_state
defaults = TrainConfig()
with st.form("tl_controls"):
    c1, c2, c3, c4 = st.columns(4)
    steps = c1.number_input("Steps", 1, MAX_STEPS, defaults.steps, step=50, key="tl_steps")
    batch_size = c2.select_slider("Batch size", BATCH_SIZES, defaults.batch_size,
                                  key="tl_batch",
                                  help="Small batches make batch statistics noisy and the "
                                       "train-mode vs eval-mode gap visible.")
    lr = c3.number_input("Learning rate (SGD, momentum 0.9)", 0.0001, 1.0, defaults.lr,
                         step=0.005, format="%.4f", key="tl_lr")
    seed = c4.number_input("Seed", 0, 1_000_000, defaults.seed, key="tl_seed")
    c5, c6, c7, c8 = st.columns(4)
    variants = c5.multiselect("BatchNorm variants", list(VARIANTS), list(defaults.variants),
                              key="tl_variants")
    momenta = c6.multiselect("Momenta to study (None = cumulative average)", MOMENTUM_CHOICES,
                             ["0.1", "0.01", "None"], key="tl_momenta")
    eval_every = c7.number_input("Evaluate every N steps", 1, 1000, defaults.eval_every,
                                 key="tl_eval_every",
                                 help="Validation accuracies and the live charts are updated "
                                      "at these steps.")
    device = c8.selectbox("Device", available_devices(), key="tl_device")
    start = st.form_submit_button("Start training", type="primary")

if start:
    try:
        config = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                             seed=int(seed), variants=tuple(variants),
                             momenta=parse_momenta(momenta), eval_every=int(eval_every),
                             device=device).validated()
    except BnvizError as exc:
        st.error(str(exc))
    else:
        old = state.get(JOB_KEY)
        if old is not None and old.running:
            old.stop()
        state[JOB_KEY] = TrainingJob(config).start()


def _stop_job() -> None:
    job = state.get(JOB_KEY)
    if job is not None:
        job.stop()


current = state.get(JOB_KEY)
st.button("Stop", key="tl_stop", on_click=_stop_job,
          disabled=current is None or not current.running,
          help="Ends the training after its current step and keeps what it has learned.")

d1, d2 = st.columns(2)
layer = d1.selectbox("BatchNorm layer for the running-statistics charts", list(LAYERS),
                     LAYERS.index(defaults.layer), key="tl_layer",
                     help="Display only: every layer and channel is recorded, so changing "
                          "this never retrains (it also works during a run).")
width = defaults.widths[LAYERS.index(layer)]
channels = d2.multiselect(f"Channels of {layer}", list(range(width)),
                          [c for c in defaults.channels if c < width], key="tl_channels",
                          max_selections=4)


def render_status(job: TrainingJob | None) -> None:
    """One status line: how far the session's job is, or how it ended."""
    if job is None:
        st.info("Choose the settings and press **Start training**.")
        return
    if job.error is not None:
        if isinstance(job.error, BnvizError):
            st.error(str(job.error))
        else:
            st.exception(job.error)
        return
    result = job.latest
    if job.running or result is None:
        done = result.steps_done if result is not None else 0
        st.info(f"Training… step {done} of {job.config.steps} "
                f"({time.perf_counter() - job.started:.1f} s)"
                + (". Stopping…" if job.stop_requested else ". Press Stop to end it here."))
    elif result.status == "stopped":
        st.warning(f"Stopped at step {result.steps_done} of {result.config.steps} after "
                   f"{result.elapsed_s:.1f} s. Curves and numbers are those of that step.")
    else:
        st.success(f"Finished {result.steps_done} steps in {result.elapsed_s:.1f} s on "
                   f"{result.device}.")


def build_figures(result: TrainResult) -> dict[str, go.Figure | None]:
    """The page's figures for the job's latest snapshot, rebuilt only when it changed."""
    key = (layer, tuple(sorted(channels)))
    cached = state.get("tl_figures")  # (snapshot, key, figures): one snapshot object per update
    if cached is not None and cached[0] is result and cached[1] == key:
        return cached[2]
    figs = {
        "loss": fig_loss(result), "acc": fig_val_acc(result), "gap": fig_train_eval(result),
        "norm": fig_weight_norm(result), "momentum": fig_momentum_acc(result),
        "running": fig_running(result, layer, sorted(channels)) if channels else None,
    }
    state["tl_figures"] = (result, key, figs)
    return figs


def render_body(job: TrainingJob | None) -> None:
    """Verdict, tables and charts of the job's latest snapshot."""
    result = job.latest if job is not None and job.error is None else None
    if result is None:
        return
    figs = build_figures(result)
    st.markdown("**What the numbers say**\n\n"
                + "\n".join(f"- {line}" for line in result.verdict))
    frame = final_frame(result)
    columns = dict(FINAL_COLUMNS)
    columns[frame.columns[2]] = st.column_config.NumberColumn(format="%.3f")
    st.dataframe(frame, hide_index=True, width="stretch", column_config=columns,
                 height=_height(frame))

    st.subheader("Loss and accuracy")
    st.caption(
        "Left: the loss of each step's training batch. Native and manual (dashed) should lie "
        "on top of each other (same formula, same gradients); detached has the same forward "
        "pass but different gradients, so it follows a different path. Right: accuracy on "
        "held-out images with the network in eval mode, i.e. what you would deploy; the "
        "dotted line is chance.")
    col_a, col_b = st.columns(2)
    col_a.plotly_chart(figs["loss"], key="tl_fig_loss")
    col_b.plotly_chart(figs["acc"], key="tl_fig_acc")

    st.subheader("Train mode vs eval mode")
    st.caption(
        "The same validation images, classified with BatchNorm in train mode (each layer "
        "normalises with the statistics of a validation batch of the training batch size) "
        "and in eval mode (running statistics). A gap means the running statistics do not "
        "describe what the network now computes: they lag behind the weights, or small "
        "batches make batch statistics noisy. Frozen BN trained with its running "
        "statistics, so for it train mode is the unfamiliar one.")
    col_c, col_d = st.columns(2)
    col_c.plotly_chart(figs["gap"], key="tl_fig_gap")
    col_d.plotly_chart(figs["norm"], key="tl_fig_norm")
    col_d.caption(
        "Why detached statistics hurt: without the gradient through the mean and variance, "
        "updates also push the weights along directions that the normalisation cancels, so "
        "the conv weights tend to grow while the loss improves little.")

    st.subheader(f"Running statistics of {layer} for each momentum")
    st.caption(
        "Every step the native network's BatchNorm input is also fed to BatchNorm layers "
        "built with each momentum (in train mode the running statistics never affect the "
        "output, so the network trains exactly as it would with any of them). Dots: that "
        "step's batch mean and unbiased variance per channel. Lines: running = "
        "(1 − momentum)·running + momentum·batch, starting from mean 0 and variance 1; "
        "momentum None is the cumulative average of all batches so far (factor "
        "1/num_batches_tracked), so early batches of the untrained network still weigh in.")
    if figs["running"] is not None:
        st.plotly_chart(figs["running"], key="tl_fig_running")
    elif not result.config.momenta:
        st.info("No momentum selected: the running-statistics study is off.")
    else:
        st.info("Select at least one channel to see its running statistics.")
    if figs["momentum"] is not None:
        st.plotly_chart(figs["momentum"], key="tl_fig_momentum")

    st.subheader("Gradient check: one batch, identical weights")
    st.caption(
        "One forward and backward pass of the first training batch. Manual BN differs from "
        "native only by float rounding; detached BN produces the same logits but different "
        "gradients for everything before the last BatchNorm (the last BN's weight and bias "
        "and the linear layer get the same gradients: they only see the identical forward "
        "values).")
    grads = gradient_frame(result)
    if grads is None:
        st.info("The gradient check needs the native variant and manual or detached.")
        return
    g = result.gradient
    st.dataframe(grads, hide_index=True, width="stretch", height=_height(grads),
                 column_config={c: SCI for c in grads.columns if c != "parameter"})
    st.caption(
        f"Whole parameter gradient vs native: manual relative difference "
        f"{g.grad_rel_diff['manual']:.1e}; detached {g.grad_rel_diff['detached']:.2f} "
        f"(cosine similarity {g.grad_cosine['detached']:.2f}); max |Δ logits|: manual "
        f"{g.forward_max_abs_diff['manual']:.1e}, detached "
        f"{g.forward_max_abs_diff['detached']:.1e}.")


def status_view() -> None:
    """The status line; while a job runs this is a fragment rerun every second, which asks
    for a full redraw when the job has published new numbers (at most every
    CHARTS_REFRESH_S) and once more when it has ended."""
    job = state.get(JOB_KEY)
    render_status(job)
    if not state.get("tl_polling"):
        return
    if job is None or not job.running:
        state["tl_polling"] = False
        st.rerun()  # final charts, Stop disabled
    elif (job.version != state.get("tl_drawn_version")
          and time.perf_counter() - state.get("tl_drawn_at", 0.0) >= CHARTS_REFRESH_S):
        st.rerun()


if current is not None:
    # This full run draws the charts: note what it draws before the status fragment (which
    # also runs inline right now) compares against it. The version is read before the
    # snapshot, so it is never newer than what is drawn.
    state["tl_drawn_version"] = current.version
    state["tl_drawn_at"] = time.perf_counter()
if current is not None and current.running:
    state["tl_polling"] = True
    st.fragment(run_every=STATUS_REFRESH_S)(status_view)()
else:
    state["tl_polling"] = False
    status_view()
render_body(current)
