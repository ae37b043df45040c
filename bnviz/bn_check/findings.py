"""The records of a BatchNorm check: one :class:`Finding` per departure, and the report."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

from .causes import CAUSES, fill
from .formula import FORMULA

#: The checks, in the order a report lists them, with their names in words.
CHECKS = {
    "constructor": "constructor",
    "state": "parameters and buffers",
    "forward_train": "forward in train",
    "forward_eval": "forward in eval",
    "running_stats": "running mean/var update",
    "num_batches_tracked": "num_batches_tracked",
    "grad_input": "gradient w.r.t. input",
    "grad_weight": "gradient w.r.t. weight",
    "grad_bias": "gradient w.r.t. bias",
    "affine": "affine=False",
    "track_running_stats": "track_running_stats=False",
    "dtype": "dtype",
    "device": "device",
}

_FORMULA_BY_CHECK = {  # the line a cause breaks depends on where it was seen
    ("forward_eval", "normalise_train"): "normalise_eval",
    ("grad_weight", "grad_input"): "grad_params",
    ("grad_bias", "grad_input"): "grad_params",
}


@dataclass(frozen=True)
class Finding:
    """One way the implementation departs from nn.BatchNorm."""

    check: str  # a key of CHECKS
    cause: str  # a key of bnviz.bn_check.causes.CAUSES
    what: str  # what the implementation does, in plain words
    formula: str  # the line of the BatchNorm formula it breaks
    fix: str
    configs: tuple[str, ...]  # the settings it was seen in ("default", "momentum=None", ...)
    values: dict = field(default_factory=dict)  # the numbers behind it

    @classmethod
    def make(cls, check: str, cause: str, configs, values: dict,
             formula: str | None = None) -> Finding:
        """A finding in words; ``formula`` overrides the cause's own line (a key of
        FORMULA)."""
        spec = CAUSES[cause]
        key = formula or _FORMULA_BY_CHECK.get((check, spec.formula), spec.formula)
        line = FORMULA[key]
        names = str(values.get("name", "")).split(", ")
        if key == "running_mean" and "running_var" in names:
            line = (FORMULA["running_var"] if "running_mean" not in names
                    else f"{line};  {FORMULA['running_var']}")
        return cls(check=check, cause=cause, what=fill(spec.what, values), formula=line,
                   fix=fill(spec.fix, values), configs=tuple(configs), values=dict(values))

    def to_dict(self) -> dict:
        return {"check": self.check, "cause": self.cause, "what": self.what,
                "formula": self.formula, "fix": self.fix, "configs": list(self.configs),
                "values": {k: _json_value(v) for k, v in self.values.items()}}


def merge_names(first: str, second: str) -> str:
    """``"running_mean"`` and ``"running_var"`` -> ``"running_mean, running_var"``."""
    names = list(dict.fromkeys([*first.split(", "), *second.split(", ")]))
    return ", ".join(n for n in names if n)


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


@dataclass
class CheckReport:
    """What :func:`bnviz.check_batchnorm` found: ``ok`` when the implementation behaved
    like the native layer in every check it ran."""

    implementation: str
    reference: str  # e.g. "nn.BatchNorm2d"
    dims: int
    shapes: list[tuple[int, ...]]  # input shapes of the steps
    num_features: int
    eps: float
    momentum: float | None
    steps: int
    device: str
    dtype: str
    configs: list[str]  # settings the candidate was run in
    checks: list[str]  # checks that ran (keys of CHECKS)
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def causes(self) -> set[str]:
        return {f.cause for f in self.findings}

    def by_cause(self, cause: str) -> list[Finding]:
        return [f for f in self.findings if f.cause == cause]

    def to_dict(self) -> dict:
        return {
            "implementation": self.implementation, "reference": self.reference,
            "dims": self.dims, "shapes": [list(s) for s in self.shapes],
            "num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
            "steps": self.steps, "device": self.device, "dtype": self.dtype,
            "configs": list(self.configs), "checks": list(self.checks), "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings], "notes": list(self.notes),
        }

    def __str__(self) -> str:
        shapes = ", ".join(str(tuple(s)) for s in self.shapes)
        head = (f"{self.implementation} against {self.reference} (num_features="
                f"{self.num_features}, eps={self.eps:g}, momentum={self.momentum}; "
                f"{self.steps} training steps and eval on inputs {shapes}; "
                f"{self.device}, {self.dtype})")
        lines = [head]
        if self.ok:
            lines.append(f"No findings: it behaves like {self.reference} in every check.")
        else:
            n = len(self.findings)
            lines.append(f"{n} finding{'s' if n != 1 else ''}:")
            for i, f in enumerate(self.findings, 1):
                lines.append("")
                lines += _wrapped(f"{i}. {CHECKS[f.check]}: {f.what}.", "   ")
                lines.append(f"   breaks: {f.formula}")  # one line: a formula reads whole
                lines += _wrapped(f"fix: {f.fix}.", "   ", first="   ")
                lines.append(f"   seen in: {', '.join(f.configs)}")
        lines.append("")
        lines += _wrapped("Checked: " + ", ".join(CHECKS[c] for c in self.checks) + ".", "  ")
        lines.append("Settings: " + "; ".join(self.configs) + ".")
        for note in self.notes:
            lines += _wrapped(f"Not checked: {note}", "  ")
        return "\n".join(lines)


def _wrapped(text: str, indent: str, first: str = "") -> list[str]:
    return textwrap.wrap(text, width=96, initial_indent=first, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False) or [first]
