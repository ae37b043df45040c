"""Synthetic images: uniform, noise, grating and checkerboard, each a float32
``(3, size, size)`` tensor in [0, 1]."""

from __future__ import annotations

import math

import numpy as np
import torch

from .pixels import _gray


def _uniform(size: int, value: float) -> torch.Tensor:
    return torch.full((3, size, size), float(value), dtype=torch.float32)


def _noise(size: int, mean: float, std: float, seed: int) -> torch.Tensor:
    # Independent per pixel *and* per channel (colour noise), so the three input channels
    # have separate statistics. NumPy's PCG64 stream keeps a seed reproducible.
    rng = np.random.default_rng(seed)
    arr = mean + std * rng.standard_normal((3, size, size))
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))


def _unit_trig(degrees: float) -> tuple[float, float]:
    """cos and sin of an angle in degrees, exact (0 / ±1) at multiples of 90°.

    ``math.cos(math.pi / 2)`` is 6e-17, not 0; snapping keeps a 90° grating exactly
    constant along x instead of wobbling in the last bit.
    """
    rad = math.radians(degrees)
    c, s = math.cos(rad), math.sin(rad)
    return (0.0 if abs(c) < 1e-12 else c), (0.0 if abs(s) < 1e-12 else s)


def _grating(size: int, orientation: float, frequency: float, phase: float,
             contrast: float) -> torch.Tensor:
    # x is the column index, y the row index (downwards), so 0° varies along x only (vertical
    # stripes), 90° along y only (horizontal stripes); positive angles turn clockwise on screen.
    c, s = _unit_trig(orientation)
    coords = np.arange(size, dtype=np.float64)
    x = coords[None, :]
    y = coords[:, None]
    arg = 2.0 * math.pi * frequency * (x * c + y * s) / size + math.radians(phase)
    return _gray(0.5 + 0.5 * contrast * np.sin(arg))


def _checkerboard(size: int, squares: int, contrast: float, invert: bool = False) -> torch.Tensor:
    # Square index of each pixel via integer arithmetic, so squares tile the image exactly
    # even when ``size`` is not a multiple of ``squares``. The top-left square is bright.
    idx = (np.arange(size) * squares) // size
    parity = (idx[:, None] + idx[None, :]) % 2
    sign = np.where(parity == 0, 1.0, -1.0) * (-1.0 if invert else 1.0)
    return _gray(0.5 + 0.5 * contrast * sign)
