"""One queue for every network run of the server, and results shared between sessions.

Why: every session's forward used to start at once, so under load they all slowed
together and the server's memory grew with their number. Now each run takes one of a few
slots (:func:`run_slots`); the others wait first come, first served, each told how many
runs are ahead of it, and a bounded number of them (``BNVIZ_RUN_QUEUE``) may wait: one more
is refused with "the server is busy" (:class:`ServerBusy`).

Work nobody waits for (the prefetch of the other global mode) takes a slot only while
nobody waits, and is told to stop (``preempt``) as soon as a student's run has to wait for
its slot.

:class:`SharedResult` holds one configuration's result for every session: the first caller
computes it, callers arriving meanwhile wait for that same computation, and a failure keeps
nothing (the next caller computes again).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ..errors import BnvizError
from ..prefetch import Cancelled
from ..settings import settings

T = TypeVar("T")

#: Seconds between two reports of an unchanged position (see :meth:`RunQueue.turn`).
REPORT_EVERY_S = 1.0


class ServerBusy(BnvizError):
    """More runs wait for a slot than the server lets wait."""


def run_slots() -> int:
    """Network runs at once: ``BNVIZ_RUN_SLOTS``, by default the cores divided by twice
    the torch threads of a run (a run keeps about two sets busy: its forward, and the
    condensing beside it), at least 1. The measurement behind it: docs/dashboard.md."""
    wanted = settings().run_slots
    if wanted:
        return wanted
    return max(1, (os.cpu_count() or 1) // (2 * max(1, torch.get_num_threads())))


def queue_text(ahead: int) -> str:
    """What a waiting student reads."""
    if ahead <= 0:
        return ("Queued: your run is next; it starts when the run in progress ends (the "
                "server runs a few networks at a time for the whole class).")
    runs = "run" if ahead == 1 else "runs"
    return (f"Queued: {ahead} {runs} ahead of yours (the server runs a few networks at a "
            "time for the whole class).")


def progress_text(done: int, total: int) -> str:
    """What a student reads during a long forward."""
    return f"Running the network: {done} of {total} BatchNorm layers measured..."


@dataclass(eq=False)
class _Ticket:
    background: bool = False
    preempt: Callable[[], None] | None = None


class RunQueue:
    """``slots`` runs at once, at most ``max_waiting`` waiting; see the module docstring.

    :attr:`counts`: started, waited, refused, preempted, background (for tests and logs).
    """

    def __init__(self, slots: int = 1, max_waiting: int = 16) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self.max_waiting = max(0, max_waiting)
        self._cond = threading.Condition()
        self._waiting: deque[_Ticket] = deque()
        self._running: list[_Ticket] = []
        self.counts = dict.fromkeys(("started", "waited", "refused", "preempted",
                                     "background"), 0)

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def running(self) -> int:
        with self._cond:
            return len(self._running)

    @contextmanager
    def turn(self, on_wait: Callable[[int], None] | None = None) -> Iterator[None]:
        """Hold a slot for a run somebody waits for, first come, first served.

        While it waits, ``on_wait(ahead)`` is called with the number of runs waiting ahead
        of this one: when that changes, and every :data:`REPORT_EVERY_S` seconds (so the
        caller may give up by raising; the place in the queue is then freed). Raises
        :class:`ServerBusy` at once when ``max_waiting`` runs wait already.
        """
        ticket = _Ticket()
        preempt: list[Callable[[], None]] = []
        with self._cond:
            if not self._waiting and self._free() > 0:
                self._running.append(ticket)
                waits = False
            else:
                if len(self._waiting) >= self.max_waiting:
                    self.counts["refused"] += 1
                    raise ServerBusy(
                        f"The server is busy: {len(self._waiting)} runs are waiting for the "
                        f"{self.slots} the server does at a time.",
                        "try again in a moment.")
                self._waiting.append(ticket)
                self.counts["waited"] += 1
                preempt = self._background_preempts()
                waits = True
        for stop in preempt:
            stop()
        if waits:
            self._wait(ticket, on_wait)
        with self._cond:
            self.counts["started"] += 1
        try:
            yield
        finally:
            self._leave(ticket)

    @contextmanager
    def background_turn(self, preempt: Callable[[], None], cancelled: Callable[[], bool],
                        wanted: Callable[[], bool] | None = None) -> Iterator[None]:
        """Hold a slot for work nobody waits for: taken only while nobody waits and a slot
        is free. ``preempt()`` is called when a run somebody waits for has to wait for a
        slot; the work should then stop (and leave this block). Raises
        :class:`bnviz.prefetch.Cancelled` if ``cancelled()`` becomes true before a slot is
        free. Once ``wanted()`` (somebody waits for this very result), it takes the next
        free slot even while others wait, so that student is not sent to the back of the
        queue."""
        ticket = _Ticket(background=True, preempt=preempt)
        with self._cond:
            while self._free() <= 0 or (self._waiting
                                        and not (wanted is not None and wanted())):
                if cancelled():
                    raise Cancelled("a run somebody waits for needs the slot")
                self._cond.wait(0.25)
            self._running.append(ticket)
            self.counts["background"] += 1
        try:
            yield
        finally:
            self._leave(ticket)

    def _free(self) -> int:
        return self.slots - len(self._running)

    def _background_preempts(self) -> list[Callable[[], None]]:
        found = [t.preempt for t in self._running if t.background and t.preempt is not None]
        self.counts["preempted"] += len(found)
        return found

    def _wait(self, ticket: _Ticket, on_wait: Callable[[int], None] | None) -> None:
        reported = None
        try:
            while True:
                with self._cond:
                    ahead = self._waiting.index(ticket)
                    if ahead == 0 and self._free() > 0:
                        self._waiting.popleft()
                        self._running.append(ticket)
                        self._cond.notify_all()
                        return
                    if ahead == reported:
                        self._cond.wait(REPORT_EVERY_S)
                        ahead = self._waiting.index(ticket)
                        if ahead == 0 and self._free() > 0:
                            continue
                reported = ahead
                if on_wait is not None:
                    on_wait(ahead)  # outside the lock: it may draw, or raise to give up
        except BaseException:
            with self._cond:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                elif ticket in self._running:
                    self._running.remove(ticket)
                self._cond.notify_all()
            raise

    def _leave(self, ticket: _Ticket) -> None:
        with self._cond:
            self._running.remove(ticket)
            self._cond.notify_all()


_LOCK = threading.Lock()
_QUEUE: RunQueue | None = None


def run_queue() -> RunQueue:
    """The process-wide queue, made on first use from the settings."""
    global _QUEUE
    with _LOCK:
        if _QUEUE is None:
            _QUEUE = RunQueue(run_slots(), settings().run_queue)
        return _QUEUE


def set_run_queue(queue: RunQueue | None) -> RunQueue | None:
    """Make ``queue`` the process's queue (None: a new one from the settings on next use);
    returns the one it replaces (tests)."""
    global _QUEUE
    with _LOCK:
        previous, _QUEUE = _QUEUE, queue
    return previous


_EMPTY: Any = object()


class SharedResult(Generic[T]):
    """One configuration's result, shared by every session that asks for it.

    The first :meth:`get` computes it; a caller arriving while it is computed waits for that
    computation instead of starting its own (``on_shared()`` is called first, so it can say
    so) and gets the same object. A computation that raises leaves it empty: nothing of a
    failed run is kept, and the next caller computes again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._value: Any = _EMPTY
        self.computed = 0  # computations started (for tests)
        self.shared = 0  # callers that waited for somebody else's computation

    @property
    def ready(self) -> bool:
        return self._value is not _EMPTY

    @property
    def busy(self) -> bool:
        """Whether somebody is computing it now."""
        return self._lock.locked()

    def get(self, compute: Callable[[], T],
            on_shared: Callable[[], None] | None = None) -> T:
        value = self._value
        if value is not _EMPTY:
            return value
        if not self._lock.acquire(blocking=False):
            with self._count_lock:
                self.shared += 1
            if on_shared is not None:
                on_shared()
            self._lock.acquire()
        try:
            if self._value is _EMPTY:
                with self._count_lock:
                    self.computed += 1
                self._value = compute()
            return self._value
        finally:
            self._lock.release()
