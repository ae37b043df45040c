"""Experiment 2: forward hooks and in-place ReLU.

docs/stories.md section 1: a forward hook on a BatchNorm layer stored ``output`` (a
reference). The next operation, ``ReLU(inplace=True)``, overwrote that very tensor, so at
the end of the forward the stored "BN output" had every negative value replaced by 0.
``output.clone()`` in the hook, or a forward *pre*-hook on the ReLU module, captures the
true value.

The experiment hooks a private copy of a real network whose ReLUs are in place: ResNet18
(``nn.ReLU(inplace=True)`` modules) or GoogLeNet (``F.relu(x, inplace=True)`` called inside
``BasicConv2d.forward``, so there is no ReLU module to pre-hook). In one forward it
captures the layer's output four ways -- a reference, a clone, a pre-hook on the following
activation module when there is one, and a pre-hook on the next module otherwise -- and
compares each with the true BN output, recomputed by calling the layer on its own captured
input. Which module "follows" is observed, not assumed: it is the first module whose input
is the BN output tensor object itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..chart_style import MASK_TITLE
from ..devices import resolve_device
from ..errors import LayerError
from ..modes import bn_layers, unknown_layer_error
from .base import PageControls, PitfallResult, StimulusInputs
from .cli import add_stimulus_options, stimulus_kwargs
from .common import load_experiment_model, make_batch
from .figures import grouped_bars, heatmaps

__all__ = ["ACTIVATION_MODULES", "figures", "run"]

NAME = "inplace-relu"
TITLE = "Hooks and in-place ReLU"
STORY = (
    "A forward hook on GoogLeNet's first BatchNorm stored the layer's output, and its values "
    "disagreed with the same layer computed by hand: every negative value had become 0 "
    "(docs/stories.md section 1)."
)
EXPLANATION = (
    "A forward hook receives the output tensor *itself*. If it stores that reference, "
    "whatever later modifies the tensor in place modifies the stored value too. In "
    "ResNet (`nn.ReLU(inplace=True)`) and GoogLeNet (`F.relu(x, inplace=True)`) the very "
    "next operation is an in-place ReLU, so by the end of the forward the stored \"BN "
    "output\" is the ReLU output: exactly the negative values were replaced by 0.\n\n"
    "Take `output.clone()` inside the hook, or register a forward *pre*-hook on the ReLU "
    "module (it sees the value before the ReLU runs). When the ReLU is functional "
    "(GoogLeNet), there is no module to pre-hook: clone."
)

#: Module types that count as "the activation following a BN layer".
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.SiLU, nn.Hardswish,
                      nn.ELU, nn.GELU, nn.Mish, nn.SELU, nn.CELU, nn.PReLU, nn.RReLU)
#: The models the page offers (with and without in-place activations).
MODELS = ("resnet18", "googlenet", "resnet50", "densenet121", "mobilenet_v2", "vgg11_bn",
          "efficientnet_lite0")


def _stats_row(method: str, captured: torch.Tensor | None, true: torch.Tensor,
               note: str) -> dict[str, Any]:
    if captured is None:
        return {"method": method, "available": False, "equals_true_output": None,
                "changed_fraction": None, "max_abs_diff": None, "min_value": None,
                "negative_fraction": None, "note": note}
    changed = captured != true
    return {
        "method": method,
        "available": True,
        "equals_true_output": not bool(changed.any()),
        "changed_fraction": float(changed.double().mean()),
        "max_abs_diff": float((captured.double() - true.double()).abs().max()),
        "min_value": float(captured.min()),
        "negative_fraction": float((captured < 0).double().mean()),
        "note": note,
    }


def run(
    model: Any = "resnet18",
    weights: Any = "auto",
    layer: str | None = None,
    stimulus: str = "image:chelsea",
    composition: str = "different",
    batch_size: int = 2,
    size: int = 112,
    seed: int = 0,
    device: str = "auto",
    channel: int | None = None,
) -> PitfallResult:
    """Capture ``layer``'s output by reference, by clone and with pre-hooks; compare.

    The model runs in eval mode (the phenomenon is the same in train mode). ``channel``
    picks the map shown in the figures; by default the channel whose overwritten fraction
    is closest to one half (both maps then show structure).
    """
    dev = resolve_device(device)
    loaded = load_experiment_model(model, weights)
    module = loaded.module.to(dev).eval()
    bns = dict(bn_layers(module))
    if not bns:
        raise LayerError(f"{loaded.name} has no BatchNorm layers.",
                         "pick a model with BatchNorm and in-place ReLUs, e.g. resnet18.")
    layer = next(iter(bns)) if layer is None else layer
    if layer not in bns:
        raise unknown_layer_error(layer, list(bns))
    bn = bns[layer]
    _, x = make_batch(loaded, stimulus, batch_size=batch_size, size=size,
                      composition=composition, seed=seed)
    x = x.to(dev)

    names = {id(m): n for n, m in module.named_modules()}
    seen: dict[str, Any] = {}

    def bn_pre(mod, args):
        seen["input"] = args[0].detach().clone()

    def bn_hook(mod, args, output):
        seen["reference"] = output  # what a hook that keeps a reference stores
        seen["clone"] = output.detach().clone()
        seen["ref_obj"] = output

    def any_pre(mod, args):
        ref = seen.get("ref_obj")
        if ref is None or "next" in seen or mod is bn:
            return
        if args and args[0] is ref:
            seen["next"] = names[id(mod)]
            seen["next_type"] = type(mod).__name__
            seen["next_is_activation"] = isinstance(mod, ACTIVATION_MODULES)
            seen["next_inplace"] = bool(getattr(mod, "inplace", False))
            seen["pre_hook"] = args[0].detach().clone()

    handles = [bn.register_forward_pre_hook(bn_pre), bn.register_forward_hook(bn_hook)]
    handles += [m.register_forward_pre_hook(any_pre) for m in module.modules()
                if m is not module and m is not bn]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    seen.pop("ref_obj", None)
    with torch.no_grad():
        true = bn(seen["input"])  # the BN output recomputed from its own input

    reference, clone = seen["reference"].detach().cpu(), seen["clone"].cpu()
    true = true.cpu()
    next_name = seen.get("next")
    is_act = bool(seen.get("next_is_activation"))
    parent = layer.rpartition(".")[0]
    parent_type = type(module.get_submodule(parent)).__name__ if parent else type(module).__name__

    rows = [
        _stats_row("forward hook keeping a reference (out = output)", reference, true,
                   "what the hook's stored tensor holds at the end of the forward"),
        _stats_row("forward hook with output.clone()", clone, true,
                   "a copy taken inside the hook, before anything else ran"),
    ]
    act_desc = "-"
    if next_name is not None and is_act:
        act_desc = f"{seen['next_type']} module '{next_name}'"
        rows.append(_stats_row(
            f"forward pre-hook on the following {seen['next_type']} ('{next_name}')",
            seen["pre_hook"].cpu(), true,
            f"inplace={seen['next_inplace']}: the pre-hook runs before the activation"))
    else:
        rows.append(_stats_row(
            "forward pre-hook on the following activation module", None, true,
            "no activation module receives the BN output: the activation is functional "
            f"code (e.g. F.relu inside {parent_type}.forward), which cannot be hooked"))
        if next_name is not None:
            rows.append(_stats_row(
                f"forward pre-hook on the next module, {seen['next_type']} ('{next_name}')",
                seen["pre_hook"].cpu(), true,
                "the next module that receives the BN output tensor"))

    overwritten = reference != true
    overwritten_fraction = float(overwritten.double().mean())
    negative_fraction = float((true < 0).double().mean())
    relu_of_true = torch.relu(true)
    reference_is_relu = bool(torch.equal(reference, relu_of_true))
    per_channel_over = overwritten.transpose(0, 1).reshape(true.shape[1], -1).double().mean(1)
    per_channel_neg = (true < 0).transpose(0, 1).reshape(true.shape[1], -1).double().mean(1)
    if channel is None:
        channel = int((per_channel_over - 0.5).abs().argmin())
    elif not (0 <= channel < true.shape[1]):
        raise LayerError(f"channel {channel} is out of range for {layer!r} "
                         f"({true.shape[1]} channels).", f"pick 0..{true.shape[1] - 1}.")

    reproduced = overwritten_fraction > 0
    verdict = _verdict(loaded.name, loaded.weights, layer, rows, overwritten_fraction,
                       negative_fraction, reference_is_relu, is_act, act_desc, next_name,
                       parent_type, float((reference.double() - relu_of_true.double())
                                          .abs().max()))
    return PitfallResult(
        name=NAME,
        title=TITLE,
        verdict=verdict,
        reproduced=reproduced,
        table=rows,
        data={
            "layer": layer,
            "output_shape": list(true.shape),
            "overwritten_fraction": overwritten_fraction,
            "negative_fraction_of_true_output": negative_fraction,
            "reference_equals_relu_of_true_output": reference_is_relu,
            "next_module": next_name,
            "next_module_type": seen.get("next_type"),
            "next_module_is_activation": is_act,
            "parent_type": parent_type,
            "channel": channel,
        },
        arrays={
            "true_map": _map(true, channel),
            "reference_map": _map(reference, channel),
            "changed_map": _map(overwritten.double(), channel),
            "per_channel_overwritten": per_channel_over.numpy(),
            "per_channel_negative": per_channel_neg.numpy(),
        },
        model=loaded.name,
        weights=loaded.weights,
        device=str(dev),
    )


def _map(t: torch.Tensor, channel: int) -> np.ndarray:
    m = t[0, channel]
    while m.dim() > 2:
        m = m[m.shape[0] // 2]
    if m.dim() == 1:
        m = m[None, :]
    return m.double().numpy()


def _verdict(model, weights, layer, rows, over, neg, is_relu, is_act, act_desc, next_name,
             parent_type, relu_gap) -> str:
    head = f"On {model} ({weights}), a forward hook on {layer} that keeps a reference"
    if over == 0:
        return (f"{head} still holds the true BN output at the end of the forward (0 values "
                "changed): nothing after this layer modifies its output in place.")
    if is_relu:
        who = (f"the in-place {act_desc} that follows it" if is_act else
               f"an in-place ReLU called as a function inside {parent_type}.forward or an "
               "enclosing forward (no activation module received the tensor before the next "
               f"module, '{next_name}')")
        cause = (f"{over:.1%} of its values changed by the end of the forward -- exactly the "
                 f"negative ones ({neg:.1%} of the true output), set to 0 by {who}: the stored "
                 "tensor equals relu(true output) everywhere.")
    else:
        cause = (f"{over:.1%} of its values changed by the end of the forward: later in-place "
                 f"operations overwrote it, and not only a ReLU (max |reference - relu(true)| "
                 f"= {relu_gap:.3g}; e.g. a residual 'out += identity' before the ReLU).")
    good = [r["method"] for r in rows[1:] if r["available"] and r["equals_true_output"]]
    bad = [f"{r['method']} ({r['changed_fraction']:.1%} changed)" for r in rows[1:]
           if r["available"] and not r["equals_true_output"]]
    tail = f" These capture the true BN output exactly: {'; '.join(good)}." if good else ""
    if bad:
        tail += f" These do not (they run after the overwrite): {'; '.join(bad)}."
    return f"{head} saw {cause}{tail}"


def figures(result: PitfallResult) -> list:
    a, d = result.arrays, result.data
    c = d["channel"]
    figs = [heatmaps(
        {"true BN output (clone)": a["true_map"],
         "hook keeping a reference": a["reference_map"],
         MASK_TITLE: a["changed_map"]},
        title=f"{d['layer']}, image 0, channel {c}: what the reference-keeping hook shows",
        masks=(MASK_TITLE,),
    )]
    channels = [str(i) for i in range(len(a["per_channel_overwritten"]))]
    figs.append(grouped_bars(
        channels,
        {"overwritten fraction (reference != true)": a["per_channel_overwritten"].tolist(),
         "negative fraction of true output": a["per_channel_negative"].tolist()},
        title="Per channel: values overwritten vs negative values of the true output",
        yaxis="fraction",
    ))
    return figs


def add_arguments(parser) -> None:
    add_stimulus_options(parser, model="resnet18", stimulus="image:chelsea")
    parser.add_argument("--channel", type=int, default=None,
                        help="channel shown in the maps (default: the most mixed one)")


def kwargs_from_args(args) -> dict:
    return {**stimulus_kwargs(args), "channel": args.channel}


CONTROLS = PageControls(StimulusInputs(model="resnet18", stimulus="image:chelsea",
                                       models=MODELS))
