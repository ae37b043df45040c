"""The BatchNorm formulas people write by hand, evaluated on a layer's real input.

Each candidate differs from the layer's true computation by exactly one classic mistake
(docs/stories.md sections 1 and 5), all in float64 from the same input:

* ``batch``: batch mean and *biased* variance over (N, H, W) -- what train mode computes;
* ``running``: the running statistics -- what eval mode computes;
* ``batch_unbiased``: batch statistics with the unbiased variance (``x.var()``);
* ``no_affine``: gamma/beta left out (with the statistics the layer really uses);
* ``eps_outside``: ``sqrt(var) + eps`` instead of ``sqrt(var + eps)``;
* ``per_sample``: statistics of each image alone (over H, W) instead of over the batch.

A candidate *matches* an output when its relative error
``max|candidate - output| / max|output|`` is at most :data:`MATCH_RTOL`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CANDIDATES", "MATCH_RTOL", "Candidate", "candidate_outputs", "relative_error"]

#: A candidate matches when its relative error against the reference is at most this.
MATCH_RTOL = 1e-5


@dataclass(frozen=True)
class Candidate:
    """One formula someone might write, the mistake it amounts to, and its fix."""

    key: str
    label: str
    formula: str
    mistake: str  # what someone who computed this did, in their words
    fix: str


CANDIDATES: tuple[Candidate, ...] = (
    Candidate(
        "batch", "batch statistics, biased variance",
        "(x - mean_NHW(x)) / sqrt(var_NHW(x, biased) + eps) * gamma + beta",
        "normalised with the mean and biased variance of this batch",
        "in eval mode the layer normalises with running_mean / running_var instead",
    ),
    Candidate(
        "running", "running statistics",
        "(x - running_mean) / sqrt(running_var + eps) * gamma + beta",
        "normalised with the running statistics",
        "in train mode the layer normalises with the batch's own mean and biased variance "
        "(per channel over N, H, W); call model.eval() to make it use the running statistics",
    ),
    Candidate(
        "batch_unbiased", "batch statistics, unbiased variance (x.var())",
        "(x - mean_NHW(x)) / sqrt(var_NHW(x, unbiased) + eps) * gamma + beta",
        "used the unbiased variance (torch.var's default)",
        "BatchNorm normalises with the biased variance: x.var(dim=(0, 2, 3), unbiased=False); "
        "the unbiased one only feeds the running_var update",
    ),
    Candidate(
        "no_affine", "gamma/beta left out",
        "(x - mean) / sqrt(var + eps)",
        "left out the affine step",
        "multiply by weight (gamma) and add bias (beta), per channel, after normalising",
    ),
    Candidate(
        "eps_outside", "eps outside the square root",
        "(x - mean) / (sqrt(var) + eps) * gamma + beta",
        "added eps outside the square root",
        "eps goes inside the square root: sqrt(var + eps)",
    ),
    Candidate(
        "per_sample", "statistics per sample instead of over the batch",
        "(x - mean_HW(x[n])) / sqrt(var_HW(x[n]) + eps) * gamma + beta",
        "took the statistics of each image separately (that is InstanceNorm)",
        "BatchNorm pools each channel's statistics over the whole batch (N, H, W)",
    ),
)
CANDIDATE_BY_KEY = {c.key: c for c in CANDIDATES}


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _normalise(x, mean, var, eps, weight, bias, *, eps_outside=False):
    std = torch.sqrt(var) + eps if eps_outside else torch.sqrt(var + eps)
    y = (x - mean) / std
    if weight is not None:
        y = y * _channel_view(weight, x.dim())
    if bias is not None:
        y = y + _channel_view(bias, x.dim())
    return y


def candidate_outputs(
    x: torch.Tensor,
    *,
    stats_used: str,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """Every candidate formula applied to the BN input ``x`` (N, C, ...), in float64.

    ``stats_used`` ("batch" or "running") is what the layer really normalises with; the
    ``no_affine`` and ``eps_outside`` candidates use those statistics so that each candidate
    differs from the correct formula by exactly one mistake. A candidate that cannot be
    computed (running statistics of a layer without buffers, per-sample statistics of a
    (N, C) input) is ``None``.
    """
    x = x.detach().double()
    dims = (0, *range(2, x.dim()))
    count = x.numel() // x.shape[1]
    w = None if weight is None else weight.detach().double()
    b = None if bias is None else bias.detach().double()
    mean = _channel_view(x.mean(dim=dims), x.dim())
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    var_unbiased = var * count / (count - 1) if count > 1 else None
    has_running = running_mean is not None and running_var is not None
    if has_running:
        r_mean = _channel_view(running_mean.detach().double(), x.dim())
        r_var = _channel_view(running_var.detach().double(), x.dim())
    if stats_used == "running" and not has_running:
        raise ValueError("stats_used='running' needs running_mean and running_var")
    used_mean, used_var = (r_mean, r_var) if stats_used == "running" else (mean, var)

    out: dict[str, torch.Tensor | None] = {
        "batch": _normalise(x, mean, var, eps, w, b),
        "running": _normalise(x, r_mean, r_var, eps, w, b) if has_running else None,
        "batch_unbiased": None if var_unbiased is None
        else _normalise(x, mean, var_unbiased, eps, w, b),
        "no_affine": _normalise(x, used_mean, used_var, eps, None, None),
        "eps_outside": _normalise(x, used_mean, used_var, eps, w, b, eps_outside=True),
        "per_sample": None,
    }
    if x.dim() >= 3:
        sdims = tuple(range(2, x.dim()))
        s_mean = x.mean(dim=sdims, keepdim=True)
        s_var = ((x - s_mean) ** 2).mean(dim=sdims, keepdim=True)
        out["per_sample"] = _normalise(x, s_mean, s_var, eps, w, b)
    return out


def relative_error(a, ref) -> tuple[float, float]:
    """``(max |a - ref|, max |a - ref| / max |ref|)`` in float64."""
    a = torch.as_tensor(a).double()
    ref = torch.as_tensor(ref).double()
    max_abs = float((a - ref).abs().max()) if a.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, rel

