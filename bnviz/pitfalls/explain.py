"""Experiment 1: "Why doesn't my manual BatchNorm match the layer?"

USER_STORIES.md section 1 (and 5): someone applies
``(x - running_mean) / sqrt(running_var + eps) * gamma + beta`` by hand to a conv output and
gets a different curve than the BatchNorm layer, because the freshly built model was in
train mode and the layer normalised with the statistics of the batch itself.

The experiment runs a real network once (through :func:`bnviz.inspect`, on a private copy),
takes the chosen layer's real input and native output, and evaluates the formulas people
actually write, each in float64 from that same input:

* ``batch``: batch mean and *biased* variance over (N, H, W) -- what train mode computes;
* ``running``: the running statistics -- what eval mode computes;
* ``batch_unbiased``: batch statistics with the unbiased variance (``x.var()``);
* ``no_affine``: gamma/beta left out (with the statistics the layer really uses);
* ``eps_outside``: ``sqrt(var) + eps`` instead of ``sqrt(var + eps)``;
* ``per_sample``: statistics of each image alone (over H, W) instead of over the batch.

Each candidate's error against the native output decides whether it *matches*
(relative error ``max|candidate - native| / max|native|`` at most ``rtol``, 1e-5). A user's
own output (an array, or a ``.npy``/``.csv`` file) is compared with every candidate the same
way, which tells them which mistake they made.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BnvizError, LayerError
from ..models import DEFAULT_MODEL
from ..modes import parse_mode, unknown_layer_error
from .base import Experiment, PitfallResult, register
from .cli import add_run_arguments, load_experiment_model, make_batch, model_controls, run_arguments
from .figures import error_bars, line_curves

__all__ = [
    "CANDIDATES",
    "MATCH_RTOL",
    "Candidate",
    "candidate_outputs",
    "explain",
    "load_user_output",
    "relative_error",
]

#: A candidate matches when its relative error against the reference is at most this.
MATCH_RTOL = 1e-5
#: Refuse user files above this many values (a 20 MB upload holds at most ~5M float32).
MAX_USER_VALUES = 20_000_000
USER_EXTENSIONS = (".npy", ".csv", ".txt")


@dataclass(frozen=True)
class Candidate:
    key: str
    label: str
    formula: str
    mistake: str  # what someone who computed this did, in their words
    fix: str


CANDIDATES: tuple[Candidate, ...] = (
    Candidate(
        "batch", "batch statistics, biased variance",
        "(x - mean_NHW(x)) / sqrt(var_NHW(x, biased) + eps) * gamma + beta",
        "normalised with the mean and biased variance of this batch",
        "in eval mode the layer normalises with running_mean / running_var instead",
    ),
    Candidate(
        "running", "running statistics",
        "(x - running_mean) / sqrt(running_var + eps) * gamma + beta",
        "normalised with the running statistics",
        "in train mode the layer normalises with the batch's own mean and biased variance "
        "(per channel over N, H, W); call model.eval() to make it use the running statistics",
    ),
    Candidate(
        "batch_unbiased", "batch statistics, unbiased variance (x.var())",
        "(x - mean_NHW(x)) / sqrt(var_NHW(x, unbiased) + eps) * gamma + beta",
        "used the unbiased variance (torch.var's default)",
        "BatchNorm normalises with the biased variance: x.var(dim=(0, 2, 3), unbiased=False); "
        "the unbiased one only feeds the running_var update",
    ),
    Candidate(
        "no_affine", "gamma/beta left out",
        "(x - mean) / sqrt(var + eps)",
        "left out the affine step",
        "multiply by weight (gamma) and add bias (beta), per channel, after normalising",
    ),
    Candidate(
        "eps_outside", "eps outside the square root",
        "(x - mean) / (sqrt(var) + eps) * gamma + beta",
        "added eps outside the square root",
        "eps goes inside the square root: sqrt(var + eps)",
    ),
    Candidate(
        "per_sample", "statistics per sample instead of over the batch",
        "(x - mean_HW(x[n])) / sqrt(var_HW(x[n]) + eps) * gamma + beta",
        "took the statistics of each image separately (that is InstanceNorm)",
        "BatchNorm pools each channel's statistics over the whole batch (N, H, W)",
    ),
)
_BY_KEY = {c.key: c for c in CANDIDATES}


# --------------------------------------------------------------------------------------------
# Pure computations
# --------------------------------------------------------------------------------------------


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _normalise(x, mean, var, eps, weight, bias, *, eps_outside=False):
    std = torch.sqrt(var) + eps if eps_outside else torch.sqrt(var + eps)
    y = (x - mean) / std
    if weight is not None:
        y = y * _channel_view(weight, x.dim())
    if bias is not None:
        y = y + _channel_view(bias, x.dim())
    return y


def candidate_outputs(
    x: torch.Tensor,
    *,
    stats_used: str,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """Every candidate formula applied to the BN input ``x`` (N, C, ...), in float64.

    ``stats_used`` ("batch" or "running") is what the layer really normalises with; the
    ``no_affine`` and ``eps_outside`` candidates use those statistics so that each candidate
    differs from the correct formula by exactly one mistake. A candidate that cannot be
    computed (running statistics of a layer without buffers, per-sample statistics of a
    (N, C) input) is ``None``.
    """
    x = x.detach().double()
    dims = (0, *range(2, x.dim()))
    count = x.numel() // x.shape[1]
    w = None if weight is None else weight.detach().double()
    b = None if bias is None else bias.detach().double()
    mean = _channel_view(x.mean(dim=dims), x.dim())
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    var_unbiased = var * count / (count - 1) if count > 1 else None
    has_running = running_mean is not None and running_var is not None
    if has_running:
        r_mean = _channel_view(running_mean.detach().double(), x.dim())
        r_var = _channel_view(running_var.detach().double(), x.dim())
    if stats_used == "running" and not has_running:
        raise ValueError("stats_used='running' needs running_mean and running_var")
    used_mean, used_var = (r_mean, r_var) if stats_used == "running" else (mean, var)

    out: dict[str, torch.Tensor | None] = {
        "batch": _normalise(x, mean, var, eps, w, b),
        "running": _normalise(x, r_mean, r_var, eps, w, b) if has_running else None,
        "batch_unbiased": None if var_unbiased is None
        else _normalise(x, mean, var_unbiased, eps, w, b),
        "no_affine": _normalise(x, used_mean, used_var, eps, None, None),
        "eps_outside": _normalise(x, used_mean, used_var, eps, w, b, eps_outside=True),
        "per_sample": None,
    }
    if x.dim() >= 3:
        sdims = tuple(range(2, x.dim()))
        s_mean = x.mean(dim=sdims, keepdim=True)
        s_var = ((x - s_mean) ** 2).mean(dim=sdims, keepdim=True)
        out["per_sample"] = _normalise(x, s_mean, s_var, eps, w, b)
    return out


def relative_error(a, ref) -> tuple[float, float]:
    """``(max |a - ref|, max |a - ref| / max |ref|)`` in float64."""
    a = torch.as_tensor(a).double()
    ref = torch.as_tensor(ref).double()
    max_abs = float((a - ref).abs().max()) if a.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, rel


# --------------------------------------------------------------------------------------------
# The user's own output
# --------------------------------------------------------------------------------------------


def load_user_output(source: bytes | str | os.PathLike, filename: str | None = None
                     ) -> np.ndarray:
    """Read a user's BN output from ``.npy`` (np.save) or ``.csv``/``.txt`` (numbers
    separated by commas or whitespace, one optional header line) as float64."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        filename = filename or os.path.basename(path)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise BnvizError(f"Cannot read your output file {path!r}: {exc.strerror}.",
                             "pass the path of a .npy or .csv file.") from exc
    else:
        data = bytes(source)
    name = filename or "upload"
    ext = os.path.splitext(name)[1].lower()
    fix = ("save your output with np.save('out.npy', y) or np.savetxt('out.csv', y.reshape(-1, "
           "y.shape[-1]), delimiter=',').")
    if ext not in USER_EXTENSIONS:
        raise BnvizError(f"Unsupported file type {ext or '(none)'!r} for {name!r}.",
                         f"use .npy or .csv: {fix}")
    if ext == ".npy":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BnvizError(f"{name!r} is not a readable .npy array ({exc}).", fix) from exc
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BnvizError(f"{name!r} is not a text CSV file.", fix) from exc
        arr = _parse_text_table(text, name, fix)
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiub":
        raise BnvizError(f"{name!r} does not hold numbers (dtype {getattr(arr, 'dtype', '?')}).",
                         fix)
    if arr.size == 0:
        raise BnvizError(f"{name!r} is empty.", fix)
    if arr.size > MAX_USER_VALUES:
        raise BnvizError(f"{name!r} holds {arr.size} values, more than {MAX_USER_VALUES}.",
                         "save one image or one channel map instead of the whole batch.")
    return arr.astype(np.float64)


def _parse_text_table(text: str, name: str, fix: str) -> np.ndarray:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise BnvizError(f"{name!r} is empty.", fix)
    delimiter = "," if "," in lines[0] or (len(lines) > 1 and "," in lines[1]) else None
    for skip in (0, 1):
        try:
            return np.loadtxt(io.StringIO("\n".join(lines[skip:])), delimiter=delimiter,
                              ndmin=2, dtype=np.float64)
        except ValueError as exc:
            error = exc
    raise BnvizError(f"{name!r} is not a table of numbers ({error}).", fix)


def _align_user(user: np.ndarray, shape: tuple[int, ...], image: int, channel: int,
                layer: str) -> tuple[tuple, str, tuple[int, ...]]:
    """Which part of the layer output the user's array covers: (index, description, shape)."""
    n = user.size
    full = math.prod(shape)
    if n == full:
        return (), "the whole batch", shape
    if n == math.prod(shape[1:]):
        return (image,), f"image {image}", shape[1:]
    if len(shape) >= 3 and n == math.prod(shape[2:]):
        return (image, channel), f"image {image}, channel {channel}", shape[2:]
    parts = f"the whole output {tuple(shape)}, one image {tuple(shape[1:])}"
    if len(shape) >= 3:
        parts += f" or one channel map {tuple(shape[2:])}"
    raise BnvizError(
        f"Your output has {n} values (shape {tuple(user.shape)}), which fits no part of "
        f"layer {layer!r}'s output {tuple(shape)}.",
        f"supply {parts}, computed from this run's layer input (same stimulus, batch size "
        "and image size).",
    )


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


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


def explain(
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
        user = _user_array(user_output)
        if not (isinstance(user_image, int) and 0 <= user_image < shape[0]):
            raise BnvizError(f"user_image {user_image!r} is out of range (batch of {shape[0]}).",
                             f"pick an image from 0 to {shape[0] - 1}.")
        index, covers, part_shape = _align_user(user, shape, user_image, channel, layer)
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
        name="explain",
        title=EXPERIMENT.title,
        verdict=verdict,
        reproduced=bool(reproduced),
        table=rows,
        data=data,
        arrays=arrays,
        model=loaded.name,
        weights=weights_label,
        device=report.device,
    )


def _user_array(user_output: Any) -> np.ndarray:
    if isinstance(user_output, (str, os.PathLike)):
        arr = load_user_output(user_output)
    else:
        if hasattr(user_output, "detach"):
            user_output = user_output.detach().cpu().double().numpy()
        try:
            arr = np.asarray(user_output, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise BnvizError(f"Your output is not an array of numbers ({exc}).",
                             "pass a numpy array, a tensor, or a .npy/.csv path.") from exc
    if arr.size == 0:
        raise BnvizError("Your output is empty.", "pass the BN output you computed.")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise BnvizError(f"Your output contains {bad} NaN/inf values.",
                         "check your formula (a zero variance without eps gives inf/NaN).")
    return arr


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
        cand = _BY_KEY[explained[0]]
        return (f"Your output ({covers}) is explained by {_quote(row)} (rel err "
                f"{row['yours_rel_err']:.1e}): you {cand.mistake}. Fix: {cand.fix}.")
    best = min((r for r in rows if r.get("yours_rel_err") is not None),
               key=lambda r: r["yours_rel_err"])
    return (f"No candidate explains your output ({covers}) within {rtol:g}; the closest is "
            f"{_quote(best)} (rel err {best['yours_rel_err']:.2g}). Check that you used the same "
            "layer input (same stimulus, batch and image size).")


# --------------------------------------------------------------------------------------------
# Figures, CLI, page
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
    add_run_arguments(parser, model=DEFAULT_MODEL, stimulus="uniform")
    parser.add_argument("--mode", default="train",
                        help="mode of the layer: train | eval | eval,track=none ... "
                        "(default: train, the state of a freshly built model)")
    parser.add_argument("--channel", type=int, default=0, help="channel for the curve")
    parser.add_argument("--user-output", default=None, metavar="PATH",
                        help="your own BN output (.npy or .csv) to diagnose")
    parser.add_argument("--rtol", type=float, default=MATCH_RTOL,
                        help=f"match threshold on the relative error (default {MATCH_RTOL:g})")


def kwargs_from_args(args) -> dict:
    return {**run_arguments(args), "mode": args.mode, "channel": args.channel,
            "user_output": args.user_output, "rtol": args.rtol}


MODE_CHOICES = ("train", "eval", "eval,track=none", "train,track=off")


def controls(st) -> dict:
    kwargs = model_controls(st, "explain", model=DEFAULT_MODEL, stimulus="uniform")
    cols = st.columns(2)
    kwargs["mode"] = cols[0].selectbox(
        "Layer mode", MODE_CHOICES, key="explain:mode",
        help="train: what a freshly built torchvision model does; eval: after model.eval()",
    )
    kwargs["channel"] = int(cols[1].number_input("Channel for the curve", 0, 4095, 0,
                                                 key="explain:channel"))
    return kwargs


EXPERIMENT = register(Experiment(
    name="explain",
    title="Why doesn't my manual BN match?",
    story=(
        "A researcher feeds a uniform image to a pretrained network, takes the first conv "
        "output and applies (x - running_mean) / sqrt(running_var + eps) * gamma + beta by "
        "hand. The curve does not match the BatchNorm layer's output (USER_STORIES.md 1, 5)."
    ),
    explanation=(
        "A freshly built torchvision model is in **train mode**. In train mode BatchNorm "
        "normalises each channel with the mean and the *biased* variance of the current "
        "batch (over N, H and W), not with its running statistics; only after `model.eval()` "
        "does it use `running_mean` and `running_var`.\n\n"
        "Here the layer runs natively and every formula people write is applied to the very "
        "same input. A formula *matches* when its largest error is below 1e-5 of the output's "
        "largest value. The other classic slips -- `x.var()` (unbiased), forgetting gamma and "
        "beta, eps outside the square root, per-image statistics -- each leave their own "
        "fingerprint, so an output you computed yourself can be attributed to one of them."
    ),
    run=explain,
    add_arguments=add_arguments,
    kwargs_from_args=kwargs_from_args,
    figures=figures,
    controls=controls,
))
