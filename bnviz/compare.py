"""How two inspections differ, layer by layer: train vs eval, before vs after fine-tuning,
model A vs model B, CPU vs CUDA.

::

    train = bnviz.inspect(model, x, modes="train")
    eval_ = bnviz.inspect(model, x, modes="eval")
    diff = bnviz.compare(train, eval_, labels=("train", "eval"))
    diff[["layer", "stats_used_train", "stats_used_eval", "used_mean_rel", "output_diff"]]
    diff.attrs["predictions"]          # top-1 agreement, largest probability difference

Layers are matched by label (the module name, ``name#k`` for the k-th call of a module
called more than once). Every number is computed here from the two reports' own tensors,
in float64.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch

from .errors import BnvizError
from .inspection import InspectionReport, LayerReport

#: The per-channel quantities compared, each as ``<name>_diff`` (max |a - b|) and
#: ``<name>_rel`` (that divided by the largest magnitude in either report), with how each is
#: read from a :class:`LayerReport`.
VECTORS: tuple[tuple[str, str], ...] = (
    ("used_mean", "used_mean"),  # what BN normalised with: batch or running, as each used
    ("used_var", "used_var"),
    ("batch_mean", "batch_mean"),
    ("batch_var", "batch_var"),  # biased, as BN normalises with it
    ("running_mean", "running_mean_before"),  # the model's buffers, as eval reads them
    ("running_var", "running_var_before"),
    ("running_mean_after", "running_mean_after"),  # after this forward's update
    ("running_var_after", "running_var_after"),
    ("weight", "weight"),
    ("bias", "bias"),
)
#: The activation-sized tensors compared where both reports kept them.
TENSORS: tuple[tuple[str, str], ...] = (("input", "input"), ("output", "output"))


def compare(a: InspectionReport, b: InspectionReport, *,
            labels: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """A per-layer DataFrame of how reports ``a`` and ``b`` differ.

    One row per layer label, in ``a``'s forward order, then the layers only ``b`` has.
    Columns: ``layer``, ``found_in`` ("both", or the label of the only report that has it),
    ``type``, ``channels``, ``mode_<label>`` and ``stats_used_<label>`` for each report,
    ``same_stats``; for each quantity in :data:`VECTORS` and :data:`TENSORS`
    (``used_mean``, ``batch_var``, ``running_mean``, ..., ``output``): ``<q>_diff`` = max
    |a - b| and ``<q>_rel`` = ``<q>_diff`` / max(max |a|, max |b|) (0 when both are 0),
    NaN where a report lacks it (no running statistics, tensors not kept, other shapes);
    ``note`` says why a value is missing.

    ``frame.attrs``: ``labels``, ``models``, ``devices``, ``unmatched`` (label -> layers
    only that report has) and ``predictions`` (:func:`prediction_summary`, or None when
    they cannot be compared).
    """
    la, lb = _check(a, b, labels)
    by_b = {layer.label: layer for layer in b.layers}
    in_a = {layer.label for layer in a.layers}
    rows = [_row(layer, by_b.get(layer.label), la, lb) for layer in a.layers]
    rows += [_row(None, layer, la, lb) for layer in b.layers if layer.label not in in_a]
    frame = pd.DataFrame(rows, columns=_columns(la, lb))
    frame["channels"] = frame["channels"].astype("Int64")
    frame.attrs.update(
        labels=[la, lb], models={la: a.model, lb: b.model}, devices={la: a.device, lb: b.device},
        unmatched={la: [n for n in a.layer_names if n not in by_b],
                   lb: [n for n in b.layer_names if n not in in_a]},
        predictions=prediction_summary(a, b, labels=(la, lb)))
    return frame


def compare_predictions(a: InspectionReport, b: InspectionReport, *,
                        labels: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Per image: each report's top-1 class and probability, whether they agree, the
    probability each gives the other's top-1 class, and ``max_prob_diff``, the largest
    |p_a - p_b| over the classes both reports list in their top-k (NaN when none is in
    both; inspect with ``top_k`` = the number of classes to compare every class). Both
    reports need predictions of the same number of images."""
    la, lb = _check(a, b, labels)
    problem = _predictions_problem(a, b, la, lb)
    if problem:
        raise BnvizError(problem, "compare reports of classifiers run on the same batch size.")
    rows = []
    for i, (pa, pb) in enumerate(zip(a.predictions, b.predictions)):
        prob_a = {p.index: p.probability for p in pa}
        prob_b = {p.index: p.probability for p in pb}
        shared = prob_a.keys() & prob_b.keys()
        rows.append({
            "image": i,
            f"top1_{la}": pa[0].label, f"top1_{lb}": pb[0].label,
            "agree": pa[0].index == pb[0].index,
            f"p_top1_{la}": pa[0].probability, f"p_top1_{lb}": pb[0].probability,
            # the probability each gives the other's top-1 (NaN: not in its top-k)
            f"p_{la}_of_top1_{lb}": prob_a.get(pb[0].index, math.nan),
            f"p_{lb}_of_top1_{la}": prob_b.get(pa[0].index, math.nan),
            "max_prob_diff": max((abs(prob_a[c] - prob_b[c]) for c in shared),
                                 default=math.nan),
        })
    return pd.DataFrame(rows)


def prediction_summary(a: InspectionReport, b: InspectionReport, *,
                       labels: tuple[str, str] = ("a", "b")) -> dict[str, Any] | None:
    """``{"images", "top1_agreement" (fraction of images with the same top-1 class),
    "max_prob_diff" (see :func:`compare_predictions`)}``, or None when the reports'
    predictions cannot be compared (a model without class scores, other batch sizes)."""
    la, lb = _check(a, b, labels)
    if _predictions_problem(a, b, la, lb):
        return None
    table = compare_predictions(a, b, labels=(la, lb))
    diffs = table["max_prob_diff"].dropna()
    return {"images": len(table), "top1_agreement": float(table["agree"].mean()),
            "max_prob_diff": float(diffs.max()) if len(diffs) else math.nan}


# -- one row ----------------------------------------------------------------------------------


def _columns(la: str, lb: str) -> list[str]:
    cols = ["layer", "found_in", "type", "channels", f"mode_{la}", f"mode_{lb}",
            f"stats_used_{la}", f"stats_used_{lb}", "same_stats"]
    for name, _ in (*VECTORS, *TENSORS):
        cols += [f"{name}_diff", f"{name}_rel"]
    return [*cols, "note"]


def _row(x: LayerReport | None, y: LayerReport | None, la: str, lb: str) -> dict[str, Any]:
    one = x if x is not None else y
    row: dict[str, Any] = {
        "layer": one.label, "found_in": "both" if x is not None and y is not None
        else la if x is not None else lb,
        "type": one.type, "channels": one.num_features,
        f"mode_{la}": None if x is None else x.mode, f"mode_{lb}": None if y is None else y.mode,
        f"stats_used_{la}": None if x is None else x.stats_used,
        f"stats_used_{lb}": None if y is None else y.stats_used,
        "same_stats": None if x is None or y is None else x.stats_used == y.stats_used,
    }
    notes: list[str] = []
    if x is None or y is None:
        notes.append(f"only in {row['found_in']}")
    else:
        if x.type != y.type:
            row["type"] = f"{x.type} / {y.type}"
        if x.num_features != y.num_features:
            row["channels"] = None
            notes.append(f"{x.num_features} channels in {la}, {y.num_features} in {lb}")
    comparable = x is not None and y is not None and x.num_features == y.num_features
    absent: dict[str, list[str]] = {la: [], lb: []}
    for name, attr in VECTORS:
        va = None if x is None else getattr(x, attr)
        vb = None if y is None else getattr(y, attr)
        row[f"{name}_diff"], row[f"{name}_rel"] = _diffs(va, vb) if comparable else _NONE
        if comparable and (va is None) != (vb is None):
            absent[la if va is None else lb].append(name)
    notes += [f"no {_absent_words(names)} in {side}" for side, names in absent.items() if names]
    for name, attr in TENSORS:
        va = None if x is None else getattr(x, attr)
        vb = None if y is None else getattr(y, attr)
        row[f"{name}_diff"], row[f"{name}_rel"] = _diffs(va, vb) if comparable else _NONE
        if not comparable:
            continue
        if va is None or vb is None:
            missing = [lab for lab, v in ((la, va), (lb, vb)) if v is None]
            notes.append(f"{name} not kept in {' and '.join(missing)}")
        elif va.shape != vb.shape:
            notes.append(f"{name} shapes differ ({_shape(va)} in {la}, {_shape(vb)} in {lb})")
    row["note"] = "; ".join(notes)
    return row


_NONE = (math.nan, math.nan)


def _diffs(a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[float, float]:
    """(max |a - b|, that / max(max |a|, max |b|)) in float64; NaN when either is missing
    or the shapes differ."""
    if a is None or b is None or a.shape != b.shape or a.numel() == 0:
        return _NONE
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    diff = float((a64 - b64).abs().max())
    scale = max(float(a64.abs().max()), float(b64.abs().max()))
    if scale == 0.0:
        return diff, 0.0
    return diff, diff / scale


def _absent_words(names: list[str]) -> str:
    """What one report lacks, in words: its running statistics, its affine parameters."""
    words = []
    if any(n.startswith("running") for n in names):
        words.append("running statistics")
    if "weight" in names or "bias" in names:
        words.append("affine weight and bias")
    words += [n for n in names if not n.startswith("running") and n not in ("weight", "bias")]
    return ", ".join(words)


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape)


def _check(a, b, labels) -> tuple[str, str]:
    for name, r in (("a", a), ("b", b)):
        if not isinstance(r, InspectionReport):
            raise BnvizError(f"compare() needs two InspectionReports; {name} is a "
                             f"{type(r).__name__}.", "pass the results of bnviz.inspect(...).")
    if isinstance(labels, str) or len(labels) != 2 \
            or not all(isinstance(s, str) and s.strip() for s in labels) \
            or labels[0] == labels[1]:
        raise BnvizError(f"Invalid labels {labels!r}.",
                         'pass two different non-empty names, e.g. labels=("train", "eval").')
    return labels[0], labels[1]


def _predictions_problem(a: InspectionReport, b: InspectionReport, la: str, lb: str) -> str:
    for lab, r in ((la, a), (lb, b)):
        if r.predictions is None:
            return f"Report {lab} ({r.model}) has no predictions (its output is not class scores)."
    if len(a.predictions) != len(b.predictions):
        return (f"The reports have predictions for {len(a.predictions)} ({la}) and "
                f"{len(b.predictions)} ({lb}) images.")
    return ""
