"""Experiment 6: in eval mode BatchNorm is an affine map that folds into the preceding conv.

docs/stories.md section 4: at inference a BN layer uses fixed running statistics, so per
channel it computes ``y = scale * x + shift`` with ``scale = gamma / sqrt(running_var + eps)``
and ``shift = beta - running_mean * scale``. A convolution followed by such a map is again
a convolution (weights scaled per output channel, bias shifted), which is what
``torch.nn.utils.fusion.fuse_conv_bn_eval`` builds. In train mode BN normalises with the
statistics of the current batch, which no fixed weights can reproduce, so the folded network
no longer matches.

Finding the pairs generically: a conv whose output feeds *only* a BN layer. ``torch.fx``
traces the model with convolutions and BN layers kept as leaves (so subclasses such as
EfficientNet-Lite's ``Conv2dStaticSamePadding`` stay whole); when tracing fails, one forward
with hooks records which BN consumed which conv's output tensor, and a ``TorchFunctionMode``
counts any other use of that tensor. Folding happens in a deep copy: each conv is replaced by
a fused *copy of itself* (same class, so the subclass's padding behaviour is kept) and the BN
layer by ``nn.Identity``.
"""

from __future__ import annotations

import argparse
import copy
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.overrides import TorchFunctionMode

from ..errors import BnvizError, LayerError
from ..inspection import logits_of
from ..models import DEFAULT_MODEL, LoadedModel
from ..modes import bn_layers, unknown_layer_error
from ..norms import is_norm_layer
from .base import PageControls, PhotoInputs, PitfallResult, Widget
from .cli import add_photo_options, photo_kwargs
from .common import DEFAULT_SIZE, prepare_photo, replace_module, single_value_errors

__all__ = ["FINDERS", "channel_scale", "figures", "find_conv_bn_pairs", "fold_conv_bn", "run"]

NAME = "fold"
TITLE = "Folding BatchNorm into the convolution"
STORY = "At inference BN folds into the preceding conv (docs/stories.md section 4)"
EXPLANATION = """\
In eval mode a BatchNorm layer uses its *running* statistics, which are fixed numbers. Per
channel it then computes `scale * x + shift` with `scale = gamma / sqrt(running_var + eps)`
and `shift = beta - running_mean * scale`: a plain affine map. A convolution followed by an
affine map is again a convolution, with each output channel's weights multiplied by `scale`
and its bias replaced by `bias * scale + shift`. That is what
`torch.nn.utils.fusion.fuse_conv_bn_eval` builds, and what inference engines do to save time.

bnviz folds every conv+BN pair of the model (each BN becomes `Identity`) and compares the
result with the original network: in eval the differences are rounding-level. In train mode
BN normalises with the mean and variance of the *current batch*, which change with every
batch; no fixed weights can do that, and the folded network gives clearly different outputs.
"""

FINDERS = ("auto", "fx", "hooks")


# --------------------------------------------------------------------------------------------
# Finding conv -> BN pairs
# --------------------------------------------------------------------------------------------


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, _ConvNd) and is_norm_layer(bn)
            and bn.running_mean is not None and bn.running_var is not None
            and conv.out_channels == bn.num_features)


def _pairs_fx(module: nn.Module) -> list[tuple[str, str]]:
    from torch.fx import Tracer

    class _LeafTracer(Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (isinstance(m, _ConvNd) or is_norm_layer(m)
                    or super().is_leaf_module(m, qualname))

    graph = _LeafTracer().trace(module)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if len(src.users) != 1 or calls[node.target] != 1 or calls[src.target] != 1:
            continue
        conv, bn = module.get_submodule(src.target), module.get_submodule(node.target)
        if _foldable(conv, bn):
            pairs.append((str(src.target), str(node.target)))
    return pairs


class _UseCounter(TorchFunctionMode):
    """Counts uses of watched tensors by any torch function outside BN layers' forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}
        self.uses: Counter = Counter()
        self.inside_bn = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_bn and self.watched:
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and self.watched.get(id(value)) is value:
                    self.uses[id(value)] += 1
        return func(*args, **kwargs)


def _pairs_hooks(module: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """Pairs seen in one forward of a private copy: BN input *is* a conv output, used once."""
    net = copy.deepcopy(module).eval()
    counter = _UseCounter()
    conv_calls: Counter = Counter()
    bn_calls: Counter = Counter()
    produced: dict[int, str] = {}
    consumed: dict[str, int] = {}
    handles = []

    def conv_hook(name):
        def hook(_m, _inp, out):
            conv_calls[name] += 1
            if isinstance(out, torch.Tensor):
                counter.watched[id(out)] = out
                produced[id(out)] = name
        return hook

    def bn_pre(name):
        def hook(_m, inp):
            bn_calls[name] += 1
            counter.inside_bn += 1
            if inp and isinstance(inp[0], torch.Tensor) and id(inp[0]) in produced:
                consumed[name] = id(inp[0])
        return hook

    def bn_post(_m, _inp, _out):
        counter.inside_bn -= 1

    for name, m in net.named_modules():
        if isinstance(m, _ConvNd):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif is_norm_layer(m):
            handles.append(m.register_forward_pre_hook(bn_pre(name)))
            handles.append(m.register_forward_hook(bn_post))
    try:
        with torch.no_grad(), counter:
            net(example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for bn_name, key in consumed.items():
        conv_name = produced[key]
        if conv_calls[conv_name] != 1 or bn_calls[bn_name] != 1 or counter.uses[key]:
            continue
        if _foldable(module.get_submodule(conv_name), module.get_submodule(bn_name)):
            pairs.append((conv_name, bn_name))
    order = {n: i for i, (n, _) in enumerate(module.named_modules())}
    return sorted(pairs, key=lambda p: order[p[0]])


def find_conv_bn_pairs(module: nn.Module, example: torch.Tensor | None = None,
                       method: str = "auto") -> tuple[list[tuple[str, str]], str]:
    """``([(conv name, bn name)], finder used)`` for every conv whose output feeds only a BN.

    ``method``: "fx" (symbolic trace), "hooks" (one forward on a copy; needs ``example``) or
    "auto" (fx, then hooks if tracing fails).
    """
    if method not in FINDERS:
        raise BnvizError(f"Unknown pair finder {method!r}.",
                         f"choose one of: {', '.join(FINDERS)}.")
    if method in ("auto", "fx"):
        try:
            return _pairs_fx(module), "torch.fx symbolic trace"
        except Exception:  # noqa: BLE001 - any tracing failure means: use the hooks instead
            if method == "fx":
                raise
    if example is None:
        raise BnvizError("Finding conv+BN pairs with hooks needs an example input.",
                         "pass example=<a batch the model accepts>.")
    return _pairs_hooks(module, example), "forward hooks (module call order)"


def fold_conv_bn(module: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """A deep copy in eval mode with every (conv, bn) pair fused; ``module`` is untouched.

    Each conv becomes ``fuse_conv_bn_eval(conv, bn)`` - a deep copy *of that conv* with new
    weight and bias, so subclasses keep their own forward (e.g. static "same" padding) - and
    each BN becomes ``nn.Identity()``.
    """
    folded = copy.deepcopy(module).eval()
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, _ConvTransposeNd))
        replace_module(folded, conv_name, fused)
        replace_module(folded, bn_name, nn.Identity())
    return folded


def channel_scale(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = scale * x + shift``.

    Returns ``(gamma / sqrt(running_var + eps), beta - running_mean * scale)``.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _forward(net: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the output of the module called ``layer`` (BN or the Identity left by it)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        seen["out"] = out.detach().clone()

    handle = net.get_submodule(layer).register_forward_hook(hook)
    try:
        with single_value_errors(), torch.no_grad():
            out = net(x)
    finally:
        handle.remove()
    logits = logits_of(out)
    if logits is None:
        raise BnvizError("The model output is not a tensor of logits.",
                         "use a classification model from 'bnviz models'.")
    return logits.detach(), seen["out"]


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    abs_diff = float((a.double() - b.double()).abs().max())
    return abs_diff, abs_diff / max(float(b.double().abs().max()), 1e-30)


def _row(mode: str, where: str, a: torch.Tensor, b: torch.Tensor, top1: str | None):
    d, r = _diff(a, b)
    return {"original_bn_mode": mode, "output": where, "max_abs_diff": d, "max_rel_diff": r,
            "top1_agreement": top1}


def _top1(a: torch.Tensor, b: torch.Tensor) -> str:
    same = int((a.argmax(1) == b.argmax(1)).sum())
    return f"{same}/{a.shape[0]}"


def run(model: str | LoadedModel = DEFAULT_MODEL, weights: Any = "auto",
        layer: str | None = None, photo: str = "chelsea", batch_size: int = 2,
        size: int | None = DEFAULT_SIZE, seed: int = 0, device: str = "auto",
        finder: str = "auto") -> PitfallResult:
    """Fold every conv+BN pair in eval, compare outputs in eval and with BN in train mode.

    ``layer`` names the BN layer whose output and per-channel scale are shown (default:
    the first folded one).
    """
    setup = prepare_photo(model, weights, photo, batch_size, size, seed, device)
    original = setup.private_module().eval()
    x = setup.x
    pairs, finder_used = find_conv_bn_pairs(original, x, finder)
    names = [n for n, _ in bn_layers(original)]
    if not pairs:
        raise LayerError(f"No conv+BN pair to fold was found in {setup.loaded.name}.",
                         "choose a model whose BN layers follow convolutions, e.g. resnet18.")
    folded_bns = [bn for _, bn in pairs]
    if layer is None:
        layer = folded_bns[0]
    elif layer not in folded_bns:
        if layer not in names:
            raise unknown_layer_error(layer, names)
        raise LayerError(f"BN layer {layer!r} does not directly follow a convolution, so it "
                         "is not folded.", f"choose a folded layer, e.g. {folded_bns[0]}.")
    conv_name = dict((bn, conv) for conv, bn in pairs)[layer]

    folded = fold_conv_bn(original, pairs)
    bn = original.get_submodule(layer)
    scale, shift = channel_scale(bn)
    conv = original.get_submodule(conv_name)
    fused_conv = folded.get_submodule(conv_name)
    weight_check = None
    with torch.no_grad():
        if not isinstance(conv, _ConvTransposeNd):  # transposed weights: (in, out/groups, ..)
            view = (-1,) + (1,) * (conv.weight.dim() - 1)
            weight_check = float((fused_conv.weight - conv.weight * scale.view(view)).abs().max())
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        bias_check = float((fused_conv.bias - (conv_bias * scale + shift)).abs().max())

    logits_eval, inter_eval = _forward(original, x, layer)
    logits_fold, inter_fold = _forward(folded, x, layer)
    trained = copy.deepcopy(original)  # BN layers in train mode, everything else in eval
    for _, m in bn_layers(trained):
        m.train()
    logits_train, inter_train = _forward(trained, x, layer)

    table = [
        _row("eval (running stats)", "logits", logits_fold, logits_eval,
             _top1(logits_fold, logits_eval)),
        _row("eval (running stats)", f"{layer} output", inter_fold, inter_eval, None),
        _row("train (batch stats)", "logits", logits_fold, logits_train,
             _top1(logits_fold, logits_train)),
        _row("train (batch stats)", f"{layer} output", inter_fold, inter_train, None),
    ]
    dims = [0] + list(range(2, inter_eval.dim()))
    per_channel_eval = (inter_fold - inter_eval).abs().amax(dim=dims)
    per_channel_train = (inter_fold - inter_train).abs().amax(dim=dims)
    eval_rel, train_rel = table[0]["max_rel_diff"], table[2]["max_rel_diff"]
    reproduced = eval_rel < 1e-2 and train_rel > max(10 * eval_rel, 1e-2)

    unfolded = [n for n in names if n not in folded_bns]
    data = {
        **setup.data_fields(),
        "pairs_folded": len(pairs),
        "bn_layers": len(names),
        "pairs": [list(p) for p in pairs],
        "unfolded_bn_layers": unfolded,
        "finder": finder_used,
        "layer": layer,
        "conv": conv_name,
        "conv_type": type(conv).__name__,
        "fused_conv_type": type(fused_conv).__name__,
        "scale": scale.cpu().tolist(),
        "shift": shift.cpu().tolist(),
        "fused_weight_vs_scaled_weight_max_abs_diff": weight_check,
        "fused_bias_vs_shift_max_abs_diff": bias_check,
        "eval_logits_max_abs_diff": table[0]["max_abs_diff"],
        "eval_logits_max_rel_diff": eval_rel,
        "train_logits_max_abs_diff": table[2]["max_abs_diff"],
        "train_logits_max_rel_diff": train_rel,
    }
    if setup.device.type == "cuda":
        data["cuda_tf32_convolutions"] = bool(torch.backends.cudnn.allow_tf32)
    arrays = {"scale": scale.cpu(), "shift": shift.cpu(),
              "channel_diff_eval": per_channel_eval.cpu(),
              "channel_diff_train": per_channel_train.cpu()}
    verdict = _verdict(setup.label, data, table, scale)
    return PitfallResult(name=NAME, title=TITLE, verdict=verdict, reproduced=reproduced,
                         table=table, data=data, arrays=arrays, **setup.result_fields())


def _verdict(label: str, data: dict, table: list[dict], scale: torch.Tensor) -> str:
    ev, tr = table[0], table[2]
    skipped = len(data["unfolded_bn_layers"])
    parts = [
        f"Folding {data['pairs_folded']} conv+BN pairs of {label} into their convolutions "
        f"changes the eval-mode logits by at most {ev['max_abs_diff']:.1e} "
        f"({ev['max_rel_diff']:.1e} of the largest logit; same top-1 class for "
        f"{ev['top1_agreement']} images) and {data['layer']}'s output by "
        f"{table[1]['max_abs_diff']:.1e}.",
        f"In eval, BN is the fixed per-channel map scale*x + shift with "
        f"scale = gamma/sqrt(running_var+eps): for {data['layer']} from "
        f"{float(scale.min()):.3g} to {float(scale.max()):.3g} over {scale.numel()} channels.",
        f"With BN in train mode (batch statistics) the same folded network is off by up to "
        f"{tr['max_abs_diff']:.3g} on the logits ({tr['max_rel_diff']:.2g} of the largest; "
        f"same top-1 for {tr['top1_agreement']}), so folding only holds in eval.",
    ]
    if skipped:
        parts.append(f"{skipped} BN layer(s) do not directly follow a conv and were kept.")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Figures, command line, page controls
# --------------------------------------------------------------------------------------------


def figures(result: PitfallResult) -> list:
    import plotly.graph_objects as go

    arrays = result.arrays
    if "scale" not in arrays:
        return []
    layer = result.data.get("layer")
    scale = [float(v) for v in arrays["scale"]]
    fig_scale = go.Figure(go.Bar(x=list(range(len(scale))), y=scale, name="scale"))
    fig_scale.update_layout(title=f"{layer}: per-channel scale gamma / sqrt(running_var + eps)",
                            xaxis_title="channel", yaxis_title="scale")
    floor = 1e-12
    ev = [max(float(v), floor) for v in arrays["channel_diff_eval"]]
    tr = [max(float(v), floor) for v in arrays["channel_diff_train"]]
    channels = list(range(len(ev)))
    fig_diff = go.Figure([
        go.Bar(x=channels, y=ev, name="BN in eval (running stats)"),
        go.Bar(x=channels, y=tr, name="BN in train (batch stats)"),
    ])
    fig_diff.update_layout(
        title=f"{layer} output: max |folded - original| per channel (log scale)",
        barmode="group", yaxis_type="log", xaxis_title="channel",
        yaxis_title=f"max abs difference (floored at {floor:g})")
    rows = result.table
    fig_summary = go.Figure([
        go.Bar(x=[r["output"] for r in rows if r["original_bn_mode"] == mode],
               y=[max(r["max_rel_diff"], floor) for r in rows if r["original_bn_mode"] == mode],
               name=mode)
        for mode in dict.fromkeys(r["original_bn_mode"] for r in rows)
    ])
    fig_summary.update_layout(title="Folded vs original: max relative difference (log scale)",
                              barmode="group", yaxis_type="log")
    return [fig_summary, fig_scale, fig_diff]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_photo_options(parser, batch_size=2)
    parser.add_argument("--layer", default=None,
                        help="BN layer whose output and scale are shown (default: first "
                             "folded)")
    parser.add_argument("--finder", default="auto", choices=list(FINDERS),
                        help="how conv+BN pairs are found: fx trace, forward hooks, or auto")


def kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {**photo_kwargs(args), "layer": args.layer or None, "finder": args.finder}


CONTROLS = PageControls(
    PhotoInputs(batch_size=2),
    rows=((Widget("layer", "BN layer whose output and scale are shown", "layer"),),),
)
