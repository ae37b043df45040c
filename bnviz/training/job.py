"""A Training lab run in a background thread, for user interfaces (the dashboard page)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import TrainConfig
from .lab import train_lab
from .results import TrainResult

if TYPE_CHECKING:
    from .jobs import JobBoard

_numbers = itertools.count(1)

#: Why a job ended early (``TrainingJob.end_reason``).
STOPPED = "stopped"
SESSION_ENDED = "session ended"


def _always() -> bool:
    return True


class TrainingJob:
    """:func:`train_lab` in a background thread, for user interfaces.

    The dashboard gives each browser session at most one job, through a
    :class:`~bnviz.training.jobs.JobBoard` that limits how many train at once (the others
    wait, ``queued``, ``ahead`` of them a number of jobs) and stops the jobs whose session
    has ended (``alive()`` turned false). ``start()`` runs a job at once, without a board.

    While it trains, ``latest`` is a consistent :meth:`TrainResult.snapshot` taken at every
    update and ``version`` counts the updates (so the UI thread never reads lists that are
    being appended to, and redraws only when the numbers changed). ``stop()`` makes the run
    end at its next step through ``should_stop`` (it then evaluates once more and is marked
    stopped), or takes a waiting job out of the queue; ``result``/``error`` hold the outcome.

    A job never changes the process's torch thread count: ``config.threads`` (1 by
    default) applies to the job's own thread only (:mod:`bnviz.training.threads`).
    """

    def __init__(self, config: TrainConfig, *, alive: Callable[[], bool] | None = None):
        self.config = config.validated()
        #: False once the session that owns the job has ended (checked by its board)
        self.alive = alive or _always
        self.number = next(_numbers)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._latest: TrainResult | None = None
        self._board: JobBoard | None = None
        self._owner: str | None = None
        self._queued = False
        self._left_queue = False
        self.version = 0
        self.result: TrainResult | None = None
        self.error: Exception | None = None
        #: None, or why the job ended before its last step: STOPPED or SESSION_ENDED
        self.end_reason: str | None = None
        self.submitted = self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._work, name=f"bnviz-training-{self.number}",
                                       daemon=True)

    def start(self) -> TrainingJob:
        """Train now, in this job's thread (no board, no limit)."""
        self._launch()
        return self

    def _launch(self) -> None:
        self.started = time.perf_counter()
        self.thread.start()
        self._queued = False  # after the start: ``active`` never reads false in between

    def _publish(self, result: TrainResult) -> None:
        snap = result.snapshot()
        with self._lock:
            self._latest = snap
            self.version += 1

    def _work(self) -> None:
        try:
            self.result = train_lab(self.config, on_update=self._publish,
                                    should_stop=self._stop.is_set)
        except Exception as exc:  # reported by the UI; the thread must not die silently
            self.error = exc
        finally:
            if self._board is not None:
                self._board._ended(self)
            self._done.set()

    @property
    def latest(self) -> TrainResult | None:
        with self._lock:
            return self._latest

    def versioned_latest(self) -> tuple[int, TrainResult | None]:
        """``(version, latest)``, read together: the version of exactly that snapshot."""
        with self._lock:
            return self.version, self._latest

    @property
    def queued(self) -> bool:
        """Waiting for a free training slot of its board."""
        return self._queued

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def active(self) -> bool:
        """Queued or training: the session has a run in progress."""
        return self._queued or self.thread.is_alive()

    @property
    def cancelled(self) -> bool:
        """Stopped while it waited: it never trained."""
        return self._left_queue

    @property
    def ahead(self) -> int:
        """How many jobs wait before this one (0 when it is not waiting)."""
        board = self._board
        return board.ahead(self) if board is not None and self._queued else 0

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def stop(self, reason: str = STOPPED) -> None:
        """End the run after its current step, or leave the queue if it waits."""
        if self.end_reason is None and not self._done.is_set():
            self.end_reason = reason
        self._stop.set()
        board = self._board
        if board is not None and self._queued:
            board._cancel(self)

    def _leave_queue(self) -> None:
        """Called by the board, under its lock, when it takes this waiting job out."""
        self._queued = False
        self._left_queue = True
        self._done.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the job to end (trained, stopped or taken out of the queue); True when
        it has ended."""
        if not self._done.wait(timeout):
            return False
        if self.thread.ident is not None:
            self.thread.join(timeout)  # only the thread's last lines are left
        return True
