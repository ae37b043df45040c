"""What one server process shares between its sessions: PyTorch's threads, the memory a
forward frees, and the long-lived objects the garbage collector need not scan.

The measurements behind each choice are in docs/dashboard.md ("Built for a class on one
server"); here only the reasons.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from typing import Any

import torch

from ..settings import settings

_THREADS_SET = False


def configure_torch_threads() -> int:
    """Limit PyTorch's intra-op threads for a shared server; returns the count in use.

    Many sessions run forwards at the same time on one server, and with one OpenMP thread
    per core each, concurrent forwards oversubscribe the cores and the spinning threads slow
    everything down many times over. Default: half the cores (at least 1, at most PyTorch's
    own default); ``BNVIZ_TORCH_THREADS`` overrides.

    Once per process is enough: PyTorch keeps the count globally and every new thread
    (Streamlit runs each rerun in a new one) adopts it. It also makes results bit-identical
    across sessions: float32 reductions split over a different number of threads differ in
    the last bits. That is the whole thread policy of a server: fixed here when it starts,
    never changed by a run (a change would be every session's, mid-forward); how many runs
    go at once is the run queue's business (:func:`bnviz.dashboard.run_slots`).
    """
    global _THREADS_SET
    if not _THREADS_SET:
        wanted = settings().torch_threads
        half = max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(wanted if wanted is not None
                              else min(half, torch.get_num_threads()))
        _THREADS_SET = True
    return torch.get_num_threads()


def freeze_long_lived_objects() -> int:
    """Exempt every object alive now (modules, the loaded model) from garbage collection
    scans; returns how many objects are exempt.

    With PyTorch, torchvision, plotly and pandas imported, a full collection scans hundreds
    of thousands of objects while holding the GIL, and a finished rerun cannot reach the
    browser meanwhile. ``gc.freeze()`` moves what is alive now into the permanent
    generation, so a collection only scans what was created since and still frees every
    reference cycle a session creates. Call it once a model has been loaded: nearly
    everything alive then lives as long as the process, and nothing collectable is frozen.
    """
    gc.freeze()
    return gc.get_freeze_count()


# -- handing freed activation memory back to the system ---------------------------------------

_RELEASE_LOCK = threading.Lock()
_RELEASE: dict[str, Any] = {"running": 0, "timer": None}
_LIBC: Any = None


def _release_delay() -> float:
    """Seconds without a forward before the freed memory goes back to the system
    (``BNVIZ_RELEASE_DELAY_S``, default 120; see :func:`release_memory` for why so long)."""
    return settings().release_delay_s


def _forward_started() -> None:
    with _RELEASE_LOCK:
        _RELEASE["running"] += 1
        timer = _RELEASE["timer"]
        if timer is not None:
            timer.cancel()
            _RELEASE["timer"] = None


def _forward_finished() -> None:
    with _RELEASE_LOCK:
        _RELEASE["running"] -= 1
        if _RELEASE["running"] == 0:
            timer = threading.Timer(_release_delay(), _release_when_idle)
            timer.daemon = True
            _RELEASE["timer"] = timer
            timer.start()


def _release_when_idle() -> None:
    with _RELEASE_LOCK:
        if _RELEASE["running"]:  # a forward started meanwhile; it schedules the next one
            return
        _RELEASE["timer"] = None
    release_memory()


def release_pending() -> bool:
    """Whether a deferred :func:`release_memory` is scheduled (for tests)."""
    with _RELEASE_LOCK:
        return _RELEASE["timer"] is not None


def release_memory() -> None:
    """Hand the freed activation memory back to the operating system.

    After a kept report is dropped glibc keeps most of its memory in the heap, so a server's
    RSS would grow by hundreds of MB per configuration instead of what its condensed view
    holds; ``malloc_trim`` returns it (a no-op where glibc is not the allocator). It runs
    only once no forward has run for :func:`_release_delay` seconds, because the next
    forward would fault all those pages in again; two minutes, because a student reads the
    charts before the next change. The price: a server idle for less than that still holds
    one forward's activations as free heap.
    """
    # Streamlit's collection after every rerun is off (.streamlit/config.toml): reference
    # cycles a session left behind are collected here, while nobody waits.
    gc.collect()
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - attribute check: musl, macOS lack it
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    # PyTorch keeps freed GPU memory reserved for its next allocation; on a GPU shared by
    # other sessions' processes that looks like a leak, so it goes back too (same delay).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
