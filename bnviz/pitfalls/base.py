"""The shape every pitfall experiment shares, so that the registry, the CLI and the page are
generic.

An experiment is one module exposing the names in :data:`MODULE_NAMES`; the registry in
:mod:`bnviz.pitfalls` turns it into an :class:`Experiment`. Its page controls are data
(:class:`PageControls`), drawn by :mod:`bnviz.pitfalls.controls`, so no experiment imports
Streamlit.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pandas as pd

from ..serialize import json_safe

#: What every experiment module exposes.
MODULE_NAMES = ("NAME", "TITLE", "STORY", "EXPLANATION", "CONTROLS", "run", "figures",
                "add_arguments", "kwargs_from_args")


@dataclass
class PitfallResult:
    """What one run of an experiment found.

    ``verdict`` is a plain-language conclusion *computed* from the numbers (never a fixed
    string); ``reproduced`` says whether the confusion showed up as the story describes
    (e.g. the Sequential rebuild of GoogLeNet really differs from the hooked output).
    ``table`` rows become the CLI table, the JSON ``table`` and a DataFrame on the page.
    ``data`` holds extra JSON-able numbers; ``arrays`` holds tensors/arrays for figures
    (not serialised).
    """

    name: str
    title: str
    verdict: str
    reproduced: bool
    table: list[dict[str, Any]]
    data: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    weights: str | None = None
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "name": self.name,
                "title": self.title,
                "model": self.model,
                "weights": self.weights,
                "device": self.device,
                "reproduced": self.reproduced,
                "verdict": self.verdict,
                "table": self.table,
                "data": self.data,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_frame(self):
        return pd.DataFrame(self.table)


# --------------------------------------------------------------------------------------------
# Page controls, as data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StimulusInputs:
    """Model, weights, layer, stimulus spec, batch composition and size, image size, device.

    ``models``: the models offered (empty: every registry model). ``layer``: "bn" (a
    BatchNorm layer), "any" (any module) or None (no layer picker).
    """

    model: str
    stimulus: str
    composition: str = "different"
    models: tuple[str, ...] = ()
    layer: str | None = "bn"
    default_layer: str | None = None


@dataclass(frozen=True)
class PhotoInputs:
    """Model (one with BatchNorm), weights, bundled photo, batch size, image size, device."""

    batch_size: int = 2


@dataclass(frozen=True)
class Widget:
    """One page control for one ``run()`` keyword.

    ``kind``: "select" or "radio" (one of ``options``), "int" or "float" (from ``low`` to
    ``high``), "checkbox", "layer" or "layers" (the chosen model's BatchNorm layers; "layers"
    picks several and starts with the first).
    """

    keyword: str
    label: str
    kind: str
    default: Any = None
    options: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    format: str | None = None
    help: str | None = None


@dataclass(frozen=True)
class PageControls:
    """An experiment's settings on the page: the shared inputs, then its own widgets, one
    tuple per row."""

    inputs: StimulusInputs | PhotoInputs
    rows: tuple[tuple[Widget, ...], ...] = ()


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """One pitfall experiment, read from its module (:meth:`from_module`).

    * ``run(**kwargs) -> PitfallResult``: every keyword has a sensible default.
    * ``figures(result) -> list[plotly Figure]``: pure, built from the result only.
    * ``add_arguments(parser)``: CLI options (all optional) for ``bnviz pitfalls <name>``.
    * ``kwargs_from_args(namespace) -> dict``: CLI namespace -> ``run`` keywords.
    * ``page``: the page's controls; :meth:`controls` draws them.
    * ``story``: the confusion in one or two sentences; ``explanation``: two or three short
      paragraphs in plain language for the page.
    """

    name: str
    title: str
    story: str
    explanation: str
    run: Callable[..., PitfallResult]
    figures: Callable[[PitfallResult], list]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    kwargs_from_args: Callable[[argparse.Namespace], dict]
    page: PageControls

    @classmethod
    def from_module(cls, module: ModuleType) -> Experiment:
        missing = [n for n in MODULE_NAMES if not hasattr(module, n)]
        if missing:
            raise TypeError(f"{module.__name__} does not define {', '.join(missing)} "
                            "(see bnviz.pitfalls.base.MODULE_NAMES).")
        return cls(name=module.NAME, title=module.TITLE, story=module.STORY,
                   explanation=module.EXPLANATION, run=module.run, figures=module.figures,
                   add_arguments=module.add_arguments,
                   kwargs_from_args=module.kwargs_from_args, page=module.CONTROLS)

    def controls(self, st: Any) -> dict[str, Any]:
        """Draw the page's widgets with ``st`` and return the matching ``run()`` keywords."""
        from .controls import draw_controls

        return draw_controls(st, self.name, self.page)
