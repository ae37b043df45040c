"""torchvision classifiers: pretrained weights from the torch hub cache (downloaded when
missing), a random init, or a checkpoint, built the way torchvision's own builders do."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .checkpoint import (
    _CHECKPOINT_FIX,
    _apply_state_dict,
    _checkpoint_path,
    _read_state_dict,
    _remap_legacy_keys,
)
from .loaded import LoadedModel, _class_names
from .preprocessing import _torchvision_preprocessing
from .registry import _pretrained_kwargs, _random_kwargs
from .seams import seam
from .weights import ProgressCallback, _cache_problem, _weights_enum, _weights_file, fetch_weights


def _notes_for(name: str, module: nn.Module) -> dict[str, object]:
    notes: dict[str, object] = {}
    if name == "googlenet":
        # GoogLeNet with transform_input=True re-normalises ImageNet-normalised input to
        # (x - 0.5) / 0.5 inside forward(): a hidden preprocessing step worth showing.
        notes["transform_input"] = bool(getattr(module, "transform_input", False))
    return notes


def _load_torchvision(
    name: str,
    mode: str,
    weights: object,
    kwargs: dict[str, Any],
    progress: ProgressCallback | None,
) -> LoadedModel:
    build = seam("_build_torchvision")
    enum = _weights_enum(name)
    categories = list(enum.meta["categories"])
    notes: dict[str, object] = {}
    if mode == "pretrained":
        build_kwargs = _pretrained_kwargs(name, kwargs)  # reject bad kwargs before downloading
        info = _weights_file(name)
        # only the published file (its sha256 matches its name) is called pretrained
        if os.path.isfile(info.path) and _cache_problem(info) is None:
            status, where = "cached", "torch hub cache"
        else:
            fetch_weights(name, progress=progress)
            status, where = "downloaded", "downloaded to torch hub cache"
        module = build(name, build_kwargs)
        label = f"The cached {name} weights file {info.path}"
        fix = (
            f"delete it so bnviz downloads a fresh copy (or copy the official file from "
            f"{info.url} there), or use weights=None (CLI: --weights random)."
        )
        state = _read_state_dict(info.path, label, fix, damaged_fix=fix)
        _remap_legacy_keys(name, state)
        _apply_state_dict(module, state, name, label, fix)
        if name == "googlenet" and not kwargs.get("aux_logits", False):
            module.aux_logits = False  # same as torchvision's builder: aux heads are untrained
            module.aux1 = None
            module.aux2 = None
        text = f"pretrained {enum.name} ({where})"
        notes["weights_file"] = info.path
        notes["weights_enum"] = str(enum)
        acc = enum.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        if acc is not None:
            notes["imagenet_top1_acc"] = acc
        class_names: list[str] | None = categories
    elif mode == "random":
        module = build(name, _random_kwargs(name, kwargs, for_checkpoint=False))
        text, status = "random init", "random init"
        class_names = _class_names(kwargs, categories)
    else:
        shown, path = _checkpoint_path(weights)  # type: ignore[arg-type]
        label = f"Checkpoint {shown}"
        state = _read_state_dict(path, label, _CHECKPOINT_FIX)
        module = build(name, _random_kwargs(name, kwargs, for_checkpoint=True))
        _remap_legacy_keys(name, state)
        _apply_state_dict(module, state, name, label, _CHECKPOINT_FIX)
        text, status = f"checkpoint {shown}", "checkpoint"
        notes["weights_file"] = path
        class_names = _class_names(kwargs, categories)
    notes = {**_notes_for(name, module), **notes}
    return LoadedModel(
        name=name,
        module=module,
        preprocess=_torchvision_preprocessing(enum),
        class_names=class_names,
        weights=text,
        weights_status=status,
        notes=notes,
    )
