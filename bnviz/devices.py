"""Device selection: ``"auto"`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a ``torch.device``.

    Raises :class:`DeviceError` when CUDA is requested but unavailable, so the caller
    sees "CUDA is not available" rather than a deep PyTorch stack trace.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(
            f"Unknown device {device!r}.", "use one of: auto, cpu, cuda (or cuda:N)."
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "CUDA was requested but no CUDA device is available on this machine.",
                "use --device cpu (or auto), or install a CUDA build of PyTorch on a GPU machine.",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"CUDA device {dev.index} does not exist ({torch.cuda.device_count()} visible).",
                "pick an index below the device count.",
            )
    elif dev.type != "cpu":
        raise DeviceError(f"Device type {dev.type!r} is not supported.", "use cpu or cuda.")
    return dev


def available_devices() -> list[str]:
    """Devices the tests and the dashboard can offer on this machine."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


#: How cuDNN and cuBLAS say they could not get workspace memory: a RuntimeError without
#: "out of memory" in it, but the same problem with the same fix.
_OOM_MARKERS = ("out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed")


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory (PyTorch's allocator, cuDNN or
    cuBLAS), so the message can name the fix instead of showing a traceback."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)
