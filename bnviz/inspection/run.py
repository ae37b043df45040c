""":func:`inspect` and the steps of one inspection, in order (:func:`_run_on_copy`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..devices import is_cuda_oom, resolve_device
from ..errors import BnvizError, DeviceError, LayerError
from ..modes import (
    LayerMode,
    apply_mode,
    bn_layers,
    has_running_stats,
    resolve_modes,
    unknown_layer_error,
)
from ..stimuli.finite import nonfinite_summary
from .blocks import _flat_run
from .copies import _MODEL_LOCK, _POOL, _CopyInfo, _info
from .fingerprint import _scan
from .fused import after_norm, set_children_training
from .fused import install as install_fused
from .layer_reports import _layer_reports
from .report import InspectionReport, Prediction
from .session import TensorSink, _Session
from .snapshot import _running_scales, _snapshot
from .tensors import _cpu


@dataclass(frozen=True, slots=True)
class _Request:
    """One call of :func:`inspect`, checked: what to run, on what, and what to report."""

    module: torch.nn.Module
    loaded: Any  # the bnviz LoadedModel, or None for a plain module
    model_input: torch.Tensor | tuple[torch.Tensor, ...]  # after preprocessing
    preprocessing: str | None
    requested: dict[str, LayerMode]  # the layers whose mode was given
    device: torch.device
    keep: set[str]  # the layers whose tensors are kept
    other_modules: str  # "eval" or "keep"
    commit: bool
    top_k: int
    names: list[str]  # every BN layer of the model
    sink: TensorSink | None


def inspect(
    model,
    x: torch.Tensor,
    modes: str | LayerMode | Mapping[str, str | LayerMode] | None = None,
    device: str | torch.device | None = "auto",
    *,
    keep_tensors: bool | Iterable[str] = True,
    other_modules: str = "eval",
    commit: bool = False,
    top_k: int = 5,
    tensor_sink: TensorSink | None = None,
) -> InspectionReport:
    """Run one forward of ``model`` on ``x`` and measure every BatchNorm layer.

    Args:
        model: a :class:`bnviz.models.LoadedModel` (``x`` are then raw images in [0, 1] and
            the model's preprocessing is applied and recorded) or any ``nn.Module`` (``x`` is
            fed as it is; BatchNorm1d/2d/3d and SyncBatchNorm are all inspected).
        x: the input batch, or a tuple of inputs for a model with several (called as
            ``model(*x)``; the report's ``input_shape`` is the first one's, and
            ``notes["input_shapes"]`` lists them all).
        modes: one mode string for every BN layer (``"eval"``, ``"train,momentum=none"``,
            ...) or ``{layer name: mode}``; layers not named keep the model's own setting.
            See :mod:`bnviz.modes`.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``. Report tensors are
            always on the CPU.
        keep_tensors: keep each layer's input, native output and activation output
            (``True``), none of them (``False``, statistics only: the cheapest), or only
            the named layers.
        other_modules: ``"eval"`` (default) runs non-BN modules such as Dropout in eval so
            the numbers are reproducible; ``"keep"`` leaves them as the model has them.
        commit: copy the running-stat update of this forward back into ``model``'s
            buffers. Without it the caller's model is never modified.
        top_k: number of predictions per image (when the output looks like class logits).
        tensor_sink: receives each kept layer's tensors during the forward, so a caller can
            summarise them on another core while the network runs (see :class:`TensorSink`;
            the dashboard does). Used only when the forward runs on the CPU.

    Returns:
        An :class:`InspectionReport`.

    Example::

        >>> import bnviz
        >>> m = bnviz.load_model("efficientnet_lite0")
        >>> x = bnviz.make_stimulus("image", name="chelsea", batch_size=4, composition="jitter")
        >>> r = bnviz.inspect(m, x, modes="train", keep_tensors=False)
        >>> r.layers[0].stats_used, r.layers[0].max_abs_diff < 1e-4
        ('batch', True)
    """
    if other_modules not in ("eval", "keep"):
        raise BnvizError(f"Invalid other_modules {other_modules!r}.", "use 'eval' or 'keep'.")
    # Duck-typed so this module does not import torchvision (bnviz.models does).
    is_loaded = hasattr(model, "module") and hasattr(model, "preprocess")
    loaded = model if is_loaded and not isinstance(model, torch.nn.Module) else None
    module = loaded.module if loaded is not None else model
    if not isinstance(module, torch.nn.Module):
        raise BnvizError(
            f"inspect() needs an nn.Module or a bnviz LoadedModel, got {type(model).__name__}.",
            "pass bnviz.load_model(name) or your own torch.nn.Module.",
        )
    several = isinstance(x, tuple | list)  # a model with several inputs: model(*x)
    if not (all(isinstance(t, torch.Tensor) for t in x) and len(x) > 0 if several
            else isinstance(x, torch.Tensor)):
        raise BnvizError(
            f"inspect() needs a tensor input (or a tuple of tensors), got "
            f"{type(x).__name__}.",
            "use bnviz.make_stimulus(...) or a torch.Tensor of shape (N, C, H, W).",
        )
    if several and loaded is not None and not loaded.preprocess.identity:
        raise BnvizError(f"{loaded.name} takes one image batch, got a tuple of {len(x)} inputs.",
                         "pass one tensor of shape (N, 3, H, W).")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BnvizError(f"Invalid top_k {top_k!r}.", "use a whole number of at least 1.")
    damage = next((d for d in map(nonfinite_summary, x if several else (x,)) if d), None)
    if damage is not None:
        # One NaN reaches every later value through the convolutions: nothing shown would mean
        # anything, so the input is refused rather than run.
        raise BnvizError(f"The input holds NaN or infinite values: {damage}.",
                         "pass finite values (check how the input was made or loaded).")
    dev = resolve_device(device)
    sig, names = _scan(module)
    requested = resolve_modes(modes, names)
    if keep_tensors is True:
        keep = set(names)
    elif keep_tensors is False or keep_tensors is None:
        keep = set()
    else:
        keep = set(keep_tensors)
        for n in keep:
            if n not in names:
                raise unknown_layer_error(n, names)

    preprocessing = None
    model_input = tuple(t.detach() for t in x) if several else x.detach()
    if loaded is not None:
        model_input = loaded.preprocess(model_input)
        preprocessing = loaded.preprocess.description
    request = _Request(module, loaded, model_input, preprocessing, requested, dev, keep,
                       other_modules, commit, top_k, names,
                       tensor_sink if keep and dev.type == "cpu" else None)
    try:
        return _run(request, sig)
    except torch.cuda.OutOfMemoryError as exc:
        raise DeviceError(
            f"CUDA ran out of memory inspecting a batch of shape {_shape_text(model_input)}.",
            "use a smaller batch size or image, keep fewer tensors, or --device cpu.",
        ) from exc
    except RuntimeError as exc:
        if is_cuda_oom(exc):
            raise DeviceError(
                f"Out of memory inspecting a batch of shape {_shape_text(model_input)}.",
                "use a smaller batch size or image, or keep fewer tensors.",
            ) from exc
        raise


def _run(request: _Request, sig: tuple) -> InspectionReport:
    """:func:`_run_on_copy` on a private copy checked out of the pool (``sig``: the model's
    fingerprint) and given back afterwards."""
    private, sig = _POOL.acquire(request.module, request.device, sig)
    try:
        return _run_on_copy(private, request)
    finally:
        _info(private).session = None
        _POOL.release(request.module, request.device, private, sig)


def _run_on_copy(private: torch.nn.Module, req: _Request) -> InspectionReport:
    """One inspection on the private copy, in order:

    1. the training flags of the original (the rest in eval unless kept), then the modes;
    2. each BN layer's forward wrapped (once per pooled copy);
    3. whether to watch every torch op: what consumes each BN output depends only on the
       code path, so it is learned once per (training flags, input shape) and reused, but
       a forward that keeps tensors always watches (copy-on-write);
    4. every layer's buffers and state, and the compiled probe's blocks;
    5. the forward, each BN call measured by the session;
    6. what consumed each BN output: remembered, or filled in from an earlier forward;
    7. the layer reports, notes, the optional commit and the predictions.
    """
    info = _info(private)
    bns = info.bns
    _set_training_flags(info, req.other_modules)
    like = next(iter(private.parameters()), None)  # dtype/device of buffers track=on creates
    for name, mode in req.requested.items():
        bn = bns[name]
        # nn.Module.train() reaches a norm-act layer's dropout and activation: they keep
        # the flags the other modules got
        children = [(c, c.training) for c in bn.modules() if c is not bn] if bn._modules else ()
        apply_mode(bn, mode, like)
        if children:
            set_children_training(bn, children)
    if not info.probed:
        for m in bns.values():
            _install_probe(info, m)
        info.probed = True

    consumers_key = _consumers_key(info, req)
    known = info.consumers.get(consumers_key)
    detect = bool(req.keep) or known is None

    snapshot = _snapshot(bns)
    scales = _running_scales(bns, snapshot)
    session = _Session(info.names_by_id, req.keep, req.device, info.scratch, snapshot, detect,
                       scales, _flat_run(info, snapshot, scales, req.device), req.sink)
    info.session = session
    out, forward_ms = _forward(private, session, bns, req)

    if detect:
        if len(info.consumers) >= 16:
            info.consumers.pop(next(iter(info.consumers)))
        info.consumers[consumers_key] = {
            n: (rec.activation, rec.activation_inplace, rec.overwritten_by)
            for n, rec in session.records.items()
        }
    else:
        for n, rec in session.records.items():
            rec.activation, rec.activation_inplace, rec.overwritten_by = known.get(
                n, (None, None, None))

    layers = _layer_reports(session, bns, req.requested)
    notes = _notes(req, session)
    backends = sorted({"compiled" if rec.probe is None else rec.probe.backend
                       for rec in session.records.values()})
    committed = _commit(req.module, bns) if req.commit else False
    loaded = req.loaded
    return InspectionReport(
        model=loaded.name if loaded is not None else type(req.module).__name__,
        weights=loaded.weights if loaded is not None else "caller's module",
        device=str(req.device),
        input_shape=_shapes(req.model_input)[0],
        preprocessing=req.preprocessing,
        model_input=(tuple(map(_cpu, req.model_input)) if isinstance(req.model_input, tuple)
                     else _cpu(req.model_input)),
        predictions=_predictions(out, loaded, req.top_k),
        layers=layers,
        notes=notes,
        committed=committed,
        forward_ms=forward_ms,
        manual_check="+".join(backends) if backends else "eager",
    )


def _set_training_flags(info: _CopyInfo, other_modules: str) -> None:
    """The original's training flags on the copy's BN layers; eval on the others unless
    ``other_modules`` is "keep". Written to ``__dict__``: ``nn.Module.__setattr__`` is slow,
    and a network has hundreds of modules."""
    for ref, m in info.bn_pairs:
        m.__dict__["training"] = ref().training
    if other_modules == "keep":
        for ref, m in info.other_pairs:
            m.__dict__["training"] = ref().training
    elif info.flags != "eval":  # after an "eval" run they are still False
        for _, m in info.other_pairs:
            m.__dict__["training"] = False
    info.flags = other_modules


def _consumers_key(info: _CopyInfo, req: _Request) -> tuple:
    """What decides the forward's code path as far as the consumers of BN outputs go."""
    flags_of = (info.bns.values() if req.other_modules != "keep"
                else (m for _, m in info.pairs))
    return (req.other_modules, tuple(m.training for m in flags_of),
            _shapes(req.model_input))


def _install_probe(info: _CopyInfo, module: _BatchNorm) -> None:
    """Run ``module``'s own forward between the current session's before/after steps.

    Installed once per pooled copy as an instance ``forward`` instead of a forward pre-hook
    and a forward hook: with hooks registered, every call takes ``nn.Module``'s slow path,
    which costs more than the compiled check of a small layer. Outside an inspection (no
    session) it is the layer's own forward.
    """
    native = module.forward  # the class's forward, or one the model set on the instance
    children = after_norm(module)
    if children:  # timm's BatchNormAct2d: measured before its own activation
        install_fused(info, module, native, children)
        return

    def forward(*args, **kwargs):
        session = info.session
        if session is None:
            return native(*args, **kwargs)
        name = session.before_call(module)
        output = native(*args, **kwargs)
        session.after_call(name, module, args, output)
        return output

    module.__dict__["forward"] = forward


def _forward(private: torch.nn.Module, session: _Session, bns: dict[str, _BatchNorm],
             req: _Request) -> tuple[Any, float]:
    """The network's output and the forward's wall time in ms (inside the session's
    watch, when it has one)."""
    several = isinstance(req.model_input, tuple)
    inp = (tuple(t.to(req.device) for t in req.model_input) if several
           else (req.model_input.to(req.device),))
    watch = session.watch if session.watch is not None else contextlib.nullcontext()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), watch:
            out = private(*inp)
    except ValueError as exc:
        if "Expected more than 1 value per channel" in str(exc):
            raise single_value_error(session.current, bns.get(session.current or ""),
                                     exc) from exc
        raise
    if req.device.type == "cuda":
        torch.cuda.synchronize(req.device)
    return out, (time.perf_counter() - t0) * 1000


def _shapes(model_input: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    """The shape of each input (one for a single tensor)."""
    inputs = model_input if isinstance(model_input, tuple) else (model_input,)
    return tuple(tuple(t.shape) for t in inputs)


def _shape_text(model_input) -> str:
    return " and ".join(str(s) for s in _shapes(model_input))


def _notes(req: _Request, session: _Session) -> dict[str, Any]:
    notes: dict[str, Any] = {}
    if req.loaded is not None:
        notes.update(req.loaded.notes)
    if isinstance(req.model_input, tuple):  # the report's input_shape is the first one's
        notes["input_shapes"] = ["x".join(map(str, s)) for s in _shapes(req.model_input)]
    if not req.names:
        notes["no_batchnorm"] = "this model has no BatchNorm layers"
    missing = [n for n in req.names if n not in session.calls]
    if missing:
        notes["layers_not_called"] = missing
    notes["other_modules"] = req.other_modules
    return notes


def single_value_error(layer: str | None, bn: _BatchNorm | None,
                       exc: Exception) -> LayerError:
    """PyTorch's "Expected more than 1 value per channel" as the real cause and a fix.

    A layer normalises with batch statistics in train mode, and also in eval when it has no
    running buffers (built with ``track_running_stats=False``, or ``track=none``): the two
    need different fixes.
    """
    name = layer or "?"
    single = ("gets one value per channel (batch statistics of a single value are "
              f"undefined; PyTorch says: {exc})")
    if bn is not None and not bn.training and not has_running_stats(bn):
        return LayerError(
            f"Layer {name!r} is in eval mode but has no running statistics (built with "
            f"track_running_stats=False, or mode track=none), so it normalises with batch "
            f"statistics, and it {single}.",
            f"use batch size >= 2 or a larger input, or give the layer running statistics: "
            f"mode 'eval,track=on' (fresh buffers: mean 0, var 1) for {name!r}.",
        )
    return LayerError(
        f"Layer {name!r} is in train mode and {single}.",
        f"use batch size >= 2 or a larger input, or put that layer in eval "
        f"(mode 'eval' for {name!r}).",
    )


def _commit(module: torch.nn.Module, private_bns: dict[str, _BatchNorm]) -> bool:
    """Write the private copy's running buffers back into the caller's model."""
    changed = False
    with _MODEL_LOCK, torch.no_grad():
        for name, orig in bn_layers(module):
            new = private_bns[name]
            if not has_running_stats(orig) or not has_running_stats(new):
                continue
            orig.running_mean.copy_(new.running_mean)
            orig.running_var.copy_(new.running_var)
            if orig.num_batches_tracked is not None and new.num_batches_tracked is not None:
                orig.num_batches_tracked.copy_(new.num_batches_tracked)
            changed = True
    return changed


def logits_of(out: Any) -> torch.Tensor | None:
    """The class-logit tensor of a model output (tensor, GoogLeNet/Inception tuples, dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping):
        if "out" in out:
            return out["out"]
        out = list(out.values())
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _predictions(out, loaded, top_k) -> list[list[Prediction]] | None:
    logits = logits_of(out)
    if logits is None or logits.dim() != 2 or logits.shape[1] < 2:
        return None
    probs = torch.softmax(logits.detach().float(), dim=1).cpu()
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    names = loaded.class_names if loaded is not None else None
    rows = []
    for vals, idxs in zip(values.tolist(), indices.tolist()):
        rows.append(
            [
                Prediction(
                    index=i,
                    label=names[i] if names and i < len(names) else f"class {i}",
                    probability=v,
                )
                for v, i in zip(vals, idxs)
            ]
        )
    return rows
