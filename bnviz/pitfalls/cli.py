"""``bnviz pitfalls <name>`` and the run options experiments 1-4 share.

The command is built generically from the registered :class:`~bnviz.pitfalls.base.Experiment`
objects: one sub-subcommand per experiment, in ``EXPERIMENT_MODULES`` order, with the
experiment's own options plus ``--json PATH|-``. Every option has a default, so
``bnviz pitfalls fold`` runs as it is. Without ``--json`` the result is printed as a text
table followed by the verdict; user errors are :class:`~bnviz.errors.BnvizError`, which
``bnviz.cli.main`` turns into one line and exit status 2.

The second half holds the options the explain / inplace-relu / partial-forward /
track-stats experiments share (model, weights, stimulus, batch, device), in three forms
that must agree: ``run()`` keyword defaults, CLI arguments and dashboard controls.
Loading follows one honest rule: ``weights="auto"`` uses pretrained weights when they are
bundled, cached or downloadable, and otherwise an explicitly labelled *random init* model
(the BatchNorm phenomena these experiments show do not depend on the weights, and
torchvision weights cannot be downloaded offline).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import textwrap
import threading
from collections import OrderedDict
from typing import Any

import torch

from ..errors import BnvizError, WeightsUnavailableError
from .base import Experiment, PitfallResult

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SIZE",
    "add_run_arguments",
    "format_result",
    "load_experiment_model",
    "make_batch",
    "model_controls",
    "register_cli",
    "run_arguments",
    "run_cli",
]

#: Small images and batches: every effect shown here is independent of the image size, and
#: the experiments must stay quick on a laptop CPU. ``--size 224`` gives the native size.
DEFAULT_SIZE = 112
DEFAULT_BATCH_SIZE = 2
WEIGHTS_CHOICES = ("auto", "pretrained", "random")


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    """Add ``pitfalls`` with one sub-subcommand per registered experiment."""
    from . import load_all

    experiments = load_all()
    parser = subparsers.add_parser(
        "pitfalls",
        help="reproduce and explain the classic BatchNorm confusions (USER_STORIES.md)",
        description="Each experiment runs on a real network and prints a table and a verdict "
        "computed from PyTorch's own numbers. All options have defaults.",
    )
    sub = parser.add_subparsers(dest="pitfall", metavar="EXPERIMENT")
    sub.required = True
    for name, experiment in experiments.items():
        p = sub.add_parser(
            name,
            help=experiment.title,
            description=f"{experiment.title}\n\n{textwrap.fill(experiment.story, 78)}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        experiment.add_arguments(p)
        if "--json" not in p._option_string_actions:
            p.add_argument("--json", metavar="PATH",
                           help="write the result as JSON to PATH ('-' for stdout)")
        p.set_defaults(func=functools.partial(run_cli, experiment))


def run_cli(experiment: Experiment, args: argparse.Namespace) -> int:
    """Run one experiment from parsed CLI arguments; print the table or write JSON."""
    result = experiment.run(**experiment.kwargs_from_args(args))
    target = getattr(args, "json", None)
    if target:
        from ..cli import _write_json

        _write_json(result.to_json(), target)
    else:
        print(format_result(result))
    return 0


def format_result(result: PitfallResult) -> str:
    """The text form: header, table, verdict."""
    from ..cli import format_table

    head = [f"{result.title}  [{result.name}]"]
    facts = [f"{k}: {v}" for k, v in
             (("model", result.model), ("weights", result.weights), ("device", result.device))
             if v is not None]
    if facts:
        head.append("  ".join(facts))
    return "\n".join([*head, "", format_table(result.table), "", f"verdict: {result.verdict}"])


# --------------------------------------------------------------------------------------------
# Shared run options
# --------------------------------------------------------------------------------------------


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    model: str,
    stimulus: str,
    composition: str = "different",
    layer_help: str | None = "BatchNorm layer name (default: the first one)",
) -> None:
    """The options shared by experiments 1-4, with the experiment's defaults."""
    parser.add_argument("--model", default=model, help=f"registry model (default: {model})")
    parser.add_argument(
        "--weights", default="auto",
        help="auto (pretrained when available, else random init) | pretrained | random | PATH",
    )
    if layer_help:
        parser.add_argument("--layer", default=None, help=layer_help)
    parser.add_argument("--stimulus", default=stimulus,
                        help=f"stimulus spec, e.g. uniform, image:coffee (default: {stimulus})")
    parser.add_argument("--composition", default=composition,
                        help=f"copies | different | jitter (default: {composition})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"image size in pixels (default: {DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """CLI namespace -> the shared ``run()`` keywords."""
    out = {
        "model": args.model,
        "weights": args.weights,
        "stimulus": args.stimulus,
        "composition": args.composition,
        "batch_size": args.batch_size,
        "size": args.size,
        "seed": args.seed,
        "device": args.device,
    }
    if hasattr(args, "layer"):
        out["layer"] = args.layer
    return out


_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 6


def _weights_key(weights: Any) -> str:
    if weights is None:
        return "random"
    text = str(weights).strip()
    lowered = text.lower()
    if lowered in ("random", "none", "random init", "random_init"):
        return "random"
    if lowered in ("auto", "pretrained", "default"):
        return "auto" if lowered == "auto" else "pretrained"
    return text  # a checkpoint path


def load_experiment_model(name: Any, weights: Any = "auto",
                          arch_kwargs: dict[str, Any] | None = None):
    """A :class:`~bnviz.models.LoadedModel` whose module is a private copy.

    The caller may put the copy in train mode, hook it or move it: loaded models are cached
    per process (GoogLeNet takes seconds to initialise) and every call returns a fresh
    ``copy.deepcopy`` of the cached module, which itself is never handed out. ``name`` may
    also be a ``LoadedModel`` or an ``nn.Module`` (yours): it is deep-copied, never touched.

    ``weights``: "auto" = pretrained when bundled, cached or downloadable, else random init
    (labelled "random init"); "pretrained" (raises
    :class:`~bnviz.errors.WeightsUnavailableError` offline); "random"/None; or a checkpoint
    path.
    """
    from ..models import _resolve_name, from_module, load_model, weights_status

    if isinstance(name, torch.nn.Module):
        return from_module(_copy_module(name), name=type(name).__name__)
    if hasattr(name, "module") and hasattr(name, "preprocess"):  # a LoadedModel
        return dataclasses.replace(name, module=_copy_module(name.module), notes=dict(name.notes))
    resolved = _resolve_name(name)
    mode = _weights_key(weights)
    key = (resolved, mode, tuple(sorted((arch_kwargs or {}).items())))
    with _CACHE_LOCK:
        base = _CACHE.get(key)
    if base is not None and mode == "auto" and base.is_random_init and \
            weights_status(resolved, check_network=False) in ("bundled", "cached"):
        base = None  # the weights arrived since: use them
    if base is None:
        if mode == "auto":
            base = None
            if weights_status(resolved) in ("bundled", "cached", "downloadable"):
                try:
                    base = load_model(resolved, "pretrained", arch_kwargs=arch_kwargs)
                except WeightsUnavailableError:
                    base = None
            if base is None:
                base = _load_random(resolved, arch_kwargs)
        elif mode == "random":
            base = _load_random(resolved, arch_kwargs)
        else:
            base = load_model(resolved, weights, arch_kwargs=arch_kwargs)
        with _CACHE_LOCK:
            _CACHE[key] = base
            _CACHE.move_to_end(key)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return dataclasses.replace(base, module=copy.deepcopy(base.module), notes=dict(base.notes))


def _load_random(name: str, arch_kwargs: dict[str, Any] | None):
    """Random init, seeded: every run and every process shows the same random network, so
    the numbers in a verdict are reproducible (the global RNG state is restored after)."""
    from ..models import load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_model(name, None, arch_kwargs=arch_kwargs)


def _copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy on the CPU in eval mode, so every experiment starts from the same state."""
    return copy.deepcopy(module).cpu().eval()


def make_batch(loaded, stimulus: str, *, batch_size: int, size: int, composition: str,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(raw, model_input)``: raw images in [0, 1] and the model's preprocessed input."""
    from ..stimuli import make_stimulus_from_spec

    if not isinstance(batch_size, int) or batch_size < 1:
        raise BnvizError(f"batch_size must be a positive integer, got {batch_size!r}.",
                         "pass e.g. 2.")
    raw = make_stimulus_from_spec(stimulus, size=size, batch_size=batch_size,
                                  composition=composition, seed=seed)
    return raw, loaded.preprocess(raw)


# --------------------------------------------------------------------------------------------
# Dashboard controls for the shared options
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _architecture_names(model: str, kind: str) -> tuple[str, ...]:
    """Layer names of ``model``'s architecture (random init: names only, no weights needed)."""
    from ..models import load_model
    from ..modes import bn_layers

    module = load_model(model, weights=None).module
    if kind == "bn":
        return tuple(n for n, _ in bn_layers(module))
    return tuple(n for n, _ in module.named_modules() if n)


def model_controls(st, key: str, *, model: str, models: list[str] | None = None,
                   stimulus: str, composition: str = "different", layer: str | None = "bn",
                   default_layer: str | None = None) -> dict[str, Any]:
    """Draw the shared widgets (model, weights, layer, stimulus, batch, device) and return
    the matching ``run()`` keywords. ``layer``: "bn" (BatchNorm layers), "any" (every
    module) or None (no layer widget). Widget keys start with ``key``."""
    from ..devices import available_devices
    from ..models import list_models
    from ..stimuli import COMPOSITIONS

    models = models or list_models()
    cols = st.columns(3)
    name = cols[0].selectbox("Model", models, index=models.index(model) if model in models
                             else 0, key=f"{key}:model")
    weights = cols[1].selectbox(
        "Weights", WEIGHTS_CHOICES, key=f"{key}:weights",
        help="auto: pretrained when available (efficientnet_lite0 is bundled), else random "
        "init, labelled as such. These effects do not depend on the weights.",
    )
    out: dict[str, Any] = {"model": name, "weights": weights}
    if layer is not None:
        names = list(_architecture_names(name, layer))
        if not names:
            cols[2].warning(f"{name} has no BatchNorm layers.")
            out["layer"] = None
        else:
            index = names.index(default_layer) if default_layer in names else 0
            out["layer"] = cols[2].selectbox("Layer", names, index=index,
                                             key=f"{key}:layer:{name}")
    cols = st.columns(4)
    out["stimulus"] = cols[0].text_input(
        "Stimulus", stimulus, key=f"{key}:stimulus",
        help="uniform (all ones), uniform:value=0.5, image:chelsea, image:coffee, noise:seed=1",
    )
    out["composition"] = cols[1].selectbox(
        "Batch composition", COMPOSITIONS, index=COMPOSITIONS.index(composition),
        key=f"{key}:composition")
    out["batch_size"] = int(cols[2].number_input("Batch size", 1, 16, DEFAULT_BATCH_SIZE,
                                                 key=f"{key}:batch_size"))
    out["size"] = int(cols[3].select_slider("Image size", [64, 96, 112, 160, 224],
                                            DEFAULT_SIZE, key=f"{key}:size"))
    out["device"] = st.radio("Device", ["auto", *available_devices()], horizontal=True,
                             key=f"{key}:device")
    return out
