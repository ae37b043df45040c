"""Experiment 7: a re-implemented BN with detached statistics: same output, other gradients.

docs/stories.md section 2: someone re-implemented BatchNorm with the batch mean and variance
``.detach()``-ed. The forward output is identical to the native layer's, yet the network did
not learn. The reason is in the backward pass: in train mode the batch mean and variance are
functions of the input, and the true gradient of BN flows through them too. Detaching them
drops those terms, so the gradient that reaches the input (and every layer before it) is
wrong, while the gradients of gamma and beta - which only see the normalised values - are
not affected.

The experiment takes a real BN layer of a real model and its real input (the conv output for
a photo batch, captured with a pre-hook that stops the forward right there), and compares
native ``nn.BatchNorm`` in train mode with manual versions: statistics not detached,
detached, the unbiased ``var()`` the user also used, and both mistakes together.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BnvizError
from ..inspection import logits_of
from ..models import DEFAULT_MODEL, LoadedModel
from ..modes import bn_layers, unknown_layer_error
from .base import PageControls, PhotoInputs, PitfallResult, Widget
from .cli import add_photo_options, photo_kwargs
from .common import DEFAULT_SIZE, prepare_photo, replace_module

__all__ = ["ManualBatchNorm", "NetworkLoss", "RandomWeightsLoss", "capture_bn_input",
           "compare_gradients", "figures", "run", "shift_scale_fraction"]

NAME = "detach"
TITLE = "Detached statistics: same output, wrong gradients"
STORY = ("Re-implemented BN with .detach()ed statistics does not learn (docs/stories.md "
         "section 2)")
EXPLANATION = """\
In train mode BatchNorm normalises with the batch mean and variance, and those are computed
*from the input*. So the true gradient of BN with respect to its input has three parts: the
direct path through `x`, and the paths through the mean and the variance. If a
re-implementation `.detach()`es the statistics, the forward numbers stay identical but the
last two paths vanish. The missing part is exactly the component of the gradient that would
shift or rescale a channel - moves that BN undoes anyway. True BN sends zero gradient in
those directions; the detached version keeps pushing the previous layers there, so they learn
the wrong thing. The gradients of gamma and beta are not affected: they only depend on the
normalised values, which are the same.

By default the loss is the real one: the model's cross-entropy against a class, sent back
through the rest of the network, so the layer receives the gradient training would give it.
The "random" loss `sum(y * r)` uses fixed random weights `r` on the layer alone. A plain
`sum(y)` would be useless: each channel's normalised values always sum to zero, so `sum(y)`
is a constant and the true input gradient is zero (the detached version would still report a
non-zero one). The table also shows the user's second mistake, `var()` (unbiased) instead of
the biased variance BN normalises with: that one changes the forward output itself.
"""


class ManualBatchNorm(nn.Module):
    """The story's re-implementation: the train-mode formula written out by hand.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with per-channel batch statistics
    over (N, *spatial). ``detach_stats`` detaches mean and var (the bug); ``unbiased`` uses
    ``var()`` with Bessel's correction where BN normalises with the biased variance. Like the
    user's version it never updates its running buffers (they are kept, to show that).
    """

    def __init__(self, bn: _BatchNorm, *, detach_stats: bool, unbiased: bool):
        super().__init__()
        self.eps = bn.eps
        self.detach_stats = detach_stats
        self.unbiased = unbiased
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone())
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone())
        for name in ("running_mean", "running_var"):
            buf = getattr(bn, name)
            self.register_buffer(name, None if buf is None else buf.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, correction=1 if self.unbiased else 0, keepdim=True)
        if self.detach_stats:
            mean, var = mean.detach(), var.detach()
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


class _Stop(Exception):
    """Raised by the capture hook: nothing after the chosen layer needs to run."""


def capture_bn_input(module: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The input of BN layer ``layer`` for model input ``x`` (eval mode, no grad).

    The forward stops at the layer (a pre-hook raises), so the rest of the network is not
    run. ``module``'s modes are restored afterwards; pass a module you own.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_m, inp):
        captured["x"] = inp[0].detach().clone()
        raise _Stop

    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    handle = module.get_submodule(layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            module(x)
    except _Stop:
        pass
    finally:
        handle.remove()
        for m, flag in flags:
            m.training = flag
    if "x" not in captured:
        raise BnvizError(f"BN layer {layer!r} was not called during the forward.",
                         "choose a layer that the model's forward uses.")
    return captured["x"]


class RandomWeightsLoss:
    """``loss = sum(y * r)`` with fixed random ``r`` (seeded), on the layer alone.

    A plain ``sum(y)`` would be useless: each channel's normalised values sum to zero
    whatever the input, so ``sum(y) = count * sum(beta)`` is a constant and the true input
    gradient is zero.
    """

    description = "sum(y * r), r ~ N(0, 1) fixed (seeded), on the layer alone"

    def __init__(self, shape: torch.Size, device: torch.device, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.r = torch.randn(shape, generator=gen).to(device)

    def __call__(self, variant: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = variant(x)
        return y, (y * self.r).sum()


class NetworkLoss:
    """Cross-entropy of the real network's logits, with ``variant`` in place of the layer.

    The rest of the network runs in eval mode with frozen parameters (a private copy); a
    pre-hook feeds the variant the given leaf tensor ``x`` (equal to the layer's real input),
    so the gradient that reaches the layer is exactly what training would send it.
    """

    def __init__(self, module: nn.Module, layer: str, model_input: torch.Tensor, label: int):
        self.net = copy.deepcopy(module).eval().requires_grad_(False)
        self.layer = layer
        self.model_input = model_input
        self.label = label
        self.description = f"cross-entropy of the network's logits against class {label}"

    def __call__(self, variant: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def feed(_m, _inp):
            return (x,)

        def keep(_m, _inp, out):
            seen["y"] = out

        replace_module(self.net, self.layer, variant)
        handles = [variant.register_forward_pre_hook(feed), variant.register_forward_hook(keep)]
        try:
            logits = logits_of(self.net(self.model_input))
        finally:
            for h in handles:
                h.remove()
        if logits is None or logits.dim() != 2:
            raise BnvizError("The model output is not a batch of class logits.",
                             "use loss='random', or a classification model.")
        if not 0 <= self.label < logits.shape[1]:
            raise BnvizError(f"Label {self.label} is not a class of this model "
                             f"({logits.shape[1]} classes).",
                             f"pass a label from 0 to {logits.shape[1] - 1}.")
        target = torch.full((logits.shape[0],), self.label, device=logits.device)
        return seen["y"], F.cross_entropy(logits, target)


def _grads(mod: nn.Module, x0: torch.Tensor, loss_fn) -> dict[str, Any]:
    """Forward + backward of ``loss_fn`` for one variant, on a fresh leaf copy of ``x0``."""
    x = x0.clone().requires_grad_(True)
    before = None if mod.running_mean is None else mod.running_mean.clone()
    y, loss = loss_fn(mod, x)
    loss.backward()
    dims = [0, *range(2, x.dim())]
    return {
        "y": y.detach(),
        "loss": float(loss.detach()),
        "x": x.grad.detach(),
        "shift": x.grad.detach().double().sum(dims),
        "weight": None if mod.weight is None else mod.weight.grad.detach(),
        "bias": None if mod.bias is None else mod.bias.grad.detach(),
        "updated": None if before is None else bool((mod.running_mean != before).any()),
    }


def shift_scale_fraction(diff: torch.Tensor, x: torch.Tensor) -> float | None:
    """Share of ``diff``'s norm lying in per-channel span{1, x - mean}: shifts and rescalings.

    Those are the directions BatchNorm undoes (adding a constant to a channel, or scaling its
    centred values, leaves the normalised output unchanged), so the true BN gradient has no
    component there; the difference between a detached and the native gradient should lie
    entirely in this span.
    """
    d = diff.double()
    total = float(d.norm())
    if total == 0.0:
        return None
    dims = [0, *range(2, x.dim())]
    xc = x.double() - x.double().mean(dims, keepdim=True)
    coef = (d * xc).sum(dims, keepdim=True) / (xc * xc).sum(dims, keepdim=True).clamp_min(1e-300)
    proj = d.mean(dims, keepdim=True) + coef * xc
    return float(proj.norm()) / total


def _plain_sum(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = mod(x)
    return y, y.sum()


def _rel(diff: float | None, ref: float | None) -> float | None:
    if diff is None or ref is None:
        return None
    return diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))


def _norm(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.double().norm())


def _native(bn: _BatchNorm) -> nn.Module:
    native = copy.deepcopy(bn).train()
    native.requires_grad_(True)
    return native


VARIANTS = (
    # key, label, code, detach, unbiased
    ("native", "native BatchNorm (train mode)", "bn(x)", None, None),
    ("manual", "manual, statistics not detached",
     "(x - m) / sqrt(v + eps) * w + b", False, False),
    ("detached", "manual, mean/var detached (story 2)",
     "(x - m.detach()) / sqrt(v.detach() + eps) * w + b", True, False),
    ("unbiased", "manual, unbiased var() (story 2)",
     "v = x.var(dims)  # unbiased", False, True),
    ("detached_unbiased", "manual, detached + unbiased var()",
     "both of the above", True, True),
)


def compare_gradients(bn: _BatchNorm, x0: torch.Tensor, loss_fn
                      ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """``(rows, data, arrays)``: every variant of :data:`VARIANTS` against native BN.

    ``loss_fn(variant, x) -> (y, loss)`` (:class:`RandomWeightsLoss` or
    :class:`NetworkLoss`). Besides plain differences, each row has ``shift_grad_norm``: the
    norm over channels of ``sum over (N, H, W) of dL/dx``, the gradient a per-channel bias
    in front of BN would get. True BN ignores any per-channel shift of its input, so for
    native BN it is zero up to rounding; a detached version reports a gradient there.
    """
    results = {}
    for key, _label, _code, detach, unbiased in VARIANTS:
        mod = _native(bn) if detach is None else ManualBatchNorm(
            bn, detach_stats=detach, unbiased=unbiased)
        results[key] = _grads(mod, x0, loss_fn)
    sum_loss = {k: _norm(_grads(_native(bn) if k == "native" else ManualBatchNorm(
        bn, detach_stats=True, unbiased=False), x0, _plain_sum)["x"])
        for k in ("native", "detached")}
    ref = results["native"]
    ref_norms = {k: _norm(ref[k]) for k in ("x", "weight", "bias")}
    rows = []
    for key, label, code, _d, _u in VARIANTS:
        res = results[key]
        row: dict[str, Any] = {"variant": label, "code": code}
        row["forward_max_abs_diff"] = float((res["y"] - ref["y"]).abs().max())
        for k, col in (("x", "input"), ("weight", "gamma"), ("bias", "beta")):
            diff = None if res[k] is None else _norm(res[k] - ref[k])
            row[f"{col}_grad_diff_norm"] = diff
            row[f"{col}_grad_rel_diff"] = _rel(diff, ref_norms[k])
        row["input_grad_change_in_shift_scale_directions"] = (
            None if key == "native" else shift_scale_fraction(res["x"] - ref["x"], x0))
        row["input_grad_norm"] = _norm(res["x"])
        row["shift_grad_norm"] = _norm(res["shift"])
        row["loss"] = res["loss"]
        row["updates_running_stats"] = res["updated"]
        rows.append(row)
    dims = [0, *range(2, x0.dim())]
    data = {
        "loss": loss_fn.description,
        "native_input_grad_norm": ref_norms["x"],
        "native_gamma_grad_norm": ref_norms["weight"],
        "native_beta_grad_norm": ref_norms["bias"],
        "output_max_abs": float(ref["y"].abs().max()),
        "sum_loss_input_grad_norm_native": sum_loss["native"],
        "sum_loss_input_grad_norm_detached": sum_loss["detached"],
    }
    arrays = {
        "channel_input_grad_native": ref["x"].double().pow(2).sum(dims).sqrt().cpu(),
        "channel_input_grad_detached": results["detached"]["x"].double().pow(2).sum(dims)
        .sqrt().cpu(),
        "channel_shift_grad_native": ref["shift"].cpu(),
        "channel_shift_grad_detached": results["detached"]["shift"].cpu(),
    }
    return rows, data, arrays


LOSSES = ("network", "random")


def run(model: str | LoadedModel = DEFAULT_MODEL, weights: Any = "auto",
        layer: str | None = None, photo: str = "chelsea", batch_size: int = 4,
        size: int | None = DEFAULT_SIZE, seed: int = 0, device: str = "auto", loss: str = "network",
        label: int = 281) -> PitfallResult:
    """Native vs manual (not detached / detached / unbiased) BN on a real layer and input.

    ``loss``: "network" (cross-entropy of the model's logits against class ``label``, 281 =
    tabby cat, backpropagated through the rest of the real network) or "random"
    (``sum(y * r)`` on the layer alone).
    """
    if loss not in LOSSES:
        raise BnvizError(f"Unknown loss {loss!r}.", f"choose one of: {', '.join(LOSSES)}.")
    setup = prepare_photo(model, weights, photo, batch_size, size, seed, device)
    module = setup.private_module()
    names = [n for n, _ in bn_layers(module)]
    layer = names[0] if layer is None else layer
    if layer not in names:
        raise unknown_layer_error(layer, names)
    bn = module.get_submodule(layer)
    x0 = capture_bn_input(module, layer, setup.x).float()
    if x0.shape[0] * x0[0, 0].numel() < 2:
        raise BnvizError(f"{layer} gets one value per channel, so batch variance is undefined.",
                         "use a batch size of at least 2 or a larger image size.")
    if loss == "network":
        loss_fn: Any = NetworkLoss(module, layer, setup.x, int(label))
    else:
        loss_fn = RandomWeightsLoss(x0.shape, x0.device, seed)
    rows, data, arrays = compare_gradients(bn, x0, loss_fn)
    data = {**setup.data_fields(), "layer": layer, "layer_input_shape": list(x0.shape),
            "eps": bn.eps, **data}
    by = {key: row for (key, *_), row in zip(VARIANTS, rows)}
    det, man = by["detached"], by["manual"]
    scale = max(data["output_max_abs"], 1e-12)
    man_rel = man["input_grad_rel_diff"] or 0.0
    native_shift = by["native"]["shift_grad_norm"] or 0.0
    reproduced = (det["forward_max_abs_diff"] <= 1e-4 * scale and man_rel < 1e-3
                  and (det["input_grad_rel_diff"] or 0.0) > 10 * man_rel
                  and (det["shift_grad_norm"] or 0.0) > 100 * native_shift)
    verdict = _verdict(setup.label, layer, data, by)
    return PitfallResult(name=NAME, title=TITLE, verdict=verdict, reproduced=reproduced,
                         table=rows, data=data, arrays=arrays, **setup.result_fields())


def _fmt_rel(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _verdict(label: str, layer: str, data: dict, by: dict[str, dict]) -> str:
    native, det, man, unb = by["native"], by["detached"], by["manual"], by["unbiased"]
    parts = [
        f"On {layer} of {label} with its real input {tuple(data['layer_input_shape'])} and "
        f"loss = {data['loss']}: detaching the batch mean and variance leaves the forward "
        f"output the same (max difference {det['forward_max_abs_diff']:.1e}) but changes the "
        f"gradient reaching the input by {det['input_grad_rel_diff']:.1%} of its norm "
        f"({det['input_grad_diff_norm']:.3g} of {data['native_input_grad_norm']:.3g}).",
        f"{det['input_grad_change_in_shift_scale_directions']:.2%} of that change lies in "
        f"directions that only shift or rescale a channel - moves BN undoes, so true BN sends "
        f"no gradient there: the gradient of a per-channel shift of the input is "
        f"{native['shift_grad_norm']:.1e} with native BN but {det['shift_grad_norm']:.3g} "
        f"with detached statistics.",
    ]
    if det["gamma_grad_rel_diff"] is not None:
        ab = max(det["gamma_grad_rel_diff"], det["beta_grad_rel_diff"] or 0.0)
        same = "are unchanged up to rounding" if ab < 1e-4 else "also differ"
        parts.append(f"The gamma/beta gradients {same} (relative difference up to {ab:.1e}): "
                     "they only see the normalised values, which are the same.")
    parts.append(
        f"Without .detach() the manual layer matches native gradients to "
        f"{_fmt_rel(man['input_grad_rel_diff'])} (relative, input). Using the unbiased var() "
        f"changes the output itself by up to {unb['forward_max_abs_diff']:.2e}."
    )
    if native["updates_running_stats"] is not None:
        parts.append(
            f"Native BN {'updated' if native['updates_running_stats'] else 'did not update'} "
            f"its running statistics; the manual versions "
            f"{'did too' if det['updates_running_stats'] else 'never do'}."
        )
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Figures, command line, page controls
# --------------------------------------------------------------------------------------------


def figures(result: PitfallResult) -> list:
    import plotly.graph_objects as go

    rows = result.table[1:]
    if not rows:
        return []
    floor = 1e-16
    fig = go.Figure()
    for col, name in (("input", "input x"), ("gamma", "gamma"), ("beta", "beta")):
        values = [r.get(f"{col}_grad_rel_diff") for r in rows]
        if all(v is None for v in values):
            continue
        fig.add_bar(x=[r["variant"] for r in rows],
                    y=[max(v, floor) if v is not None else None for v in values],
                    name=f"gradient w.r.t. {name}",
                    hovertext=[f"{v:.3e}" if v is not None else "n/a" for v in values])
    fig.add_bar(x=[r["variant"] for r in rows],
                y=[max(r["forward_max_abs_diff"], floor) for r in rows],
                name="forward: max |y - native|")
    fig.update_layout(title="Difference from native BN (log scale; relative for gradients)",
                      barmode="group", yaxis_type="log",
                      yaxis_title=f"difference (floored at {floor:g})")
    figs = [fig]
    arrays = result.arrays
    if "channel_input_grad_native" in arrays:
        native = [float(v) for v in arrays["channel_input_grad_native"]]
        det = [float(v) for v in arrays["channel_input_grad_detached"]]
        channels = list(range(len(native)))
        fig2 = go.Figure([go.Bar(x=channels, y=native, name="native"),
                          go.Bar(x=channels, y=det, name="detached statistics")])
        fig2.update_layout(title=f"{result.data.get('layer')}: norm of the input gradient per "
                                 "channel", barmode="group", xaxis_title="channel",
                           yaxis_title="||dL/dx|| over (N, H, W)")
        figs.append(fig2)
    if "channel_shift_grad_native" in arrays:
        native = [abs(float(v)) for v in arrays["channel_shift_grad_native"]]
        det = [abs(float(v)) for v in arrays["channel_shift_grad_detached"]]
        channels = list(range(len(native)))
        fig3 = go.Figure([go.Bar(x=channels, y=[max(v, floor) for v in native], name="native"),
                          go.Bar(x=channels, y=[max(v, floor) for v in det],
                                 name="detached statistics")])
        fig3.update_layout(title="Gradient of a per-channel shift of the input, |sum of dL/dx| "
                                 "(log scale): BN cancels shifts, so the true value is 0",
                           barmode="group", yaxis_type="log", xaxis_title="channel",
                           yaxis_title=f"|sum over N, H, W| (floored at {floor:g})")
        figs.append(fig3)
    return figs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_photo_options(parser, batch_size=4)
    parser.add_argument("--layer", default=None,
                        help="BN layer to re-implement (default: the first BN layer)")
    parser.add_argument("--loss", default="network", choices=list(LOSSES),
                        help="network: cross-entropy through the rest of the model; random: "
                             "sum(y * r) on the layer alone (default: network)")
    parser.add_argument("--label", type=int, default=281,
                        help="target class of the network loss (default: 281, tabby cat)")


def kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {**photo_kwargs(args), "layer": args.layer or None, "loss": args.loss,
            "label": args.label}


CONTROLS = PageControls(
    PhotoInputs(batch_size=4),
    rows=((
        Widget("layer", "BN layer", "layer"),
        Widget("loss", "Loss", "radio", options=LOSSES),
        Widget("label", "Target class (network loss)", "int", default=281, low=0, high=999),
    ),),
)
