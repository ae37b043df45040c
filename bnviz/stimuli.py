"""Input images ("stimuli") to push through a network while its BatchNorm layers are inspected.

A BatchNorm layer in ``train()`` mode normalises every channel with the mean and variance
computed over the *whole batch* (and all spatial positions), not with its running
statistics. What the layer does to one image therefore depends on which other images share
its batch, so a stimulus here is a whole batch, and *how the batch is composed* is a
first-class choice:

``copies``
    ``batch_size`` identical copies of one image. The batch statistics equal that single
    image's own statistics, so the batch size alone changes nothing except the
    biased/unbiased variance factor. A batch of one uniform image has zero variance in
    every channel, which is exactly the degenerate case BatchNorm handles worst.
``different``
    ``batch_size`` different images of the same kind (see :func:`make_stimulus` for what
    "different" means per kind). The statistics now mix images, so each image's output in
    train mode depends on its batch-mates.
``jitter``
    the first image unchanged, the others slightly shifted, flipped and brightness-scaled
    copies of it: a batch that is *almost* ``copies``, to see how sensitive the
    normalisation is to small perturbations.

Whatever the composition, image 0 of the batch is always the requested stimulus itself, so
comparisons between compositions look at the same image. Every tensor returned here holds
*raw* pixel values in ``[0, 1]`` (float32, CPU, shape ``(batch, 3, size, size)``); the
model's ImageNet normalisation is applied elsewhere, because a "uniform image of ones" is
meant in pixel space.

Everything a user can get wrong (unknown kind, bad parameter, unreadable or oversized image
file) raises :class:`~bnviz.errors.StimulusError` naming the problem and the fix.
"""

from __future__ import annotations

import difflib
import functools
import io
import math
import numbers
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import StimulusError
from .validation import as_int, check_int

__all__ = [
    "COMPOSITIONS",
    "DEFAULT_PARAMS",
    "IMAGE_EXTENSIONS",
    "MAX_BATCH_SIZE",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_SIZE",
    "MIN_SIZE",
    "PHOTOS",
    "STIMULUS_KINDS",
    "describe_stimulus",
    "load_image",
    "make_stimulus",
    "make_stimulus_from_spec",
    "parse_stimulus_spec",
]

STIMULUS_KINDS = ("uniform", "noise", "grating", "checkerboard", "image", "file")
COMPOSITIONS = ("copies", "different", "jitter")

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

MIN_SIZE = 16
MAX_SIZE = 1024
MAX_BATCH_SIZE = 256
MAX_SEED = 2**63 - 1

# Caps on user-supplied image files. The byte cap is checked before anything is read; the
# pixel cap is checked from the header, before the pixels are decoded, so a tiny
# "decompression bomb" (a few KiB of PNG that decodes to gigapixels) is refused cheaply.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_READ_FIX = (
    "upload a PNG or JPEG image (Pillow also reads BMP, GIF, TIFF and WebP); "
    "if the file opens in other programs, re-save it as PNG."
)


# --------------------------------------------------------------------------------------
# Parameter schema
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    """One parameter of a stimulus kind: its type, default and allowed range."""

    type: str  # "float" | "int" | "choice" | "path"
    default: Any
    lo: float | None = None
    hi: float | None = None
    # Upper bound that depends on the image size (Nyquist limit, one-pixel squares).
    hi_for_size: Callable[[int], float] | None = None
    hi_why: str = ""
    choices: tuple[str, ...] = ()
    unit: str = ""


_SCHEMA: dict[str, dict[str, _Param]] = {
    "uniform": {"value": _Param("float", 1.0, 0.0, 1.0)},
    "noise": {
        "mean": _Param("float", 0.5, 0.0, 1.0),
        "std": _Param("float", 0.25, 0.0, 1.0),
    },
    "grating": {
        "orientation": _Param("float", 0.0, unit="degrees"),
        "frequency": _Param(
            "float", 8.0, 0.0, hi_for_size=lambda s: s / 2,
            hi_why="half the image size: finer gratings alias", unit="cycles per image",
        ),
        "phase": _Param("float", 0.0, unit="degrees"),
        "contrast": _Param("float", 1.0, 0.0, 1.0),
    },
    "checkerboard": {
        "squares": _Param(
            "int", 8, 1, hi_for_size=lambda s: s,
            hi_why="the image size: a square cannot be smaller than one pixel",
            unit="squares per side",
        ),
        "contrast": _Param("float", 1.0, 0.0, 1.0),
    },
    "image": {"name": _Param("choice", "chelsea", choices=PHOTOS)},
    "file": {"path": _Param("path", None)},
}

#: Default parameters of every kind (``file`` has no default path: it must be given).
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    kind: {name: p.default for name, p in schema.items() if p.default is not None}
    for kind, schema in _SCHEMA.items()
}

_EXAMPLES = {
    "uniform": "uniform:value=0.5",
    "noise": "noise:mean=0.5,std=0.25,seed=3",
    "grating": "grating:orientation=45,frequency=4",
    "checkerboard": "checkerboard:squares=4",
    "image": "image:chelsea",
    "file": "file:/path/to/picture.png",
}


def _suggest(word: str, options: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _fmt(x: float) -> str:
    return f"{x:g}"


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or kind.strip().lower() not in STIMULUS_KINDS:
        word = kind.strip().lower() if isinstance(kind, str) else ""
        raise StimulusError(
            f"Unknown stimulus kind {kind!r}.",
            f"{_suggest(word, STIMULUS_KINDS)}use one of: {', '.join(STIMULUS_KINDS)}.",
        )
    return kind.strip().lower()


def _check_composition(composition: object) -> str:
    if not isinstance(composition, str) or composition.strip().lower() not in COMPOSITIONS:
        word = composition.strip().lower() if isinstance(composition, str) else ""
        raise StimulusError(
            f"Unknown batch composition {composition!r}.",
            f"{_suggest(word, COMPOSITIONS)}use one of: {', '.join(COMPOSITIONS)}.",
        )
    return composition.strip().lower()


def _whole(value: object) -> int | None:
    """:func:`~bnviz.validation.as_int` for numbers only: the stimulus API has always refused
    text such as ``"4"`` (a spec's values are parsed into numbers before they are checked)."""
    return None if isinstance(value, str) else as_int(value)


def _check_int(what: str, value: object, lo: int, hi: int, fix: str) -> int:
    """:func:`~bnviz.validation.check_int` raising :class:`StimulusError`, numbers only."""
    if isinstance(value, str):
        raise StimulusError(f"{what} must be a whole number from {lo} to {hi}, got {value!r}.",
                            fix)
    return check_int(what, value, lo, hi, fix, error=StimulusError)


def _check_size(size: object) -> int:
    return _check_int(
        "Image size", size, MIN_SIZE, MAX_SIZE,
        f"use a size in pixels between {MIN_SIZE} and {MAX_SIZE} (224 for ImageNet models).",
    )


def _check_batch_size(batch_size: object) -> int:
    return _check_int(
        "Batch size", batch_size, 1, MAX_BATCH_SIZE,
        f"use a batch size between 1 and {MAX_BATCH_SIZE}.",
    )


def _check_seed(seed: object) -> int:
    return _check_int("Seed", seed, 0, MAX_SEED, "use a non-negative whole number, e.g. seed=0.")


def _check_params(kind: str, params: dict[str, Any], size: int | None) -> dict[str, Any]:
    """Validate ``params`` for ``kind`` and return them complete (defaults filled in).

    ``size=None`` skips the bounds that depend on the image size (used when parsing a spec
    before the size is known; :func:`make_stimulus` checks them again with the real size).
    """
    schema = _SCHEMA[kind]
    example = _EXAMPLES[kind]
    for name in params:
        if name not in schema:
            allowed = ", ".join(schema)
            raise StimulusError(
                f"Unknown parameter {name!r} for stimulus {kind!r}.",
                f"{_suggest(str(name), list(schema))}{kind!r} takes: {allowed} "
                f"(e.g. {example}).",
            )
    out: dict[str, Any] = {}
    for name, p in schema.items():
        value = params.get(name, p.default)
        what = f"Parameter {name!r} of stimulus {kind!r}"
        if p.type == "path":
            if value is None:
                raise StimulusError(
                    f"Stimulus {kind!r} needs a {name!r} parameter (the image file).",
                    f"give the path to an image file, e.g. {example}.",
                )
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str) or not value.strip():
                raise StimulusError(
                    f"{what} must be a file path, got {value!r}.",
                    f"give the path to an image file, e.g. {example}.",
                )
            out[name] = value
        elif p.type == "choice":
            word = value.strip().lower() if isinstance(value, str) else None
            if word not in p.choices:
                raise StimulusError(
                    f"{what} must be one of the bundled photos, got {value!r}.",
                    f"{_suggest(word or '', p.choices)}use one of: {', '.join(p.choices)}.",
                )
            out[name] = word
        else:
            hi = p.hi
            if p.hi_for_size is not None:
                hi = p.hi_for_size(size if size is not None else MAX_SIZE)
            bounds = (
                f"between {_fmt(p.lo)} and {_fmt(hi)}" if p.lo is not None and hi is not None
                else f"at least {_fmt(p.lo)}" if p.lo is not None
                else "any number"
            )
            fix = f"use a number {bounds} for {name!r}"
            if p.unit:
                fix += f" ({p.unit})"
            fix += f", e.g. {example}."
            if p.type == "int":
                number: float | None = _whole(value)
                kind_word = "a whole number"
            else:
                number = (
                    float(value)
                    if isinstance(value, numbers.Real) and not isinstance(value, bool)
                    else None
                )
                kind_word = "a number"
            if number is None or not math.isfinite(number):
                raise StimulusError(f"{what} must be {kind_word}, got {value!r}.", fix)
            if p.lo is not None and number < p.lo:
                raise StimulusError(f"{what} must be {bounds}, got {_fmt(number)}.", fix)
            if hi is not None and number > hi:
                why = f" ({p.hi_why})" if p.hi_why and size is not None else ""
                size_note = f" at image size {size}" if size is not None and p.hi_for_size else ""
                raise StimulusError(
                    f"{what} must be {bounds}{size_note}{why}, got {_fmt(number)}.", fix
                )
            out[name] = number
    return out


# --------------------------------------------------------------------------------------
# Rendering single images: each returns a float32 tensor (3, size, size) in [0, 1]
# --------------------------------------------------------------------------------------


def _gray(plane: np.ndarray) -> torch.Tensor:
    """A (size, size) float array -> (3, size, size) float32 tensor, same in all channels."""
    t = torch.from_numpy(np.clip(plane, 0.0, 1.0).astype(np.float32))
    return t.unsqueeze(0).repeat(3, 1, 1)


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


# --------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------


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


def _fmt_bytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def _too_big(label: str, nbytes: int | None) -> StimulusError:
    got = f" is {_fmt_bytes(nbytes)}," if nbytes is not None else " is"
    return StimulusError(
        f"Image {label}{got} larger than the {_fmt_bytes(MAX_IMAGE_BYTES)} limit.",
        "use a smaller image (a downscaled copy or a JPEG); the network only sees a "
        "few hundred pixels per side anyway.",
    )


def _read_source(source: Any, name: str | None) -> tuple[bytes, str]:
    """The raw bytes of ``source`` and a label for messages, never reading past the cap."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = f"'{name}'" if name else "(uploaded bytes)"
        if len(data) > MAX_IMAGE_BYTES:
            raise _too_big(label, len(data))
        return data, label
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        label = f"'{name or path}'"
        if not isinstance(path, str) or not path.strip():
            raise StimulusError("No image path was given.", "give the path to a PNG or JPEG file.")
        if not os.path.exists(path):
            raise StimulusError(
                f"Image file {label} does not exist.",
                "check the path (relative paths start from the current directory: "
                f"{os.getcwd()}).",
            )
        if os.path.isdir(path):
            raise StimulusError(
                f"Image path {label} is a directory, not a file.",
                "give the path of an image file inside it.",
            )
        try:
            nbytes = os.path.getsize(path)  # checked before a single byte is read
            if nbytes > MAX_IMAGE_BYTES:
                raise _too_big(label, nbytes)
            with open(path, "rb") as fh:
                data = fh.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            raise StimulusError(
                f"Could not read image {label}: {exc.strerror or exc}.",
                "check that the file is readable by this user.",
            ) from exc
        if len(data) > MAX_IMAGE_BYTES:  # the file grew after the size check
            raise _too_big(label, None)
        return data, label
    if hasattr(source, "read"):
        if name is None:
            attr = getattr(source, "name", None)
            name = os.path.basename(attr) if isinstance(attr, str) and attr else None
        label = f"'{name}'" if name else "(uploaded file)"
        try:
            data = source.read(MAX_IMAGE_BYTES + 1)
        except (OSError, ValueError) as exc:
            raise StimulusError(f"Could not read image {label}: {exc}.", _READ_FIX) from exc
        if not isinstance(data, (bytes, bytearray)):
            raise StimulusError(
                f"Image {label} was opened in text mode.", "open the file with mode 'rb'."
            )
        if len(data) > MAX_IMAGE_BYTES:
            raise _too_big(label, None)
        return bytes(data), label
    raise StimulusError(
        f"Cannot load an image from a {type(source).__name__}.",
        "pass a file path, the file's bytes, or a binary file object.",
    )


def _pixel_error(label: str, w: int, h: int) -> StimulusError:
    return StimulusError(
        f"Image {label} is {w}×{h} = {w * h:,} pixels, more than the limit of "
        f"{MAX_IMAGE_PIXELS:,} (a guard against decompression bombs).",
        "downscale it (e.g. to 1024 pixels on the long side) and load that instead.",
    )


def _decode(data: bytes, label: str) -> Any:
    """Open, bomb-check and fully decode ``data``; returns a loaded PIL image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise StimulusError(f"Could not read image {label}: the file is empty.", _READ_FIX)
    with warnings.catch_warnings():
        # Pillow only *warns* between its own limit and twice that; make it an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:  # from the header, before decoding any pixels
                raise _pixel_error(label, w, h)
            im.load()
        except StimulusError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise StimulusError(
                f"Image {label} is too large to decode safely ({exc}).",
                "downscale it (e.g. to 1024 pixels on the long side) and load that instead.",
            ) from exc
        except UnidentifiedImageError as exc:
            raise StimulusError(
                f"Could not read image {label}: not a recognised image format.", _READ_FIX
            ) from exc
        except Exception as exc:  # Pillow decoders raise many exception types on bad data
            reason = str(exc).strip() or type(exc).__name__
            raise StimulusError(f"Could not read image {label}: {reason}.", _READ_FIX) from exc
    try:
        # Phone photos are stored sideways with an EXIF "rotate me" tag; honour it.
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # a broken EXIF block should not reject the pixels
        pass
    return im


def load_image(source: str | os.PathLike | bytes | BinaryIO, size: int = 224, *,
               name: str | None = None) -> torch.Tensor:
    """Load an image file as a float32 tensor ``(3, size, size)`` in ``[0, 1]``.

    ``source`` is a path, the file's bytes (what the dashboard gets from an upload) or a
    binary file object. ``name`` is only used in error messages (e.g. the uploaded file's
    name). Any Pillow mode is converted to RGB (alpha composited over white, 16-bit
    grayscale rescaled); the short side is resized to ``size`` and the centre cropped, as
    in ImageNet preprocessing. Multi-frame files (GIF, TIFF) use their first frame.

    Untrusted input is refused with :class:`StimulusError` *before* it can cost much:
    files over :data:`MAX_IMAGE_BYTES` (checked before reading), images over
    :data:`MAX_IMAGE_PIXELS` (checked from the header, before decoding), and anything
    Pillow cannot decode (not an image, corrupt, truncated).
    """
    size = _check_size(size)
    data, label = _read_source(source, name)
    im = _decode(data, label)
    return _pil_to_tensor(_to_rgb_or_float(im), size)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Spec strings (the CLI's --stimulus)
# --------------------------------------------------------------------------------------

_SPEC_FIX = (
    "write KIND or KIND:NAME=VALUE,NAME=VALUE, e.g. uniform, uniform:value=0.5, "
    "image:chelsea, grating:orientation=45,frequency=4, noise:seed=3, "
    "checkerboard:squares=4, file:/path/x.png (or just a path to an image file)."
)


def _parse_value(text: str) -> int | float | str:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _looks_like_path(text: str) -> bool:
    return os.path.exists(os.path.expanduser(text)) or text.lower().endswith(IMAGE_EXTENSIONS)


def parse_stimulus_spec(spec: str) -> tuple[str, dict]:
    """Parse a ``--stimulus`` string into ``(kind, params)``.

    Forms: ``uniform``; ``uniform:value=0.5``; ``grating:orientation=45,frequency=4``;
    ``image:chelsea`` (a bare word after ``image:`` is the photo name); ``noise:seed=3``
    (``seed`` is accepted for every kind and goes to :func:`make_stimulus`'s ``seed``);
    ``file:/path/x.png`` (everything after ``file:`` is the path, commas included); or a
    bare path. A bare word that is a kind name is the kind, even if a file of that name
    exists; otherwise an existing path, or anything ending in an image extension
    (:data:`IMAGE_EXTENSIONS`), is a ``file`` stimulus, so that a mistyped file name gets
    a "does not exist" error rather than "unknown kind". Values are parsed as int, then
    float, then left as strings. Names and values are validated (except bounds that depend
    on the image size, which :func:`make_stimulus` checks).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise StimulusError(f"Empty or invalid stimulus spec {spec!r}.", _SPEC_FIX)
    text = spec.strip()
    head, sep, rest = text.partition(":")
    kind = head.strip().lower()
    if kind not in STIMULUS_KINDS:
        if _looks_like_path(text):
            return "file", {"path": text}
        raise StimulusError(
            f"Unknown stimulus kind {head.strip()!r} in spec {spec!r}.",
            f"{_suggest(kind, STIMULUS_KINDS)}use one of: {', '.join(STIMULUS_KINDS)} "
            "(e.g. grating:orientation=45,frequency=4), or a path to an image file.",
        )
    if kind == "file":
        path = rest.strip()
        if path.startswith("path="):
            path = path[len("path="):].strip()
        if not path:
            raise StimulusError(
                f"Stimulus spec {spec!r} names no file.", f"write e.g. {_EXAMPLES['file']}."
            )
        return "file", {"path": path}
    params: dict[str, Any] = {}
    if sep:
        if not rest.strip():
            raise StimulusError(
                f"Stimulus spec {spec!r} has nothing after ':'.",
                f"drop the ':' or add parameters, e.g. {_EXAMPLES[kind]}.",
            )
        items = [item.strip() for item in rest.split(",")]
        for i, item in enumerate(items):
            if not item:
                continue  # tolerate "a=1,,b=2" and a trailing comma
            key, eq, raw = item.partition("=")
            key, raw = key.strip().lower(), raw.strip()
            if not eq:
                if kind == "image" and i == 0:
                    key, raw = "name", item
                else:
                    raise StimulusError(
                        f"Cannot parse {item!r} in stimulus spec {spec!r}: expected NAME=VALUE.",
                        f"write e.g. {_EXAMPLES[kind]}.",
                    )
            if not key or not raw:
                raise StimulusError(
                    f"Cannot parse {item!r} in stimulus spec {spec!r}: "
                    "empty parameter name or value.",
                    f"write e.g. {_EXAMPLES[kind]}.",
                )
            if key in params:
                raise StimulusError(
                    f"Parameter {key!r} is given twice in stimulus spec {spec!r}.",
                    "give each parameter once.",
                )
            params[key] = _parse_value(raw)
    checked = {k: v for k, v in params.items() if k != "seed"}
    if "seed" in params:
        params["seed"] = _check_seed(params["seed"])
    _check_params(kind, checked, size=None)
    if kind == "image" and "name" in params:
        params["name"] = str(params["name"]).strip().lower()
    return kind, params


def make_stimulus_from_spec(spec: str, size: int = 224, batch_size: int = 1, *,
                            composition: str = "copies", seed: int = 0) -> torch.Tensor:
    """:func:`make_stimulus` for a spec string; a ``seed=`` in the spec overrides ``seed``."""
    kind, params = parse_stimulus_spec(spec)
    seed = params.pop("seed", seed)
    return make_stimulus(kind, size, batch_size, composition=composition, seed=seed, **params)


def describe_stimulus(kind: str, **params: Any) -> str:
    """A short human label, e.g. ``"grating (orientation 45°, 4 cycles/image, phase 0°,
    contrast 1)"``. Missing parameters show their defaults; ``seed`` is accepted (and shown
    for ``noise``, the only kind it changes in a single image)."""
    kind = _check_kind(kind)
    seed = _check_seed(params.pop("seed", 0))
    p = _check_params(kind, params, size=None)
    if kind == "uniform":
        return f"uniform (value {_fmt(p['value'])})"
    if kind == "noise":
        return (f"noise (gaussian, mean {_fmt(p['mean'])}, std {_fmt(p['std'])}, "
                f"seed {seed})")
    if kind == "grating":
        return (
            f"grating (orientation {_fmt(p['orientation'])}°, "
            f"{_fmt(p['frequency'])} cycles/image, phase {_fmt(p['phase'])}°, "
            f"contrast {_fmt(p['contrast'])})"
        )
    if kind == "checkerboard":
        s = p["squares"]
        return f"checkerboard ({s}×{s} squares, contrast {_fmt(p['contrast'])})"
    if kind == "image":
        return f"image ({p['name']})"
    return f"file ({os.path.basename(p['path']) or p['path']})"
