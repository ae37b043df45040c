"""The shape every pitfall experiment shares (so the CLI and the page can be generic)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..serialize import json_safe


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


@dataclass
class Experiment:
    """One pitfall experiment: function, CLI options, figures and page text.

    * ``run(**kwargs) -> PitfallResult``: every keyword has a sensible default.
    * ``add_arguments(parser)``: CLI options (all optional) for ``bnviz pitfalls <name>``.
    * ``kwargs_from_args(namespace) -> dict``: CLI namespace -> ``run`` keywords.
    * ``figures(result) -> list[plotly Figure]``: pure, built from the result only.
    * ``controls(st) -> dict``: draws the page's widgets, returns ``run`` keywords
      (optional; the page falls back to defaults).
    * ``explanation``: two or three short paragraphs in plain language for the page.
    """

    name: str
    title: str
    story: str
    explanation: str
    run: Callable[..., PitfallResult]
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    kwargs_from_args: Callable[[argparse.Namespace], dict] = lambda args: {}
    figures: Callable[[PitfallResult], list] = lambda result: []
    controls: Callable[[Any], dict] | None = None


REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    REGISTRY[experiment.name] = experiment
    return experiment
