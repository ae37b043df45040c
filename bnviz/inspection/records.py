"""Typed per-call records of one inspection: the state a BN call starts from
(:class:`CallStart`) and what the call left behind (:class:`CallRecord`).

They are built and read once or more per BN call of every forward, so they are plain
``__slots__`` classes built positionally: no per-instance dict, no properties, no keyword
binding. :class:`LayerState` is cached and shared between layers, hence immutable.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import TYPE_CHECKING, NamedTuple

from ..modes import describe_state, stats_used, updates_running_stats

if TYPE_CHECKING:
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from ..manual_bn import Probe


class LayerState(NamedTuple):
    """A layer's settings as a call starts, and what they imply for the report."""

    stats_used: str  # "batch" or "running"
    updates: bool  # whether the forward writes the running buffers
    mode: str  # the effective state as a mode string, e.g. "train,track=on,momentum=0.1"
    training: bool
    track: bool  # track_running_stats
    momentum: float | None


@functools.lru_cache(maxsize=64)
def _state_of(training: bool, track: bool, momentum: float | None,
             buffers: bool) -> LayerState:
    """The :class:`LayerState` of one combination of flags (few per network: cached)."""
    probe = SimpleNamespace(training=training, track_running_stats=track, momentum=momentum,
                            running_mean=True if buffers else None,
                            running_var=True if buffers else None)  # what modes reads
    return LayerState(stats_used(probe), updates_running_stats(probe), describe_state(probe),
                      training, track, momentum)


def _layer_state(module: _BatchNorm) -> LayerState:
    """The :class:`LayerState` of ``module`` as it is now."""
    return _state_of(module.training, module.track_running_stats, module.momentum,
                    module.running_mean is not None and module.running_var is not None)


class CallStart:
    """Where one BN call starts: the report's copies of the running buffers and counter,
    the buffer objects ``held`` to prove afterwards that nothing wrote them (or None), and
    the :class:`LayerState` fields (copied flat: they are read several times per call)."""

    __slots__ = ("running_mean", "running_var", "nbt", "held", "stats_used", "updates",
                 "mode", "training", "track", "momentum")

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    nbt: int | None  # num_batches_tracked
    held: tuple | None  # see bnviz.inspection.snapshot._held
    stats_used: str
    updates: bool
    mode: str
    training: bool
    track: bool
    momentum: float | None

    def __init__(self, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                 nbt: int | None, held: tuple | None, state: LayerState) -> None:
        self.running_mean = running_mean
        self.running_var = running_var
        self.nbt = nbt
        self.held = held
        (self.stats_used, self.updates, self.mode, self.training, self.track,
         self.momentum) = state

    def with_state(self, state: LayerState) -> CallStart:
        """The same buffers with other settings (the model's code changed the layer)."""
        return CallStart(self.running_mean, self.running_var, self.nbt, self.held, state)


class CallRecord:
    """What one BN call left behind during the forward.

    ``probe`` is the general check's :class:`~bnviz.manual_bn.Probe`, or None when the
    compiled probe wrote the check into the blocks (:mod:`bnviz.inspection.blocks`).
    ``input``/``output``/``output_reference`` are set for kept layers (``output`` becomes a
    clone if an in-place op overwrites it, ``output_reference`` stays what a hook keeping a
    reference sees); the consumer fields are filled by the watch
    (:mod:`bnviz.inspection.watch`) or from what an earlier forward learned.
    """

    __slots__ = ("probe", "input_shape", "layer", "input", "output", "output_reference",
                 "activation_output", "activation", "activation_inplace", "overwritten_by")

    probe: Probe | None
    input_shape: tuple[int, ...]
    layer: str  # the module's name (the call's key is name#k for a k-th call)
    input: torch.Tensor | None
    output: torch.Tensor | None
    output_reference: torch.Tensor | None
    activation_output: torch.Tensor | None
    activation: str | None  # the activation consuming the output, e.g. "relu"
    activation_inplace: bool | None
    overwritten_by: str | None  # the in-place op that later overwrote the output

    def __init__(self, probe: Probe | None, input_shape: tuple[int, ...], layer: str) -> None:
        self.probe = probe
        self.input_shape = input_shape
        self.layer = layer
        self.input = self.output = self.output_reference = self.activation_output = None
        self.activation = self.activation_inplace = self.overwritten_by = None
