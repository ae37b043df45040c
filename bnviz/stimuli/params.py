"""What a stimulus request may say: the kinds, compositions and size limits, and the schema
of each kind's parameters with the checks that turn a bad value into a fix-it message."""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import StimulusError
from ..validation import as_int, check_int
from .photos import PHOTOS

STIMULUS_KINDS = ("uniform", "noise", "grating", "checkerboard", "image", "file")
COMPOSITIONS = ("copies", "different", "jitter")

MIN_SIZE = 16
MAX_SIZE = 1024
MAX_BATCH_SIZE = 256
MAX_SEED = 2**63 - 1


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
                else ""
            )
            fix = (f"use a number {bounds} for {name!r}" if bounds
                   else f"use any finite number for {name!r}")
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
                # nan and inf too: the message names the range, as for any other bad value
                kind_word = "a finite number" if number is not None else kind_word
                in_range = f" {bounds}" if bounds else ""
                raise StimulusError(f"{what} must be {kind_word}{in_range}, got {value!r}.", fix)
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
