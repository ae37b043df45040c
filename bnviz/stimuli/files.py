"""User image files: read and decode with the size and decompression-bomb checks done before
the expensive step, so untrusted uploads are refused cheaply."""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, BinaryIO

import torch

from ..errors import StimulusError
from .params import _check_size
from .pixels import _pil_to_tensor, _to_rgb_or_float

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

