"""The compiled probe: the manual-vs-native check of one BN layer in one or two reads.

:func:`bnviz.manual_bn.probe_layer` needs six memory passes over an activation in eager
PyTorch; on a CPU, where these networks are memory-bound, that made ``inspect`` cost well
over a plain forward (the numbers are in BENCHMARKS.md). ``csrc/probe.cpp`` does the same
arithmetic -- the formula of :mod:`bnviz.manual_bn`, no BatchNorm code -- reading the
input and the native output once each (eval) or the input twice (train, the second time from
cache), inside PyTorch's own thread pool.

It is built ahead of time, never in the middle of an inspection::

    bnviz build-kernel        # `make run` and `make test` do it for you

which compiles the file with the system C++ compiler (some seconds, once per torch version)
into ``~/.cache/bnviz/kernels`` (``$BNVIZ_CACHE_DIR`` overrides); a compiler without OpenMP
(Apple's clang) gets a build whose check runs on the calling thread. Each process decides
once, at its first inspection, whether the library is there: two inspections in one
process always use the same code, so their numbers are identical to the last bit. Without
a compiler, on CUDA, for dtypes other than float32 or non-contiguous tensors, the eager
path runs instead: same quantities, more passes. ``BNVIZ_PROBE_KERNEL=0`` turns the
compiled path off.

The build writes the library's size and sha256 next to it (``<library>.json``), and a
library is loaded only when it still matches that record: loading a truncated or damaged
shared library can kill the whole process with SIGBUS (in the dashboard, the server of every
student). A library that does not match is never loaded; ``inspect`` then uses the eager
check and says so in one line on stderr, and ``bnviz build-kernel`` rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .settings import settings

SOURCE = Path(__file__).with_name("csrc") / "probe.cpp"
CXX_FLAGS = ("-O3", "-std=c++20", "-fPIC", "-shared", "-Wno-psabi")
#: Tried first: the check then runs on PyTorch's OpenMP threads. Compilers without OpenMP
#: (Apple's clang) build it without, and the check runs on the calling thread.
OPENMP_FLAG = "-fopenmp"


class KernelBuildError(RuntimeError):
    """The C++ compiler could not build ``csrc/probe.cpp``; the message says why."""


def cache_dir() -> Path:
    """Where built kernels live: ``$BNVIZ_CACHE_DIR`` or ``~/.cache/bnviz/kernels``."""
    root = settings().cache_dir
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "bnviz" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def library_path() -> Path:
    """The library for this source, this torch and these flags (any change gets a new file)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join((*CXX_FLAGS, OPENMP_FLAG)).encode())
    key.update(torch.__version__.encode())
    key.update(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    return cache_dir() / f"bnviz_probe-{key.hexdigest()[:16]}.so"


def record_path(library: Path) -> Path:
    """The build record next to ``library``: its size and sha256 when it was built."""
    return library.with_name(library.name + ".json")


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _write_record(library: Path) -> None:
    """Record ``library``'s size and sha256 (temporary name + rename, like the library)."""
    record = {"size": library.stat().st_size, "sha256": _sha256(library),
              "torch": torch.__version__}
    with tempfile.NamedTemporaryFile("w", dir=library.parent, suffix=".json.tmp",
                                     delete=False) as tmp:
        json.dump(record, tmp)
    os.replace(tmp.name, record_path(library))


def verify(library: Path) -> str | None:
    """None when ``library`` is exactly the file its build recorded; else why not (a phrase).

    Only the size and hash are read, never the library itself: a truncated library would
    crash the process as it is mapped.
    """
    try:
        record = json.loads(record_path(library).read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return "it has no build record (built by an older bnviz, or not by bnviz)"
    except (OSError, ValueError, KeyError, TypeError):
        return "its build record cannot be read"
    try:
        actual = library.stat().st_size
        if actual != size:
            return f"it has {actual} bytes where its build wrote {size} (truncated or replaced)"
        if _sha256(library) != digest:
            return "its sha256 differs from the one recorded at its build (damaged or replaced)"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    return None


def build(verbose: bool = False) -> Path:
    """Compile the probe unless this version is built and verified; return the library's path.

    Written to a temporary name and renamed, so a concurrent build or a crash never leaves
    a half-written library where a process would load it; a library that fails
    :func:`verify` is rebuilt (the rename gives it a new file, so processes that have the
    old one loaded keep working).
    """
    target = library_path()
    if target.exists() and verify(target) is None:
        return target
    cxx = _compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX); "
                               "bnviz keeps using the eager check")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so.tmp",
                                         delete=False) as tmp:
            partial = Path(tmp.name)
    except OSError as exc:
        raise KernelBuildError(f"cannot write to {target.parent} ({exc.strerror}); set "
                               "BNVIZ_CACHE_DIR to a writable folder") from exc
    torch_dir = os.path.dirname(torch.__file__)
    includes = [f"-I{os.path.join(torch_dir, 'include')}"]
    lib_dir = os.path.join(torch_dir, "lib")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    tail = [abi, *includes, str(SOURCE), "-o", str(partial), f"-L{lib_dir}", "-lc10",
            "-ltorch_cpu", f"-Wl,-rpath,{lib_dir}"]
    attempts = [[cxx, *CXX_FLAGS, OPENMP_FLAG, *tail], [cxx, *CXX_FLAGS, *tail]]
    log_text = ""
    try:
        for cmd in attempts:
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as exc:
                raise KernelBuildError(f"cannot run the compiler {cxx!r} ({exc.strerror}); "
                                       "install g++ or set CXX") from exc
            if done.returncode == 0:
                os.replace(partial, target)
                _write_record(target)
                return target
            log_text += " ".join(cmd) + "\n\n" + done.stdout + done.stderr + "\n"
        log = target.with_suffix(".log")
        log.write_text(log_text)
        raise KernelBuildError(f"{cxx} failed to compile {SOURCE.name} "
                               f"(exit {done.returncode}; compiler output in {log})")
    finally:
        partial.unlink(missing_ok=True)


_lock = threading.Lock()
_state: dict[str, object] = {}


def status() -> tuple[bool, str]:
    """(usable, why): whether this process uses the compiled probe, decided on first call.

    A library that fails :func:`verify` is not loaded; one line on stderr says so (once per
    process: the CLI's user and the server's log both see it).
    """
    if "usable" not in _state:
        with _lock:
            if "usable" not in _state:
                usable, why, refused = _checked_load()
                if refused:
                    print(f"bnviz: {why}", file=sys.stderr, flush=True)
                _state["usable"], _state["why"] = usable, why
    return bool(_state["usable"]), str(_state["why"])


def available() -> bool:
    """True when this process checks float32 CPU layers with the compiled probe."""
    return status()[0]


def _load() -> tuple[bool, str]:
    usable, why, _ = _checked_load()
    return usable, why


def _checked_load() -> tuple[bool, str, bool]:
    """(usable, why, refused): refused when a library is there but fails :func:`verify`."""
    if not settings().probe_kernel:
        return False, "turned off by BNVIZ_PROBE_KERNEL", False
    path = library_path()
    if not path.exists():
        return False, "not built (run `bnviz build-kernel`; `make` does it)", False
    problem = verify(path)
    if problem is not None:
        return False, (f"the compiled probe {path} was not loaded: {problem}; using the eager "
                       "check (same numbers, slower) until 'bnviz build-kernel' rebuilds it"), True
    try:
        if not hasattr(torch.ops.bnviz, "probe"):
            torch.ops.load_library(str(path))
        # both operators, or raise: a library from another source would miss one
        torch.ops.bnviz.probe  # noqa: B018
        torch.ops.bnviz.probe_into  # noqa: B018
    except (OSError, RuntimeError, AttributeError) as exc:
        return False, f"could not load {path.name}: {exc}", False
    return True, f"compiled ({path})", False


@contextlib.contextmanager
def forced(enabled: bool):
    """Use (or not) the compiled probe inside the block -- for tests that compare both.

    Process-wide: never use it around concurrent inspections that expect one backend.
    """
    saved = dict(_state)
    if enabled:
        usable, why = _load()
        if not usable:
            raise RuntimeError(f"compiled probe unavailable: {why}")
        _state.update(usable=True, why=why)
    else:
        _state.update(usable=False, why="turned off for this block")
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def applies(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether the compiled probe can take this layer (else the eager path runs)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and y.dtype == torch.float32
            and x.dim() >= 2 and x.shape == y.shape and x.numel() > 0
            and x.is_contiguous() and y.is_contiguous())
