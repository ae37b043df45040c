"""``bnviz train``: the Training lab from the command line (table, verdict, optional JSON)."""

from __future__ import annotations

import sys
from typing import Any

from .config import LAYERS, VARIANTS, TrainConfig, TrainConfigError, parse_momenta
from .lab import train_lab


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise TrainConfigError(f"{what} {text!r} is not a comma-separated list of integers.",
                               f"write e.g. --{what} 0,1,2.") from None


def register_cli(subparsers: Any) -> None:
    """Add ``bnviz train`` to the main parser's subcommands."""
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="train a small CNN with native/manual/detached/frozen BN side by side",
        description="Train a small CNN on generated images with four kinds of BatchNorm from "
                    "the same weights and batches, record loss/accuracy curves and running vs "
                    "batch statistics for several momenta, and print a verdict.")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--variants", default=",".join(d.variants),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--momenta", default="0.1,0.01,none",
                   help="momenta for the running-statistics study ('none' = cumulative)")
    p.add_argument("--layer", default=d.layer, help=f"one of {', '.join(LAYERS)}")
    p.add_argument("--channels", default=",".join(map(str, d.channels)),
                   help="channels of --layer to report")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads torch uses while training (restored afterwards)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON ('-' for stdout)")
    p.set_defaults(func=cmd_train)


def config_from_args(args: Any) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        variants=tuple(_csv(args.variants)), momenta=parse_momenta(args.momenta),
        layer=args.layer, channels=_int_list(args.channels, "channels"),
        eval_every=args.eval_every, device=args.device, image_size=args.image_size,
        threads=args.threads).validated()


def cmd_train(args: Any) -> int:
    from ..cli import _write_json, format_table  # bnviz.cli imports this module first

    cfg = config_from_args(args)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    result = train_lab(cfg, log=log)
    if args.json:
        _write_json(result.to_dict(), args.json)
        if args.json == "-":
            return 0
    print(f"device: {result.device}  steps: {result.steps_done}  batch size: {cfg.batch_size}  "
          f"lr: {cfg.lr:g}  seed: {cfg.seed}  time: {result.elapsed_s:.1f} s")
    rows = [{"variant": r["variant"], f"loss (last {result.window})": r["loss"],
             "train acc": r["train_acc"], "val acc eval-mode": r["val_acc_eval"],
             "val acc train-mode": r["val_acc_train"]} for r in result.final_rows()]
    print(format_table(rows))
    study = result.momentum_rows()
    if study:
        print()
        print(format_table([{"momentum": r["momentum"], "val acc eval-mode": r["val_acc_eval"],
                             "val acc train-mode": r["val_acc_train"],
                             f"|running - batch| mean ({cfg.layer})": r["running_mean_lag"]}
                            for r in study]))
    if result.gradient is not None:
        g = result.gradient
        print()
        print("gradient check (one batch, identical weights): " + "; ".join(
            f"{v}: forward diff {g.forward_max_abs_diff[v]:.1e}, gradient rel diff "
            f"{g.grad_rel_diff[v]:.2e}" for v in g.grad_rel_diff))
    print()
    for line in result.verdict:
        print(f"- {line}")
    return 0
