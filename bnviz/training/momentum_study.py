"""The momentum study: which running statistics each momentum would have given.

While the native network trains, every train-mode input of its BatchNorm layers is also fed
(without gradient) to extra ``nn.BatchNorm2d`` layers built with the momenta under study.
In train mode the running statistics never influence the forward, so the network trains
exactly as it would with any of these momenta; the extra layers therefore give, from
PyTorch itself and at almost no cost, the running statistics each momentum would have
produced, next to the batch statistics of every step, and the eval-mode accuracy each
would give (:meth:`MomentumStudy.load_into`). A long run keeps evenly spaced steps of these
traces (:mod:`bnviz.training.thinning`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..manual_bn import batch_stats
from .config import momentum_label
from .model import SmallCNN
from .results import LayerTrace
from .thinning import Thinning


def _values(t: torch.Tensor) -> tuple[float, ...]:
    """A recorded statistic as plain floats (exactly its float32 values).

    Why not a tensor: a small tensor kept from every step, allocated between the step's
    large temporaries, pins them in the C heap; a run then grew by megabytes per step.
    Python floats live in the interpreter's own arenas and pin nothing."""
    return tuple(t.detach().float().cpu().tolist())


class MomentumStudy:
    """Forward hooks on the native network's BN layers that feed each train-mode input to
    one extra ``nn.BatchNorm2d`` per studied momentum and record the statistics."""

    def __init__(self, model: SmallCNN, momenta: Sequence[float | None],
                 traces: dict[str, LayerTrace], device: torch.device,
                 curve_points: int = 500):
        self.labels = [momentum_label(m) for m in momenta]
        self.shadows: dict[str, dict[str, nn.BatchNorm2d]] = {}
        self.traces = traces
        self.handles = []
        # per layer: which of its steps are kept, and how many train-mode steps it has seen
        self.thinning = {name: Thinning(curve_points) for name, _ in model.bn_layers()}
        self.steps = dict.fromkeys(self.thinning, 0)
        for name, bn in model.bn_layers():
            self.shadows[name] = {
                momentum_label(m): nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=m,
                                                  affine=False).to(device).train()
                for m in momenta}
            trace = LayerTrace(name, bn.num_features)
            for label in self.labels:
                trace.running_mean[label] = []
                trace.running_var[label] = []
            traces[name] = trace
            self.handles.append(bn.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not module.training:
                return
            x = inputs[0].detach()
            stats = batch_stats(x)
            trace = self.traces[name]
            self.steps[name] += 1
            columns = [(trace.step, self.steps[name]),
                       (trace.batch_mean, _values(stats.mean)),
                       (trace.batch_var, _values(stats.var)),
                       (trace.batch_var_unbiased, _values(stats.var_unbiased))]
            with torch.no_grad():
                for label, shadow in self.shadows[name].items():
                    shadow(x)
                    columns.append((trace.running_mean[label], _values(shadow.running_mean)))
                    columns.append((trace.running_var[label], _values(shadow.running_var)))
            self.thinning[name].record(columns)
        return hook

    def load_into(self, model: SmallCNN, label: str) -> None:
        """Copy the running statistics of momentum ``label`` into ``model``'s BN layers."""
        with torch.no_grad():
            for name, bn in model.bn_layers():
                shadow = self.shadows[name][label]
                bn.running_mean.copy_(shadow.running_mean)
                bn.running_var.copy_(shadow.running_var)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
