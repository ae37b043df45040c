"""An example network for ``bnviz serve``: video clips in, class scores out, with every kind
of BatchNorm layer the dashboard shows.

    bnviz serve --model examples/my_model.py:build --input 8x3x16x64x64

- ``BatchNorm3d`` on the clip's feature volumes (N, C, T, H, W): the dashboard shows the
  middle time slice of a channel;
- ``BatchNorm1d`` on a sequence (N, C, L), the features of each time step: a channel x
  position heatmap;
- ``BatchNorm1d`` on a table (N, C), one feature vector per clip: per-feature
  distributions.

``build_tabular`` (input ``64x16``) and ``build_two_inputs`` (two inputs: ``--input
8x3x16x64x64 --input 8x4``) show the other forms. Any file works the same way: a function
(or class) that returns an ``nn.Module``, named as ``path/to/file.py:function``.
"""

from __future__ import annotations

import torch
from torch import nn


class ClipNet(nn.Module):
    """(N, 3, T, H, W) clips -> (N, classes) scores."""

    def __init__(self, classes: int = 5, extra_features: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 8, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm3d(8),
            nn.ReLU(inplace=True),
            nn.Conv3d(8, 16, kernel_size=3, stride=(1, 2, 2), padding=1, bias=False),
            nn.BatchNorm3d(16),
            nn.ReLU(),
        )
        # over time: the per-frame features as a sequence (N, 16, T')
        self.temporal = nn.Sequential(
            nn.Conv1d(16, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Linear(32 + extra_features, 32, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, classes),
        )

    def forward(self, clip: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        volume = self.stem(clip)  # (N, 16, T', H', W')
        sequence = self.temporal(volume.mean(dim=(3, 4)))  # (N, 32, T')
        features = sequence.mean(dim=2)  # (N, 32)
        if extra is not None:
            features = torch.cat([features, extra], dim=1)
        return self.head(features)


class TabularNet(nn.Module):
    """(N, features) rows -> (N, classes) scores: BatchNorm1d on (N, C) only."""

    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm1d(features),
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build() -> nn.Module:
    """The clip network: ``--input 8x3x16x64x64``."""
    return ClipNet()


def build_tabular() -> nn.Module:
    """The table network: ``--input 64x16``."""
    return TabularNet()


def build_two_inputs() -> nn.Module:
    """A clip and 4 extra numbers per clip: ``--input 8x3x16x64x64 --input 8x4``."""
    return ClipNet(extra_features=4)
