"""The Training lab's tables: a run's final numbers and its gradient check as data frames.

Pure functions of a :class:`TrainResult` with the column names the page shows; how each
column is formatted (percent, scientific) is the page's business.
"""

from __future__ import annotations

import pandas as pd

from .config import VARIANT_DESCRIPTIONS
from .results import TrainResult


def final_frame(result: TrainResult) -> pd.DataFrame:
    """One row per variant: what it is, final loss, accuracies and the train − eval gap
    (in points)."""
    rows = [{"variant": r["variant"], "what it is": VARIANT_DESCRIPTIONS[r["variant"]],
             f"loss (mean of last {result.window} steps)": r["loss"],
             "train-batch acc": r["train_acc"], "val acc, eval mode": r["val_acc_eval"],
             "val acc, train mode": r["val_acc_train"],
             "train − eval (points)": None if r["train_minus_eval"] is None
             else 100 * r["train_minus_eval"]} for r in result.final_rows()]
    return pd.DataFrame(rows)


def gradient_frame(result: TrainResult) -> pd.DataFrame | None:
    """The gradient check's rows (one per parameter, and the input image); None when the
    run had no gradient check."""
    if result.gradient is None:
        return None
    return pd.DataFrame(result.gradient.rows).rename(columns={
        "native_norm": "‖grad‖ native", "manual_max_abs_diff": "manual: max |Δ|",
        "manual_rel_diff": "manual: relative Δ", "detached_max_abs_diff": "detached: max |Δ|",
        "detached_rel_diff": "detached: relative Δ"})


__all__ = ["final_frame", "gradient_frame"]
