"""From a kept report to :class:`~bnviz.dashboard.views.ViewData`: every layer condensed,
on spare cores while the forward still runs and on a process-wide pool after it.

The layers are independent and their tensor ops (gathers, bucketing, counting) release the
GIL, so condensing uses every core once the forward is done; each layer's result does not
depend on the thread that made it. One pool per process, with one worker per core, so
concurrent sessions queue their layers instead of oversubscribing the cores.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..inspection import InspectionReport, LayerReport
from ..prefetch import Cancelled, JobSignal, lower_thread_priority
from ..settings import settings
from .condense import CondensedTensors, condense_layer_tensors, condense_tensors
from .views import LayerView, ViewData, layer_view, prediction_rows, strip_tensors

_POOL_LOCK = threading.Lock()
#: The process-wide pools, created on first use: name -> executor.
_POOLS: dict[str, ThreadPoolExecutor] = {}
#: Scheduling priority (``nice``) of the threads that condense during the forward.
OVERLAP_NICE = 10


def condense_workers() -> int:
    """Threads that condense layers: one per core (``BNVIZ_CONDENSE_WORKERS`` overrides)."""
    return settings().condense_workers or (os.cpu_count() or 1)


def overlap_workers() -> int:
    """Threads that condense layers *while the forward runs*: the cores the forward leaves
    free (cores - torch threads, at least 1); 0 when ``BNVIZ_OVERLAP=0`` or with one
    condense worker."""
    if not settings().overlap or condense_workers() <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) - torch.get_num_threads())


def _pool(name: str, workers: int, initializer: Callable[[], None] | None = None,
          ) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(workers, thread_name_prefix=f"bnviz-{name}",
                                              initializer=initializer)
        return _POOLS[name]


def _condense_pool() -> ThreadPoolExecutor | None:
    return _pool("condense", condense_workers()) if condense_workers() > 1 else None


def _yield_to_others() -> None:
    """Run this thread at a lower priority, so it only takes CPU that nobody else wants.

    On a laptop the student's browser shares the cores with the server, and on a class
    server other sessions' forwards do: at normal priority this worker took the core the
    browser needed to draw the first charts. What it has not done by the forward's end is
    done by the normal-priority pool.
    """
    lower_thread_priority(OVERLAP_NICE)


def _overlap_pool() -> ThreadPoolExecutor | None:
    workers = overlap_workers()
    return _pool("overlap", workers, _yield_to_others) if workers > 0 else None


class OverlappedCondensing:
    """A :class:`bnviz.inspection.TensorSink` that condenses each layer on a spare core as
    soon as the forward hands it over, so most of the condensing is done when the forward
    ends instead of following it.

    A layer the forward changes after handing it over (an in-place op on one of its tensors
    later in the network, say) is condensed again from the finished report, so the result
    is always what :func:`condense_layers` makes from the report alone.
    """

    def __init__(self, pool: ThreadPoolExecutor | None,
                 cancel: threading.Event | None = None) -> None:
        self._pool = pool
        self._cancel = cancel
        self.jobs: dict[str, Future] = {}  # layer -> its condensing, as handed over
        self.stale: set[str] = set()

    def ready(self, name: str, tensors) -> None:
        if isinstance(self._cancel, JobSignal):  # a prefetch: wait while a page is drawn
            self._cancel.pause_while_busy()
        if self._cancel is not None and self._cancel.is_set():
            self.cancel_all()
            raise Cancelled(f"stopped before {name}: a forward somebody waits for started")
        if self._pool is not None:  # without a pool it only watches ``cancel``
            self.jobs[name] = self._pool.submit(condense_tensors, *tensors)

    def cancel_all(self) -> None:
        """Cancel every handed-over layer whose condensing has not started."""
        for job in self.jobs.values():
            job.cancel()

    def changed(self, name: str) -> None:
        self.stale.add(name)
        job = self.jobs.get(name)
        if job is not None:
            job.cancel()  # not worth finishing if it has not started: it would be redone

    def job(self, name: str) -> Future | None:
        """The layer's condensing if it is still valid, else None (condense the report's)."""
        return None if name in self.stale else self.jobs.get(name)


def condense_layers(layers: Sequence[LayerReport],
                    overlapped: OverlappedCondensing | None = None, *,
                    pooled: bool = True,
                    pause: Callable[[], None] | None = None) -> tuple[LayerView, ...]:
    """:func:`~bnviz.dashboard.views.layer_view` of every layer, largest first, on the
    process-wide pool.

    ``overlapped``: the layers handed over during the forward; those already condensed (or
    being condensed) are taken from it, the pool does the rest. ``pooled=False``: the rest
    is done in the calling thread (a low-priority prefetch must not hand its work to the
    normal-priority pool), calling ``pause`` before each layer (a prefetch waits there
    while a page is drawn).
    """
    condensed: list[CondensedTensors | None] = [None] * len(layers)
    running: dict[int, Future] = {}  # started on the overlap pool: wait for those
    todo = []
    for i, layer in enumerate(layers):
        # handed over under the call's key: the name for a first call, the label after it
        key = layer.name if layer.call == 1 else layer.label
        job = overlapped.job(key) if overlapped is not None else None
        if job is not None and not job.cancel():  # started (or done) during the forward
            running[i] = job
        else:
            todo.append(i)
    todo.sort(key=lambda i: -_numel(layers[i].input))
    pool = _condense_pool() if pooled else None

    def condense_here(i: int) -> CondensedTensors:
        if pause is not None:
            pause()
        return condense_layer_tensors(layers[i])

    work = (condense_here(i) for i in todo) if pool is None or len(todo) < 2 \
        else pool.map(lambda i: condense_layer_tensors(layers[i]), todo)
    for i, c in zip(todo, work, strict=True):
        condensed[i] = c
    for i, job in running.items():
        condensed[i] = job.result()
    return tuple(layer_view(layer, c) for layer, c in zip(layers, condensed, strict=True))


def _numel(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel()


def build_view_data(report: InspectionReport, *, random_init: bool,
                    meta: Mapping[str, Any] | None = None,
                    overlapped: OverlappedCondensing | None = None,
                    pooled: bool = True,
                    pause: Callable[[], None] | None = None) -> ViewData:
    """Condense a report made with ``keep_tensors=True`` into a :class:`ViewData`
    (``overlapped``, ``pooled`` and ``pause``: see :func:`condense_layers`)."""
    t0 = time.perf_counter()
    layers = condense_layers(report.layers, overlapped, pooled=pooled, pause=pause)
    return ViewData(
        model=report.model, weights=report.weights, random_init=random_init,
        device=report.device, input_shape=tuple(report.input_shape),
        preprocessing=report.preprocessing,
        notes={k: v for k, v in report.notes.items() if isinstance(v, str | int | float | bool)
               or (isinstance(v, list) and all(isinstance(i, str) for i in v))},
        forward_ms=report.forward_ms, build_ms=(time.perf_counter() - t0) * 1000,
        layers=layers, predictions=prediction_rows(report),
        overview_rows=tuple(report.overview_rows()),
        stats_report=strip_tensors(report),
        meta=dict(meta or {}),
    )
