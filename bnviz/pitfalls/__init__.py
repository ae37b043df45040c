"""Pitfall lab: the classic BatchNorm confusions of docs/stories.md as live experiments.

Each experiment is one module of this package exposing the same names (``NAME``, ``TITLE``,
``STORY``, ``EXPLANATION``, ``CONTROLS``, ``run``, ``figures``, ``add_arguments``,
``kwargs_from_args``; see :mod:`bnviz.pitfalls.base`), and :data:`EXPERIMENTS` lists them in
the order the lab presents them: adding an experiment is one new module and one line there.
From that one list come the headless functions, the ``bnviz pitfalls <name>`` subcommands
(:mod:`bnviz.pitfalls.cli`) and the sections of the dashboard's Pitfall lab page.

    >>> from bnviz.pitfalls import REGISTRY, run_experiment
    >>> result = run_experiment("fold")           # defaults: a real model, a real photo
    >>> result.verdict
"""

from __future__ import annotations

import functools
import importlib

from .base import Experiment, PitfallResult

#: Experiment names (CLI and ``?experiment=`` links) in lab order; the module of each is its
#: name with "-" written "_".
EXPERIMENTS = (
    "explain",
    "inplace-relu",
    "partial-forward",
    "track-stats",
    "mode-guard",
    "fold",
    "detach",
    "freeze",
)


@functools.cache
def load_all() -> dict[str, Experiment]:
    """Every experiment by name, in lab order (the modules are imported on first use)."""
    experiments = {}
    for name in EXPERIMENTS:
        module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
        experiment = Experiment.from_module(module)
        if experiment.name != name:
            raise TypeError(f"{module.__name__}.NAME is {experiment.name!r}, expected {name!r}.")
        experiments[name] = experiment
    return experiments


def run_experiment(name: str, **kwargs) -> PitfallResult:
    experiments = load_all()
    if name not in experiments:
        from ..errors import BnvizError

        raise BnvizError(
            f"Unknown pitfall experiment {name!r}.", f"choose one of: {', '.join(experiments)}."
        )
    return experiments[name].run(**kwargs)


def __getattr__(name: str):
    """Lazy names: ``REGISTRY`` (:func:`load_all`) and the mode guard's reusable tools, e.g.
    ``from bnviz.pitfalls import preserve_modes``; importing the package stays light."""
    if name == "REGISTRY":
        return load_all()
    if name in ("audit_modes", "preserve_modes"):
        from . import mode_guard

        return getattr(mode_guard, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EXPERIMENTS", "Experiment", "PitfallResult", "REGISTRY", "audit_modes", "load_all",
    "preserve_modes", "run_experiment",
]
