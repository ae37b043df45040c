"""The correct BatchNorm and the usual ways to get it wrong, as pure float64 functions.

Each function returns ``(cause, tensor)`` pairs: what an implementation that made that
mistake would have computed for the very same input, parameters and buffers. A candidate's
result is attributed to the first alternative it matches (:func:`channel_errors`); the
reference it departs from is always the native layer's own result.
"""

from __future__ import annotations

import torch

Alternatives = list[tuple[str, torch.Tensor]]


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dims BatchNorm takes its statistics over: the batch and every spatial dim."""
    return (0, *range(2, x.dim()))


def per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (C,) vector shaped to broadcast against a (N, C, ...) tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-channel mean, biased variance and unbiased variance (float64), and n."""
    x = f64(x)
    dims = reduce_dims(x)
    count = x.numel() // x.shape[1]
    mean = x.mean(dim=dims)
    var = ((x - per_channel(mean, x.dim())) ** 2).mean(dim=dims)
    unbiased = var * count / (count - 1) if count > 1 else var * float("nan")
    return mean, var, unbiased, count


def _affine(y, weight, bias):
    if weight is not None:
        y = y * per_channel(weight, y.dim())
    if bias is not None:
        y = y + per_channel(bias, y.dim())
    return y


def normalise(x, mean, var, eps, weight, bias, *, eps_mode: str = "inside"):
    """``(x - mean) / sqrt(var + eps) * weight + bias``; ``mean``/``var`` broadcastable."""
    if eps_mode == "inside":
        std = torch.sqrt(var + eps)
    elif eps_mode == "outside":
        std = torch.sqrt(var) + eps
    else:  # "none"
        std = torch.sqrt(var)
    return _affine((x - mean) / std, weight, bias)


def _stats_over(x, dims):
    mean = x.mean(dim=dims, keepdim=True)
    return mean, ((x - mean) ** 2).mean(dim=dims, keepdim=True)


def _common_mistakes(x, mean, var, eps, weight, bias) -> Alternatives:
    """Mistakes that can sit on top of whichever statistics a mode uses."""
    alts = [("eps_outside_sqrt", normalise(x, mean, var, eps, weight, bias, eps_mode="outside")),
            ("no_eps", normalise(x, mean, var, eps, weight, bias, eps_mode="none"))]
    if weight is not None or bias is not None:
        alts.append(("no_affine_applied", normalise(x, mean, var, eps, None, None)))
    if weight is not None and bias is not None:
        alts.append(("gamma_beta_swapped", normalise(x, mean, var, eps, bias, weight)))
    return alts


def train_forward(x, *, weight, bias, eps, running: list[tuple]) -> Alternatives:
    """Train-mode output with batch statistics, and the usual mistakes.

    ``running`` lists ``(running_mean, running_var)`` pairs an implementation might have
    normalised with instead (before and after its update).
    """
    x, weight, bias = f64(x), f64(weight), f64(bias)
    nd = x.dim()
    mean, var, unbiased, _ = moments(x)
    m, v = per_channel(mean, nd), per_channel(var, nd)
    alts: Alternatives = [("unbiased_var_in_normalisation",
                           normalise(x, m, per_channel(unbiased, nd), eps, weight, bias))]
    alts += _common_mistakes(x, m, v, eps, weight, bias)
    for r_mean, r_var in running:
        if r_mean is not None and r_var is not None:
            alts.append(("running_stats_in_train",
                         normalise(x, per_channel(f64(r_mean), nd), per_channel(f64(r_var), nd),
                                   eps, weight, bias)))
    if nd >= 3:
        alts.append(("per_sample_stats",
                     normalise(x, *_stats_over(x, tuple(range(2, nd))), eps, weight, bias)))
        alts.append(("stats_over_batch_only", normalise(x, *_stats_over(x, (0,)), eps, weight,
                                                        bias)))
    alts.append(("stats_over_channels",
                 normalise(x, *_stats_over(x, tuple(range(nd))), eps, weight, bias)))
    return alts


def eval_forward(x, *, weight, bias, eps, running_mean, running_var) -> Alternatives:
    """Eval-mode mistakes, for a layer that normalises with its running statistics."""
    x, weight, bias = f64(x), f64(weight), f64(bias)
    nd = x.dim()
    rm, rv = per_channel(f64(running_mean), nd), per_channel(f64(running_var), nd)
    mean, var, _, _ = moments(x)
    alts: Alternatives = [("batch_stats_in_eval",
                           normalise(x, per_channel(mean, nd), per_channel(var, nd), eps,
                                     weight, bias))]
    return alts + _common_mistakes(x, rm, rv, eps, weight, bias)


def untracked_eval_forward(x, *, weight, bias, eps, candidate_running) -> Alternatives:
    """Eval mode with track_running_stats=False (batch statistics), and its mistakes:
    normalising with whatever running buffers the candidate kept anyway."""
    alts: Alternatives = []
    r_mean, r_var = candidate_running
    if r_mean is not None and r_var is not None:
        nd = x.dim()
        alts.append(("track_ignored_in_eval",
                     normalise(f64(x), per_channel(f64(r_mean), nd), per_channel(f64(r_var), nd),
                               eps, f64(weight), f64(bias))))
    return alts + train_forward(x, weight=weight, bias=bias, eps=eps, running=[])


def input_gradient(x, g, *, weight, eps) -> Alternatives:
    """dL/dx for batch statistics with the mean, the variance or both treated as constants.

    With ``x_hat = (x - E[x]) / s`` and ``s = sqrt(Var[x] + eps)``, the true gradient is
    ``gamma / s * (g - mean(g) - x_hat * mean(g * x_hat))``: ``- mean(g)`` comes through
    E[x] and ``- x_hat * mean(g * x_hat)`` through Var[x].
    """
    x, g, weight = f64(x), f64(g), f64(weight)
    nd = x.dim()
    dims = reduce_dims(x)
    mean, var, _, _ = moments(x)
    s = torch.sqrt(per_channel(var, nd) + eps)
    x_hat = (x - per_channel(mean, nd)) / s
    scale = 1.0 / s if weight is None else per_channel(weight, nd) / s
    through_mean = g.mean(dim=dims, keepdim=True)
    through_var = x_hat * (g * x_hat).mean(dim=dims, keepdim=True)
    return [("detached_stats", scale * g),
            ("detached_mean", scale * (g - through_var)),
            ("detached_var", scale * (g - through_mean))]


def fit_factor(after: torch.Tensor, before: torch.Tensor,
               target: torch.Tensor) -> float | None:
    """The weight ``f`` of ``after = before + f * (target - before)`` (least squares over the
    channels), or None where ``target`` and ``before`` are too close to tell."""
    d = target - before
    denom = float((d * d).sum())
    if not denom > 1e-12 * max(float((before * before).sum()), 1e-30):
        return None
    return float((d * (after - before)).sum()) / denom


def channel_errors(got: torch.Tensor, ref: torch.Tensor, channel_dim: int = 1,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per channel, ``max |got - ref| / max |ref|`` (float64, CPU), or ``/ scale``.

    A channel whose values are all tiny is measured against a thousandth of the largest
    channel instead, so rounding in a near-zero channel does not count as a departure. NaN
    counts as an infinite error.
    """
    got, ref = f64(got), f64(ref)
    if got.dim() == 1:
        got, ref = got.unsqueeze(1), ref.unsqueeze(1)
        channel_dim = 0
    c = ref.shape[channel_dim]
    got = got.movedim(channel_dim, 0).reshape(c, -1)
    ref = ref.movedim(channel_dim, 0).reshape(c, -1)
    diff = torch.nan_to_num((got - ref).abs().amax(dim=1), nan=float("inf"))
    if scale is None:
        scale = ref.abs().amax(dim=1)
    floor = max(float(scale.max()) * 1e-3, 1e-300)
    return diff / scale.clamp_min(floor)


def parameter_gradient_scales(x_hat: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """The size of the sums dL/dgamma = sum(g * x_hat) and dL/dbeta = sum(g) are made of,
    per channel: ``|g| * |x_hat|`` and ``|g| * sqrt(n)`` (Cauchy-Schwarz bounds). A sum that
    cancels to near zero is judged against these, not against its own small value, which
    any other order of rounding changes by a large fraction."""
    x_hat, g = f64(x_hat), f64(g)
    c = g.shape[1]
    g2 = g.movedim(1, 0).reshape(c, -1)
    norm_g = g2.norm(dim=1)
    return {"weight": norm_g * x_hat.movedim(1, 0).reshape(c, -1).norm(dim=1),
            "bias": norm_g * g2.shape[1] ** 0.5}


def normalised(x, mean, var, eps) -> torch.Tensor:
    """x_hat = (x - mean) / sqrt(var + eps) in float64, from (C,) statistics."""
    x = f64(x)
    nd = x.dim()
    return (x - per_channel(f64(mean), nd)) / torch.sqrt(per_channel(f64(var), nd) + eps)
