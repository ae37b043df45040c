"""Helpers for the end-to-end tests and the dashboard benchmark: a real ``streamlit run``
server on 127.0.0.1 and Debian's chromium driven by Playwright.

The server is started with :class:`subprocess.Popen` and stopped by its PID (never by
process name: other Streamlit servers may be running on the same machine). Chromium is the
system one (``/usr/bin/chromium``); Playwright's own browser download is never used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("BNVIZ_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

#: CSS selectors of the Streamlit DOM the tests rely on.
CHART = '[data-testid="stPlotlyChart"] .js-plotly-plot .main-svg'
STATUS = '[data-testid="stStatusWidget"]'
EXCEPTION = '[data-testid="stException"]'


def chromium_skip_reason() -> str | None:
    """Why browser tests cannot run here, or None.

    Under ``CI=true`` nothing is skipped: CI installs chromium (``make test`` runs
    ``scripts/ensure_chromium.sh``), so a missing browser (or Playwright) there is a broken
    setup and the tests must fail when they try to launch it.
    """
    if os.environ.get("CI", "").strip().lower() == "true":
        return None
    if not os.path.exists(CHROMIUM):
        return (f"{CHROMIUM} not found (install Debian's chromium: apt-get install chromium, "
                "or run `make browser-deps`); under CI=true this is a failure, not a skip")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running ``streamlit run`` process."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    started_at: float  # time.monotonic() just before Popen
    env: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """Resident memory of the server process (Linux /proc); ``field="VmHWM"`` gives
        its peak so far."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
        return 0


def start_server(script: str = "app.py", *, port: int | None = None,
                 extra_env: dict | None = None, timeout: float = 120.0,
                 log_dir: Path | None = None) -> Server:
    """Start ``streamlit run script`` headless on 127.0.0.1 and wait for /_stcore/health."""
    port = port or free_port()
    log_dir = log_dir or ARTIFACTS
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"streamlit-{port}.log"
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / script),
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    server = Server(proc=proc, port=port, log_path=log_path, started_at=t0, env=env)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    stop_server(server)
    raise TimeoutError(f"streamlit did not become healthy in {timeout}s:\n{server.log()}")


def stop_server(server: Server, timeout: float = 15.0) -> None:
    """Terminate the server by PID (SIGTERM, then SIGKILL), never by process name."""
    if server.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            server.proc.kill()
        server.proc.wait(timeout=timeout)


@contextlib.contextmanager
def running_server(**kw) -> Iterator[Server]:
    server = start_server(**kw)
    try:
        yield server
    finally:
        stop_server(server)


@contextlib.contextmanager
def chromium() -> Iterator:
    """A Playwright chromium browser (Debian's binary), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    headless=True)
        try:
            yield browser
        finally:
            browser.close()


# -- page helpers ---------------------------------------------------------------------------


def _descendants_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by every descendant process of ``root``
    (Linux /proc; 0.0 elsewhere)."""
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, cpu in used.items():
        p = parent.get(pid)
        while p and p != root:
            p = parent.get(p)
        if p == root:
            total += cpu
    return total


def wait_browser_quiet(window_s: float = 0.5, max_cpu: float = 0.05,
                       timeout_s: float = 15.0) -> float:
    """Wait until the browsers this process started are idle: less than ``max_cpu`` of a
    core over ``window_s``. A freshly launched chromium keeps ~1.5 cores busy for about a
    second after its first page opens; a benchmark that starts a server then would time
    the browser's own start-up as well. Returns the seconds waited."""
    t0 = time.monotonic()
    before = _descendants_cpu_s(os.getpid())
    while time.monotonic() - t0 < timeout_s:
        time.sleep(window_s)
        now = _descendants_cpu_s(os.getpid())
        if now - before < max_cpu * window_s:
            break
        before = now
    return time.monotonic() - t0


class ConsoleLog:
    """Collects console errors and uncaught page errors of one page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def real_errors(self) -> list[str]:
        # A missing /favicon.ico is requested by chromium itself, outside the app; it says
        # nothing about the dashboard. Nothing else is ignored.
        return [e for e in self.errors if "favicon" not in e]


class WireCounter:
    """Bytes the server sends over the Streamlit websocket (what each rerun costs)."""

    def __init__(self, page):
        self.received = 0
        self.frames = 0
        page.on("websocket", self._on_ws)

    def _on_ws(self, ws) -> None:
        ws.on("framereceived", self._on_frame)

    def _on_frame(self, payload) -> None:
        size = len(payload) if isinstance(payload, bytes | str) else 0
        if isinstance(payload, dict):  # older Playwright versions
            size = len(payload.get("payload", b""))
        self.received += size
        self.frames += 1


def wait_idle(page, timeout_ms: float = 90_000, settle_ms: int = 150) -> None:
    """Wait until Streamlit's status widget ("Running...") has gone and stayed gone."""
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        page.wait_for_timeout(settle_ms)
        if page.locator(STATUS).count() == 0:
            page.wait_for_timeout(settle_ms)
            if page.locator(STATUS).count() == 0:
                return
    raise TimeoutError("the app did not become idle")


def wait_charts(page, count: int = 1, timeout_ms: float = 90_000) -> None:
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel).length >= n",
        arg=[CHART, count], timeout=timeout_ms)


_SIGNATURE_JS = """(part) => {
    for (const el of document.querySelectorAll('[data-testid="stPlotlyChart"]')) {
        const t = el.querySelector('.gtitle');
        if (t && t.textContent.includes(part)) {
            const plot = el.querySelector('.js-plotly-plot');
            return plot ? plot.innerHTML : '';
        }
    }
    return '';
}"""


def chart_signature(page, title_part: str) -> str:
    """The rendered SVG (data URIs of heatmaps included) of the first chart whose title
    contains ``title_part``; '' if there is none."""
    return page.evaluate(_SIGNATURE_JS, title_part)


def wait_changed(page, title_part: str, before: str, timeout_ms: float = 90_000) -> None:
    """Wait until the chart titled ``*title_part*`` exists and differs from ``before``.

    A changed chart is the reliable "rerun done" signal: Streamlit shows its status widget
    only for reruns that take a while, so its absence alone proves nothing."""
    page.wait_for_function(
        f"([part, before]) => {{ const s = ({_SIGNATURE_JS})(part); "
        "return s !== '' && s !== before; }",
        arg=[title_part, before], timeout=timeout_ms, polling="raf")


def chart_data(page, title_part: str) -> str:
    """The plotted data (``gd.data``, typed arrays as lists) of the first chart whose title
    contains ``title_part``, as JSON: equal for equal numbers, unlike the SVG, whose
    element ids are random."""
    return page.evaluate(
        """(part) => {
            for (const el of document.querySelectorAll('[data-testid="stPlotlyChart"]')) {
                const t = el.querySelector('.gtitle');
                if (t && t.textContent.includes(part)) {
                    const gd = el.querySelector('.js-plotly-plot');
                    return JSON.stringify(gd.data, (k, v) =>
                        ArrayBuffer.isView(v) ? Array.from(v) : v);
                }
            }
            return '';
        }""",
        title_part)


def chart_titles(page) -> list[str]:
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('[data-testid="stPlotlyChart"] .gtitle'))
               .map(t => t.textContent)""")


def select_option(page, label: str, option: str) -> None:
    """Pick ``option`` in the st.selectbox labelled ``label``.

    Streamlit 1.67's selectbox is a react-aria combobox with a virtualised option list, so
    the option is typed first (which filters the list and renders it), then clicked.
    """
    box = page.get_by_role("combobox", name=label, exact=True).first
    box.click()
    box.fill(option)
    page.locator('[role="option"]').filter(
        has=page.get_by_text(option, exact=True)).first.click()


def set_number(page, label: str, value: int | float) -> None:
    """Type ``value`` into the st.number_input labelled ``label`` and commit it."""
    field_ = page.get_by_label(label, exact=True).first
    field_.fill(str(value))
    field_.press("Enter")


def edit_grid_select(page, grid, row: int, col: int, option: str, attempts: int = 4) -> None:
    """Set a SelectboxColumn cell of an st.data_editor (a canvas grid) with the keyboard:
    click a cell near the top, walk to the top-left cell with the arrow keys (they stop at
    the edges, so the exact click position does not matter), then to (``row``, ``col``);
    Enter opens the cell's select and ``option`` is clicked. Retried because a rerun may
    redraw the grid under the mouse."""
    for attempt in range(attempts):
        grid.scroll_into_view_if_needed()
        box = grid.bounding_box()
        page.mouse.click(box["x"] + 15, box["y"] + 35 + 35 + 17)
        for key, times in (("ArrowUp", 4), ("ArrowLeft", 4), ("ArrowDown", row),
                           ("ArrowRight", col)):
            for _ in range(times):
                page.keyboard.press(key)
        page.keyboard.press("Enter")
        choice = page.locator("#portal").get_by_text(option, exact=True)
        try:
            choice.wait_for(timeout=5_000)
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; try again
            page.keyboard.press("Escape")
            if attempt == attempts - 1:
                raise
            page.wait_for_timeout(1_000)
            continue
        choice.click()
        # the click commits the value and closes the cell editor; Escape before that
        # would cancel the edit
        editor = page.locator("#portal .glide-select")
        try:
            editor.wait_for(state="detached", timeout=5_000)
        except Exception:  # noqa: BLE001 - still open: commit with Enter
            page.keyboard.press("Enter")
        return


def open_tab(page, label: str) -> None:
    """Pick the layer view's chart ``label`` (a segmented control: only that chart is drawn)."""
    page.locator('[data-testid="stButtonGroup"]').get_by_role(
        "radio", name=label, exact=True).first.click()


def click_radio(page, group_label: str, option: str) -> None:
    group = page.locator('[data-testid="stRadio"]').filter(
        has=page.get_by_text(group_label, exact=True)).first
    group.get_by_text(option, exact=True).first.click()
