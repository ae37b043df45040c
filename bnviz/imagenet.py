"""ImageNet-1k class names.

bnviz shows top-k predictions so that a user can see at a glance whether a model, its
weights and its preprocessing are wired up correctly ("Egyptian cat" on the cat picture
means all three are right). The names come from torchvision's weights metadata, which
ships inside the torchvision wheel: no download and no extra data file are needed, and
the order is the standard ImageNet-1k class index order used by every model here
(including the bundled EfficientNet-Lite0, which was trained on the same label set).
"""

from __future__ import annotations

from functools import lru_cache

NUM_IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def _imagenet_categories() -> tuple[str, ...]:
    # Imported lazily: torchvision.models is a heavy import and only this function needs it.
    import torchvision

    names = tuple(torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"])
    if len(names) != NUM_IMAGENET_CLASSES:  # pragma: no cover - torchvision invariant
        raise RuntimeError(f"expected {NUM_IMAGENET_CLASSES} ImageNet classes, got {len(names)}")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, index ``i`` being the name of logit ``i``.

    The lookup is cached for the process; a fresh list is returned on every call so that a
    caller mutating its copy cannot corrupt the names every other caller sees.
    """
    return list(_imagenet_categories())
