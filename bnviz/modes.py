"""One vocabulary for BatchNorm layer modes, shared by the API, the CLI and the dashboard.

A *mode string* is ``train`` or ``eval`` optionally followed by comma-separated options::

    eval                      # running statistics, no update
    train                     # batch statistics, running statistics updated
    train,momentum=none       # cumulative average: factor 1/num_batches_tracked
    train,track=off           # flag switched off on the existing layer: buffers kept, not updated
    eval,track=off            # ... and in eval those kept buffers are still used
    eval,track=none           # as if built with track_running_stats=False: no buffers,
                              # so batch statistics are used even in eval

Why three ``track`` values: PyTorch behaves differently for a layer *built* with
``track_running_stats=False`` (no running buffers at all: batch statistics in train *and*
eval) and a layer whose attribute was *flipped* afterwards (buffers stay: eval still uses
them, train stops updating them). That difference is one of the classic BatchNorm confusions.

:func:`stats_used` and :func:`updates_running_stats` mirror the decision logic of
``torch.nn.modules.batchnorm._BatchNorm.forward`` so the report can say which statistics
produced each number; the manual-vs-native check in :mod:`bnviz.manual_bn` then proves it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import LayerError, ModeError
from .norms import norm_layers

TRACK_CHOICES = ("on", "off", "none")
_KEEP = "keep"  # sentinel for "leave the layer's momentum as it is"


@dataclass(frozen=True)
class LayerMode:
    """A parsed mode: ``training`` plus optional ``track`` and ``momentum`` overrides.

    ``track=None`` and ``momentum="keep"`` mean "leave the layer's own setting".
    ``momentum=None`` means the cumulative moving average (PyTorch's ``momentum=None``).
    """

    training: bool
    track: str | None = None
    momentum: float | None | str = _KEEP

    def __str__(self) -> str:
        parts = ["train" if self.training else "eval"]
        if self.track is not None:
            parts.append(f"track={self.track}")
        if self.momentum != _KEEP:
            parts.append(f"momentum={'none' if self.momentum is None else _fmt(self.momentum)}")
        return ",".join(parts)


def _fmt(value: float) -> str:
    return f"{value:g}"


_MODE_HELP = (
    "write 'train' or 'eval', optionally followed by ',track=on|off|none' and "
    "',momentum=<0..1>|none', e.g. 'eval', 'train,momentum=none', 'eval,track=none'."
)


def parse_mode(text: str | LayerMode) -> LayerMode:
    """Parse a mode string (see module docstring); raises :class:`ModeError` if malformed."""
    if isinstance(text, LayerMode):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ModeError(f"Invalid mode {text!r}.", _MODE_HELP)
    parts = [p.strip() for p in text.strip().lower().split(",")]
    head, options = parts[0], parts[1:]
    if head not in ("train", "eval"):
        raise ModeError(f"Invalid mode {text!r}: it must start with 'train' or 'eval'.", _MODE_HELP)
    track: str | None = None
    momentum: float | None | str = _KEEP
    seen: set[str] = set()
    for opt in options:
        key, sep, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ModeError(f"Invalid option {opt!r} in mode {text!r}.", _MODE_HELP)
        if key in seen:
            raise ModeError(f"Option {key!r} given twice in mode {text!r}.", _MODE_HELP)
        seen.add(key)
        if key == "track":
            if value not in TRACK_CHOICES:
                raise ModeError(
                    f"Invalid track value {value!r} in mode {text!r}.",
                    "use track=on, track=off (flag switched off, buffers kept) or "
                    "track=none (as if built with track_running_stats=False).",
                )
            track = value
        elif key == "momentum":
            if value in ("none", "null", "cumulative"):
                momentum = None
            else:
                try:
                    momentum = float(value)
                except ValueError:
                    momentum = math.nan
                if not (0.0 <= momentum <= 1.0):
                    raise ModeError(
                        f"Invalid momentum {value!r} in mode {text!r}.",
                        "use a number between 0 and 1, or momentum=none for a cumulative average.",
                    )
        else:
            raise ModeError(f"Unknown option {key!r} in mode {text!r}.", _MODE_HELP)
    return LayerMode(training=head == "train", track=track, momentum=momentum)


def bn_layers(module: torch.nn.Module) -> list[tuple[str, _BatchNorm]]:
    """All BatchNorm layers (1d/2d/3d, SyncBatchNorm, subclasses) in definition order: the
    layers :mod:`bnviz.norms` says bnviz inspects."""
    return norm_layers(module)  # type: ignore[return-value]


def resolve_modes(
    modes: str | LayerMode | Mapping[str, str | LayerMode] | None, layer_names: Iterable[str]
) -> dict[str, LayerMode]:
    """Expand the ``modes`` argument into ``{layer name: LayerMode}``.

    A single string applies to every layer; a mapping names layers explicitly (layers not
    named keep the model's own setting and are absent from the result). Unknown layer
    names raise :class:`LayerError` with the closest real names.
    """
    names = list(layer_names)
    if modes is None:
        return {}
    if isinstance(modes, str | LayerMode):
        mode = parse_mode(modes)
        return {n: mode for n in names}
    if not isinstance(modes, Mapping):
        raise ModeError(
            f"modes must be a mode string or a dict layer -> mode, got {type(modes).__name__}.",
            _MODE_HELP,
        )
    known = set(names)
    out: dict[str, LayerMode] = {}
    for name, mode in modes.items():
        if name not in known:
            raise unknown_layer_error(name, names)
        out[name] = parse_mode(mode)
    return out


def unknown_layer_error(name: str, names: list[str]) -> LayerError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else (
        f"the model has {len(names)} BatchNorm layers, e.g. {', '.join(names[:4])}"
        if names else "this model has no BatchNorm layers."
    )
    return LayerError(f"Unknown BatchNorm layer {name!r}.", hint)


def apply_mode(bn: _BatchNorm, mode: LayerMode, like: torch.Tensor | None = None) -> None:
    """Set ``mode`` on ``bn`` in place. Only ever call this on a private copy of a model.

    ``track=none`` removes the running buffers (as a layer built with
    ``track_running_stats=False`` has none); ``track=on`` on a layer without buffers creates
    fresh ones (mean 0, var 1, count 0), as construction would: in the dtype and on the
    device of the layer's weight, else of ``like`` (e.g. the model's first parameter, for an
    ``affine=False`` layer that holds no tensor of its own).
    """
    bn.train(mode.training)
    if mode.track == "on":
        bn.track_running_stats = True
        if bn.running_mean is None:
            # The layer's own dtype and device, as ``nn.BatchNorm2d(..., dtype=, device=)``
            # would create them (a float32 buffer in a float64 layer breaks the forward).
            like = bn.weight if bn.weight is not None else like
            kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
            bn.running_mean = torch.zeros(bn.num_features, **kw)
            bn.running_var = torch.ones(bn.num_features, **kw)
            bn.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=kw.get("device"))
    elif mode.track == "off":
        bn.track_running_stats = False
    elif mode.track == "none":
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
    if mode.momentum != _KEEP:
        bn.momentum = mode.momentum


def has_running_stats(bn: _BatchNorm) -> bool:
    return bn.running_mean is not None and bn.running_var is not None


def stats_used(bn: _BatchNorm) -> str:
    """``"batch"`` or ``"running"``: which statistics ``bn.forward`` normalises with.

    Mirrors ``_BatchNorm.forward``: batch statistics in train mode, and also in eval when
    the layer has no running buffers; running statistics otherwise.
    """
    bn_training = bn.training or not has_running_stats(bn)
    return "batch" if bn_training else "running"


def updates_running_stats(bn: _BatchNorm) -> bool:
    """Whether a forward of ``bn`` in its current state writes its running buffers.

    PyTorch passes the buffers to ``F.batch_norm`` only when ``not training or
    track_running_stats``; they are updated only when batch statistics are used.
    """
    passes_buffers = (not bn.training) or bn.track_running_stats
    return stats_used(bn) == "batch" and passes_buffers and has_running_stats(bn)


def describe_state(bn: _BatchNorm) -> str:
    """The layer's effective state as a canonical mode string (for tables and JSON)."""
    if bn.track_running_stats and has_running_stats(bn):
        track = "on"
    elif has_running_stats(bn):
        track = "off"
    else:
        track = "none"
    mom = "none" if bn.momentum is None else _fmt(bn.momentum)
    return f"{'train' if bn.training else 'eval'},track={track},momentum={mom}"
