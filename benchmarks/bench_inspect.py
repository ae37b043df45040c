"""Plain forward vs full ``bnviz.inspect`` (all BN layers, statistics, manual-vs-native).

Prints a Markdown table (a run goes into benchmarks/results/, its table into
BENCHMARKS.md). Same process, same input, medians of
``--repeats`` runs taken in turns after a warm-up (ratios: the median over turns of each
turn's inspect / forward); the baseline forward runs the BN layers in
the same mode natively. Memory: the bytes of tensors each report holds (stats only:
per-channel vectors; keep-all: every layer's input, output and activation output, shared
storage counted once). The manual-vs-native check is the compiled probe when it is built
(``bnviz build-kernel``), else eager torch ops; ``BNVIZ_PROBE_KERNEL=0`` forces eager.

    python benchmarks/bench_inspect.py [--repeats 7] [--models efficientnet_lite0 resnet18
        timm:efficientnet_b0]

Models that cannot get their pretrained weights offline run with a random init: timing
does not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Times in ms of each function, run in turns (A, B, C, A, B, C, ...) after 3 warm-ups.

    Taking turns spreads any drift of a shared machine (other jobs, CPU frequency) over
    every variant alike; :func:`paired_ratio` then compares each turn's times with each
    other, so the ratios stay meaningful even when absolute times move between turns.
    """
    for _ in range(3):  # warm-up: oneDNN primitives, the private-copy pool, the scratch
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append((time.perf_counter() - t0) * 1000)
    return times


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over turns of ``times[i] / base[i]``: each turn's inspect against the forward
    measured right before it. On a shared virtual machine whose speed moves by 30% from one
    second to the next, this is far steadier than a ratio of two medians."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def peak_extra_mb(fn, device: torch.device) -> float:
    """Extra memory one call needs at its peak (CUDA allocator, or sampled RSS on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakRSS() as peak:
        fn()
    return peak.extra_mb


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
    # timm:efficientnet_b0: timm's BatchNormAct2d, measured before its own in-place SiLU
    parser.add_argument("--models", nargs="+",
                        default=["efficientnet_lite0", "resnet18", "timm:efficientnet_b0"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["eval", "train"])
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    tuning = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"allocator: {'glibc tuned ' + str(tuning) if tuning else 'default'}")
    from bnviz import probe_kernel

    usable, why = probe_kernel.status()
    print(f"manual check on CPU: {why if usable else 'eager (' + why + ')'}")
    if torch.cuda.is_available():
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    print()
    print("| model | device | batch | mode | forward ms | inspect stats-only ms | ratio | "
          "inspect keep-all ms | ratio | keep-all peak extra MB | report MB stats / keep |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        try:
            model = bnviz.load_model(name)
        except bnviz.WeightsUnavailableError:
            model = bnviz.load_model(name, weights=None)  # timing does not depend on weights
        for dev_name in devices:
            dev = torch.device(dev_name)
            for mode in args.modes:
                # The baseline runs the same BN mode natively (a train-mode forward computes
                # batch statistics itself), on a copy so the loaded model stays untouched.
                plain = copy.deepcopy(model.module).to(dev).eval()
                for m in plain.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.train(mode == "train")
                for bs in args.batch_sizes:
                    raw = bnviz.make_stimulus("image", name="chelsea", size=224, batch_size=bs,
                                              composition="jitter")
                    xd = model.preprocess(raw).to(dev)

                    def forward(plain=plain, xd=xd):
                        with torch.no_grad():
                            plain(xd)

                    def inspect(keep, raw=raw, dev=dev, mode=mode, model=model):
                        return bnviz.inspect(model, raw, modes=mode, device=dev,
                                             keep_tensors=keep)

                    runs = interleaved({"forward": forward,
                                        "stats": lambda: inspect(False),
                                        "keep": lambda: inspect(True)}, dev, args.repeats)
                    ms = {k: statistics.median(v) for k, v in runs.items()}
                    peak = peak_extra_mb(lambda: inspect(True), dev)
                    s_mem = report_mb(inspect(False))
                    k_mem = report_mb(inspect(True))
                    f_ms = ms["forward"]
                    print(f"| {name} | {dev_name} | {bs} | {mode} | {f_ms:.1f} | "
                          f"{ms['stats']:.1f} | "
                          f"{paired_ratio(runs['stats'], runs['forward']):.2f}x | "
                          f"{ms['keep']:.1f} | {paired_ratio(runs['keep'], runs['forward']):.2f}x"
                          f" | {peak:.0f} | {s_mem:.2f} / {k_mem:.0f} |",
                          flush=True)
                del plain
    print()
    print(fingerprint_table(args.models))


def fingerprint_table(names: list[str]) -> str:
    """What seeing the caller's model as it is costs on every inspection: the fingerprint
    walk over every module (structure, parameters, buffers, attributes) and the per-report
    copies of every layer's weight and bias (which no fingerprint can prove unchanged)."""
    from bnviz import inspection

    lines = ["| model | fingerprint walk µs | weight/bias copies µs |", "|---|---|---|"]
    for name in names:
        try:
            module = bnviz.load_model(name).module
        except bnviz.WeightsUnavailableError:
            module = bnviz.load_model(name, weights=None).module
        bns = dict(bnviz.modes.bn_layers(module))
        walk, copies = [], []
        for _ in range(201):
            t0 = time.perf_counter()
            inspection._scan(module)
            t1 = time.perf_counter()
            inspection._params_report(bns)
            t2 = time.perf_counter()
            walk.append((t1 - t0) * 1e6)
            copies.append((t2 - t1) * 1e6)
        lines.append(f"| {name} | {statistics.median(walk):.0f} | "
                     f"{statistics.median(copies):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
