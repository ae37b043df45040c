"""Training lab: watch BatchNorm's statistics learn, live (USER_STORIES.md sections 2 and 5).

One small CNN (conv-BN-ReLU three times, then a linear layer) is trained on generated
images (:mod:`bnviz.training_data`) four times side by side, from the *same* initial
weights and on the *same* batches, with four kinds of BatchNorm:

``native``
    ``nn.BatchNorm2d``, the reference.
``manual``
    :class:`ManualBatchNorm2d`: the core formula of :mod:`bnviz.manual_bn` (batch mean and
    *biased* variance over (N, H, W) for the normalisation, *unbiased* variance for the
    running update, ``momentum=None`` as a cumulative average). Same forward and same
    gradients as native, up to float rounding, so it learns the same.
``detached``
    The same module with the batch mean and variance ``.detach()``-ed: the forward output is
    bit-for-bit the manual one, but no gradient flows through the statistics. This is the
    "mathematically identical re-implementation that does not learn" of story 2.
``frozen``
    ``nn.BatchNorm2d`` kept in ``eval()`` the whole time (``bn.eval()`` after every
    ``model.train()``): it normalises with its running statistics, which therefore never
    change, while weight and bias still train. From scratch those statistics are the initial
    mean 0 / variance 1, so the layer is a plain per-channel affine map.

While the native network trains, every input of its BatchNorm layers is also fed (without
gradient) to extra ``nn.BatchNorm2d`` layers built with the momenta under study (0.1, 0.01,
None by default). In train mode the running statistics never influence the forward, so the
network trains exactly as it would with any of these momenta; the extra layers therefore
give, from PyTorch itself and at almost no cost, the running statistics each momentum would
have produced, next to the batch statistics of every step, and the eval-mode accuracy each
would give.

Entry points: :func:`train_lab` (headless, with ``on_update``/``should_stop`` hooks for
live charts and a Stop button), :class:`TrainingJob` (``train_lab`` in a background thread
with consistent snapshots, what the dashboard page uses), :func:`gradient_check` and the
``bnviz train`` CLI subcommand (:func:`register_cli`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .devices import resolve_device
from .errors import BnvizError
from .manual_bn import (
    batch_stats,
    manual_batch_norm,
    manual_running_update,
    running_update_factor,
)
from .serialize import json_safe
from .training_data import CLASS_NAMES, Dataset, DataSpec, batch_order, make_dataset

VARIANTS = ("native", "manual", "detached", "frozen")
VARIANT_DESCRIPTIONS = {
    "native": "nn.BatchNorm2d (reference)",
    "manual": "the core formula by hand (bnviz.manual_bn)",
    "detached": "manual formula with batch mean/var .detach()-ed",
    "frozen": "nn.BatchNorm2d kept in eval mode (running stats)",
}
LAYERS = ("bn1", "bn2", "bn3")
DEFAULT_MOMENTA: tuple[float | None, ...] = (0.1, 0.01, None)
#: Below this many accuracy points, a difference is reported as "no visible difference".
NO_GAP_POINTS = 5.0
SGD_MOMENTUM = 0.9
#: Train-mode validation accuracy uses at most this many validation batches.
TRAIN_MODE_VAL_BATCHES = 64


class TrainConfigError(BnvizError):
    """An option of the Training lab that is out of range or unknown."""


def momentum_label(momentum: float | None) -> str:
    """``0.1`` -> ``"0.1"``, ``None`` -> ``"None"`` (dictionary keys, legends, JSON)."""
    return "None" if momentum is None else f"{momentum:g}"


def parse_momenta(text: str | Sequence[float | str | None]) -> tuple[float | None, ...]:
    """``"0.1,0.01,none"`` (or a sequence) -> ``(0.1, 0.01, None)``; validated, de-duplicated."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[float | None] = []
    for item in items:
        if isinstance(item, str):
            word = item.strip().lower()
            if not word:
                continue
            if word in ("none", "null", "cumulative"):
                value: float | None = None
            else:
                try:
                    value = float(word)
                except ValueError:
                    raise TrainConfigError(
                        f"Momentum {item.strip()!r} is not a number.",
                        "give numbers in [0, 1] or 'none' (cumulative average), "
                        "e.g. 0.1,0.01,none.",
                    ) from None
        else:
            value = None if item is None else float(item)
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise TrainConfigError(f"Momentum {value!r} is outside [0, 1].",
                                   "use a momentum between 0 and 1, or 'none'.")
        if value not in out:
            out.append(value)
    return tuple(out)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a Training lab run (same config + seed -> same numbers).

    ``layer`` and ``channels`` choose which running-statistics traces :meth:`TrainResult.
    to_dict` and the CLI report; the result keeps every channel of every layer, so the page
    can switch channels without retraining. ``threads`` is the number of CPU threads torch
    may use *while this run trains* (restored afterwards); see :func:`torch_threads`.
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 0.02
    seed: int = 0
    variants: tuple[str, ...] = VARIANTS
    momenta: tuple[float | None, ...] = DEFAULT_MOMENTA
    layer: str = "bn2"
    channels: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 25
    device: str = "auto"
    image_size: int = 16
    n_train: int = 1536
    n_val: int = 384
    noise: float = 0.25
    widths: tuple[int, int, int] = (8, 16, 32)
    threads: int | None = 1

    def validated(self) -> TrainConfig:
        """A normalised copy, or :class:`TrainConfigError` naming the bad option and the fix."""
        steps = _int_in("steps", self.steps, 1, 100_000)
        widths = tuple(_int_in("width", w, 1, 512) for w in self.widths)
        if len(widths) != 3:
            raise TrainConfigError(f"widths needs 3 numbers, got {len(widths)}.",
                                   "give one width per conv layer, e.g. (8, 16, 32).")
        n_train = _int_in("n_train", self.n_train, 2, 200_000)
        n_val = _int_in("n_val", self.n_val, 1, 100_000)
        batch_size = _int_in("batch size", self.batch_size, 2, n_train)
        lr = float(self.lr) if isinstance(self.lr, int | float) else math.nan
        if not (math.isfinite(lr) and 0.0 < lr <= 10.0):
            raise TrainConfigError(f"Learning rate {self.lr!r} is not in (0, 10].",
                                   "use a positive learning rate such as 0.05.")
        seed = _int_in("seed", self.seed, 0, 2**63 - 1)
        variants = []
        for v in (self.variants,) if isinstance(self.variants, str) else self.variants:
            name = str(v).strip().lower()
            if name not in VARIANTS:
                raise TrainConfigError(f"Unknown BatchNorm variant {v!r}.",
                                       f"choose from: {', '.join(VARIANTS)}.")
            if name not in variants:
                variants.append(name)
        if not variants:
            raise TrainConfigError("No BatchNorm variant selected.",
                                   f"select at least one of: {', '.join(VARIANTS)}.")
        momenta = parse_momenta(self.momenta)
        if self.layer not in LAYERS:
            raise TrainConfigError(f"Unknown BatchNorm layer {self.layer!r}.",
                                   f"choose one of: {', '.join(LAYERS)}.")
        width = widths[LAYERS.index(self.layer)]
        channels = []
        for c in self.channels:
            c = _int_in("channel", c, 0, width - 1,
                        fix=f"{self.layer} has channels 0 to {width - 1}.")
            if c not in channels:
                channels.append(c)
        if not channels:
            raise TrainConfigError("No channel selected.", "pick at least one channel, e.g. 0.")
        eval_every = _int_in("eval_every", self.eval_every, 1, 100_000)
        image_size = _int_in("image size", self.image_size, 8, 64)
        noise = float(self.noise)
        if not (math.isfinite(noise) and 0.0 <= noise <= 2.0):
            raise TrainConfigError(f"Noise {self.noise!r} is outside [0, 2].",
                                   "use a pixel-noise standard deviation such as 0.25.")
        threads = None if self.threads is None else _int_in("threads", self.threads, 1, 256)
        resolve_device(self.device)
        return replace(self, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                       variants=tuple(variants), momenta=momenta, channels=tuple(channels),
                       eval_every=eval_every, image_size=image_size, n_train=n_train,
                       n_val=n_val, noise=noise, widths=widths, threads=threads)

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(size=self.image_size, n_train=self.n_train, n_val=self.n_val,
                        noise=self.noise)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = list(self.variants)
        d["momenta"] = [momentum_label(m) for m in self.momenta]
        d["channels"] = list(self.channels)
        d["widths"] = list(self.widths)
        return d


def _int_in(what: str, value: object, lo: int, hi: int, *, fix: str | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or not lo <= value <= hi:  # type: ignore[operator]
        raise TrainConfigError(f"{what} must be an integer from {lo} to {hi}, got {value!r}.",
                               fix or f"pass a {what} between {lo} and {hi}.")
    return int(value)  # type: ignore[arg-type]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Let torch use ``n`` CPU threads inside the block, then restore the previous count.

    Why 1 by default: the lab's tensors are tiny, so a second thread gains little, but an
    OpenMP team that has to wait for a core taken by another process or another dashboard
    session spins and stalls (on a busy 2-core machine we measured 110 ms per step with 2
    threads against 7 ms with 1). One thread per run lets concurrent sessions share the
    cores instead of fighting over them. ``torch.set_num_threads`` is process-wide state,
    so it is always put back, even when the run is interrupted.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# BatchNorm variants and the model
# --------------------------------------------------------------------------------------


class ManualBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d written with :mod:`bnviz.manual_bn` (autograd differentiates the formula).

    Train mode: per-channel batch mean and biased variance over (N, H, W) normalise ``x``;
    then, without gradient, ``num_batches_tracked += 1`` and the running statistics move by
    ``factor = momentum`` (or ``1 / num_batches_tracked`` for ``momentum=None``) towards the
    batch mean and the *unbiased* batch variance. Eval mode: the running statistics.

    ``detach_stats=True`` detaches the batch mean and variance before normalising: the
    output is unchanged, but the gradient no longer contains the terms that flow through the
    statistics (the ones that remove the gradient's per-channel mean and its component along
    the normalised activation).
    """

    def __init__(self, num_features: int, *, detach_stats: bool = False, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        self.detach_stats = detach_stats

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_stats={self.detach_stats}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or self.running_mean is None
        if not use_batch:
            return manual_batch_norm(x, self.running_mean, self.running_var, self.weight,
                                     self.bias, self.eps)
        stats = batch_stats(x)
        mean, var = stats.mean, stats.var
        if self.detach_stats:
            mean, var = mean.detach(), var.detach()
        if self.training and self.track_running_stats and self.running_mean is not None:
            if stats.var_unbiased is None:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {tuple(x.shape)}")
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = running_update_factor(self.momentum, int(self.num_batches_tracked))
                new_mean, new_var = manual_running_update(
                    self.running_mean, self.running_var, stats.mean.detach(),
                    stats.var_unbiased.detach(), factor)
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
        return manual_batch_norm(x, mean, var, self.weight, self.bias, self.eps)


def make_bn(variant: str, num_features: int, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    if variant in ("native", "frozen"):
        return nn.BatchNorm2d(num_features, momentum=momentum)
    if variant in ("manual", "detached"):
        return ManualBatchNorm2d(num_features, momentum=momentum,
                                 detach_stats=variant == "detached")
    raise TrainConfigError(f"Unknown BatchNorm variant {variant!r}.",
                           f"choose from: {', '.join(VARIANTS)}.")


class SmallCNN(nn.Module):
    """conv-BN-ReLU-maxpool, conv-BN-ReLU-maxpool, conv-BN-ReLU, global average pool, linear.

    Convolutions have no bias (BatchNorm's own bias replaces it, as in most CNNs). The
    BatchNorm layers are named ``bn1``, ``bn2``, ``bn3``.
    """

    def __init__(self, variant: str = "native", widths: Sequence[int] = (8, 16, 32),
                 num_classes: int = len(CLASS_NAMES), in_channels: int = 1):
        super().__init__()
        c1, c2, c3 = widths
        self.variant = variant
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = make_bn(variant, c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = make_bn(variant, c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = make_bn(variant, c3)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))

    def bn_layers(self) -> list[tuple[str, nn.BatchNorm2d]]:
        return [(name, getattr(self, name)) for name in LAYERS]

    def set_training(self, training: bool) -> SmallCNN:
        """``train(training)``, then ``bn.eval()`` on every BN layer for the frozen variant."""
        self.train(training)
        if self.variant == "frozen":
            for _, bn in self.bn_layers():
                bn.eval()
        return self


def initial_state(seed: int, widths: Sequence[int] = (8, 16, 32),
                  num_classes: int = len(CLASS_NAMES)) -> dict[str, torch.Tensor]:
    """PyTorch's default initialisation, drawn from a seeded generator (not the global RNG).

    Every variant starts from this same state dict, so their curves differ only because of
    their BatchNorm. Conv and linear weights: ``kaiming_uniform_(a=sqrt(5))`` as in
    ``reset_parameters``; linear bias uniform in ±1/sqrt(fan_in); BN weight 1, bias 0,
    running mean 0, running var 1.
    """
    g = torch.Generator().manual_seed(int(seed) + 2)
    model = SmallCNN("native", widths, num_classes)
    with torch.no_grad():
        for module in (model.conv1, model.conv2, model.conv3, model.fc):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=g)
        bound = 1.0 / math.sqrt(model.fc.in_features)
        model.fc.bias.uniform_(-bound, bound, generator=g)
    return {k: v.clone() for k, v in model.state_dict().items()}


def build_model(variant: str, state: dict[str, torch.Tensor], widths: Sequence[int] = (8, 16, 32),
                num_classes: int = len(CLASS_NAMES), device: torch.device | str = "cpu",
                ) -> SmallCNN:
    model = SmallCNN(variant, widths, num_classes)
    model.load_state_dict(state)
    return model.to(device)


# --------------------------------------------------------------------------------------
# Gradient check
# --------------------------------------------------------------------------------------


@dataclass
class GradientCheck:
    """Native vs manual vs detached on one batch, from identical weights.

    ``rows``: one per parameter (and one for the input image), with the gradient norm of
    native and, for manual and detached, the max absolute difference from native and the
    relative difference ``||g - g_native|| / ||g_native||``. ``forward_max_abs_diff``:
    max |logits - native logits|. ``grad_rel_diff``: the whole parameter gradient vector's
    relative difference; ``grad_cosine``: its cosine similarity with native.
    """

    batch_size: int
    loss: dict[str, float]
    forward_max_abs_diff: dict[str, float]
    grad_rel_diff: dict[str, float]
    grad_cosine: dict[str, float]
    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def gradient_check(config: TrainConfig | None = None, *, state: dict | None = None,
                   x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                   ) -> GradientCheck:
    """One forward + backward of native, manual and detached on the run's first batch.

    Defaults: the initial weights and the first training batch of ``config`` (its seed),
    i.e. exactly what step 1 of :func:`train_lab` computes. ``state``/``x``/``y`` override.
    Each model runs on its own copy, in train mode (batch statistics), in float32.
    """
    cfg = (config or TrainConfig()).validated()
    device = resolve_device(cfg.device)
    if x is None or y is None:
        data = make_dataset(cfg.seed, cfg.data_spec)
        idx = batch_order(cfg.n_train, cfg.batch_size, 1, cfg.seed)[0]
        x, y = data.x_train[idx], data.y_train[idx]
    state = state if state is not None else initial_state(cfg.seed, cfg.widths)
    x, y = x.to(device), y.to(device)
    outputs: dict[str, dict[str, Any]] = {}
    for variant in ("native", "manual", "detached"):
        model = build_model(variant, state, cfg.widths, device=device).set_training(True)
        xi = x.clone().requires_grad_(True)
        logits = model(xi)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        grads["input image"] = xi.grad.detach().clone()
        outputs[variant] = {"logits": logits.detach(), "loss": loss.item(), "grads": grads}
    ref = outputs["native"]
    names = list(ref["grads"])
    rows = []
    for name in names:
        g0 = ref["grads"][name].double()
        row: dict[str, Any] = {"parameter": name, "native_norm": float(g0.norm())}
        for variant in ("manual", "detached"):
            g = outputs[variant]["grads"][name].double()
            diff = g - g0
            row[f"{variant}_max_abs_diff"] = float(diff.abs().max())
            row[f"{variant}_rel_diff"] = float(diff.norm() / g0.norm().clamp_min(1e-30))
        rows.append(row)
    param_names = [n for n in names if n != "input image"]
    flat0 = torch.cat([ref["grads"][n].double().flatten() for n in param_names])
    rel, cos, fwd, losses = {}, {}, {}, {"native": ref["loss"]}
    for variant in ("manual", "detached"):
        flat = torch.cat([outputs[variant]["grads"][n].double().flatten() for n in param_names])
        rel[variant] = float((flat - flat0).norm() / flat0.norm().clamp_min(1e-30))
        cos[variant] = float(F.cosine_similarity(flat, flat0, dim=0))
        fwd[variant] = float((outputs[variant]["logits"] - ref["logits"]).abs().max())
        losses[variant] = outputs[variant]["loss"]
    return GradientCheck(batch_size=int(x.shape[0]), loss=losses, forward_max_abs_diff=fwd,
                         grad_rel_diff=rel, grad_cosine=cos, rows=rows)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class VariantHistory:
    """Curves of one variant. Per step: loss and accuracy of the training batch (the model
    in its training mode). Per evaluation point (``eval_step``): validation accuracy in eval
    mode (running statistics) and in train mode (each BN normalises with the statistics of
    a validation batch of ``batch_size`` images, on a copy so no running statistic changes;
    the first ``TRAIN_MODE_VAL_BATCHES * batch_size`` validation images), the L2 norm of all
    conv weights, and how far the running statistics and the BN affine parameters have moved
    from their initial values (max absolute change over all BN layers)."""

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

    def window(self, n: int) -> slice:
        return slice(max(0, len(self.loss) - n), len(self.loss))

    def final(self, window: int) -> dict[str, Any]:
        """Final numbers; loss and train accuracy averaged over the last ``window`` steps
        (single batches are noisy), validation from the last evaluation point."""
        sl = self.window(window)
        losses, accs = self.loss[sl], self.train_acc[sl]
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
    """One BN layer of the native network, every step: the batch statistics of its input
    and the running statistics after that step's update, for each studied momentum (from
    ``nn.BatchNorm2d`` layers fed the same input). Lists of ``(C,)`` float32 CPU tensors."""

    layer: str
    num_features: int
    batch_mean: list[torch.Tensor] = field(default_factory=list)
    batch_var: list[torch.Tensor] = field(default_factory=list)
    batch_var_unbiased: list[torch.Tensor] = field(default_factory=list)
    running_mean: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    running_var: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def stacked(self, which: str, momentum: str | None = None) -> torch.Tensor:
        """``(steps, C)`` tensor of ``batch_mean``/``batch_var``/``batch_var_unbiased`` or of
        ``running_mean``/``running_var`` for the momentum label ``momentum``."""
        seq = getattr(self, which) if momentum is None else getattr(self, which)[momentum]
        if not seq:
            return torch.empty(0, self.num_features)
        return torch.stack(seq)


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
            "histories": {k: asdict(h) for k, h in self.histories.items()},
            "momentum": momentum,
            "gradient_check": None if self.gradient is None else self.gradient.to_dict(),
            "verdict": self.verdict,
        })


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


# --------------------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
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
            f"native reached {_pct(native['val_acc_eval'])} validation accuracy in eval mode "
            f"({_pct(native['val_acc_train'])} in train mode, {_pct(native['train_acc'])} on "
            f"its last training batches) after {steps} steps; chance is {_pct(chance)}"
            + ("." if best - chance >= 0.15 else ": it has not learned much in this "
               "configuration (try more steps or another learning rate)."))
    manual = finals.get("manual")
    if manual and native and manual["val_acc_eval"] is not None:
        diff = _points(manual["val_acc_eval"], native["val_acc_eval"])
        text = f"manual BN (the core formula) reached {_pct(manual['val_acc_eval'])} "
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
            text = (f"native reached {_pct(native['val_acc_eval'])} val acc, detached "
                    f"{_pct(detached['val_acc_eval'])} (native minus detached: {gap_text})")
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
        text += f", and it reached {_pct(frozen['val_acc_eval'])}"
        if native and native["val_acc_eval"] is not None:
            text += f" (native {_pct(native['val_acc_eval'])})"
        lines.append(text + ".")
    study = result.momentum_rows()
    if study and study[0]["val_acc_train"] is not None:
        parts = [f"momentum {r['momentum']} {_pct(r['val_acc_eval'])} "
                 f"(gap {_signed(_points(r['val_acc_train'], r['val_acc_eval']))} points)"
                 for r in study]
        text = (f"Batch size {result.config.batch_size}: the native network's train-mode "
                f"validation accuracy is {_pct(study[0]['val_acc_train'])}; in eval mode with "
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


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------


class _MomentumStudy:
    """Forward hooks on the native network's BN layers that feed each train-mode input to
    one extra ``nn.BatchNorm2d`` per studied momentum and record the statistics."""

    def __init__(self, model: SmallCNN, momenta: Sequence[float | None],
                 traces: dict[str, LayerTrace], device: torch.device):
        self.labels = [momentum_label(m) for m in momenta]
        self.shadows: dict[str, dict[str, nn.BatchNorm2d]] = {}
        self.traces = traces
        self.handles = []
        for name, bn in model.bn_layers():
            self.shadows[name] = {
                momentum_label(m): nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=m,
                                                  affine=False).to(device).train()
                for m in momenta}
            trace = LayerTrace(name, bn.num_features)
            for label in self.labels:
                trace.running_mean[label] = []
                trace.running_var[label] = []
            traces[name] = trace
            self.handles.append(bn.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not module.training:
                return
            x = inputs[0].detach()
            stats = batch_stats(x)
            trace = self.traces[name]
            trace.batch_mean.append(stats.mean.float().cpu())
            trace.batch_var.append(stats.var.float().cpu())
            trace.batch_var_unbiased.append(stats.var_unbiased.float().cpu())
            with torch.no_grad():
                for label, shadow in self.shadows[name].items():
                    shadow(x)
                    trace.running_mean[label].append(shadow.running_mean.detach().cpu().clone())
                    trace.running_var[label].append(shadow.running_var.detach().cpu().clone())
        return hook

    def load_into(self, model: SmallCNN, label: str) -> None:
        """Copy the running statistics of momentum ``label`` into ``model``'s BN layers."""
        with torch.no_grad():
            for name, bn in model.bn_layers():
                shadow = self.shadows[name][label]
                bn.running_mean.copy_(shadow.running_mean)
                bn.running_var.copy_(shadow.running_var)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


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
    study = (_MomentumStudy(models["native"], cfg.momenta, result.traces, device)
             if study_needed else None)
    stopped = False
    # Train-mode accuracy costs one forward per validation batch of ``batch_size`` images;
    # for tiny batch sizes only the first TRAIN_MODE_VAL_BATCHES batches are used.
    n_train_mode = min(data.x_val.shape[0], TRAIN_MODE_VAL_BATCHES * cfg.batch_size)
    x_val_train, y_val_train = data.x_val[:n_train_mode], data.y_val[:n_train_mode]

    def evaluate(step: int) -> None:
        for v in names:
            model, probe, hist = models[v], probes[v], histories[v]
            probe.load_state_dict(model.state_dict())
            hist.eval_step.append(step)
            hist.val_acc_eval.append(_accuracy(probe.set_training(False), data.x_val,
                                               data.y_val, 512))
            probe.load_state_dict(model.state_dict())
            probe.train()  # every BN, the frozen one too: batch statistics of the val batch
            hist.val_acc_train.append(_accuracy(probe, x_val_train, y_val_train, cfg.batch_size))
            hist.conv_weight_norm.append(_conv_weight_norm(model))
            hist.running_change.append(_bn_change(model, state, ("running_mean",
                                                                 "running_var")))
            hist.affine_change.append(_bn_change(model, state, ("weight", "bias")))
        if study is not None:
            probe = probes["native"]
            result.momentum_eval_step.append(step)
            for label in study.labels:
                probe.load_state_dict(models["native"].state_dict())
                study.load_into(probe, label)
                result.momentum_val_acc_eval.setdefault(label, []).append(
                    _accuracy(probe.set_training(False), data.x_val, data.y_val, 512))

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
                hist.step.append(step)
                hist.loss.append(loss.item())
                hist.train_acc.append(float((logits.argmax(1) == y).float().mean()))
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
        n = min(result.window, len(h.loss))
        loss = sum(h.loss[-n:]) / n
        val = h.val_acc_eval[-1] if h.val_acc_eval else None
        parts.append(f"{v} loss {loss:.3f} val {_pct(val)}")
    return (f"step {result.steps_done}/{result.config.steps} "
            f"({result.elapsed_s:.1f} s): " + " | ".join(parts))


class TrainingJob:
    """:func:`train_lab` in a background thread, for user interfaces.

    The dashboard starts one job per browser session and keeps drawing while it trains:
    ``latest`` is a consistent :meth:`TrainResult.snapshot` taken at every update (so the
    UI thread never reads lists that are being appended to), ``stop()`` makes the run end
    at its next step through ``should_stop`` (it then evaluates once more and is marked
    stopped), ``result``/``error`` hold the outcome. The thread is a daemon and trains with
    ``config.threads`` torch threads, so jobs of several sessions share the CPU instead of
    blocking each other.
    """

    def __init__(self, config: TrainConfig):
        self.config = config.validated()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: TrainResult | None = None
        self.version = 0
        self.result: TrainResult | None = None
        self.error: Exception | None = None
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._work, name="bnviz-training", daemon=True)

    def start(self) -> TrainingJob:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def _publish(self, result: TrainResult) -> None:
        snap = result.snapshot()
        with self._lock:
            self._latest = snap
            self.version += 1

    def _work(self) -> None:
        try:
            self.result = train_lab(self.config, on_update=self._publish,
                                    should_stop=self._stop.is_set)
        except Exception as exc:  # reported by the UI; the thread must not die silently
            self.error = exc

    @property
    def latest(self) -> TrainResult | None:
        with self._lock:
            return self._latest

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has finished."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


# --------------------------------------------------------------------------------------
# CLI: bnviz train
# --------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise TrainConfigError(f"{what} {text!r} is not a comma-separated list of integers.",
                               f"write e.g. --{what} 0,1,2.") from None


def register_cli(subparsers: Any) -> None:
    """Add ``bnviz train`` to the main parser's subcommands."""
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a small CNN with native/manual/detached/frozen BN side by side",
        description="Train a small CNN on generated images with four kinds of BatchNorm from "
                    "the same weights and batches, record loss/accuracy curves and running vs "
                    "batch statistics for several momenta, and print a verdict.")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--variants", default=",".join(d.variants),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--momenta", default="0.1,0.01,none",
                   help="momenta for the running-statistics study ('none' = cumulative)")
    p.add_argument("--layer", default=d.layer, help=f"one of {', '.join(LAYERS)}")
    p.add_argument("--channels", default=",".join(map(str, d.channels)),
                   help="channels of --layer to report")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads torch uses while training (restored afterwards)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_train)


def config_from_args(args: Any) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        variants=tuple(_csv(args.variants)), momenta=parse_momenta(args.momenta),
        layer=args.layer, channels=_int_list(args.channels, "channels"),
        eval_every=args.eval_every, device=args.device, image_size=args.image_size,
        threads=args.threads).validated()


def cmd_train(args: Any) -> int:
    from .cli import _write_json, format_table

    cfg = config_from_args(args)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    result = train_lab(cfg, log=log)
    if args.json:
        _write_json(result.to_dict(), args.json)
        if args.json == "-":
            return 0
    print(f"device: {result.device}  steps: {result.steps_done}  batch size: {cfg.batch_size}  "
          f"lr: {cfg.lr:g}  seed: {cfg.seed}  time: {result.elapsed_s:.1f} s")
    rows = [{"variant": r["variant"], f"loss (last {result.window})": r["loss"],
             "train acc": r["train_acc"], "val acc eval-mode": r["val_acc_eval"],
             "val acc train-mode": r["val_acc_train"]} for r in result.final_rows()]
    print(format_table(rows))
    study = result.momentum_rows()
    if study:
        print()
        print(format_table([{"momentum": r["momentum"], "val acc eval-mode": r["val_acc_eval"],
                             "val acc train-mode": r["val_acc_train"],
                             f"|running - batch| mean ({cfg.layer})": r["running_mean_lag"]}
                            for r in study]))
    if result.gradient is not None:
        g = result.gradient
        print()
        print("gradient check (one batch, identical weights): " + "; ".join(
            f"{v}: forward diff {g.forward_max_abs_diff[v]:.1e}, gradient rel diff "
            f"{g.grad_rel_diff[v]:.2e}" for v in g.grad_rel_diff))
    print()
    for line in result.verdict:
        print(f"- {line}")
    return 0


__all__ = [
    "DEFAULT_MOMENTA",
    "LAYERS",
    "VARIANTS",
    "GradientCheck",
    "LayerTrace",
    "ManualBatchNorm2d",
    "SmallCNN",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainingJob",
    "VariantHistory",
    "build_model",
    "gradient_check",
    "initial_state",
    "momentum_label",
    "parse_momenta",
    "register_cli",
    "torch_threads",
    "train_lab",
]
