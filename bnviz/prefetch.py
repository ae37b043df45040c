"""Prefetching: compute the view a student will most likely ask for next, while nobody waits.

Why: a mode toggle is the dashboard's slowest interaction. It is a new forward that keeps
every activation, then condensing (efficientnet_lite0, batch 8, one CPU thread: ~0.5-1 s
on the server, then ~0.7 s of drawing in the browser). It is also the question every
student asks first ("what changes in eval mode?"). While the student reads the charts the
server is idle, so the dashboard computes the same configuration with the other global
mode then. When the student toggles, the view is already there, and only the drawing is
left.

The rules that keep this safe and cheap on a class server:

* **One background thread for the whole process**, at a lower priority (nice 10 on Linux).
  It takes only CPU that the browser and the forwards somebody waits for leave over.
* **It never starts while a forward somebody waits for is running** (see
  :meth:`Prefetcher.foreground`). A running prefetch that nobody has asked for yet is told
  to stop when such a forward starts; the work function passed to :meth:`Prefetcher.schedule`
  checks its ``cancel`` event (the dashboard checks it at every BatchNorm layer) and raises
  :class:`Cancelled`.
* **Only the newest request waits to be started.** A newer request replaces an older
  one that has not started: that student has moved on.
* **At most ``capacity`` finished results are kept**, oldest dropped first. Each is handed
  out once, by :meth:`Prefetcher.take`; the app's own cache keeps it from then on.
* **A key that was computed recently is not prefetched again** (:meth:`Prefetcher.remember`).
* **A prefetched result is exactly what the foreground would compute.** It is the same
  function with the same arguments, so the numbers are identical (tested against a direct
  computation).

Example::

    pre = Prefetcher(capacity=2)
    pre.schedule("eval", lambda cancel: expensive("eval", cancel))
    ...
    value = pre.take("eval")          # the result, waiting if it is being computed
    if value is None:                 # not prefetched (or it failed): compute it now
        with pre.foreground("eval"):
            value = expensive("eval", None)
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Scheduling priority (``nice``) of the prefetch thread.
PREFETCH_NICE = 10


class Cancelled(Exception):
    """A prefetch stopped early because a forward somebody waits for started."""


def lower_thread_priority(nice: int = PREFETCH_NICE) -> None:
    """Run the calling thread at ``nice`` (Linux; never raises a thread's priority).

    Elsewhere a thread id is not something ``setpriority`` takes, so the thread runs at
    normal priority there.
    """
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # not permitted (seccomp, say): run at normal priority
            pass


@dataclass(eq=False)
class _Job:
    key: Hashable
    compute: Callable[[threading.Event], Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0
    value: Any = None
    ok: bool = False


class Prefetcher:
    """Runs work ahead of need on one low-priority thread; see the module docstring.

    ``enabled=False`` makes :meth:`schedule` a no-op (``BNVIZ_PREFETCH=0`` in the app).
    :attr:`counts` says what happened (scheduled, started, finished, cancelled, failed,
    taken, replaced, dropped, skipped), for tests and benchmarks.
    """

    def __init__(self, capacity: int = 4, *, enabled: bool = True, remembered: int = 16,
                 nice: int = PREFETCH_NICE) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.enabled = enabled
        self.capacity = capacity
        self.nice = nice
        self._remembered_max = max(1, remembered)
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._running: _Job | None = None
        self._done: OrderedDict[Hashable, Any] = OrderedDict()
        self._remembered: OrderedDict[Hashable, None] = OrderedDict()
        self._foreground = 0
        self._thread: threading.Thread | None = None
        self.counts = dict.fromkeys(("scheduled", "started", "finished", "cancelled", "failed",
                                     "taken", "replaced", "dropped", "skipped"), 0)

    # -- asking for work ---------------------------------------------------------------------

    def schedule(self, key: Hashable, compute: Callable[[threading.Event], Any]) -> bool:
        """Compute ``compute(cancel)`` for ``key`` when the server is idle; False if skipped
        (disabled, or ``key`` is already asked for, running, finished, or remembered as
        computed)."""
        if not self.enabled:
            return False
        with self._cond:
            if (key in self._done or key in self._remembered
                    or any(job is not None and job.key == key
                           for job in (self._pending, self._running))):
                self.counts["skipped"] += 1
                return False
            if self._pending is not None:
                self.counts["replaced"] += 1
            self._pending = _Job(key, compute)
            self.counts["scheduled"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="bnviz-prefetch",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def offer(self, key: Hashable, value: Any) -> None:
        """Keep a result that is known without computing, for one :meth:`take`."""
        if self.enabled:
            with self._cond:
                self._keep(key, value)

    def remember(self, key: Hashable) -> None:
        """Note that ``key`` was just computed or used, so it is not prefetched again
        (the ``remembered`` most recent keys, like the app's own cache)."""
        with self._cond:
            self._remembered[key] = None
            self._remembered.move_to_end(key)
            while len(self._remembered) > self._remembered_max:
                self._remembered.popitem(last=False)

    # -- getting results ---------------------------------------------------------------------

    def take(self, key: Hashable) -> Any | None:
        """The prefetched result for ``key`` (once), or None: then compute it yourself.

        If it is being computed right now, waits for it (it is further along than a fresh
        start). A request that has not started is withdrawn: the caller computes it now.
        """
        with self._cond:
            if key in self._done:
                self.counts["taken"] += 1
                return self._done.pop(key)
            if self._pending is not None and self._pending.key == key:
                self._pending = None
                return None
            job = self._running if self._running is not None and self._running.key == key \
                else None
            if job is None:
                return None
            job.waiters += 1
        job.done.wait()
        with self._cond:
            job.waiters -= 1
            if not job.ok:
                return None
            self.counts["taken"] += 1
            return job.value

    @contextmanager
    def foreground(self, key: Hashable | None = None) -> Iterator[None]:
        """Mark a computation somebody waits for (of ``key``).

        No prefetch starts while one runs, and a running prefetch of another key that
        nobody waits for is told to stop, so the waiting student gets the CPU.
        """
        with self._cond:
            self._foreground += 1
            job = self._running
            if job is not None and job.key != key and job.waiters == 0:
                job.cancel.set()
        try:
            yield
        finally:
            with self._cond:
                self._foreground -= 1
                self._cond.notify_all()

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or running; False on timeout (for tests)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._running is None and self._pending is None, timeout)

    # -- the worker ----------------------------------------------------------------------------

    def _keep(self, key: Hashable, value: Any) -> None:
        self._done[key] = value
        self._done.move_to_end(key)
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)
            self.counts["dropped"] += 1

    def _work(self) -> None:
        lower_thread_priority(self.nice)
        while True:
            with self._cond:
                while self._pending is None or self._foreground > 0:
                    self._cond.wait()
                job, self._pending = self._pending, None
                self._running = job
                self.counts["started"] += 1
            value = None
            try:
                value = job.compute(job.cancel)
            except Cancelled:
                outcome = "cancelled"
            except Exception:  # noqa: BLE001 - the foreground computes it again and reports it
                outcome = "failed"
            else:
                outcome = "finished"
            with self._cond:
                self.counts[outcome] += 1
                if outcome == "finished":
                    job.value, job.ok = value, True
                    if job.waiters == 0:
                        self._keep(job.key, value)
                self._running = None
                job.done.set()
                self._cond.notify_all()
            del job, value
