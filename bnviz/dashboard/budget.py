"""Memory and time of one network run, known before it runs, and the per-run memory budget.

A dashboard run (:func:`bnviz.inspect` with every tensor kept, then condensing) holds every
BatchNorm layer's input, output and activation at once, so its memory grows with batch x
size² and differs a lot between models (densenet121's BatchNorm layers read the
concatenated features of their whole block). The estimate is computed from the model
itself: one small forward (batch 1, 64 px) on a private copy counts what each BatchNorm
layer would keep, the largest single activation and the multiply-accumulates, per input
pixel (:func:`activation_profile`, made once per model). The factors that turn those counts
into bytes and seconds come from measured runs; the method and the numbers are in
docs/dashboard.md ("Memory budget and run queue") and ``benchmarks/calibrate_budget.py``.

A run whose estimate is above the budget (``BNVIZ_MEMORY_BUDGET_MB``; default: a quarter
of this machine's memory shared by the run slots) is refused before its batch is built,
with the largest batch and size that fit (:func:`check_budget`).
"""

from __future__ import annotations

import copy
import math
import statistics
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BnvizError
from ..machine import machine_memory_bytes
from ..norms import is_norm_layer
from ..settings import settings
from ..stimuli import MAX_BATCH_SIZE, MAX_SIZE, MIN_SIZE
from .run_queue import run_queue

#: float32
BYTES_PER_ELEMENT = 4
#: Measured peak growth of a kept run over what its BatchNorm layers keep (the rest: the
#: forward's temporaries, the check's scratch buffer, condensing).
KEPT_FACTOR = 1.15
#: Measured peak of a run that keeps nothing, in multiples of its largest activation.
TRANSIENT_FACTOR = 4.0
#: What any run needs besides activations (its private copy's buffers, bookkeeping).
OVERHEAD_BYTES = 16 * 2**20
#: Sizes tried for the profiling forward, smallest first (a model may refuse small inputs).
PROFILE_SIZES = (64, 128, 224)
#: Time model: multiply-accumulates per second per torch thread, bytes kept per second,
#: and a fixed part per run; scaled by what this server's runs really took (RunTimes).
MACS_PER_SECOND_PER_THREAD = 10e9
KEPT_BYTES_PER_SECOND = 1.0e9
SECONDS_PER_RUN = 0.1


class RunTooLarge(BnvizError):
    """A run's estimated memory is above this server's per-run budget."""


class RunOutOfMemory(BnvizError):
    """A run ran out of memory (the estimate was too low, or the machine is full)."""


@dataclass(frozen=True)
class ActivationProfile:
    """What one image of a model costs, from one small forward.

    ``*_per_pixel`` grow with the input's pixels (tensors with spatial dimensions);
    ``*_fixed`` do not (after global pooling). Elements, not bytes.
    """

    model: str
    kept_per_pixel: float  # BatchNorm input + output + activation, summed over every call
    kept_fixed: float
    peak_per_pixel: float  # the largest single activation
    peak_fixed: float
    macs_per_pixel: float
    macs_fixed: float
    probe_size: int

    def kept_elements(self, size: int) -> float:
        return self.kept_per_pixel * size * size + self.kept_fixed

    def peak_elements(self, size: int) -> float:
        return max(self.peak_per_pixel * size * size, self.peak_fixed)

    def macs(self, size: int) -> float:
        return self.macs_per_pixel * size * size + self.macs_fixed


@dataclass(frozen=True)
class RunEstimate:
    """Memory and time of one run of ``model`` on ``batch`` images of ``size`` px."""

    model: str
    batch: int
    size: int
    keep_tensors: bool
    device: str
    memory_bytes: int
    seconds: float
    kept_bytes: int  # what the BatchNorm layers keep (0 without kept tensors)
    input_bytes: int  # the raw batch and its preprocessed copy

    def text(self) -> str:
        """``about 1.2 GB of memory and 3 s``."""
        return (f"about {format_bytes(self.memory_bytes)} of memory and "
                f"{format_seconds(self.seconds)}")


def estimate_caption(estimate: RunEstimate, budget: int) -> str:
    """The sentence under the controls: what this run will take, and what is allowed."""
    over = " (too much: see the message)" if estimate.memory_bytes > budget else ""
    return (f"Estimated run: {estimate.text()}{over}; this server allows about "
            f"{format_bytes(budget)} per run.")


def format_bytes(n: float) -> str:
    if n >= 100 * 2**30:
        return f"{n / 2**30:,.0f} GB"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    return f"{max(1.0, n / 2**20):.0f} MB"


def format_seconds(s: float) -> str:
    if s < 1:
        return "under 1 s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min"


# -- the profile of a model ---------------------------------------------------------------------

_PROFILES: weakref.WeakKeyDictionary[nn.Module, ActivationProfile | None] = \
    weakref.WeakKeyDictionary()
_PROFILE_LOCK = threading.Lock()


def _structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s modules that shares its parameters and clones its buffers,
    without the caller's hooks: the profiling forward changes nothing anybody else sees."""
    memo: dict[int, Any] = {id(p): p for p in module.parameters()}
    for b in module.buffers():
        memo[id(b)] = b.detach().clone()
    for m in module.modules():
        for key, value in vars(m).items():
            if "hooks" in key and isinstance(value, dict):
                memo[id(value)] = OrderedDict()
    return copy.deepcopy(module, memo)


def _count(module: nn.Module, preprocess, size: int) -> dict[str, float]:
    """One eval forward of ``module`` on one ``size`` px image, counting elements."""
    private = _structural_copy(module).eval()
    counts = dict.fromkeys(("kept_s", "kept_f", "peak_s", "peak_f", "macs_s", "macs_f"), 0.0)

    def add(kind: str, t: object, n: float | None = None) -> None:
        if isinstance(t, torch.Tensor):
            spatial = t.dim() >= 3
            value = float(t.numel()) if n is None else n
            counts[kind + ("_s" if spatial else "_f")] += value

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if is_norm_layer(mod):
            # kept: the input and the output, and the activation after it (one more tensor of
            # the output's size; an in-place activation makes the output a clone instead)
            add("kept", args[0] if args else None)
            add("kept", out, 2.0 * out.numel())
        if not any(True for _ in mod.children()):
            key = "peak_s" if out.dim() >= 3 else "peak_f"
            counts[key] = max(counts[key], float(out.numel()))
        if isinstance(mod, nn.Conv2d | nn.Conv1d | nn.Conv3d):
            add("macs", out, float(out.numel()) * mod.in_channels / mod.groups
                * math.prod(mod.kernel_size))
        elif isinstance(mod, nn.Linear):
            add("macs", out, float(out.numel()) * mod.in_features)

    for m in private.modules():
        m.register_forward_hook(hook)
    raw = torch.full((1, 3, size, size), 0.5)
    with torch.inference_mode():
        private(preprocess(raw) if preprocess is not None else raw)
    return counts


def activation_profile(loaded) -> ActivationProfile | None:
    """The :class:`ActivationProfile` of a :class:`bnviz.LoadedModel` (made once per model
    and process; None when its forward refuses every profile size, such as a model that
    does not take images)."""
    module = loaded.module
    with _PROFILE_LOCK:
        if module in _PROFILES:
            return _PROFILES[module]
    profile = None
    for size in PROFILE_SIZES:
        try:
            c = _count(module, getattr(loaded, "preprocess", None), size)
        except Exception:  # noqa: BLE001 - too small for this model, or not an image model
            continue
        pixels = float(size * size)
        profile = ActivationProfile(
            model=str(getattr(loaded, "name", type(module).__name__)),
            kept_per_pixel=c["kept_s"] / pixels, kept_fixed=c["kept_f"],
            peak_per_pixel=c["peak_s"] / pixels, peak_fixed=c["peak_f"],
            macs_per_pixel=c["macs_s"] / pixels, macs_fixed=c["macs_f"], probe_size=size)
        break
    with _PROFILE_LOCK:
        _PROFILES[module] = profile
    return profile


# -- time, calibrated on this server ------------------------------------------------------------


class RunTimes:
    """What this server's runs took against what the time model predicted, per device
    type: estimates are scaled by the median ratio of the last ``window`` runs."""

    def __init__(self, window: int = 9) -> None:
        self._lock = threading.Lock()
        self._ratios: dict[str, deque[float]] = {}
        self.window = window

    def note(self, estimate: RunEstimate, seconds: float) -> None:
        if estimate.seconds > 0 and seconds > 0:
            with self._lock:
                ratios = self._ratios.setdefault(_device_type(estimate.device),
                                                 deque(maxlen=self.window))
                ratios.append(seconds / estimate.seconds)

    def scale(self, device: str) -> float:
        with self._lock:
            ratios = self._ratios.get(_device_type(device))
            return statistics.median(ratios) if ratios else 1.0


RUN_TIMES = RunTimes()


def _device_type(device: object) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


# -- the estimate -------------------------------------------------------------------------------


def estimate_run(loaded, batch: int, size: int, *, keep_tensors: bool = True,
                 device: str = "cpu",
                 profile: ActivationProfile | None = None) -> RunEstimate | None:
    """Memory and time of one dashboard run of ``loaded`` on ``batch`` images of ``size``
    px, before anything is built (None when the model has no profile).

    ``keep_tensors=True``: a view (every BatchNorm layer's tensors kept, then condensed);
    False: the all-eval reference (statistics only). Memory is the growth of the server's
    memory while the run lasts; the run's batch included.
    """
    profile = profile or activation_profile(loaded)
    if profile is None:
        return None
    batch, size = int(batch), int(size)
    input_bytes = 2 * batch * 3 * size * size * BYTES_PER_ELEMENT
    if keep_tensors:
        kept = batch * profile.kept_elements(size) * BYTES_PER_ELEMENT
        memory = KEPT_FACTOR * kept + input_bytes + OVERHEAD_BYTES
    else:
        kept = 0.0
        memory = (TRANSIENT_FACTOR * batch * profile.peak_elements(size) * BYTES_PER_ELEMENT
                  + input_bytes + OVERHEAD_BYTES)
    threads = max(1, torch.get_num_threads())
    seconds = (SECONDS_PER_RUN + batch * profile.macs(size)
               / (MACS_PER_SECOND_PER_THREAD * threads) + kept / KEPT_BYTES_PER_SECOND)
    return RunEstimate(model=profile.model, batch=batch, size=size,
                       keep_tensors=keep_tensors, device=str(device),
                       memory_bytes=int(memory), seconds=seconds * RUN_TIMES.scale(device),
                       kept_bytes=int(kept), input_bytes=input_bytes)


# -- the budget ---------------------------------------------------------------------------------


def memory_budget_bytes() -> int:
    """The most memory one run may take: ``BNVIZ_MEMORY_BUDGET_MB``, or by default a
    quarter of :func:`machine_memory_bytes` divided by the run slots (the runs that may
    hold their activations at once), so that every slot's run together leave three
    quarters of the machine to the models, the cached views, the labs and the system."""
    mb = settings().memory_budget_mb
    if mb is not None:
        return int(mb) * 2**20
    return machine_memory_bytes() // (4 * run_queue().slots)


def largest_fitting(loaded, batch: int, size: int, budget: int, *, keep_tensors: bool = True,
                    device: str = "cpu") -> tuple[int, int]:
    """(largest batch at ``size``, largest size at ``batch``) whose estimate fits ``budget``;
    0 where none does."""
    profile = activation_profile(loaded)

    def fits(b: int, s: int) -> bool:
        est = estimate_run(loaded, b, s, keep_tensors=keep_tensors, device=device,
                           profile=profile)
        return est is None or est.memory_bytes <= budget

    return (_largest(lambda b: fits(b, size), 1, MAX_BATCH_SIZE),
            _largest(lambda s: fits(batch, s), MIN_SIZE, MAX_SIZE))


def _largest(fits, lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with fits(n) (fits is monotone), 0 if none."""
    if not fits(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_budget(loaded, batch: int, size: int, *, keep_tensors: bool = True,
                 device: str = "cpu", budget: int | None = None) -> RunEstimate | None:
    """The run's estimate if it fits the budget; :class:`RunTooLarge` if it does not,
    naming the estimate and the largest batch and size that fit."""
    budget = memory_budget_bytes() if budget is None else budget
    est = estimate_run(loaded, batch, size, keep_tensors=keep_tensors, device=device)
    if est is None or est.memory_bytes <= budget:
        return est
    max_batch, max_size = largest_fitting(loaded, batch, size, budget,
                                          keep_tensors=keep_tensors, device=device)
    options = []
    if max_batch:
        options.append(f"batch ≤ {max_batch} at {size} px")
    if max_size:
        options.append(f"batch {batch} at ≤ {max_size} px")
    fits = (". What fits: " + ", or ".join(options)) if options else \
        ". Not even one image of this size fits"
    raise RunTooLarge(
        f"Batch {batch} at {size} px on {est.model} needs about "
        f"{format_bytes(est.memory_bytes)} of memory; this server allows about "
        f"{format_bytes(budget)} per run{fits}. Nothing was run.",
        "lower the batch size or the image size.")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: Python's MemoryError, PyTorch's CUDA or CPU
    allocator, or bnviz's DeviceError wrapping one of those."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError | torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError):
            text = str(exc).lower()
            if any(m in text for m in ("out of memory", "can't allocate memory",
                                       "cannot allocate memory", "alloc_failed")):
                return True
        exc = exc.__cause__
    return False


def out_of_memory_error(batch: int, size: int, model: str) -> RunOutOfMemory:
    return RunOutOfMemory(
        f"The server ran out of memory running batch {batch} at {size} px on {model}; "
        "nothing of this run was kept.",
        "lower the batch size or the image size (or try again when the server is less "
        "busy).")
