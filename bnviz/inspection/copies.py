"""The private copy an inspection runs on, and the pool that reuses it.

The forward runs on a copy of the caller's model: modules and buffers copied (a
train-mode forward writes buffers), parameters shared read-only on the same device, the
caller's hooks left behind. Modes are applied to the copy only, so any number of threads
can inspect one shared model with different modes at once and the caller's model comes
back exactly as it was. Deep-copying a network costs a noticeable part of a forward, so
idle copies are pooled and reset from the original on every checkout while the model's
fingerprint (:mod:`bnviz.inspection.fingerprint`) is unchanged.
"""

from __future__ import annotations

import copy
import functools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..manual_bn import Scratch
from ..modes import bn_layers
from ..norms import is_norm_layer
from .fingerprint import _same

if TYPE_CHECKING:
    from .blocks import _BlockLayout
    from .session import _Session

_MODEL_LOCK = threading.RLock()  # guards copying from / committing into a shared model

#: (weakref to the original module, private module)
_Pair = tuple[weakref.ReferenceType, torch.nn.Module]


@dataclass
class _CopyInfo:
    """Bookkeeping kept with a pooled private copy, so a rerun walks no module tree.

    ``pairs`` holds ``(weakref to the original module, private module)`` in
    ``named_modules`` order (weak, so the pool never keeps a caller's model alive);
    ``bns`` the private BN layers by name; ``scratch`` the check's work buffer (a fresh
    activation-sized allocation per call costs page faults comparable to BN itself);
    ``consumers`` what consumed each BN output in earlier forwards, by the training flags
    and input shape they ran with (see :func:`bnviz.inspection.run._run_on_copy`).
    """

    pairs: list[_Pair]
    bns: dict[str, _BatchNorm]
    #: (original, private, whether it is a BN layer) of the modules that had buffers or
    #: are BN layers when the copy was made: the only ones a reset touches (the fingerprint
    #: changes when buffers are added or removed, which retires the copy)
    stateful: list[tuple[weakref.ReferenceType, torch.nn.Module, bool]] = field(
        default_factory=list)
    scratch: Scratch = field(default_factory=Scratch)
    consumers: dict[tuple, dict[str, tuple[str | None, bool | None, str | None]]] = field(
        default_factory=dict)
    #: the pairs whose parameters are device copies (CUDA): their values are copied again
    #: on every reuse, since an in-place edit through ``.data`` bumps no version counter
    copied_params: list[_Pair] = field(default_factory=list)
    probed: bool = False  # each BN layer's forward runs through _install_probe's wrapper
    #: ``other_modules`` of the last run: with "eval" twice in a row, the non-BN modules'
    #: flags are still False and only the BN layers' are reset
    flags: str | None = None
    layout: _BlockLayout | None = None  # the compiled probe's block columns (CPU copies)
    session: _Session | None = None  # the session of the forward running on this copy

    @functools.cached_property
    def bn_pairs(self) -> list[tuple[weakref.ReferenceType, _BatchNorm]]:
        return [(ref, m) for ref, m in self.pairs if is_norm_layer(m)]

    @functools.cached_property
    def other_pairs(self) -> list[_Pair]:
        """The pairs that are not BN layers (Dropout, ...: set to eval by default)."""
        return [(ref, m) for ref, m in self.pairs if not is_norm_layer(m)]

    @functools.cached_property
    def names_by_id(self) -> dict[int, str]:
        return {id(m): n for n, m in self.bns.items()}


def _private_copy(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Copy ``model`` for one inspection without touching it.

    Parameters become new ``Parameter`` objects viewing the same storage (CPU, same device)
    or device copies; buffers are cloned (a train-mode forward writes them); hook dicts are
    replaced by empty ones so the caller's hooks neither run nor get deep-copied.
    SyncBatchNorm layers become plain BatchNorm on one device.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        data = p.detach()
        data = data.to(device) if data.device != device else data
        memo[id(p)] = torch.nn.Parameter(data, requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    for m in model.modules():
        for key, value in vars(m).items():
            if "hooks" in key and isinstance(value, dict):
                memo[id(value)] = OrderedDict()
    with _MODEL_LOCK:
        private = copy.deepcopy(model, memo)
        bns = {n: _as_plain_bn(private, n, m) for n, m in bn_layers(private)}
        pairs = []
        for (name, orig), (mine_name, mine) in zip(model.named_modules(),
                                                   private.named_modules(), strict=True):
            assert name == mine_name, (name, mine_name)
            pairs.append((weakref.ref(orig), mine))
    stateful = [(ref, mine, is_norm_layer(mine)) for ref, mine in pairs
                if is_norm_layer(mine) or ref()._buffers]  # type: ignore[union-attr]
    copied = [(ref, mine) for ref, mine in pairs
              if any(p is not None and p.device != device
                     for p in ref()._parameters.values())]  # type: ignore[union-attr]
    object.__setattr__(private, "_bnviz_info",
                       _CopyInfo(pairs=pairs, bns=bns, stateful=stateful,
                                 copied_params=copied))
    return private


def _info(private: torch.nn.Module) -> _CopyInfo:
    return private._bnviz_info  # type: ignore[attr-defined]


class _CopyPool:
    """Idle private copies per (model, device), so a rerun skips the deep copy.

    A copy is handed to one inspection at a time and reset from the original on every
    checkout (training flags, BN attributes, every buffer), so reuse is invisible to
    callers.
    """

    MAX_IDLE = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def acquire(self, model: torch.nn.Module, device: torch.device, sig: tuple):
        """A private copy of ``model`` on ``device``; ``sig`` is its fingerprint
        (:func:`bnviz.inspection.fingerprint._scan`)."""
        key = str(device)
        with self._lock:
            entries = self._idle.get(model, {}).get(key, [])
            while entries:
                old_sig, private = entries.pop()
                if _same(old_sig, sig):
                    with _MODEL_LOCK:
                        _reset_copy(private)
                    return private, sig
        return _private_copy(model, device), sig

    def release(self, model: torch.nn.Module, device: torch.device, private, sig) -> None:
        with self._lock:
            per_model = self._idle.setdefault(model, {})
            entries = per_model.setdefault(str(device), [])
            if len(entries) < self.MAX_IDLE:
                entries.append((sig, private))

    def clear(self) -> None:
        with self._lock:
            self._idle = weakref.WeakKeyDictionary()


_POOL = _CopyPool()


_BN_SETTINGS = ("track_running_stats", "momentum", "eps")


def _reset_copy(private: torch.nn.Module) -> None:
    """Make a pooled copy equal to its original again (BN attributes, all buffers, and the
    parameters it holds as device copies; parameters on the same device share storage).

    Training flags are set by every run (:func:`bnviz.inspection.run._run_on_copy`).
    All buffer values are copied with one ``_foreach_copy_`` instead of one op per buffer.
    """
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    info = _info(private)
    with torch.no_grad():
        for ref, m in info.copied_params:
            for pname, p in ref()._parameters.items():  # type: ignore[union-attr]
                if p is not None:
                    m._parameters[pname].copy_(p)
        for ref, m, is_bn in info.stateful:
            orig = ref()
            if orig is None:  # pragma: no cover - the pool is keyed weakly by the root
                raise RuntimeError("the original model of a pooled copy is gone")
            if is_bn:
                # Plain attributes: written to __dict__, skipping nn.Module.__setattr__'s
                # parameter/buffer/module checks (three per layer per run).
                state, src = m.__dict__, orig.__dict__
                for attr in _BN_SETTINGS:
                    if attr in src:
                        state[attr] = src[attr]
                    else:  # a subclass that makes it a property, say
                        setattr(m, attr, getattr(orig, attr))
            for bname, buf in orig._buffers.items():
                mine = m._buffers.get(bname)
                if buf is None:
                    m._buffers[bname] = None
                elif mine is None or mine.shape != buf.shape or mine.dtype != buf.dtype:
                    m._buffers[bname] = buf.detach().to(_device_of(private, buf), copy=True)
                elif mine.device != buf.device:  # a device copy: copy across one by one
                    mine.copy_(buf)
                else:
                    dsts.append(mine)
                    srcs.append(buf)
        if dsts:
            torch._foreach_copy_(dsts, srcs)


def _device_of(private: torch.nn.Module, buf: torch.Tensor) -> torch.device:
    """The device the private copy lives on (its parameters'), else the buffer's."""
    for p in private.parameters():
        return p.device
    return buf.device


class _AnyDimBatchNorm(_BatchNorm):
    """SyncBatchNorm on one device is plain BatchNorm; accepts any (N, C, ...) input."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


class _AnyDimBatchNormAct(_AnyDimBatchNorm):
    """timm's SyncBatchNormAct on one device: BatchNorm, then its own ``drop`` and ``act``
    (the children it was given), as SyncBatchNormAct's forward does."""

    def forward(self, input):
        out = super().forward(input)
        for key in ("drop", "act"):
            child = self._modules.get(key)
            if child is not None:
                out = child(out)
        return out


def _as_plain_bn(root: torch.nn.Module, name: str, m: _BatchNorm) -> _BatchNorm:
    if not isinstance(m, torch.nn.SyncBatchNorm):
        return m
    # a layer with children (timm's norm-act) keeps them: same output, same module names
    kind = _AnyDimBatchNormAct if m._modules else _AnyDimBatchNorm
    plain = kind(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    for key, child in m._modules.items():
        plain._modules[key] = child
    plain.weight, plain.bias = m.weight, m.bias
    plain.running_mean, plain.running_var = m.running_mean, m.running_var
    plain.num_batches_tracked = m.num_batches_tracked
    plain.training = m.training
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, plain)
    return plain
