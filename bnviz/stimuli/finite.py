"""Naming non-finite values: how many NaN and infinite values an input holds, and where.

A single NaN pixel spreads through every convolution to every later value, so each batch
statistic, every BatchNorm output and the predictions all become NaN: nothing shown would
mean anything. Inputs are therefore refused with a sentence from :func:`nonfinite_summary`
rather than run and flagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["nonfinite_summary"]

#: How many image/channel indices a summary lists before "…".
_LISTED = 8


def _indices(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:_LISTED])
    return shown + (", …" if len(values) > _LISTED else "")


def nonfinite_summary(values: Any, *, layout: str = "auto") -> str | None:
    """``None`` when every value is finite, else one phrase naming the damage, e.g.
    ``"12 of 3,072 values are not finite (12 NaN, 0 infinite), in image 0, channels 0, 1, 2"``.

    ``values`` is a tensor or an array. ``layout`` says what the leading dimensions are:
    ``"batch"`` (images, channels, ...), ``"image"`` (channels, ...), ``"flat"`` (just the
    first bad position), or ``"auto"``: a 4-D array is a batch, a 3-D one an image.
    """
    if hasattr(values, "detach"):  # a tensor: count on its own device, move only the flags
        import torch

        t = values.detach()
        if not (t.is_floating_point() or t.is_complex()):
            return None
        finite = torch.isfinite(t)
        if bool(finite.all()):
            return None
        nan = int(torch.isnan(t).sum())
        bad = (~finite).cpu().numpy()
    else:
        arr = np.asarray(values)
        if arr.dtype.kind not in "fc":
            return None
        finite = np.isfinite(arr)
        if finite.all():
            return None
        nan = int(np.isnan(arr).sum())
        bad = ~finite
    count = int(bad.sum())
    verb = "is" if count == 1 else "are"
    text = (f"{count:,} of {bad.size:,} values {verb} not finite ({nan:,} NaN, "
            f"{count - nan:,} infinite)")
    if layout == "auto":
        layout = {4: "batch", 3: "image"}.get(bad.ndim, "flat")
    if layout == "batch" and bad.ndim >= 2:
        per_image = bad.reshape(bad.shape[0], bad.shape[1], -1).any(axis=2)
        images = np.flatnonzero(per_image.any(axis=1))
        channels = np.flatnonzero(per_image.any(axis=0))
        word = "image" if len(images) == 1 else "images"
        cword = "channel" if len(channels) == 1 else "channels"
        return f"{text}, in {word} {_indices(images)}, {cword} {_indices(channels)}"
    if layout == "image" and bad.ndim >= 1:
        channels = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        cword = "channel" if len(channels) == 1 else "channels"
        return f"{text}, in {cword} {_indices(channels)}"
    first = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()
    return f"{text}, the first at index {first}"
