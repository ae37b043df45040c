"""What a Training lab run records: per-variant curves, per-layer statistics traces, and
the :class:`TrainResult` that holds them with its summaries (final rows, momentum rows,
JSON) and thread-safe snapshots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch

from ..serialize import json_safe
from .config import TrainConfig
from .gradients import GradientCheck
from .verdict import verdict_lines


@dataclass
class VariantHistory:
    """Curves of one variant. Per step: loss and accuracy of the training batch (the model
    in its training mode). Per evaluation point (``eval_step``): validation accuracy in eval
    mode (running statistics) and in train mode (each BN normalises with the statistics of
    a validation batch of ``batch_size`` images, on a copy so no running statistic changes;
    at most :data:`~bnviz.training.lab.TRAIN_MODE_VAL_BATCHES` such batches), the L2 norm
    of all conv weights, and how far the running statistics and the BN affine parameters
    have moved from their initial values (max absolute change over all BN layers).

    A long run keeps a bounded number of points of each curve
    (:mod:`~bnviz.training.thinning`, ``TrainConfig.curve_points``); ``recent_loss`` and
    ``recent_train_acc`` keep every one of the last steps, for the final averages."""

    variant: str
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    val_acc_eval: list[float] = field(default_factory=list)
    val_acc_train: list[float] = field(default_factory=list)
    conv_weight_norm: list[float] = field(default_factory=list)
    running_change: list[float] = field(default_factory=list)
    affine_change: list[float] = field(default_factory=list)
    recent_loss: list[float] = field(default_factory=list)
    recent_train_acc: list[float] = field(default_factory=list)

    def record_recent(self, loss: float, train_acc: float, keep: int) -> None:
        """Remember this step's loss and accuracy among at least the last ``keep`` steps
        (at most ``2 * keep``: trimmed in blocks, so a step costs O(1))."""
        self.recent_loss.append(loss)
        self.recent_train_acc.append(train_acc)
        if len(self.recent_loss) > 2 * keep:
            del self.recent_loss[:-keep], self.recent_train_acc[:-keep]

    def final(self, window: int) -> dict[str, Any]:
        """Final numbers; loss and train accuracy averaged over the last ``window`` steps
        (single batches are noisy), validation from the last evaluation point."""
        losses, accs = self.recent_loss[-window:], self.recent_train_acc[-window:]
        ev = self.val_acc_eval[-1] if self.val_acc_eval else None
        tr = self.val_acc_train[-1] if self.val_acc_train else None
        return {
            "variant": self.variant,
            "loss": sum(losses) / len(losses) if losses else None,
            "train_acc": sum(accs) / len(accs) if accs else None,
            "val_acc_eval": ev,
            "val_acc_train": tr,
            "train_minus_eval": None if ev is None or tr is None else tr - ev,
        }


@dataclass
class LayerTrace:
    """One BN layer of the native network, at each kept ``step`` (every step of a short
    run, evenly spaced ones of a long run): the batch statistics of its input and the
    running statistics after that step's update, for each studied momentum (from
    ``nn.BatchNorm2d`` layers fed the same input). One tuple of ``C`` floats (float32
    values) per kept step; :meth:`stacked` gives a tensor."""

    layer: str
    num_features: int
    step: list[int] = field(default_factory=list)
    batch_mean: list[tuple[float, ...]] = field(default_factory=list)
    batch_var: list[tuple[float, ...]] = field(default_factory=list)
    batch_var_unbiased: list[tuple[float, ...]] = field(default_factory=list)
    running_mean: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)
    running_var: dict[str, list[tuple[float, ...]]] = field(default_factory=dict)

    def stacked(self, which: str, momentum: str | None = None) -> torch.Tensor:
        """``(kept steps, C)`` tensor of ``batch_mean``/``batch_var``/``batch_var_unbiased`` or of
        ``running_mean``/``running_var`` for the momentum label ``momentum``."""
        seq = getattr(self, which) if momentum is None else getattr(self, which)[momentum]
        if not seq:
            return torch.empty(0, self.num_features)
        return torch.tensor(seq, dtype=torch.float32)


@dataclass
class TrainResult:
    """What a Training lab run produced (possibly partial: see ``status``)."""

    config: TrainConfig
    device: str
    classes: tuple[str, ...]
    histories: dict[str, VariantHistory]
    traces: dict[str, LayerTrace]
    momentum_eval_step: list[int] = field(default_factory=list)
    momentum_val_acc_eval: dict[str, list[float]] = field(default_factory=dict)
    gradient: GradientCheck | None = None
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)
    final_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    steps_done: int = 0
    status: str = "running"  # "running" | "finished" | "stopped"
    elapsed_s: float = 0.0
    #: the native network's curves when it was trained only for the momentum study
    study_history: VariantHistory | None = None

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    @property
    def stopped(self) -> bool:
        return self.status == "stopped"

    @property
    def window(self) -> int:
        """Steps averaged for the final loss / train accuracy."""
        return max(1, min(self.config.eval_every, self.steps_done))

    def final_rows(self) -> list[dict[str, Any]]:
        return [h.final(self.window) for h in self.histories.values()]

    def momentum_rows(self) -> list[dict[str, Any]]:
        """Per studied momentum: final eval-mode accuracy (its running statistics), the
        train-mode accuracy (batch statistics, the same for every momentum) and how far the
        running mean of ``config.layer`` sits from the batch means over the last steps."""
        trace = self.traces.get(self.config.layer)
        native = self._study_history()
        rows = []
        for label, accs in self.momentum_val_acc_eval.items():
            lag = None
            if trace is not None and trace.batch_mean:
                n = max(1, len(trace.batch_mean) // 5)
                rm = trace.stacked("running_mean", label)[-n:]
                bm = trace.stacked("batch_mean")[-n:]
                lag = float((rm - bm).abs().mean())
            ev = accs[-1] if accs else None
            tr = native.val_acc_train[-1] if native and native.val_acc_train else None
            rows.append({"momentum": label, "val_acc_eval": ev, "val_acc_train": tr,
                         "train_minus_eval": None if ev is None or tr is None else tr - ev,
                         "running_mean_lag": lag})
        return rows

    def _study_history(self) -> VariantHistory | None:
        return self.histories.get("native") or self.study_history

    @property
    def verdict(self) -> list[str]:
        return verdict_lines(self)

    def snapshot(self) -> TrainResult:
        """A copy whose lists and dicts no longer grow, safe to read from another thread
        while this run goes on (the recorded tensors themselves are never modified)."""
        return _copy_containers(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (traces only for ``config.layer`` / ``config.channels``)."""
        cfg = self.config
        trace = self.traces.get(cfg.layer)
        momentum: dict[str, Any] = {"layer": cfg.layer, "channels": list(cfg.channels),
                                    "eval_step": self.momentum_eval_step,
                                    "val_acc_eval": self.momentum_val_acc_eval,
                                    "summary": self.momentum_rows()}
        if trace is not None:
            ch = list(cfg.channels)
            momentum["step"] = trace.step
            momentum["batch_mean"] = trace.stacked("batch_mean")[:, ch]
            momentum["batch_var"] = trace.stacked("batch_var")[:, ch]
            momentum["batch_var_unbiased"] = trace.stacked("batch_var_unbiased")[:, ch]
            momentum["running_mean"] = {m: trace.stacked("running_mean", m)[:, ch]
                                        for m in trace.running_mean}
            momentum["running_var"] = {m: trace.stacked("running_var", m)[:, ch]
                                       for m in trace.running_var}
        return json_safe({
            "config": cfg.to_dict(),
            "device": self.device,
            "status": self.status,
            "steps_done": self.steps_done,
            "elapsed_s": self.elapsed_s,
            "classes": list(self.classes),
            "chance": self.chance,
            "final_window_steps": self.window,
            "final": self.final_rows(),
            "histories": {k: _curves(h) for k, h in self.histories.items()},
            "momentum": momentum,
            "gradient_check": None if self.gradient is None else self.gradient.to_dict(),
            "verdict": self.verdict,
        })


def _curves(history: VariantHistory) -> dict[str, Any]:
    """A history's curves for JSON (the recent steps are in the final rows already)."""
    d = asdict(history)
    del d["recent_loss"], d["recent_train_acc"]
    return d


def _copy_containers(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type) and not isinstance(
            obj, TrainConfig | GradientCheck):
        return replace(obj, **{f.name: _copy_containers(getattr(obj, f.name))
                               for f in fields(obj) if f.init})
    if isinstance(obj, list):
        return [_copy_containers(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _copy_containers(v) for k, v in obj.items()}
    return obj
