"""A user's own BatchNorm output, to be diagnosed by the explainer: read from an array, a
``.npy`` or a ``.csv`` file, checked, and placed within the layer's output (the whole batch,
one image or one channel map).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np

from ..errors import BnvizError

__all__ = ["MAX_USER_VALUES", "USER_EXTENSIONS", "align_user", "load_user_output", "user_array"]

#: Refuse user files above this many values (a 20 MB upload holds at most ~5M float32).
MAX_USER_VALUES = 20_000_000
USER_EXTENSIONS = (".npy", ".csv", ".txt")


def load_user_output(source: bytes | str | os.PathLike, filename: str | None = None
                     ) -> np.ndarray:
    """Read a user's BN output from ``.npy`` (np.save) or ``.csv``/``.txt`` (numbers
    separated by commas or whitespace, one optional header line) as float64."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        filename = filename or os.path.basename(path)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise BnvizError(f"Cannot read your output file {path!r}: {exc.strerror}.",
                             "pass the path of a .npy or .csv file.") from exc
    else:
        data = bytes(source)
    name = filename or "upload"
    ext = os.path.splitext(name)[1].lower()
    fix = ("save your output with np.save('out.npy', y) or np.savetxt('out.csv', y.reshape(-1, "
           "y.shape[-1]), delimiter=',').")
    if ext not in USER_EXTENSIONS:
        raise BnvizError(f"Unsupported file type {ext or '(none)'!r} for {name!r}.",
                         f"use .npy or .csv: {fix}")
    if ext == ".npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BnvizError(f"{name!r} is not a readable .npy array ({exc}).", fix) from exc
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BnvizError(f"{name!r} is not a text CSV file.", fix) from exc
        arr = _parse_text_table(text, name, fix)
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        raise BnvizError(f"{name!r} does not hold numbers (dtype {getattr(arr, 'dtype', '?')}).",
                         fix)
    if arr.size == 0:
        raise BnvizError(f"{name!r} is empty.", fix)
    if arr.size > MAX_USER_VALUES:
        raise BnvizError(f"{name!r} holds {arr.size} values, more than {MAX_USER_VALUES}.",
                         "save one image or one channel map instead of the whole batch.")
    return arr.astype(np.float64)


def _parse_text_table(text: str, name: str, fix: str) -> np.ndarray:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise BnvizError(f"{name!r} is empty.", fix)
    delimiter = "," if "," in lines[0] or (len(lines) > 1 and "," in lines[1]) else None
    for skip in (0, 1):
        try:
            return np.loadtxt(io.StringIO("\n".join(lines[skip:])), delimiter=delimiter,
                              ndmin=2, dtype=np.float64)
        except ValueError as exc:
            error = exc
    raise BnvizError(f"{name!r} is not a table of numbers ({error}).", fix)


def align_user(user: np.ndarray, shape: tuple[int, ...], image: int, channel: int,
               layer: str) -> tuple[tuple, str, tuple[int, ...]]:
    """Which part of the layer output the user's array covers: (index, description, shape)."""
    n = user.size
    full = math.prod(shape)
    if n == full:
        return (), "the whole batch", shape
    if n == math.prod(shape[1:]):
        return (image,), f"image {image}", shape[1:]
    if len(shape) >= 3 and n == math.prod(shape[2:]):
        return (image, channel), f"image {image}, channel {channel}", shape[2:]
    parts = f"the whole output {tuple(shape)}, one image {tuple(shape[1:])}"
    if len(shape) >= 3:
        parts += f" or one channel map {tuple(shape[2:])}"
    raise BnvizError(
        f"Your output has {n} values (shape {tuple(user.shape)}), which fits no part of "
        f"layer {layer!r}'s output {tuple(shape)}.",
        f"supply {parts}, computed from this run's layer input (same stimulus, batch size "
        "and image size).",
    )


def user_array(user_output: Any) -> np.ndarray:
    """An array, a tensor or a file path as a finite float64 array."""
    if isinstance(user_output, (str, os.PathLike)):
        arr = load_user_output(user_output)
    else:
        if hasattr(user_output, "detach"):
            user_output = user_output.detach().cpu().double().numpy()
        try:
            arr = np.asarray(user_output, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise BnvizError(f"Your output is not an array of numbers ({exc}).",
                             "pass a numpy array, a tensor, or a .npy/.csv path.") from exc
    if arr.size == 0:
        raise BnvizError("Your output is empty.", "pass the BN output you computed.")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise BnvizError(f"Your output contains {bad} NaN/inf values.",
                         "check your formula (a zero variance without eps gives inf/NaN).")
    return arr

