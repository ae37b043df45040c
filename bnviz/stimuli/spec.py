"""Spec strings (the CLI's ``--stimulus``, the dashboard's URLs): parsing them, building the
stimulus they name, and a short human label for a stimulus."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import StimulusError
from .batch import make_stimulus
from .files import IMAGE_EXTENSIONS
from .params import (
    _EXAMPLES,
    STIMULUS_KINDS,
    _check_kind,
    _check_params,
    _check_seed,
    _fmt,
    _suggest,
)

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


def _names_a_file(text: str) -> bool:
    """Whether ``text`` reads as a file name or path, judged from the text alone."""
    return (any(c in text for c in "/\\") or text.startswith(("~", "."))
            or text.lower().endswith(IMAGE_EXTENSIONS))


#: What a link or a text box in the browser gets for anything that names a file: one fixed
#: message, so it cannot tell which paths exist on the server.
NO_FILES = StimulusError(
    "Files cannot be named here: a link or a text box only takes generated stimuli and the "
    "bundled photos.",
    "upload the image instead, or write e.g. image:chelsea, uniform:value=0.5 or "
    "grating:orientation=45,frequency=4.",
)


def parse_stimulus_spec(spec: str, *, files: bool = True) -> tuple[str, dict]:
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

    ``files=False`` is for text from a browser (a link, a text box): it never looks at the
    file system, and a ``file`` spec or anything that reads as a path gets :data:`NO_FILES`.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise StimulusError(f"Empty or invalid stimulus spec {spec!r}.", _SPEC_FIX)
    text = spec.strip()
    head, sep, rest = text.partition(":")
    kind = head.strip().lower()
    if kind not in STIMULUS_KINDS:
        if not files:
            if _names_a_file(text):
                raise NO_FILES
        elif _looks_like_path(text):
            return "file", {"path": text}
        raise StimulusError(
            f"Unknown stimulus kind {head.strip()!r} in spec {spec!r}.",
            f"{_suggest(kind, STIMULUS_KINDS)}use one of: {', '.join(STIMULUS_KINDS)} "
            "(e.g. grating:orientation=45,frequency=4), or a path to an image file.",
        )
    if kind == "file":
        if not files:
            raise NO_FILES
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
