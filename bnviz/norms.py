"""Which modules bnviz inspects, and how their statistics are taken: the one place to
extend for a new normalisation type.

Today that is every ``torch.nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d, their
lazy variants, SyncBatchNorm and subclasses such as timm's ``BatchNormAct2d``. Their
statistics are per channel (dimension 1) over every other dimension: ``(N, C)``,
``(N, C, L)``, ``(N, C, H, W)`` and ``(N, C, D, H, W)`` alike.

To add a normalisation type: add its class to :data:`NORM_TYPES` and, where its statistics
are taken over other dimensions (GroupNorm, LayerNorm), say which in
:func:`statistics_dims`; the manual formula in :mod:`bnviz.manual_bn` and the mode logic in
:mod:`bnviz.modes` then need its rules (which statistics a forward uses, whether it keeps
running buffers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["NORM_TYPES", "is_norm_layer", "norm_layers", "statistics_dims", "values_per_channel"]

#: The module types bnviz inspects.
NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)


def is_norm_layer(module: object) -> bool:
    """Whether bnviz inspects ``module``."""
    return isinstance(module, NORM_TYPES)


def norm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every inspected layer of ``module`` with its qualified name, in definition order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, NORM_TYPES)]


def statistics_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions a layer's per-channel statistics are taken over: all but 1."""
    return (0, *range(2, x.dim()))


def values_per_channel(shape: Sequence[int]) -> int:
    """How many values one channel's batch statistics are taken over (N times the rest)."""
    return math.prod(shape) // shape[1]
