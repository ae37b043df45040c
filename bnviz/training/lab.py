"""The Training lab's run: every BatchNorm variant trained side by side, evaluated as it goes.

:func:`train_lab` trains one :class:`~bnviz.training.model.SmallCNN` per variant from the
*same* initial weights on the *same* batches, so their curves differ only because of their
BatchNorm; the native network also drives the momentum study
(:mod:`bnviz.training.momentum_study`). ``on_update``/``should_stop`` hooks serve live
charts and a Stop button; same config -> identical numbers. However many steps it trains,
a run keeps a bounded number of points of each curve (:mod:`bnviz.training.thinning`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..devices import resolve_device
from .config import TrainConfig
from .data import Dataset, batch_order, make_dataset
from .gradients import gradient_check
from .model import SmallCNN, build_model, initial_state
from .momentum_study import MomentumStudy
from .results import TrainResult, VariantHistory
from .thinning import Thinning
from .threads import torch_threads
from .verdict import pct

SGD_MOMENTUM = 0.9
#: Train-mode validation accuracy uses at most this many validation batches.
TRAIN_MODE_VAL_BATCHES = 64


@torch.no_grad()
def _accuracy(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    correct = 0
    for i in range(0, x.shape[0], chunk):
        correct += int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum())
    return correct / x.shape[0]


def _conv_weight_norm(model: SmallCNN) -> float:
    sq = sum(float(m.weight.detach().double().pow(2).sum())
             for m in (model.conv1, model.conv2, model.conv3))
    return math.sqrt(sq)


def _bn_change(model: SmallCNN, start: dict[str, torch.Tensor], keys: Sequence[str]) -> float:
    state = model.state_dict()
    out = 0.0
    for name, _ in model.bn_layers():
        for key in keys:
            diff = (state[f"{name}.{key}"].detach().cpu() - start[f"{name}.{key}"]).abs()
            out = max(out, float(diff.max()))
    return out


def train_lab(config: TrainConfig | None = None, *,
              on_update: Callable[[TrainResult], None] | None = None,
              should_stop: Callable[[], bool] | None = None,
              log: Callable[[str], None] | None = None) -> TrainResult:
    """Train every variant of ``config`` side by side and return the curves and verdict.

    ``on_update(result)`` is called after every evaluation point (every ``eval_every``
    steps) and at the end with the result *so far* (the same object, growing);
    ``should_stop()`` is polled every step and ends the run early (``status="stopped"``,
    with a final evaluation at the step reached). Same config -> identical numbers.
    """
    cfg = (config or TrainConfig()).validated()
    device = resolve_device(cfg.device)
    start_time = time.perf_counter()
    with torch_threads(cfg.threads if device.type == "cpu" else None):
        data = make_dataset(cfg.seed, cfg.data_spec).to(device)
        order = batch_order(cfg.n_train, cfg.batch_size, cfg.steps, cfg.seed).to(device)
        state = initial_state(cfg.seed, cfg.widths, data.num_classes)
        result = TrainResult(config=cfg, device=str(device), classes=data.class_names,
                             histories={v: VariantHistory(v) for v in cfg.variants},
                             traces={}, initial_state=state)
        if "native" in cfg.variants and any(v in cfg.variants for v in ("manual", "detached")):
            first = order[0]
            result.gradient = gradient_check(cfg, state=state, x=data.x_train[first],
                                             y=data.y_train[first])
        _run(cfg, device, data, order, state, result, on_update, should_stop, log,
             start_time)
    return result


def _run(cfg: TrainConfig, device: torch.device, data: Dataset, order: torch.Tensor,
         state: dict[str, torch.Tensor], result: TrainResult,
         on_update: Callable | None, should_stop: Callable | None, log: Callable | None,
         start_time: float) -> None:
    names = list(cfg.variants)
    study_needed = bool(cfg.momenta)
    if study_needed and "native" not in names:
        names.append("native")  # trained for the momentum study only, not reported
        result.study_history = VariantHistory("native")
    models = {v: build_model(v, state, cfg.widths, data.num_classes, device) for v in names}
    # One probe network per variant: evaluation copies the weights in, so the trained
    # network's running statistics are never touched by an evaluation forward.
    probes = {v: build_model(v, state, cfg.widths, data.num_classes, device) for v in names}
    optims = {v: torch.optim.SGD(models[v].parameters(), lr=cfg.lr, momentum=SGD_MOMENTUM)
              for v in names}
    histories = {v: result.histories.get(v) or result.study_history for v in names}
    # Each curve keeps at most cfg.curve_points points (evenly spaced, the latest always).
    per_step = {v: Thinning(cfg.curve_points) for v in names}
    per_eval = {v: Thinning(cfg.curve_points) for v in names}
    momentum_eval = Thinning(cfg.curve_points)
    study = (MomentumStudy(models["native"], cfg.momenta, result.traces, device,
                           cfg.curve_points) if study_needed else None)
    stopped = False
    # Train-mode accuracy costs one forward per validation batch of ``batch_size`` images;
    # for tiny batch sizes only the first TRAIN_MODE_VAL_BATCHES batches are used.
    n_train_mode = min(data.x_val.shape[0], TRAIN_MODE_VAL_BATCHES * cfg.batch_size)
    x_val_train, y_val_train = data.x_val[:n_train_mode], data.y_val[:n_train_mode]

    def evaluate(step: int) -> None:
        for v in names:
            model, probe, hist = models[v], probes[v], histories[v]
            probe.load_state_dict(model.state_dict())
            acc_eval = _accuracy(probe.set_training(False), data.x_val, data.y_val, 512)
            probe.load_state_dict(model.state_dict())
            probe.train()  # every BN, the frozen one too: batch statistics of the val batch
            acc_train = _accuracy(probe, x_val_train, y_val_train, cfg.batch_size)
            per_eval[v].record([
                (hist.eval_step, step), (hist.val_acc_eval, acc_eval),
                (hist.val_acc_train, acc_train),
                (hist.conv_weight_norm, _conv_weight_norm(model)),
                (hist.running_change, _bn_change(model, state, ("running_mean",
                                                                "running_var"))),
                (hist.affine_change, _bn_change(model, state, ("weight", "bias")))])
        if study is not None:
            probe = probes["native"]
            columns: list[tuple[list, object]] = [(result.momentum_eval_step, step)]
            for label in study.labels:
                probe.load_state_dict(models["native"].state_dict())
                study.load_into(probe, label)
                columns.append((result.momentum_val_acc_eval.setdefault(label, []),
                                _accuracy(probe.set_training(False), data.x_val, data.y_val,
                                          512)))
            momentum_eval.record(columns)

    try:
        for step in range(1, cfg.steps + 1):
            if should_stop is not None and should_stop():
                stopped = True
                break
            idx = order[step - 1]
            x, y = data.x_train[idx], data.y_train[idx]
            for v in names:
                model = models[v].set_training(True)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optims[v].zero_grad(set_to_none=True)
                loss.backward()
                optims[v].step()
                hist = histories[v]
                loss_value = loss.item()
                acc = float((logits.argmax(1) == y).float().mean())
                per_step[v].record([(hist.step, step), (hist.loss, loss_value),
                                    (hist.train_acc, acc)])
                hist.record_recent(loss_value, acc, cfg.eval_every)
            result.steps_done = step
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluate(step)
                result.elapsed_s = time.perf_counter() - start_time
                if log is not None:
                    log(_progress_line(result))
                if on_update is not None and step != cfg.steps:
                    on_update(result)
        if stopped and result.steps_done and (
                not histories[names[0]].eval_step
                or histories[names[0]].eval_step[-1] != result.steps_done):
            evaluate(result.steps_done)
    finally:
        if study is not None:
            study.remove()
    result.final_state = {v: {k: t.detach().cpu().clone() for k, t in models[v].state_dict()
                              .items()} for v in cfg.variants}
    result.status = "stopped" if stopped else "finished"
    result.elapsed_s = time.perf_counter() - start_time
    if on_update is not None:
        on_update(result)


def _progress_line(result: TrainResult) -> str:
    parts = []
    for v, h in result.histories.items():
        n = min(result.window, len(h.recent_loss))
        loss = sum(h.recent_loss[-n:]) / n
        val = h.val_acc_eval[-1] if h.val_acc_eval else None
        parts.append(f"{v} loss {loss:.3f} val {pct(val)}")
    return (f"step {result.steps_done}/{result.config.steps} "
            f"({result.elapsed_s:.1f} s): " + " | ".join(parts))
