"""What a Training lab run is: its options, their validation, and the names they use.

A :class:`TrainConfig` (seed included) fixes every number of a run. :meth:`TrainConfig.
validated` is the one place where options are checked; every error names the bad option
and the fix (:class:`TrainConfigError`, shown as one line by the CLI and the page).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from ..devices import resolve_device
from ..errors import BnvizError
from ..validation import check_int
from .data import DataSpec

VARIANTS = ("native", "manual", "detached", "frozen")
VARIANT_DESCRIPTIONS = {
    "native": "nn.BatchNorm2d (reference)",
    "manual": "the core formula by hand (bnviz.manual_bn)",
    "detached": "manual formula with batch mean/var .detach()-ed",
    "frozen": "nn.BatchNorm2d kept in eval mode (running stats)",
}
LAYERS = ("bn1", "bn2", "bn3")
DEFAULT_MOMENTA: tuple[float | None, ...] = (0.1, 0.01, None)


class TrainConfigError(BnvizError):
    """An option of the Training lab that is out of range or unknown."""


#: The shared whole-number check, raising the lab's own error type.
_whole = partial(check_int, error=TrainConfigError)


def momentum_label(momentum: float | None) -> str:
    """``0.1`` -> ``"0.1"``, ``None`` -> ``"None"`` (dictionary keys, legends, JSON)."""
    return "None" if momentum is None else f"{momentum:g}"


def parse_momenta(text: str | Sequence[float | str | None]) -> tuple[float | None, ...]:
    """``"0.1,0.01,none"`` (or a sequence) -> ``(0.1, 0.01, None)``; validated, de-duplicated."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[float | None] = []
    for item in items:
        if isinstance(item, str):
            word = item.strip().lower()
            if not word:
                continue
            if word in ("none", "null", "cumulative"):
                value: float | None = None
            else:
                try:
                    value = float(word)
                except ValueError:
                    raise TrainConfigError(
                        f"Momentum {item.strip()!r} is not a number.",
                        "give numbers in [0, 1] or 'none' (cumulative average), "
                        "e.g. 0.1,0.01,none.",
                    ) from None
        else:
            value = None if item is None else float(item)
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise TrainConfigError(f"Momentum {value!r} is outside [0, 1].",
                                   "use a momentum between 0 and 1, or 'none'.")
        if value not in out:
            out.append(value)
    return tuple(out)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a Training lab run (same config + seed -> same numbers).

    ``layer`` and ``channels`` choose which running-statistics traces :meth:`TrainResult.
    to_dict` and the CLI report; the result keeps every channel of every layer, so the page
    can switch channels without retraining. ``curve_points`` bounds what a run keeps of
    each curve, however many steps it trains (:mod:`bnviz.training.thinning`).

    ``threads`` is the number of CPU threads torch uses for this run, set for the thread
    that trains it only (:func:`bnviz.training.threads.torch_threads`): the process's count
    and other threads (a server's other sessions) are never changed. ``None``: the calling
    thread's count as it is.
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 0.02
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS
    momenta: tuple[float | None, ...] = DEFAULT_MOMENTA
    layer: str = "bn2"
    channels: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 25
    device: str = "auto"
    image_size: int = 16
    n_train: int = 1536
    n_val: int = 384
    noise: float = 0.25
    widths: tuple[int, int, int] = (8, 16, 32)
    threads: int | None = 1
    curve_points: int = 500

    def validated(self) -> TrainConfig:
        """A normalised copy, or :class:`TrainConfigError` naming the bad option and the fix."""
        steps = _whole("steps", self.steps, 1, 100_000)
        widths = tuple(_whole("width", w, 1, 512) for w in self.widths)
        if len(widths) != 3:
            raise TrainConfigError(f"widths needs 3 numbers, got {len(widths)}.",
                                   "give one width per conv layer, e.g. (8, 16, 32).")
        n_train = _whole("n_train", self.n_train, 2, 200_000)
        n_val = _whole("n_val", self.n_val, 1, 100_000)
        batch_size = _whole("batch size", self.batch_size, 2, n_train)
        lr = float(self.lr) if isinstance(self.lr, int | float) else math.nan
        if not (math.isfinite(lr) and 0.0 < lr <= 10.0):
            raise TrainConfigError(f"Learning rate {self.lr!r} is not in (0, 10].",
                                   "use a positive learning rate such as 0.05.")
        seed = _whole("seed", self.seed, 0, 2**63 - 1)
        variants = []
        for v in (self.variants,) if isinstance(self.variants, str) else self.variants:
            name = str(v).strip().lower()
            if name not in VARIANTS:
                raise TrainConfigError(f"Unknown BatchNorm variant {v!r}.",
                                       f"choose from: {', '.join(VARIANTS)}.")
            if name not in variants:
                variants.append(name)
        if not variants:
            raise TrainConfigError("No BatchNorm variant selected.",
                                   f"select at least one of: {', '.join(VARIANTS)}.")
        momenta = parse_momenta(self.momenta)
        if self.layer not in LAYERS:
            raise TrainConfigError(f"Unknown BatchNorm layer {self.layer!r}.",
                                   f"choose one of: {', '.join(LAYERS)}.")
        width = widths[LAYERS.index(self.layer)]
        channels = []
        for c in self.channels:
            c = _whole("channel", c, 0, width - 1,
                       fix=f"{self.layer} has channels 0 to {width - 1}.")
            if c not in channels:
                channels.append(c)
        if not channels:
            raise TrainConfigError("No channel selected.", "pick at least one channel, e.g. 0.")
        eval_every = _whole("eval_every", self.eval_every, 1, 100_000)
        image_size = _whole("image size", self.image_size, 8, 64)
        noise = float(self.noise)
        if not (math.isfinite(noise) and 0.0 <= noise <= 2.0):
            raise TrainConfigError(f"Noise {self.noise!r} is outside [0, 2].",
                                   "use a pixel-noise standard deviation such as 0.25.")
        threads = None if self.threads is None else _whole("threads", self.threads, 1, 256)
        curve_points = _whole("curve_points", self.curve_points, 4, 1_000_000)
        resolve_device(self.device)
        return replace(self, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                       variants=tuple(variants), momenta=momenta, channels=tuple(channels),
                       eval_every=eval_every, image_size=image_size, n_train=n_train,
                       n_val=n_val, noise=noise, widths=widths, threads=threads,
                       curve_points=curve_points)

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(size=self.image_size, n_train=self.n_train, n_val=self.n_val,
                        noise=self.noise)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = list(self.variants)
        d["momenta"] = [momentum_label(m) for m in self.momenta]
        d["channels"] = list(self.channels)
        d["widths"] = list(self.widths)
        return d
