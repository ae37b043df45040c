"""Watching every torch call of a forward: which op consumes each BN output, and
copy-on-write for the tensors a report keeps.

Kept tensors are held by reference, not cloned. When an in-place op (``ReLU(inplace=True)``,
``out += identity``) is about to overwrite one, the value is cloned first. The same
interception names the activation that consumes each BN output and whether it ran in
place -- exactly why a forward hook that keeps a reference can see post-ReLU values
(docs/stories.md, section 1). It costs a Python call per torch op, so the session enters
it only when a forward keeps tensors or has a code path not seen before.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from .records import CallRecord
    from .session import TensorSink

# Functions that count as "the activation following a BN layer" when they are the first
# thing applied to its output.
ACTIVATIONS = frozenset(
    """relu relu_ relu6 hardtanh hardtanh_ silu silu_ hardswish hardswish_ gelu sigmoid sigmoid_
    elu elu_ leaky_relu leaky_relu_ mish selu selu_ celu celu_ softplus tanh tanh_ prelu
    hardsigmoid hardsigmoid_ threshold threshold_ rrelu rrelu_""".split()
)


@dataclass(slots=True)
class _Pending:
    """A BN output whose first consumer has not run yet."""

    layer: str  # the call's key
    ref: weakref.ReferenceType


class ConsumerWatch(TorchFunctionMode):
    """The torch-function mode of one forward (thread-local while entered).

    It shares the session's ``records`` (by call key), ``keep`` (kept layer names),
    ``handed`` (call keys already given to the ``sink``) and ``sink``, and writes what it
    sees into the records: ``activation``/``activation_inplace`` of the consumed output,
    ``overwritten_by``, the ``activation_output`` of kept layers, and clones of kept
    tensors about to be overwritten. A layer already handed to the sink is reported as
    ``changed`` when that happens.
    """

    def __init__(self, records: dict[str, CallRecord], keep: set[str], handed: set[str],
                 sink: TensorSink | None) -> None:
        super().__init__()
        self.records = records
        self.keep = keep
        self.handed = handed
        self.sink = sink
        self.pending: list[_Pending] = []
        #: storage pointer -> (call key, record attribute, ref) of the tensors watched for
        #: in-place writes
        self.watched: dict[int, list[tuple[str, str, weakref.ReferenceType]]] = {}
        #: the call whose output the op running now consumes as its activation
        self.pending_activation: str | None = None

    def watch(self, key: str, role: str, t: torch.Tensor) -> None:
        """Clone ``t`` (held as ``records[key].<role>``) before an in-place op writes it."""
        self.watched.setdefault(_storage_ptr(t), []).append((key, role, weakref.ref(t)))

    def follow(self, key: str, output: torch.Tensor) -> None:
        """Watch a BN call's output: for in-place writes (which op overwrote it is part of
        every report) and for the op that consumes it first."""
        ref = weakref.ref(output)
        self.watched.setdefault(_storage_ptr(output), []).append((key, "output", ref))
        self.pending.append(_Pending(key, ref))

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
                key = self.pending_activation
                self.pending_activation = None
                rec = self.records[key]
                if rec.layer in self.keep and isinstance(result, torch.Tensor):
                    rec.activation_output = result
                    # watched too: an in-place op later in the forward must not change what
                    # the report shows as this activation's output
                    self.watch(key, "activation_output", result)
                    if key in self.handed:  # the activation ran after the hand-off
                        self.sink.changed(key)  # type: ignore[union-attr]
            return result
        return func(*args, **kwargs)

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
                rec.activation = fname.rstrip("_")
                rec.activation_inplace = inplace
                self.pending_activation = p.layer
        self.pending = still_pending

    def _copy_on_write(self, entries: list, fname: str):
        for key, role, ref in list(entries):
            t = ref()
            if t is None:  # freed: its storage may now belong to another tensor
                entries.remove((key, role, ref))
                continue
            rec = self.records[key]
            if getattr(rec, role) is t:  # first overwrite: keep the value as it was
                with torch._C.DisableTorchFunction():
                    setattr(rec, role, t.clone())
            if role == "output" and rec.overwritten_by is None:
                rec.overwritten_by = fname
            if key in self.handed:
                self.sink.changed(key)  # type: ignore[union-attr]


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
