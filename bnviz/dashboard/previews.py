"""Pictures of the input batch: raw thumbnails for the sidebar and image 0 as the network
receives it (after its preprocessing), on a grid of real values."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from .condense import as_4d, frozen, grid_indices, subsample_map

#: Cap on the raw-stimulus preview thumbnails.
PREVIEW_IMAGES = 8
PREVIEW_GRID = 56


@dataclass(frozen=True)
class InputPreview:
    """Image 0 of what the network receives (after its preprocessing), on a grid of at most
    :data:`PREVIEW_GRID` x :data:`PREVIEW_GRID` real values: ``z`` is (3, rows, cols)."""

    z: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def input_preview(model_input: torch.Tensor) -> InputPreview:
    """The preview of an already preprocessed batch (``report.model_input``)."""
    mi = as_4d(model_input)
    rows, cols = grid_indices(mi.shape[2], PREVIEW_GRID), grid_indices(mi.shape[3], PREVIEW_GRID)
    return InputPreview(subsample_map(mi[0], rows, cols), frozen(rows), frozen(cols))


def preprocessed_preview(loaded, x: torch.Tensor) -> InputPreview:
    """The same preview *before* any forward: ``loaded.preprocess`` is exactly what
    :func:`bnviz.inspect` applies, so the app can draw it while the network still runs
    (the browser then loads its chart code during the forward, not after it)."""
    return input_preview(loaded.preprocess(x.detach()))


def preview_thumbnails(x: torch.Tensor, limit: int = PREVIEW_IMAGES,
                       max_side: int = 112) -> list[np.ndarray]:
    """Up to ``limit`` raw images of the batch as uint8 HxWx3 arrays, at most ``max_side``
    pixels (every s-th pixel) -- what the sidebar preview shows."""
    out = []
    for img in x[:limit]:
        rows = grid_indices(img.shape[1], max_side)
        cols = grid_indices(img.shape[2], max_side)
        small = img.index_select(1, torch.from_numpy(rows)).index_select(2, torch.from_numpy(cols))
        out.append((small.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return out


def to_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
