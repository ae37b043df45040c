"""The small CNN of the Training lab and its four kinds of BatchNorm.

``native``
    ``nn.BatchNorm2d``, the reference.
``manual``
    :class:`ManualBatchNorm2d`: the core formula of :mod:`bnviz.manual_bn` (batch mean and
    *biased* variance over (N, H, W) for the normalisation, *unbiased* variance for the
    running update, ``momentum=None`` as a cumulative average). Same forward and same
    gradients as native, up to float rounding, so it learns the same.
``detached``
    The same module with the batch mean and variance ``.detach()``-ed: the forward output is
    bit-for-bit the manual one, but no gradient flows through the statistics. This is the
    "mathematically identical re-implementation that does not learn" of section 2 of
    ``docs/stories.md``.
``frozen``
    ``nn.BatchNorm2d`` kept in ``eval()`` the whole time (``bn.eval()`` after every
    ``model.train()``): it normalises with its running statistics, which therefore never
    change, while weight and bias still train. From scratch those statistics are the initial
    mean 0 / variance 1, so the layer is a plain per-channel affine map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..manual_bn import (
    batch_stats,
    manual_batch_norm,
    manual_running_update,
    running_update_factor,
)
from .config import LAYERS, VARIANTS, TrainConfigError
from .data import CLASS_NAMES


class ManualBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d written with :mod:`bnviz.manual_bn` (autograd differentiates the formula).

    Train mode: per-channel batch mean and biased variance over (N, H, W) normalise ``x``;
    then, without gradient, ``num_batches_tracked += 1`` and the running statistics move by
    ``factor = momentum`` (or ``1 / num_batches_tracked`` for ``momentum=None``) towards the
    batch mean and the *unbiased* batch variance. Eval mode: the running statistics.

    ``detach_stats=True`` detaches the batch mean and variance before normalising: the
    output is unchanged, but the gradient no longer contains the terms that flow through the
    statistics (the ones that remove the gradient's per-channel mean and its component along
    the normalised activation).
    """

    def __init__(self, num_features: int, *, detach_stats: bool = False, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        self.detach_stats = detach_stats

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_stats={self.detach_stats}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or self.running_mean is None
        if not use_batch:
            return manual_batch_norm(x, self.running_mean, self.running_var, self.weight,
                                     self.bias, self.eps)
        stats = batch_stats(x)
        mean, var = stats.mean, stats.var
        if self.detach_stats:
            mean, var = mean.detach(), var.detach()
        if self.training and self.track_running_stats and self.running_mean is not None:
            if stats.var_unbiased is None:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {tuple(x.shape)}")
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = running_update_factor(self.momentum, int(self.num_batches_tracked))
                new_mean, new_var = manual_running_update(
                    self.running_mean, self.running_var, stats.mean.detach(),
                    stats.var_unbiased.detach(), factor)
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
        return manual_batch_norm(x, mean, var, self.weight, self.bias, self.eps)


def make_bn(variant: str, num_features: int, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    if variant in ("native", "frozen"):
        return nn.BatchNorm2d(num_features, momentum=momentum)
    if variant in ("manual", "detached"):
        return ManualBatchNorm2d(num_features, momentum=momentum,
                                 detach_stats=variant == "detached")
    raise TrainConfigError(f"Unknown BatchNorm variant {variant!r}.",
                           f"choose from: {', '.join(VARIANTS)}.")


class SmallCNN(nn.Module):
    """conv-BN-ReLU-maxpool, conv-BN-ReLU-maxpool, conv-BN-ReLU, global average pool, linear.

    Convolutions have no bias (BatchNorm's own bias replaces it, as in most CNNs). The
    BatchNorm layers are named ``bn1``, ``bn2``, ``bn3``.
    """

    def __init__(self, variant: str = "native", widths: Sequence[int] = (8, 16, 32),
                 num_classes: int = len(CLASS_NAMES), in_channels: int = 1):
        super().__init__()
        c1, c2, c3 = widths
        self.variant = variant
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = make_bn(variant, c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = make_bn(variant, c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = make_bn(variant, c3)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))

    def bn_layers(self) -> list[tuple[str, nn.BatchNorm2d]]:
        return [(name, getattr(self, name)) for name in LAYERS]

    def set_training(self, training: bool) -> SmallCNN:
        """``train(training)``, then ``bn.eval()`` on every BN layer for the frozen variant."""
        self.train(training)
        if self.variant == "frozen":
            for _, bn in self.bn_layers():
                bn.eval()
        return self


def initial_state(seed: int, widths: Sequence[int] = (8, 16, 32),
                  num_classes: int = len(CLASS_NAMES)) -> dict[str, torch.Tensor]:
    """PyTorch's default initialisation, drawn from a seeded generator (not the global RNG).

    Every variant starts from this same state dict, so their curves differ only because of
    their BatchNorm. Conv and linear weights: ``kaiming_uniform_(a=sqrt(5))`` as in
    ``reset_parameters``; linear bias uniform in ±1/sqrt(fan_in); BN weight 1, bias 0,
    running mean 0, running var 1. A private generator rather than
    :func:`bnviz.validation.seeded`: jobs train in background threads, and the global RNG
    that ``seeded`` forks is shared by every thread of the server.
    """
    g = torch.Generator().manual_seed(int(seed) + 2)
    model = SmallCNN("native", widths, num_classes)
    with torch.no_grad():
        for module in (model.conv1, model.conv2, model.conv3, model.fc):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=g)
        bound = 1.0 / math.sqrt(model.fc.in_features)
        model.fc.bias.uniform_(-bound, bound, generator=g)
    return {k: v.clone() for k, v in model.state_dict().items()}


def build_model(variant: str, state: dict[str, torch.Tensor], widths: Sequence[int] = (8, 16, 32),
                num_classes: int = len(CLASS_NAMES), device: torch.device | str = "cpu",
                ) -> SmallCNN:
    """A :class:`SmallCNN` with ``variant`` BatchNorm, loaded with ``state``, on ``device``."""
    model = SmallCNN(variant, widths, num_classes)
    model.load_state_dict(state)
    return model.to(device)
