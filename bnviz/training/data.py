"""The Training lab's data set: small synthetic images, generated, never downloaded.

Six classes of 1-channel images, drawn with the same conventions as
:func:`bnviz.make_stimulus` (orientation in degrees, 0 = stripes varying along x, frequency
in cycles per image, phase in degrees, contrast in [0, 1]) but vectorised in torch so a few
thousand images take milliseconds:

* ``grating 0°``, ``grating 45°``, ``grating 90°``, ``grating 135°``: sinusoidal gratings,
  orientation jittered by up to ±``orientation_jitter`` degrees;
* ``checkerboard``: 2 to 4 squares per side, shifted by a random offset;
* ``rings``: concentric sinusoidal rings around a randomly placed centre.

Every image gets its own random frequency, phase, contrast and mean brightness, plus
Gaussian pixel noise, so the task is not solvable from one pixel or from the image mean and
the network has to learn oriented filters. Per-image brightness and contrast also vary a
lot, which is exactly what BatchNorm's normalisation helps with.

Everything is drawn from one ``torch.Generator`` seeded with ``seed``: the same seed gives
bit-identical tensors on every call, in every thread, without touching torch's global RNG
(several dashboard sessions may train at the same time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLASS_NAMES = ("grating 0°", "grating 45°", "grating 90°", "grating 135°", "checkerboard",
               "rings")
NUM_CLASSES = len(CLASS_NAMES)


@dataclass(frozen=True)
class DataSpec:
    """How the data set is generated (part of the training configuration)."""

    size: int = 16
    n_train: int = 1536
    n_val: int = 384
    noise: float = 0.25
    orientation_jitter: float = 12.0


@dataclass
class Dataset:
    """A fixed train/validation split, float32 CPU tensors ``(N, 1, size, size)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    spec: DataSpec
    seed: int
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: torch.device) -> Dataset:
        return Dataset(self.x_train.to(device), self.y_train.to(device), self.x_val.to(device),
                       self.y_val.to(device), self.spec, self.seed, self.class_names)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def render(labels: torch.Tensor, size: int, g: torch.Generator, *, noise: float,
           orientation_jitter: float) -> torch.Tensor:
    """Images for ``labels`` (int64, (N,)), drawn from ``g``; float32 (N, 1, size, size).

    Random draws happen for every image and every parameter regardless of its class, in a
    fixed order, so the images of one class do not depend on how many of another exist.
    """
    n = labels.shape[0]
    coords = torch.arange(size, dtype=torch.float64)
    x = coords.view(1, 1, size)
    y = coords.view(1, size, 1)
    frequency = _uniform(g, n, 1.5, 4.0).view(n, 1, 1)
    phase = _uniform(g, n, 0.0, 2 * math.pi).view(n, 1, 1)
    contrast = _uniform(g, n, 0.2, 0.8).view(n, 1, 1)
    brightness = _uniform(g, n, 0.3, 0.7).view(n, 1, 1)
    jitter = _uniform(g, n, -orientation_jitter, orientation_jitter)
    squares = torch.randint(2, 5, (n,), generator=g).view(n, 1, 1).double()
    offset = _uniform(g, 2 * n, 0.0, size).view(n, 2, 1, 1)
    centre = _uniform(g, 2 * n, 0.25 * size, 0.75 * size).view(n, 2, 1, 1)
    pixel_noise = torch.randn((n, size, size), generator=g, dtype=torch.float64)

    # Gratings (classes 0-3): orientation 45° * label, plus jitter.
    theta = torch.deg2rad(45.0 * labels.clamp(max=3).double() + jitter).view(n, 1, 1)
    grating = torch.sin(2 * math.pi * frequency * (x * torch.cos(theta) + y * torch.sin(theta))
                        / size + phase)
    # Checkerboard (class 4): sign of the product of two square waves, randomly shifted.
    cx = torch.floor((x + offset[:, 0]) * squares / size)
    cy = torch.floor((y + offset[:, 1]) * squares / size)
    checker = 1.0 - 2.0 * torch.remainder(cx + cy, 2.0)
    # Rings (class 5): sinusoid of the distance to a random centre.
    radius = torch.sqrt((x - centre[:, 0]) ** 2 + (y - centre[:, 1]) ** 2)
    rings = torch.sin(2 * math.pi * frequency * radius / size + phase)

    lab = labels.view(n, 1, 1)
    pattern = torch.where(lab < 4, grating, torch.where(lab == 4, checker, rings))
    img = brightness + 0.5 * contrast * pattern + noise * pixel_noise
    return img.clamp(0.0, 1.0).float().unsqueeze(1)


def make_dataset(seed: int = 0, spec: DataSpec | None = None) -> Dataset:
    """The train/val split for ``seed``: balanced classes, shuffled, deterministic."""
    spec = spec or DataSpec()
    g = torch.Generator().manual_seed(int(seed))
    total = spec.n_train + spec.n_val
    labels = torch.arange(total) % NUM_CLASSES
    labels = labels[torch.randperm(total, generator=g)]
    images = render(labels, spec.size, g, noise=spec.noise,
                    orientation_jitter=spec.orientation_jitter)
    return Dataset(
        x_train=images[: spec.n_train].contiguous(),
        y_train=labels[: spec.n_train].contiguous(),
        x_val=images[spec.n_train:].contiguous(),
        y_val=labels[spec.n_train:].contiguous(),
        spec=spec,
        seed=int(seed),
    )


def batch_order(n_train: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """Indices of the training batch for every step, ``(steps, batch_size)``.

    One permutation per epoch from a seeded generator; every variant of a run uses this same
    order, so their curves differ only because of how their BatchNorm behaves.
    """
    g = torch.Generator().manual_seed(int(seed) + 1)
    per_epoch = n_train // batch_size
    epochs = -(-steps // per_epoch)
    rows = []
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=g)[: per_epoch * batch_size]
        rows.append(perm.view(per_epoch, batch_size))
    return torch.cat(rows)[:steps].contiguous()
