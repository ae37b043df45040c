"""Building the implementation under test, finding its state by name, and giving it the
native layer's values.

The naming convention: the candidate's tensors are found by nn.BatchNorm's names
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), else by
the aliases in :data:`ALIASES` (``gamma``, ``beta``, ``moving_mean``, ``moving_var``), else
by the dotted path the caller gives in ``names`` (``{"weight": "bn.scale"}``). A name that
resolves to ``None`` or to no tensor counts as absent.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
PARAMETER_NAMES = ("weight", "bias")
ALIASES = {"weight": ("gamma",), "bias": ("beta",), "running_mean": ("moving_mean",),
           "running_var": ("moving_var",)}
#: nn.BatchNorm's defaults: a keyword the candidate rejects is dropped when it has this value.
#: The running variance of every fourth channel: below eps, so eps placement shows in eval.
TINY_RUNNING_VAR = 5e-6
DEFAULTS = {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True}


@dataclass(frozen=True)
class Config:
    """One setting the candidate is checked in."""

    label: str
    eps: float
    momentum: float | None
    affine: bool = True
    track_running_stats: bool = True
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    steps: int = 1
    eval: bool = True
    #: the check this setting is about ("affine", "track_running_stats", "dtype", "device",
    #: "momentum_none"), which a crash or an unexplained output in it is reported under
    focus: str | None = None

    def kwargs(self) -> dict:
        """Constructor keywords: eps and momentum always, the flags when they are off."""
        out = {"eps": self.eps, "momentum": self.momentum}
        if not self.affine:
            out["affine"] = False
        if not self.track_running_stats:
            out["track_running_stats"] = False
        return out


@dataclass
class Built:
    module: nn.Module | None
    problems: list[tuple[str, str, dict]]  # (check, cause, values) met while building


def describe(impl) -> str:
    """A short name for what is being checked."""
    if isinstance(impl, nn.Module):
        return f"{type(impl).__name__} instance"
    return getattr(impl, "__qualname__", None) or type(impl).__name__


def _call_text(name: str, num_features: int, kwargs: dict) -> str:
    args = ", ".join([str(num_features)] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return f"{name}({args})"


def short_error(exc: BaseException) -> str:
    """An exception as one line: its type and the start of its message."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def build(impl, num_features: int, config: Config) -> Built:
    """The candidate for ``config``, moved to its device and dtype.

    A class or factory is called like nn.BatchNorm; a keyword it rejects is dropped when it
    has nn.BatchNorm's default (the candidate's own default is then checked by behaviour),
    otherwise the setting cannot be built. An instance is deep-copied, so the caller's
    module is never changed.
    """
    problems: list[tuple[str, str, dict]] = []
    if isinstance(impl, nn.Module):
        module = copy.deepcopy(impl)
    else:
        kwargs = config.kwargs()
        name = describe(impl)
        while True:
            try:
                module = impl(num_features, **kwargs)
                break
            except TypeError as exc:
                match = _UNEXPECTED.search(str(exc))
                key = match.group(1) if match else None
                if key not in kwargs:
                    problems.append(("constructor", "constructor_raises", {
                        "call": _call_text(name, num_features, kwargs), "error": short_error(exc)}))
                    return Built(None, problems)
                problems.append(("constructor", "constructor_keyword", {"name": key}))
                if kwargs[key] != DEFAULTS[key]:
                    return Built(None, problems)
                kwargs = {k: v for k, v in kwargs.items() if k != key}
            except Exception as exc:  # the candidate's own code: a finding, not a crash
                problems.append(("constructor", "constructor_raises", {
                    "call": _call_text(name, num_features, kwargs), "error": short_error(exc)}))
                return Built(None, problems)
    if not isinstance(module, nn.Module):
        problems.append(("constructor", "constructor_raises", {
            "call": describe(impl), "error": f"it returned {type(module).__name__}, not an "
                                             "nn.Module"}))
        return Built(None, problems)
    try:
        module = module.to(device=config.device, dtype=config.dtype)
    except Exception as exc:
        check = "device" if config.device.type != "cpu" else "dtype"
        problems.append((check, "raises", {"where": f"module.to({config.device}, {config.dtype})",
                                           "error": short_error(exc), "config": config.label}))
        return Built(None, problems)
    return Built(module, problems)


def build_native(reference: type, num_features: int, config: Config,
                 generator: torch.Generator) -> nn.Module:
    """The native layer with gamma, beta and running statistics away from their defaults,
    so that a candidate that ignores one of them cannot match by accident."""
    native = reference(num_features, device=config.device, dtype=config.dtype, **config.kwargs())
    c = num_features
    values = {
        "weight": 0.5 + torch.rand(c, generator=generator, dtype=torch.float64),
        "bias": 0.5 * torch.randn(c, generator=generator, dtype=torch.float64),
        "running_mean": torch.randn(c, generator=generator, dtype=torch.float64),
        "running_var": 0.5 + 1.5 * torch.rand(c, generator=generator, dtype=torch.float64),
    }
    # a running variance below eps makes eps placement visible in eval too
    values["running_var"][1::4] = TINY_RUNNING_VAR
    with torch.no_grad():
        for name, value in values.items():
            target = getattr(native, name, None)
            if isinstance(target, torch.Tensor):
                target.copy_(value)
    return native


def resolve(module: nn.Module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True)
class Located:
    name: str  # nn.BatchNorm's name
    path: str  # where the candidate keeps it
    registered: bool  # a parameter or buffer (in state_dict), not a plain attribute


def locate(module: nn.Module, names: dict[str, str] | None) -> dict[str, Located]:
    """The candidate's counterparts of nn.BatchNorm's state, by the naming convention."""
    registered = {n for n, _ in module.named_parameters()} | {n for n, _ in
                                                               module.named_buffers()}
    found = {}
    for name in STATE_NAMES:
        paths = [names[name]] if names and name in names else [name, *ALIASES.get(name, ())]
        for path in paths:
            if isinstance(resolve(module, path), torch.Tensor):
                found[name] = Located(name, path, path in registered)
                break
    return found


def read(module: nn.Module, loc: Located) -> torch.Tensor | None:
    """The candidate's current value (looked up again: a forward may rebind an attribute)."""
    value = resolve(module, loc.path)
    return value if isinstance(value, torch.Tensor) else None


def sync(module: nn.Module, found: dict[str, Located], values: dict[str, torch.Tensor]) -> None:
    """Copy the native ``values`` into the candidate's tensors, reshaped and cast to them."""
    with torch.no_grad():
        for name, loc in found.items():
            value = values.get(name)
            target = read(module, loc)
            if value is None or target is None or target.numel() != value.numel():
                continue
            target.copy_(value.reshape(target.shape))


def native_state(native: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name in STATE_NAMES:
        value = getattr(native, name, None)
        if isinstance(value, torch.Tensor):
            out[name] = value.detach().clone()
    return out


def infer_dims(obj) -> int | None:
    """1, 2 or 3 for nn.BatchNorm1d/2d/3d (classes, subclasses or instances), else None."""
    cls = obj if inspect.isclass(obj) else type(obj)
    for dims, native in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(cls, type) and issubclass(cls, native):
            return dims
    return None
