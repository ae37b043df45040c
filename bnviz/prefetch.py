"""Prefetching: compute the view a student will most likely ask for next, while nobody waits.

Why: a mode toggle is the dashboard's slowest interaction. It is a new forward that keeps
every activation, then condensing, then drawing in the browser. It is also the question
every student asks first ("what changes in eval mode?"). While the student reads the
charts the server is idle, so the dashboard computes the same configuration with the other
global mode then. When the student toggles, the view is already there, and only the
drawing is left.

The rules that keep this safe and cheap on a class server:

* **One background thread for the whole process**, at a lower priority (nice 10 on Linux).
  It takes only CPU that the browser and the forwards somebody waits for leave over.
* **It waits while a page is being redrawn** (``quiet_s``, see :meth:`Prefetcher.activity`).
  A lower priority does not keep it off the cores a browser on the same machine needs: on
  a laptop with 2 cores the browser drawing leaves one core free, the prefetch takes it,
  and its memory traffic slows the drawing (numbers: docs/dashboard.md). So the app notes
  each rerun a local browser asked for, and the prefetch neither starts nor goes on (its
  work pauses at :meth:`JobSignal.pause_while_busy`) until ``quiet_s`` seconds have passed
  since.
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

    pre = Prefetcher(capacity=2, quiet_s=0.75)
    pre.schedule("eval", lambda cancel: expensive("eval", cancel))  # between its steps:
    ...                               # cancel.pause_while_busy(); stop if cancel.is_set()
    pre.activity()                    # a rerun starts or ends: nothing runs for 0.75 s
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
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Scheduling priority (``nice``) of the prefetch thread.
PREFETCH_NICE = 10


class Cancelled(Exception):
    """A prefetch stopped early because a forward somebody waits for started."""


class JobSignal(threading.Event):
    """The ``cancel`` event a prefetch's work function is given.

    It is set when a forward somebody waits for overtakes the prefetch (then stop, raising
    :class:`Cancelled`). :meth:`pause_while_busy`, called between steps, waits while a page
    is being redrawn (see :meth:`Prefetcher.activity`); it returns at once when somebody
    waits for this very result, or when the signal is set.
    """

    def __init__(self, pause: Callable[[], None],
                 overtake: Callable[[], None] | None = None,
                 wanted: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self._pause = pause
        self._overtake = overtake if overtake is not None else self.set
        self._wanted = wanted if wanted is not None else (lambda: False)

    def pause_while_busy(self) -> None:
        self._pause()

    def overtaken(self) -> None:
        """A run somebody waits for needs the slot this job holds (the server's run queue
        says so): stop, unless somebody waits for this very result."""
        self._overtake()

    def wanted(self) -> bool:
        """Whether somebody waits for this very result (it is then no longer work that
        nobody waits for)."""
        return self._wanted()


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
    ``quiet_s``: how long after the last :meth:`activity` work may start or go on (0: it
    never waits for that). :attr:`counts` says what happened (scheduled, started, finished,
    cancelled, failed, taken, replaced, dropped, skipped, paused), for tests and benchmarks.
    """

    def __init__(self, capacity: int = 4, *, enabled: bool = True, remembered: int = 16,
                 nice: int = PREFETCH_NICE, quiet_s: float = 0.0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if not quiet_s >= 0:
            raise ValueError(f"quiet_s must be a number of seconds >= 0, got {quiet_s}")
        self.enabled = enabled
        self.capacity = capacity
        self.nice = nice
        self.quiet_s = float(quiet_s)
        self._last_activity = float("-inf")
        self._remembered_max = max(1, remembered)
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._running: _Job | None = None
        self._done: OrderedDict[Hashable, Any] = OrderedDict()
        self._remembered: OrderedDict[Hashable, None] = OrderedDict()
        self._foreground = 0
        self._thread: threading.Thread | None = None
        self.counts = dict.fromkeys(("scheduled", "started", "finished", "cancelled", "failed",
                                     "taken", "replaced", "dropped", "skipped", "paused"), 0)

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
            job = _Job(key, compute)
            job.cancel = JobSignal(lambda: self._pause(job), lambda: self._overtake(job),
                                   lambda: job.waiters > 0)
            self._pending = job
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

    def activity(self) -> None:
        """Note that a page is being worked on now (a rerun a browser on this machine asked
        for starts or ends): no prefetch starts or goes on for ``quiet_s`` seconds.

        Why also at the end: the browser draws what a rerun sent after the server is done
        (longer for a new view than for a layer switch, longest on a first load).
        """
        if self.quiet_s > 0:
            self._last_activity = time.monotonic()  # one float store: no lock needed

    def _busy_for(self) -> float:
        """Seconds left until the server counts as quiet (<= 0: quiet now)."""
        return self.quiet_s - (time.monotonic() - self._last_activity)

    def _pause(self, job: _Job) -> None:
        """:meth:`JobSignal.pause_while_busy` of ``job``."""
        if self.quiet_s <= 0:  # called at every layer: no lock when it can never wait
            return
        with self._cond:
            paused = False
            while not job.cancel.is_set() and job.waiters == 0 \
                    and (left := self._busy_for()) > 0:
                paused = True
                self._cond.wait(left)
            if paused:
                self.counts["paused"] += 1

    def _overtake(self, job: _Job) -> None:
        """:meth:`JobSignal.overtaken` of ``job``."""
        with self._cond:
            if job.waiters == 0 and not job.cancel.is_set():
                job.cancel.set()
                self._cond.notify_all()  # a paused job stops now

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
            self._cond.notify_all()  # a job paused for a quiet moment goes on now
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
                self._cond.notify_all()  # a paused job stops now
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
                while True:
                    if self._pending is None or self._foreground > 0:
                        self._cond.wait()
                    elif (left := self._busy_for()) > 0:
                        self._cond.wait(left)
                    else:
                        break
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
