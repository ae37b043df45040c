"""``LoadedModel``: a network ready for inspection with its preprocessing, class names and a
plain statement of where its weights came from; :func:`from_module` wraps any module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..imagenet import NUM_IMAGENET_CLASSES, imagenet_class_names
from .preprocessing import Preprocessing, _identity_preprocessing
from .registry import _bn_layer_names


@dataclass
class LoadedModel:
    """A model ready for inspection, plus everything a user needs to trust what they see.

    ``module`` is on the CPU and in ``eval()`` mode for registry models (see the package
    docstring for why); ``inspect()`` sets BatchNorm modes explicitly. ``weights`` is the
    sentence shown to users ("random init" is spelled out so nobody mistakes an untrained
    network's BatchNorm statistics for learned ones); ``weights_status`` is its
    machine-readable form: "bundled", "cached", "downloaded", "random init", "checkpoint" or
    "custom".
    """

    name: str
    module: nn.Module
    preprocess: Preprocessing
    class_names: list[str] | None
    weights: str
    weights_status: str
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def is_random_init(self) -> bool:
        return self.weights_status == "random init"

    @property
    def bn_layer_names(self) -> list[str]:
        """``named_modules()`` names of every BatchNorm layer (1d/2d/3d, SyncBatchNorm)."""
        return _bn_layer_names(self.module)



def from_module(
    module: nn.Module,
    name: str = "custom",
    preprocess: Preprocessing | None = None,
    class_names: list[str] | None = None,
) -> LoadedModel:
    """Wrap any ``nn.Module`` (BatchNorm1d/3d models included) for inspection.

    The module is used exactly as given: not moved, not switched to eval, because it is the
    caller's object and they may rely on its current state (``notes["training"]`` records the
    mode it arrived in). Without ``preprocess`` the input is passed through unchanged, since
    bnviz cannot know what normalisation an arbitrary model expects.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module() needs a torch.nn.Module, got {type(module).__name__}")
    return LoadedModel(
        name=name,
        module=module,
        preprocess=preprocess if preprocess is not None else _identity_preprocessing(),
        class_names=list(class_names) if class_names is not None else None,
        weights="custom module (weights as given)",
        weights_status="custom",
        notes={"training": module.training},
    )



def _class_names(arch_kwargs: dict[str, Any], categories: list[str] | None) -> list[str] | None:
    if arch_kwargs.get("num_classes", NUM_IMAGENET_CLASSES) != NUM_IMAGENET_CLASSES:
        return None  # a re-headed model: ImageNet names would be wrong
    return list(categories) if categories is not None else imagenet_class_names()

