"""How many CPU threads a training run uses, set for its own thread only.

``torch.set_num_threads`` changes the count of the whole process: while one dashboard job
trained with 1 thread, every other session's forward ran with 1 too, and two overlapping
jobs, each putting back what it had found, could leave the server at 1 for good. But
torch's CPU ops (its own parallel loops and oneDNN's convolutions) split their work over
the OpenMP runtime's threads, and OpenMP keeps one thread count per calling thread.
:func:`torch_threads` sets that per-thread count, in the runtime torch has already loaded,
so a run's thread trains with ``n`` threads while the process's count, and every other
thread, stay as they were. (MKL keeps its own per-thread count, which stays torch's: the
lab's matrix products are too small for MKL to split.)

Why a run wants 1: the lab's tensors are tiny, so a second thread gains little, but an
OpenMP team that waits for a core taken by another session spins and stalls (measured on a
busy 2-core machine: 40 steps at batch 128 took 20-58 s with one thread, 190-290 s with
two).

Where torch has no OpenMP runtime to ask (or the per-thread setting does not take), the
block runs with the process's count: slower on a busy machine, never wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch has loaded (never a second copy:
    only libraries already in the process are opened), or None."""
    libdir = Path(torch.__file__).parent / "lib"
    no_load = getattr(os, "RTLD_NOLOAD", None)

    def loaded(path: Path | None) -> ctypes.CDLL | None:
        if path is None:
            return ctypes.CDLL(None)  # the symbols the process already shares globally
        if no_load is None:
            return None
        try:
            return ctypes.CDLL(str(path), mode=no_load | os.RTLD_LAZY)
        except OSError:  # not loaded: not the runtime torch uses
            return None

    def symbol(paths: list[Path | None], name: str):
        for path in paths:
            lib = loaded(path)
            if lib is not None and hasattr(lib, name):
                return getattr(lib, name)
        return None

    omp = symbol([*sorted(libdir.glob("libgomp*.so*")), *sorted(libdir.glob("libiomp*.so*")),
                  None], "omp_set_num_threads")
    if omp is not None:
        omp.argtypes, omp.restype = [ctypes.c_int], None
    return omp


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[bool]:
    """Let torch's CPU ops in the calling thread use ``n`` threads inside the block, then
    put this thread's setting back; yields whether the setting took. ``None``: no change.

    Neither the process's count (``torch.set_num_threads``) nor any other thread is
    touched, so concurrent runs in a server cannot change each other's or the sessions'
    thread counts."""
    if n is None:
        yield False
        return
    # torch copies the process's count into each thread's runtimes on the thread's first
    # parallel op; that has to happen first, or it would overwrite ours.
    before = torch.get_num_threads()
    omp = _omp_set_num_threads()
    if omp is None:
        yield False
        return
    omp(n)
    try:
        yield torch.get_num_threads() == n  # this thread's count, as torch reads it
    finally:
        omp(before)


__all__ = ["torch_threads"]
