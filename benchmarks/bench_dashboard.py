"""Benchmark the dashboard in a real browser (Debian's chromium + Playwright).

Measures what a student feels, end to end (browser click -> Streamlit rerun -> chart
redrawn), on a fresh ``streamlit run app.py`` server:

* first charts: from starting the server process (browser already open) to the first
  chart and to all charts of the default view on screen (efficientnet_lite0, 224x224,
  batch 4), median of several cold starts;
* layer switch and channel switch (batch 8): from the click / Enter until the charts are
  redrawn and the app is idle -- the later of the last chart mutation and the last server
  message of the rerun --, timed inside the page;
* mode toggle (train <-> eval, efficientnet_lite0, batch 8, CPU), with the view cache
  limited to one entry so that *every* toggle needs a network run of its own; back to
  back, and after 15 s of reading the charts (the way a student toggles). The app runs
  the other mode's network in the background while the charts are read
  (``bnviz.prefetch``), so the toggle finds it done or running; ``--prefetch off`` makes
  the server compute it on the click instead (the server column shows which: ~0.1-0.2 s
  taken, ~0.7-1 s computed);
* bytes sent to the browser per rerun (websocket frames), per kind of interaction;
* server memory (RSS) per extra session, for sessions with new configurations and for
  sessions sharing one.

Usage::

    python benchmarks/bench_dashboard.py [--repeats 10] [--starts 3]
        [--parts cold,interactions,memory] [--prefetch on|off] [--quiet S] [--no-settle]
        [--json out.json]

Prints a markdown table with the load average (a run goes into benchmarks/results/, its
table into BENCHMARKS.md and docs/dashboard.md) and writes the raw numbers as JSON (default:
test-artifacts/bench_dashboard.json). ``--parts`` runs a subset. Timings depend on the
machine: run it on an otherwise idle one and say which.
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
#: What ``make run`` adds to the server's environment (see the Makefile and README): glibc
#: reuses freed activation memory instead of page-faulting fresh mmaps on every forward.
MAKE_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "MALLOC_ARENA_MAX": "1"}
#: Toggles timed after a pause, and the pause: a student reading the charts first.
PAUSED_TOGGLES, PAUSE_S = 5, 15.0
#: The memory part's release delay (s): readings then wait only a little longer than this.
MEMORY_RELEASE_DELAY_S = 10
#: The environment every benchmarked server gets (set from --allocator in main()).
SERVER_ENV: dict = dict(MAKE_RUN_ENV)
#: Cold starts wait for the freshly launched browser to be idle (--no-settle: do not).
SETTLE_BROWSER = True


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def first_charts(starts: int) -> list[dict]:
    """Cold starts: server process start -> first chart / all charts on screen.

    The browser is started, and idle on a blank page, before the server, as a student's
    browser would be: its own start-up is not part of the time. (``--no-settle`` starts
    the server right after the blank page opens, while chromium is still starting up, as
    the runs before Z1 in benchmarks/results/ did.)"""
    out = []
    for _ in range(starts):
        with bs.chromium() as browser:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto("about:blank")
            if SETTLE_BROWSER:
                bs.wait_browser_quiet()
            srv = bs.start_server(timeout=180, extra_env=SERVER_ENV)
            try:
                healthy = time.monotonic() - srv.started_at
                page.goto(f"{srv.url}/?{DEFAULT_QUERY}")
                bs.wait_charts(page, 1, TIMEOUT_MS)
                first = time.monotonic() - srv.started_at
                bs.wait_charts(page, 4, TIMEOUT_MS)
                everything = time.monotonic() - srv.started_at
                bs.wait_idle(page, TIMEOUT_MS)
                idle = time.monotonic() - srv.started_at
            finally:
                bs.stop_server(srv)
        out.append({"healthy_s": healthy, "first_chart_s": first, "all_charts_s": everything,
                    "idle_s": idle})
        print(f"  cold start: healthy {healthy:.1f} s, first chart {first:.1f} s, "
              f"all charts {everything:.1f} s, idle {idle:.1f} s", flush=True)
    return out


def _server_ms(srv, offset: int) -> tuple[float, int]:
    """Longest server-side (partial) rerun logged since ``offset`` (BNVIZ_TIMING=1)."""
    text = srv.log()
    times = [float(line.split()[2]) for line in text[offset:].splitlines()
             if line.startswith("bnviz-timing ")]
    return (max(times) if times else float("nan")), len(text)


# In-page clock: the user's input event (mousedown / Enter) is t0; every DOM mutation inside
# a chart after it moves "last" forward, and so does every websocket message from the server
# (the last one of a rerun is Streamlit's "script finished"). max(last chart mutation, last
# message) - t0 is the time until the charts were redrawn *and* the app was idle, measured by
# the browser itself (the Python side only waits, its polling adds nothing).
_WS_JS = """() => {
  if (window.__wsPatched) return;
  window.__wsPatched = true;
  window.__wsLast = null;
  const Orig = window.WebSocket;
  window.WebSocket = function(...args) {
    const ws = new Orig(...args);
    ws.addEventListener('message', () => { window.__wsLast = performance.now(); });
    return ws;
  };
  window.WebSocket.prototype = Orig.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
}"""

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
    # settled: no chart mutation and no server message for 600 ms
    page.wait_for_function(
        "() => { const b = window.__bench; if (b.last === null) return false; "
        "const ws = window.__wsLast === null ? 0 : window.__wsLast - b.t0; "
        "return performance.now() - b.t0 - Math.max(b.last, ws) > 600; }",
        timeout=TIMEOUT_MS, polling=100)
    redrawn = page.evaluate(
        "() => Math.max(window.__bench.last, window.__wsLast === null ? 0 : "
        "window.__wsLast - window.__bench.t0)") / 1000
    return changed, redrawn, wire.received - sent0


def interactions(repeats: int) -> dict:
    """Layer switch, channel switch and mode toggle timings on one warm server."""
    results: dict = {"layer": [], "channel": [], "mode": [], "bytes": {}, "first_change": {},
                     "server_ms": {}}
    srv = bs.start_server(timeout=180, extra_env={**SERVER_ENV, "BNVIZ_VIEW_CACHE": "1",
                                                  "BNVIZ_TIMING": "1"})
    try:
        with bs.chromium() as browser:
            page = browser.new_page(viewport=VIEWPORT)
            page.add_init_script(f"({_WS_JS})()")
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

            def toggle(i: int, kind: str) -> None:
                nonlocal offset
                before = bs.chart_signature(page, "Network overview")
                group = page.locator('[data-testid="stRadio"]').filter(
                    has=page.get_by_text("Global mode (all BN layers)", exact=True)).first
                option = group.get_by_text(modes[i % 2], exact=True).first
                *dt, sent = _timed(page, wire, option.click, "Network overview", before)
                results.setdefault(kind, []).append(dt[1])
                results["first_change"].setdefault(kind, []).append(dt[0])
                server, offset = _server_ms(srv, offset)
                results["server_ms"].setdefault(kind, []).append(server)
                results["bytes"].setdefault(kind, []).append(sent)

            for i in range(repeats):
                toggle(i, "mode")
            # The same toggle after a student has read the charts for a while (the server
            # keeps the freed activation memory for BNVIZ_RELEASE_DELAY_S, default 120 s).
            for i in range(PAUSED_TOGGLES):
                time.sleep(PAUSE_S)
                toggle(repeats + i, "mode_paused")
            print(f"  layer {[round(x, 3) for x in results['layer']]}", flush=True)
            print(f"  channel {[round(x, 3) for x in results['channel']]}", flush=True)
            print(f"  mode {[round(x, 3) for x in results['mode']]}", flush=True)
            print(f"  mode after {PAUSE_S:.0f} s {[round(x, 3) for x in results['mode_paused']]}",
                  flush=True)
            print(f"  server ms {results['server_ms']}", flush=True)
    finally:
        bs.stop_server(srv)
    return results


def memory(extra: int) -> dict:
    """Server RSS after each extra session: new configurations, then a shared one.

    The app hands the freed activation memory back to the system once no forward has run
    for ``BNVIZ_RELEASE_DELAY_S`` seconds (default 120); this server gets a 10 s delay and
    each reading waits 15 s (the prefetch of the other mode ends ~1-2 s after the page),
    so it is what an idle server holds (the delay only changes when, not how much). With
    prefetching on, a new configuration holds its view and the other mode's. The peak
    (VmHWM) says what a forward needs meanwhile."""
    srv = bs.start_server(timeout=180, extra_env={
        **SERVER_ENV, "BNVIZ_RELEASE_DELAY_S": str(MEMORY_RELEASE_DELAY_S)})
    out: dict = {"base_mb": None, "new_config_mb": [], "same_config_mb": [], "peak_mb": None}
    try:
        with bs.chromium() as browser:
            pages = []

            def open_session(query: str) -> float:
                page = browser.new_context(viewport=VIEWPORT).new_page()
                page.goto(f"{srv.url}/?{query}")
                bs.wait_charts(page, 4, TIMEOUT_MS)
                bs.wait_idle(page, TIMEOUT_MS)
                pages.append(page)
                time.sleep(MEMORY_RELEASE_DELAY_S + 5.0)
                return srv.rss_bytes() / 2**20

            out["base_mb"] = open_session(BATCH8_QUERY)
            for i in range(extra):  # a different seed: a new configuration, computed anew
                out["new_config_mb"].append(open_session(f"{BATCH8_QUERY}&seed={100 + i}"))
            for _ in range(extra):  # the same view again: only the session itself is new
                out["same_config_mb"].append(open_session(BATCH8_QUERY))
            out["peak_mb"] = srv.rss_bytes("VmHWM") / 2**20
            print(f"  memory {out}", flush=True)
    finally:
        bs.stop_server(srv)
    return out


def table(res: dict) -> str:
    """The results as a markdown table (only the parts that were run)."""
    inter, mem, cold = res.get("interactions"), res.get("memory"), res.get("cold_starts")

    def ms(xs):
        return (f"{median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, "
                f"max {max(xs) * 1000:.0f}, n={len(xs)})")

    def sms(kind):
        xs = [x for x in inter["server_ms"].get(kind, []) if x == x]
        return f"{median(xs):.0f} ms" if xs else "n/a"

    def kb(xs):
        return f"{median(xs) / 1024:.0f} KB (max {max(xs) / 1024:.0f} KB)"

    def met(value, target):
        return "yes" if value <= target else "no"

    rows = []
    if cold:
        firsts = [c["first_chart_s"] for c in cold]
        alls = [c["all_charts_s"] for c in cold]
        rows += [
            ("First chart after the server process starts (cold, default view, batch 4)",
             f"{median(firsts):.1f} s (runs: {', '.join(f'{x:.1f}' for x in firsts)})",
             "", "<= 8 s", met(median(firsts), 8.0)),
            ("All charts of the first view on screen",
             f"{median(alls):.1f} s (runs: {', '.join(f'{x:.1f}' for x in alls)})",
             "", "<= 8 s", met(median(alls), 8.0)),
        ]
    if inter:
        rows += [
            ("Switch layer (click -> charts redrawn, app idle), batch 8", ms(inter["layer"]),
             sms("layer"), "<= 300 ms", met(median(inter["layer"]), 0.3)),
            ("Switch channel (Enter -> charts redrawn, app idle), batch 8",
             ms(inter["channel"]), sms("channel"), "<= 300 ms",
             met(median(inter["channel"]), 0.3)),
            ("Toggle train/eval, efficientnet_lite0, batch 8, CPU ("
             + ("network run prefetched while the charts are read)"
                if res.get("prefetch", "on") == "on" else "network run on the click)"),
             ms(inter["mode"]), sms("mode"), "<= 1.5 s", met(median(inter["mode"]), 1.5)),
            (f"The same toggle after {PAUSE_S:.0f} s of reading the charts",
             ms(inter["mode_paused"]), sms("mode_paused"), "<= 1.5 s",
             met(median(inter["mode_paused"]), 1.5)),
            ("Bytes per rerun: layer / channel / mode",
             " / ".join(kb(inter["bytes"][k]) for k in ("layer", "channel", "mode")), "",
             "<= 2 MB", met(max(max(inter["bytes"][k]) for k in ("layer", "channel", "mode")),
                            2 * 2**20)),
            ("Bytes for the first page load", f"{inter['bytes']['first_load'] / 1024:.0f} KB",
             "", "", ""),
        ]
    if mem:
        base = mem["base_mb"]
        new = [b - a for a, b in zip([base] + mem["new_config_mb"][:-1],
                                     mem["new_config_mb"])]
        last_new = mem["new_config_mb"][-1] if mem["new_config_mb"] else base
        same = [b - a for a, b in zip([last_new] + mem["same_config_mb"][:-1],
                                      mem["same_config_mb"])]
        rows += [
            ("Server memory, first session (idle)", f"{base:.0f} MB RSS", "", "", ""),
            ("Server memory, peak during the run", f"{mem.get('peak_mb') or 0:.0f} MB", "",
             "", ""),
            ("Memory per extra session with a new configuration",
             f"{median(new):.0f} MB (each: {', '.join(f'{x:.0f}' for x in new)})", "",
             "report", ""),
            ("Memory per extra session sharing a configuration",
             f"{median(same):.1f} MB (each: {', '.join(f'{x:.1f}' for x in same)})", "",
             "report", ""),
        ]
    lines = ["| Measure | Browser (median) | Server (median) | Target | Met |",
             "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines)


PARTS = ("cold", "interactions", "memory")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--json", default=str(bs.ARTIFACTS / "bench_dashboard.json"))
    parser.add_argument("--allocator", choices=("make-run", "default"), default="make-run",
                        help="make-run: the server gets make run's glibc malloc settings; "
                             "default: glibc's defaults (plain `streamlit run app.py`)")
    parser.add_argument("--prefetch", choices=("on", "off"),
                        default="off" if os.environ.get("BNVIZ_PREFETCH") == "0" else "on",
                        help="on (the app's default): the other global mode is computed "
                             "while the charts are read; off: on the click")
    parser.add_argument("--quiet", type=float, default=None, metavar="S",
                        help="BNVIZ_PREFETCH_QUIET_S for the server: seconds the prefetch "
                             "waits after a rerun of a local browser (default: the app's, "
                             "0.75; 0: it starts at once)")
    parser.add_argument("--no-settle", action="store_true",
                        help="cold starts: start the server right after the browser opens "
                             "its blank page, not once it is idle (the older protocol)")
    args = parser.parse_args(argv)
    global SETTLE_BROWSER
    SETTLE_BROWSER = not args.no_settle
    SERVER_ENV.clear()
    if args.allocator == "make-run":
        SERVER_ENV.update(MAKE_RUN_ENV)
    SERVER_ENV["BNVIZ_PREFETCH"] = "1" if args.prefetch == "on" else "0"
    if args.quiet is not None:
        SERVER_ENV["BNVIZ_PREFETCH_QUIET_S"] = str(args.quiet)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    reason = bs.chromium_skip_reason()
    if reason:
        print(f"cannot benchmark: {reason}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    print(f"bnviz dashboard benchmark on {machine}; load average before "
          f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    print(f"allocator: {args.allocator} {SERVER_ENV or ''}", flush=True)
    res: dict = {"machine": machine, "load_average_before": load_before[0],
                 "allocator": args.allocator, "prefetch": args.prefetch,
                 "browser_settled_before_cold_starts": SETTLE_BROWSER,
                 "prefetch_quiet_s": SERVER_ENV.get(
                     "BNVIZ_PREFETCH_QUIET_S", os.environ.get("BNVIZ_PREFETCH_QUIET_S", "0.75"))}
    if "cold" in parts:
        res["cold_starts"] = first_charts(args.starts)
    if "interactions" in parts:
        res["interactions"] = interactions(args.repeats)
    if "memory" in parts:
        res["memory"] = memory(args.sessions)
    res["load_average_after"] = os.getloadavg()[0]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print()
    print(f"{machine}; load average (1 min) {load_before[0]:.2f} before, "
          f"{res['load_average_after']:.2f} after")
    print()
    print(table(res))
    print(f"\n(raw numbers: {args.json})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
