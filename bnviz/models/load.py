"""``load_model``: a registry model (or a module passed in) with the weights asked for."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import BnvizError
from ..validation import PRETRAINED_WORDS, is_random_weights
from .lite import _load_lite
from .loaded import LoadedModel, from_module
from .registry import DEFAULT_MODEL, _resolve_name
from .timm_zoo import _load_timm, is_timm_name
from .weights import ProgressCallback
from .zoo import _load_torchvision


def _weights_mode(weights: object) -> str:
    if is_random_weights(weights):
        return "random"
    if isinstance(weights, str) and weights.strip().lower() in PRETRAINED_WORDS:
        return "pretrained"
    if isinstance(weights, (str, os.PathLike)):
        return "checkpoint"
    raise BnvizError(
        f"Unsupported weights value {weights!r}.",
        "use 'pretrained', None (or 'random') or the path of a state_dict file.",
    )


def load_model(
    name: str | nn.Module,
    weights: str | os.PathLike[str] | None = "pretrained",
    *,
    progress: ProgressCallback | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build a registry model with the requested weights; CPU, ``eval()`` mode.

    ``weights``:

    * ``"pretrained"`` (default): bundled weights for efficientnet_lite0; the torch hub cache
      for torchvision models, the Hugging Face hub cache for ``"timm:<name>"`` models (read
      by timm's own loader), downloading the file if needed (``progress(done, total)`` is
      called per chunk). Offline without a cached file: :class:`WeightsUnavailableError`.
    * ``None`` or ``"random"``: the architecture with random init, labelled as such.
    * a path: a state_dict file (``weights_only=True``), checked key by key against the
      architecture; problems raise :class:`CheckpointError`.

    ``arch_kwargs`` are forwarded to the architecture builder (torchvision's
    ``get_model(name, ...)``, ``timm.create_model`` or ``EfficientNet.from_name``), e.g.
    ``{"num_classes": 10}`` for a fine-tuned checkpoint or ``{"transform_input": True}`` for a
    GoogLeNet checkpoint trained that way; for timm, ``{"pretrained_cfg_overlay": {"file":
    path}}`` makes timm's own pretrained loader read a local file. Passing an ``nn.Module``
    instead of a name wraps it with :func:`from_module`.
    """
    if isinstance(name, nn.Module):
        if _weights_mode(weights) != "pretrained" or arch_kwargs:
            raise BnvizError(
                "weights / arch_kwargs only apply to registry model names; a module passed in "
                "is used exactly as it is.",
                "load your state_dict into the module yourself, then pass the module.",
            )
        return from_module(name)

    key = _resolve_name(name)
    mode = _weights_mode(weights)
    kwargs = dict(arch_kwargs or {})

    if key == DEFAULT_MODEL:
        loaded = _load_lite(mode, weights, kwargs)
    elif is_timm_name(key):
        loaded = _load_timm(key, mode, weights, kwargs, progress)
    else:
        loaded = _load_torchvision(key, mode, weights, kwargs, progress)
    loaded.module.cpu().eval()
    return loaded
