"""Gradient check: native, manual and detached BatchNorm on one batch from identical weights.

The manual variant must match native up to float rounding in both the forward and the
gradients; the detached one gives the same forward but different gradients for everything
before the last BatchNorm. This is exactly what step 1 of a run computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..devices import resolve_device
from ..serialize import json_safe
from .config import TrainConfig
from .data import batch_order, make_dataset
from .model import build_model, initial_state


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
