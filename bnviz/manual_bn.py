"""An independent, documented implementation of BatchNorm, to check the native layer.

The exact train-mode computation (docs/stories.md, section 5), per channel ``c``::

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

import itertools
import math
from dataclasses import dataclass

import torch

# Names from the submodule, not ``from . import probe_kernel``: that form first imports the
# package itself, and a thread that does so while another thread is still initialising
# ``bnviz`` can deadlock Python's import locks (one of them then gets a half-initialised
# module). Seen when two Streamlit pages opened at once in a fresh server.
from .probe_kernel import applies as kernel_applies
from .probe_kernel import available as kernel_available


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
        self._views: dict[tuple, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buf = buf
            self._views = {}
        return buf[:numel]

    def view(self, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """The buffer as a tensor of ``shape``; views are remembered (two ops saved a layer)."""
        numel = math.prod(shape)
        buf = self._buf
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self.get(numel, dtype, device)
        key = tuple(shape)
        view = self._views.get(key)
        if view is None:
            view = self._buf[:numel].view(shape)  # type: ignore[index]
            self._views[key] = view
        return view

    def release(self) -> None:
        self._buf = None
        self._views = {}


@dataclass
class LayerCheck:
    """Result of the manual-vs-native check of one BN forward."""

    batch: BatchStats
    channel_max_abs_diff: torch.Tensor  # (C,) max |manual - native| per channel
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / output_rms_max
    output_rms_max: float  # largest per-channel root-mean-square of the output


@dataclass
class Probe:
    """What is measured on one BN forward, right after the layer ran: raw per-channel
    reductions.

    Everything that needs the activation itself happens in :func:`probe_layer`, called by
    the inspection's wrapper of the layer's forward, before an in-place activation can
    overwrite the output. The per-channel arithmetic that turns these sums into statistics
    and differences waits for :func:`summarise`, which does it for every layer of the
    network in one vectorised step: on small inputs the fixed cost of many tiny tensor ops
    per layer, not the memory traffic, is what an inspection pays for.
    """

    count: int  # values per channel, N * prod(spatial)
    total: torch.Tensor  # (C,) sum of x
    centre: torch.Tensor  # (C,) the mean the activation was centred on, in the work dtype
    sq: torch.Tensor  # (C,) sum of (x - centre)**2
    scale: torch.Tensor  # (C,) weight / sqrt(var + eps) the manual output used
    hi: torch.Tensor  # (C,) max over the channel of  y - (x - centre) * scale
    lo: torch.Tensor  # (C,) min of the same
    norm_mean: torch.Tensor  # (C,) mean the manual output subtracts (centre or running mean)
    bias: torch.Tensor | None  # (C,) beta (any float dtype), None without affine
    # (C,) the value ``hi``/``lo`` were centred on, when not ``centre``: the compiled probe
    # sums about the mean of each channel's first row but takes differences about
    # ``norm_mean``.
    diff_centre: torch.Tensor | None = None
    backend: str = "eager"  # or "compiled": which code measured it (bnviz.probe_kernel)


def probe_layer(
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
    scale: torch.Tensor | None = None,
) -> Probe:
    """Measure one BN forward (input ``x``, native output ``y``) in five memory passes.

    Passes: a sum, a centring write into the scratch buffer, a norm, one fused
    ``y - (x - centre) * scale`` write, and the per-channel max and min of that. No
    temporaries of activation size. ``use_running`` selects the running statistics (eval
    mode with buffers) for the manual output; the batch statistics are measured either
    way, because the dashboard shows how far they are from the running ones.

    Why centring on the batch mean first: the variance is then a sum of squares of
    centred values (the two-pass formula), which stays exact for near-constant channels
    such as a uniform image, where ``E[x^2] - E[x]^2`` would cancel to noise.

    ``scale`` may pass ``weight / sqrt(running_var + eps)`` precomputed for eval mode
    (``inspect`` computes it for all layers in one go before the forward).

    Where :mod:`bnviz.probe_kernel` is built and the layer is float32, contiguous and on the
    CPU, the same quantities come from the compiled probe in one or two reads instead.
    """
    if use_running and (running_mean is None or running_var is None):
        raise ValueError("use_running=True needs running_mean and running_var")
    if kernel_applies(x, y) and kernel_available():
        compiled = _compiled_probe(x, y, weight, bias, eps, running_mean, running_var,
                                   use_running, scale)
        if compiled is not None:
            return compiled
    x3 = as_ncl(x)
    y3 = as_ncl(y)
    n, c, length = x3.shape
    count = n * length
    work = x3.dtype if x3.dtype in (torch.float32, torch.float64) else torch.float32
    if x3.dtype != work:
        x3 = x3.to(work)
        y3 = y3.to(work)
    s = (scratch or Scratch()).view((n, c, length), work, x3.device)

    total = x3.sum(dim=(0, 2))
    centre = total / count
    torch.sub(x3, centre.view(1, c, 1), out=s)
    if n == 1:
        sq = torch.linalg.vector_norm(s, dim=(0, 2)).square_()
    else:  # per-(n, c) norms over the contiguous axis, then over N: far faster than (0, 2)
        sq = torch.linalg.vector_norm(s, dim=2).square_().sum(dim=0)
    if use_running:
        norm_mean = running_mean.to(work)
        if scale is None:
            scale = torch.rsqrt(running_var.to(work) + eps)
            if weight is not None:
                scale = scale * weight.to(work)
        else:
            scale = scale.to(work)
    else:
        norm_mean = centre
        scale = torch.rsqrt(sq / count + eps)
        if weight is not None:
            scale = scale * weight.to(work)
    # s <- y - (x - centre) * scale. The manual output is (x - norm_mean) * scale + beta,
    # so the difference is s - shift with a per-channel shift = beta + (centre - norm_mean)
    # * scale, applied to the extremes in summarise() instead of in another full pass.
    torch.addcmul(y3, s, scale.view(1, c, 1), value=-1.0, out=s)
    if n == 1:
        hi, lo = s.amax(dim=(0, 2)), s.amin(dim=(0, 2))
    else:
        hi, lo = s.amax(dim=2).amax(dim=0), s.amin(dim=2).amin(dim=0)
    return Probe(
        count=count,
        total=total,
        centre=centre,
        sq=sq,
        scale=scale,
        hi=hi,
        lo=lo,
        norm_mean=norm_mean,
        bias=bias,
    )


def _cpu_f32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu"
                         and t.is_contiguous())


def _compiled_probe(x, y, weight, bias, eps, running_mean, running_var, use_running,
                    scale) -> Probe | None:
    """:func:`probe_layer` by ``csrc/probe.cpp``; ``None`` if a parameter does not fit it."""
    if use_running:
        if scale is None:
            scale = torch.rsqrt(running_var.float() + eps)
            if weight is not None:
                scale = scale * weight.float()
        if not (_cpu_f32(running_mean) and _cpu_f32(scale)):
            return None
    else:
        running_mean = scale = None
    if not _cpu_f32(weight):
        return None
    big, small = torch.ops.bnviz.probe(x, y, weight, float(eps), running_mean, scale)
    total, sq, hi, lo = big
    centre, used_scale, norm_mean = small
    return Probe(count=x.numel() // x.shape[1], total=total, centre=centre, sq=sq,
                 scale=used_scale, hi=hi, lo=lo, norm_mean=norm_mean, bias=bias,
                 diff_centre=norm_mean, backend="compiled")


def summarise(probes: list[Probe], device: torch.device | str | None = None) -> list[LayerCheck]:
    """Turn probes into statistics and manual-vs-native differences, all layers at once.

    The per-channel vectors of every layer are concatenated and the arithmetic runs once
    over all channels of the network, in float64; results are cast back to each probe's
    work dtype and split into per-layer views. One host synchronisation for all the
    per-layer maxima. ``device`` moves the per-channel results (e.g. to the CPU for a
    report) in a single copy.

    Per channel, with ``m = centre``, ``nm = norm_mean``:

    * batch mean ``= total / count``; biased variance ``= sq / count - (mean - m)**2``
      (exact: ``sq`` sums squares about ``m``, not about the mean);
    * max |manual - native| ``= max(hi - shift, shift - lo)`` with ``shift = beta + (m -
      nm) * scale``;
    * the output scale used for the relative difference, ``E[y^2] = scale^2 * (var + d^2)
      + 2 * scale * beta * d + beta^2`` with ``d = mean - nm``, needs no pass over ``y``.
    """
    results: list[LayerCheck | None] = [None] * len(probes)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(probes):
        groups.setdefault((p.centre.dtype, p.centre.device), []).append(i)
    for idxs in groups.values():
        for i, check in zip(idxs, _summarise_group([probes[i] for i in idxs], device),
                            strict=True):
            results[i] = check
    return results  # type: ignore[return-value]


def block_columns(rows: torch.Tensor, starts: list[int],
                  sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's columns ``starts[i]:starts[i] + sizes[i]`` of a (rows, width) block, as one
    view per row. When the layers tile the block in order (the usual forward), one ``split``
    per row makes all the views."""
    contiguous = starts[0] == 0 and sum(sizes) == rows.shape[1] and all(
        b == a + n for a, b, n in zip(starts, starts[1:], sizes, strict=False))
    if contiguous:
        split = [row.split(sizes) for row in rows]
        return [tuple(row[i] for row in split) for i in range(len(sizes))]
    return [tuple(rows[:, a:a + n]) for a, n in zip(starts, sizes, strict=True)]


def block_checks(out: torch.Tensor, maxima: torch.Tensor, starts: list[int], sizes: list[int],
                 counts: list[int], indices: list[int]) -> list[LayerCheck]:
    """:class:`LayerCheck` objects from the blocks the compiled probe fills during a forward.

    ``torch.ops.bnviz.probe_into`` finishes each layer right after it ran: the arithmetic of
    :func:`summarise` (same formula, same order, float64) runs per channel as the channel is
    read, into network-wide blocks -- ``out`` (at least 4 rows by width), float32 rows batch
    mean, biased variance, unbiased variance, max |manual - native|; ``maxima`` (at least 2
    rows by layers), float64 rows each layer's largest difference and largest ``E[y^2]``
    (further rows, the running-stat update's, are :mod:`bnviz.inspection`'s). What is left here is
    slicing: on a batch-1 forward, the dozens of tensor ops and concatenations of
    :func:`summarise` cost more than the check itself.

    Layer ``i`` owns columns ``starts[i]:starts[i] + sizes[i]`` of ``out`` and column
    ``indices[i]`` of ``maxima``; ``counts[i]`` is its values per channel.
    """
    if not sizes:
        return []
    diffs, y_sqs = maxima[:2].tolist()
    columns = block_columns(out[:4], starts, sizes)
    tiny = torch.finfo(out.dtype).tiny
    checks = []
    for (mean, var, unbiased, channel_diff), count, i in zip(columns, counts, indices,
                                                             strict=True):
        out_scale = math.sqrt(y_sqs[i])
        checks.append(LayerCheck(
            batch=BatchStats(mean=mean, var=var, var_unbiased=unbiased if count > 1 else None,
                             count=count),
            channel_max_abs_diff=channel_diff,
            max_abs_diff=diffs[i],
            max_rel_diff=diffs[i] / max(out_scale, tiny),
            output_rms_max=out_scale,
        ))
    return checks


@torch.no_grad()
def _summarise_group(probes: list[Probe], device) -> list[LayerCheck]:
    f64 = torch.float64
    work = probes[0].centre.dtype
    dev = probes[0].centre.device
    sizes = [p.centre.numel() for p in probes]
    counts = [p.count for p in probes]

    def cat(tensors) -> torch.Tensor:
        return torch.cat(list(tensors)).to(f64)

    total, centre, sq, scale, hi, lo, norm_mean = (
        cat(getattr(p, field) for p in probes)
        for field in ("total", "centre", "sq", "scale", "hi", "lo", "norm_mean")
    )
    diff_centre = (centre if all(p.diff_centre is None for p in probes)
                   else cat(p.centre if p.diff_centre is None else p.diff_centre for p in probes))
    beta = cat(p.bias if p.bias is not None else torch.zeros_like(p.centre) for p in probes)
    size_t = torch.tensor(sizes, device=dev)
    count_col = torch.tensor(counts, dtype=f64, device=dev).repeat_interleave(size_t)

    mean = total / count_col
    var = (sq / count_col - (mean - centre) ** 2).clamp_min(0)
    unbiased = var * count_col / (count_col - 1)
    shift = beta + (diff_centre - norm_mean) * scale
    channel_diff = torch.maximum(hi - shift, shift - lo)
    d = mean - norm_mean
    y_sq = (scale**2 * (var + d**2) + 2 * scale * beta * d + beta**2).clamp_min(0)

    layers = len(probes)
    segment = torch.arange(layers, device=dev).repeat_interleave(size_t)
    maxima = torch.zeros(2, layers, dtype=f64, device=dev)
    maxima[0].scatter_reduce_(0, segment, channel_diff, "amax")
    maxima[1].scatter_reduce_(0, segment, y_sq, "amax")

    block = torch.stack([mean, var, unbiased, channel_diff]).to(work)
    if device is not None:
        block = block.to(device)
    # the same layout as the compiled probe's blocks: layers side by side, in order
    starts = [0, *itertools.accumulate(sizes[:-1])]
    return block_checks(block, maxima, starts, sizes, counts, list(range(layers)))


def check_layer(x: torch.Tensor, y: torch.Tensor, **options) -> LayerCheck:
    """Batch statistics of ``x`` and the manual BN output compared against native ``y``.

    Takes the keyword arguments of :func:`probe_layer` (``weight``, ``bias``, ``eps``,
    ``running_mean``, ``running_var``, ``use_running``, ...): one layer's probe followed by
    :func:`summarise`. ``inspect`` probes every layer during the forward and summarises
    them together afterwards.
    """
    return summarise([probe_layer(x, y, **options)])[0]


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
