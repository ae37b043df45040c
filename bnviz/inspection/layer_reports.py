"""Every layer's :class:`~bnviz.inspection.report.LayerReport`, built after the forward
from the session's records and checks with vectorised arithmetic and a few concatenated
copies (one per kind of vector, not one per layer)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import _block_updates, _checks
from .copies import _AnyDimBatchNorm
from .fused import fused_activation
from .report import LayerReport, _new_report
from .snapshot import _unchanged
from .tensors import _cpu, _ints, _report_tensors

if TYPE_CHECKING:
    from .session import _Session

# The module, looked up on every call, imported without importing the package first:
# ``from .. import x`` can deadlock concurrent first imports.
manual_bn = importlib.import_module("..manual_bn", __package__)


def _params_report(bns: dict[str, _BatchNorm]) -> dict[str, tuple]:
    """Every layer's (weight, bias) copies for one report, in one ``cat``.

    Made on every run: a caller's in-place edit through ``.data`` (``w.data.mul_(3)``)
    bumps no version counter, so no fingerprint can tell that a cached copy went stale.
    """
    params = [m._parameters for m in bns.values()]
    copies = _report_tensors([p.get("weight") for p in params]
                             + [p.get("bias") for p in params])
    k = len(params)
    return {n: (copies[i], copies[k + i]) for i, n in enumerate(bns)}


def _layer_reports(session: _Session, bns: dict[str, _BatchNorm],
                   requested: Mapping[str, object]) -> list[LayerReport]:
    """Build every layer's report from the probes, with vectorised arithmetic and copies."""
    order = session.order
    checks = _checks(session, bns, order)
    layer_of = [session.records[k].layer for k in order]
    mods = [bns[n] for n in layer_of]
    bufs = [m._buffers for m in mods]
    befores = [session.before[k] for k in order]
    # After the forward: buffers nothing wrote (eval mode) keep the copies made before it;
    # the others are copied now, all in one go. A call followed by another call of the same
    # module ends where the next one starts.
    rm_after = [b.running_mean for b in befores]
    rv_after = [b.running_var for b in befores]
    nbt_after = [b.nbt for b in befores]
    calls = session.calls
    call_no = [1 if k == n else int(k.rpartition("#")[2]) for k, n in zip(order, layer_of,
                                                                          strict=True)]
    moved = []
    for i, (before, buffers) in enumerate(zip(befores, bufs, strict=True)):
        name = layer_of[i]
        if call_no[i] < calls[name]:
            following = session.before[f"{name}#{call_no[i] + 1}"]
            rm_after[i], rv_after[i] = following.running_mean, following.running_var
            nbt_after[i] = following.nbt
        elif not _unchanged(before, buffers):
            moved.append(i)
    if moved:
        copies = _report_tensors([bufs[i].get("running_mean") for i in moved]
                                 + [bufs[i].get("running_var") for i in moved])
        counts = _ints([bufs[i].get("num_batches_tracked") for i in moved])
        for j, i in enumerate(moved):
            rm_after[i], rv_after[i], nbt_after[i] = copies[j], copies[len(moved) + j], counts[j]
    params = _params_report(bns)
    updates = _manual_updates(befores, checks, rm_after, rv_after, nbt_after,
                              _block_updates(session, bns, order))

    reports = []
    for i, key in enumerate(order):
        name = layer_of[i]
        bn, rec, before, check = mods[i], session.records[key], befores[i], checks[i]
        factor, man_m, man_v, diff = updates[i]
        type_name = type(bn).__name__
        if isinstance(bn, _AnyDimBatchNorm):
            type_name = "SyncBatchNorm (as BatchNorm)"
        reports.append(_new_report({
            "name": name,
            "type": type_name,
            "index": i,
            "num_features": bn.num_features,
            "input_shape": rec.input_shape,
            "mode": before.mode,
            "mode_source": "override" if name in requested else "model",
            "training": before.training,
            "track_running_stats": before.track,
            "has_running_stats": before.running_mean is not None,
            "momentum": before.momentum,
            "eps": bn.eps,
            "affine": bn.affine,
            "stats_used": before.stats_used,
            "updates_running_stats": before.updates,
            "count": check.batch.count,
            "batch_mean": check.batch.mean,
            "batch_var": check.batch.var,
            "batch_var_unbiased": check.batch.var_unbiased,
            "running_mean_before": before.running_mean,
            "running_var_before": before.running_var,
            "running_mean_after": rm_after[i],
            "running_var_after": rv_after[i],
            "num_batches_tracked_before": before.nbt,
            "num_batches_tracked_after": nbt_after[i],
            "weight": params[name][0],
            "bias": params[name][1],
            "update_factor": factor,
            "manual_running_mean_after": man_m,
            "manual_running_var_after": man_v,
            "running_update_max_abs_diff": diff,
            "max_abs_diff": check.max_abs_diff,
            "max_rel_diff": check.max_rel_diff,
            "channel_max_abs_diff": check.channel_max_abs_diff,
            "call": call_no[i],
            "calls": calls[name],
            "activation": rec.activation,
            "activation_inplace": rec.activation_inplace,
            "fused_activation": fused_activation(bn),
            "overwritten_by": rec.overwritten_by,
            "input": _cpu(rec.input),
            "output": _cpu(rec.output),
            "activation_output": _cpu(rec.activation_output),
            "output_reference": _cpu(rec.output_reference),
        }))
    return reports


def _manual_updates(befores, checks, rm_after, rv_after, nbt_after, done=None):
    """The running-stat update each layer should have made, against what it made.

    For every layer that updated its buffers: ``factor`` (momentum, or 1/num_batches_tracked
    for momentum=None), the manual new running mean/var
    (:func:`~bnviz.manual_bn.manual_running_update` in float64, one vectorised call for all
    layers) and the max difference from the buffers.
    Returns ``(factor, manual_mean, manual_var, max_abs_diff)`` per layer, Nones where the
    layer did not update. ``done`` has these already for some positions (the compiled
    probe's blocks, :func:`~bnviz.inspection.blocks._block_updates`, same formula).
    """
    result: list[tuple] = [(None, None, None, None)] * len(befores)
    done = done or {}
    idx = []
    for i, before in enumerate(befores):
        if i in done:
            result[i] = done[i]
        elif before.updates:
            factor = manual_bn.running_update_factor(before.momentum, nbt_after[i])
            result[i] = (factor, None, None, None)
            if checks[i].batch.var_unbiased is not None and rm_after[i] is not None:
                idx.append(i)
    if not idx:
        return result
    f64 = torch.float64
    sizes = torch.tensor([checks[i].batch.mean.numel() for i in idx])

    def cat(values) -> torch.Tensor:
        return torch.cat(list(values)).to(f64)

    factors = torch.tensor([result[i][0] for i in idx], dtype=f64).repeat_interleave(sizes)
    man_m, man_v = manual_bn.manual_running_update(
        cat(befores[i].running_mean for i in idx), cat(befores[i].running_var for i in idx),
        cat(checks[i].batch.mean for i in idx), cat(checks[i].batch.var_unbiased for i in idx),
        factors,
    )
    err = torch.maximum((man_m - cat(rm_after[i] for i in idx)).abs(),
                        (man_v - cat(rv_after[i] for i in idx)).abs())
    segment = torch.arange(len(idx)).repeat_interleave(sizes)
    diffs = torch.zeros(len(idx), dtype=f64).scatter_reduce_(0, segment, err, "amax").tolist()
    dtype = rm_after[idx[0]].dtype
    for i in idx[1:]:
        dtype = torch.promote_types(dtype, rm_after[i].dtype)
    block = torch.stack([man_m, man_v]).to(dtype)
    for i, part, diff in zip(idx, block.split(sizes.tolist(), dim=1), diffs, strict=True):
        own = rm_after[i].dtype  # each layer's values in its own buffers' dtype
        m_c, v_c = part.unbind(0) if own == dtype else part.to(own).unbind(0)
        result[i] = (result[i][0], m_c, v_c, diff)
    return result
