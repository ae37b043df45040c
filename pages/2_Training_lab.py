"""Training lab: watch BatchNorm's statistics learn, live (sections 2 and 5 of
``docs/stories.md``).

Trains :class:`bnviz.training.SmallCNN` on generated images with native, manual, detached
and frozen BatchNorm side by side (same weights, same batches), and draws the curves while
it trains. Everything shown comes from :func:`bnviz.training.train_lab`; the figures and
tables are pure functions of its result (:mod:`bnviz.training.figures`,
:mod:`bnviz.training.tables`), so a headless run with the same configuration gives the same
numbers. This page only lays out the widgets and places what the core returns.

How it stays live without blocking anyone: Start hands the run to the server's
:class:`bnviz.training.JobBoard`, which trains it in a background thread
(:class:`bnviz.training.TrainingJob`, kept in ``st.session_state``) or queues it while the
server's training slots are taken (``BNVIZ_TRAINING_JOBS``), and returns at once. One run
per session: Start during a run says so instead of restarting it. While the job waits or
runs, a fragment reruns every second for the status line and asks for a full redraw when
the job has published new numbers, at most every ``BNVIZ_TRAINING_REDRAW_S`` seconds
(building the six figures is the costliest part of the page); the display controls work
during a run. Stop sets the job's ``should_stop`` flag: training ends after the current
step, evaluates once more and is marked stopped (a queued job leaves the queue). The job
carries a check that this browser session is still connected, so when the tab is closed
the board stops it within seconds. Jobs never change torch's thread count: they train with
the count the server fixed at start. The finished job stays in the session state: reruns
redraw, they never retrain.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit import runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from ui.chart_preload import preload_chart_code
from ui.errors import report_uncaught, show_unexpected
from ui.navigation import run_through_the_app

st.set_page_config(page_title="bnviz · Training lab", layout="wide")
run_through_the_app()  # named in the page list (ui/navigation.py)
preload_chart_code()  # the browser loads plotly.js while this page imports PyTorch
report_uncaught("running the Training lab")

import torch  # noqa: E402

# The whole package first: a page opened while another session is still importing bnviz
# then waits for that import instead of racing into its submodules (tests/test_imports.py).
import bnviz  # noqa: E402, F401
import bnviz.figures  # noqa: E402, F401 - pandas and PIL.Image before any chart (see there)
from bnviz.devices import available_devices  # noqa: E402
from bnviz.errors import BnvizError  # noqa: E402
from bnviz.settings import settings  # noqa: E402
from bnviz.training import (  # noqa: E402
    LAYERS,
    VARIANT_DESCRIPTIONS,
    VARIANTS,
    TrainConfig,
    TrainingJob,
    TrainResult,
    default_board,
    parse_momenta,
)
from bnviz.training.figures import lab_figures  # noqa: E402
from bnviz.training.tables import final_frame, gradient_frame  # noqa: E402

MOMENTUM_CHOICES = ["0.1", "0.01", "None", "0.3", "0.001"]
BATCH_SIZES = [2, 4, 8, 16, 32, 64, 128]
MAX_STEPS = 3000
JOB_KEY = "tl_job"
# While a job waits or runs the status line refreshes every second; the charts are redrawn
# only when the job has published new numbers, and at most every REDRAW_S seconds (building
# six plotly figures takes CPU time that the training and other sessions would use).
STATUS_REFRESH_S = 1.0
REDRAW_S = settings().training_redraw_s

PERCENT = st.column_config.NumberColumn(format="percent")
FINAL_COLUMNS = {
    "train-batch acc": PERCENT, "val acc, eval mode": PERCENT, "val acc, train mode": PERCENT,
    "train − eval (points)": st.column_config.NumberColumn(format="%+.1f"),
}
SCI = st.column_config.NumberColumn(format="%.2e")


def _height(frame: pd.DataFrame) -> int:
    return 36 * (len(frame) + 1) + 4


# --------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _warm_up_optimizer_imports() -> threading.Thread:
    """Once per server process, in the background: constructing the first torch optimizer
    imports torch._dynamo, which takes seconds. Paying that while the user reads the page
    keeps it out of the first training run."""

    def work() -> None:
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    thread = threading.Thread(target=work, name="bnviz-warm-up", daemon=True)
    thread.start()
    return thread


def _this_session() -> tuple[str, Callable[[], bool]]:
    """This browser session's id, and a check that it is still connected, which the job
    board asks from its own thread (Streamlit's runtime says it is safe on any thread).
    Without a server (bare mode) the session lasts as long as the process."""
    ctx = get_script_run_ctx()
    if ctx is None or not runtime.exists():
        return "bare", lambda: True
    server, session = runtime.get_instance(), ctx.session_id
    return session, lambda: bool(server.is_active_session(session))


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
    # the variant chips (four of them) need the width: in a quarter of the row they were
    # cut off
    c5, c6, c7, c8 = st.columns([3, 2, 1.2, 1.2])
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
        if old is not None and old.active:
            st.warning("A training run is already in progress in this session "
                       + ("(queued)" if old.queued else
                          f"(step {old.latest.steps_done if old.latest else 0} of "
                          f"{old.config.steps})")
                       + ": it goes on. Press **Stop** to end it, then **Start training** "
                         "for the new settings.")
        else:
            session, alive = _this_session()
            try:
                state[JOB_KEY] = default_board().submit(config, owner=session, alive=alive)
            except BnvizError as exc:
                st.error(str(exc))


def _stop_job() -> None:
    job = state.get(JOB_KEY)
    if job is not None:
        job.stop()


current = state.get(JOB_KEY)
st.button("Stop", key="tl_stop", on_click=_stop_job,
          disabled=current is None or not current.active,
          help="Ends the training after its current step and keeps what it has learned "
               "(a queued run leaves the queue).")

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
        else:  # a bug, not the settings: no traceback for the student, the log has it
            show_unexpected(job.error, "training")
        return
    if job.queued:
        ahead = job.ahead
        st.info(("Queued: next in line" if ahead == 0 else f"Queued: {ahead} ahead")
                + f". This server trains {default_board().limit} run(s) at a time; yours "
                  "starts when one ends. Press Stop to leave the queue.")
        return
    if job.cancelled:
        st.warning("Left the queue before training started.")
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


def drawn(job: TrainingJob | None) -> dict | None:
    """What this run draws: a snapshot of the job and its figures (``state["tl_drawn"]``).

    The figures are rebuilt only when the job has published new numbers (its ``version``
    changed), and while it trains at most every REDRAW_S seconds: until then the previous
    snapshot is drawn again, verdict and tables included, so they always match the charts.
    A change of the display controls, and the job's end, redraw at once."""
    if job is None or job.error is not None:
        return None
    version, result = job.versioned_latest()
    if result is None:
        return None
    key = (layer, tuple(sorted(channels)))
    now = time.perf_counter()
    last = state.get("tl_drawn")
    if last is not None and last["job"] is job and last["key"] == key and (
            last["version"] == version
            or (job.running and now - last["at"] < REDRAW_S)):
        return last
    state["tl_drawn"] = {"job": job, "key": key, "version": version, "result": result,
                         "figures": lab_figures(result, layer, channels), "at": now}
    return state["tl_drawn"]


def render_body(shown: dict | None) -> None:
    """Verdict, tables and charts of the drawn snapshot."""
    if shown is None:
        return
    result: TrainResult = shown["result"]
    figs: dict[str, go.Figure | None] = shown["figures"]
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
    """The status line; while a job waits or runs this is a fragment rerun every second,
    which asks for a full redraw when the job has published numbers newer than those drawn
    (at most every REDRAW_S) and once more when it has ended."""
    report_uncaught("running the Training lab")  # a fragment's rerun is a run of its own
    job = state.get(JOB_KEY)
    render_status(job)
    if not state.get("tl_polling"):
        return
    if job is None or not job.active:
        state["tl_polling"] = False
        st.rerun()  # final charts, Stop disabled
    last = state.get("tl_drawn")
    if last is None or last["job"] is not job:  # nothing of this job drawn yet
        drawn_version, since = 0, float("inf")
    else:
        drawn_version, since = last["version"], time.perf_counter() - last["at"]
    if job.version != drawn_version and since >= REDRAW_S:
        st.rerun()


# What this full run draws is settled before the status fragment (which also runs inline
# right now) compares the job's numbers against it.
shown = drawn(current)
if current is not None and current.active:
    state["tl_polling"] = True
    st.fragment(run_every=STATUS_REFRESH_S)(status_view)()
else:
    state["tl_polling"] = False
    status_view()
render_body(shown)
