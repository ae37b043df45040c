"""Pitfall lab: the classic BatchNorm confusions of USER_STORIES.md as live experiments.

Each experiment has three faces built from one :class:`~bnviz.pitfalls.base.Experiment`:
a headless function returning a :class:`~bnviz.pitfalls.base.PitfallResult` (data plus a
verdict computed from PyTorch's own numbers), a ``bnviz pitfalls <name>`` CLI subcommand
and a section of the dashboard's Pitfall lab page.

    >>> from bnviz.pitfalls import REGISTRY, run_experiment
    >>> result = run_experiment("fold")           # defaults: a real model, a real photo
    >>> result.verdict
"""

from __future__ import annotations

import importlib

from .base import REGISTRY, Experiment, PitfallResult, register

#: CLI names in the order the lab presents them (one module per experiment).
EXPERIMENT_MODULES = {
    "explain": "explain",
    "inplace-relu": "inplace_relu",
    "partial-forward": "partial_forward",
    "track-stats": "track_stats",
    "mode-guard": "mode_guard",
    "fold": "fold",
    "detach": "detach",
    "freeze": "freeze",
}


def load_all() -> dict[str, Experiment]:
    """Import every experiment module (each registers itself) and return the registry."""
    for module in EXPERIMENT_MODULES.values():
        importlib.import_module(f"{__name__}.{module}")
    return {name: REGISTRY[name] for name in EXPERIMENT_MODULES if name in REGISTRY}


def run_experiment(name: str, **kwargs) -> PitfallResult:
    experiments = load_all()
    if name not in experiments:
        from ..errors import BnvizError

        raise BnvizError(
            f"Unknown pitfall experiment {name!r}.", f"choose one of: {', '.join(experiments)}."
        )
    return experiments[name].run(**kwargs)


def __getattr__(name: str):
    """Lazy re-exports of the reusable tools, e.g. ``from bnviz.pitfalls import preserve_modes``."""
    if name in ("audit_modes", "preserve_modes"):
        from . import mode_guard

        return getattr(mode_guard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EXPERIMENT_MODULES", "Experiment", "PitfallResult", "REGISTRY", "audit_modes", "load_all",
    "preserve_modes", "register", "run_experiment",
]
