"""``inspect``: one forward pass, every BatchNorm layer measured, the caller's model untouched.

How it works, and why:

* **A private copy.** The forward runs on a shallow-parameter copy of the model: modules
  and buffers are copied (buffers are what a train-mode forward writes), parameters are
  shared read-only on the same device, hooks of the caller are not carried over. Modes are
  applied to the copy only, so any number of threads can inspect one shared model with
  different modes at once and the caller's model comes back exactly as it was (weights,
  buffers, training flags, hooks). ``commit=True`` copies the running-stat update back.
* **One forward, each BN layer wrapped on the copy.** All running buffers are
  snapshotted ("before") in one copy just before the forward. Each BN layer's forward is
  wrapped (an instance ``forward``: hooks would put every call on ``nn.Module``'s slow
  path) and measures what needs the activation itself right after the layer ran. On the
  CPU that is one call of the compiled probe (:mod:`bnviz.probe_kernel`), which reads x
  and y once or twice and writes the finished per-channel statistics and differences into
  network-wide blocks (:func:`bnviz.manual_bn.block_checks`). Elsewhere (CUDA, float64, a
  layer called twice) :func:`bnviz.manual_bn.probe_layer` takes per-channel sums and the
  extremes of ``y - (x - mean) * scale`` in a few eager passes over a reused scratch
  buffer, and the rest is done for all those layers at once after the forward
  (:func:`bnviz.manual_bn.summarise`). On small inputs the fixed cost of many tiny
  tensor ops and Python calls per layer, not memory traffic, is what an inspection pays.
* **Copy-on-write, not clone-always.** Tensors kept for display are held by reference. A
  thread-local :class:`~torch.overrides.TorchFunctionMode` sees every torch call of the
  forward; when an *in-place* op (``ReLU(inplace=True)``, ``out += identity``) is about to
  overwrite a kept BN output, the value is cloned first. The same interception names the
  activation that consumes each BN output and records whether it was in place -- which is
  exactly why a forward hook that keeps a reference can see post-ReLU values
  (USER_STORIES.md section 1). Watching every op costs a Python call per op, so a
  statistics-only forward reuses what an earlier forward with the same training flags and
  input shape learned about the consumers and skips the watch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import json
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from types import SimpleNamespace
from typing import Any, NamedTuple, Protocol

import pandas as pd
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .devices import is_cuda_oom, resolve_device
from .errors import BnvizError, DeviceError, LayerError
from .modes import (
    LayerMode,
    apply_mode,
    bn_layers,
    describe_state,
    has_running_stats,
    resolve_modes,
    stats_used,
    unknown_layer_error,
    updates_running_stats,
)

# The submodule itself, without importing the package first (see bnviz/manual_bn.py's
# import of probe_kernel: ``from . import x`` can deadlock concurrent first imports).
manual_bn = importlib.import_module(f"{__package__}.manual_bn")

__all__ = ["inspect", "InspectionReport", "LayerReport", "Prediction"]

# Functions that count as "the activation following a BN layer" when they are the first
# thing applied to its output.
ACTIVATIONS = frozenset(
    """relu relu_ relu6 hardtanh hardtanh_ silu silu_ hardswish hardswish_ gelu sigmoid sigmoid_
    elu elu_ leaky_relu leaky_relu_ mish selu selu_ celu celu_ softplus tanh tanh_ prelu
    hardsigmoid hardsigmoid_ threshold threshold_ rrelu rrelu_""".split()
)

_MODEL_LOCK = threading.RLock()  # guards copying from / committing into a shared model


@dataclass
class Prediction:
    index: int
    label: str
    probability: float


class UsedStatistics:
    """``used_mean`` / ``used_var``: the statistics a layer actually normalised with.

    Shared by :class:`LayerReport` (torch tensors) and the dashboard's condensed
    ``LayerView`` (numpy arrays), which carry the same field names.
    """

    @property
    def used_mean(self):
        return self.batch_mean if self.stats_used == "batch" else self.running_mean_before

    @property
    def used_var(self):
        return self.batch_var if self.stats_used == "batch" else self.running_var_before


@dataclass
class LayerReport(UsedStatistics):
    """Everything measured for one BatchNorm layer in one forward.

    Tensors live on the CPU. ``input``/``output``/``activation_output`` are ``None`` unless
    the layer was kept (``keep_tensors``). Quantities that do not exist for this layer
    (running statistics of a layer without buffers, weight of ``affine=False``) are None.
    The tensors are bnviz's copies, never the model's own, and some are shared (weight and
    bias between reports of one model, "after" and "before" where nothing wrote a buffer):
    treat them as read-only, clone before an in-place edit.
    """

    name: str
    type: str
    index: int
    num_features: int
    input_shape: tuple[int, ...]
    mode: str  # effective state, e.g. "train,track=on,momentum=0.1"
    mode_source: str  # "model" (the model's own setting) or "override"
    training: bool
    track_running_stats: bool
    has_running_stats: bool
    momentum: float | None
    eps: float
    affine: bool
    stats_used: str  # "batch" or "running"
    updates_running_stats: bool
    count: int  # values per channel the batch statistics are taken over (N*H*W)
    batch_mean: torch.Tensor
    batch_var: torch.Tensor  # biased
    batch_var_unbiased: torch.Tensor | None
    running_mean_before: torch.Tensor | None
    running_var_before: torch.Tensor | None
    running_mean_after: torch.Tensor | None
    running_var_after: torch.Tensor | None
    num_batches_tracked_before: int | None
    num_batches_tracked_after: int | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    update_factor: float | None  # momentum (or 1/num_batches_tracked) actually applied
    manual_running_mean_after: torch.Tensor | None
    manual_running_var_after: torch.Tensor | None
    running_update_max_abs_diff: float | None
    max_abs_diff: float  # manual vs native output
    max_rel_diff: float  # max_abs_diff / largest per-channel RMS of the native output
    channel_max_abs_diff: torch.Tensor
    #: which call of this module in the forward this entry describes (1-based) and how many
    #: calls it had: a module used twice (weight sharing, a loop) has one entry per call
    call: int = 1
    calls: int = 1
    activation: str | None = None  # e.g. "relu", "hardtanh" (ReLU6), None if none follows
    activation_inplace: bool | None = None
    overwritten_by: str | None = None  # in-place op that later overwrote the BN output
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None  # native BN output, as it was right after BN
    activation_output: torch.Tensor | None = None
    output_reference: torch.Tensor | None = None  # what a hook keeping a reference sees at the end

    @property
    def label(self) -> str:
        """``name``, or ``name#k`` for the k-th call of a module called more than once."""
        return self.name if self.calls == 1 else f"{self.name}#{self.call}"

    # -- derived quantities -------------------------------------------------------------
    def mean_shift(self) -> torch.Tensor | None:
        """(batch mean - running mean) / sqrt(running var + eps): shift in running-std units."""
        if self.running_mean_before is None:
            return None
        return (self.batch_mean - self.running_mean_before) / torch.sqrt(
            self.running_var_before + self.eps
        )

    def log_var_ratio(self) -> torch.Tensor | None:
        """log(batch var / running var) per channel; 0 means the variances agree."""
        if self.running_var_before is None:
            return None
        return torch.log((self.batch_var + self.eps) / (self.running_var_before + self.eps))

    def manual_output(self) -> torch.Tensor:
        """The literal formula applied to the kept input with the statistics BN used."""
        if self.input is None:
            raise LayerError(
                f"Layer {self.name!r} was inspected without keeping tensors.",
                "call inspect(..., keep_tensors=True) or name this layer in keep_tensors.",
            )
        return manual_bn.manual_batch_norm(
            self.input, self.used_mean, self.used_var, self.weight, self.bias, self.eps
        )

    def explain(self, index: tuple[int, ...]) -> dict:
        """The BN formula for one element ``index`` (n, c, h, w...) with its actual numbers."""
        if self.input is None or self.output is None:
            raise LayerError(
                f"Layer {self.name!r} was inspected without keeping tensors.",
                "call inspect(..., keep_tensors=True) or name this layer in keep_tensors.",
            )
        c = index[1]
        return manual_bn.explain_element(
            float(self.input[index]),
            mean=float(self.used_mean[c]),
            var=float(self.used_var[c]),
            eps=self.eps,
            weight=None if self.weight is None else float(self.weight[c]),
            bias=None if self.bias is None else float(self.bias[c]),
            native=float(self.output[index]),
            stats=self.stats_used,
        )

    def overwritten_fraction(self) -> float | None:
        """Fraction of BN output values that a reference-keeping hook sees changed."""
        if self.output is None or self.output_reference is None:
            return None
        return float((self.output != self.output_reference).float().mean())

    def to_dict(self) -> dict:
        """The CLI's JSON schema for one layer (see README)."""
        return {
            "name": self.name,
            "call": self.call,
            "calls": self.calls,
            "type": self.type,
            "num_features": self.num_features,
            "input_shape": list(self.input_shape),
            "mode": self.mode,
            "mode_source": self.mode_source,
            "training": self.training,
            "track_running_stats": self.track_running_stats,
            "momentum": self.momentum,
            "eps": self.eps,
            "stats_used": self.stats_used,
            "updates_running_stats": self.updates_running_stats,
            "count": self.count,
            "batch_mean": _list(self.batch_mean),
            "batch_var": _list(self.batch_var),
            "running_mean_before": _list(self.running_mean_before),
            "running_var_before": _list(self.running_var_before),
            "running_mean_after": _list(self.running_mean_after),
            "running_var_after": _list(self.running_var_after),
            "weight": _list(self.weight),
            "bias": _list(self.bias),
            "num_batches_tracked_before": self.num_batches_tracked_before,
            "num_batches_tracked_after": self.num_batches_tracked_after,
            "update_factor": self.update_factor,
            "running_update_max_abs_diff": _num(self.running_update_max_abs_diff),
            "max_abs_diff": _num(self.max_abs_diff),
            "max_rel_diff": _num(self.max_rel_diff),
            "activation": self.activation,
            "activation_inplace": self.activation_inplace,
            "overwritten_by": self.overwritten_by,
        }


def _num(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(v)


def _list(t: torch.Tensor | None) -> list | None:
    if t is None:
        return None
    return [None if not math.isfinite(v) else v for v in t.detach().double().cpu().tolist()]


@dataclass
class InspectionReport:
    """The result of :func:`inspect`: one :class:`LayerReport` per BatchNorm layer."""

    model: str
    weights: str
    device: str
    input_shape: tuple[int, ...]
    preprocessing: str | None
    model_input: torch.Tensor  # what the network received (after preprocessing), CPU
    predictions: list[list[Prediction]] | None  # top-k per image
    layers: list[LayerReport]
    notes: dict[str, Any] = field(default_factory=dict)
    committed: bool = False
    forward_ms: float = 0.0
    #: which code ran the manual-vs-native check: "compiled" (bnviz.probe_kernel), "eager",
    #: or "compiled+eager" when some layers (CUDA, float64, non-contiguous) needed eager ops
    manual_check: str = "eager"

    def layer(self, name: str, call: int | None = None) -> LayerReport:
        """The entry of layer ``name``.

        A module called more than once in the forward has one entry per call, labelled
        ``name#1``, ``name#2``, ...: pass that label, or ``name`` with ``call=k``. Plain
        ``name`` without ``call`` gives its first call (all of them: :meth:`calls_of`).
        """
        for layer in self.layers:
            if layer.label == name and call in (None, layer.call):
                return layer
        for layer in self.layers:
            if layer.name == name and (call or 1) == layer.call:
                return layer
        if call is not None and any(layer.name == name for layer in self.layers):
            calls = next(layer.calls for layer in self.layers if layer.name == name)
            raise LayerError(f"Layer {name!r} was called {calls} time(s), not {call}.",
                             f"pass call=1..{calls}.")
        raise unknown_layer_error(name, self.layer_names)

    def calls_of(self, name: str) -> list[LayerReport]:
        """Every entry of module ``name``, one per call, in forward order."""
        found = [layer for layer in self.layers if layer.name == name]
        if not found:
            raise unknown_layer_error(name, self.layer_names)
        return found

    @property
    def layer_names(self) -> list[str]:
        """Every entry's :attr:`LayerReport.label` (the module name, ``name#k`` for the
        calls of a module called more than once)."""
        return [layer.label for layer in self.layers]

    def to_frame(self):
        """A pandas DataFrame, one row per BN layer (the network overview):
        :meth:`overview_rows` as a table."""
        return pd.DataFrame(self.overview_rows())

    def overview_rows(self) -> list[dict[str, Any]]:
        """One plain dict per BN layer, the rows of :meth:`to_frame` (None where a value
        does not exist, e.g. no running statistics).

        Without pandas: the dashboard draws its first page from these, and importing
        pandas (~0.4 s in a fresh process) waits until a table is opened or exported.
        """
        rows = []
        for layer in self.layers:
            shift = layer.mean_shift()
            ratio = layer.log_var_ratio()
            rows.append(
                {
                    "index": layer.index,
                    "name": layer.name,
                    "call": layer.call,
                    "calls": layer.calls,
                    "type": layer.type,
                    "channels": layer.num_features,
                    "mode": layer.mode,
                    "mode_source": layer.mode_source,
                    "stats_used": layer.stats_used,
                    "updates_running": layer.updates_running_stats,
                    "momentum": layer.momentum,
                    "eps": layer.eps,
                    "mean_shift": None if shift is None else float(shift.abs().mean()),
                    "mean_shift_max": None if shift is None else float(shift.abs().max()),
                    "log_var_ratio": None if ratio is None else float(ratio.mean()),
                    "log_var_ratio_absmax": None if ratio is None else float(ratio.abs().max()),
                    "max_abs_diff": layer.max_abs_diff,
                    "max_rel_diff": layer.max_rel_diff,
                    "running_update_diff": layer.running_update_max_abs_diff,
                    "activation": layer.activation,
                    "activation_inplace": layer.activation_inplace,
                    "overwritten_by": layer.overwritten_by,
                }
            )
        return rows

    def to_dict(self) -> dict:
        """The CLI's public JSON schema (documented in the README)."""
        return {
            "model": self.model,
            "weights": self.weights,
            "device": self.device,
            "input_shape": list(self.input_shape),
            "preprocessing": self.preprocessing,
            "committed": self.committed,
            "manual_check": self.manual_check,
            "notes": {k: v for k, v in self.notes.items() if _jsonable(v)},
            "predictions": None
            if self.predictions is None
            else [
                [{"index": p.index, "label": p.label, "probability": p.probability} for p in row]
                for row in self.predictions
            ],
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


# -- the private copy -----------------------------------------------------------------------


@dataclass
class _CopyInfo:
    """Bookkeeping kept with a pooled private copy, so a rerun walks no module tree.

    ``pairs`` holds ``(weakref to the original module, private module)`` in
    ``named_modules`` order (weak, so the pool never keeps a caller's model alive);
    ``bns`` the private BN layers by name; ``scratch`` the check's work buffer (a fresh
    activation-sized allocation per call costs page faults comparable to BN itself);
    ``consumers`` what consumed each BN output in earlier forwards, by the training flags
    and input shape they ran with (see :func:`_run_on_copy`).
    """

    pairs: list[tuple[weakref.ReferenceType, torch.nn.Module]]
    bns: dict[str, _BatchNorm]
    #: the pairs whose original had buffers or is a BN layer when the copy was made: the
    #: only ones a reset touches (:func:`_scan`'s fingerprint changes when buffers are
    #: added or removed, which retires the copy)
    stateful: list[tuple[weakref.ReferenceType, torch.nn.Module]] = field(default_factory=list)
    scratch: manual_bn.Scratch = field(default_factory=manual_bn.Scratch)
    consumers: dict[tuple, dict[str, tuple[str | None, bool | None]]] = field(
        default_factory=dict)
    #: the pairs whose parameters are device copies (CUDA): their values are copied again
    #: on every reuse, since an in-place edit through ``.data`` bumps no version counter
    copied_params: list[tuple[weakref.ReferenceType, torch.nn.Module]] = field(
        default_factory=list)
    probed: bool = False  # each BN layer's forward runs through _install_probe's wrapper
    #: ``other_modules`` of the last run: with "eval" twice in a row, the non-BN modules'
    #: flags are still False and only the BN layers' are reset
    flags: str | None = None
    layout: _BlockLayout | None = None  # the compiled probe's block columns (CPU copies)

    @functools.cached_property
    def bn_pairs(self) -> list[tuple[weakref.ReferenceType, _BatchNorm]]:
        return [(ref, m) for ref, m in self.pairs if isinstance(m, _BatchNorm)]

    @functools.cached_property
    def names_by_id(self) -> dict[int, str]:
        return {id(m): n for n, m in self.bns.items()}
    session: Any = None  # the _Session of the forward running on this copy, if any


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
    stateful = [(ref, mine) for ref, mine in pairs
                if isinstance(mine, _BatchNorm) or ref()._buffers]  # type: ignore[union-attr]
    copied = [(ref, mine) for ref, mine in pairs
              if any(p is not None and p.device != device
                     for p in ref()._parameters.values())]  # type: ignore[union-attr]
    object.__setattr__(private, "_bnviz_info",
                       _CopyInfo(pairs=pairs, bns=bns, stateful=stateful,
                                 copied_params=copied))
    return private


def _info(private: torch.nn.Module) -> _CopyInfo:
    return private._bnviz_info  # type: ignore[attr-defined]


def _scan(model: torch.nn.Module) -> tuple[tuple, list[str]]:
    """One walk over the module tree: a cheap fingerprint and the BN layer names.

    The fingerprint covers structure (modules, their types and child names), parameter
    storage/versions, which buffers each module has, and each module's attributes
    (:func:`_attributes`). A pooled copy is reused only while it is unchanged: a replaced or
    renamed submodule, a re-assigned parameter, ``model.to(...)``, an in-place weight edit
    (``_version``), a registered or removed buffer, or a changed attribute
    (``relu.inplace = False``, ``googlenet.transform_input = True``) all force a fresh
    copy. What no fingerprint sees is read again on every reuse: buffer values, and the
    values of parameters held as device copies (:func:`_reset_copy`).

    The walk visits modules in ``named_modules()`` order (pre-order, each module once)
    without building every qualified name; the BN layers' names come from
    ``named_modules()`` once per structure (:data:`_NAMES`).
    """
    modules = []
    layout = []
    attributes = []
    params = []
    buffers = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        key = id(m)
        if key in seen:  # a module reachable twice is listed once, where first met
            continue
        seen.add(key)
        modules.append(key)
        children = m._modules
        layout.append((type(m), tuple(children)))
        attributes.append(_attributes(m))
        for p in m._parameters.values():
            if p is not None:
                params.append((id(p), p.data_ptr(), p._version))
        if m._buffers:
            buffers.append((key, tuple(m._buffers)))
        if children:
            stack.extend(reversed([c for c in children.values() if c is not None]))
    structure = (tuple(modules), tuple(layout))
    names = _NAMES.get(structure)
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        with _NAMES_LOCK:
            if len(_NAMES) >= 64:
                _NAMES.pop(next(iter(_NAMES)))
            _NAMES[structure] = names
    return (*structure, tuple(params), tuple(buffers), tuple(attributes)), list(names)


#: Attribute values a module's forward may read and a caller may set at any time
#: (``relu.inplace``, ``googlenet.transform_input``, ``bn.eps``): compared by value.
_BY_VALUE = frozenset({bool, int, float, str, tuple, type(None), torch.dtype, torch.device})
#: What every ``nn.Module`` keeps in its ``__dict__``: parameters, buffers and submodules are
#: fingerprinted on their own, hooks never reach the private copy, and the training flag is
#: set anew by every inspection.
_STANDARD = frozenset(torch.nn.Module().__dict__)
#: id(module) -> (len(__dict__), a getter for its own attributes' values, whether one of
#: them is not a plain value, the module's type). The getter is an ``itemgetter``: a
#: fingerprint is taken on every inspection, and a Python loop over ~1,000 values is slow.
_ATTR_KEYS: dict[int, tuple] = {}


def _attributes(module: torch.nn.Module) -> tuple:
    """The module's own attributes for :func:`_scan`'s fingerprint: plain values (and
    tuples) by value; functions, tensors and other objects set on it by identity (a
    tensor with its version), so the fingerprint holds no reference to them."""
    state = module.__dict__
    entry = _ATTR_KEYS.get(id(module))
    try:
        if entry is None or entry[0] != len(state) or entry[3] is not type(module):
            raise KeyError
        values = entry[1](state)
    except KeyError:  # new, changed, or another module at a freed module's address
        keys = tuple(k for k in state if k not in _STANDARD)
        getter = itemgetter(*keys) if len(keys) > 1 else (lambda d, k=keys: tuple(map(
            d.__getitem__, k)))
        values = getter(state)
        if len(_ATTR_KEYS) >= 100_000:
            _ATTR_KEYS.clear()
        entry = (len(state), getter, not _BY_VALUE.issuperset(map(type, values)),
                 type(module))
        _ATTR_KEYS[id(module)] = entry
    if not entry[2]:
        # Plain when first seen; one that became an object later is kept as it is (and
        # compared with ==, falling back to "changed" where that cannot say: _same).
        return values
    return tuple(v if type(v) in _BY_VALUE
                 else (id(v), v.data_ptr(), v._version) if type(v) is torch.Tensor else id(v)
                 for v in values)


#: BN layer names per module structure (ids, types and child names, which determine them):
#: ``named_modules()`` builds a qualified name for every module, a third of a scan's cost.
_NAMES: dict[tuple, list[str]] = {}
_NAMES_LOCK = threading.Lock()


def _same(a: tuple, b: tuple) -> bool:
    """Fingerprints compared; an attribute whose ``==`` cannot say (a tuple holding a
    tensor, say) counts as changed."""
    try:
        return bool(a == b)
    except (RuntimeError, ValueError, TypeError):
        return False


class _CopyPool:
    """Idle private copies per (model, device), so a rerun skips the deep copy.

    Deep-copying efficientnet_lite0 costs ~25 ms, about 10% of its forward on CPU. A copy
    is handed to one inspection at a time and reset from the original on every checkout
    (training flags, BN attributes, every buffer), so reuse is invisible to callers.
    """

    MAX_IDLE = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def acquire(self, model: torch.nn.Module, device: torch.device, sig: tuple):
        """A private copy of ``model`` on ``device``; ``sig`` is its :func:`_scan` fingerprint."""
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
_F32 = torch.float32


def _reset_copy(private: torch.nn.Module) -> None:
    """Make a pooled copy equal to its original again (BN attributes, all buffers, and the
    parameters it holds as device copies; parameters on the same device share storage).

    Training flags are set by every run (:func:`_run_on_copy`).

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
        for ref, m in info.stateful:
            orig = ref()
            if orig is None:  # pragma: no cover - the pool is keyed weakly by the root
                raise RuntimeError("the original model of a pooled copy is gone")
            if isinstance(orig, _BatchNorm):
                # Plain attributes: written to __dict__, skipping nn.Module.__setattr__'s
                # parameter/buffer/module checks (~1 us each, three per layer per run).
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


@dataclass
class _FlatRun:
    """Where the compiled probe writes every layer's finished check during one CPU forward.

    Each BN layer owns ``num_features`` columns (in network order) of ``out`` and one
    column of ``maxima`` (see :func:`bnviz.manual_bn.block_checks`). The layer's wrapped
    forward then costs one operator call -- no allocation, no per-layer result objects --
    and nothing is left to compute after the forward. On efficientnet_lite0 at batch 1
    that is what keeps the per-layer Python cost of an inspection small next to the
    forward itself.
    """

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
    parameters (they cannot change while the copy is pooled, see :func:`_scan`)."""

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


def _flat_run(info: _CopyInfo, snapshot: dict[str, dict], scales: dict[str, torch.Tensor],
              dev: torch.device) -> _FlatRun | None:
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
        if before["stats_used"] == "running":
            scale = scales.get(name)
            ok = scale is not None and fits(scale) and fits(m._buffers["running_mean"])
        update = None
        if before["updates"]:
            update = (before["running_mean"], before["running_var"])
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
            order: list[str]) -> list[manual_bn.LayerCheck]:
    """Every call's :class:`~bnviz.manual_bn.LayerCheck`, in call order (``order``: the
    calls' keys, see :class:`_Session`).

    Layers the compiled probe finished during the forward are read from its blocks; the
    others (a second call of a layer, parameters it cannot take, CUDA) have a
    :class:`~bnviz.manual_bn.Probe` for :func:`~bnviz.manual_bn.summarise`.
    """
    records = [session.records[n] for n in order]
    counts = [math.prod(r["input_shape"]) // r["input_shape"][1] for r in records]
    flat = session.flat
    in_block = [i for i, r in enumerate(records) if r["probe"] is None]
    checks: list[Any] = [None] * len(order)
    if in_block:
        names = [records[i]["layer"] for i in in_block]
        layout = flat.layout  # type: ignore[union-attr]
        found = manual_bn.block_checks(
            flat.out, flat.maxima, [layout.offsets[n] for n in names],  # type: ignore
            [bns[n].num_features for n in names], [counts[i] for i in in_block],
            [layout.index[n] for n in names])
        for i, check in zip(in_block, found, strict=True):
            checks[i] = check
    rest = [i for i, r in enumerate(records) if r["probe"] is not None]
    if rest:
        for i, check in zip(rest, manual_bn.summarise([records[i]["probe"] for i in rest],
                                                      device="cpu"), strict=True):
            checks[i] = check
    return checks


# -- one inspection session -----------------------------------------------------------------


class KeptTensors(NamedTuple):
    """One layer's kept tensors as a :class:`TensorSink` receives them during the forward."""

    input: torch.Tensor
    output: torch.Tensor  # the native BN output (a clone if something overwrote it since)
    activation_output: torch.Tensor | None
    output_reference: torch.Tensor  # what a hook that kept a reference sees now
    overwritten_by: str | None


class TensorSink(Protocol):
    """Receives kept layers while the forward is still running (``inspect(tensor_sink=)``).

    Why: summarising the kept activations (the dashboard's maps, histograms and samples)
    costs about half as much as the forward itself. Handed each layer as soon as the next
    BatchNorm layer starts, a caller can do that work on another core while the network
    runs, instead of afterwards while the user waits.

    ``ready(name, tensors)`` is called once per kept layer, on the forward's thread, with the
    tensors as they are at that moment; it must return quickly and must not write to them.
    ``changed(name)`` says that a layer already handed over has changed afterwards (an
    in-place op wrote to one of its tensors, its activation ran only later, or the layer was
    called again): whatever was computed from it is stale, and the finished report holds the
    right tensors. Without ``changed`` calls, a layer's tensors in the report are exactly
    the ones handed over, with the same values.
    """

    def ready(self, name: str, tensors: KeptTensors) -> None: ...

    def changed(self, name: str) -> None: ...


@dataclass
class _Pending:
    layer: str
    ref: weakref.ReferenceType


class _Session(TorchFunctionMode):
    """Per-layer steps + torch-function interception for one forward of the private copy.

    Each BN layer's wrapped forward (installed once per pooled copy, :func:`_install_probe`)
    calls the copy's current session before and after the layer. The torch-function mode
    (entered only when needed, see :func:`_run_on_copy`) names the activation consuming
    each BN output and clones kept tensors before an in-place op overwrites them.
    """

    def __init__(self, names: dict[int, str], keep: set[str], device: torch.device,
                 scratch: manual_bn.Scratch, snapshot: dict[str, dict], detect: bool,
                 running_scales: dict[str, torch.Tensor] | None = None,
                 flat: _FlatRun | None = None, sink: TensorSink | None = None):
        super().__init__()
        self.sink = sink
        self.handed: set[str] = set()
        self._hand_cursor = 0
        self.running_scales = running_scales or {}
        self.flat = flat
        # layer -> compiled-probe arguments; a layer leaves it when it stops fitting them
        self.flat_args: dict[str, tuple] = dict(flat.args) if flat is not None else {}
        #: layer -> running-update factor, for layers whose update the blocks checked
        self.block_factors: dict[str, float] = {}
        self.names = names
        self.keep = keep
        self.device = device
        self.scratch = scratch
        self.snapshot = snapshot
        self.detect = detect
        # Everything per call is keyed by the call's key: the layer name for its first
        # call, "name#k" for the k-th (a module used twice in one forward).
        self.before: dict[str, dict] = {}
        self.records: dict[str, dict] = {}
        self.calls: dict[str, int] = {}  # layer name -> calls so far
        self.pending: list[_Pending] = []
        #: storage pointer -> (call key, role, ref) of the tensors watched for in-place writes
        self.watched: dict[int, list[tuple[str, str, weakref.ReferenceType]]] = {}
        self.current: str | None = None  # the layer name of the call running now
        self.order: list[str] = []

    # before the layer's own forward: its state as this call starts
    def before_call(self, module: _BatchNorm) -> str:
        with torch._C.DisableTorchFunction():
            name = self.names[id(module)]
            self.current = name
            if self.sink is not None:
                self._hand_off()
            call = self.calls.get(name, 0) + 1
            self.calls[name] = call
            if call > 1:  # called again in this forward: buffers may have moved
                key = f"{name}#{call}"
                self.flat_args.pop(name, None)  # its block columns hold the first call
                self.before[key] = {
                    "running_mean": _cpu_copy(module.running_mean),
                    "running_var": _cpu_copy(module.running_var),
                    "nbt": None if module.num_batches_tracked is None
                    else int(module.num_batches_tracked),
                    **_layer_state(module),
                }
                return key
            # Buffers and state were taken for every layer just before the forward; the
            # state is re-read only if the model's own code changed the layer since.
            before = self.snapshot[name]
            if (module.training, module.track_running_stats, module.momentum) != (
                    before["training"], before["track"], before["momentum"]):
                before = {**before, **_layer_state(module)}
                self.flat_args.pop(name, None)
            self.before[name] = before
            return name

    # after it: measure the call
    def after_call(self, key: str, module: _BatchNorm, args, output):
        with torch._C.DisableTorchFunction():
            name = self.names[id(module)]
            x = args[0]
            fast = self.flat_args.get(name) if key == name else None
            # The common case: the compiled probe writes this layer's finished check into
            # its columns of the network-wide blocks (_FlatRun); a probe of None marks it.
            probe = None
            if fast is None or not self._into_blocks(key, fast, module, x, output):
                probe = self._probe(key, module, x, output)
            rec = {"probe": probe, "input_shape": tuple(x.shape), "layer": name}
            if key != name and name in self.handed:  # a later call of a layer handed over
                self.sink.changed(name)  # type: ignore[union-attr]
            if name in self.keep:
                rec["input"] = x
                rec["output"] = output
                rec["output_ref"] = output
                self._watch(key, "input", x)
            # Watched whether kept or not: which in-place op overwrites the output is part
            # of every report (what a hook keeping a reference would see).
            if self.detect:
                self._watch(key, "output", output)
            self.records[key] = rec
            self.order.append(key)
            if self.detect:
                self.pending.append(_Pending(key, weakref.ref(output)))

    def _watch(self, key: str, role: str, t: torch.Tensor) -> None:
        self.watched.setdefault(_storage_ptr(t), []).append((key, role, weakref.ref(t)))

    def _hand_off(self) -> None:
        """Give the sink every kept layer that finished before the current one started."""
        order = self.order
        while self._hand_cursor < len(order):
            name = order[self._hand_cursor]
            self._hand_cursor += 1
            rec = self.records[name]
            if name in self.handed or rec["layer"] not in self.keep:
                continue
            self.handed.add(name)
            self.sink.ready(name, KeptTensors(  # type: ignore[union-attr]
                _cpu(rec["input"]), _cpu(rec["output"]), _cpu(rec.get("activation_output")),
                _cpu(rec["output_ref"]), rec.get("overwritten_by")))

    def _into_blocks(self, name: str, fast: tuple, module: _BatchNorm, x, output) -> bool:
        """Check the layer with the compiled probe into the blocks; False if it cannot.

        Only the cheap tests are made here; the operator validates shapes, devices and
        sizes itself before it writes anything, and says no with a RuntimeError.
        """
        if not (x.dtype is _F32 and output.dtype is _F32 and x.is_contiguous()
                and output.is_contiguous()):
            return False
        offset, index, weight, bias, eps, scale, update = fast
        flat = self.flat
        buffers = module._buffers
        factor = 0.0
        if update is not None:
            momentum = self.before[name]["momentum"]  # a first call: key == layer name
            nbt = None if momentum is not None else int(buffers["num_batches_tracked"])
            factor = manual_bn.running_update_factor(momentum, nbt)
            before_mean, before_var = update
            after_mean, after_var = buffers["running_mean"], buffers["running_var"]
        else:
            before_mean = before_var = after_mean = after_var = None
        try:
            flat.op(x, output, flat.out, flat.maxima, offset, index,  # type: ignore[union-attr]
                    weight, bias, eps, None if scale is None else buffers["running_mean"],
                    scale, before_mean, before_var, after_mean, after_var, factor)
        except RuntimeError:
            return False
        if update is not None:
            self.block_factors[name] = factor
        return True

    def _probe(self, key: str, module: _BatchNorm, x, output) -> manual_bn.Probe:
        use_running = self.before[key]["stats_used"] == "running"
        # In eval mode the forward does not touch the buffers, so the module's own
        # running statistics are the ones BN just used.
        return manual_bn.probe_layer(  # no detach needed: the forward runs in no_grad
            x,
            output,
            weight=module.weight,
            bias=module.bias,
            eps=module.eps,
            running_mean=module.running_mean if use_running else None,
            running_var=module.running_var if use_running else None,
            use_running=use_running,
            scratch=self.scratch,
            # the scale from before the forward holds for a first call only
            scale=self.running_scales.get(key) if use_running else None,
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending or self.watched:
            fname = getattr(func, "__name__", "")
            inplace = _is_inplace(fname, args, kwargs)
            if self.pending:
                self._classify_consumer(fname, inplace, args, kwargs)
            if inplace and self.watched and args and isinstance(args[0], torch.Tensor):
                entries = self.watched.get(_storage_ptr(args[0]))
                if entries:
                    self._copy_on_write(entries, fname)
            result = func(*args, **kwargs)
            if self.pending_activation is not None:
                name = self.pending_activation
                self.pending_activation = None
                if self.records[name]["layer"] in self.keep and isinstance(result,
                                                                          torch.Tensor):
                    self.records[name]["activation_output"] = result
                    # watched too: an in-place op later in the forward must not change what
                    # the report shows as this activation's output
                    self._watch(name, "activation", result)
                    if name in self.handed:  # the activation ran after the hand-off
                        self.sink.changed(name)  # type: ignore[union-attr]
            return result
        return func(*args, **kwargs)

    pending_activation: str | None = None

    def _classify_consumer(self, fname, inplace, args, kwargs):
        """Name the first op applied to each pending BN output, if it is an activation."""
        flat = _flat_tensors(args, kwargs)
        still_pending = []
        for p in self.pending:
            t = p.ref()
            if t is None:  # freed before anything consumed it
                continue
            if not any(a is t for a in flat):
                still_pending.append(p)
                continue
            if fname in ACTIVATIONS or fname.rstrip("_") in ACTIVATIONS:
                rec = self.records[p.layer]
                rec["activation"] = fname.rstrip("_")
                rec["activation_inplace"] = inplace
                self.pending_activation = p.layer
        self.pending = still_pending

    def _copy_on_write(self, entries: list, fname: str):
        for layer, role, ref in list(entries):
            t = ref()
            if t is None:  # freed: its storage may now belong to another tensor
                entries.remove((layer, role, ref))
                continue
            rec = self.records[layer]
            key = _ROLE_KEYS[role]
            if rec.get(key) is t:  # first overwrite: keep the value as it was
                with torch._C.DisableTorchFunction():
                    rec[key] = t.clone()
            if role == "output":
                rec.setdefault("overwritten_by", fname)
            elif role == "input":
                rec.setdefault("input_overwritten_by", fname)
            if layer in self.handed:
                self.sink.changed(layer)  # type: ignore[union-attr]


#: Which record entry holds each watched tensor.
_ROLE_KEYS = {"input": "input", "output": "output", "activation": "activation_output"}


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def _is_inplace(fname: str, args, kwargs) -> bool:
    if kwargs.get("inplace") is True:
        return True
    if fname.endswith("_") and not fname.startswith("__"):
        return True
    if fname.startswith("__i") and fname.endswith("__"):  # __iadd__, __imul__, ...
        return True
    if fname in ACTIVATIONS and len(args) > 1 and args[-1] is True:
        return True  # F.relu(x, True)
    out = kwargs.get("out")
    return isinstance(out, torch.Tensor)


def _flat_tensors(args, kwargs) -> list:
    flat: list = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, list | tuple):
            flat.extend(x for x in a if isinstance(x, torch.Tensor))
    return flat


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _cpu_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A CPU copy that cannot alias ``t``."""
    if t is None:
        return None
    c = _cpu(t)
    return c.clone() if c.data_ptr() == t.data_ptr() else c


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach()
    if t.is_floating_point() and t.dtype != torch.float32 and t.dtype != torch.float64:
        t = t.float()
    return t.cpu() if t.device.type != "cpu" else t


# -- the public function ---------------------------------------------------------------------


def inspect(
    model,
    x: torch.Tensor,
    modes: str | LayerMode | Mapping[str, str | LayerMode] | None = None,
    device: str | torch.device | None = "auto",
    *,
    keep_tensors: bool | Iterable[str] = True,
    other_modules: str = "eval",
    commit: bool = False,
    top_k: int = 5,
    tensor_sink: TensorSink | None = None,
) -> InspectionReport:
    """Run one forward of ``model`` on ``x`` and measure every BatchNorm layer.

    Args:
        model: a :class:`bnviz.models.LoadedModel` (``x`` are then raw images in [0, 1] and
            the model's preprocessing is applied and recorded) or any ``nn.Module`` (``x`` is
            fed as it is; BatchNorm1d/2d/3d and SyncBatchNorm are all inspected).
        x: the input batch.
        modes: one mode string for every BN layer (``"eval"``, ``"train,momentum=none"``,
            ...) or ``{layer name: mode}``; layers not named keep the model's own setting.
            See :mod:`bnviz.modes`.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``. Report tensors are
            always on the CPU.
        keep_tensors: keep each layer's input, native output and activation output
            (``True``), none of them (``False``, statistics only: the cheapest), or only
            the named layers.
        other_modules: ``"eval"`` (default) runs non-BN modules such as Dropout in eval so
            the numbers are reproducible; ``"keep"`` leaves them as the model has them.
        commit: copy the running-stat update of this forward back into ``model``'s
            buffers. Without it the caller's model is never modified.
        top_k: number of predictions per image (when the output looks like class logits).
        tensor_sink: receives each kept layer's tensors during the forward, so a caller can
            summarise them on another core while the network runs (see :class:`TensorSink`;
            the dashboard does). Used only when the forward runs on the CPU.

    Returns:
        An :class:`InspectionReport`.

    Example::

        >>> import bnviz
        >>> m = bnviz.load_model("efficientnet_lite0")
        >>> x = bnviz.make_stimulus("image", name="chelsea", batch_size=4, composition="jitter")
        >>> r = bnviz.inspect(m, x, modes="train", keep_tensors=False)
        >>> r.layers[0].stats_used, r.layers[0].max_abs_diff < 1e-4
        ('batch', True)
    """
    if other_modules not in ("eval", "keep"):
        raise BnvizError(f"Invalid other_modules {other_modules!r}.", "use 'eval' or 'keep'.")
    # Duck-typed so this module does not import torchvision (bnviz.models does).
    is_loaded = hasattr(model, "module") and hasattr(model, "preprocess")
    loaded = model if is_loaded and not isinstance(model, torch.nn.Module) else None
    module = loaded.module if loaded is not None else model
    if not isinstance(module, torch.nn.Module):
        raise BnvizError(
            f"inspect() needs an nn.Module or a bnviz LoadedModel, got {type(model).__name__}.",
            "pass bnviz.load_model(name) or your own torch.nn.Module.",
        )
    if not isinstance(x, torch.Tensor):
        raise BnvizError(
            f"inspect() needs a tensor input, got {type(x).__name__}.",
            "use bnviz.make_stimulus(...) or a torch.Tensor of shape (N, C, H, W).",
        )
    dev = resolve_device(device)
    sig, names = _scan(module)
    requested = resolve_modes(modes, names)
    if keep_tensors is True:
        keep = set(names)
    elif keep_tensors is False or keep_tensors is None:
        keep = set()
    else:
        keep = set(keep_tensors)
        for n in keep:
            if n not in names:
                raise unknown_layer_error(n, names)

    preprocessing = None
    model_input = x.detach()
    if loaded is not None:
        model_input = loaded.preprocess(model_input)
        preprocessing = loaded.preprocess.description
    try:
        return _run(module, loaded, model_input, preprocessing, requested, dev, keep,
                    other_modules, commit, top_k, names, sig,
                    tensor_sink if keep and dev.type == "cpu" else None)
    except torch.cuda.OutOfMemoryError as exc:
        raise DeviceError(
            f"CUDA ran out of memory inspecting a batch of shape {tuple(x.shape)}.",
            "use a smaller batch size or image, keep fewer tensors, or --device cpu.",
        ) from exc
    except RuntimeError as exc:
        if is_cuda_oom(exc):
            raise DeviceError(
                f"Out of memory inspecting a batch of shape {tuple(x.shape)}.",
                "use a smaller batch size or image, or keep fewer tensors.",
            ) from exc
        raise


def _run(module, loaded, model_input, preprocessing, requested, dev, keep, other_modules,
         commit, top_k, names, sig, sink=None) -> InspectionReport:
    private, sig = _POOL.acquire(module, dev, sig)
    try:
        return _run_on_copy(private, module, loaded, model_input, preprocessing, requested,
                            dev, keep, other_modules, commit, top_k, names, sink)
    finally:
        _info(private).session = None
        _POOL.release(module, dev, private, sig)


def _install_probe(info: _CopyInfo, module: _BatchNorm) -> None:
    """Run ``module``'s own forward between the current session's before/after steps.

    Installed once per pooled copy as an instance ``forward`` instead of a forward pre-hook
    and a forward hook: with hooks registered, every call takes ``nn.Module``'s slow path
    (~20 us a layer inside a real forward; 2 ms of a 38 ms batch-1 efficientnet_lite0
    forward), which is more than the compiled check of a small layer costs. Outside an
    inspection (no session) it is the layer's own forward.
    """
    native = module.forward  # the class's forward, or one the model set on the instance

    def forward(*args, **kwargs):
        session = info.session
        if session is None:
            return native(*args, **kwargs)
        name = session.before_call(module)
        output = native(*args, **kwargs)
        session.after_call(name, module, args, output)
        return output

    module.__dict__["forward"] = forward


def _run_on_copy(private, module, loaded, model_input, preprocessing, requested, dev, keep,
                 other_modules, commit, top_k, names, sink=None) -> InspectionReport:
    info = _info(private)
    # Training flags: the original's for BN layers, eval for the rest unless kept. Written
    # to __dict__ directly: nn.Module.__setattr__ costs ~5 us, times ~250 modules.
    keep_flags = other_modules == "keep"
    for ref, m in (info.bn_pairs if info.flags == other_modules == "eval" else info.pairs):
        orig = ref()
        m.__dict__["training"] = orig.training if (keep_flags or isinstance(m, _BatchNorm)) \
            else False
    info.flags = other_modules
    private_bns = info.bns
    like = next(iter(private.parameters()), None)  # dtype/device of buffers track=on creates
    for name, mode in requested.items():
        apply_mode(private_bns[name], mode, like)
    if not info.probed:
        for m in private_bns.values():
            _install_probe(info, m)
        info.probed = True

    # What consumes each BN output (the activation, in place or not) is found by watching
    # every torch call of the forward -- a Python call per op, ~20% of a batch-1 forward.
    # It only depends on the code path, so it is learned once per (training flags, input
    # shape) and reused; a forward that keeps tensors always watches (copy-on-write).
    flags_of = private_bns.values() if keep_flags is False else (m for _, m in info.pairs)
    consumers_key = (other_modules, tuple(m.training for m in flags_of),
                     tuple(model_input.shape))
    known = info.consumers.get(consumers_key)
    detect = bool(keep) or known is None

    snapshot = _snapshot(private_bns)
    scales = _running_scales(private_bns, snapshot)
    session = _Session(info.names_by_id, keep, dev, info.scratch,
                       snapshot, detect, scales, _flat_run(info, snapshot, scales, dev), sink)
    info.session = session
    inp = model_input.to(dev)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), (session if detect else contextlib.nullcontext()):
            out = private(inp)
    except ValueError as exc:
        if "Expected more than 1 value per channel" in str(exc):
            raise single_value_error(session.current, private_bns.get(session.current or ""),
                                     exc) from exc
        raise
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    forward_ms = (time.perf_counter() - t0) * 1000

    if detect:
        if len(info.consumers) >= 16:
            info.consumers.pop(next(iter(info.consumers)))
        info.consumers[consumers_key] = {
            n: (rec.get("activation"), rec.get("activation_inplace"), rec.get("overwritten_by"))
            for n, rec in session.records.items()
        }
    else:
        for n, rec in session.records.items():
            rec["activation"], rec["activation_inplace"], rec["overwritten_by"] = known.get(
                n, (None, None, None))

    layers = _layer_reports(session, private_bns, requested, info)
    notes: dict[str, Any] = {}
    if loaded is not None:
        notes.update(loaded.notes)
    if not names:
        notes["no_batchnorm"] = "this model has no BatchNorm layers"
    missing = [n for n in names if n not in session.calls]
    if missing:
        notes["layers_not_called"] = missing
    notes["other_modules"] = other_modules
    backends = sorted({"compiled" if rec["probe"] is None else rec["probe"].backend
                       for rec in session.records.values()})

    committed = False
    if commit:
        committed = _commit(module, private_bns)

    return InspectionReport(
        model=loaded.name if loaded is not None else type(module).__name__,
        weights=loaded.weights if loaded is not None else "caller's module",
        device=str(dev),
        input_shape=tuple(model_input.shape),
        preprocessing=preprocessing,
        model_input=_cpu(model_input),
        predictions=_predictions(out, loaded, top_k),
        layers=layers,
        notes=notes,
        committed=committed,
        forward_ms=forward_ms,
        manual_check="+".join(backends) if backends else "eager",
    )


def single_value_error(layer: str | None, bn: _BatchNorm | None,
                       exc: Exception) -> LayerError:
    """PyTorch's "Expected more than 1 value per channel" as the real cause and a fix.

    A layer normalises with batch statistics in train mode, and also in eval when it has no
    running buffers (built with ``track_running_stats=False``, or ``track=none``): the two
    need different fixes.
    """
    name = layer or "?"
    single = ("gets one value per channel (batch statistics of a single value are "
              f"undefined; PyTorch says: {exc})")
    if bn is not None and not bn.training and not has_running_stats(bn):
        return LayerError(
            f"Layer {name!r} is in eval mode but has no running statistics (built with "
            f"track_running_stats=False, or mode track=none), so it normalises with batch "
            f"statistics, and it {single}.",
            f"use batch size >= 2 or a larger input, or give the layer running statistics: "
            f"mode 'eval,track=on' (fresh buffers: mean 0, var 1) for {name!r}.",
        )
    return LayerError(
        f"Layer {name!r} is in train mode and {single}.",
        f"use batch size >= 2 or a larger input, or put that layer in eval "
        f"(mode 'eval' for {name!r}).",
    )


def _snapshot(bns: dict[str, _BatchNorm]) -> dict[str, dict]:
    """Every layer's running buffers, counter and state before the forward, in one copy.

    Buffers are read from ``_buffers`` directly: ``module.running_mean`` goes through
    ``nn.Module.__getattr__`` (~1 us), a few hundred times per run.
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
        out[name] = {"running_mean": stats[i], "running_var": stats[k + i], "nbt": nbt[i],
                     "held": _held(bufs[i]),
                     **_state_of(state["training"], state["track_running_stats"],
                                 state["momentum"], rm[i] is not None and rv[i] is not None)}
    return out


def _held(buffers: dict) -> tuple:
    """The layer's buffer objects and their version counters: if both are the same after
    the forward, nothing wrote the buffers and the report's copies from before still hold."""
    return tuple((t, t._version) if t is not None else None
                 for t in (buffers.get("running_mean"), buffers.get("running_var"),
                           buffers.get("num_batches_tracked")))


def _unchanged(before: dict, buffers: dict) -> bool:
    """Whether a layer's buffers are as :func:`_snapshot` copied them (see :func:`_held`)."""
    held = before.get("held")
    if held is None or before["updates"]:
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


def _layer_state(module: _BatchNorm) -> dict[str, Any]:
    """What the report records of a layer's settings as its forward starts."""
    return _state_of(module.training, module.track_running_stats, module.momentum,
                     module.running_mean is not None and module.running_var is not None)


@functools.lru_cache(maxsize=64)
def _state_of(training: bool, track: bool, momentum: float | None,
              buffers: bool) -> dict[str, Any]:
    """The state fields for one combination of flags (few per network: cached)."""
    probe = SimpleNamespace(training=training, track_running_stats=track, momentum=momentum,
                            running_mean=True if buffers else None,
                            running_var=True if buffers else None)  # what modes reads
    return {
        "stats_used": stats_used(probe),
        "updates": updates_running_stats(probe),
        "mode": describe_state(probe),
        "training": training,
        "track": track,
        "momentum": momentum,
    }


def _running_scales(bns: dict[str, _BatchNorm],
                    snapshot: dict[str, dict]) -> dict[str, torch.Tensor]:
    """``weight / sqrt(running_var + eps)`` of every layer that will normalise with its
    running statistics, computed for all of them at once before the forward (in eval mode
    the forward does not touch the buffers, so this is exactly what BN will use)."""
    groups: dict[tuple, list[str]] = {}
    for n, before in snapshot.items():
        if before["stats_used"] == "running":
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
        # The current weights (ones where none), read on every run: see _params_report.
        weights = [m._parameters.get("weight") for m in mods]
        gamma = torch.cat([w.detach() if w is not None
                           else torch.ones(m.num_features, dtype=work, device=dev)
                           for m, w in zip(mods, weights, strict=True)]).to(work)
        part_of = scale * gamma
        for n, part in zip(group, part_of.split(sizes), strict=True):
            out[n] = part
    return out


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


class _AnyDimBatchNorm(_BatchNorm):
    """SyncBatchNorm on one device is plain BatchNorm; accepts any (N, C, ...) input."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _as_plain_bn(root: torch.nn.Module, name: str, m: _BatchNorm) -> _BatchNorm:
    if not isinstance(m, torch.nn.SyncBatchNorm):
        return m
    plain = _AnyDimBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    plain.weight, plain.bias = m.weight, m.bias
    plain.running_mean, plain.running_var = m.running_mean, m.running_var
    plain.num_batches_tracked = m.num_batches_tracked
    plain.training = m.training
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, plain)
    return plain


def _new_report(fields: dict) -> LayerReport:
    """``LayerReport(**fields)`` without the generated ``__init__``: binding its ~45
    keyword arguments costs ~5 us, once per layer per inspection; the dict becomes the
    instance's ``__dict__`` (~1 us). Every field must be given, and nothing else."""
    if fields.keys() != _REPORT_FIELDS:
        raise TypeError(f"LayerReport fields differ: {sorted(fields.keys() ^ _REPORT_FIELDS)}")
    report = object.__new__(LayerReport)
    report.__dict__ = fields
    return report


_REPORT_FIELDS = {f.name for f in dataclasses.fields(LayerReport)}


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


def _layer_reports(session: _Session, bns: dict[str, _BatchNorm], requested,
                   info: _CopyInfo) -> list[LayerReport]:
    """Build every layer's report from the probes, with vectorised arithmetic and copies."""
    order = session.order
    checks = _checks(session, bns, order)
    layer_of = [session.records[k]["layer"] for k in order]
    mods = [bns[n] for n in layer_of]
    bufs = [m._buffers for m in mods]
    befores = [session.before[k] for k in order]
    # After the forward: buffers nothing wrote (eval mode) keep the copies made before it;
    # the others are copied now, all in one go. A call followed by another call of the same
    # module ends where the next one starts.
    rm_after = [b["running_mean"] for b in befores]
    rv_after = [b["running_var"] for b in befores]
    nbt_after = [b["nbt"] for b in befores]
    calls = session.calls
    call_no = [1 if k == n else int(k.rpartition("#")[2]) for k, n in zip(order, layer_of,
                                                                          strict=True)]
    moved = []
    for i, (before, buffers) in enumerate(zip(befores, bufs, strict=True)):
        name = layer_of[i]
        if call_no[i] < calls[name]:
            following = session.before[f"{name}#{call_no[i] + 1}"]
            rm_after[i], rv_after[i] = following["running_mean"], following["running_var"]
            nbt_after[i] = following["nbt"]
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
            "input_shape": rec["input_shape"],
            "mode": before["mode"],
            "mode_source": "override" if name in requested else "model",
            "training": before["training"],
            "track_running_stats": before["track"],
            "has_running_stats": before["running_mean"] is not None,
            "momentum": before["momentum"],
            "eps": bn.eps,
            "affine": bn.affine,
            "stats_used": before["stats_used"],
            "updates_running_stats": before["updates"],
            "count": check.batch.count,
            "batch_mean": check.batch.mean,
            "batch_var": check.batch.var,
            "batch_var_unbiased": check.batch.var_unbiased,
            "running_mean_before": before["running_mean"],
            "running_var_before": before["running_var"],
            "running_mean_after": rm_after[i],
            "running_var_after": rv_after[i],
            "num_batches_tracked_before": before["nbt"],
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
            "activation": rec.get("activation"),
            "activation_inplace": rec.get("activation_inplace"),
            "overwritten_by": rec.get("overwritten_by"),
            "input": _cpu(rec.get("input")),
            "output": _cpu(rec.get("output")),
            "activation_output": _cpu(rec.get("activation_output")),
            "output_reference": _cpu(rec.get("output_ref")),
        }))
    return reports


def _block_updates(session: _Session, bns: dict[str, _BatchNorm],
                   order: list[str]) -> dict[int, tuple]:
    """``(factor, manual mean, manual var, max abs diff)`` by report position, for the layers
    whose running-stat update the compiled probe checked in its blocks during the forward."""
    factors = session.block_factors
    flat = session.flat
    if not factors or flat is None:
        return {}
    positions = [i for i, n in enumerate(order)
                 if n in factors and session.records[n]["probe"] is None]
    if not positions:
        return {}
    names = [session.records[order[i]]["layer"] for i in positions]
    layout = flat.layout
    columns = manual_bn.block_columns(flat.out[4:6], [layout.offsets[n] for n in names],
                                      [bns[n].num_features for n in names])
    diffs = flat.maxima[2].tolist()
    return {i: (factors[n], mean, var, diffs[layout.index[n]])
            for i, n, (mean, var) in zip(positions, names, columns, strict=True)}


def _manual_updates(befores, checks, rm_after, rv_after, nbt_after, done=None):
    """The running-stat update each layer should have made, against what it made.

    For every layer that updated its buffers: ``factor`` (momentum, or 1/num_batches_tracked
    for momentum=None), the manual new running mean/var (:func:`manual_bn.manual_running_update`
    in float64, one vectorised call for all layers) and the max difference from the buffers.
    Returns ``(factor, manual_mean, manual_var, max_abs_diff)`` per layer, Nones where the
    layer did not update. ``done`` has these already for some positions (the compiled
    probe's blocks, :func:`_block_updates`, same formula).
    """
    result: list[tuple] = [(None, None, None, None)] * len(befores)
    done = done or {}
    idx = []
    for i, before in enumerate(befores):
        if i in done:
            result[i] = done[i]
        elif before["updates"]:
            factor = manual_bn.running_update_factor(before["momentum"], nbt_after[i])
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
        cat(befores[i]["running_mean"] for i in idx), cat(befores[i]["running_var"] for i in idx),
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


def _commit(module: torch.nn.Module, private_bns: dict[str, _BatchNorm]) -> bool:
    """Write the private copy's running buffers back into the caller's model."""
    changed = False
    with _MODEL_LOCK, torch.no_grad():
        for name, orig in bn_layers(module):
            new = private_bns[name]
            if not has_running_stats(orig) or not has_running_stats(new):
                continue
            orig.running_mean.copy_(new.running_mean)
            orig.running_var.copy_(new.running_var)
            if orig.num_batches_tracked is not None and new.num_batches_tracked is not None:
                orig.num_batches_tracked.copy_(new.num_batches_tracked)
            changed = True
    return changed


def logits_of(out: Any) -> torch.Tensor | None:
    """The class-logit tensor of a model output (tensor, GoogLeNet/Inception tuples, dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping):
        if "out" in out:
            return out["out"]
        out = list(out.values())
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _predictions(out, loaded, top_k) -> list[list[Prediction]] | None:
    logits = logits_of(out)
    if logits is None or logits.dim() != 2 or logits.shape[1] < 2:
        return None
    probs = torch.softmax(logits.detach().float(), dim=1).cpu()
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    names = loaded.class_names if loaded is not None else None
    rows = []
    for vals, idxs in zip(values.tolist(), indices.tolist()):
        rows.append(
            [
                Prediction(
                    index=i,
                    label=names[i] if names and i < len(names) else f"class {i}",
                    probability=v,
                )
                for v, i in zip(vals, idxs)
            ]
        )
    return rows
