"""Memory of one Training-lab run as it trains (issue 22, section 2: "one job grows 1-2 MB
per step").

Runs :func:`bnviz.training.train_lab` in this process (the dashboard's jobs run the same
function in a thread of the server) and prints the process's resident memory every
``--every`` steps, with its growth per 100 steps since the first line. A run whose memory
is bounded shows a flat column after the first evaluation.

Usage::

    .venv/bin/python benchmarks/bench_training_memory.py --steps 600 --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnviz.training import TrainConfig, train_lab  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--every", type=int, default=50, help="print every N steps")
    parser.add_argument("--curve-points", type=int, default=TrainConfig().curve_points)
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.every,
                      curve_points=args.curve_points, device="cpu")
    print(f"steps {args.steps}, batch {args.batch_size}, curve points {args.curve_points}, "
          f"torch threads: {cfg.threads} (this thread)")
    print(f"{'step':>6} {'RSS MB':>8} {'MB per 100 steps since first':>30} {'s':>7}")
    first: list[tuple[int, float]] = []
    t0 = time.perf_counter()

    def on_update(result) -> None:
        rss = rss_mb()
        if not first:
            first.append((result.steps_done, rss))
        s0, r0 = first[0]
        per100 = (rss - r0) / (result.steps_done - s0) * 100 if result.steps_done > s0 else 0
        print(f"{result.steps_done:>6} {rss:>8.0f} {per100:>30.1f} "
              f"{time.perf_counter() - t0:>7.1f}", flush=True)

    train_lab(cfg, on_update=on_update)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
