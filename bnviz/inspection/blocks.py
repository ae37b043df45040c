"""The compiled probe's network-wide blocks: where every layer's check is written during a
CPU forward, and how the finished checks are read back afterwards.

Each BN layer owns ``num_features`` columns (in network order) of one float32 block and
one column of a float64 block of maxima (see :func:`bnviz.manual_bn.block_checks`). A
layer's wrapped forward then costs one operator call -- no allocation, no per-layer result
objects -- and nothing is left to compute after the forward: on small inputs that is what
keeps an inspection's per-layer Python cost small next to the forward itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..norms import values_per_channel

if TYPE_CHECKING:
    from ..manual_bn import LayerCheck
    from .copies import _CopyInfo
    from .records import CallStart
    from .session import _Session

# The module, looked up on every call (tests replace its functions), imported without
# importing the package first: ``from .. import x`` can deadlock concurrent first imports.
manual_bn = importlib.import_module("..manual_bn", __package__)

_F32 = torch.float32


@dataclass
class _FlatRun:
    """Where the compiled probe writes every layer's finished check during one CPU forward."""

    op: Any  # torch.ops.bnviz.probe_into.default
    #: (6, width) float32: batch mean, biased and unbiased variance, max |manual - native|,
    #: manual new running mean and variance (layers that update them; only 4 rows when
    #: no layer does)
    out: torch.Tensor
    #: (3, layers) float64: largest difference, largest E[y^2], largest update difference
    maxima: torch.Tensor
    #: layer -> (first column, layer index, weight, bias, eps, eval-mode scale or None,
    #: running mean and variance before the forward if the layer will update them, or None)
    args: dict[str, tuple]
    layout: _BlockLayout  # every layer's first column and column of maxima


def _fits_block(t: torch.Tensor | None) -> bool:
    """Whether the compiled probe takes ``t`` as a per-channel argument (or it is absent)."""
    return t is None or (t.dtype == _F32 and t.device.type == "cpu" and t.is_contiguous())


@dataclass
class _BlockLayout:
    """What of :class:`_FlatRun` depends only on the pooled copy: each layer's columns and
    parameters (they cannot change while the copy is pooled: the fingerprint sees them)."""

    #: (name, first column, index, module, weight, bias) of the layers whose parameters the
    #: compiled probe takes
    layers: list[tuple]
    offsets: dict[str, int]
    index: dict[str, int]
    width: int

    @classmethod
    def of(cls, bns: dict[str, _BatchNorm]) -> _BlockLayout:
        layers, offsets, index, width = [], {}, {}, 0
        for i, (name, m) in enumerate(bns.items()):
            offsets[name], index[name] = width, i
            weight, bias = m._parameters.get("weight"), m._parameters.get("bias")
            if _fits_block(weight) and _fits_block(bias):
                layers.append((name, width, i, m, weight, bias))
            width += m.num_features
        return cls(layers, offsets, index, width)


def _flat_run(info: _CopyInfo, snapshot: dict[str, CallStart],
              scales: dict[str, torch.Tensor], dev: torch.device) -> _FlatRun | None:
    """The compiled probe's blocks for this forward, or None where it does not run (CUDA,
    no kernel). Layers whose parameters or buffers it cannot take (float64, ...) are left
    out of ``args`` and probed the general way."""
    if dev.type != "cpu" or not manual_bn.kernel_available():
        return None
    if info.layout is None:
        info.layout = _BlockLayout.of(info.bns)
    layout = info.layout
    fits = _fits_block
    args: dict[str, tuple] = {}
    updating = False
    for name, offset, i, m, weight, bias in layout.layers:
        before = snapshot[name]
        scale = None
        ok = True
        if before.stats_used == "running":
            scale = scales.get(name)
            ok = scale is not None and fits(scale) and fits(m._buffers["running_mean"])
        update = None
        if before.updates:
            update = (before.running_mean, before.running_var)
            ok = ok and all(t is not None and fits(t) for t in (
                *update, m._buffers["running_mean"], m._buffers["running_var"]))
            updating = updating or ok
        if ok:
            args[name] = (offset, i, weight, bias, float(m.eps), scale, update)
    return _FlatRun(op=torch.ops.bnviz.probe_into.default,
                    out=torch.empty((6 if updating else 4, layout.width), dtype=_F32),
                    maxima=torch.empty((3, len(info.bns)), dtype=torch.float64), args=args,
                    layout=layout)


def _checks(session: _Session, bns: dict[str, _BatchNorm],
            order: list[str]) -> list[LayerCheck]:
    """Every call's :class:`~bnviz.manual_bn.LayerCheck`, in call order (``order``: the
    calls' keys, see :class:`~bnviz.inspection.session._Session`).

    Layers the compiled probe finished during the forward are read from its blocks; the
    others (a second call of a layer, parameters it cannot take, CUDA) have a
    :class:`~bnviz.manual_bn.Probe` for :func:`~bnviz.manual_bn.summarise`.
    """
    records = [session.records[n] for n in order]
    counts = [values_per_channel(r.input_shape) for r in records]
    flat = session.flat
    in_block = [i for i, r in enumerate(records) if r.probe is None]
    checks: list[Any] = [None] * len(order)
    if in_block:
        names = [records[i].layer for i in in_block]
        layout = flat.layout  # type: ignore[union-attr]
        found = manual_bn.block_checks(
            flat.out, flat.maxima, [layout.offsets[n] for n in names],  # type: ignore
            [bns[n].num_features for n in names], [counts[i] for i in in_block],
            [layout.index[n] for n in names])
        for i, check in zip(in_block, found, strict=True):
            checks[i] = check
    rest = [i for i, r in enumerate(records) if r.probe is not None]
    if rest:
        for i, check in zip(rest, manual_bn.summarise([records[i].probe for i in rest],
                                                      device="cpu"), strict=True):
            checks[i] = check
    return checks


def _block_updates(session: _Session, bns: dict[str, _BatchNorm],
                   order: list[str]) -> dict[int, tuple]:
    """``(factor, manual mean, manual var, max abs diff)`` by report position, for the layers
    whose running-stat update the compiled probe checked in its blocks during the forward."""
    factors = session.block_factors
    flat = session.flat
    if not factors or flat is None:
        return {}
    positions = [i for i, n in enumerate(order)
                 if n in factors and session.records[n].probe is None]
    if not positions:
        return {}
    names = [session.records[order[i]].layer for i in positions]
    layout = flat.layout
    columns = manual_bn.block_columns(flat.out[4:6], [layout.offsets[n] for n in names],
                                      [bns[n].num_features for n in names])
    diffs = flat.maxima[2].tolist()
    return {i: (factors[n], mean, var, diffs[layout.index[n]])
            for i, n, (mean, var) in zip(positions, names, columns, strict=True)}
