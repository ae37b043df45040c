"""Batches: render the requested image and compose the batch around it (copies, different
images of the same kind, or jittered copies); :func:`make_stimulus` is the entry point."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .files import load_image
from .generators import _checkerboard, _grating, _noise, _uniform
from .params import (
    _check_batch_size,
    _check_composition,
    _check_kind,
    _check_params,
    _check_seed,
    _check_size,
)
from .photos import PHOTOS, _photo


def _render(kind: str, p: dict[str, Any], size: int, seed: int) -> torch.Tensor:
    if kind == "uniform":
        return _uniform(size, p["value"])
    if kind == "noise":
        return _noise(size, p["mean"], p["std"], seed)
    if kind == "grating":
        return _grating(size, p["orientation"], p["frequency"], p["phase"], p["contrast"])
    if kind == "checkerboard":
        return _checkerboard(size, p["squares"], p["contrast"])
    if kind == "image":
        return _photo(p["name"], size).clone()
    if kind == "file":
        return load_image(p["path"], size)
    raise AssertionError(kind)  # pragma: no cover - kinds are validated before


def _jitter(base: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """Image 0 = ``base``; the others shifted, maybe mirrored and brightness-scaled.

    Shifts are circular (``torch.roll``) by up to 10% of the size in x and y, so no
    artificial border is introduced and the pixel histogram is unchanged; each image is
    mirrored left-right with probability 1/2 and its brightness multiplied by a factor in
    [0.9, 1.1], then clipped to [0, 1]. The random draws come from their own stream
    (independent of the noise stimulus's) seeded by ``seed``.
    """
    size = base.shape[-1]
    max_shift = max(1, round(0.1 * size))
    rng = np.random.default_rng([seed, 1])
    images = [base]
    for _ in range(1, batch_size):
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        flip = bool(rng.random() < 0.5)
        gain = float(rng.uniform(0.9, 1.1))
        img = torch.roll(base, shifts=(dy, dx), dims=(1, 2))
        if flip:
            img = img.flip(-1)
        images.append((img * gain).clamp_(0.0, 1.0))
    return torch.stack(images)


def _different(kind: str, p: dict[str, Any], size: int, batch_size: int,
               seed: int) -> torch.Tensor:
    """``batch_size`` different images of ``kind``; image 0 is the requested one."""
    n = batch_size
    if kind == "uniform":
        # Evenly spaced by 1/n, going down from the requested value and wrapping around
        # through 1, so all n values are distinct even for value 0 or 1.
        values = []
        for i in range(n):
            v = p["value"] - i / n
            values.append(v + 1.0 if v < 0 else v)
        images = [_uniform(size, v) for v in values]
    elif kind == "noise":
        images = [_noise(size, p["mean"], p["std"], seed + i) for i in range(n)]
    elif kind == "grating":
        images = [
            _grating(size, p["orientation"] + 180.0 * i / n, p["frequency"], p["phase"],
                     p["contrast"])
            for i in range(n)
        ]
    elif kind == "checkerboard":
        # Doubling square counts s, 2s, 4s, ... up to one-pixel squares, then the same
        # boards with black and white swapped, then around again.
        counts = [p["squares"]]
        while counts[-1] * 2 <= size:
            counts.append(counts[-1] * 2)
        boards = [(c, False) for c in counts] + [(c, True) for c in counts]
        images = [
            _checkerboard(size, c, p["contrast"], invert)
            for c, invert in (boards[i % len(boards)] for i in range(n))
        ]
    elif kind == "image":
        start = PHOTOS.index(p["name"])
        images = [_photo(PHOTOS[(start + i) % len(PHOTOS)], size) for i in range(n)]
    else:  # "file": one file is one image, so "different" falls back to jitter
        return _jitter(_render(kind, p, size, seed), n, seed)
    return torch.stack(images)


def batch_of_image(image: torch.Tensor, batch_size: int = 1, *, composition: str = "copies",
                   seed: int = 0) -> torch.Tensor:
    """The batch :func:`make_stimulus` composes around one loaded image ``(3, size, size)``,
    exactly as for a ``file`` stimulus: ``copies`` repeats it, ``jitter`` and ``different``
    (one file is one image) jitter it. The dashboard's uploads use it with an image decoded
    from bytes, so that no message can name the file's place on the server."""
    composition = _check_composition(composition)
    batch_size = _check_batch_size(batch_size)
    seed = _check_seed(seed)
    if composition == "copies":
        return image.unsqueeze(0).repeat(batch_size, 1, 1, 1).contiguous()
    return _jitter(image, batch_size, seed).contiguous()


def make_stimulus(kind: str, size: int = 224, batch_size: int = 1, *,
                  composition: str = "copies", seed: int = 0, **params: Any) -> torch.Tensor:
    """A batch of raw images in ``[0, 1]``: float32 ``(batch_size, 3, size, size)``, on CPU.

    Kinds and parameters (all optional except ``file``'s ``path``):

    * ``uniform``: ``value`` in [0, 1] (default 1.0: "an image of all ones");
    * ``noise``: Gaussian, ``mean`` (0.5) and ``std`` (0.25), clipped to [0, 1],
      independent per pixel and channel, reproducible for a given ``seed``;
    * ``grating``: gray sinusoid ``0.5 + 0.5·contrast·sin(2π·f·(x cosθ + y sinθ)/size + φ)``
      with ``orientation`` θ in degrees (0: stripes vary along x only; 90: along y only),
      ``frequency`` f in cycles per image (8, at most size/2), ``phase`` φ in degrees (0),
      ``contrast`` in [0, 1] (1);
    * ``checkerboard``: ``squares`` per side (8, at most ``size``), ``contrast`` (1);
    * ``image``: a bundled scikit-image photo, ``name`` in :data:`PHOTOS` ("chelsea");
    * ``file``: ``path`` to an image file, see :func:`load_image`.

    ``composition`` decides what shares the batch, which matters because BatchNorm in
    train mode normalises with the mean/variance of the whole batch:

    * ``copies``: the same image ``batch_size`` times;
    * ``different``: ``uniform`` values spaced 1/``batch_size`` apart, going down from
      ``value`` and wrapping (1.0 with 4 images: 1, 0.75, 0.5, 0.25); ``noise`` seeds
      ``seed, seed+1, ...``; ``grating`` orientations spread evenly over 180° from
      ``orientation``; ``checkerboard`` square counts doubling from ``squares`` up to
      one-pixel squares, then the same inverted (repeating after that); ``image`` the
      named photo then the following :data:`PHOTOS`, cycling (so photos repeat beyond
      ``len(PHOTOS)``); ``file`` has only one image, so it falls back to ``jitter``;
    * ``jitter``: see :func:`_jitter`, reproducible for a given ``seed``.

    Image 0 is the requested stimulus in every composition.
    """
    kind = _check_kind(kind)
    composition = _check_composition(composition)
    size = _check_size(size)
    batch_size = _check_batch_size(batch_size)
    seed = _check_seed(seed)
    p = _check_params(kind, params, size)
    if composition == "different" and batch_size > 1:
        batch = _different(kind, p, size, batch_size, seed)
    else:
        base = _render(kind, p, size, seed)
        if composition == "jitter" or (composition == "different" and kind == "file"):
            batch = _jitter(base, batch_size, seed)
        else:
            batch = base.unsqueeze(0).repeat(batch_size, 1, 1, 1)
    return batch.contiguous()
