"""timm models (``"timm:<name>"``): random init offline, pretrained weights through timm's
own loader, the Hugging Face hub cache and its progress, or a checkpoint.

timm is where most people get their CNNs, and its BatchNorm is often ``BatchNormAct2d``,
a ``BatchNorm2d`` whose forward also applies the activation: bnviz reports those layers'
normalised output before the activation (:mod:`bnviz.inspection.fused`).

Pretrained weights: when timm's file is in the Hugging Face hub cache it is handed to
timm's loader as a local file (``pretrained_cfg_overlay=dict(file=...)``), so a cached
model loads without a network round trip; otherwise it is downloaded into that cache first
(``hf_hub_download``, its progress relayed to ``progress(done, total)``). Offline, the
download server is probed once (a few seconds) instead of letting the hub client retry for
most of a minute, and :class:`~bnviz.errors.WeightsUnavailableError` says what to do.
timm reads ``.safetensors`` files, and other files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import math
import os
from functools import cache
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import BnvizError, CheckpointError, UnknownModelError, WeightsUnavailableError
from ..imagenet import NUM_IMAGENET_CLASSES, imagenet_class_names
from .checkpoint import (
    _CHECKPOINT_FIX,
    _NONFINITE_FIX,
    _apply_state_dict,
    _checkpoint_path,
    _nonfinite_entries,
    _read_state_dict,
)
from .loaded import LoadedModel
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .seams import seam
from .weights import ProgressCallback, download_weights

TIMM_PREFIX = "timm:"

#: timm models with BatchNorm and pretrained ImageNet-1k weights, for a model picker; any
#: other ``"timm:<name>"`` works too. ResNet-D models use plain BatchNorm2d, the others
#: timm's BatchNormAct2d (SiLU, ReLU, ReLU6, Hardswish, LeakyReLU inside the layer).
TIMM_MODELS: tuple[str, ...] = (
    "timm:resnet18d",
    "timm:resnet50d",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_large_100",
    "timm:mobilenetv2_100",
    "timm:tf_efficientnet_lite0",
    "timm:lcnet_050",
    "timm:regnety_008",
    "timm:rexnet_100",
    "timm:densenet121",
    "timm:cspresnet50",
    "timm:dpn68",
)

#: the files timm's hub loader looks for, in its order (safetensors first)
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_RANDOM = "weights=None (CLI: --weights random) for an explicitly random-initialised model"


def is_timm_name(name: object) -> bool:
    return isinstance(name, str) and name.strip().lower().startswith(TIMM_PREFIX)


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise BnvizError("timm models need the timm package, which is not installed.",
                         "pip install timm.") from exc
    return timm


def resolve_timm_name(name: str) -> str:
    """``"timm:<name>"`` with timm's spelling of the name (a ``.tag`` kept), or
    :class:`UnknownModelError` listing close matches."""
    timm = _timm()
    raw = name.strip()[len(TIMM_PREFIX):].strip()
    arch, _, tag = raw.partition(".")
    key = arch.lower().replace("-", "_")
    if key and timm.is_model(key):
        if not tag:
            return f"{TIMM_PREFIX}{key}"
        tags = timm.list_pretrained(f"{key}.*")
        if f"{key}.{tag}" in tags:
            return f"{TIMM_PREFIX}{key}.{tag}"
        raise UnknownModelError(
            f"timm model {key!r} has no pretrained tag {tag!r}.",
            f"use one of: {', '.join(TIMM_PREFIX + t for t in tags[:12])}"
            if tags else f"use {TIMM_PREFIX}{key} without a tag.",
        )
    names = timm.list_models()
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.6)
    if key:
        close += [n for n in timm.list_models(f"*{key}*") if n not in close][: 8 - len(close)]
    hint = (f" Close matches: {', '.join(TIMM_PREFIX + n for n in close)}." if close
            else " timm has no model with a similar name.")
    raise UnknownModelError(
        f"Unknown timm model {raw!r}.{hint}",
        f"use a name from timm.list_models() (e.g. timm.list_models('*{key or 'resnet'}*')) "
        f"after '{TIMM_PREFIX}', or one of: {', '.join(TIMM_MODELS)}.",
    )


def _arch(name: str) -> str:
    return name[len(TIMM_PREFIX):]


def _create(name: str, kwargs: dict[str, Any], *, pretrained: bool = False) -> nn.Module:
    timm = _timm()
    try:
        return timm.create_model(_arch(name), pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise BnvizError(
            f"Cannot build {name} with arch_kwargs {kwargs!r}: {exc}.",
            f"pass only keyword arguments that timm.create_model('{_arch(name)}') accepts.",
        ) from exc


def timm_bn_count(name: str) -> int:
    """BatchNorm layers of a timm model, built on the meta device (no memory, no init)."""
    from .registry import count_bn_layers

    try:
        with torch.device("meta"):
            module = _create(name, {})
    except (NotImplementedError, RuntimeError):
        module = _create(name, {})
    return count_bn_layers(module)


# --------------------------------------------------------------------------------------------
# Preprocessing and class names
# --------------------------------------------------------------------------------------------


def _timm_preprocessing(module: nn.Module) -> tuple[Preprocessing, dict[str, Any]]:
    """The model's input normalisation from timm's data config, and that config (JSON-able)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(module)
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))[-2:]
    interpolation = str(cfg.get("interpolation", "bilinear"))
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    crop_mode = str(cfg.get("crop_mode", "center"))
    shown = "x".join(str(s) for s in size) if size[0] != size[1] else str(size[0])
    if crop_mode == "squash":
        ref = f"resize to {shown} ({interpolation})"
    else:
        scale = [math.floor(s / crop_pct) for s in size]
        scaled = "x".join(map(str, scale)) if scale[0] != scale[1] else str(scale[0])
        ref = (f"resize {scaled} ({interpolation}) + {crop_mode} crop {shown} "
               f"(crop_pct {crop_pct:g})")
    imagenet = (all(abs(a - b) < 1e-6 for a, b in zip(mean, IMAGENET_MEAN))
                and all(abs(a - b) < 1e-6 for a, b in zip(std, IMAGENET_STD)))
    fmt = ", ".join
    preprocessing = Preprocessing(
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        input_size=size[0],
        description=(
            f"(x - mean) / std with {'ImageNet ' if imagenet else ''}"
            f"mean=({fmt(f'{m:.3f}' for m in mean)}), std=({fmt(f'{s:.3f}' for s in std)}) "
            f"(timm data config); reference eval transform: {ref}"
        ),
    )
    config = {"mean": list(mean), "std": list(std), "input_size": list(size),
              "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode}
    return preprocessing, config


def _timm_class_names(module: nn.Module) -> list[str] | None:
    # ImageNet-1k names only for a 1000-way head; in21k heads and re-headed models get none.
    if getattr(module, "num_classes", None) == NUM_IMAGENET_CLASSES:
        return imagenet_class_names()
    return None


# --------------------------------------------------------------------------------------------
# Pretrained weights: where they are, fetching them with progress
# --------------------------------------------------------------------------------------------


def _pretrained_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(_arch(name))
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        timm = _timm()
        arch = _arch(name).partition(".")[0]
        tags = [TIMM_PREFIX + n for n in timm.list_pretrained(f"{arch}.*")][:8]
        raise BnvizError(
            f"timm has no pretrained weights for {_arch(name)!r}.",
            (f"use one of its pretrained tags ({', '.join(tags)}), " if tags else "")
            + "or use weights=None (CLI: --weights random) for a random-initialised model.",
        )
    return cfg


def _hub():
    import huggingface_hub
    from huggingface_hub import constants

    return huggingface_hub, constants


def _split_hub_id(hub_id: str) -> tuple[str, str | None]:
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def _cached_hub_file(repo: str, revision: str | None) -> str | None:
    hub, constants = _hub()
    for filename in _HUB_FILES:
        path = hub.try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE,
                                          revision=revision)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _torch_cache_file(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _progress_relay(progress: ProgressCallback) -> type:
    """A tqdm class for ``hf_hub_download`` that passes each chunk on to ``progress``."""
    from tqdm.std import tqdm

    class _Relay(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("disable", None)
            kwargs.pop("name", None)
            super().__init__(*args, disable=True, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._size = int(kwargs.get("total") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            progress(self._done, self._size)
            return None

    return _Relay


def _offline_error(name: str, repo: str, revision: str | None, reason: str
                   ) -> WeightsUnavailableError:
    _, constants = _hub()
    filename = _HUB_FILES[0]
    url = f"{constants.ENDPOINT.rstrip('/')}/{repo}/resolve/{revision or 'main'}/{filename}"
    cache_dir = constants.HF_HUB_CACHE
    return WeightsUnavailableError(
        f"The pretrained {name} weights could not be downloaded ({reason}) and are not in the "
        f"Hugging Face hub cache {cache_dir}.",
        f"connect to the internet and retry (set HF_HOME to use another cache folder), or "
        f"download {url} on a machine with internet access and pass that file as weights "
        f"(CLI: --weights PATH), or use {_RANDOM}.",
        url=url, filename=filename, cache_dir=cache_dir,
    )


@cache
def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed hub download raises: OSError (connection errors, missing files), the
    hub's HTTP errors, and its HTTP library's own errors when they escape its retries."""
    errors: list[type[BaseException]] = [OSError]
    from huggingface_hub.errors import HfHubHTTPError

    errors.append(HfHubHTTPError)
    for module in ("httpx", "httpx2"):
        try:
            base = getattr(__import__(module), "HTTPError", None)
        except ImportError:
            continue
        if isinstance(base, type) and issubclass(base, BaseException):
            errors.append(base)
    return tuple(errors)


def _fetch_hub(name: str, repo: str, revision: str | None,
               progress: ProgressCallback | None) -> str:
    """Download timm's weights file of ``repo`` into the hub cache; its path."""
    hub, constants = _hub()
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    endpoint = constants.ENDPOINT.rstrip("/")
    if constants.HF_HUB_OFFLINE:
        raise _offline_error(name, repo, revision, "HF_HUB_OFFLINE is set")
    parsed = urlparse(endpoint)
    if not seam("_host_reachable")(f"{parsed.scheme}://{parsed.netloc}"):
        raise _offline_error(name, repo, revision, f"{parsed.netloc} is not reachable")
    relay = _progress_relay(progress) if progress is not None else None
    missing: BaseException | None = None
    for filename in _HUB_FILES:
        try:
            return hub.hf_hub_download(repo, filename, revision=revision,
                                       cache_dir=constants.HF_HUB_CACHE, tqdm_class=relay)
        except LocalEntryNotFoundError as exc:  # the hub did not answer
            raise _offline_error(name, repo, revision, _first_line(exc)) from exc
        except EntryNotFoundError as exc:  # the repo has no such file: timm tries the next
            missing = exc
        except _download_errors() as exc:
            raise _offline_error(name, repo, revision, _first_line(exc)) from exc
    raise WeightsUnavailableError(
        f"The Hugging Face repository {repo} has none of timm's weights files "
        f"({', '.join(_HUB_FILES)}).", f"use {_RANDOM}.", url=f"{endpoint}/{repo}",
        filename=_HUB_FILES[0], cache_dir=constants.HF_HUB_CACHE) from missing


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _local_weights(cfg: Any) -> str | None:
    """The weights file timm's loader would read, when it is already on this machine."""
    if cfg.hf_hub_id:
        return _cached_hub_file(*_split_hub_id(cfg.hf_hub_id))
    if cfg.file:
        return str(cfg.file)
    path = _torch_cache_file(cfg.url)
    return path if os.path.isfile(path) else None


def fetch_timm_weights(name: str, *, progress: ProgressCallback | None = None) -> str:
    """The local file of timm model ``name``'s pretrained weights, downloaded (with
    ``progress(done, total)`` per chunk) when it is not cached; builds no model."""
    cfg = _pretrained_cfg(name)
    local = _local_weights(cfg)
    if local is not None:
        return local
    if cfg.hf_hub_id:
        return _fetch_hub(name, *_split_hub_id(cfg.hf_hub_id), progress)
    path = _torch_cache_file(cfg.url)
    return download_weights(cfg.url, path, hash_prefix=seam("_hash_prefix")(
        os.path.basename(path)), progress=progress, model_name=name)


def timm_weights_status(name: str, *, check_network: bool = True) -> str:
    """:func:`bnviz.models.weights_status` for a timm model."""
    try:
        cfg = _pretrained_cfg(name)
    except BnvizError:
        return "none"
    if cfg.hf_hub_id:
        cached = _cached_hub_file(*_split_hub_id(cfg.hf_hub_id)) is not None
        origin = _hub()[1].ENDPOINT
    else:
        cached = bool(cfg.file) or os.path.isfile(_torch_cache_file(cfg.url))
        origin = cfg.url
    if cached:
        return "cached"
    if not check_network:
        return "not cached"
    parsed = urlparse(origin)
    reachable = seam("_host_reachable")(f"{parsed.scheme}://{parsed.netloc}")
    return "downloadable" if reachable else "unavailable offline"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_checkpoint(path: str, label: str) -> dict[str, torch.Tensor]:
    """A state_dict file; ``.safetensors`` too (timm's hub format: tensors only, no code)."""
    if not path.endswith(".safetensors"):
        return _read_state_dict(path, label, _CHECKPOINT_FIX)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{label} is not a readable safetensors file: {_first_line(exc)}.",
                              _CHECKPOINT_FIX) from exc
    damaged = _nonfinite_entries(state)
    if damaged:
        raise CheckpointError(f"{label} holds NaN or infinite values: {', '.join(damaged[:5])}.",
                              _NONFINITE_FIX)
    return state


def _create_pretrained(name: str, kwargs: dict[str, Any], label: str, fix: str) -> nn.Module:
    """timm's model with timm's pretrained loading of the local file in ``kwargs``; a file
    timm cannot read or that does not fit raises :class:`CheckpointError`."""
    try:
        return _create(name, kwargs, pretrained=True)
    except BnvizError:
        raise
    except Exception as exc:  # torch, safetensors and timm each raise their own
        raise CheckpointError(f"{label} could not be loaded by timm: {type(exc).__name__}: "
                              f"{_first_line(exc)[:300]}.", fix) from exc


def _load_timm(name: str, mode: str, weights: object, kwargs: dict[str, Any],
               progress: ProgressCallback | None) -> LoadedModel:
    notes: dict[str, object] = {}
    if mode == "pretrained":
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
        if overlay.get("file") or overlay.get("state_dict") is not None:
            # The caller points timm's loader at weights of their own: no download.
            source = "a state_dict"
            if overlay.get("file"):
                source, path = _checkpoint_path(overlay["file"])
                overlay["file"] = notes["weights_file"] = path
            module = _create_pretrained(name, {**kwargs, "pretrained_cfg_overlay": overlay},
                                        f"The file {source}", _CHECKPOINT_FIX)
            text, status = f"pretrained weights from {source} (timm's loader)", "checkpoint"
        else:
            cfg = _pretrained_cfg(name)
            path = _local_weights(cfg)
            status = "cached" if path is not None else "downloaded"
            path = path or fetch_timm_weights(name, progress=progress)
            # timm's own loader reads the local file (its checkpoint filters, head and stem
            # adaptation, safe loading) without asking the hub again.
            module = _create_pretrained(
                name, {**kwargs, "pretrained_cfg_overlay": {**overlay, "file": path}},
                f"The cached {name} weights file {path}",
                f"delete it so bnviz downloads a fresh copy, or use {_RANDOM}.")
            where = "Hugging Face hub cache" if cfg.hf_hub_id else "torch hub cache"
            where = where if status == "cached" else f"downloaded to {where}"
            text = f"pretrained {cfg.hf_hub_id or _arch(name)} ({where})"
            notes["weights_file"] = path
            if cfg.tag:
                notes["timm_pretrained_tag"] = cfg.tag
    elif mode == "random":
        module = _create(name, kwargs)
        text, status = "random init", "random init"
    else:
        shown, path = _checkpoint_path(weights)  # type: ignore[arg-type]
        label = f"Checkpoint {shown}"
        state = _read_checkpoint(path, label)
        module = _create(name, kwargs)
        _apply_state_dict(module, state, name, label, _CHECKPOINT_FIX)
        text, status = f"checkpoint {shown}", "checkpoint"
        notes["weights_file"] = path
    preprocess, data_config = _timm_preprocessing(module)
    notes["timm_data_config"] = data_config
    return LoadedModel(
        name=name,
        module=module,
        preprocess=preprocess,
        class_names=_timm_class_names(module),
        weights=text,
        weights_status=status,
        notes=notes,
    )
