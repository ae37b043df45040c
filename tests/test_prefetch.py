"""bnviz.prefetch and the dashboard's prefetch of the other global mode.

The prefetcher's rules are tested with plain functions (events make the timing exact);
the dashboard's use of it with the real efficientnet_lite0: a prefetched view must equal,
field by field, the view computed when the student toggles.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import replace

import pytest

import bnviz
from bnviz import dashboard as dash
from bnviz.dashboard import pipeline, resources
from bnviz.prefetch import Cancelled, JobSignal, Prefetcher
from tests.test_dashboard import _same_state, _state, assert_same_layer_views

WAIT = 30.0


def _value(key):
    return lambda cancel: f"value of {key}"


class _Blocking:
    """A compute function that signals when it starts and runs until released or
    cancelled (then it raises Cancelled, as the dashboard's forward does)."""

    def __init__(self, value="done") -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.value = value

    def __call__(self, cancel: threading.Event):
        self.started.set()
        while not self.release.wait(0.005):
            if cancel.is_set():
                raise Cancelled("stopped")
        return self.value


def _running(value="done") -> tuple[Prefetcher, _Blocking]:
    """A prefetcher whose job for key "a" has started and runs until released."""
    pre = Prefetcher()
    work = _Blocking(value)
    pre.schedule("a", work)
    assert work.started.wait(WAIT)
    return pre, work


# -- the prefetcher's rules ---------------------------------------------------------------------


def test_a_prefetched_result_is_handed_out_once():
    pre = Prefetcher(capacity=2)
    assert pre.schedule("a", _value("a"))
    assert pre.idle(WAIT)
    assert pre.take("a") == "value of a"
    assert pre.take("a") is None  # the app's cache keeps it from here
    assert pre.take("never asked") is None
    assert pre.counts["finished"] == pre.counts["taken"] == 1


def test_nothing_starts_while_a_forward_somebody_waits_for_runs():
    pre = Prefetcher()
    with pre.foreground("x"):
        pre.schedule("a", _value("a"))
        assert not pre.idle(0.2)  # pending, not started
        assert pre.counts["started"] == 0 and pre._pending is not None
    assert pre.idle(WAIT)
    assert pre.counts["started"] == 1 and pre.take("a") == "value of a"


def test_only_the_newest_request_waits():
    pre = Prefetcher()
    with pre.foreground():
        pre.schedule("old", _value("old"))
        assert not pre.schedule("old", _value("old"))  # asked for already
        pre.schedule("new", _value("new"))
    assert pre.idle(WAIT)
    assert pre.take("old") is None and pre.take("new") == "value of new"
    assert pre.counts["replaced"] == 1 and pre.counts["started"] == 1


def test_a_request_not_started_is_withdrawn_by_take():
    pre = Prefetcher()
    with pre.foreground():
        pre.schedule("a", _value("a"))
        assert pre.take("a") is None  # the caller computes it now, in the foreground
    assert pre.idle(WAIT) and pre.counts["started"] == 0


def test_a_forward_somebody_waits_for_stops_a_prefetch_nobody_asked_for():
    pre, _ = _running()
    with pre.foreground("b"):
        assert pre.idle(WAIT)
    assert pre.counts["cancelled"] == 1 and pre.take("a") is None


def test_take_waits_for_a_running_prefetch_and_protects_it():
    """The student asks for the key being prefetched: it is waited for (and another
    session's foreground forward does not cancel it meanwhile)."""
    pre, work = _running("the view")
    got = []
    taker = threading.Thread(target=lambda: got.append(pre.take("a")))
    taker.start()
    while pre._running is None or pre._running.waiters == 0:
        threading.Event().wait(0.005)
    with pre.foreground("b"):  # somebody else's forward: the waited-for job goes on
        work.release.set()
        taker.join(WAIT)
    assert got == ["the view"] and pre.counts["cancelled"] == 0
    assert pre.take("a") is None  # handed out once


def test_a_foreground_forward_of_the_same_key_does_not_cancel_it():
    pre, work = _running()
    with pre.foreground("a"):
        work.release.set()
        assert pre.idle(WAIT)
    assert pre.counts["cancelled"] == 0 and pre.take("a") == "done"


def test_a_failing_prefetch_leaves_the_work_to_the_foreground():
    pre = Prefetcher()

    def broken(cancel):
        raise ValueError("out of memory, say")

    pre.schedule("a", broken)
    assert pre.idle(WAIT)
    assert pre.counts["failed"] == 1 and pre.take("a") is None
    pre.schedule("b", _value("b"))  # the thread survived
    assert pre.idle(WAIT) and pre.take("b") == "value of b"


def test_capacity_remembered_keys_offers_and_switching_off():
    pre = Prefetcher(capacity=2, remembered=2)
    for key in "abc":
        pre.schedule(key, _value(key))
        assert pre.idle(WAIT)
    assert pre.counts["dropped"] == 1 and pre.take("a") is None  # oldest dropped
    assert not pre.schedule("b", _value("b"))  # finished, not taken yet
    pre.remember("x")
    assert not pre.schedule("x", _value("x"))  # computed recently
    pre.remember("y")
    pre.remember("z")  # "x" is forgotten (two remembered)
    assert pre.schedule("x", _value("x")) and pre.idle(WAIT)
    pre.offer("known", 42)
    assert pre.take("known") == 42
    with pytest.raises(ValueError, match="capacity"):
        Prefetcher(capacity=0)

    off = Prefetcher(enabled=False)
    assert not off.schedule("a", _value("a"))
    off.offer("known", 1)
    assert off.take("known") is None and off._thread is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities: Linux")
def test_prefetching_only_takes_spare_cpu():
    pre = Prefetcher()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    pre.schedule("nice", lambda cancel: os.getpriority(os.PRIO_PROCESS,
                                                       threading.get_native_id()))
    assert pre.idle(WAIT)
    assert pre.take("nice") == max(mine, pre.nice)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


# -- waiting while a page is drawn (quiet_s) -----------------------------------------------------

QUIET = 0.3


class _Pausing:
    """Work that records when it started, pauses once (as the dashboard's forward does at
    every layer), and records when it went on."""

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.resumed_at: float | None = None
        self.at_pause = threading.Event()
        self.go = threading.Event()

    def __call__(self, cancel: JobSignal):
        self.started_at = time.monotonic()
        self.at_pause.set()
        assert self.go.wait(WAIT)
        cancel.pause_while_busy()
        self.resumed_at = time.monotonic()
        if cancel.is_set():
            raise Cancelled("stopped")
        return "done"


def test_nothing_starts_until_the_page_has_been_quiet_for_quiet_s():
    pre = Prefetcher(quiet_s=QUIET)
    pre.activity()
    noted = time.monotonic()
    work = _Pausing()
    work.go.set()
    pre.schedule("a", work)
    assert pre.idle(WAIT) and pre.take("a") == "done"
    assert work.started_at - noted >= QUIET  # not before the page was quiet
    assert pre.counts["paused"] == 0  # quiet all along once started


def test_a_running_prefetch_pauses_while_a_page_is_drawn_and_then_goes_on():
    pre = Prefetcher(quiet_s=QUIET)
    work = _Pausing()
    pre.schedule("a", work)
    assert work.at_pause.wait(WAIT)
    pre.activity()  # a layer switch, say
    noted = time.monotonic()
    work.go.set()
    assert pre.idle(WAIT) and pre.take("a") == "done"
    assert work.resumed_at - noted >= QUIET
    assert pre.counts["paused"] == 1 and pre.counts["finished"] == 1


def test_a_paused_prefetch_somebody_asks_for_goes_on_at_once():
    """The toggle that wants this very view must not wait for the quiet moment its own
    rerun started."""
    pre = Prefetcher(quiet_s=WAIT)  # "busy" for much longer than the test
    work = _Pausing()
    pre.activity()
    pre._last_activity = float("-inf")  # start now ...
    pre.schedule("a", work)
    assert work.at_pause.wait(WAIT)
    pre.activity()  # ... then a rerun: the work pauses
    work.go.set()
    time.sleep(0.2)  # into the pause (were it not woken, take() would wait for WAIT s)
    t0 = time.monotonic()
    assert pre.take("a") == "done"
    assert time.monotonic() - t0 < WAIT / 2


def test_a_paused_prefetch_is_stopped_by_a_forward_somebody_waits_for():
    pre = Prefetcher(quiet_s=WAIT)
    work = _Pausing()
    pre.schedule("a", work)
    assert work.at_pause.wait(WAIT)
    pre.activity()
    work.go.set()
    time.sleep(0.2)  # into the pause (were it not woken, idle() below would time out)
    with pre.foreground("b"):
        assert pre.idle(WAIT / 2)
    assert pre.counts["cancelled"] == 1 and pre.take("a") is None


def test_without_quiet_s_activity_changes_nothing():
    pre = Prefetcher()
    pre.activity()
    assert pre._busy_for() <= 0
    work = _Pausing()
    work.go.set()
    pre.schedule("a", work)
    assert pre.idle(WAIT) and pre.take("a") == "done" and pre.counts["paused"] == 0
    with pytest.raises(ValueError, match="quiet_s"):
        Prefetcher(quiet_s=-1)


def test_only_a_browser_on_this_machine_holds_the_prefetch_back():
    pre = Prefetcher(quiet_s=WAIT)
    dash.set_prefetcher(pre)  # the conftest puts the process's own back afterwards
    dash.note_activity("192.0.2.7")  # a student's laptop: it draws on its own cores
    assert pre._busy_for() <= 0
    dash.note_activity(None)  # Streamlit's ip_address for localhost
    assert pre._busy_for() > 0
    pre._last_activity = float("-inf")
    dash.note_activity(object())  # not an address (AppTest's mock): maybe local
    assert pre._busy_for() > 0


@pytest.mark.parametrize(("ip", "headers", "expected"), [
    (None, {}, None),  # Streamlit: a browser on localhost
    ("192.0.2.7", {}, "192.0.2.7"),
    ("127.0.1.1", None, None),
    ("::ffff:127.0.0.1", {}, None),
    (None, {"X-Forwarded-For": "198.51.100.4, 10.0.0.2"}, "198.51.100.4"),  # behind a proxy
    (None, {"X-Real-IP": "198.51.100.5"}, "198.51.100.5"),
    (None, {"X-Forwarded-For": "127.0.0.1"}, None),  # the proxy's own browser
    ("192.0.2.7", {"X-Forwarded-For": "  "}, "192.0.2.7"),
    (object(), object(), None),  # AppTest's mocks: unknown, so maybe local
])
def test_where_the_browser_runs(ip, headers, expected):
    assert dash.browser_address(ip, headers) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("", dash.DEFAULT_PREFETCH_QUIET_S), ("0", 0.0), ("1.5", 1.5),
    ("soon", dash.DEFAULT_PREFETCH_QUIET_S), ("-2", dash.DEFAULT_PREFETCH_QUIET_S)])
def test_the_quiet_time_is_configurable(value, expected, monkeypatch, fresh_settings):
    monkeypatch.setenv("BNVIZ_PREFETCH_QUIET_S", value)
    fresh_settings()
    assert dash.prefetch_quiet_s() == expected


# -- the dashboard's prefetch of the other global mode -----------------------------------------


@pytest.fixture(scope="module")
def x96():
    return bnviz.make_stimulus("image", 96, 2, composition="jitter", name="chelsea")


def test_the_prefetched_other_mode_is_the_view_a_toggle_computes(lite, x96):
    """Train view shown -> eval prefetched; the toggle takes it without a forward, and it
    equals computing eval in the foreground, field by field; the shared model is untouched."""
    state = _state(lite.module)
    pre = Prefetcher()
    names = lite.bn_layer_names
    cfg = dash.DashConfig(size=96, batch_size=2, composition="jitter", mode="train",
                          overrides=(("_bn0", dash.RowOverride(mode="eval")),))
    train_key = repr(cfg.compute_key())
    train_modes = dash.overrides_to_modes("train", cfg.override_dict, names)
    shown = dash.view_data(train_key, lite, x96, train_modes, "cpu", random_init=False,
                           prefetcher=pre)
    assert dash.prefetch_other_mode(cfg, train_modes, shown, lite, x96, names, "cpu",
                                    prefetcher=pre)
    assert not dash.prefetch_other_mode(cfg, train_modes, shown, lite, x96, names, "cpu",
                                        prefetcher=pre)
    assert pre.idle(WAIT * 4) and pre.counts["finished"] == 1

    toggled = replace(cfg, mode="eval")
    eval_modes = dash.overrides_to_modes("eval", toggled.override_dict, names)
    calls = dash.inspect_calls()
    view = dash.view_data(repr(toggled.compute_key()), lite, x96, eval_modes, "cpu",
                          random_init=False, prefetcher=pre)
    assert dash.inspect_calls() == calls  # no forward on the toggle
    # In a fresh thread, as the prefetch ran: PyTorch gives each thread its intra-op thread
    # count when it first computes, and this test thread may have computed before the app's
    # tests lowered it (a different count changes float32 sums in the last bits).
    done: list = []
    worker = threading.Thread(target=lambda: done.append(
        dash.compute_view_data(lite, x96, eval_modes, "cpu", random_init=False)))
    worker.start()
    worker.join()
    direct = done[0]
    assert view.layer("_bn0").stats_used == "running" == direct.layer("_bn0").stats_used
    assert_same_layer_views(view.layers, direct.layers)
    assert view.predictions == direct.predictions and view.table_csv == direct.table_csv
    assert _same_state(lite.module, state)
    # toggling back: train was remembered as computed, so it is not prefetched again
    assert not dash.prefetch_other_mode(toggled, eval_modes, view, lite, x96, names, "cpu",
                                        prefetcher=pre)


def test_nothing_is_prefetched_for_a_gpu(lite, x96):
    """A CUDA forward hands no layer over while it runs, so a prefetch there could neither
    make way for a student's forward nor pause: the GPU is left to the foreground."""
    pre = Prefetcher()
    names = lite.bn_layer_names
    cfg = dash.DashConfig(size=96, batch_size=2, composition="jitter", mode="train",
                          device="cuda")
    modes = dash.overrides_to_modes("train", {}, names)
    shown = dash.compute_view_data(lite, x96, modes, "cpu", random_init=False)
    for device in ("cuda", "cuda:0"):
        assert not dash.prefetch_other_mode(cfg, modes, shown, lite, x96, names, device,
                                            prefetcher=pre)
    assert pre.counts["scheduled"] == 0
    assert dash.prefetch_other_mode(cfg, modes, shown, lite, x96, names, "cpu",
                                    prefetcher=pre)
    assert pre.idle(WAIT * 4) and pre.counts["finished"] == 1


def test_an_all_eval_view_offers_the_reference_predictions(lite, x96):
    pre = Prefetcher()
    cfg = dash.DashConfig(size=96, batch_size=2, composition="jitter", mode="eval")
    view = dash.compute_view_data(lite, x96, "eval", "cpu", random_init=False)
    names = lite.bn_layer_names
    dash.prefetch_other_mode(cfg, dict.fromkeys(names, "eval"), view, lite, x96, names, "cpu",
                             prefetcher=pre)
    calls = dash.inspect_calls()
    ref = dash.eval_predictions(repr(cfg.eval_key()), lite, x96, "cpu", prefetcher=pre)
    assert dash.inspect_calls()["eval"] == calls["eval"]
    assert ref.predictions == dash.compute_eval_predictions(lite, x96, "cpu").predictions
    pre.idle(WAIT * 4)  # the train prefetch it also started


def test_a_cancelled_prefetch_stops_at_a_layer_and_leaves_everything_as_it_was(lite, x96):
    state = _state(lite.module)
    cancel = threading.Event()
    cancel.set()
    seen: list[str] = []
    real = dash.OverlappedCondensing.ready

    def ready(self, name, tensors):
        seen.append(name)
        return real(self, name, tensors)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dash.OverlappedCondensing, "ready", ready)
        with pytest.raises(Cancelled):
            dash.compute_view_data(lite, x96, "train", "cpu", random_init=False, cancel=cancel)
    assert len(seen) == 1  # stopped at the first hand-over, not after the whole forward
    assert resources._RELEASE["running"] == 0  # the memory release is still scheduled
    assert _same_state(lite.module, state)
    again = dash.compute_view_data(lite, x96, "train", "cpu", random_init=False)
    reference = bnviz.inspect(lite, x96, "train", device="cpu", keep_tensors=True)
    assert_same_layer_views(again.layers,
                            dash.build_view_data(reference, random_init=False).layers)


def test_a_prefetch_condenses_at_its_own_low_priority(lite, x96, monkeypatch):
    """What a prefetch leaves to condense after its forward is done in its own thread: the
    normal-priority pool (which the foreground uses) is never handed its work. The view is
    the same as the foreground's, pooled."""
    pooled = dash.compute_view_data(lite, x96, "eval", "cpu", random_init=False)
    asked: list[bool] = []
    real = pipeline._condense_pool
    monkeypatch.setattr(pipeline, "_condense_pool", lambda: asked.append(True) or real())
    view = dash.compute_view_data(lite, x96, "eval", "cpu", random_init=False,
                                  cancel=threading.Event())
    assert asked == []
    assert_same_layer_views(view.layers, pooled.layers)
    dash.compute_view_data(lite, x96, "eval", "cpu", random_init=False)
    assert asked == [True]  # the foreground does use it


def test_a_prefetch_pauses_at_every_layer_and_computes_the_same_view(lite, x96):
    """The forward asks to pause at every BatchNorm layer it hands over, and the condensing
    left after it before every layer it does; the view is the foreground's."""
    calls: list[int] = []
    signal = JobSignal(lambda: calls.append(1))
    view = dash.compute_view_data(lite, x96, "train", "cpu", random_init=False,
                                  cancel=signal)
    assert len(calls) >= len(lite.bn_layer_names)
    direct = dash.compute_view_data(lite, x96, "train", "cpu", random_init=False)
    assert_same_layer_views(view.layers, direct.layers)
