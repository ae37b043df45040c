"""Every BN layer's state just before the forward, taken in a few copies for all layers.

The running buffers are what a train-mode forward overwrites, so the report's "before"
values are copied first: one ``cat`` for all layers instead of a few hundred tiny clones.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .records import CallStart, _state_of
from .tensors import _ints, _report_tensors


def _snapshot(bns: dict[str, _BatchNorm]) -> dict[str, CallStart]:
    """Every layer's running buffers, counter and state before the forward, in one copy.

    Buffers are read from ``_buffers`` directly: ``module.running_mean`` goes through
    ``nn.Module.__getattr__``, a few hundred times per run.
    """
    bufs = [m._buffers for m in bns.values()]
    rm = [b.get("running_mean") for b in bufs]
    rv = [b.get("running_var") for b in bufs]
    stats = _report_tensors(rm + rv)
    nbt = _ints([b.get("num_batches_tracked") for b in bufs])
    k = len(bufs)
    out = {}
    for i, (name, m) in enumerate(bns.items()):
        state = m.__dict__
        out[name] = CallStart(stats[i], stats[k + i], nbt[i], _held(bufs[i]),
                              _state_of(state["training"], state["track_running_stats"],
                                        state["momentum"],
                                        rm[i] is not None and rv[i] is not None))
    return out


def _held(buffers: dict) -> tuple:
    """The layer's buffer objects and their version counters: if both are the same after
    the forward, nothing wrote the buffers and the report's copies from before still hold."""
    return tuple((t, t._version) if t is not None else None
                 for t in (buffers.get("running_mean"), buffers.get("running_var"),
                           buffers.get("num_batches_tracked")))


def _unchanged(before: CallStart, buffers: dict) -> bool:
    """Whether a layer's buffers are as :func:`_snapshot` copied them (see :func:`_held`)."""
    held = before.held
    if held is None or before.updates:
        return False
    for entry, key in zip(held, ("running_mean", "running_var", "num_batches_tracked"),
                          strict=True):
        now = buffers.get(key)
        if entry is None:
            if now is not None:
                return False
        elif now is not entry[0] or now._version != entry[1]:
            return False
    return True


def _running_scales(bns: dict[str, _BatchNorm],
                    snapshot: dict[str, CallStart]) -> dict[str, torch.Tensor]:
    """``weight / sqrt(running_var + eps)`` of every layer that will normalise with its
    running statistics, computed for all of them at once before the forward (in eval mode
    the forward does not touch the buffers, so this is exactly what BN will use)."""
    groups: dict[tuple, list[str]] = {}
    for n, before in snapshot.items():
        if before.stats_used == "running":
            v = bns[n]._buffers["running_var"]
            groups.setdefault((v.dtype, v.device), []).append(n)
    out: dict[str, torch.Tensor] = {}
    for (dtype, dev), group in groups.items():
        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        mods = [bns[n] for n in group]
        sizes = [m.num_features for m in mods]
        eps = torch.tensor([m.eps for m in mods], dtype=work, device=dev)
        var = torch.cat([m._buffers["running_var"] for m in mods]).to(work)
        scale = torch.rsqrt(var + eps.repeat_interleave(torch.tensor(sizes, device=dev)))
        # The current weights (ones where none), read on every run: a caller's in-place
        # edit through ``.data`` bumps no version counter.
        weights = [m._parameters.get("weight") for m in mods]
        gamma = torch.cat([w.detach() if w is not None
                           else torch.ones(m.num_features, dtype=work, device=dev)
                           for m, w in zip(mods, weights, strict=True)]).to(work)
        part_of = scale * gamma
        for n, part in zip(group, part_of.split(sizes), strict=True):
            out[n] = part
    return out
