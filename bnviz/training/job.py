"""A Training lab run in a background thread, for user interfaces (the dashboard page)."""

from __future__ import annotations

import threading
import time

from .config import TrainConfig
from .lab import train_lab
from .results import TrainResult


class TrainingJob:
    """:func:`train_lab` in a background thread, for user interfaces.

    The dashboard starts one job per browser session and keeps drawing while it trains:
    ``latest`` is a consistent :meth:`TrainResult.snapshot` taken at every update (so the
    UI thread never reads lists that are being appended to), ``stop()`` makes the run end
    at its next step through ``should_stop`` (it then evaluates once more and is marked
    stopped), ``result``/``error`` hold the outcome. The thread is a daemon and trains with
    ``config.threads`` torch threads, so jobs of several sessions share the CPU instead of
    blocking each other.
    """

    def __init__(self, config: TrainConfig):
        self.config = config.validated()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: TrainResult | None = None
        self.version = 0
        self.result: TrainResult | None = None
        self.error: Exception | None = None
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._work, name="bnviz-training", daemon=True)

    def start(self) -> TrainingJob:
        self.started = time.perf_counter()
        self.thread.start()
        return self

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

    @property
    def latest(self) -> TrainResult | None:
        with self._lock:
            return self._latest

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has finished."""
        self.thread.join(timeout)
        return not self.thread.is_alive()
