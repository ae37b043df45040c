"""Experiment 3: running only part of a network.

docs/stories.md section 1: to get an intermediate output without running all of GoogLeNet,
someone built ``nn.Sequential(model.conv1.conv)`` and got different numbers than a forward
hook on the full model. A network's ``forward`` is code, not just its list of children:
GoogLeNet with ``transform_input=True`` re-normalises the input inside ``forward`` (a
functional step, not a child module), and ResNet calls ``torch.flatten(x, 1)`` between
``avgpool`` and ``fc``. A Sequential of the children skips both.

For a chosen layer the experiment compares four ways of getting its output, all on a
private copy of a real network:

(a) a forward hook on the full model (with ``.clone()``), the reference;
(b) ``nn.Sequential`` of the model's first children, up to the one containing the layer;
(c) ``torchvision.models.feature_extraction.create_feature_extractor`` (FX-traces
    ``forward``, so functional code is kept);
(d) an early-exit forward: the full ``forward`` with a hook that raises as soon as the layer
    has run, so the rest of the network never executes.

Where (b) goes wrong is located, not assumed: the input every top-level child receives is
recorded in the full forward and in the Sequential, and the first child whose input differs
is where ``forward``'s own code intervened. The experiment then checks the explanation:
``model._transform_input(x)`` reproduces what the first child really receives, and
``torch.flatten(x, 1)`` of what the Sequential fed ``fc`` is what ``fc`` receives.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import BnvizError, LayerError
from ..validation import is_random_weights
from .base import PageControls, PitfallResult, StimulusInputs, Widget
from .cli import add_stimulus_options, stimulus_kwargs
from .common import load_experiment_model, make_batch
from .figures import grouped_bars, heatmaps

__all__ = ["AGREE_RTOL", "METHODS", "default_layer", "figures", "run"]

NAME = "partial-forward"
TITLE = "Running part of a network"
STORY = (
    "To get an intermediate output without running all of GoogLeNet, a researcher built "
    "nn.Sequential(model.conv1.conv); its output differed from a forward hook on the full "
    "model (0.436 vs 1.275 for the first unit) (docs/stories.md section 1)."
)
EXPLANATION = (
    "A model is not just its list of children: `forward` is code and may do things "
    "between them. Pretrained GoogLeNet has `transform_input=True` and re-normalises the "
    "input inside `forward`; ResNet flattens between `avgpool` and `fc`. "
    "`nn.Sequential(*model.children())` skips that code, so it gets a different input "
    "(GoogLeNet) or crashes (ResNet's fc).\n\n"
    "What works: a forward hook on the full model (remember `.clone()`), torchvision's "
    "`create_feature_extractor` (it traces `forward`, functional code included), or an "
    "early exit -- a hook that raises once the layer has run, so the rest of the network "
    "never executes, which saves most of the time for early layers."
)

#: Two ways of computing the same layer output agree when max|diff| / max|reference| <= this.
AGREE_RTOL = 1e-6
METHODS = {
    "a": "(a) forward hook on the full model",
    "b": "(b) nn.Sequential of the first children",
    "c": "(c) create_feature_extractor",
    "d": "(d) early-exit forward",
}
FLATTEN_MODEL, FLATTEN_LAYER = "resnet18", "fc"


class _Stop(Exception):
    """Raised by the early-exit hook once the layer has produced its output."""

    def __init__(self, output: torch.Tensor):
        super().__init__("early exit")
        self.output = output


def default_layer(module: nn.Module) -> str:
    """The first leaf module with parameters (the first conv), e.g. GoogLeNet's conv1.conv."""
    for name, m in module.named_modules():
        if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            return name
    raise LayerError(f"{type(module).__name__} has no layer with parameters.",
                     "pass the name of a module with --layer.")


def _check_layer(module: nn.Module, layer: str) -> None:
    import difflib

    names = [n for n, _ in module.named_modules() if n]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3)
        raise LayerError(f"{type(module).__name__} has no module {layer!r}.",
                         f"did you mean {', '.join(close)}?" if close else
                         f"use a module name such as {', '.join(names[:4])}.")


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _keep_output(box: dict) -> Any:
    """A forward hook storing a clone of the output in ``box``. It returns None on purpose:
    a forward hook that returns a value *replaces* the module's output."""
    def hook(module, args, output):
        box.setdefault("out", _first_tensor(output).detach().clone())
    return hook


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _ChildInputs:
    """Pre-hooks on the top-level children that record the input each one receives."""

    def __init__(self, children: list[tuple[str, nn.Module]]):
        self.children = children
        self.inputs: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.handles: list = []

    def __enter__(self):
        for name, child in self.children:
            self.handles.append(child.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(mod, args):
            t = _first_tensor(args)
            if t is not None and name not in self.inputs:
                self.inputs[name] = t.detach().clone()
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def _capture_full(module, x, layer, children):
    target = module.get_submodule(layer)
    box: dict[str, torch.Tensor] = {}
    handle = target.register_forward_hook(_keep_output(box))
    try:
        with torch.no_grad(), _ChildInputs(children) as rec:
            module(x)
    finally:
        handle.remove()
    return box["out"], rec.inputs


def _time_full(module, x, layer, repeats, dev) -> float:
    target = module.get_submodule(layer)
    handle = target.register_forward_hook(_keep_output({}))
    times = []
    try:
        with torch.no_grad():
            for _ in range(repeats):
                _sync(dev)
                t0 = time.perf_counter()
                module(x)
                _sync(dev)
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        handle.remove()
    return statistics.median(times)


def _early_exit(module, x, layer, repeats, dev) -> tuple[torch.Tensor, float]:
    target = module.get_submodule(layer)

    def stop(m, a, out):
        raise _Stop(_first_tensor(out).detach().clone())

    handle = target.register_forward_hook(stop)
    times, result = [], None
    try:
        with torch.no_grad():
            for _ in range(repeats):
                _sync(dev)
                t0 = time.perf_counter()
                try:
                    module(x)
                except _Stop as s:
                    result = s.output
                _sync(dev)
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        handle.remove()
    if result is None:
        raise LayerError(f"Layer {layer!r} is never called by {type(module).__name__}.forward.",
                         "pick a module that the forward pass uses.")
    return result, statistics.median(times)


def _sequential(module, x, layer, children):
    """(b): Sequential of the children up to the one containing ``layer``."""
    top = layer.split(".")[0]
    names = [n for n, _ in children]
    seq = nn.Sequential(OrderedDict(children[: names.index(top) + 1]))
    target = seq.get_submodule(layer)
    box: dict[str, torch.Tensor] = {}
    handle = target.register_forward_hook(_keep_output(box))
    error = None
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), _ChildInputs(children) as rec:
            seq(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        handle.remove()
    return box.get("out"), rec.inputs, error, (time.perf_counter() - t0) * 1000


def _feature_extractor(module, x, layer):
    """(c): torchvision's FX-based feature extractor (traces the model's forward)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    t0 = time.perf_counter()
    try:
        extractor = create_feature_extractor(module, return_nodes={layer: "out"},
                                             suppress_diff_warning=True)
        extractor.eval()
        with torch.no_grad():
            out = _first_tensor(extractor(x)["out"]).detach().clone()
    except Exception as exc:  # FX raises many types (TraceError, TypeError, ...): report it
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 0.0
    return out, None, (time.perf_counter() - t0) * 1000


def _compare(out: torch.Tensor | None, ref: torch.Tensor) -> dict[str, Any]:
    if out is None:
        return {"max_abs_diff": None, "max_rel_diff": None, "agrees_with_a": False}
    if out.shape != ref.shape:
        return {"max_abs_diff": None, "max_rel_diff": None, "agrees_with_a": False,
                "shape": list(out.shape)}
    diff = float((out.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return {"max_abs_diff": diff, "max_rel_diff": rel, "agrees_with_a": rel <= AGREE_RTOL}


def _diagnose(module, x, full_inputs, seq_inputs, seq_error) -> dict[str, Any]:
    """The first top-level child whose input differs between the full forward and (b)."""
    for name, seq_in in seq_inputs.items():
        full_in = full_inputs.get(name)
        if full_in is None:
            continue
        same_shape = full_in.shape == seq_in.shape
        diff = float((full_in.double() - seq_in.double()).abs().max()) if same_shape else None
        if same_shape and diff == 0:
            continue
        out: dict[str, Any] = {
            "child": name,
            "full_input_shape": list(full_in.shape),
            "sequential_input_shape": list(seq_in.shape),
            "input_max_abs_diff": diff,
            "cause": "functional code in forward",
        }
        first = name == next(iter(seq_inputs))
        if first and getattr(module, "transform_input", False) and \
                hasattr(module, "_transform_input"):
            with torch.no_grad():
                transformed = module._transform_input(x)
            out["cause"] = "transform_input"
            out["explained"] = bool(torch.equal(transformed, full_in))
        elif not same_shape and seq_in.dim() > 2 and full_in.dim() == 2:
            out["cause"] = "flatten"
            out["explained"] = bool(torch.equal(torch.flatten(seq_in, 1), full_in))
        return out
    if seq_error:
        child = next(reversed(seq_inputs), None)
        container = child is not None and isinstance(
            module.get_submodule(child), (nn.ModuleList, nn.ModuleDict))
        return {"child": child, "cause": "container" if container else "error",
                "explained": container}
    return {}


def _case(label, module, x, layer, dev, repeats) -> dict[str, Any]:
    _check_layer(module, layer)
    children = list(module.named_children())
    ref, full_inputs = _capture_full(module, x, layer, children)
    t_full = _time_full(module, x, layer, repeats, dev)
    early, t_early = _early_exit(module, x, layer, repeats, dev)
    seq_out, seq_inputs, seq_error, t_seq = _sequential(module, x, layer, children)
    fx_out, fx_error, t_fx = _feature_extractor(module, x, layer)
    diagnosis = _diagnose(module, x, full_inputs, seq_inputs, seq_error)
    outs = {"a": ref, "b": seq_out, "c": fx_out, "d": early}
    errors = {"b": seq_error, "c": fx_error}
    times = {"a": t_full, "b": t_seq if seq_error is None else None, "c": t_fx if fx_error is
             None else None, "d": t_early}
    rows = []
    for key, method in METHODS.items():
        cmp = _compare(outs[key], ref)
        status = "ok"
        if errors.get(key):
            status = f"error: {errors[key]}"
        elif "shape" in cmp:
            status = f"shape {cmp['shape']} instead of {list(ref.shape)}"
        out = outs[key]
        rows.append({
            "case": label,
            "layer": layer,
            "method": method,
            "status": status,
            "max_abs_diff": cmp["max_abs_diff"],
            "max_rel_diff": cmp["max_rel_diff"],
            "agrees_with_a": cmp["agrees_with_a"],
            "first_value": None if out is None or status != "ok" else float(out.flatten()[0]),
            "time_ms": times[key],
        })
    return {"label": label, "layer": layer, "rows": rows, "diagnosis": diagnosis,
            "t_full": t_full, "t_early": t_early, "ref": ref, "seq": seq_out,
            "model_type": type(module).__name__}


def run(
    model: Any = "googlenet",
    weights: Any = "auto",
    layer: str | None = None,
    transform_input: bool = True,
    compare_transform: bool = True,
    flatten_case: bool = True,
    stimulus: str = "image:chelsea",
    composition: str = "different",
    batch_size: int = 2,
    size: int = 112,
    seed: int = 0,
    device: str = "auto",
    repeats: int = 3,
) -> PitfallResult:
    """Compare (a)-(d) for ``layer`` of ``model``, plus two control cases.

    ``model`` is a registry name or your own ``LoadedModel`` / ``nn.Module`` (deep-copied).
    ``transform_input`` applies to GoogLeNet (pretrained GoogLeNet uses True); with
    ``compare_transform`` the same model is also run with the flag flipped, and with
    ``flatten_case`` ResNet18's ``fc`` is added (the flatten inside ``ResNet.forward``).
    ``repeats`` forwards are timed for (a) and (d) in the main case (median).
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise BnvizError(f"repeats must be a positive integer, got {repeats!r}.", "pass e.g. 3.")
    dev = resolve_device(device)
    arch = {"transform_input": bool(transform_input)} if model == "googlenet" else None
    loaded = load_experiment_model(model, weights, arch_kwargs=arch)
    module = loaded.module.to(dev).eval()
    if hasattr(module, "transform_input"):  # our private copy: set the flag as asked
        module.transform_input = bool(transform_input)
    layer = default_layer(module) if layer is None else layer
    _check_layer(module, layer)
    _, x = make_batch(loaded, stimulus, batch_size=batch_size, size=size,
                      composition=composition, seed=seed)
    x = x.to(dev)

    has_flag = hasattr(module, "transform_input")
    cases = [_case(_case_label(loaded.name, module), module, x, layer, dev, repeats)]
    if compare_transform and has_flag:
        flipped = copy.deepcopy(module)
        flipped.transform_input = not module.transform_input
        cases.append(_case(_case_label(loaded.name, flipped), flipped, x, layer, dev, 1))
    flatten_model = None
    if flatten_case and not (loaded.name == FLATTEN_MODEL and layer == FLATTEN_LAYER):
        fw = "random" if is_random_weights(weights) else "auto"
        flatten_model = load_experiment_model(FLATTEN_MODEL, fw)
        fmod = flatten_model.module.to(dev).eval()
        _, fx = make_batch(flatten_model, stimulus, batch_size=batch_size, size=size,
                           composition=composition, seed=seed)
        cases.append(_case(f"{FLATTEN_MODEL} ({flatten_model.weights})", fmod, fx.to(dev),
                           FLATTEN_LAYER, dev, 1))

    rows = [r for c in cases for r in c["rows"]]
    main = cases[0]
    weights_label = loaded.weights
    if flatten_model is not None:
        weights_label = f"{loaded.weights}; {FLATTEN_MODEL}: {flatten_model.weights}"
    verdict, reproduced = _verdict(loaded.name, loaded.weights, cases)
    arrays: dict[str, Any] = {}
    if main["seq"] is not None and main["seq"].shape == main["ref"].shape and \
            main["ref"].dim() == 4:
        arrays["maps"] = {METHODS["a"]: main["ref"][0, 0].cpu().double().numpy(),
                          METHODS["b"]: main["seq"][0, 0].cpu().double().numpy()}
    return PitfallResult(
        name=NAME,
        title=TITLE,
        verdict=verdict,
        reproduced=reproduced,
        table=rows,
        data={
            "layer": layer,
            "transform_input": bool(getattr(module, "transform_input", False)),
            "cases": [{"case": c["label"], "layer": c["layer"], "diagnosis": c["diagnosis"],
                       "full_forward_ms": c["t_full"], "early_exit_ms": c["t_early"]}
                      for c in cases],
            "early_exit_saving": 1 - main["t_early"] / main["t_full"] if main["t_full"] else None,
            "agree_rtol": AGREE_RTOL,
            "repeats": repeats,
        },
        arrays=arrays,
        model=loaded.name,
        weights=weights_label,
        device=str(dev),
    )


def _case_label(name: str, module: nn.Module) -> str:
    if hasattr(module, "transform_input"):
        return f"{name}, transform_input={bool(module.transform_input)}"
    return name


def _method_rows(case) -> dict[str, dict]:
    return {k: r for k, r in zip(METHODS, case["rows"])}


def _verdict(model, weights, cases) -> tuple[str, bool]:
    parts = []
    reproduced = True
    for i, case in enumerate(cases):
        rows = _method_rows(case)
        others = [k for k in ("c", "d") if rows[k]["agrees_with_a"]]
        b = rows["b"]
        intro = f"{case['label']}, layer {case['layer']}: "
        if i == 0:
            intro = f"On {case['label']} ({weights}), layer {case['layer']}: "
        agree = (f"(a), {' and '.join(f'({k})' for k in others)} agree (max diff "
                 f"{max(rows[k]['max_abs_diff'] for k in others):.2g})" if others else
                 "only (a) is available")
        bad = [f"({k}) {rows[k]['status']}" for k in ("c", "d") if not rows[k]["agrees_with_a"]]
        if bad:
            agree += "; " + "; ".join(bad)
        diag = case["diagnosis"]
        if b["agrees_with_a"]:
            b_text = f"(b) agrees too (max diff {b['max_abs_diff']:.2g})"
        elif b["status"] == "ok":
            b_text = (f"(b) differs by up to {b['max_abs_diff']:.3g} (first value "
                      f"{b['first_value']:.4g} vs {rows['a']['first_value']:.4g})")
        else:
            b_text = f"(b) fails ({b['status']})"
        b_text += _cause_text(diag, case["model_type"])
        parts.append(f"{intro}{agree}. {b_text}.")
        if diag.get("cause") == "transform_input":
            reproduced &= not b["agrees_with_a"]
        if "transform_input=False" in case["label"]:
            reproduced &= b["agrees_with_a"]
        if diag.get("cause") == "flatten":
            reproduced &= not b["agrees_with_a"]
    main = cases[0]
    if main["t_full"] > 0:
        saving = 1 - main["t_early"] / main["t_full"]
        parts.append(f"Early exit after {main['layer']} took {main['t_early']:.1f} ms vs "
                     f"{main['t_full']:.1f} ms for the full forward ({saving:.0%} saved).")
    return " ".join(parts), bool(reproduced)


def _cause_text(diag: dict, model_type: str) -> str:
    cause = diag.get("cause")
    if cause == "transform_input":
        checked = (" (verified: model._transform_input(x) is exactly what "
                   f"{diag['child']} receives)" if diag.get("explained") else "")
        return (f" because {model_type}.forward re-normalises the input first "
                f"(transform_input=True, functional code, not a child module), so "
                f"{diag['child']} receives a different input (max diff "
                f"{diag['input_max_abs_diff']:.3g}) in the full forward{checked}")
    if cause == "flatten":
        checked = (" (verified: torch.flatten(x, 1) of the Sequential's input is exactly what "
                   f"{diag['child']} receives)" if diag.get("explained") else "")
        return (f" because {model_type}.forward flattens between the children: "
                f"{diag['child']} receives {diag['full_input_shape']} in the full forward but "
                f"{diag['sequential_input_shape']} in the Sequential{checked}")
    if cause == "container":
        return (f" because {diag['child']} is a container ({model_type}.forward loops over "
                "it in its own code; the container itself has no forward)")
    if cause == "functional code in forward":
        return (f" because {model_type}.forward runs code between its children: "
                f"{diag['child']} receives a different input in the full forward")
    return ""


def figures(result: PitfallResult) -> list:
    rows = result.table
    cases = list(dict.fromkeys(r["case"] for r in rows))
    series = {}
    for key, method in METHODS.items():
        if key == "a":
            continue
        values = []
        for case in cases:
            row = next(r for r in rows if r["case"] == case and r["method"] == method)
            values.append(row["max_abs_diff"] if row["status"] == "ok" else None)
        series[method] = values
    figs = [grouped_bars(cases, series, log=True, yaxis="max |difference| vs (a)",
                         title="Difference from the forward hook on the full model "
                               "(n/a = failed or wrong shape; 0 drawn at 1e-12)")]
    times = {m: [next(r for r in rows if r["case"] == c and r["method"] == m)["time_ms"]
                 for c in cases] for m in (METHODS["a"], METHODS["d"])}
    figs.append(grouped_bars(cases, times, yaxis="ms (median)",
                             title="Full forward vs early exit after the layer"))
    if "maps" in result.arrays:
        figs.append(heatmaps(result.arrays["maps"], title=f"{cases[0]}: "
                             f"{result.data['layer']}, image 0, channel 0"))
    return figs


def add_arguments(parser) -> None:
    add_stimulus_options(parser, model="googlenet", stimulus="image:chelsea",
                         layer_help="module name (default: the first conv, e.g. conv1.conv)")
    parser.add_argument("--no-transform-input", dest="transform_input", action="store_false",
                        help="build GoogLeNet with transform_input=False")
    parser.add_argument("--no-compare-transform", dest="compare_transform",
                        action="store_false", help="skip the flipped transform_input case")
    parser.add_argument("--no-flatten-case", dest="flatten_case", action="store_false",
                        help="skip the ResNet18 fc (flatten) case")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards (median)")


def kwargs_from_args(args) -> dict:
    return {**stimulus_kwargs(args), "transform_input": args.transform_input,
            "compare_transform": args.compare_transform, "flatten_case": args.flatten_case,
            "repeats": args.repeats}


CONTROLS = PageControls(
    StimulusInputs(model="googlenet", stimulus="image:chelsea",
                   models=("googlenet", "resnet18", "resnet50", "mobilenet_v2",
                           "efficientnet_lite0"),
                   layer="any", default_layer="conv1.conv"),
    rows=((
        Widget("transform_input", "GoogLeNet transform_input", "checkbox", default=True),
        Widget("compare_transform", "Also run with the flag flipped", "checkbox", default=True),
        Widget("flatten_case", "Add the ResNet18 fc (flatten) case", "checkbox", default=True),
    ),),
)
