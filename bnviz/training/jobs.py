"""The training jobs of a server: each belongs to a session, a few train at once, the rest
wait in line, and a job whose session has ended stops.

A class shares one server, and a Training-lab run keeps a core busy for as long as it
trains. So a :class:`JobBoard` gives each session (``owner``) at most one job, trains at
most ``limit`` of them at a time and queues the others first come, first served. A waiting
job knows how many are ahead of it. Each job carries an ``alive`` check from the page (is
its browser session still connected?); one watchdog thread, running only while the board
has jobs, asks every ``check_s`` seconds and stops the jobs whose session is gone, or takes
them out of the queue, so a closed tab frees its core within seconds. Each such stop is
logged ("training job #n stopped: session ended").

Nothing here changes a process-wide setting: each job's thread count is its own thread's
(:mod:`bnviz.training.threads`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable

from ..errors import BnvizError
from ..settings import settings
from .config import TrainConfig
from .job import SESSION_ENDED, TrainingJob

log = logging.getLogger(__name__)


class TrainingInProgressError(BnvizError):
    """A session asked for a second training run while its first one is in progress."""


class JobBoard:
    """The training jobs of one process: at most one per owner, ``limit`` at a time."""

    def __init__(self, limit: int, *, check_s: float = 1.0):
        if limit < 1:
            raise ValueError(f"a job board needs at least one training slot, not {limit}")
        self.limit = limit
        self.check_s = check_s
        self._lock = threading.Lock()
        self._training: list[TrainingJob] = []
        self._waiting: list[TrainingJob] = []
        self._owners: dict[str, TrainingJob] = {}
        self._watchdog: threading.Thread | None = None

    # -- what a page asks ----------------------------------------------------------------

    def submit(self, config: TrainConfig, *, owner: str,
               alive: Callable[[], bool] | None = None) -> TrainingJob:
        """A new job for ``owner``: training at once if a slot is free, else queued.

        Raises :class:`TrainingInProgressError` when ``owner`` has a job in progress
        (one run per session: the page offers to stop it first)."""
        job = TrainingJob(config, alive=alive)  # validated before anything is queued
        with self._lock:
            current = self._owners.get(owner)
            if current is not None:
                raise TrainingInProgressError(
                    f"A training run is already in progress in this session "
                    f"({'queued' if current.queued else 'training'}).",
                    "stop it first (the Stop button), then start the new one.")
            job._board = self
            job._owner = owner
            job._queued = True
            self._owners[owner] = job
            self._waiting.append(job)
            self._start_waiting()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                                  name="bnviz-training-watchdog")
                self._watchdog.start()
        return job

    def job_of(self, owner: str) -> TrainingJob | None:
        """``owner``'s job in progress (queued or training), if any."""
        with self._lock:
            return self._owners.get(owner)

    def ahead(self, job: TrainingJob) -> int:
        """How many jobs wait before ``job`` (0 when it does not wait)."""
        with self._lock:
            return self._waiting.index(job) if job in self._waiting else 0

    def counts(self) -> tuple[int, int]:
        """(jobs training, jobs waiting)."""
        with self._lock:
            return len(self._training), len(self._waiting)

    def check_sessions(self) -> int:
        """Stop every job whose session has ended; returns how many were stopped (one
        pass of the watchdog)."""
        with self._lock:
            jobs = [j for j in (*self._training, *self._waiting) if not j.stop_requested]
        ended = 0
        for job in jobs:
            try:
                alive = bool(job.alive())
            except Exception:  # a check that fails cannot vouch for its session
                log.exception("training job #%d: its session check failed", job.number)
                alive = False
            if not alive:
                job.stop(SESSION_ENDED)
                ended += 1
        return ended

    # -- the jobs' side ------------------------------------------------------------------

    def _start_waiting(self) -> None:
        """Under the lock: start waiting jobs, oldest first, while slots are free."""
        while self._waiting and len(self._training) < self.limit:
            job = self._waiting.pop(0)
            self._training.append(job)
            job._launch()

    def _cancel(self, job: TrainingJob) -> None:
        with self._lock:
            if job not in self._waiting:
                return
            self._waiting.remove(job)
            self._forget(job)
            job._leave_queue()
        if job.end_reason == SESSION_ENDED:
            log.warning("training job #%d left the queue: session ended", job.number)

    def _ended(self, job: TrainingJob) -> None:
        """Called by a job's thread when it has finished, failed or stopped."""
        with self._lock:
            if job in self._training:
                self._training.remove(job)
            self._forget(job)
            self._start_waiting()
        if job.end_reason == SESSION_ENDED:
            done = job.result.steps_done if job.result is not None else 0
            log.warning("training job #%d stopped: session ended (after step %d of %d)",
                        job.number, done, job.config.steps)

    def _forget(self, job: TrainingJob) -> None:
        if job._owner is not None and self._owners.get(job._owner) is job:
            del self._owners[job._owner]

    def _watch(self) -> None:
        """The watchdog: one thread per board, alive while the board has jobs."""
        while True:
            time.sleep(self.check_s)
            self.check_sessions()
            with self._lock:
                if not self._owners:
                    self._watchdog = None
                    return


def default_limit() -> int:
    """``BNVIZ_TRAINING_JOBS``, or half the cores (at least 1): a run keeps one core busy
    (its tensors are small), and the other half stays for the sessions' forwards."""
    wanted = settings().training_jobs
    return wanted if wanted is not None else max(1, (os.cpu_count() or 2) // 2)


@functools.cache
def default_board() -> JobBoard:
    """The board of this process (the dashboard's; ``cache_clear()`` in tests)."""
    return JobBoard(default_limit())


__all__ = ["JobBoard", "TrainingInProgressError", "default_board", "default_limit"]
