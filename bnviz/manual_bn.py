"""An independent, documented implementation of BatchNorm, to check the native layer.

The exact train-mode computation (USER_STORIES.md section 5), per channel ``c``::

    mean_c = mean of x[:, c, ...] over N and all spatial positions      (count = N*H*W)
    var_c  = mean of (x[:, c, ...] - mean_c)**2                           (biased!)
    y      = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c

In eval mode (with running buffers) ``mean_c``/``var_c`` are ``running_mean[c]`` and
``running_var[c]`` instead -- one value per channel, not a history. After a train-mode
forward that tracks statistics::

    factor      = momentum              (or 1 / num_batches_tracked when momentum is None)
    running_mean = (1 - factor) * running_mean + factor * mean_c
    running_var  = (1 - factor) * running_var  + factor * var_c * count / (count - 1)

Note the *unbiased* variance in the running update and the *biased* one in the
normalisation: mixing them up is a classic source of "slightly different" results.

Two implementations live here. :func:`manual_batch_norm` is the formula written out
literally, for reading, explaining and testing. :func:`check_layer` computes the same thing
in the fewest memory passes we could manage (the networks are memory-bound on CPU, so each
extra full pass over an activation costs about as much as BatchNorm itself): statistics
from fast contiguous reductions, the centred tensor written once into a reusable scratch
buffer, then normalised, compared and reduced in place. Neither calls BatchNorm code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def as_ncl(x: torch.Tensor) -> torch.Tensor:
    """View (N, C, *spatial) as (N, C, L) so every reduction runs over a contiguous axis."""
    if x.dim() < 2:
        raise ValueError(f"BatchNorm input needs (N, C, ...) dims, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], x.shape[1], -1)


def channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x``: (1, C, 1, 1, ...)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


@dataclass
class BatchStats:
    """Per-channel batch statistics over (N, *spatial)."""

    mean: torch.Tensor  # (C,)
    var: torch.Tensor  # (C,) biased: what BatchNorm normalises with
    var_unbiased: torch.Tensor | None  # (C,) what the running_var update uses; None if count == 1
    count: int  # N * prod(spatial): values per channel


def batch_stats(x: torch.Tensor) -> BatchStats:
    """Mean and biased/unbiased variance per channel, by the textbook two-pass formula."""
    x3 = as_ncl(x).double()
    count = x3.shape[0] * x3.shape[2]
    mean = x3.mean(dim=(0, 2))
    var = ((x3 - mean.view(1, -1, 1)) ** 2).sum(dim=(0, 2)) / count
    unbiased = var * count / (count - 1) if count > 1 else None
    dt = x.dtype if x.dtype.is_floating_point else torch.float32
    return BatchStats(
        mean=mean.to(dt),
        var=var.to(dt),
        var_unbiased=None if unbiased is None else unbiased.to(dt),
        count=count,
    )


def manual_batch_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias``, literally, per channel.

    ``weight``/``bias`` of ``None`` (``affine=False``) mean 1 and 0.
    """
    shape = channel_shape(x)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def running_update_factor(momentum: float | None, num_batches_tracked_after: int | None) -> float:
    """The weight of the new batch: ``momentum``, or 1/num_batches_tracked for ``None``."""
    if momentum is not None:
        return float(momentum)
    if not num_batches_tracked_after:
        raise ValueError("momentum=None needs num_batches_tracked (cumulative average)")
    return 1.0 / float(num_batches_tracked_after)


def manual_running_update(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var_unbiased: torch.Tensor,
    factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``running = (1 - factor) * running + factor * batch`` (unbiased variance)."""
    new_mean = (1.0 - factor) * running_mean + factor * batch_mean
    new_var = (1.0 - factor) * running_var + factor * batch_var_unbiased
    return new_mean, new_var


class Scratch:
    """A growable buffer reused by every layer of one inspection.

    Allocating a fresh activation-sized tensor per layer costs page faults comparable to
    BatchNorm itself; reusing one buffer makes the check's writes nearly free.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buf = buf
        return buf[:numel]

    def release(self) -> None:
        self._buf = None


@dataclass
class LayerCheck:
    """Result of :func:`check_layer` for one BN forward."""

    batch: BatchStats
    channel_max_abs_diff: torch.Tensor  # (C,) max |manual - native| per channel
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / output_rms_max
    output_rms_max: float  # largest per-channel root-mean-square of the output


def check_layer(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    use_running: bool = False,
    scratch: Scratch | None = None,
) -> LayerCheck:
    """Batch statistics of ``x`` and the manual BN output compared against native ``y``.

    ``use_running`` selects the running statistics (eval mode with buffers) for the manual
    output; the batch statistics are computed either way, because the dashboard shows how
    far they are from the running ones. Passes over the activation: one sum, one centring
    write, one norm, one fused normalise-and-subtract-``y`` write, and a min and a max of
    the difference. No temporaries of activation size. The relative difference divides
    by the largest per-channel RMS of the output, which follows from the statistics
    without another pass over ``y``.
    """
    x3 = as_ncl(x)
    y3 = as_ncl(y)
    n, c, length = x3.shape
    count = n * length
    work_dtype = x3.dtype if x3.dtype in (torch.float32, torch.float64) else torch.float32
    if x3.dtype != work_dtype:
        x3 = x3.to(work_dtype)
        y3 = y3.to(work_dtype)
    scratch = scratch or Scratch()
    s = scratch.get(x3.numel(), work_dtype, x3.device).view(n, c, length)

    # Mean: contiguous per-(n, c) sums, combined over N in float64.
    mean64 = x3.sum(dim=2).double().sum(dim=0) / count
    mean = mean64.to(work_dtype)
    # Biased variance, two-pass (stable even for near-constant channels, e.g. a uniform image).
    torch.sub(x3, mean.view(1, c, 1), out=s)
    sq = torch.linalg.vector_norm(s, dim=2).double().pow(2).sum(dim=0)
    var64 = sq / count
    var = var64.to(work_dtype)
    var_unbiased = (var64 * count / (count - 1)).to(work_dtype) if count > 1 else None

    if use_running:
        if running_mean is None or running_var is None:
            raise ValueError("use_running=True needs running_mean and running_var")
        norm_mean, norm_var = running_mean.to(work_dtype), running_var.to(work_dtype)
    else:
        norm_mean, norm_var = mean, var
    inv_std = torch.rsqrt(norm_var + eps)
    scale = inv_std if weight is None else inv_std * weight.to(work_dtype)
    beta = torch.zeros_like(scale) if bias is None else bias.to(work_dtype)
    # s holds x - batch_mean; x - norm_mean = s + (batch_mean - norm_mean), a per-channel
    # constant, so y_manual = s * scale + shift with shift = beta + (mean - norm_mean) * scale.
    shift = beta + (mean - norm_mean) * scale
    # One fused pass: s <- y - s * scale  (= y - y_manual + shift), then per-channel extremes.
    torch.addcmul(y3, s, scale.view(1, c, 1), value=-1.0, out=s)
    hi = s.amax(dim=2).amax(dim=0) - shift
    lo = s.amin(dim=2).amin(dim=0) - shift
    channel_diff = torch.maximum(hi, -lo)
    # Output scale from the statistics alone (no pass over y): per channel
    # E[y^2] = scale^2 * E[(x - norm_mean)^2] + 2 * scale * beta * E[x - norm_mean] + beta^2.
    centred_mean = mean - norm_mean
    second_moment = var + centred_mean**2
    y_sq = scale**2 * second_moment + 2 * scale * beta * centred_mean + beta**2
    out_scale = float(y_sq.clamp_min(0).max().sqrt()) if c else 0.0
    max_abs = float(channel_diff.max()) if c else 0.0
    return LayerCheck(
        batch=BatchStats(mean=mean, var=var, var_unbiased=var_unbiased, count=count),
        channel_max_abs_diff=channel_diff,
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / max(out_scale, torch.finfo(work_dtype).tiny),
        output_rms_max=out_scale,
    )


def explain_element(
    x_value: float,
    *,
    mean: float,
    var: float,
    eps: float,
    weight: float | None,
    bias: float | None,
    native: float | None = None,
    stats: str = "batch",
) -> dict:
    """The formula for one element with its actual numbers, evaluated in float64.

    Returned as data (the dashboard and CLI render it): inputs, the intermediate
    ``x_hat``, the manual result, the native value and their difference, and a one-line
    equation such as ``y = (0.4310 - 0.1022) / sqrt(0.0345 + 0.001) * 0.8352 + 0.0100``.
    """
    gamma = 1.0 if weight is None else float(weight)
    beta = 0.0 if bias is None else float(bias)
    x_hat = (float(x_value) - float(mean)) / (float(var) + float(eps)) ** 0.5
    y = x_hat * gamma + beta
    text = (
        f"y = ({x_value:.6g} - {mean:.6g}) / sqrt({var:.6g} + {eps:g}) * {gamma:.6g} + {beta:.6g}"
        f" = {x_hat:.6g} * {gamma:.6g} + {beta:.6g} = {y:.6g}"
    )
    return {
        "stats": stats,
        "x": float(x_value),
        "mean": float(mean),
        "var": float(var),
        "eps": float(eps),
        "weight": gamma,
        "bias": beta,
        "x_hat": x_hat,
        "manual": y,
        "native": None if native is None else float(native),
        "abs_diff": None if native is None else abs(y - float(native)),
        "equation": text,
    }
