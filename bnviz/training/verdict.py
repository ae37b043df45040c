"""The verdict of a Training lab run: plain-language conclusions computed from its numbers.

Nothing is canned: every sentence quotes the run's own accuracies, gradient differences and
running statistics, and says plainly when a variant made no visible difference.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .config import LAYERS

if TYPE_CHECKING:
    from .results import TrainResult

#: Below this many accuracy points, a difference is reported as "no visible difference".
NO_GAP_POINTS = 5.0


def pct(v: float | None) -> str:
    """An accuracy as whole percent, ``"n/a"`` when there is none yet."""
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100.0 * (a - b)


def _signed(points: float | None) -> str:
    return "n/a" if points is None else f"{points:+.0f}"


def verdict_lines(result: TrainResult) -> list[str]:
    """Plain-language conclusions computed from the result's numbers (never canned).

    When detaching the statistics shows no accuracy gap (all gaps under
    :data:`NO_GAP_POINTS`), the verdict says so plainly instead of hiding it.
    """
    if not result.steps_done:
        return ["No training step has run yet."]
    lines: list[str] = []
    finals = {r["variant"]: r for r in result.final_rows()}
    chance = result.chance
    steps = result.steps_done
    if result.status == "stopped":
        lines.append(f"Stopped after {steps} of {result.config.steps} steps: every number "
                     "below is for that point.")
    native = finals.get("native")
    grad = result.gradient
    if native and native["val_acc_eval"] is not None:
        best = max(native["val_acc_eval"], native["val_acc_train"] or 0.0)
        lines.append(
            f"native reached {pct(native['val_acc_eval'])} validation accuracy in eval mode "
            f"({pct(native['val_acc_train'])} in train mode, {pct(native['train_acc'])} on "
            f"its last training batches) after {steps} steps; chance is {pct(chance)}"
            + ("." if best - chance >= 0.15 else ": it has not learned much in this "
               "configuration (try more steps or another learning rate)."))
    manual = finals.get("manual")
    if manual and native and manual["val_acc_eval"] is not None:
        diff = _points(manual["val_acc_eval"], native["val_acc_eval"])
        text = f"manual BN (the core formula) reached {pct(manual['val_acc_eval'])} "
        text += "(n/a" if diff is None else f"({diff:+.1f} points vs native"
        text += ")"
        if grad is not None:
            text += (f"; on one batch its forward matches native to "
                     f"{grad.forward_max_abs_diff['manual']:.1e} and its gradients to a "
                     f"relative {grad.grad_rel_diff['manual']:.1e}, so any accuracy difference "
                     f"is float rounding amplified by {steps} SGD steps")
        lines.append(text + ".")
    detached = finals.get("detached")
    if detached and native and detached["val_acc_eval"] is not None:
        gaps = {
            "in eval-mode val acc": _points(native["val_acc_eval"], detached["val_acc_eval"]),
            "in train-mode val acc": _points(native["val_acc_train"],
                                             detached["val_acc_train"]),
            "on training batches": _points(native["train_acc"], detached["train_acc"]),
        }
        gap_text = ", ".join(f"{_signed(v)} points {k}" for k, v in gaps.items())
        grad_text = ""
        if grad is not None:
            grad_text = (f"the forward is the same (max |Δlogits| "
                         f"{grad.forward_max_abs_diff['detached']:.1e}) but on one batch the "
                         f"gradients differ from native by a relative "
                         f"{grad.grad_rel_diff['detached']:.2f} (cosine similarity "
                         f"{grad.grad_cosine['detached']:.2f})")
        if all(v is not None and abs(v) < NO_GAP_POINTS for v in gaps.values()):
            lines.append("In this configuration detaching the statistics made no visible "
                         f"difference in accuracy (native minus detached: {gap_text})"
                         + (f"; {grad_text}." if grad_text else "."))
        else:
            text = (f"native reached {pct(native['val_acc_eval'])} val acc, detached "
                    f"{pct(detached['val_acc_eval'])} (native minus detached: {gap_text})")
            lines.append(text + (f": {grad_text}." if grad_text else "."))
        hn, hd = result.histories["native"], result.histories["detached"]
        if hn.conv_weight_norm and hd.conv_weight_norm:
            lines.append(f"Conv weight norm after {steps} steps: native "
                         f"{hn.conv_weight_norm[-1]:.3g}, detached {hd.conv_weight_norm[-1]:.3g} "
                         f"(both started at {_norm0(result):.3g}).")
    frozen = finals.get("frozen")
    hist = result.histories.get("frozen")
    if frozen and hist and hist.running_change:
        change = max(hist.running_change)
        text = (f"frozen BN (eval mode throughout): its running statistics changed by "
                f"{'exactly 0' if change == 0.0 else f'{change:.3g}'} in {steps} steps while "
                f"its BN weight/bias moved by up to {hist.affine_change[-1]:.3g}")
        if _initial_stats_are_defaults(result):
            text += ("; normalising with the initial running statistics (mean 0, variance 1) "
                     "is no normalisation at all")
        text += f", and it reached {pct(frozen['val_acc_eval'])}"
        if native and native["val_acc_eval"] is not None:
            text += f" (native {pct(native['val_acc_eval'])})"
        lines.append(text + ".")
    study = result.momentum_rows()
    if study and study[0]["val_acc_train"] is not None:
        parts = [f"momentum {r['momentum']} {pct(r['val_acc_eval'])} "
                 f"(gap {_signed(_points(r['val_acc_train'], r['val_acc_eval']))} points)"
                 for r in study]
        text = (f"Batch size {result.config.batch_size}: the native network's train-mode "
                f"validation accuracy is {pct(study[0]['val_acc_train'])}; in eval mode with "
                f"the running statistics of " + ", ".join(parts))
        lagging = [r for r in study if r["running_mean_lag"] is not None]
        if len(lagging) > 1:
            worst = max(lagging, key=lambda r: r["running_mean_lag"])
            best = min(lagging, key=lambda r: r["running_mean_lag"])
            text += (f". Over the last steps the running mean of {result.config.layer} sits "
                     f"furthest from the batch means with momentum {worst['momentum']} (mean "
                     f"|running − batch| {worst['running_mean_lag']:.3g}) and closest with "
                     f"momentum {best['momentum']} ({best['running_mean_lag']:.3g})")
        lines.append(text + ".")
    return lines


def _norm0(result: TrainResult) -> float:
    state = result.initial_state
    return math.sqrt(sum(float(state[f"conv{i}.weight"].double().pow(2).sum())
                         for i in (1, 2, 3)))


def _initial_stats_are_defaults(result: TrainResult) -> bool:
    state = result.initial_state
    return all(bool((state[f"{n}.running_mean"] == 0).all())
               and bool((state[f"{n}.running_var"] == 1).all()) for n in LAYERS)
