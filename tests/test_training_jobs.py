"""Training-lab jobs on a shared server (issue 22, section 2; the training parts of 7).

A job belongs to its browser session and stops when the session ends; one job per session;
a limited number train at once and the others wait in line; a job's memory does not grow
with its steps; no job changes torch's process-wide thread count. The core is tested with
fake session checks; the page with AppTest and, end to end, in a real browser whose tabs
are closed while their jobs train or wait.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

import bnviz.training.figures as training_figures
import bnviz.training.job as training_job
from bnviz.training import (
    JobBoard,
    TrainConfig,
    TrainingInProgressError,
    torch_threads,
    train_lab,
)
from bnviz.training import jobs as training_jobs
from bnviz.training.job import SESSION_ENDED, STOPPED
from bnviz.training.thinning import Thinning

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "2_Training_lab.py")


def tiny(**kw) -> TrainConfig:
    base = dict(steps=100_000, batch_size=8, eval_every=5, n_train=64, n_val=32,
                image_size=8, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _wait(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Session:
    """A fake browser session: ``alive`` is what the page hands the board."""

    def __init__(self) -> None:
        self.connected = True

    def alive(self) -> bool:
        return self.connected


@pytest.fixture
def fake_training(monkeypatch):
    """Jobs whose "training" publishes a real (short) result when told to and otherwise
    waits for its stop, so that queue tests cost no CPU. ``publish(job)`` makes ``job``
    publish once more; ``finish(job)`` ends it normally."""
    base = train_lab(tiny(steps=6, eval_every=3))
    commands: dict[int, queue.Queue] = {}

    def fake(config, *, on_update=None, should_stop=None, log=None):
        inbox = commands.setdefault(threading.get_ident(), queue.Queue())
        result = base.snapshot()
        result.status = "running"
        while not should_stop():
            try:
                command = inbox.get(timeout=0.02)
            except queue.Empty:
                continue
            if command == "finish":
                result.status = "finished"
                on_update(result)
                return result
            on_update(result)
        result.status = "stopped"
        on_update(result)
        return result

    class Control:
        @staticmethod
        def publish(job):
            _wait(lambda: job.thread.ident is not None, what="the job's thread")
            commands.setdefault(job.thread.ident, queue.Queue()).put("publish")

        @staticmethod
        def finish(job):
            _wait(lambda: job.thread.ident is not None, what="the job's thread")
            commands.setdefault(job.thread.ident, queue.Queue()).put("finish")

    monkeypatch.setattr(training_job, "train_lab", fake)
    return Control


# --------------------------------------------------------------------------------------
# A job belongs to its session
# --------------------------------------------------------------------------------------


def test_a_job_stops_within_seconds_when_its_session_ends(caplog):
    """Finding: jobs of closed tabs kept training for over 7 minutes."""
    board = JobBoard(2, check_s=0.05)
    session = Session()
    job = board.submit(tiny(), owner="tab-1", alive=session.alive)
    _wait(lambda: job.latest is not None and job.latest.steps_done >= 5, what="training")
    assert job.running
    with caplog.at_level(logging.WARNING, logger="bnviz.training.jobs"):
        session.connected = False  # the tab is closed
        assert job.join(timeout=30)
    assert not job.running and job.end_reason == SESSION_ENDED
    assert job.result.status == "stopped" and job.result.steps_done < 100_000
    assert f"training job #{job.number} stopped: session ended" in caplog.text
    assert board.counts() == (0, 0) and board.job_of("tab-1") is None


def test_a_session_check_that_fails_counts_as_ended(fake_training, caplog):
    board = JobBoard(1, check_s=0.02)

    def broken() -> bool:
        raise RuntimeError("runtime gone")

    job = board.submit(tiny(), owner="tab", alive=broken)
    with caplog.at_level(logging.WARNING, logger="bnviz.training.jobs"):
        assert job.join(timeout=30)
    assert job.end_reason == SESSION_ENDED
    assert "its session check failed" in caplog.text


def test_one_job_per_session(fake_training):
    """Finding: Start during a run silently restarted it."""
    board = JobBoard(4, check_s=0.05)
    first = board.submit(tiny(), owner="tab", alive=lambda: True)
    with pytest.raises(TrainingInProgressError, match="already in progress"):
        board.submit(tiny(seed=1), owner="tab", alive=lambda: True)
    assert first.running and not first.stop_requested  # the first run goes on untouched
    assert board.job_of("tab") is first and board.counts() == (1, 0)
    other = board.submit(tiny(), owner="another tab", alive=lambda: True)  # others may
    first.stop()
    assert first.join(timeout=30) and first.end_reason == STOPPED
    second = board.submit(tiny(seed=1), owner="tab", alive=lambda: True)  # now it may
    assert second.running
    for job in (other, second):
        job.stop()
        assert job.join(timeout=30)


def test_a_limited_number_train_and_the_others_wait_in_line(fake_training, caplog):
    """Finding: every session's job trained at once. Now ``limit`` train, the others are
    queued first come, first served, each knowing how many are ahead; a queued job whose
    session ends leaves the line without ever training."""
    board = JobBoard(1, check_s=0.05)
    sessions = {name: Session() for name in "abcd"}
    a, b, c, d = (board.submit(tiny(), owner=n, alive=s.alive) for n, s in sessions.items())
    assert a.running and not a.queued
    assert [j.queued for j in (b, c, d)] == [True, True, True]
    assert [j.ahead for j in (a, b, c, d)] == [0, 0, 1, 2]
    assert board.counts() == (1, 3)
    with caplog.at_level(logging.WARNING, logger="bnviz.training.jobs"):
        sessions["c"].connected = False  # c's tab is closed while it waits
        assert c.join(timeout=30)
    assert c.cancelled and not c.active and c.thread.ident is None  # it never trained
    assert f"training job #{c.number} left the queue: session ended" in caplog.text
    assert [j.ahead for j in (b, d)] == [0, 1]
    fake_training.finish(a)  # a ends normally: b, first in line, starts
    assert a.join(timeout=30) and a.result.status == "finished" and a.end_reason is None
    _wait(lambda: b.running, what="b to start")
    assert d.queued and d.ahead == 0
    d.stop()  # Stop while queued: out of the line at once
    assert d.join(timeout=1) and d.cancelled and d.end_reason == STOPPED
    b.stop()
    assert b.join(timeout=30)
    assert board.counts() == (0, 0)


def test_one_watchdog_while_there_are_jobs_and_none_after(fake_training):
    board = JobBoard(2, check_s=0.02)

    def watchdogs() -> int:
        return sum(t.name == "bnviz-training-watchdog" and t.is_alive()
                   for t in threading.enumerate())

    before = watchdogs()  # other boards of this process (the page tests') may have theirs
    jobs = [board.submit(tiny(), owner=f"tab {i}", alive=lambda: True) for i in range(5)]
    assert board._watchdog is not None and watchdogs() == before + 1
    for job in jobs:
        job.stop()
        assert job.join(timeout=30)
    _wait(lambda: board._watchdog is None, timeout=10, what="the watchdog to end")
    again = board.submit(tiny(), owner="later", alive=lambda: True)  # and it comes back
    assert board._watchdog is not None
    again.stop()
    assert again.join(timeout=30)


def test_default_limit_from_settings(monkeypatch, fresh_settings):
    monkeypatch.delenv("BNVIZ_TRAINING_JOBS", raising=False)
    fresh_settings()
    assert training_jobs.default_limit() == max(1, (os.cpu_count() or 2) // 2)
    monkeypatch.setenv("BNVIZ_TRAINING_JOBS", "3")
    fresh_settings()
    assert training_jobs.default_limit() == 3
    monkeypatch.setenv("BNVIZ_TRAINING_JOBS", "0")  # not a limit: the default
    fresh_settings()
    assert training_jobs.default_limit() == max(1, (os.cpu_count() or 2) // 2)
    with pytest.raises(ValueError):
        JobBoard(0)


# --------------------------------------------------------------------------------------
# Process-wide settings stay as the server set them
# --------------------------------------------------------------------------------------


def _threads_of_a_new_thread() -> int:
    """What a thread started now gets (Streamlit runs every rerun in a new thread)."""
    out = []
    worker = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return out[0]


def test_overlapping_jobs_leave_torch_threads_alone(monkeypatch):
    """Finding: each job set torch's thread count to 1 for the whole process, and two
    overlapping jobs left it at 1 for good. Now a job's count (1) is its own thread's."""
    in_jobs = []
    real = training_job.train_lab

    def spy(config, *, on_update, **kwargs):
        def update(result):
            in_jobs.append(torch.get_num_threads())  # in the job's thread
            on_update(result)
        return real(config, on_update=update, **kwargs)

    monkeypatch.setattr(training_job, "train_lab", spy)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)  # the server's count: one no job would choose
    try:
        board = JobBoard(2, check_s=0.05)
        first = board.submit(tiny(), owner="a", alive=lambda: True)
        _wait(lambda: first.latest is not None, what="the first job to train")
        second = board.submit(tiny(seed=1), owner="b", alive=lambda: True)
        _wait(lambda: second.latest is not None, what="the second job to train")
        assert first.running and second.running
        assert torch.get_num_threads() == 3 and _threads_of_a_new_thread() == 3
        first.stop()
        assert first.join(timeout=30)
        assert _threads_of_a_new_thread() == 3  # one still training
        second.stop()
        assert second.join(timeout=30)
        assert torch.get_num_threads() == 3 and _threads_of_a_new_thread() == 3
        with torch_threads(1) as per_thread:
            pass
        if per_thread:  # where torch's OpenMP runtime takes a per-thread count (Linux)
            assert set(in_jobs) == {1}
    finally:
        torch.set_num_threads(saved)


# --------------------------------------------------------------------------------------
# Bounded memory: curves keep a fixed number of points
# --------------------------------------------------------------------------------------


def test_thinning_keeps_evenly_spaced_exact_points_and_the_latest():
    for capacity in (2, 3, 10, 64):
        thinning = Thinning(capacity)
        steps, values = [], []
        for step in range(1, 5000):
            thinning.record([(steps, step), (values, -step)])
            assert len(steps) <= thinning.capacity + 1
            assert steps[0] == 1 and steps[-1] == step  # the first and the latest
            grid = steps if (step - 1) % thinning.stride == 0 else steps[:-1]
            assert all(b - a == thinning.stride for a, b in zip(grid, grid[1:], strict=False))
            assert values == [-s for s in steps]  # recorded together, kept together


def test_a_long_run_keeps_a_bounded_number_of_exact_points():
    """Finding: one job grew by 1-2 MB per step. Now every curve keeps at most
    ``curve_points`` (+ the latest) points however many steps it trains, and each kept
    point is the value of its step in a run that kept everything."""
    cfg = dict(steps=120, eval_every=2, variants=("native", "detached"), momenta=(0.1, None))
    full = train_lab(tiny(**cfg))
    thin = train_lab(tiny(curve_points=10, **cfg))
    assert len(full.histories["native"].loss) == 120  # the full run kept every step
    for name, hist in thin.histories.items():
        ref = full.histories[name]
        assert hist.step[0] == 1 and hist.step[-1] == 120 and len(hist.step) <= 11
        assert hist.loss == [ref.loss[s - 1] for s in hist.step]
        assert hist.train_acc == [ref.train_acc[s - 1] for s in hist.step]
        assert hist.eval_step[-1] == 120 and len(hist.eval_step) <= 11
        where = [ref.eval_step.index(s) for s in hist.eval_step]
        assert hist.val_acc_eval == [ref.val_acc_eval[i] for i in where]
        assert hist.conv_weight_norm == [ref.conv_weight_norm[i] for i in where]
    for layer, trace in thin.traces.items():
        ref = full.traces[layer]
        assert trace.step[0] == 1 and trace.step[-1] == 120 and len(trace.step) <= 11
        rows = [s - 1 for s in trace.step]
        assert torch.equal(trace.stacked("batch_mean"), ref.stacked("batch_mean")[rows])
        assert torch.equal(trace.stacked("running_var", "None"),
                           ref.stacked("running_var", "None")[rows])
    assert len(thin.momentum_eval_step) <= 11
    # What is reported at the end does not depend on what the curves keep.
    assert thin.final_rows() == full.final_rows()
    assert thin.verdict[:3] == full.verdict[:3]


def test_3000_steps_keep_at_most_the_default_number_of_points():
    cfg = tiny(steps=3000, eval_every=2, variants=("native",), momenta=(0.1,), batch_size=4,
               n_train=16, n_val=8, widths=(2, 2, 2), channels=(0,))
    result = train_lab(cfg)
    n = cfg.curve_points + 1
    hist = result.histories["native"]
    for seq in (hist.step, hist.loss, hist.eval_step, hist.val_acc_train,
                result.traces["bn2"].step, result.traces["bn2"].batch_mean,
                result.traces["bn2"].running_mean["0.1"], result.momentum_eval_step):
        assert len(seq) <= n
    assert hist.step[-1] == 3000 and result.traces["bn3"].step[-1] == 3000
    assert len(hist.recent_loss) <= 2 * cfg.eval_every


# --------------------------------------------------------------------------------------
# The page: one run per session, queue, redraws
# --------------------------------------------------------------------------------------


@pytest.fixture
def page_board(monkeypatch, fresh_settings):
    """The page's board, fresh for one test, with one training slot and charts that may
    be redrawn only once an hour (tests lower it when they want a redraw)."""
    monkeypatch.setenv("BNVIZ_TRAINING_JOBS", "1")
    monkeypatch.setenv("BNVIZ_TRAINING_REDRAW_S", "3600")
    fresh_settings()
    training_jobs.default_board.cache_clear()
    yield training_jobs.default_board
    board = training_jobs.default_board()
    for job in list(board._owners.values()):
        job.stop()
        job.join(timeout=30)
    training_jobs.default_board.cache_clear()


def _start(at: AppTest, steps: int = 3000) -> AppTest:
    at.number_input(key="tl_steps").set_value(steps)
    [start] = [b for b in at.button if b.label == "Start training"]
    return start.click().run()


def test_page_start_during_a_run_does_not_restart_it(page_board, fake_training):
    at = _start(AppTest.from_file(PAGE, default_timeout=120).run())
    assert not at.exception
    job = at.session_state["tl_job"]
    assert job.running
    at = _start(at)  # Start again, with the run going on
    assert not at.exception
    assert "already in progress" in at.warning[0].value and "Stop" in at.warning[0].value
    assert at.session_state["tl_job"] is job and job.running and not job.stop_requested
    assert not at.button(key="tl_stop").disabled


def test_page_shows_the_queue_and_leaves_it_on_stop(page_board, fake_training):
    board = page_board()
    other = board.submit(tiny(), owner="another student", alive=lambda: True)
    at = _start(AppTest.from_file(PAGE, default_timeout=120).run())
    assert not at.exception
    job = at.session_state["tl_job"]
    assert job.queued and job.ahead == 0
    assert at.info[0].value.startswith("Queued: next in line")
    assert "trains 1 run(s) at a time" in at.info[0].value
    assert not at.button(key="tl_stop").disabled  # a queued run can be stopped
    third = board.submit(tiny(), owner="a third student", alive=lambda: True)
    assert third.ahead == 1
    at = at.button(key="tl_stop").click().run()
    assert not at.exception
    assert job.cancelled and third.ahead == 0
    assert at.warning[0].value.startswith("Left the queue")
    for j in (other, third):
        j.stop()
        assert j.join(timeout=30)


def test_page_redraws_only_new_numbers_and_at_most_every_redraw_interval(
        page_board, fake_training, monkeypatch, fresh_settings):
    """Finding: the page rebuilt its six charts every ~2 s while a job trained."""
    built = []
    real = training_figures.lab_figures

    def counting(*args, **kwargs):
        built.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(training_figures, "lab_figures", counting)
    at = _start(AppTest.from_file(PAGE, default_timeout=120).run())
    job = at.session_state["tl_job"]
    fake_training.publish(job)
    _wait(lambda: job.version == 1, what="the first numbers")
    at.run()
    assert len(built) == 1 and len(at.get("plotly_chart")) == 6
    at.run()
    at.run()
    assert len(built) == 1  # nothing new: nothing rebuilt
    fake_training.publish(job)
    _wait(lambda: job.version == 2, what="new numbers")
    at.run()
    assert len(built) == 1  # new numbers, but drawn less than REDRAW_S ago
    at.selectbox(key="tl_layer").set_value("bn3").run()
    assert len(built) == 2  # a display change redraws at once (with the newest numbers)
    fake_training.publish(job)
    _wait(lambda: job.version == 3, what="newer numbers")
    monkeypatch.setenv("BNVIZ_TRAINING_REDRAW_S", "0")
    fresh_settings()
    at.run()
    assert len(built) == 3 and built[-1] is job.latest  # due now: redrawn
    at.run()
    assert len(built) == 3
    monkeypatch.setenv("BNVIZ_TRAINING_REDRAW_S", "3600")
    fresh_settings()
    fake_training.finish(job)
    assert job.join(timeout=30)
    at.run()
    assert len(built) == 4 and built[-1].status == "finished"  # the end redraws at once
    assert not at.exception


# --------------------------------------------------------------------------------------
# Real browser: closed tabs end their jobs
# --------------------------------------------------------------------------------------


@pytest.mark.browser
def test_browser_closing_tabs_stops_their_jobs(tmp_path):
    from tests.browser_support import chromium, chromium_skip_reason, running_server

    reason = chromium_skip_reason()
    if reason:
        pytest.skip(reason)
    env = {"BNVIZ_TRAINING_JOBS": "1", "BNVIZ_PREFETCH": "0"}
    with running_server(script="pages/2_Training_lab.py", extra_env=env,
                        log_dir=tmp_path) as server, chromium() as browser:

        def open_tab():
            context = browser.new_context()  # a separate browser session each
            page = context.new_page()
            page.goto(server.url)
            page.get_by_role("button", name="Start training").wait_for(timeout=120_000)
            page.get_by_label("Steps", exact=True).fill("3000")
            page.get_by_role("button", name="Start training").click()
            return context, page

        def log_says(text: str, timeout: float) -> None:
            _wait(lambda: text in server.log(), timeout=timeout, what=repr(text))

        first, page = open_tab()
        step_of = "() => (document.body.innerText.match(/Training… step (\\d+) of/) || [])[1]"
        page.wait_for_function(f"({step_of})() > 0", timeout=120_000)
        second, waiting = open_tab()
        waiting.get_by_text("Queued: next in line").wait_for(timeout=60_000)
        second.close()  # the waiting student's tab
        log_says("left the queue: session ended", timeout=30)
        assert "stopped: session ended" not in server.log()
        assert page.get_by_text("Training… step").is_visible()  # the first trains on
        first.close()  # the training student's tab
        log_says("stopped: session ended", timeout=30)
        line = next(x for x in server.log().splitlines() if "stopped: session ended" in x)
        step = int(line.split("after step ")[1].split(" ")[0])
        assert 0 < step < 3000
