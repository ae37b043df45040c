"""Plain forward vs full ``bnviz.inspect`` (all BN layers, statistics, manual-vs-native).

Prints a Markdown table (paste it into BENCHMARKS.md). Same process, same input, medians of
``--repeats`` runs after a warm-up. Memory: the bytes of tensors each report holds (stats only:
per-channel vectors; keep-all: every layer's input, output and activation output, shared
storage counted once).

    python benchmarks/bench_inspect.py [--repeats 7] [--models efficientnet_lite0 resnet18]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import torch

import bnviz

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRSS:
    """Samples RSS in a thread; ``peak - start`` is the call's extra memory."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    for _ in range(3):  # warm-up: oneDNN primitives, the private-copy pool, the scratch
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        mem = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRSS() as peak:
            fn()
        mem = peak.extra_mb
    return statistics.median(times) * 1000, mem


def report_mb(report) -> float:
    """Bytes the report holds in tensors (shared storage counted once)."""
    seen: dict[int, int] = {}
    for layer in report.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    print()
    print("| model | device | batch | forward ms | inspect stats-only ms | ratio | "
          "inspect keep-all ms | ratio | report MB stats-only / keep-all |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        try:
            model = bnviz.load_model(name)
        except bnviz.WeightsUnavailableError:
            model = bnviz.load_model(name, weights=None)  # timing does not depend on weights
        for dev_name in devices:
            dev = torch.device(dev_name)
            module = model.module
            for bs in args.batch_sizes:
                raw = bnviz.make_stimulus("image", name="chelsea", size=224, batch_size=bs,
                                          composition="jitter")
                x = model.preprocess(raw)
                plain = module.to(dev) if dev.type == "cuda" else module
                xd = x.to(dev)

                def forward(plain=plain, xd=xd):
                    with torch.no_grad():
                        plain(xd)

                def stats_only(raw=raw, dev=dev, model=model):
                    bnviz.inspect(model, raw, modes="eval", device=dev, keep_tensors=False)

                def keep_all(raw=raw, dev=dev, model=model):
                    bnviz.inspect(model, raw, modes="eval", device=dev, keep_tensors=True)

                f_ms, _ = timed(forward, dev, args.repeats)
                s_ms, _ = timed(stats_only, dev, args.repeats)
                k_ms, _ = timed(keep_all, dev, args.repeats)
                report = bnviz.inspect(model, raw, modes="eval", device=dev, keep_tensors=True)
                k_mem = report_mb(report)
                s_mem = report_mb(bnviz.inspect(model, raw, modes="eval", device=dev,
                                                keep_tensors=False))
                print(f"| {name} | {dev_name} | {bs} | {f_ms:.1f} | {s_ms:.1f} | "
                      f"{s_ms / f_ms:.2f}x | {k_ms:.1f} | {k_ms / f_ms:.2f}x | "
                      f"{s_mem:.2f} / {k_mem:.0f} |", flush=True)
                if dev.type == "cuda":
                    module.to("cpu")


if __name__ == "__main__":
    main()
