"""Running the network for the dashboard: one :func:`bnviz.inspect` per configuration,
condensed at once (the report and its activations are dropped), and the all-eval
reference predictions. Every run is counted, so tests can prove that picking a layer,
channel or chart never runs the network again.

Every run is checked against the per-run memory budget first (:mod:`.budget`), then waits
for its slot in the server's run queue (:mod:`.run_queue`). Running out of memory becomes a
:class:`~bnviz.dashboard.budget.RunOutOfMemory` message, raised once everything the run
made is gone.
"""

from __future__ import annotations

import gc
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..inspection import inspect
from ..models import LoadedModel, load_model
from ..prefetch import JobSignal
from ..settings import settings
from ..validation import seeded_call
from .budget import RUN_TIMES, RunEstimate, check_budget, is_out_of_memory, out_of_memory_error
from .pipeline import OverlappedCondensing, _overlap_pool, build_view_data
from .resources import _forward_finished, _forward_started
from .run_queue import run_queue
from .views import ViewData, prediction_rows

_COUNTER_LOCK = threading.Lock()
INSPECT_CALLS = {"view": 0, "eval": 0, "prefetch": 0}


def _count(kind: str) -> None:
    with _COUNTER_LOCK:
        INSPECT_CALLS[kind] += 1


def inspect_calls() -> dict[str, int]:
    with _COUNTER_LOCK:
        return dict(INSPECT_CALLS)


def view_cache_entries() -> int:
    """How many configurations the server keeps condensed (``BNVIZ_VIEW_CACHE``, default 16)."""
    return settings().view_cache


def load_shared_model(name: str, random_init: bool) -> LoadedModel:
    """The model every session of a configuration shares: pretrained, or a random init
    seeded so that every session and every server restart shows the same random network
    (a shared link reproduces its numbers)."""
    if random_init:
        return seeded_call(load_model, name, weights=None, seed=0)
    return load_model(name)


def compute_view_data(loaded, x: torch.Tensor, modes: Mapping[str, str] | str | None,
                      device: str, *, random_init: bool,
                      meta: Mapping[str, Any] | None = None,
                      cancel: threading.Event | None = None,
                      on_wait: Callable[[int], None] | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> ViewData:
    """One :func:`bnviz.inspect` call (all tensors kept), condensed; the report is dropped.

    Before it runs: refused with :class:`~bnviz.dashboard.budget.RunTooLarge` when its
    estimate is above the memory budget, then a slot of the server's run queue (while it
    waits, ``on_wait(runs ahead)``). Out of memory raises
    :class:`~bnviz.dashboard.budget.RunOutOfMemory`. A long forward on the CPU reports the
    BatchNorm layers measured so far: ``on_progress(done, total)``, from
    :data:`PROGRESS_AFTER_S` seconds on, at most every :data:`PROGRESS_EVERY_S` seconds.

    ``cancel`` (given by a prefetch): checked at every BatchNorm layer (CPU); once set, the
    forward stops there with :class:`bnviz.prefetch.Cancelled` (a prefetch that a waiting
    student overtook). What is left to condense after such a forward is done in the calling
    (low-priority) thread, not on the normal-priority pool. A prefetch's ``cancel``
    (:class:`bnviz.prefetch.JobSignal`) also pauses the work at every layer while a page is
    being drawn. A prefetch takes a slot only while no run waits for one, and is told to
    stop when a student's run has to wait.
    """
    estimate = _checked_estimate(loaded, x, keep_tensors=True, device=device)
    queue = run_queue()
    if cancel is None:
        turn = queue.turn(on_wait)
    else:
        signal = cancel if isinstance(cancel, JobSignal) else None
        turn = queue.background_turn(cancel.set if signal is None else signal.overtaken,
                                     cancel.is_set, None if signal is None else signal.wanted)
    with turn:
        t0 = time.perf_counter()
        view = _unless_out_of_memory(
            lambda: _view_data(loaded, x, modes, device, random_init, meta, cancel,
                               on_progress), x, loaded)
        if cancel is None and estimate is not None:
            RUN_TIMES.note(estimate, time.perf_counter() - t0)
        return view


def _view_data(loaded, x: torch.Tensor, modes, device: str, random_init: bool,
               meta: Mapping[str, Any] | None, cancel: threading.Event | None,
               on_progress: Callable[[int, int], None] | None = None) -> ViewData:
    _count("view" if cancel is None else "prefetch")
    _forward_started()
    pool = _overlap_pool()
    overlapped = OverlappedCondensing(pool, cancel) \
        if pool is not None or cancel is not None else None
    sink = overlapped if on_progress is None else _Progress(
        overlapped, len(getattr(loaded, "bn_layer_names", ())), on_progress)
    try:
        try:
            report = inspect(loaded, x, modes=modes, device=device, keep_tensors=True,
                             tensor_sink=sink)
        except BaseException:
            if overlapped is not None:
                overlapped.cancel_all()
            raise
        try:
            return build_view_data(
                report, random_init=random_init, meta=meta, overlapped=overlapped,
                pooled=cancel is None,
                pause=cancel.pause_while_busy if isinstance(cancel, JobSignal) else None)
        finally:
            del report
    finally:
        _forward_finished()


#: A forward reports its progress only once it has run this long (seconds) ...
PROGRESS_AFTER_S = 1.0
#: ... and then at most this often.
PROGRESS_EVERY_S = 0.5


class _Progress:
    """A tensor sink that counts the BatchNorm layers the forward hands over and passes
    them on (to the overlapped condensing, if any)."""

    def __init__(self, inner: OverlappedCondensing | None, total: int,
                 report: Callable[[int, int], None]) -> None:
        self._inner = inner
        self._total = total
        self._report = report
        self._done = 0
        self._start = time.monotonic()
        self._last = float("-inf")

    def ready(self, name: str, tensors) -> None:
        if self._inner is not None:
            self._inner.ready(name, tensors)
        self._done += 1
        now = time.monotonic()
        if now - self._start >= PROGRESS_AFTER_S and now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            total = max(self._total, self._done)
            self._report(self._done, total)

    def changed(self, name: str) -> None:
        if self._inner is not None:
            self._inner.changed(name)


def _checked_estimate(loaded, x: torch.Tensor, *, keep_tensors: bool,
                      device: str) -> RunEstimate | None:
    """The run's estimate once it is known to fit the budget (None for an input that is
    not a batch of square images, or a model without a profile)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        return None
    return check_budget(loaded, int(x.shape[0]), int(x.shape[-1]),
                        keep_tensors=keep_tensors, device=device)


def _unless_out_of_memory(run: Callable[[], Any], x: torch.Tensor, loaded) -> Any:
    """``run()``; running out of memory becomes :class:`RunOutOfMemory`, raised after the
    handler, so the failed run's traceback (and every tensor its frames hold) is gone."""
    try:
        return run()
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
        _release_frames(exc)
    gc.collect()  # frames of the failed run that are in reference cycles
    x = x if isinstance(x, torch.Tensor) else x[0]  # a model with several inputs: the first
    batch = int(x.shape[0]) if x.dim() == 4 else 1
    raise out_of_memory_error(batch, int(x.shape[-1]) if x.dim() else 0,
                              str(getattr(loaded, "name", "this model")))


def _release_frames(exc: BaseException | None) -> None:
    """Drop the locals of every frame in ``exc``'s tracebacks (and those it was raised
    from): whoever still holds the exception object no longer holds the run's tensors."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


@dataclass(frozen=True)
class EvalPredictions:
    """Top-k per image of the all-eval reference run (predictions only, no tensors)."""

    predictions: tuple[tuple[tuple[int, str, float], ...], ...] | None
    forward_ms: float


def compute_eval_predictions(loaded, x: torch.Tensor, device: str,
                             on_wait: Callable[[int], None] | None = None) -> EvalPredictions:
    """The reference run for the predictions view: every BN layer in eval, no tensors;
    checked, queued and guarded like :func:`compute_view_data`."""
    _checked_estimate(loaded, x, keep_tensors=False, device=device)
    with run_queue().turn(on_wait):
        return _unless_out_of_memory(lambda: _eval_predictions(loaded, x, device), x, loaded)


def _eval_predictions(loaded, x: torch.Tensor, device: str) -> EvalPredictions:
    _count("eval")
    report = inspect(loaded, x, modes="eval", device=device, keep_tensors=False)
    return EvalPredictions(prediction_rows(report), report.forward_ms)
