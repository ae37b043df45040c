"""Running the candidate side by side with the native layer in one setting, and judging
each check.

Per training step both layers start from the same parameters and buffers (the candidate is
given the native values again before each step), see the same input and the same upstream
gradient, and every difference is measured per channel against the native result. Where a
result departs, the alternatives of :mod:`bnviz.bn_check.hypotheses` name the cause.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .candidate import (
    PARAMETER_NAMES,
    STATE_NAMES,
    TINY_RUNNING_VAR,
    Config,
    Located,
    build,
    build_native,
    locate,
    native_state,
    read,
    short_error,
    sync,
)
from .findings import CHECKS, merge_names

# Imported without importing the package first: ``from . import x`` can deadlock concurrent
# first imports of bnviz (see bnviz/manual_bn.py).
hyp = importlib.import_module(".hypotheses", __package__)

#: Largest per-channel relative difference that counts as equal, by dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
#: A float64 result within this of the native one, but not within float64's tolerance, was
#: computed in float32. Alternatives are matched at this tolerance too.
FLOAT32_TOL = TOLERANCE[torch.float32]
#: How close a fitted running-update weight must be to a convention to be called it.
FACTOR_TOL = 1e-3

#: (mean, std) of the input's channels; rotated from one input to the next, so every
#: channel meets each regime. The tiny one (var 9e-6, below eps = 1e-5) makes eps placement
#: visible, the others make biased vs unbiased and momentum visible.
CHANNEL_STATS = ((0.5, 1.0), (0.0, 0.003), (3.0, 2.0), (-1.0, 0.1))


@dataclass
class Observation:
    check: str
    cause: str
    config: str
    values: dict
    formula: str | None = None  # a FORMULA key where the cause's own line is not the one


@dataclass
class Recorder:
    """The observations of one setting, one per (check, cause); names are merged.

    A departure of an output or a gradient is first only suspected, with every cause that
    explains it at that step; :func:`attribute` then picks one cause that explains every step,
    because at a single step two mistakes can give the same numbers (with momentum=None the
    first update copies the batch's statistics, so normalising with the running statistics
    then equals normalising with the unbiased variance). Running updates are fitted per step
    and judged by :meth:`conclude`.
    """

    config: Config
    observations: dict[tuple[str, str], Observation] = field(default_factory=dict)
    checks: set[str] = field(default_factory=set)
    suspects: dict[str, dict] = field(default_factory=dict)
    fits: dict[str, list[dict]] = field(default_factory=dict)
    built: bool = False  # whether the candidate could be built for this setting

    def add(self, check: str, cause: str, formula: str | None = None, **values) -> None:
        key = (check, cause)
        seen = self.observations.get(key)
        if seen is None:
            values.setdefault("config", self.config.label)
            self.observations[key] = Observation(check, cause, self.config.label, values,
                                                 formula)
        elif "name" in values:
            seen.values["name"] = merge_names(seen.values.get("name", ""), values["name"])

    def suspect(self, check: str, causes: list[str], values: dict, *, generic: str,
                formula: str | None = None) -> None:
        """One step's departure: the causes that explain it, most specific first."""
        entry = self.suspects.setdefault(check, {"steps": [], "values": values,
                                                 "generic": generic, "formula": formula})
        entry["steps"].append(causes or [generic])

    def fit(self, name: str, **step) -> None:
        """One step's running update of ``name``, as fitted by :func:`judge_running`."""
        self.fits.setdefault(name, []).append(step)

    def conclude(self) -> None:
        """Judge the running updates of the setting; the forward and gradient departures
        wait for :func:`attribute`, which sees every setting."""
        if any(cause == "state_not_moved" for _, cause in self.observations):
            # a tensor left behind by module.to(float64) explains float32-level results
            for entry in self.suspects.values():
                entry["steps"] = [causes for causes in entry["steps"]
                                  if causes != ["float32_precision"]]
        for name, steps in self.fits.items():
            conclude_running(self, name, steps)
        self.fits.clear()


def attribute(recorders: list[Recorder]) -> None:
    """Turn the departures each setting suspected into findings.

    A check's departures are attributed to the first cause that explains every step of every
    setting where they were seen: a setting with a single step may be ambiguous where the
    others are not. Failing that, each setting gets the cause that explains all its own
    steps, or else each step's first.
    """
    by_check: dict[str, list[tuple[Recorder, dict]]] = {}
    for rec in recorders:
        for check, entry in rec.suspects.items():
            if entry["steps"]:
                by_check.setdefault(check, []).append((rec, entry))
    for check, seen in by_check.items():
        every = [causes for _, entry in seen for causes in entry["steps"]]
        common = _common(every)
        for rec, entry in seen:
            own = entry["steps"]
            chosen = (common[:1] or _common(own)[:1]
                      or list(dict.fromkeys(causes[0] for causes in own)))
            for cause in chosen:
                formula = entry["formula"] if cause == entry["generic"] else None
                rec.add("dtype" if cause == "float32_precision" else check, cause,
                        formula=formula, **entry["values"])
    for rec in recorders:
        rec.suspects.clear()


def _common(steps: list[list[str]]) -> list[str]:
    return [c for c in steps[0] if all(c in other for other in steps[1:])]


@dataclass
class Inputs:
    generator: torch.Generator
    config: Config
    phase: int = 0

    def batch(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """An input with the channel regimes of :data:`CHANNEL_STATS`, and an upstream
        gradient."""
        c = shape[1]
        stats = [CHANNEL_STATS[(i + self.phase) % len(CHANNEL_STATS)] for i in range(c)]
        self.phase += 1
        mean = torch.tensor([m for m, _ in stats], dtype=torch.float64)
        std = torch.tensor([s for _, s in stats], dtype=torch.float64)
        z = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        x = hyp.per_channel(mean, len(shape)) + hyp.per_channel(std, len(shape)) * z
        g = torch.randn(shape, generator=self.generator, dtype=torch.float64)
        cfg = self.config
        return x.to(cfg.device, cfg.dtype), g.to(cfg.device, cfg.dtype)


@dataclass
class Pass:
    """One forward and backward: output, input gradient and parameter gradients."""

    y: torch.Tensor | None = None
    x_grad: torch.Tensor | None = None
    param_grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    forward_ok: bool = False  # it ran and returned a tensor of the right shape
    backward_ok: bool = False
    dtype_ok: bool = True


def run_native(native: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Pass:
    native.zero_grad(set_to_none=True)
    xn = x.clone().requires_grad_(True)
    y = native(xn)
    (y * g).sum().backward()
    grads = {n: getattr(native, n).grad for n in PARAMETER_NAMES
             if isinstance(getattr(native, n, None), torch.Tensor)}
    return Pass(y.detach(), xn.grad, grads, True, True)


def run_candidate(module: nn.Module, found: dict[str, Located], x: torch.Tensor,
                  g: torch.Tensor, rec: Recorder, *, mode: str, forward_check: str) -> Pass:
    """The candidate's forward and backward, every failure recorded as a finding."""
    out = Pass()
    params = {n: read(module, found[n]) for n in PARAMETER_NAMES if n in found}
    for p in params.values():
        if p is not None:
            p.grad = None
    xc = x.clone().requires_grad_(True)
    try:
        y = module(xc)
    except Exception as exc:  # the candidate's code: a finding, not a crash
        rec.add(_crash_check(forward_check, rec.config), "raises",
                where=f"its forward in {mode} mode", error=short_error(exc),
                formula=_forward_line(forward_check, rec.config))
        return out
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
        got = (f"a tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor)
               else type(y).__name__)
        rec.add(_crash_check(forward_check, rec.config), "bad_output", got=got,
                expected=tuple(x.shape),
                formula=_forward_line(forward_check, rec.config))
        return out
    rec.checks.update({"dtype", "device"})
    if y.dtype != x.dtype:
        rec.add("dtype", "wrong_output_dtype", got=str(y.dtype).replace("torch.", ""),
                expected=str(x.dtype).replace("torch.", ""))
        out.dtype_ok = False
    if y.device != x.device:
        rec.add("device", "wrong_output_device", got=str(y.device), expected=str(x.device))
    out.y, out.forward_ok = y.detach(), True
    if not y.requires_grad:
        rec.add("grad_input", "output_detached")
        return out
    try:
        (y * g.to(y.device, y.dtype)).sum().backward()
    except Exception as exc:
        rec.add(_crash_check("grad_input", rec.config), "raises",
                where=f"its backward in {mode} mode", error=short_error(exc),
                formula=rec.config.focus or "grad_input")
        return out
    out.backward_ok = True
    out.x_grad = xc.grad
    out.param_grads = {n: (None if p is None else p.grad) for n, p in params.items()}
    return out


def _forward_line(check: str, config: Config) -> str:
    """The formula line a crash or an unexplained output breaks: the setting's own line
    where the setting is about one (affine=False, ...), else the forward's."""
    if config.focus is not None:
        return config.focus
    return "normalise_eval" if check == "forward_eval" else "normalise_train"


def _crash_check(check: str, config: Config) -> str:
    """The check a crash is reported under: the setting's subject, if it has one."""
    return config.focus if config.focus in CHECKS else check


def judge(got: torch.Tensor, ref: torch.Tensor, alternatives: hyp.Alternatives,
          config: Config, *, dtype_ok: bool = True, channel_dim: int = 1,
          scale: torch.Tensor | None = None) -> tuple[list[str], dict] | None:
    """None when ``got`` equals the native ``ref``; else the causes that explain it (most
    specific first; empty when none does) and its numbers. ``scale``: see
    :func:`bnviz.bn_check.hypotheses.channel_errors`."""
    errs = hyp.channel_errors(got, ref, channel_dim, scale)
    worst = float(errs.max())
    tol = TOLERANCE[config.dtype]
    if worst <= tol:
        return None
    values = {"rel": worst, "channel": int(errs.argmax())}
    alt_errors = [(cause, float(hyp.channel_errors(got, alt, channel_dim).max()))
                  for cause, alt in alternatives]
    if config.dtype == torch.float64 and worst <= FLOAT32_TOL:
        # close at float32's precision: a mistake that matters little here, or float32 inside
        exact = [cause for cause, err in alt_errors if err <= 10 * tol]
        if exact:
            return exact, values
        return (["float32_precision"], values) if dtype_ok else None
    return [cause for cause, err in alt_errors if err <= FLOAT32_TOL], values


def check_structure(module: nn.Module, found: dict[str, Located], native: nn.Module,
                    rec: Recorder, num_features: int) -> None:
    """Which of nn.BatchNorm's parameters and buffers the candidate has, and how."""
    rec.checks.add("state")
    nstate = native_state(native)
    kept = []
    for name in STATE_NAMES:
        loc = found.get(name)
        if name in nstate and loc is None:
            if name == "num_batches_tracked":
                rec.add("num_batches_tracked", "nbt_missing")
            elif name in PARAMETER_NAMES:
                rec.add("state", "missing_parameter", name=name)
            else:
                rec.add("state", "missing_buffer", name=name)
        elif name not in nstate and loc is not None and name not in PARAMETER_NAMES:
            kept.append(loc.path)
        if loc is None:
            continue
        if not loc.registered:
            rec.add("state", "not_registered", name=loc.path)
        value = read(module, loc)
        if value is not None and value.is_floating_point():
            for got, expected, check in ((value.dtype, rec.config.dtype, "dtype"),
                                         (value.device, rec.config.device, "device")):
                if got != expected and not (check == "device" and got.type == expected.type):
                    rec.add(check, "state_not_moved", name=loc.path,
                            got=str(got).replace("torch.", ""),
                            expected=str(expected).replace("torch.", ""))
        expected = 1 if name == "num_batches_tracked" else num_features
        if name in nstate and value is not None and value.numel() != expected:
            rec.add("state", "state_shape", name=loc.path, got=value.numel(), expected=expected)
    if not rec.config.affine:
        rec.checks.add("affine")
        learnable = [n for n, p in module.named_parameters() if p.requires_grad]
        learnable += [found[n].path for n in PARAMETER_NAMES
                      if n in found and found[n].path not in learnable]
        if learnable:
            rec.add("affine", "affine_ignored", name=", ".join(learnable))
    if not rec.config.track_running_stats:
        rec.checks.add("track_running_stats")
        if kept:
            rec.add("track_running_stats", "track_buffers_kept", name=", ".join(kept))


def _flat(module: nn.Module, loc: Located | None, numel: int) -> torch.Tensor | None:
    value = None if loc is None else read(module, loc)
    if value is None or value.numel() != numel:
        return None
    return hyp.f64(value).reshape(-1)


def judge_running(module, found, before, after, x, rec: Recorder) -> None:
    """Fit the candidate's running statistics after one training step (judged at the end of
    the setting by :func:`conclude_running`), and check its count."""
    config = rec.config
    tol = TOLERANCE[config.dtype]
    mean, var, unbiased, count = hyp.moments(x)
    c = mean.numel()
    nbt = after.get("num_batches_tracked")
    factor = (config.momentum if config.momentum is not None
              else 1.0 / float(nbt) if nbt is not None else None)
    rec.checks.add("running_stats")
    for name, targets in (("running_mean", [("unbiased", mean)]),
                          ("running_var", [("unbiased", unbiased), ("biased", var)])):
        got = _flat(module, found.get(name), c)
        if got is None or name not in after:
            continue
        ref, pre = hyp.f64(after[name]), hyp.f64(before[name])
        worst = float(hyp.channel_errors(got, ref).max())
        fits = {}  # kind of variance -> the weight that explains the update with it
        for kind, target in targets:
            used = hyp.fit_factor(got, pre, target)
            if used is None:
                continue
            predicted = pre + used * (target - pre)
            if float(hyp.channel_errors(got, predicted).max()) <= FLOAT32_TOL:
                fits[kind] = used
        rec.fit(name, worst=worst, ok=worst <= tol, count=count, expected=factor, fits=fits,
                precision=config.dtype == torch.float64 and worst <= FLOAT32_TOL)
    loc = found.get("num_batches_tracked")
    if loc is not None and nbt is not None:
        rec.checks.add("num_batches_tracked")
        value = read(module, loc)
        got = int(value.reshape(-1)[0]) if value is not None and value.numel() else None
        if got != int(nbt):
            cause = ("nbt_not_incremented" if got == int(before["num_batches_tracked"])
                     else "nbt_wrong")
            rec.add("num_batches_tracked", cause, got=got, expected=int(nbt))


#: The momentum conventions a fitted weight ``used`` can follow, given the right one ``f``;
#: in order of preference when several explain every step.
CONVENTIONS = (
    ("", lambda f: f),
    ("momentum_reversed", lambda f: 1 - f),
    ("no_running_update", lambda f: 0.0),
    ("replaces_running", lambda f: 1.0),
)


def conclude_running(rec: Recorder, name: str, steps: list[dict]) -> None:
    """The cause of the running update's departures over all steps of a setting.

    Each step's update is fitted as ``running + used * (target - running)``, with the
    unbiased and with the biased variance as target. The first variance and convention
    (:data:`CONVENTIONS`) that explain every step are the diagnosis: with momentum=None the
    right weight changes from step to step, so a fixed one is caught, and with one channel,
    where any single update fits some weight, the convention decides which variance it was.
    """
    if all(step["ok"] for step in steps):
        return
    bad = [step for step in steps if not step["ok"]]
    worst = max(step["worst"] for step in bad)
    if all(step["precision"] for step in bad):
        if not any(cause == "state_not_moved" for _, cause in rec.observations):
            rec.add("running_stats", "float32_precision", name=name, rel=worst)
        return
    kinds = [k for k in ("unbiased", "biased") if all(k in s["fits"] for s in steps)]
    if not kinds or any(step["expected"] is None for step in steps):
        rec.add("running_stats", "running_differs", name=name, rel=worst)
        return
    for kind in kinds:
        for cause, convention in CONVENTIONS:
            if all(abs(s["fits"][kind] - convention(s["expected"])) <= FACTOR_TOL
                   for s in steps):
                _running_causes(rec, name, kind, cause, bad, worst)
                return
    cause = "momentum_none_ignored" if rec.config.momentum is None else "wrong_momentum"
    _running_causes(rec, name, kinds[0], cause, bad, worst)


def _running_causes(rec: Recorder, name: str, kind: str, cause: str, bad: list[dict],
                    worst: float) -> None:
    if kind == "biased":
        rec.add("running_stats", "biased_running_var", name=name, count=bad[0]["count"])
    if cause:
        shown = next((s for s in bad if abs(s["fits"][kind] - s["expected"]) > FACTOR_TOL),
                     bad[0])
        rec.add("running_stats", cause, name=name, used=shown["fits"][kind],
                expected=shown["expected"])
    elif kind != "biased":  # follows the formula, yet differs: nothing named explains it
        rec.add("running_stats", "running_differs", name=name, rel=worst)


def judge_gradients(cand: Pass, ref: Pass, x, g, weight, rec: Recorder, *,
                    batch_stats: bool, running: tuple | None = None) -> None:
    """Gradients w.r.t. the input, weight and bias (only where the forward matched);
    ``running``: the (mean, var) an eval forward normalised with."""
    config = rec.config
    if batch_stats:
        mean, var, _, _ = hyp.moments(x)
    else:
        mean, var = running
    scales = hyp.parameter_gradient_scales(hyp.normalised(x, mean, var, config.eps), g)
    rec.checks.add("grad_input")
    if cand.x_grad is None:
        rec.add("grad_input", "no_input_grad")
    else:
        alternatives = (hyp.input_gradient(x, g, weight=weight, eps=config.eps)
                        if batch_stats else [])
        verdict = judge(cand.x_grad, ref.x_grad, alternatives, config, dtype_ok=cand.dtype_ok)
        if verdict is not None:
            causes, values = verdict
            rec.suspect("grad_input", causes, {"name": "input", **values},
                        generic="grad_differs")
    for name in PARAMETER_NAMES:
        if ref.param_grads.get(name) is None or name not in cand.param_grads:
            continue
        check = f"grad_{name}"
        rec.checks.add(check)
        got = cand.param_grads[name]
        if got is None:
            rec.add(check, "no_param_grad", name=name)
            continue
        if got.numel() != ref.param_grads[name].numel():
            continue
        verdict = judge(got.reshape(-1), ref.param_grads[name], [], config,
                        dtype_ok=cand.dtype_ok, channel_dim=0, scale=scales[name])
        if verdict is not None:
            causes, values = verdict
            rec.suspect(check, causes, {"name": name, **values}, generic="grad_differs")


def run_config(impl, reference: type, num_features: int, config: Config,
               shapes: list[tuple[int, ...]], names: dict | None, seed: int) -> Recorder:
    """Every check of one setting; the result is the setting's recorder."""
    rec = Recorder(config)
    generator = torch.Generator().manual_seed(seed)
    native = build_native(reference, num_features, config, generator)
    built = build(impl, num_features, config)
    rec.checks.add("constructor")
    for check, cause, values in built.problems:
        rec.add(check, cause, formula=check if cause == "raises" else None, **values)
    module = built.module
    rec.built = module is not None
    if module is not None:
        with torch.enable_grad():
            _run_steps(module, native, rec, num_features, shapes, names, generator)
    rec.conclude()
    return rec


def _run_steps(module, native, rec: Recorder, num_features, shapes, names, generator) -> None:
    config = rec.config
    found = locate(module, names)
    check_structure(module, found, native, rec, num_features)
    _defaults_for_missing(native, found)
    inputs = Inputs(generator, config)
    for step in range(config.steps):
        x, g = inputs.batch(shapes[step % len(shapes)])
        before = native_state(native)
        sync(module, found, before)
        native.train()
        module.train()
        ref = run_native(native, x, g)
        cand = run_candidate(module, found, x, g, rec, mode="train",
                             forward_check="forward_train")
        if not cand.forward_ok:
            return
        rec.checks.add("forward_train")
        if config.track_running_stats:
            judge_running(module, found, before, native_state(native), x, rec)
        # it may normalise with the running statistics from before its update or after
        running = [(before.get("running_mean"), before.get("running_var")),
                   tuple(_flat(module, found.get(n), num_features)
                         for n in ("running_mean", "running_var"))]
        alternatives = hyp.train_forward(x, weight=before.get("weight"), bias=before.get("bias"),
                                         eps=config.eps, running=running)
        verdict = judge(cand.y, ref.y, alternatives, config, dtype_ok=cand.dtype_ok)
        if verdict is not None:
            causes, values = verdict
            rec.suspect("forward_train", causes, values, generic="forward_differs",
                        formula=_forward_line("forward_train", config))
        elif cand.backward_ok:
            judge_gradients(cand, ref, x, g, before.get("weight"), rec, batch_stats=True)
    if config.eval:
        for shape in shapes:
            run_eval(module, found, native, inputs, shape, rec)


def _defaults_for_missing(native: nn.Module, found: dict[str, Located]) -> None:
    """Where the candidate has no tensor for one of the native layer's, the native one goes
    back to nn.BatchNorm's initial value, which the candidate's own (under a name not found)
    most likely has too: so a missing name is one finding, and the rest is still checked."""
    with torch.no_grad():
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                            ("running_var", 1.0)):
            tensor = getattr(native, name, None)
            if name not in found and isinstance(tensor, torch.Tensor):
                tensor.fill_(value)


def run_eval(module, found, native, inputs: Inputs, shape, rec: Recorder) -> None:
    config = rec.config
    tracks = config.track_running_stats
    x, g = inputs.batch(shape)
    if tracks and "running_var" in found:  # training moved it: below eps again, as at first
        with torch.no_grad():
            native.running_var[1::4] = TINY_RUNNING_VAR
    before = native_state(native)
    if tracks:
        sync(module, found, before)
    kept = {n: read(module, found[n]) for n in ("running_mean", "running_var",
                                                 "num_batches_tracked") if n in found}
    kept = {n: v.detach().clone() for n, v in kept.items() if v is not None}
    native.eval()
    module.eval()
    ref = run_native(native, x, g)
    cand = run_candidate(module, found, x, g, rec, mode="eval", forward_check="forward_eval")
    if not cand.forward_ok:
        return
    rec.checks.add("forward_eval")
    if tracks:
        for name, old in kept.items():
            new = read(module, found[name])
            if new is not None and not torch.equal(new.detach(), old):
                if name == "num_batches_tracked":
                    rec.add("num_batches_tracked", "nbt_counts_eval")
                else:
                    rec.add("running_stats", "updates_in_eval", name=name)
        alternatives = hyp.eval_forward(x, weight=before.get("weight"), bias=before.get("bias"),
                                        eps=config.eps, running_mean=before["running_mean"],
                                        running_var=before["running_var"])
    else:
        c = x.shape[1]
        alternatives = hyp.untracked_eval_forward(
            x, weight=before.get("weight"), bias=before.get("bias"), eps=config.eps,
            candidate_running=tuple(_flat(module, found.get(n), c)
                                    for n in ("running_mean", "running_var")))
    verdict = judge(cand.y, ref.y, alternatives, config, dtype_ok=cand.dtype_ok)
    if verdict is not None:
        causes, values = verdict
        rec.suspect("forward_eval", causes, values, generic="forward_differs",
                    formula=_forward_line("forward_eval", config))
    elif cand.backward_ok:
        judge_gradients(cand, ref, x, g, before.get("weight"), rec, batch_stats=not tracks,
                        running=(before.get("running_mean"), before.get("running_var")))
