"""Experiment 1: "Why doesn't my manual BatchNorm match the layer?"

docs/stories.md sections 1 and 5: someone applies
``(x - running_mean) / sqrt(running_var + eps) * gamma + beta`` by hand to a conv output and
gets a different curve than the BatchNorm layer, because the freshly built model was in
train mode and the layer normalised with the statistics of the batch itself.

The experiment runs a real network once (through :func:`bnviz.inspect`, on a private copy),
takes the chosen layer's real input and native output, and evaluates the formulas people
actually write (:mod:`bnviz.pitfalls.formulas`), each in float64 from that same input. Each
candidate's error against the native output decides whether it *matches* (relative error
at most ``rtol``, 1e-5). A user's own output (an array, or a ``.npy``/``.csv`` file,
:mod:`bnviz.pitfalls.user_output`) is compared with every candidate the same way, which
tells them which mistake they made.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import BnvizError, LayerError
from ..models import DEFAULT_MODEL
from ..modes import parse_mode, unknown_layer_error
from .base import PageControls, PitfallResult, StimulusInputs, Widget
from .cli import add_stimulus_options, stimulus_kwargs
from .common import load_experiment_model, make_batch
from .figures import error_bars, line_curves
from .formulas import (
    CANDIDATE_BY_KEY,
    CANDIDATES,
    MATCH_RTOL,
    Candidate,
    candidate_outputs,
    relative_error,
)
from .user_output import align_user, user_array

__all__ = ["MODE_CHOICES", "figures", "run"]

NAME = "explain"
TITLE = "Why doesn't my manual BN match?"
STORY = (
    "A researcher feeds a uniform image to a pretrained network, takes the first conv output "
    "and applies (x - running_mean) / sqrt(running_var + eps) * gamma + beta by hand. The "
    "curve does not match the BatchNorm layer's output (docs/stories.md sections 1, 5)."
)
EXPLANATION = (
    "A freshly built torchvision model is in **train mode**. In train mode BatchNorm "
    "normalises each channel with the mean and the *biased* variance of the current "
    "batch (over N, H and W), not with its running statistics; only after `model.eval()` "
    "does it use `running_mean` and `running_var`.\n\n"
    "Here the layer runs natively and every formula people write is applied to the very "
    "same input. A formula *matches* when its largest error is below 1e-5 of the output's "
    "largest value. The other classic slips -- `x.var()` (unbiased), forgetting gamma and "
    "beta, eps outside the square root, per-image statistics -- each leave their own "
    "fingerprint, so an output you computed yourself can be attributed to one of them."
)
MODE_CHOICES = ("train", "eval", "eval,track=none", "train,track=off")


def _curve(t: torch.Tensor, channel: int) -> np.ndarray:
    """Image 0, ``channel``: the middle row of the map (or the channel vector for (N, C))."""
    if t.dim() >= 4:
        m = t[0, channel]
        while m.dim() > 2:
            m = m[m.shape[0] // 2]
        return m[m.shape[0] // 2].double().numpy()
    if t.dim() == 3:
        return t[0, channel].double().numpy()
    return t[0].double().numpy()


def _channel_map(t: torch.Tensor, channel: int) -> np.ndarray:
    if t.dim() >= 4:
        m = t[0, channel]
        while m.dim() > 2:
            m = m[m.shape[0] // 2]
        return m.double().numpy()
    if t.dim() == 3:
        return t[0, channel].double().numpy()[None, :]
    return t[0].double().numpy()[None, :]


def _first_index(shape: tuple[int, ...], channel: int) -> tuple[int, ...]:
    return (0, channel) + (0,) * (len(shape) - 2) if len(shape) >= 2 else (0,)


def run(
    model: Any = DEFAULT_MODEL,
    weights: Any = "auto",
    layer: str | None = None,
    mode: str = "train",
    stimulus: str = "uniform",
    composition: str = "different",
    batch_size: int = 2,
    size: int = 112,
    seed: int = 0,
    device: str = "auto",
    channel: int = 0,
    user_output: Any = None,
    user_image: int = 0,
    rtol: float = MATCH_RTOL,
) -> PitfallResult:
    """Compare the native output of ``layer`` in ``mode`` with the candidate formulas.

    Defaults reproduce the story: the first BatchNorm of the real efficientnet_lite0, in
    train mode, on a uniform all-ones image (its batch-mate is a uniform 0.5 image, so that
    batch statistics and per-image statistics differ). ``mode`` is any bnviz mode string
    ("train", "eval", "eval,track=none", ...), applied to ``layer`` only. ``user_output``:
    your own output as an array (whole batch, one image ``user_image`` or one channel map
    of image ``user_image``) or the path of a ``.npy``/``.csv`` file.
    """
    from ..inspection import inspect

    parsed = parse_mode(mode)
    if not (isinstance(rtol, (int, float)) and rtol > 0):
        raise BnvizError(f"rtol must be a positive number, got {rtol!r}.", "pass e.g. 1e-5.")
    loaded = load_experiment_model(model, weights)
    names = loaded.bn_layer_names
    if not names:
        raise LayerError(f"{loaded.name} has no BatchNorm layers.",
                         f"pick a model with BatchNorm, e.g. {DEFAULT_MODEL}.")
    layer = names[0] if layer is None else layer
    if layer not in names:
        raise unknown_layer_error(layer, names)
    raw, _ = make_batch(loaded, stimulus, batch_size=batch_size, size=size,
                        composition=composition, seed=seed)
    report = inspect(loaded, raw, modes={layer: parsed}, device=device, keep_tensors=[layer])
    lr = report.layer(layer)
    x, native = lr.input, lr.output
    shape = tuple(native.shape)
    if not (isinstance(channel, int) and 0 <= channel < lr.num_features):
        raise BnvizError(f"channel {channel!r} is out of range for {layer!r} "
                         f"({lr.num_features} channels).",
                         f"pick a channel from 0 to {lr.num_features - 1}.")

    cands = candidate_outputs(
        x, stats_used=lr.stats_used, weight=lr.weight, bias=lr.bias, eps=lr.eps,
        running_mean=lr.running_mean_before, running_var=lr.running_var_before,
    )
    correct_key = "batch" if lr.stats_used == "batch" else "running"
    swap_key = "running" if correct_key == "batch" else "batch"
    first = _first_index(shape, channel)

    user = None
    if user_output is not None:
        user = user_array(user_output)
        if not (isinstance(user_image, int) and 0 <= user_image < shape[0]):
            raise BnvizError(f"user_image {user_image!r} is out of range (batch of {shape[0]}).",
                             f"pick an image from 0 to {shape[0] - 1}.")
        index, covers, part_shape = align_user(user, shape, user_image, channel, layer)
        user_t = torch.from_numpy(user.reshape(part_shape))

    rows: list[dict[str, Any]] = []
    errors: dict[str, tuple[float, float] | None] = {}
    user_errors: dict[str, tuple[float, float] | None] = {}
    for cand in CANDIDATES:
        out = cands[cand.key]
        errors[cand.key] = None if out is None else relative_error(out, native)
        row: dict[str, Any] = {
            "candidate": _label(cand, lr.stats_used),
            "key": cand.key,
            "correct_for_mode": cand.key == correct_key,
            "max_abs_err": None if out is None else errors[cand.key][0],
            "max_rel_err": None if out is None else errors[cand.key][1],
            "matches": out is not None and errors[cand.key][1] <= rtol,
            "first_value": None if out is None else float(out[first]),
            "formula": cand.formula,
        }
        if user is not None:
            user_errors[cand.key] = None if out is None else relative_error(user_t, out[index])
            row["yours_rel_err"] = None if out is None else user_errors[cand.key][1]
            row["explains_yours"] = out is not None and user_errors[cand.key][1] <= rtol
        rows.append(row)

    by_key = {r["key"]: r for r in rows}
    matched = [r for r in rows if r["matches"]]
    correct_ok = by_key[correct_key]["matches"]
    swap_row = by_key[swap_key]
    reproduced = correct_ok and (swap_row["max_rel_err"] is None or not swap_row["matches"])

    weights_label = loaded.weights
    verdict = _verdict(loaded.name, weights_label, layer, str(parsed), lr, rows, by_key,
                       correct_key, swap_key, matched, rtol, float(native[first]), channel)
    data: dict[str, Any] = {
        "layer": layer,
        "mode": str(parsed),
        "effective_mode": lr.mode,
        "stats_used": lr.stats_used,
        "eps": lr.eps,
        "momentum": lr.momentum,
        "input_shape": list(x.shape),
        "output_shape": list(shape),
        "stimulus": stimulus,
        "composition": composition,
        "channel": channel,
        "rtol": rtol,
        "native_first_value": float(native[first]),
        "first_index": list(first),
        "correct_candidate": correct_key,
        "matching_candidates": [r["key"] for r in matched],
        "channel_params": _channel_params(lr, channel),
    }
    arrays: dict[str, Any] = {
        "input": x.numpy(),
        "native_curve": _curve(native, channel),
        "native_map": _channel_map(native, channel),
        "curves": {_label(c, lr.stats_used): _curve(cands[c.key], channel)
                   for c in CANDIDATES if cands[c.key] is not None},
    }
    if user is not None:
        explained = [r["key"] for r in rows if r.get("explains_yours")]
        user_verdict = _user_verdict(rows, by_key, explained, correct_key, covers, rtol)
        data["user"] = {
            "shape": list(user.shape),
            "covers": covers,
            "explained_by": explained,
            "rel_err": {k: (None if v is None else v[1]) for k, v in user_errors.items()},
            "verdict": user_verdict,
        }
        verdict += " " + user_verdict
        full_user = torch.full(shape, float("nan"), dtype=torch.float64)
        full_user[index] = user_t
        user_curve = _curve(full_user, channel)
        if not np.isnan(user_curve).all():  # the curves show image 0
            arrays["user_curve"] = user_curve
    return PitfallResult(
        name=NAME,
        title=TITLE,
        verdict=verdict,
        reproduced=bool(reproduced),
        table=rows,
        data=data,
        arrays=arrays,
        model=loaded.name,
        weights=weights_label,
        device=report.device,
    )


def _label(cand: Candidate, stats_used: str) -> str:
    if cand.key in ("no_affine", "eps_outside"):
        return f"{cand.label} ({stats_used} statistics)"
    return cand.label


def _channel_params(lr, c: int) -> dict[str, float | None]:
    def at(t):
        return None if t is None else float(t[c])

    return {
        "gamma": at(lr.weight),
        "beta": at(lr.bias),
        "running_mean": at(lr.running_mean_before),
        "running_var": at(lr.running_var_before),
        "batch_mean": at(lr.batch_mean),
        "batch_var_biased": at(lr.batch_var),
        "batch_var_unbiased": at(lr.batch_var_unbiased),
    }


def _quote(row: dict) -> str:
    return f"'{row['candidate']}'"


def _verdict(model, weights, layer, mode, lr, rows, by_key, correct_key, swap_key, matched,
             rtol, native_first, channel) -> str:
    head = (f"{layer} of {model} ({weights}) in mode {mode} normalises with "
            f"{lr.stats_used} statistics.")
    correct = by_key[correct_key]
    if matched == [correct]:
        body = (f"Only {_quote(correct)} matches the native output "
                f"(max rel err {correct['max_rel_err']:.1e} <= {rtol:g}).")
    elif correct["matches"]:
        others = [_quote(r) for r in matched if r is not correct]
        body = (f"{_quote(correct)} matches the native output (max rel err "
                f"{correct['max_rel_err']:.1e}), and on this input so do "
                f"{', '.join(others)} (they give the same numbers here).")
    elif matched:
        body = (f"Unexpectedly {', '.join(_quote(r) for r in matched)} match(es) but "
                f"{_quote(correct)} is off by {correct['max_rel_err']:.2g} (relative).")
    else:
        best = min((r for r in rows if r["max_rel_err"] is not None),
                   key=lambda r: r["max_rel_err"])
        body = (f"No candidate matches within {rtol:g}; the closest is {_quote(best)} "
                f"(rel err {best['max_rel_err']:.2g}).")
    off = [f"{_quote(r)} by up to {r['max_abs_err']:.3g} (rel {r['max_rel_err']:.2g})"
           for r in rows if r["max_rel_err"] is not None and not r["matches"]]
    parts = [head, body]
    if off:
        parts.append("Off: " + "; ".join(off) + ".")
    swap = by_key[swap_key]
    if swap["first_value"] is not None:
        parts.append(
            f"First value (image 0, channel {channel}): native {native_first:.4g}, "
            f"{swap['candidate']} formula {swap['first_value']:.4g}.")
    return " ".join(parts)


def _user_verdict(rows, by_key, explained, correct_key, covers, rtol) -> str:
    if correct_key in explained:
        return (f"Your output ({covers}) matches the layer: you used the correct formula "
                f"({by_key[correct_key]['candidate']}).")
    if explained:
        row = by_key[explained[0]]
        cand = CANDIDATE_BY_KEY[explained[0]]
        return (f"Your output ({covers}) is explained by {_quote(row)} (rel err "
                f"{row['yours_rel_err']:.1e}): you {cand.mistake}. Fix: {cand.fix}.")
    best = min((r for r in rows if r.get("yours_rel_err") is not None),
               key=lambda r: r["yours_rel_err"])
    return (f"No candidate explains your output ({covers}) within {rtol:g}; the closest is "
            f"{_quote(best)} (rel err {best['yours_rel_err']:.2g}). Check that you used the same "
            "layer input (same stimulus, batch and image size).")


# --------------------------------------------------------------------------------------------
# Figures and command line
# --------------------------------------------------------------------------------------------


def figures(result: PitfallResult) -> list:
    rows = result.table
    rtol = result.data.get("rtol", MATCH_RTOL)
    figs = [error_bars(
        [r["candidate"] for r in rows], [r["max_rel_err"] for r in rows],
        title=f"Candidate formulas vs native output of {result.data['layer']} "
              f"(mode {result.data['mode']})",
        yaxis="max relative error", threshold=rtol, ok=[r["matches"] for r in rows],
    )]
    curves = {"native (PyTorch)": result.arrays["native_curve"], **result.arrays["curves"]}
    if "user_curve" in result.arrays:
        curves["your output"] = result.arrays["user_curve"]
    figs.append(line_curves(
        curves, title=f"Image 0, channel {result.data['channel']}: middle row of the output",
        xaxis="position", yaxis="BN output", emphasize="native (PyTorch)",
    ))
    if "user" in result.data:
        figs.append(error_bars(
            [r["candidate"] for r in rows], [r.get("yours_rel_err") for r in rows],
            title="Your output vs each candidate", yaxis="max relative error",
            threshold=rtol, ok=[bool(r.get("explains_yours")) for r in rows],
        ))
    return figs


def add_arguments(parser) -> None:
    add_stimulus_options(parser, model=DEFAULT_MODEL, stimulus="uniform")
    parser.add_argument("--mode", default="train",
                        help="mode of the layer: train | eval | eval,track=none ... "
                        "(default: train, the state of a freshly built model)")
    parser.add_argument("--channel", type=int, default=0, help="channel for the curve")
    parser.add_argument("--user-output", default=None, metavar="PATH",
                        help="your own BN output (.npy or .csv) to diagnose")
    parser.add_argument("--rtol", type=float, default=MATCH_RTOL,
                        help=f"match threshold on the relative error (default {MATCH_RTOL:g})")


def kwargs_from_args(args) -> dict:
    return {**stimulus_kwargs(args), "mode": args.mode, "channel": args.channel,
            "user_output": args.user_output, "rtol": args.rtol}


CONTROLS = PageControls(
    StimulusInputs(model=DEFAULT_MODEL, stimulus="uniform"),
    rows=((
        Widget("mode", "Layer mode", "select", options=MODE_CHOICES,
               help="train: what a freshly built torchvision model does; eval: after "
                    "model.eval()"),
        Widget("channel", "Channel for the curve", "int", default=0, low=0, high=4095),
    ),),
)
