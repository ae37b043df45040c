"""User image files: read and decode with the size and decompression-bomb checks done before
the expensive step, so untrusted uploads are refused cheaply."""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import BnvizError, StimulusError
from .finite import nonfinite_summary
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


#: The longest file name a message quotes; the rest is cut (names come from uploads too).
MAX_NAME_SHOWN = 80
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def shown_name(name: str, limit: int = MAX_NAME_SHOWN) -> str:
    """A file name as a message may quote it: one line, no control characters, cut to
    ``limit`` characters."""
    text = " ".join(_CONTROL.sub(" ", str(name)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_regular_file(path: str, max_bytes: int, label: str, *,
                      error: type[BnvizError] = StimulusError,
                      too_big: Callable[[int | None], BnvizError] | None = None,
                      missing_fix: str = "check the path.") -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_bytes`` of them.

    Only a regular file is opened: a FIFO would block the reading thread forever, and a
    device or a directory is never an input. The type and the size come from ``stat`` before
    anything is opened; the open itself does not block (``O_NONBLOCK``) and is checked to
    be the same file, in case the path was swapped in between. ``label`` names the file in
    messages, e.g. ``"image file 'x.png'"`` (the caller decides whether that may be a path).
    """
    subject = label[:1].upper() + label[1:]
    unreadable = "check that the file is readable by this user."

    def big(nbytes: int | None) -> BnvizError:
        if too_big is not None:
            return too_big(nbytes)
        got = f" is {_fmt_bytes(nbytes)}," if nbytes is not None else " is"
        return error(f"{subject}{got} larger than the {_fmt_bytes(max_bytes)} limit.",
                     "use a smaller file.")

    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise error(f"{subject} does not exist.", missing_fix) from None
    except OSError as exc:
        raise error(f"Could not read {label}: {exc.strerror or exc}.", unreadable) from None
    if stat.S_ISDIR(before.st_mode):
        raise error(f"{subject} is a directory, not a file.",
                    "give the path of a file inside it.")
    if not stat.S_ISREG(before.st_mode):
        raise error(f"{subject} is not a regular file (it is a FIFO, a device or a socket, "
                    "which bnviz never reads).", "give the path of an ordinary file.")
    if before.st_size > max_bytes:  # checked before a single byte is read
        raise big(before.st_size)
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_NOCTTY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"Could not read {label}: {exc.strerror or exc}.", unreadable) from None
    try:
        now = os.fstat(fd)
        if (not stat.S_ISREG(now.st_mode)
                or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino)):
            raise error(f"{subject} changed while it was being opened.", "try again.")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise error(f"Could not read {label}: {exc.strerror or exc}.", unreadable) from None
    finally:
        os.close(fd)
    if total > max_bytes:  # the file grew after the size check
        raise big(None)
    return b"".join(chunks)


def _read_source(source: Any, name: str | None) -> tuple[bytes, str]:
    """The raw bytes of ``source`` and a label for messages, never reading past the cap."""
    if name is not None:
        name = shown_name(name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = f"'{name}'" if name else "(uploaded bytes)"
        if len(data) > MAX_IMAGE_BYTES:
            raise _too_big(label, len(data))
        return data, label
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        if not isinstance(path, str) or not path.strip():
            raise StimulusError("No image path was given.", "give the path to a PNG or JPEG file.")
        # A path comes from the CLI or the Python API (never from a browser), so the
        # messages may name it and the working directory.
        label = f"'{name or shown_name(path, 4 * MAX_NAME_SHOWN)}'"
        data = read_regular_file(
            path, MAX_IMAGE_BYTES, f"image file {label}",
            too_big=lambda nbytes: _too_big(label, nbytes),
            missing_fix="check the path (relative paths start from the current directory: "
                        f"{os.getcwd()}).",
        )
        return data, label
    if hasattr(source, "read"):
        if name is None:
            attr = getattr(source, "name", None)
            name = shown_name(os.path.basename(attr)) if isinstance(attr, str) and attr else None
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


def _check_finite(im: Any, label: str) -> None:
    """Refuse a float image holding NaN or infinity (only mode ``F`` can): one such pixel
    makes every statistic and prediction downstream NaN."""
    if im.mode != "F":
        return
    problem = nonfinite_summary(np.asarray(im), layout="flat")
    if problem is not None:
        raise StimulusError(
            f"Image {label} is a float image whose pixels are not all numbers: {problem} "
            "(row, column).",
            "replace the NaN/Inf pixels before saving (e.g. numpy.nan_to_num) or save the "
            "image as an 8- or 16-bit PNG; bnviz refuses them because a single NaN pixel "
            "makes every BatchNorm statistic and prediction NaN.",
        )


def load_image(source: str | os.PathLike | bytes | BinaryIO, size: int = 224, *,
               name: str | None = None) -> torch.Tensor:
    """Load an image file as a float32 tensor ``(3, size, size)`` in ``[0, 1]``.

    ``source`` is a path, the file's bytes (what the dashboard gets from an upload) or a
    binary file object. ``name`` is only used in error messages (e.g. the uploaded file's
    name). Any Pillow mode is converted to RGB (alpha composited over white, 16-bit
    grayscale rescaled); the short side is resized to ``size`` and the centre cropped, as
    in ImageNet preprocessing. Multi-frame files (GIF, TIFF) use their first frame.

    Untrusted input is refused with :class:`StimulusError` *before* it can cost much:
    anything but a regular file (a FIFO, a device: checked before opening, and the open
    never blocks), files over :data:`MAX_IMAGE_BYTES` (checked before reading), images over
    :data:`MAX_IMAGE_PIXELS` (checked from the header, before decoding), anything Pillow
    cannot decode (not an image, corrupt, truncated), and float images holding NaN or
    infinite pixels (named: how many, and where).
    """
    size = _check_size(size)
    data, label = _read_source(source, name)
    im = _decode(data, label)
    _check_finite(im, label)
    return _pil_to_tensor(_to_rgb_or_float(im), size)

