"""Pixels to tensors: PIL images and arrays become float32 ``(3, size, size)`` in [0, 1]."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _gray(plane: np.ndarray) -> torch.Tensor:
    """A (size, size) float array -> (3, size, size) float32 tensor, same in all channels."""
    t = torch.from_numpy(np.clip(plane, 0.0, 1.0).astype(np.float32))
    return t.unsqueeze(0).repeat(3, 1, 1)


def _to_rgb_or_float(im: Any) -> Any:
    """Any PIL mode -> ``RGB``, or ``F`` (one float channel in [0, 1]) for high bit depth.

    Transparent pixels are composited over white, as an image viewer would show them (a
    plain ``convert("RGB")`` would expose whatever colour hides under alpha 0, often black).
    16-bit and 32-bit grayscale are rescaled rather than clipped: Pillow's own conversion of
    ``I;16`` to ``RGB`` saturates everything above 255 to white.
    """
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 65535.0
        elif mode == "I":
            arr = arr / (255.0 if arr.size and arr.max() <= 255 else 65535.0)
        elif arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32), mode="F")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if mode == "RGB" else im.convert("RGB")


def _pil_to_tensor(im: Any, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` and centre-crop, then (3, size, size) in [0, 1].

    Done in one PIL call: the central square of the image is resampled to ``size``×``size``
    with a bilinear filter. PIL widens its filter when shrinking, so this is antialiased,
    the same as torchvision's ``Resize(antialias=True)`` used for ImageNet preprocessing.
    """
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    im = im.resize((size, size), Image.Resampling.BILINEAR,
                   box=(left, top, left + side, top + side))
    arr = np.asarray(im)
    if im.mode == "F":
        return _gray(arr.astype(np.float64))
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return t.to(torch.float32).div_(255.0)
