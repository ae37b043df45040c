"""CPU copies for reports: a report's tensors never alias the model's, and many small ones
are copied in one operation instead of one each."""

from __future__ import annotations

import torch


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` detached, on the CPU, in float32 unless it is float32 or float64 already (may be
    ``t`` itself)."""
    if t is None:
        return None
    t = t.detach()
    if t.is_floating_point() and t.dtype != torch.float32 and t.dtype != torch.float64:
        t = t.float()
    return t.cpu() if t.device.type != "cpu" else t


def _cpu_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A CPU copy that cannot alias ``t``."""
    if t is None:
        return None
    c = _cpu(t)
    return c.clone() if c.data_ptr() == t.data_ptr() else c


@torch.no_grad()
def _report_tensors(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """CPU copies of many small tensors: one ``cat`` per dtype and device, split into views.

    ``cat`` is the copy (a report must not change when the model's buffers do), and one
    copy of all layers' vectors replaces a few hundred tiny clones and device transfers.
    """
    first = tensors[0] if tensors else None
    if first is not None:  # the usual case: all present, one dtype, one device, vectors
        dtype, device = first.dtype, first.device
        if all(t is not None and t.dtype == dtype and t.device == device and t.dim() == 1
               for t in tensors):
            flat = _cpu(torch.cat(tensors))
            return list(flat.split([t.shape[0] for t in tensors]))  # type: ignore
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t is not None:
            groups.setdefault((t.dtype, t.device), []).append(i)
    for idxs in groups.values():
        parts = [tensors[i] for i in idxs]
        flat = _cpu(torch.cat([p if p.dim() == 1 else p.reshape(-1) for p in parts]))
        for i, p, piece in zip(idxs, parts, flat.split([p.numel() for p in parts]),
                               strict=True):
            out[i] = piece if p.dim() == 1 else piece.view(p.shape)
    return out


def _ints(tensors: list[torch.Tensor | None]) -> list[int | None]:
    """Integer values of many 0-dim tensors (num_batches_tracked) with one sync."""
    present = [t for t in tensors if t is not None]
    values = iter(torch.stack(present).tolist()) if present else iter(())
    return [None if t is None else int(next(values)) for t in tensors]
