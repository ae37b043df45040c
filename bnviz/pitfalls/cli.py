"""``bnviz pitfalls <name>``, and the command-line options the experiments share.

The command is built from the registry (:func:`bnviz.pitfalls.load_all`): one
sub-subcommand per experiment, in lab order, with the experiment's own options plus
``--json PATH|-``. Every option has a default, so ``bnviz pitfalls fold`` runs as it is.
Without ``--json`` the result is printed as a text table followed by the verdict; user
errors are :class:`~bnviz.errors.BnvizError`, which ``bnviz.cli.main`` turns into one line
and exit status 2.

The shared options come in two sets, matching the two kinds of batch of
:mod:`bnviz.pitfalls.common`: a stimulus spec (:func:`add_stimulus_options`) or a bundled
photo (:func:`add_photo_options`). Their defaults agree with ``run()``'s and the page's.
"""

from __future__ import annotations

import argparse
import functools
import textwrap
from typing import Any

from ..models import DEFAULT_MODEL
from ..stimuli import PHOTOS
from .base import Experiment, PitfallResult
from .common import DEFAULT_BATCH_SIZE, DEFAULT_SIZE

__all__ = [
    "add_photo_options",
    "add_stimulus_options",
    "format_result",
    "photo_kwargs",
    "register_cli",
    "run_cli",
    "stimulus_kwargs",
]

# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    """Add ``pitfalls`` with one sub-subcommand per experiment."""
    from . import load_all

    parser = subparsers.add_parser(
        "pitfalls",
        help="reproduce and explain the classic BatchNorm confusions (docs/stories.md)",
        description="Each experiment runs on a real network and prints a table and a verdict "
        "computed from PyTorch's own numbers. All options have defaults.",
    )
    sub = parser.add_subparsers(dest="pitfall", metavar="EXPERIMENT")
    sub.required = True
    for name, experiment in load_all().items():
        p = sub.add_parser(
            name,
            help=experiment.title,
            description=f"{experiment.title}\n\n{textwrap.fill(experiment.story, 78)}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        experiment.add_arguments(p)
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
# Shared options: a stimulus spec
# --------------------------------------------------------------------------------------------


def add_stimulus_options(
    parser: argparse.ArgumentParser,
    *,
    model: str,
    stimulus: str,
    composition: str = "different",
    layer_help: str | None = "BatchNorm layer name (default: the first one)",
) -> None:
    """Model, weights, layer (unless ``layer_help`` is None), stimulus, batch, device."""
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


def stimulus_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``run()`` keywords of :func:`add_stimulus_options`."""
    keys = ("model", "weights", "stimulus", "composition", "batch_size", "size", "seed",
            "device", "layer")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


# --------------------------------------------------------------------------------------------
# Shared options: a bundled photo
# --------------------------------------------------------------------------------------------


def add_photo_options(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    """Model, weights, photo, batch, size, seed, device (no layer: each experiment's own)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model name (default: {DEFAULT_MODEL}); see 'bnviz models'")
    parser.add_argument("--weights", default="auto",
                        help="auto | pretrained (both fall back to random init, labelled so, "
                             "when the weights cannot be had) | random | PATH (default: auto)")
    parser.add_argument("--photo", default="chelsea", choices=list(PHOTOS),
                        help="bundled photo for the batch (default: chelsea)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images in the batch, jittered copies of the photo (default: "
                             f"{batch_size})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"image size in px (default: {DEFAULT_SIZE}; 224 is the models' "
                             "own)")
    parser.add_argument("--seed", type=int, default=0, help="jitter seed (default: 0)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


def photo_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``run()`` keywords of :func:`add_photo_options`."""
    keys = ("model", "weights", "photo", "batch_size", "size", "seed", "device")
    return {k: getattr(args, k) for k in keys}
