"""Capacity of a class server: N students working in the dashboard at once (issue 22, 7).

For each number of students N, a fresh server (``streamlit run app.py`` with ``make run``'s
allocator settings, on a free 127.0.0.1 port; or ``bnviz serve-class --replicas 2``: two
replicas behind nginx) is warmed up with one page, then N students join within a few
seconds and each works through a script of 12 actions with 1.5-5 s of reading between
them: layer switches, train/eval toggles, photo changes, channel changes, a chart change.
Two students are Chromium (Playwright, Debian's ``/usr/bin/chromium``, headless) and are
timed inside the page from the input event until the charts are redrawn and the rerun's
last message arrived ("browser"); the others speak Streamlit's websocket protocol
(``benchmarks/class_clients.py``) and are timed from sending the rerun request to its
``script_finished`` message ("server": the server's part of what a student waits for).
Every 6th student is in the Training lab instead (a websocket student): a default training
run (200 steps; its status fragment is rerun every second, as the browser does, until it
says "Finished"), then three display changes, three times in 12 actions.

Scenarios:

* ``free``: free exploration, each student's actions and values drawn with its own seed;
* ``lesson``: the teacher's links: all students but every 5th do the same actions with
  the same values, each within 2 s of the teacher's step (one step every ``--beat`` s,
  never less than 1.5 s after the student's previous action finished); every 5th explores.

Students' browsers are taken to be on their own machines (each sends an
``X-Forwarded-For`` address; ``--local`` drops it, and the app then treats every browser as
being on the server, which holds its prefetch back while any of them draws; behind
``bnviz serve-class`` nginx sets the header itself and the replicas treat every browser as
remote). The two Chromium students do run on the server's cores, as in the issue's
measurement.

Every reply is checked for cross-talk (``class_clients.check_run``): header, layer sentence
and address bar name the student's own configuration, and the overview chart's numbers are
the same for equal configurations and never those of another one.

Memory: peak RSS of the server process(es) (each process's VmHWM, summed for replicas, and
the peak of their sampled sum), RSS after the warm-up page ("base") and after the students
have left and ``--settle`` seconds have passed (default: the app's memory release delay
plus 15 s), to see whether it comes back near the base.

Usage::

    python benchmarks/bench_class.py [--students 1,5,10,20,30] [--scenarios free,lesson]
        [--replicas 1,2] [--actions 12] [--duration 900] [--browsers 2]
        [--release-delay S] [--settle S] [--prefetch on|off] [--local] [--json out.json]

The full sweep (the defaults) takes about 1.5 hours on a 2-core machine, most of it the
settle waits (the script prints its estimate first); ``--replicas 1`` halves it.

Prints one Markdown table (a run goes into ``benchmarks/results/``, its table into
BENCHMARKS.md) and writes every student's numbers as JSON (default
``test-artifacts/bench_class.json``). Timings depend on the machine and on what else runs
on it: run it on an otherwise idle machine and say which.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import class_clients as cc  # noqa: E402
from bench_dashboard import _CLOCK_JS, _WS_JS, MAKE_RUN_ENV  # noqa: E402

from tests import browser_support as bs  # noqa: E402

#: The students' first link: the app's default view (efficientnet_lite0, chelsea, batch 4).
START_QUERY = ""
#: The warm-up page: another seed, so that no student's configuration is cached by it.
WARMUP_QUERY = "seed=4242"
#: The app's default memory release delay (``BNVIZ_RELEASE_DELAY_S``).
APP_RELEASE_DELAY_S = 120.0
HEALTH_TIMEOUT_S = 240.0


# -- servers -------------------------------------------------------------------------------


def _proc_status(pid: int, name: str) -> int:
    """``VmRSS`` / ``VmHWM`` of a process in bytes (psutil when installed, else /proc)."""
    if name == "VmRSS" and importlib.util.find_spec("psutil") is not None:
        import psutil

        with contextlib.suppress(psutil.Error):
            return psutil.Process(pid).memory_info().rss
        return 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{name}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out = []
    for pid in parent:
        p = parent.get(pid)
        while p and p != root:
            p = parent.get(p)
        if p == root:
            out.append(pid)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class SingleServer:
    """``streamlit run app.py`` (tests/browser_support.start_server), stopped by its PID."""

    label = "1 server"

    def __init__(self, env: dict):
        self.srv = bs.start_server(timeout=HEALTH_TIMEOUT_S, extra_env=env)
        self.url = self.srv.url

    def pids(self) -> list[int]:
        return [self.srv.pid] if self.srv.proc.poll() is None else []

    def stop(self) -> None:
        bs.stop_server(self.srv)


class ReplicaServer:
    """``bnviz serve-class --replicas N``: N Streamlit replicas behind nginx, started and
    stopped as one process (by its PID; its process group if it does not stop)."""

    def __init__(self, replicas: int, env: dict):
        self.label = f"{replicas} replicas + nginx"
        self.port = bs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bs.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = bs.ARTIFACTS / f"serve-class-{self.port}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(_bnviz_cli()), "serve-class", "--replicas", str(replicas),
                 "--port", str(self.port)],
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bnviz serve-class exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if len(self.pids()) >= replicas and _healthy(self.url):
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"bnviz serve-class was not healthy within {HEALTH_TIMEOUT_S:.0f} s")

    def pids(self) -> list[int]:
        return [p for p in _descendants(self.proc.pid) if "streamlit" in _cmdline(p)]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _bnviz_cli() -> Path:
    return Path(sys.executable).with_name("bnviz")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def replicas_unavailable() -> str | None:
    """Why ``bnviz serve-class`` cannot be benchmarked here, or None."""
    if importlib.util.find_spec("bnviz.hosting") is None:
        return "bnviz.hosting (bnviz serve-class) is not in this checkout"
    try:
        done = subprocess.run([str(_bnviz_cli()), "serve-class", "--help"], cwd=ROOT,
                              capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bnviz serve-class --help failed: {exc}"
    if done.returncode != 0:
        return "bnviz has no serve-class command"
    return None


class MemorySampler(threading.Thread):
    """Sums the servers' RSS every ``period`` seconds and keeps the peak."""

    def __init__(self, server, period: float = 0.5):
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.peak = max(self.peak, sum(_proc_status(p, "VmRSS") for p in self.server.pids()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def rss(server) -> int:
    return sum(_proc_status(p, "VmRSS") for p in server.pids())


# -- one measurement -----------------------------------------------------------------------


@dataclass
class Setup:
    students: int
    scenario: str  # free | lesson
    replicas: int
    actions: int
    duration_s: float
    browsers: int
    seed: int
    ramp_s: float
    beat_s: float
    settle_s: float
    forwarded: bool
    training_every: int = 6
    env: dict = field(default_factory=dict)


def roles(n: int, scenario: str, browsers: int,
          training_every: int = 6) -> list[tuple[str, str]]:
    """(kind, role) of each student: the first ``browsers`` are Chromium; every
    ``training_every``-th is in the Training lab (a websocket student); in a lesson every
    5th explores freely and the others follow the teacher."""
    out = []
    for i in range(n):
        kind = "browser" if i < browsers else "websocket"
        if kind == "websocket" and training_every and (i + 1) % training_every == 0:
            role = "training"
        elif scenario == "lesson" and (i + 1) % 5 != 0:
            role = "follower"
        else:
            role = "free"
        out.append((kind, role))
    return out


async def run_students(setup: Setup, url: str,
                       base_rss) -> tuple[list[cc.StudentResult], dict]:
    """Warm the server up, read its base RSS (``base_rss()``), then run every student."""
    info: dict = {}
    fwd = (lambda i: f"10.22.{i // 250}.{i % 250 + 1}") if setup.forwarded else (lambda i: None)
    plan_roles = roles(setup.students, setup.scenario, setup.browsers, setup.training_every)
    results = [cc.StudentResult(i, kind, role) for i, (kind, role) in enumerate(plan_roles)]
    pw = browser = None
    try:
        if any(k == "browser" for k, _ in plan_roles):
            # started before the warm-up: its own start-up is over before students join
            from playwright.async_api import async_playwright

            pw = await async_playwright().start()
            browser = await pw.chromium.launch(executable_path=bs.CHROMIUM,
                                               args=bs.CHROMIUM_ARGS, headless=True)
        # Warm-up: imports, the model, one forward; on replicas, one page per replica (the
        # affinity cookie of each new session is random, so twice as many pages as replicas).
        facts = None
        for w in range(2 * setup.replicas if setup.replicas > 1 else 1):
            facts, latency, errors = await cc.learn_page(url, WARMUP_QUERY, fwd(900 + w))
            info.setdefault("warmup_s", []).append(latency)
            if errors:
                info.setdefault("warmup_errors", []).extend(errors)
        await asyncio.sleep(5.0)  # the warm-up's prefetch of the other mode
        info["base_bytes"] = base_rss()
        registry = cc.ChartRegistry()
        t0 = time.perf_counter()
        deadline = t0 + setup.duration_s
        tasks = []
        for res in results:
            i = res.index
            pace = random.Random(setup.seed * 7919 + i)
            if res.role == "follower":  # the teacher's script: the same for every follower
                value_rng, kinds_rng = random.Random(setup.seed), random.Random(setup.seed)
            else:
                value_rng = random.Random(setup.seed * 1000 + i + 1)
                kinds_rng = random.Random(setup.seed * 1000 + i + 1)
            plan = cc.Plan(kinds=cc.make_kinds(setup.actions, res.role == "training",
                                               kinds_rng),
                           value_rng=value_rng, pace_rng=pace,
                           beat_s=setup.beat_s if res.role == "follower" else None,
                           start=t0 + setup.ramp_s)
            delay = pace.uniform(0.0, setup.ramp_s)
            if res.kind == "browser":
                coro = cc.browser_student(res, browser, url, START_QUERY, plan, facts,
                                          deadline, fwd(i), _CLOCK_JS, _WS_JS)
            else:
                coro = cc.websocket_student(res, url, START_QUERY, plan, facts, registry,
                                            deadline, fwd(i))
            tasks.append(asyncio.create_task(_after(delay, coro)))
        await asyncio.gather(*tasks)
        info["students_s"] = time.perf_counter() - t0
        # how many configurations the main-page students asked for (a lesson shares them)
        info["configurations"] = len(registry.by_config)
    finally:
        if browser is not None:
            await browser.close()
        if pw is not None:
            await pw.stop()
    return results, info


async def _after(delay: float, coro) -> None:
    await asyncio.sleep(delay)
    await coro


def measure(setup: Setup) -> dict:
    """One fresh server (or replica set), N students, memory before and after."""
    started = time.monotonic()
    if setup.replicas == 1:
        server = SingleServer(setup.env)
    else:
        server = ReplicaServer(setup.replicas, setup.env)
    sampler = MemorySampler(server)
    out: dict = {"students": setup.students, "scenario": setup.scenario,
                 "replicas": setup.replicas, "label": server.label}
    try:
        sampler.start()
        results, info = asyncio.run(run_students(setup, server.url, lambda: rss(server)))
        out.update(info)
        out["peak_hwm_bytes"] = sum(_proc_status(p, "VmHWM") for p in server.pids())
        out["peak_sampled_bytes"] = sampler.peak
        out["rss_left_bytes"] = rss(server)
        time.sleep(setup.settle_s)
        out["rss_after_bytes"] = rss(server)
        out["server_alive"] = bool(server.pids())
    finally:
        sampler.stop()
        server.stop()
    out["results"] = [r.to_json() for r in results]
    out["wall_s"] = time.monotonic() - started
    return out


# -- the table -----------------------------------------------------------------------------


def pctl(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); nan for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def collect(row: dict, kind: str, action: str) -> list[float]:
    return [t for r in row["results"] if r["kind"] == kind
            for t in r["times"].get(action, [])]


def fmt_s(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def summarise(row: dict) -> dict:
    s: dict = {}
    for action in ("layer", "toggle", "photo", "channel", "chart", "first_page", "display"):
        for kind in ("browser", "websocket"):
            xs = collect(row, kind, action)
            s[f"{action}_{kind}_p50"] = pctl(xs, 50)
            s[f"{action}_{kind}_p95"] = pctl(xs, 95)
            s[f"{action}_{kind}_n"] = len(xs)
    train = [t for r in row["results"] for t in r["training_s"]]
    wall = [t for r in row["results"] for t in r["training_wall_s"]]
    s["training"] = (min(train), max(train)) if train else None
    s["training_wall"] = (min(wall), max(wall)) if wall else None
    s["errors"] = sum(len(r["errors"]) for r in row["results"]) + len(row.get("warmup_errors",
                                                                              []))
    s["violations"] = sum(len(r["violations"]) for r in row["results"])
    s["checked"] = sum(r["checked"] for r in row["results"])
    s["actions"] = sum(r["actions_done"] for r in row["results"])
    return s


def table(rows: list[dict]) -> str:
    gb = 2**30
    lines = [
        "| students | setup | layer p95 browser / server | toggle p95 browser / server | "
        "photo p95 browser / server | first page p95 browser / server | training run "
        "(job / Start→Finished) | errors | cross-talk (violations / checks) | peak RSS "
        "(sum of peaks / sampled) | RSS base → left → after settle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = summarise(row)

        def pair(action, s=s):
            return (f"{fmt_s(s[f'{action}_browser_p95'])} / "
                    f"{fmt_s(s[f'{action}_websocket_p95'])} s")
        train = ("–" if s["training"] is None else
                 f"{s['training'][0]:.1f}-{s['training'][1]:.1f} s / "
                 f"{s['training_wall'][0]:.1f}-{s['training_wall'][1]:.1f} s")
        base = row.get("base_bytes") or 0
        lines.append(
            f"| {row['students']} | {row['scenario']}, {row['label']} | {pair('layer')} | "
            f"{pair('toggle')} | {pair('photo')} | {pair('first_page')} | {train} | "
            f"{s['errors']} | {s['violations']} / {s['checked']} | "
            f"{row['peak_hwm_bytes'] / gb:.2f} / {row['peak_sampled_bytes'] / gb:.2f} GB | "
            f"{base / gb:.2f} → {row['rss_left_bytes'] / gb:.2f} → "
            f"{row['rss_after_bytes'] / gb:.2f} GB |")
    return "\n".join(lines)


def errors_text(rows: list[dict], limit: int = 8) -> str:
    out = []
    for row in rows:
        errs = [e for r in row["results"] for e in r["errors"] + r["violations"]]
        if errs:
            out.append(f"- {row['students']} students, {row['scenario']}, {row['label']}: "
                       + "; ".join(errs[:limit]) + (" ..." if len(errs) > limit else ""))
    return "\n".join(out)


def estimate_s(students: list[int], scenarios: list[str], replicas: list[int], actions: int,
               settle_s: float, beat_s: float, duration_s: float, ramp_s: float) -> float:
    """Rough wall time of a sweep on a 2-core machine: start and warm-up (~45 s), the
    students' scripts (reading, or the teacher's beat, plus waits that grow about as N^2
    once the cores are saturated; a Training-lab student's three runs slow down with N as
    well), the settle wait."""
    total = 0.0
    for scenario in scenarios:
        for _ in replicas:
            for n in students:
                pace = beat_s if scenario == "lesson" else sum(cc.READING_S) / 2
                script = actions * pace + 0.1 * n * n
                if n >= 6:
                    script = max(script, actions / 4 * (7.0 * max(1.0, n / 8) + pace))
                total += 45 + ramp_s + min(script, duration_s) + settle_s + 5
    return total


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", default="1,5,10,20,30", help="comma-separated N")
    parser.add_argument("--scenarios", default="free,lesson",
                        help="comma-separated subset of free, lesson")
    parser.add_argument("--replicas", default="1,2",
                        help="comma-separated: 1 = one server, 2 = bnviz serve-class with 2 "
                             "replicas behind nginx (skipped with a message when not here)")
    parser.add_argument("--actions", type=int, default=12, help="actions per student")
    parser.add_argument("--duration", type=float, default=900.0,
                        help="seconds the students have for their scripts (per N)")
    parser.add_argument("--browsers", type=int, default=2,
                        help="students in Chromium (the rest use the websocket protocol)")
    parser.add_argument("--training-every", type=int, default=6, metavar="K",
                        help="every K-th student is in the Training lab (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ramp", type=float, default=5.0,
                        help="students join within this many seconds")
    parser.add_argument("--beat", type=float, default=5.0,
                        help="lesson: seconds between the teacher's steps")
    parser.add_argument("--release-delay", type=float, default=None,
                        help="BNVIZ_RELEASE_DELAY_S for the server (default: the app's, 120)")
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds after the students leave before the RSS is read again "
                             "(default: the release delay + 15)")
    parser.add_argument("--prefetch", choices=("on", "off"), default="on")
    parser.add_argument("--local", action="store_true",
                        help="no X-Forwarded-For: every student's browser counts as local")
    parser.add_argument("--allocator", choices=("make-run", "default"), default="make-run")
    parser.add_argument("--json", default=str(bs.ARTIFACTS / "bench_class.json"))
    args = parser.parse_args(argv)
    # SIGTERM (timeout, kill) ends the run like Ctrl-C: the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    students = _int_list(args.students)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    replicas = _int_list(args.replicas)
    if set(scenarios) - {"free", "lesson"} or not scenarios:
        parser.error("--scenarios: choose from free, lesson")
    if not students or min(students) < 1 or not replicas or min(replicas) < 1:
        parser.error("--students and --replicas need positive numbers")
    if args.browsers and (reason := bs.chromium_skip_reason()):
        print(f"cannot benchmark browsers: {reason} (or run with --browsers 0)",
              file=sys.stderr)
        return 2
    if any(r > 1 for r in replicas):
        reason = replicas_unavailable()
        if reason:
            print(f"skipping the replica runs: {reason}", flush=True)
            replicas = [r for r in replicas if r == 1]
    if not replicas:
        return 0
    env = dict(MAKE_RUN_ENV) if args.allocator == "make-run" else {}
    env["BNVIZ_PREFETCH"] = "1" if args.prefetch == "on" else "0"
    release = APP_RELEASE_DELAY_S
    if args.release_delay is not None:
        env["BNVIZ_RELEASE_DELAY_S"] = str(args.release_delay)
        release = args.release_delay
    settle = args.settle if args.settle is not None else release + 15.0

    load = os.getloadavg()
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    est = estimate_s(students, scenarios, replicas, args.actions, settle, args.beat,
                     args.duration, args.ramp)
    print(f"bnviz class benchmark on {machine}; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; students {students}, scenarios {scenarios}, replicas {replicas}; "
          f"expected duration ~{est / 60:.0f} min", flush=True)
    rows = []
    for scenario in scenarios:
        for rep in replicas:
            for n in students:
                setup = Setup(students=n, scenario=scenario, replicas=rep,
                              actions=args.actions, duration_s=args.duration,
                              browsers=min(args.browsers, n), seed=args.seed,
                              ramp_s=args.ramp, beat_s=args.beat, settle_s=settle,
                              forwarded=not args.local,
                              training_every=args.training_every, env=env)
                print(f"-- {n} students, {scenario}, {rep} replica(s)", flush=True)
                try:
                    row = measure(setup)
                except Exception as exc:  # noqa: BLE001 - report it and go on
                    print(f"   failed: {type(exc).__name__}: {exc}", flush=True)
                    continue
                rows.append(row)
                s = summarise(row)
                spread = Counter(r["replica"] for r in row["results"] if r["replica"])
                print(f"   done in {row['wall_s']:.0f} s: {s['actions']} actions, "
                      f"{s['errors']} errors, {s['violations']} cross-talk of "
                      f"{s['checked']} checks, {row.get('configurations', 0)} configurations"
                      + (f"; students per replica {dict(sorted(spread.items()))}"
                         if spread else "")
                      + ("" if row["server_alive"] else "; THE SERVER DIED"), flush=True)
    after = os.getloadavg()
    res = {"machine": machine, "load_before": load, "load_after": after,
           "args": vars(args), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print()
    print(f"{machine}; load average (1 min) {load[0]:.2f} before, {after[0]:.2f} after; "
          f"{args.actions} actions per student, prefetch {args.prefetch}, "
          f"allocator {args.allocator}, settle {settle:.0f} s")
    print()
    print(table(rows))
    text = errors_text(rows)
    if text:
        print("\nErrors and cross-talk (first few of each run):\n" + text)
    print(f"\n(raw numbers: {args.json})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
