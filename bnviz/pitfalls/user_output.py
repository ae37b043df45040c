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
from ..stimuli.files import read_regular_file, shown_name
from ..stimuli.finite import nonfinite_summary

__all__ = ["MAX_USER_BYTES", "MAX_USER_VALUES", "USER_EXTENSIONS", "align_user",
           "load_user_output", "user_array"]

#: Refuse user files above this many values (a 20 MB upload holds at most ~5M float32).
MAX_USER_VALUES = 20_000_000
#: Refuse user files above this size, checked before reading (20M values as text).
MAX_USER_BYTES = 200 * 2**20
USER_EXTENSIONS = (".npy", ".csv", ".txt")


def load_user_output(source: bytes | str | os.PathLike, filename: str | None = None
                     ) -> np.ndarray:
    """Read a user's BN output from ``.npy`` (np.save) or ``.csv``/``.txt`` (numbers
    separated by commas or whitespace, one optional header line) as float64.

    A path (the CLI, the Python API) must be a regular file of at most
    :data:`MAX_USER_BYTES`, checked before it is opened; a ``.npy`` header is checked before
    any array is made, so one that claims 10^12 values is refused, not allocated.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        filename = filename or os.path.basename(path)
        data = read_regular_file(
            path, MAX_USER_BYTES, f"your output file {shown_name(path, 320)!r}",
            error=BnvizError, missing_fix="pass the path of a .npy or .csv file.",
        )
    else:
        data = bytes(source)
        if len(data) > MAX_USER_BYTES:
            raise BnvizError(
                f"{shown_name(filename or 'upload')!r} is {len(data) / 2**20:.1f} MiB, more "
                f"than the {MAX_USER_BYTES // 2**20} MiB limit.",
                "save one image or one channel map instead of the whole batch.")
    name = shown_name(filename or "upload")
    ext = os.path.splitext(name)[1].lower()
    fix = ("save your output with np.save('out.npy', y) or np.savetxt('out.csv', y.reshape(-1, "
           "y.shape[-1]), delimiter=',').")
    if ext not in USER_EXTENSIONS:
        raise BnvizError(f"Unsupported file type {ext or '(none)'!r} for {name!r}.",
                         f"use .npy or .csv: {fix}")
    if ext == ".npy":
        arr = _load_npy(data, name, fix)
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


def _load_npy(data: bytes, name: str, fix: str) -> np.ndarray:
    """``np.load`` after checking the header: the value count and the bytes it promises."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(fp)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise BnvizError(f"{name!r} is not a readable .npy array ({exc}).", fix) from exc
    count = math.prod(shape)
    if count > MAX_USER_VALUES:
        raise BnvizError(
            f"{name!r} claims {count:,} values (shape {tuple(shape)}), more than the "
            f"{MAX_USER_VALUES:,} bnviz reads.",
            "save one image or one channel map instead of the whole batch.")
    if dtype.hasobject or dtype.kind not in "fiub":
        raise BnvizError(f"{name!r} does not hold numbers (dtype {dtype}).", fix)
    need, have = count * dtype.itemsize, len(data) - fp.tell()
    if have < need:
        raise BnvizError(
            f"{name!r} is truncated: its header promises {need:,} bytes of values, the file "
            f"has {have:,}.", fix)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BnvizError(f"{name!r} is not a readable .npy array ({exc}).", fix) from exc


def _is_word(cell: str) -> bool:
    """A non-empty cell that is not a number (what a header line has)."""
    cell = cell.strip()
    if not cell:
        return False
    try:
        float(cell)
    except ValueError:
        return True
    return False


def _parse_text_table(text: str, name: str, fix: str) -> np.ndarray:
    lines = [(number, ln) for number, ln in enumerate(text.splitlines(), start=1)
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise BnvizError(f"{name!r} is empty.", fix)
    delimiter = "," if "," in lines[0][1] or (len(lines) > 1 and "," in lines[1][1]) else None

    def cells(line: str) -> list[str]:
        return line.split(delimiter) if delimiter else line.split()

    # Only a line with words in it is a header: a first row of numbers is never dropped.
    rows = lines[1:] if any(_is_word(c) for c in cells(lines[0][1])) else lines
    if not rows:
        raise BnvizError(f"{name!r} has a header line but no numbers.", fix)
    try:
        return np.loadtxt(io.StringIO("\n".join(ln for _, ln in rows)), delimiter=delimiter,
                          ndmin=2, dtype=np.float64)
    except ValueError as exc:
        error = exc
    first, width = rows[0][0], len(cells(rows[0][1]))
    for number, line in rows[1:]:
        if len(cells(line)) != width:
            raise BnvizError(
                f"{name!r} is ragged: line {number} has {len(cells(line))} values, but the "
                f"table has {width} columns (line {first}, its first row of numbers).",
                "give every row the same number of values (one row per line of your "
                f"output's last dimension); {fix}")
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
    problem = nonfinite_summary(arr)
    if problem is not None:
        raise BnvizError(f"Your output is not all numbers: {problem}.",
                         "check your formula (a zero variance without eps gives inf/NaN).")
    return arr

