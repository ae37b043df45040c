"""ImageNet-1k class names.

bnviz shows top-k predictions so that a user can see at a glance whether a model, its
weights and its preprocessing are wired up correctly ("Egyptian cat" on the cat picture
means all three are right). The order is the standard ImageNet-1k class index order used
by every model here (including the bundled EfficientNet-Lite0, which was trained on the
same label set).

The names ship with bnviz as ``imagenet_classes.txt`` (one per line, 10 KB): a copy of
torchvision's ``ResNet18_Weights.DEFAULT.meta["categories"]``, which a test checks it
still equals. Reading it avoids importing torchvision (slow: it pulls in ``torch._dynamo``
and triton) whenever only the default model, which does not need torchvision, is used.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

NUM_IMAGENET_CLASSES = 1000
CLASS_NAMES_FILE = "imagenet_classes.txt"


@lru_cache(maxsize=1)
def _imagenet_categories() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath(CLASS_NAMES_FILE).read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    if len(names) != NUM_IMAGENET_CLASSES:  # pragma: no cover - a damaged installation
        raise RuntimeError(f"expected {NUM_IMAGENET_CLASSES} ImageNet classes in "
                           f"bnviz/{CLASS_NAMES_FILE}, got {len(names)}")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, index ``i`` being the name of logit ``i``.

    The lookup is cached for the process; a fresh list is returned on every call so that a
    caller mutating its copy cannot corrupt the names every other caller sees.
    """
    return list(_imagenet_categories())
