"""Every ``BNVIZ_*`` environment variable, read in one place.

:func:`settings` reads them once per process (tests that change the environment call
``settings.cache_clear()``). Each field says what it tunes; the defaults are what
``make run`` uses.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass


def _float(name: str, default: float, lo: float = 0.0) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value >= lo else default


def _int(name: str, default: int | None, lo: int = 1) -> int | None:
    text = os.environ.get(name, "").strip()
    try:
        value = int(text) if text else default
    except ValueError:
        return default
    return value if value is None or value >= lo else default


def _flag(name: str, default: bool) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    return text not in {"0", "off", "false", "no"}


@dataclass(frozen=True)
class Settings:
    """The process's bnviz settings (from the environment)."""

    #: BNVIZ_PROBE_KERNEL: use the compiled manual-BN check when it is built
    probe_kernel: bool = True
    #: BNVIZ_CACHE_DIR: where the compiled check is built (default: the user cache folder)
    cache_dir: str | None = None
    #: BNVIZ_PREFETCH: compute the other global mode's view while the charts are read
    prefetch: bool = True
    #: BNVIZ_PREFETCH_QUIET_S: seconds a local browser must be idle before prefetching
    prefetch_quiet_s: float = 0.75
    #: BNVIZ_SHARED_SERVER: the server is shared by a class (set by ``bnviz serve-class``):
    #: no browser counts as local, so none holds the prefetch back
    shared_server: bool = False
    #: BNVIZ_OVERLAP: condense kept layers on a spare core while the forward runs
    overlap: bool = True
    #: BNVIZ_CONDENSE_WORKERS: threads that condense layers (default: one per core)
    condense_workers: int | None = None
    #: BNVIZ_RELEASE_DELAY_S: idle seconds before the server returns freed memory
    release_delay_s: float = 120.0
    #: BNVIZ_TORCH_THREADS: torch threads of the dashboard process (default: half the
    #: cores, at most torch's own default)
    torch_threads: int | None = None
    #: BNVIZ_VIEW_CACHE: configurations whose condensed views the server keeps
    view_cache: int = 16
    #: BNVIZ_MEMORY_BUDGET_MB: the most memory one network run may need; larger runs are
    #: refused before they start (default: a quarter of the machine's memory divided by
    #: the run slots)
    memory_budget_mb: int | None = None
    #: BNVIZ_RUN_SLOTS: network runs the server does at once; the others wait in one queue
    #: (default: cores / (2 x torch threads), at least 1)
    run_slots: int | None = None
    #: BNVIZ_RUN_QUEUE: runs that may wait for a slot; one more is refused ("busy")
    run_queue: int = 16
    #: BNVIZ_TRAINING_JOBS: Training-lab runs the server trains at once; later ones wait
    #: in a queue (default: half the cores, at least 1)
    training_jobs: int | None = None
    #: BNVIZ_TRAINING_REDRAW_S: least seconds between two redraws of a running job's charts
    training_redraw_s: float = 3.0
    #: BNVIZ_TIMING: log how long each part of a dashboard rerun took
    timing: bool = False
    #: BNVIZ_UPLOAD_TTL_S: seconds an uploaded image is kept on the server after its last
    #: use (in a private folder of the process, deleted at exit)
    upload_ttl_s: float = 3 * 3600.0
    #: BNVIZ_SERVE_SPEC: the private file in which ``bnviz serve`` names the operator's
    #: model and input (never set by hand; no link can name a model that is not served)
    serve_spec: str | None = None


@functools.cache
def settings() -> Settings:
    """The settings of this process, read from the environment on first use."""
    return Settings(
        probe_kernel=_flag("BNVIZ_PROBE_KERNEL", True),
        cache_dir=os.environ.get("BNVIZ_CACHE_DIR") or None,
        prefetch=_flag("BNVIZ_PREFETCH", True),
        prefetch_quiet_s=_float("BNVIZ_PREFETCH_QUIET_S", 0.75),
        shared_server=_flag("BNVIZ_SHARED_SERVER", False),
        overlap=_flag("BNVIZ_OVERLAP", True),
        condense_workers=_int("BNVIZ_CONDENSE_WORKERS", None),
        # a negative delay means "at once", as it always did (not the default)
        release_delay_s=max(0.0, _float("BNVIZ_RELEASE_DELAY_S", 120.0, lo=-math.inf)),
        torch_threads=_int("BNVIZ_TORCH_THREADS", None),
        view_cache=_int("BNVIZ_VIEW_CACHE", 16) or 16,
        memory_budget_mb=_int("BNVIZ_MEMORY_BUDGET_MB", None),
        run_slots=_int("BNVIZ_RUN_SLOTS", None),
        run_queue=_int("BNVIZ_RUN_QUEUE", 16, lo=0) or 0,
        training_jobs=_int("BNVIZ_TRAINING_JOBS", None),
        training_redraw_s=_float("BNVIZ_TRAINING_REDRAW_S", 3.0),
        timing=os.environ.get("BNVIZ_TIMING") == "1",
        upload_ttl_s=_float("BNVIZ_UPLOAD_TTL_S", 3 * 3600.0),
        serve_spec=os.environ.get("BNVIZ_SERVE_SPEC") or None,
    )
