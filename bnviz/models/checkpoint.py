"""State_dict files: read with ``weights_only=True``, checked key by key and shape by shape
against the architecture, with a readable report of what does not fit, and refused when
they hold NaN or infinite values."""

from __future__ import annotations

import os
import re
import stat
import warnings
import zipfile
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError

#: Old DenseNet checkpoints (including torchvision's own hub files) use "norm.1"-style keys
#: that are no longer valid module names; torchvision's builder renames them the same way.
_DENSENET_LEGACY_KEY_RE = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)

_STATE_DICT_HOWTO = "it must be a plain state_dict saved with torch.save(model.state_dict(), path)"

#: What torch's weights-only unpickler says when a file names a Python callable or class
#: ("Unsupported global: GLOBAL print was not an allowed global", "unsupported GLOBAL
#: posix.system whose module posix is blocked"), or calls one it does not know.
_PICKLED_CODE_RES = (
    re.compile(r"\bGLOBAL ([\w.]+)"),
    re.compile(r"reduce for unrecognized function (\S+)"),
    re.compile(r"Can only create new object .* but got <class '([\w.]+)'>"),
)

_NONFINITE_FIX = (
    "NaN or infinite weights come from a training run that diverged, or from a damaged file: "
    "use a checkpoint saved before that, or a good copy of the file."
)


def _first(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _pickle_protocol(path: str) -> int | None:
    """The pickle protocol the file's object was written with (legacy torch.save files and
    plain pickles start with it; zip files keep it in ``*/data.pkl``), or None."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with archive.open(name) as fh:
                    head = fh.read(2)
        else:
            with open(path, "rb") as fh:
                head = fh.read(2)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _unreadable_problem(path: str, label: str, exc: Exception) -> str:
    """Why torch's safe loader refused the file, in words a user can act on."""
    text = str(exc)
    for pattern in _PICKLED_CODE_RES:
        found = pattern.search(text)
        if found:
            return (
                f"{label} contains pickled Python objects ({found.group(1).rstrip('.')}), which "
                "bnviz refuses to load because unpickling them can run arbitrary code "
                "(torch.load weights_only=True)."
            )
    protocol = _pickle_protocol(path)
    if protocol is not None and protocol > 3:
        return (
            f"{label} was pickled with protocol {protocol} (pickle.dump, or torch.save with "
            f"pickle_protocol={protocol}), which PyTorch's safe loader (weights_only=True) "
            "cannot read."
        )
    return (
        f"{label} is not a loadable PyTorch file (corrupt, truncated, or not written by "
        f"torch.save): {type(exc).__name__}."
    )


def _nonfinite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """``"name (k of n values: j NaN, m infinite)"`` for every tensor with non-finite values."""
    found = []
    for key, value in state.items():
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            continue
        # NaN or inf anywhere makes the sum non-finite, so one reduction (no tensor-sized
        # temporary) clears the usual case; only a non-finite sum, which a finite overflow can
        # also give, is followed by the exact counts.
        if bool(torch.isfinite(value.sum())):
            continue
        nan = int(torch.isnan(value).sum())
        inf = int(torch.isinf(value).sum())
        if nan or inf:
            found.append(f"{key} ({nan + inf:,} of {value.numel():,} values: {nan:,} NaN, "
                         f"{inf:,} infinite)")
    return found


def _read_state_dict(path: str, label: str, fix: str, *,
                     damaged_fix: str = _NONFINITE_FIX) -> dict[str, torch.Tensor]:
    """Load ``path`` with ``weights_only=True`` and return a flat ``{name: tensor}`` dict.

    Accepts a raw state_dict or the common training-script wrappers ``{"state_dict": ...}``,
    ``{"model_state_dict": ...}`` and ``{"model": ...}``, and strips the ``module.``
    (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes. A tensor holding NaN or
    inf is refused by name (``damaged_fix`` says what to do): every number bnviz would show
    from it would be NaN.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"Could not read {label}: {exc.strerror or exc}.",
                              "check the path and that the file is readable.") from None
    if not stat.S_ISREG(mode):
        # torch.load would block forever on a FIFO and read a device without end.
        raise CheckpointError(f"{label[:1].upper()}{label[1:]} is not a regular file.",
                              "give the path of a checkpoint file.")
    try:
        with warnings.catch_warnings():
            # torch warns on stderr about any pickle protocol but 2 (protocol 3 loads fine);
            # the error below, not that text, is what a user should see.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError...
        raise CheckpointError(_unreadable_problem(path, label, exc),
                              f"{_STATE_DICT_HOWTO}; {fix}") from exc

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
    nonfinite = _nonfinite_entries(state)
    if nonfinite:
        raise CheckpointError(
            f"{label} holds NaN or infinite values in {len(nonfinite)} "
            f"tensor{'s' if len(nonfinite) > 1 else ''}: {_first(nonfinite, 5)}.",
            damaged_fix,
        )
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
