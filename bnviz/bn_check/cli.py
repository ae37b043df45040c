"""``bnviz check-bn MODULE:NAME``: check a BatchNorm implementation from the command line.

Prints the report (or writes it as JSON) and exits 1 when there are findings, 0 when there
are none; a spec that names no importable class exits 2 with one line (bnviz.cli.main).
Module names are looked up from the current directory first, as ``python -m`` does.
"""

from __future__ import annotations

import os
import sys

import torch

from ..errors import BnvizError

EXIT_FINDINGS = 1


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "check-bn", help="check your own BatchNorm implementation against the native layer",
        description="Run a BatchNorm implementation side by side with nn.BatchNorm over "
        "training steps and in eval, and say in plain words where it departs "
        "(docs/check_batchnorm.md). Exit status: 0 no findings, 1 findings, 2 bad input.")
    p.add_argument("spec", metavar="MODULE:NAME",
                   help="mypkg.layers:MyBN or path/to/my_bn.py:MyBN: a class built like "
                   "nn.BatchNorm, a factory with the same arguments, or an instance")
    p.add_argument("--num-features", type=int, default=4, help="channels (default 4)")
    p.add_argument("--dims", type=int, choices=(1, 2, 3), default=None,
                   help="1, 2 or 3 for BatchNorm1d/2d/3d (default: inferred, else 2)")
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--momentum", default="0.1", help="a number, or 'none' (default 0.1)")
    p.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--name", action="append", default=[], metavar="BN_NAME=YOURS",
                   help="where your module keeps nn.BatchNorm's tensor, repeatable, e.g. "
                   "--name weight=scale")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_check_bn)


def _momentum(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise BnvizError(f"--momentum {text!r} is not a number.",
                         "pass e.g. --momentum 0.1, or --momentum none.") from None


def _names(items: list[str]) -> dict[str, str] | None:
    from .candidate import STATE_NAMES

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in STATE_NAMES or not value:
            raise BnvizError(f"Invalid --name {item!r}.",
                             f"write BN_NAME=YOURS with BN_NAME one of {', '.join(STATE_NAMES)}.")
        out[key] = value
    return out or None


def cmd_check_bn(args) -> int:
    from ..cli import _write_json
    from .check import check_batchnorm
    from .loading import load_implementation

    momentum, names = _momentum(args.momentum), _names(args.name)
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python -m` does: the operator's own package, by name
        sys.path.insert(0, cwd)
    impl = load_implementation(args.spec)
    # the check's tensors are tiny: more intra-op threads only add their start-up cost, which
    # on a busy machine makes it several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = check_batchnorm(impl, num_features=args.num_features, dims=args.dims,
                                 eps=args.eps, momentum=momentum, steps=args.steps,
                                 device=args.device, dtype=getattr(torch, args.dtype),
                                 names=names)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        _write_json(report.to_dict(), args.json)
    else:
        print(report)
    return EXIT_FINDINGS if report.findings else 0
