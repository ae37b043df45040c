"""Benchmark the dashboard in a real browser (Debian's chromium + Playwright).

Measures what a student feels, end to end (browser click -> Streamlit rerun -> chart
redrawn), on a fresh ``streamlit run app.py`` server:

* first charts: from starting the server process to the first chart on screen, default
  configuration (efficientnet_lite0, 224x224, batch 4), median of several cold starts;
* layer switch and channel switch (batch 8): from the click / Enter to the last chart
  mutation, timed inside the page;
* mode toggle (train <-> eval, efficientnet_lite0, batch 8, CPU), with the view cache
  limited to one entry so that *every* toggle runs the network again;
* bytes sent to the browser per rerun (websocket frames), per kind of interaction;
* server memory (RSS) per extra session, for sessions with new configurations and for
  sessions sharing one.

Usage::

    python benchmarks/bench_dashboard.py [--repeats 10] [--starts 3] [--json out.json]

Prints a markdown table (pasted into docs/dashboard.md) and writes the raw numbers as JSON
(default: test-artifacts/bench_dashboard.json). Timings depend on the machine: run it on an
otherwise idle one and say which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import browser_support as bs  # noqa: E402

DEFAULT_QUERY = ""  # the app's defaults: efficientnet_lite0, 224x224, batch 4, train
#: The interaction benchmarks use the configuration the targets name: batch 8.
BATCH8_QUERY = "batch=8"
TIMEOUT_MS = 180_000
VIEWPORT = {"width": 1400, "height": 1000}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def first_charts(starts: int) -> list[dict]:
    """Cold starts: server process start -> first chart / all charts on screen."""
    out = []
    for _ in range(starts):
        srv = bs.start_server(timeout=180)
        try:
            healthy = time.monotonic() - srv.started_at
            with bs.chromium() as browser:
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(f"{srv.url}/?{DEFAULT_QUERY}")
                bs.wait_charts(page, 1, TIMEOUT_MS)
                first = time.monotonic() - srv.started_at
                bs.wait_charts(page, 4, TIMEOUT_MS)
                bs.wait_idle(page, TIMEOUT_MS)
                everything = time.monotonic() - srv.started_at
            out.append({"healthy_s": healthy, "first_chart_s": first, "all_charts_s": everything})
            print(f"  cold start: healthy {healthy:.1f} s, first chart {first:.1f} s, "
                  f"all charts {everything:.1f} s", flush=True)
        finally:
            bs.stop_server(srv)
    return out


def _server_ms(srv, offset: int) -> tuple[float, int]:
    """Longest server-side (partial) rerun logged since ``offset`` (BNVIZ_TIMING=1)."""
    text = srv.log()
    times = [float(line.split()[2]) for line in text[offset:].splitlines()
             if line.startswith("bnviz-timing ")]
    return (max(times) if times else float("nan")), len(text)


# In-page clock: the user's input event (mousedown / Enter) is t0; every DOM mutation inside
# a chart after it moves "last" forward. last - t0 is the time until the charts were redrawn,
# measured by the browser itself (the Python side only waits, its polling adds nothing).
_CLOCK_JS = """() => {
  if (window.__bench) return;
  window.__bench = {armed: false, t0: null, last: null, first: null};
  const b = window.__bench;
  const start = (e) => {
    if (!b.armed) return;
    if (e.type === 'keydown' && e.key !== 'Enter') return;
    b.armed = false; b.t0 = performance.now(); b.last = null; b.first = null;
  };
  document.addEventListener('mousedown', start, {capture: true});
  document.addEventListener('keydown', start, {capture: true});
  new MutationObserver((muts) => {
    if (b.t0 === null) return;
    for (const m of muts) {
      const el = m.target.closest ? m.target.closest('[data-testid="stPlotlyChart"]') : null;
      if (el) {
        const t = performance.now() - b.t0;
        if (b.first === null) b.first = t;
        b.last = t;
      }
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true});
}"""


def _timed(page, wire, action, title_part: str, before: str) -> tuple[float, float, int]:
    """Run ``action``; return (seconds until the target chart changed as seen from Python,
    seconds from the input event to the last chart mutation as measured in the page -- the
    time reported --, bytes received for the rerun)."""
    page.evaluate(_CLOCK_JS)
    page.evaluate("() => { window.__bench.armed = true; window.__bench.t0 = null; }")
    sent0 = wire.received
    t0 = time.perf_counter()
    action()
    bs.wait_changed(page, title_part, before, TIMEOUT_MS)
    changed = time.perf_counter() - t0
    page.wait_for_function(f"() => !document.querySelector('{bs.STATUS}')", timeout=TIMEOUT_MS,
                           polling="raf")
    # settled: no chart mutation for 600 ms
    page.wait_for_function(
        "() => { const b = window.__bench; return b.last !== null && "
        "performance.now() - b.t0 - b.last > 600; }", timeout=TIMEOUT_MS, polling=100)
    redrawn = page.evaluate("() => window.__bench.last") / 1000
    return changed, redrawn, wire.received - sent0


def interactions(repeats: int) -> dict:
    """Layer switch, channel switch and mode toggle timings on one warm server."""
    results: dict = {"layer": [], "channel": [], "mode": [], "bytes": {}, "first_change": {},
                     "server_ms": {}}
    srv = bs.start_server(timeout=180, extra_env={"BNVIZ_VIEW_CACHE": "1",
                                                  "BNVIZ_TIMING": "1"})
    try:
        with bs.chromium() as browser:
            page = browser.new_page(viewport=VIEWPORT)
            wire = bs.WireCounter(page)
            page.goto(f"{srv.url}/?{BATCH8_QUERY}")
            bs.wait_charts(page, 4, TIMEOUT_MS)
            bs.wait_idle(page, TIMEOUT_MS)
            results["bytes"]["first_load"] = wire.received
            offset = len(srv.log())

            layers = ["10: _blocks.3._bn1", "25: _blocks.8._bn1", "3: _blocks.1._bn0",
                      "40: _blocks.13._bn1"]
            for i in range(repeats):
                option = layers[i % len(layers)]
                before = bs.chart_signature(page, "batch vs running")
                box = page.get_by_role("combobox", name="Layer").first
                box.click()
                box.fill(option)
                target = page.locator('[role="option"]').filter(
                    has=page.get_by_text(option, exact=True)).first
                target.wait_for()
                *dt, sent = _timed(page, wire, target.click, "batch vs running", before)
                results["layer"].append(dt[1])
                results["first_change"].setdefault("layer", []).append(dt[0])
                server, offset = _server_ms(srv, offset)
                results["server_ms"].setdefault("layer", []).append(server)
                results["bytes"].setdefault("layer", []).append(sent)

            bs.open_tab(page, "Feature maps")  # the charts that depend on the channel
            bs.wait_charts(page, 5, TIMEOUT_MS)
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('.gtitle'))"
                ".some(t => t.textContent.includes('image 0 ('))", timeout=TIMEOUT_MS)
            bs.wait_idle(page, TIMEOUT_MS)
            offset = len(srv.log())
            for i in range(repeats):
                field = page.get_by_label("Channel", exact=True).first
                field.fill(str(3 + i))
                before = bs.chart_signature(page, "image 0 (")
                *dt, sent = _timed(page, wire, lambda f=field: f.press("Enter"), "image 0 (",
                                   before)
                results["channel"].append(dt[1])
                results["first_change"].setdefault("channel", []).append(dt[0])
                server, offset = _server_ms(srv, offset)
                results["server_ms"].setdefault("channel", []).append(server)
                results["bytes"].setdefault("channel", []).append(sent)

            modes = ["eval", "train"]
            for i in range(repeats):
                before = bs.chart_signature(page, "Network overview")
                group = page.locator('[data-testid="stRadio"]').filter(
                    has=page.get_by_text("Global mode (all BN layers)", exact=True)).first
                option = group.get_by_text(modes[i % 2], exact=True).first
                *dt, sent = _timed(page, wire, option.click, "Network overview", before)
                results["mode"].append(dt[1])
                results["first_change"].setdefault("mode", []).append(dt[0])
                server, offset = _server_ms(srv, offset)
                results["server_ms"].setdefault("mode", []).append(server)
                results["bytes"].setdefault("mode", []).append(sent)
            print(f"  layer {[round(x, 3) for x in results['layer']]}", flush=True)
            print(f"  channel {[round(x, 3) for x in results['channel']]}", flush=True)
            print(f"  mode {[round(x, 3) for x in results['mode']]}", flush=True)
            print(f"  server ms {results['server_ms']}", flush=True)
    finally:
        bs.stop_server(srv)
    return results


def memory(extra: int) -> dict:
    """Server RSS after each extra session: new configurations, then a shared one."""
    srv = bs.start_server(timeout=180)
    out: dict = {"base_mb": None, "new_config_mb": [], "same_config_mb": []}
    try:
        with bs.chromium() as browser:
            pages = []

            def open_session(query: str) -> float:
                page = browser.new_context(viewport=VIEWPORT).new_page()
                page.goto(f"{srv.url}/?{query}")
                bs.wait_charts(page, 4, TIMEOUT_MS)
                bs.wait_idle(page, TIMEOUT_MS)
                pages.append(page)
                time.sleep(1.0)
                return srv.rss_bytes() / 2**20

            out["base_mb"] = open_session(BATCH8_QUERY)
            for i in range(extra):  # a different seed: a new configuration, computed anew
                out["new_config_mb"].append(open_session(f"{BATCH8_QUERY}&seed={100 + i}"))
            for _ in range(extra):  # the same view again: only the session itself is new
                out["same_config_mb"].append(open_session(BATCH8_QUERY))
            print(f"  memory {out}", flush=True)
    finally:
        bs.stop_server(srv)
    return out


def table(res: dict) -> str:
    inter, mem, cold = res["interactions"], res["memory"], res["cold_starts"]

    def ms(xs):
        return f"{median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f})"

    def sms(kind):
        xs = [x for x in inter["server_ms"].get(kind, []) if x == x]
        return f"{median(xs):.0f} ms median" if xs else "n/a"

    def kb(xs):
        return f"{median(xs) / 1024:.0f} KB (max {max(xs) / 1024:.0f} KB)"

    base = mem["base_mb"]
    new = [b - a for a, b in zip([base] + mem["new_config_mb"][:-1], mem["new_config_mb"])]
    last_new = mem["new_config_mb"][-1] if mem["new_config_mb"] else base
    same = [b - a for a, b in zip([last_new] + mem["same_config_mb"][:-1],
                                  mem["same_config_mb"])]
    firsts = [c["first_chart_s"] for c in cold]
    rows = [
        ("First chart after the server starts (cold, default view)",
         f"{median(firsts):.1f} s (runs: {', '.join(f'{x:.1f}' for x in firsts)})", "<= 8 s"),
        ("Switch layer (click -> last chart redrawn)", ms(inter["layer"]), "<= 300 ms"),
        ("... of which on the server (fragment rerun)", sms("layer"), ""),
        ("Switch channel (Enter -> last chart redrawn)", ms(inter["channel"]),
         "<= 300 ms"),
        ("... of which on the server (fragment rerun)", sms("channel"), ""),
        ("Toggle train/eval, efficientnet_lite0, batch 8, CPU (recomputed; click -> last "
         "chart redrawn)",
         ms(inter["mode"]), "<= 1.5 s"),
        ("... of which on the server (forward + summaries + page)", sms("mode"), ""),
        ("Bytes per rerun: layer switch", kb(inter["bytes"]["layer"]), "<= 2 MB"),
        ("Bytes per rerun: channel switch", kb(inter["bytes"]["channel"]), "<= 2 MB"),
        ("Bytes per rerun: mode toggle", kb(inter["bytes"]["mode"]), "<= 2 MB"),
        ("Bytes for the first page load", f"{inter['bytes']['first_load'] / 1024:.0f} KB", ""),
        ("Server memory, first session", f"{base:.0f} MB RSS", ""),
        ("Memory per extra session with a new configuration",
         f"{median(new):.0f} MB (each: {', '.join(f'{x:.0f}' for x in new)})", "report"),
        ("Memory per extra session sharing a configuration",
         f"{median(same):.1f} MB (each: {', '.join(f'{x:.1f}' for x in same)})", "report"),
    ]
    lines = ["| Measure | Result | Target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--json", default=str(bs.ARTIFACTS / "bench_dashboard.json"))
    args = parser.parse_args(argv)
    reason = bs.chromium_skip_reason()
    if reason:
        print(f"cannot benchmark: {reason}", file=sys.stderr)
        return 2
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, "
               f"load average before start {os.getloadavg()[0]:.2f}")
    print(f"bnviz dashboard benchmark on {machine}", flush=True)
    res = {"machine": machine, "cold_starts": first_charts(args.starts),
           "interactions": interactions(args.repeats), "memory": memory(args.sessions)}
    res["load_average_after"] = os.getloadavg()[0]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print()
    print(table(res))
    print(f"\n(raw numbers: {args.json}; load average after: {res['load_average_after']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
