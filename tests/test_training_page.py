"""The Training lab page (pages/2_Training_lab.py), headless with Streamlit's AppTest.

A short configuration is entered through the widgets and trained; the charts must carry
exactly the numbers of a headless :func:`bnviz.training.train_lab` run with the same
configuration. A real-browser test checks the live updates and the Stop button, which
AppTest cannot exercise (it runs the script synchronously).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import bnviz.training.job as training_job
from bnviz.training import TrainConfig, train_lab

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "2_Training_lab.py")
CONFIG = dict(steps=24, batch_size=16, eval_every=8, seed=3, lr=0.02, device="cpu")


def _values(v):
    """Plotly JSON data: a list, or a typed array {"dtype", "bdata", "shape"}."""
    if isinstance(v, dict) and "bdata" in v:
        arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return arr.reshape(v["shape"]) if "shape" in v and isinstance(v["shape"], list) \
            else arr
    return np.asarray(v)


def _figures(at) -> dict[str, dict]:
    out = {}
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        out[spec["layout"]["title"]["text"]] = spec
    return out


def _trace(fig: dict, name: str, nth: int = 0) -> dict:
    return [t for t in fig["data"] if t.get("name") == name][nth]


def _fig(figs: dict, prefix: str) -> dict:
    (match,) = [f for title, f in figs.items() if title.startswith(prefix)]
    return match


def _start(at: AppTest, **overrides) -> AppTest:
    cfg = {**CONFIG, **overrides}
    at.number_input(key="tl_steps").set_value(cfg["steps"])
    at.select_slider(key="tl_batch").set_value(cfg["batch_size"])
    at.number_input(key="tl_eval_every").set_value(cfg["eval_every"])
    at.number_input(key="tl_seed").set_value(cfg["seed"])
    at.number_input(key="tl_lr").set_value(cfg["lr"])
    if "variants" in overrides:
        at.multiselect(key="tl_variants").set_value(list(overrides["variants"]))
    [start] = [b for b in at.button if b.label == "Start training"]
    return start.click().run()


def _finish(at: AppTest) -> AppTest:
    """Wait for the session's training job, then rerun the page (the browser's fragment
    would do this by itself every second)."""
    job = at.session_state["tl_job"]
    assert job.join(timeout=120)
    return at.run()


@pytest.fixture(scope="module")
def headless():
    return train_lab(TrainConfig(**CONFIG))


@pytest.fixture
def counted(monkeypatch):
    """Count train_lab calls made through the page's training job."""
    calls = []
    real = training_job.train_lab

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(training_job, "train_lab", wrapper)
    return calls


def test_page_loads_with_controls():
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    assert {b.label for b in at.button} >= {"Start training", "Stop"}
    assert at.button(key="tl_stop").disabled  # nothing to stop yet
    assert "Start training" in at.info[0].value
    assert not at.get("plotly_chart")


def test_short_run_charts_match_headless(headless, counted):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at = _start(at)
    assert not at.exception, at.exception
    at = _finish(at)
    assert not at.exception, at.exception
    assert len(counted) == 1
    assert at.success[0].value.startswith("Finished 24 steps")
    assert at.button(key="tl_stop").disabled
    figs = _figures(at)
    assert len(figs) == 6
    loss = _fig(figs, "Training loss")
    for variant, hist in headless.histories.items():
        np.testing.assert_array_equal(_values(_trace(loss, variant)["y"]), hist.loss)
        np.testing.assert_array_equal(_values(_trace(loss, variant)["x"]), hist.step)
    acc = _fig(figs, "Validation accuracy, eval mode")
    np.testing.assert_array_equal(_values(_trace(acc, "native")["y"]),
                                  headless.histories["native"].val_acc_eval)
    gap = _fig(figs, "Validation accuracy: train mode")
    np.testing.assert_array_equal(_values(_trace(gap, "detached train mode")["y"]),
                                  headless.histories["detached"].val_acc_train)
    norms = _fig(figs, "Norm of all conv weights")
    np.testing.assert_allclose(_values(_trace(norms, "detached")["y"]),
                               headless.histories["detached"].conv_weight_norm, rtol=1e-12)
    running = _fig(figs, "Running statistics")
    trace = headless.traces["bn2"]
    # Channel 0 comes first: mean panel, then variance panel.
    np.testing.assert_allclose(_values(_trace(running, "momentum None")["y"]),
                               trace.stacked("running_mean", "None")[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(_values(_trace(running, "batch statistic")["y"]),
                               trace.stacked("batch_mean")[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(_values(_trace(running, "momentum 0.01", 1)["y"]),
                               trace.stacked("running_var", "0.01")[:, 0].numpy(), rtol=1e-6)
    mom = _fig(figs, "Native network, validation accuracy")
    np.testing.assert_array_equal(_values(_trace(mom, "eval mode, momentum 0.01")["y"]),
                                  headless.momentum_val_acc_eval["0.01"])
    # The verdict and the tables are the headless ones.
    text = "\n".join(m.value for m in at.markdown)
    for line in headless.verdict:
        assert line in text
    final = at.dataframe[0].value
    assert list(final["variant"]) == list(headless.histories)
    np.testing.assert_allclose(final["val acc, eval mode"],
                               [r["val_acc_eval"] for r in headless.final_rows()])
    grads = at.dataframe[1].value
    row = grads[grads["parameter"] == "conv1.weight"].iloc[0]
    expect = [r for r in headless.gradient.rows if r["parameter"] == "conv1.weight"][0]
    assert row["detached: relative Δ"] == pytest.approx(expect["detached_rel_diff"])

    # A display-only change reruns from the finished job: no retraining.
    at.multiselect(key="tl_channels").set_value([1, 5]).run()
    assert not at.exception
    assert len(counted) == 1
    running = _fig(_figures(at), "Running statistics")
    np.testing.assert_allclose(_values(_trace(running, "momentum 0.1", 2)["y"]),
                               trace.stacked("running_mean", "0.1")[:, 5].numpy(), rtol=1e-6)


def test_stop_button_ends_a_long_run_and_display_controls_do_not(counted):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at = _start(at, steps=3000, eval_every=5)
    assert not at.exception
    job = at.session_state["tl_job"]
    deadline = time.time() + 60
    while job.latest is None and time.time() < deadline:  # wait for the first update
        time.sleep(0.05)
    assert job.running
    assert at.info[0].value.startswith("Training… step")
    # Changing what is displayed during the run redraws (without a rerun loop, although
    # new numbers have arrived since the last drawing) and keeps training.
    time.sleep(2.2)
    at.selectbox(key="tl_layer").set_value("bn3").run(timeout=60)
    assert not at.exception and job.running and not job.stop_requested
    assert len(at.get("plotly_chart")) == 6
    at = at.button(key="tl_stop").click().run()
    assert not at.exception
    assert job.join(timeout=60)
    at = at.run()
    result = job.result
    assert result.status == "stopped" and 0 < result.steps_done < 3000
    assert len(counted) == 1
    warning = at.warning[0].value
    assert warning.startswith(f"Stopped at step {result.steps_done} of 3000")
    text = "\n".join(m.value for m in at.markdown)
    assert f"Stopped after {result.steps_done} of 3000 steps" in text
    loss = _trace(_fig(_figures(at), "Training loss"), "native")
    np.testing.assert_array_equal(_values(loss["y"]), result.histories["native"].loss)
    assert _values(loss["x"])[-1] == result.steps_done  # up to the step it stopped at
    assert "bn3" in _fig(_figures(at), "Running statistics")["layout"]["annotations"][0]["text"]


def test_bad_configuration_shows_an_error_and_keeps_running(counted):
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at = _start(at, variants=[])
    assert not at.exception
    assert "No BatchNorm variant selected" in at.error[0].value
    assert "tl_job" not in at.session_state
    assert counted == []


# --------------------------------------------------------------------------------------
# Real browser: live updates and the Stop button, inside the real multipage app
# --------------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_live_updates_and_stop():
    from tests.browser_support import (
        ConsoleLog,
        chromium,
        chromium_skip_reason,
        running_server,
    )

    reason = chromium_skip_reason()
    if reason:
        pytest.skip(reason)
    with running_server(script="app.py") as server, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        console = ConsoleLog(page)
        # Enter through the dashboard and its page navigation, as a user does (a deep link
        # makes Streamlit's frontend probe <page>/_stcore/... first, which logs two 404s).
        page.goto(server.url)
        page.get_by_role("link", name="Training lab").click(timeout=120_000)
        page.get_by_role("button", name="Start training").wait_for(timeout=90_000)
        page.get_by_label("Steps", exact=True).fill("3000")
        page.get_by_role("button", name="Start training").click()
        # Live: the status line and the charts follow the steps while the run goes on.
        step_of = "() => (document.body.innerText.match(/Training… step (\\d+) of/) || [])[1]"
        page.wait_for_function(f"({step_of})() > 0", timeout=90_000)
        first = int(page.evaluate(f"({step_of})()"))
        page.wait_for_function(f"({step_of})() > {first}", timeout=60_000)
        page.locator('[data-testid="stPlotlyChart"]').nth(5).wait_for(timeout=30_000)
        page.get_by_role("button", name="Stop").click()
        stopped = page.get_by_text("Stopped at step")
        stopped.wait_for(timeout=30_000)
        text = stopped.inner_text()
        step = int(text.split("Stopped at step ")[1].split(" ")[0])
        assert first < step < 3000 and "of 3000" in text
        page.get_by_text(f"Stopped after {step} of 3000 steps").wait_for(timeout=10_000)
        assert page.get_by_role("button", name="Stop").is_disabled()
        assert console.real_errors() == []
