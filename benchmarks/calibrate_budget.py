"""The dashboard's run estimate (``bnviz.dashboard.estimate_run``) against measured runs.

Each configuration runs in a fresh process started as ``make run`` starts the server (the
same glibc malloc settings): the model is loaded and one small run made first (pools,
private copy, thread start-up), the heap is trimmed, the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``, Linux), and then the dashboard's own run is made:
``compute_view_data`` (every tensor kept, then condensed) for ``view``,
``compute_eval_predictions`` for ``eval``. Measured memory is the peak RSS minus the RSS
just before the run; time is the run's wall time. It prints a Markdown table; the
factors in ``bnviz/dashboard/budget.py`` come from such runs (docs/dashboard.md, "Memory
budget and run queue").

    python benchmarks/calibrate_budget.py [--configs efficientnet_lite0:8:224:view ...]
    python benchmarks/calibrate_budget.py --json   # one JSON line per configuration
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

DEFAULT_CONFIGS = (
    "efficientnet_lite0:8:224:view", "efficientnet_lite0:2:448:view",
    "efficientnet_lite0:32:224:view", "resnet18:8:224:view", "resnet18:32:224:view",
    "densenet121:4:224:view", "densenet121:8:160:view", "vgg11_bn:2:224:view",
    "efficientnet_lite0:8:224:eval", "resnet18:8:224:eval", "densenet121:4:224:eval",
)
#: what ``make run`` sets (Makefile, MALLOC_TUNING)
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                 "MALLOC_ARENA_MAX": "1"}


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(spec: str) -> dict:
    """Measure one configuration in this (fresh) process."""
    import ctypes
    import gc

    import bnviz
    from bnviz import dashboard as dash
    from bnviz.prefetch import Prefetcher

    name, batch, size, kind = spec.split(":")
    batch, size = int(batch), int(size)
    dash.configure_torch_threads()
    dash.set_prefetcher(Prefetcher(enabled=False))
    loaded = dash.load_shared_model(name, True)  # random init: same shapes, no download
    keep = kind == "view"
    est = dash.estimate_run(loaded, batch, size, keep_tensors=keep)
    warm = bnviz.make_stimulus("noise", 64, 2)
    dash.compute_view_data(loaded, warm, "train", "cpu", random_init=True)
    dash.compute_eval_predictions(loaded, warm, "cpu")
    x = bnviz.make_stimulus("noise", size, batch, composition="different")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    t0 = time.perf_counter()
    if keep:
        dash.compute_view_data(loaded, x, "train", "cpu", random_init=True)
    else:
        dash.compute_eval_predictions(loaded, x, "cpu")
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - before
    return {"config": spec, "estimate_mb": est.memory_bytes / 2**20,
            "measured_mb": peak / 2**20, "ratio": est.memory_bytes / max(peak, 1),
            "estimate_s": est.seconds, "measured_s": seconds}


def measure(spec: str, timeout: float = 600) -> dict:
    """:func:`child` in a fresh process with the server's malloc settings."""
    # no budget here: the point is to measure what the estimate would refuse, too
    env = {**os.environ, **MALLOC_TUNING, "BNVIZ_MEMORY_BUDGET_MB": str(2**40)}
    out = subprocess.run([sys.executable, __file__, "--child", spec], env=env, text=True,
                         capture_output=True, timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                    help="model:batch:size:view|eval")
    ap.add_argument("--json", action="store_true", help="one JSON line per configuration")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = []
    for spec in args.configs:
        row = measure(spec)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if args.json:
        return
    print(f"{platform.node()}: {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
    print("| configuration | estimate | measured | estimate / measured | time estimate | "
          "time measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['estimate_mb']:.0f} MB | {r['measured_mb']:.0f} MB | "
              f"{r['ratio']:.2f} | {r['estimate_s']:.2f} s | {r['measured_s']:.2f} s |")


if __name__ == "__main__":
    main()
