"""``check_batchnorm``: a user's BatchNorm against the native layer, in every setting."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import BnvizError
from .candidate import STATE_NAMES, Config, describe, infer_dims, locate, resolve
from .findings import CHECKS, CheckReport, Finding, merge_names
from .probes import attribute, run_config

NATIVE = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
DTYPES = (torch.float32, torch.float64)


def input_shapes(dims: int, num_features: int) -> list[tuple[int, ...]]:
    """The inputs of the training steps, cycled: small, so that n / (n - 1) is visible."""
    c = num_features
    return {1: [(8, c), (4, c, 5)], 2: [(4, c, 3, 3)], 3: [(2, c, 2, 3, 3)]}[dims]


def check_batchnorm(
    impl=None,
    *,
    factory=None,
    num_features: int = 4,
    reference: type | None = None,
    dims: int | None = None,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    steps: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    names: dict[str, str] | None = None,
    seed: int = 0,
) -> CheckReport:
    """Run a BatchNorm implementation side by side with the native layer and report, in
    plain words, where it departs (docs/check_batchnorm.md).

    ``impl`` is a class (built like nn.BatchNorm: ``impl(num_features, eps=..., momentum=...,
    affine=..., track_running_stats=...)``), a factory with that signature (or ``factory=``),
    or an instance (deep-copied; then only its own configuration is checked). Both layers get
    the same parameters, buffers, inputs and upstream gradients over ``steps`` training
    steps and in eval; then again with ``momentum=None``, ``affine=False``,
    ``track_running_stats=False``, in the other float dtype and on CUDA when there is one.
    The candidate's state is found by nn.BatchNorm's names, by the aliases gamma, beta,
    moving_mean and moving_var, or by ``names`` (``{"weight": "bn.scale"}``).

    ``dims`` (1, 2 or 3) or ``reference`` (nn.BatchNorm1d/2d/3d) picks the native layer and
    the input shapes ((N, C) and (N, C, L) for 1d); by default inferred from ``impl`` when it
    is a subclass of a native class, else 2d.
    """
    target = _target(impl, factory)
    dims, reference = _dims_and_reference(target, dims, reference)
    _validate(num_features=num_features, eps=eps, momentum=momentum, steps=steps, dtype=dtype,
              names=names)
    dev = resolve_device(device)
    instance = isinstance(target, nn.Module)
    affine = track = True
    if instance:
        num_features, eps, momentum, affine, track = _instance_config(target, names, num_features)
    main = Config("default" if not instance else "as given", eps, momentum, affine, track,
                  dtype, dev, steps, True)
    configs = [main]
    notes: list[str] = []
    if instance:
        notes.append("the other values of momentum, affine and track_running_stats: an "
                     "instance has one configuration; pass its class or a factory to check "
                     "them.")
    else:
        if momentum is not None:
            configs.append(dataclasses.replace(main, label="momentum=None", momentum=None,
                                               steps=max(steps, 2), eval=False,
                                               focus="momentum_none"))
        configs.append(dataclasses.replace(main, label="affine=False", affine=False, steps=1,
                                           focus="affine"))
        configs.append(dataclasses.replace(main, label="track_running_stats=False",
                                           track_running_stats=False, steps=1,
                                           focus="track_running_stats"))
    other = torch.float64 if dtype != torch.float64 else torch.float32
    configs.append(dataclasses.replace(main, label=str(other).replace("torch.", ""),
                                       dtype=other, steps=1, focus="dtype"))
    if dev.type == "cpu":
        if torch.cuda.is_available():
            configs.append(dataclasses.replace(main, label="cuda", device=torch.device("cuda"),
                                               steps=1, focus="device"))
        else:
            notes.append("CUDA: no CUDA device here, so it ran on the CPU only.")
    else:
        configs.append(dataclasses.replace(main, label="cpu", device=torch.device("cpu"),
                                           steps=1, focus="device"))
    shapes = input_shapes(dims, num_features)
    recorders = [run_config(target, reference, num_features, config, shapes, names, seed + i)
                 for i, config in enumerate(configs)]
    attribute(recorders)
    unbuilt = [r.config.label for r in recorders if not r.built]
    if unbuilt:
        notes.append(f"the setting{'s' if len(unbuilt) > 1 else ''} {', '.join(unbuilt)}: it "
                     "could not be built there (see the findings).")
    checks = set().union(*(r.checks for r in recorders))
    return CheckReport(
        implementation=describe(target),
        reference=_class_name(reference),
        dims=dims,
        shapes=shapes,
        num_features=num_features,
        eps=eps,
        momentum=momentum,
        steps=steps,
        device=str(dev),
        dtype=str(dtype).replace("torch.", ""),
        configs=[c.label for c in configs],
        checks=[c for c in CHECKS if c in checks],
        findings=_merge(recorders),
        notes=notes,
    )


def _merge(recorders) -> list[Finding]:
    """One finding per (check, cause), listing the settings it was seen in, in the order of
    CHECKS. A crash (or a wrong kind of output) with the same message in several settings is
    one finding, under the check of the first setting it was seen in."""
    merged: dict[tuple, list] = {}
    for rec in recorders:
        for (check, cause), obs in rec.observations.items():
            key: tuple = (check, cause)
            if cause in ("raises", "bad_output"):
                key = (cause, obs.values.get("where"), obs.values.get("error"),
                       obs.values.get("got"))
            if key not in merged:
                merged[key] = [check, cause, [obs.config], dict(obs.values), obs.formula]
                continue
            entry = merged[key]
            entry[2].append(obs.config)
            if "name" in obs.values:
                entry[3]["name"] = merge_names(entry[3].get("name", ""), obs.values["name"])
    order = list(CHECKS)
    entries = sorted(merged.values(), key=lambda e: order.index(e[0]))
    return [Finding.make(check, cause, configs, values, formula)
            for check, cause, configs, values, formula in entries]


def _target(impl, factory):
    if (impl is None) == (factory is None):
        raise BnvizError("check_batchnorm needs exactly one implementation to check.",
                         "pass a class, a factory or an instance as the first argument, "
                         "or factory=... alone.")
    target = impl if impl is not None else factory
    if not isinstance(target, nn.Module) and not callable(target):
        raise BnvizError(f"{target!r} is not a class, a factory or an nn.Module instance.",
                         "pass your BatchNorm class (e.g. MyBN), a function that builds one, "
                         "or an instance.")
    return target


def _class_name(cls: type) -> str:
    if getattr(nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _dims_and_reference(target, dims, reference) -> tuple[int, type]:
    if reference is not None:
        ref_dims = infer_dims(reference) if inspect.isclass(reference) else None
        if ref_dims is None:  # SyncBatchNorm, say, needs a process group to run at all
            raise BnvizError(f"reference={reference!r} is not a native BatchNorm class.",
                             "pass nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d.")
        if dims is not None and dims != ref_dims:
            raise BnvizError(f"dims={dims} contradicts reference={_class_name(reference)}.",
                             "pass one of them, or matching ones.")
        dims = ref_dims
    elif dims is None:
        dims = infer_dims(target) or 2
    if dims not in NATIVE:
        raise BnvizError(f"dims={dims!r} is not 1, 2 or 3.",
                         "pass dims=1 (BatchNorm1d), 2 (BatchNorm2d) or 3 (BatchNorm3d).")
    return dims, reference or NATIVE[dims]


def _validate(*, num_features, eps, momentum, steps, dtype, names) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise BnvizError(f"num_features={num_features!r} is not a positive integer.",
                         "pass the number of channels, e.g. num_features=4.")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise BnvizError(f"eps={eps!r} is not a positive number.", "pass e.g. eps=1e-5.")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
        raise BnvizError(f"momentum={momentum!r} is not in (0, 1] or None.",
                         "pass e.g. momentum=0.1, or None for the cumulative average.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise BnvizError(f"steps={steps!r} is not a positive integer.", "pass e.g. steps=3.")
    if dtype not in DTYPES:
        raise BnvizError(f"dtype={dtype!r} is not supported.",
                         "pass torch.float32 or torch.float64.")
    if names is not None and not (isinstance(names, dict) and all(
            k in STATE_NAMES and isinstance(v, str) and v for k, v in names.items())):
        raise BnvizError(f"names={names!r} does not map nn.BatchNorm's names to yours.",
                         f"use keys among {', '.join(STATE_NAMES)}, e.g. "
                         "names={'weight': 'scale', 'bias': 'shift'}.")


def _instance_config(module: nn.Module, names, num_features: int):
    """num_features, eps, momentum, affine and track_running_stats of an instance: its
    attributes where it has them, else what its tensors say, else nn.BatchNorm's defaults."""
    found = locate(module, names)
    size = getattr(module, "num_features", None)
    if not isinstance(size, int):
        loc = found.get("weight") or found.get("running_mean")
        size = None if loc is None else _numel(module, loc.path)
    eps = getattr(module, "eps", 1e-5)
    momentum = getattr(module, "momentum", 0.1)
    affine = bool(getattr(module, "affine", "weight" in found))
    track = bool(getattr(module, "track_running_stats", "running_mean" in found))
    return (size or num_features), float(eps), momentum, affine, track


def _numel(module: nn.Module, path: str) -> int | None:
    value = resolve(module, path)
    return value.numel() if isinstance(value, torch.Tensor) else None
