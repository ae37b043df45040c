"""scikit-image's bundled photographs, decoded once per size."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from .pixels import _pil_to_tensor, _to_rgb_or_float

# scikit-image's bundled photographs (all ship inside the wheel, so they load offline).
# The order matters: the "different" composition of ``image`` takes the named photo and
# then the ones after it, cycling. Colour photos come first so that small batches are
# natural RGB images; the grayscale ones (camera, moon, coins) are replicated to RGB.
# ``skimage.data.cat`` is left out because it is the same picture as ``chelsea``.
PHOTOS = (
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "moon",
    "coins",
)
#: The file of each photo inside scikit-image's data directory: what ``skimage.data.<name>()``
#: reads. Pillow reads it directly, because the skimage function first imports
#: ``skimage.io`` (and with it SciPy and the colour module): a noticeable part of the
#: dashboard's cold start, for the same pixels (``tests/test_stimuli.py`` compares every photo).
_PHOTO_FILES = {
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",  # the left view of skimage.data.stereo_motorcycle()
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    "camera": "camera.png",
    "moon": "moon.png",
    "coins": "coins.png",
}


def _load_photo_array(name: str) -> np.ndarray:
    import skimage.data  # imported lazily: scikit-image is slow to import

    path = os.path.join(skimage.data.data_dir, _PHOTO_FILES.get(name, ""))
    if name in _PHOTO_FILES and os.path.isfile(path):
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


@functools.lru_cache(maxsize=64)
def _photo(name: str, size: int) -> torch.Tensor:
    """A bundled photo at ``size`` (cached: decoding e.g. the 1411² retina JPEG is slow).

    Callers must not modify the result in place; :func:`make_stimulus` always copies.
    """
    from PIL import Image

    arr = _load_photo_array(name)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return _pil_to_tensor(_to_rgb_or_float(Image.fromarray(arr)), size)
