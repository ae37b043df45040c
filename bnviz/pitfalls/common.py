"""What every pitfall experiment needs before it shows anything: a model, a batch, checked
numbers.

Loading follows one honest rule: ``weights="auto"`` uses pretrained weights when they are
bundled, cached or downloadable, and otherwise an explicitly labelled *random init* model
(the BatchNorm phenomena shown here do not depend on the weights, and torchvision weights
cannot be downloaded offline). Loaded models are cached per process and every caller gets a
private copy, which it may put in train mode, hook or move.

Two kinds of batch: a stimulus spec (:func:`make_batch`: explain, inplace-relu,
partial-forward, track-stats) and jittered copies of a bundled photo (:func:`prepare_photo`:
mode-guard, fold, detach, freeze).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import BnvizError, LayerError, WeightsUnavailableError
from ..models import DEFAULT_MODEL, LoadedModel
from ..modes import bn_layers
from ..validation import PRETRAINED_WORDS, as_int, check_int, is_random_weights, seeded

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SIZE",
    "PhotoSetup",
    "load_experiment_model",
    "make_batch",
    "prepare_photo",
    "replace_module",
    "single_value_errors",
    "train_forward_error",
]

#: Small images and batches: every effect shown here is independent of the image size, and
#: the experiments must stay quick on a laptop CPU. ``size=224`` gives the models' own size.
DEFAULT_SIZE = 112
DEFAULT_BATCH_SIZE = 2
SIZE_CHOICES = (64, 96, 112, 160, 224)
MIN_SIZE = 32
MAX_SIZE = 512
MAX_BATCH = 64

# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 6


def _weights_key(weights: Any) -> str:
    """What ``weights`` asks for: "random", "auto", "pretrained" or a checkpoint path."""
    if is_random_weights(weights):
        return "random"
    text = str(weights).strip()
    lowered = text.lower()
    if lowered == "auto":
        return "auto"
    return "pretrained" if lowered in PRETRAINED_WORDS else text


def load_experiment_model(name: Any, weights: Any = "auto",
                          arch_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """A :class:`~bnviz.models.LoadedModel` whose module is a private copy.

    Loaded models are cached per process (GoogLeNet takes seconds to initialise) and every
    call returns a fresh ``copy.deepcopy`` of the cached module, which itself is never handed
    out. ``name`` may also be a ``LoadedModel`` or an ``nn.Module`` (yours): it is
    deep-copied, never touched.

    ``weights``: "auto" = pretrained when bundled, cached or downloadable, else random init
    (labelled "random init"); "pretrained" (raises
    :class:`~bnviz.errors.WeightsUnavailableError` offline); "random"/None; or a checkpoint
    path.
    """
    from ..models import _resolve_name, from_module, load_model, weights_status

    if isinstance(name, nn.Module):
        return from_module(_copy_module(name), name=type(name).__name__)
    if isinstance(name, LoadedModel):
        return dataclasses.replace(name, module=_copy_module(name.module), notes=dict(name.notes))
    resolved = _resolve_name(name)
    mode = _weights_key(weights)
    key = (resolved, mode, tuple(sorted((arch_kwargs or {}).items())))
    with _CACHE_LOCK:
        base = _CACHE.get(key)
    if base is not None and mode == "auto" and base.is_random_init and \
            weights_status(resolved, check_network=False) in ("bundled", "cached"):
        base = None  # the weights arrived since: use them
    if base is None:
        if mode == "auto":
            base = None
            if weights_status(resolved) in ("bundled", "cached", "downloadable"):
                try:
                    base = load_model(resolved, "pretrained", arch_kwargs=arch_kwargs)
                except WeightsUnavailableError:
                    base = None
            if base is None:
                base = _load_random(resolved, arch_kwargs)
        elif mode == "random":
            base = _load_random(resolved, arch_kwargs)
        else:
            base = load_model(resolved, weights, arch_kwargs=arch_kwargs)
        with _CACHE_LOCK:
            _CACHE[key] = base
            _CACHE.move_to_end(key)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return dataclasses.replace(base, module=copy.deepcopy(base.module), notes=dict(base.notes))


def _load_random(name: str, arch_kwargs: dict[str, Any] | None) -> LoadedModel:
    """Seeded random init: every run and every process shows the same random network, so
    the numbers in a verdict are reproducible."""
    from ..models import load_model

    with seeded(0):
        return load_model(name, None, arch_kwargs=arch_kwargs)


def _copy_module(module: nn.Module) -> nn.Module:
    """A deep copy on the CPU in eval mode, so every experiment starts from the same state."""
    return copy.deepcopy(module).cpu().eval()


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``root``'s submodule called ``name`` (a dotted path)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# --------------------------------------------------------------------------------------------
# A stimulus batch
# --------------------------------------------------------------------------------------------


def make_batch(loaded: LoadedModel, stimulus: str, *, batch_size: int, size: int,
               composition: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw, model_input)``: raw images in [0, 1] and the model's preprocessed input."""
    from ..stimuli import make_stimulus_from_spec

    count = as_int(batch_size)
    if count is None or count < 1:
        raise BnvizError(f"batch_size must be a positive integer, got {batch_size!r}.",
                         "pass e.g. 2.")
    raw = make_stimulus_from_spec(stimulus, size=size, batch_size=count,
                                  composition=composition, seed=seed)
    return raw, loaded.preprocess(raw)


# --------------------------------------------------------------------------------------------
# A photo batch
# --------------------------------------------------------------------------------------------


@dataclass
class PhotoSetup:
    """A privately loaded model, its device and a real photo batch (raw and preprocessed)."""

    loaded: LoadedModel
    device: torch.device
    raw: torch.Tensor  # (N, 3, S, S) in [0, 1], CPU
    x: torch.Tensor  # preprocessed, on ``device``
    weights_note: str | None
    stimulus: str

    @property
    def label(self) -> str:
        """The model name, with "(random init)" spelled out when that is what it is."""
        name = self.loaded.name
        return f"{name} (random init)" if self.loaded.is_random_init else name

    def private_module(self) -> nn.Module:
        """The experiment's own copy of the module (never the caller's object), on the
        device."""
        return self.loaded.module.to(self.device)

    def result_fields(self) -> dict[str, Any]:
        return {"model": self.loaded.name, "weights": self.loaded.weights,
                "device": str(self.device)}

    def data_fields(self) -> dict[str, Any]:
        data = {"stimulus": self.stimulus, "input_shape": list(self.raw.shape),
                "weights_status": self.loaded.weights_status}
        if self.weights_note:
            data["weights_note"] = self.weights_note
        return data


def _load_with_fallback(model: str | LoadedModel, weights: Any) -> tuple[LoadedModel, str | None]:
    """``(loaded, note)``: "pretrained" falls back to random init like "auto", and ``note``
    says so, so that the fallback is never silent."""
    wanted = "auto" if isinstance(weights, str) and weights.strip().lower() in (
        "auto", *PRETRAINED_WORDS) else weights
    loaded = load_experiment_model(model, wanted)
    note = None
    if wanted == "auto" and loaded.is_random_init and not isinstance(model, LoadedModel):
        note = (f"pretrained weights for {loaded.name} are not available here (not bundled, "
                "cached or downloadable); using random init")
    return loaded, note


def prepare_photo(model: str | LoadedModel = DEFAULT_MODEL, weights: Any = "auto",
                  photo: str = "chelsea", batch_size: int = 4,
                  size: int | None = DEFAULT_SIZE, seed: int = 0,
                  device: str = "auto") -> PhotoSetup:
    """Load the model (falling back to random init), pick the device, and build a batch of
    jittered copies of a bundled photo. ``size=None`` means the model's own input size.

    ``weights``: "auto"/"pretrained" (pretrained, else random init), "random"/None, or a
    checkpoint path.
    """
    from ..stimuli import make_stimulus

    dev = resolve_device(device)
    batch_size = check_int("batch size", batch_size, 1, MAX_BATCH)
    loaded, note = _load_with_fallback(model, weights)
    if not bn_layers(loaded.module):
        raise LayerError(f"{loaded.name} has no BatchNorm layers, so there is nothing to show.",
                         "choose a model with BatchNorm, e.g. efficientnet_lite0 or resnet18.")
    size = loaded.preprocess.input_size if size is None else check_int(
        "image size", size, MIN_SIZE, MAX_SIZE)
    raw = make_stimulus("image", size=size, batch_size=batch_size, composition="jitter",
                        seed=seed, name=photo)
    x = loaded.preprocess(raw).to(dev)
    stimulus = f"photo {photo!r}, {batch_size} jittered copies, {size}x{size} px"
    return PhotoSetup(loaded, dev, raw, x, note, stimulus)


# --------------------------------------------------------------------------------------------
# Errors of a train-mode forward
# --------------------------------------------------------------------------------------------


def train_forward_error(exc: ValueError) -> BnvizError | None:
    """PyTorch's "Expected more than 1 value per channel" as a fix-it message."""
    if "more than 1 value per channel" not in str(exc):
        return None
    return BnvizError(
        "A BatchNorm layer in train mode got only one value per channel (batch of 1 and a "
        "1x1 feature map), so its batch variance is undefined.",
        "use a batch size of at least 2 or a larger image size.",
    )


@contextlib.contextmanager
def single_value_errors() -> Iterator[None]:
    """Turn :func:`train_forward_error`'s case into that user error; other errors pass."""
    try:
        yield
    except ValueError as exc:
        err = train_forward_error(exc)
        if err is None:
            raise
        raise err from exc
