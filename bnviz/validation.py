"""Small checks and words shared by the API, the CLI, the dashboard and the labs.

One definition each: what counts as "random weights", a whole number in a range, and a
random init that is the same in every run and process.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import BnvizError

#: Words that ask for an explicit random init instead of pretrained weights.
RANDOM_WORDS = ("random", "none", "random init", "random_init")
#: Words that ask for the pretrained weights.
PRETRAINED_WORDS = ("pretrained", "default")


def is_random_weights(weights: Any) -> bool:
    """``None`` or one of :data:`RANDOM_WORDS` (any case, surrounding blanks ignored)."""
    return weights is None or (isinstance(weights, str)
                               and weights.strip().lower() in RANDOM_WORDS)


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (an int, an integral float, or a string
    of one; numpy's scalars count too); None otherwise. Booleans are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return int(number) if number.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None
            return int(number) if number.is_integer() else None
    return None


def check_int(what: str, value: Any, lo: int, hi: int, fix: str | None = None,
              error: type[BnvizError] = BnvizError) -> int:
    """``value`` as an int from ``lo`` to ``hi``, else ``error`` naming ``what`` and a fix."""
    number = as_int(value)
    if number is None or not lo <= number <= hi:
        raise error(f"{what} must be a whole number from {lo} to {hi}, got {value!r}.",
                    fix or f"pass a {what} between {lo} and {hi}.")
    return number


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded, restoring the global RNG state
    afterwards: a random init made inside is the same in every run and every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def seeded_call(fn: Callable[..., Any], *args: Any, seed: int = 0, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` inside :func:`seeded`."""
    with seeded(seed):
        return fn(*args, **kwargs)
