"""The measurement of one forward: what each BN call of the private copy runs before and
after the layer's own forward.

This is the per-layer hot path of an inspection (every BN call of every forward), where
the fixed cost of Python calls and small objects, not memory traffic, is what an inspection
pays on small inputs: records are built positionally and nothing is allocated that the
report does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import _F32, _FlatRun
from .records import CallRecord, CallStart, _layer_state
from .tensors import _cpu, _cpu_copy
from .watch import ConsumerWatch

if TYPE_CHECKING:
    from ..manual_bn import Probe, Scratch

# The module, looked up on every call, imported without importing the package first:
# ``from .. import x`` can deadlock concurrent first imports.
manual_bn = importlib.import_module("..manual_bn", __package__)


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


class _Session:
    """Per-layer steps for one forward of the private copy.

    Each BN layer's wrapped forward (installed once per pooled copy,
    :func:`bnviz.inspection.run._install_probe`) calls the copy's current session before
    and after the layer. Everything per call is keyed by the call's key: the layer name for
    its first call, ``name#k`` for the k-th (a module used twice in one forward).

    ``watch`` (a :class:`~bnviz.inspection.watch.ConsumerWatch`, None when neither
    ``detect`` nor ``keep`` asks for it) is the torch-function mode the caller enters
    around the forward.
    """

    def __init__(self, names: dict[int, str], keep: set[str], device: torch.device,
                 scratch: Scratch, snapshot: dict[str, CallStart], detect: bool,
                 running_scales: dict[str, torch.Tensor] | None = None,
                 flat: _FlatRun | None = None, sink: TensorSink | None = None):
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
        self.before: dict[str, CallStart] = {}
        self.records: dict[str, CallRecord] = {}
        self.calls: dict[str, int] = {}  # layer name -> calls so far
        self.current: str | None = None  # the layer name of the call running now
        self.order: list[str] = []  # call keys in call order
        # Kept tensors need copy-on-write, so keeping always watches.
        self.watch = (ConsumerWatch(self.records, keep, self.handed, sink)
                      if detect or keep else None)

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
                self.before[key] = CallStart(
                    _cpu_copy(module.running_mean), _cpu_copy(module.running_var),
                    None if module.num_batches_tracked is None
                    else int(module.num_batches_tracked),
                    None, _layer_state(module))
                return key
            # Buffers and state were taken for every layer just before the forward; the
            # state is re-read only if the model's own code changed the layer since.
            before = self.snapshot[name]
            if (module.training, module.track_running_stats, module.momentum) != (
                    before.training, before.track, before.momentum):
                before = before.with_state(_layer_state(module))
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
            rec = CallRecord(probe, tuple(x.shape), name)
            if key != name and name in self.handed:  # a later call of a layer handed over
                self.sink.changed(name)  # type: ignore[union-attr]
            watch = self.watch
            if name in self.keep:
                rec.input = x
                rec.output = rec.output_reference = output
                watch.watch(key, "input", x)  # type: ignore[union-attr]
            self.records[key] = rec
            self.order.append(key)
            if watch is not None:
                watch.follow(key, output)

    def activated(self, key: str, act: torch.nn.Module, x, out) -> None:
        """The activation a norm-act layer applies itself (:mod:`.fused`) made ``out`` from
        the normalised ``x``: name it (unless the watch named the function it called) and
        keep its output with the layer's other tensors."""
        with torch._C.DisableTorchFunction():
            rec = self.records.get(key)
            if rec is None:
                return
            if rec.activation is None:
                rec.activation = type(act).__name__.lower()
                rec.activation_inplace = out is x
            if (rec.layer in self.keep and isinstance(out, torch.Tensor)
                    and rec.activation_output is not out):
                rec.activation_output = out
                if self.watch is not None:  # a later in-place op must not change it
                    self.watch.watch(key, "activation_output", out)

    def _hand_off(self) -> None:
        """Give the sink every kept layer that finished before the current one started."""
        order = self.order
        while self._hand_cursor < len(order):
            key = order[self._hand_cursor]
            self._hand_cursor += 1
            rec = self.records[key]
            if key in self.handed or rec.layer not in self.keep:
                continue
            self.handed.add(key)
            self.sink.ready(key, KeptTensors(  # type: ignore[union-attr]
                _cpu(rec.input), _cpu(rec.output), _cpu(rec.activation_output),
                _cpu(rec.output_reference), rec.overwritten_by))

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
            momentum = self.before[name].momentum  # a first call: key == layer name
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

    def _probe(self, key: str, module: _BatchNorm, x, output) -> Probe:
        use_running = self.before[key].stats_used == "running"
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
