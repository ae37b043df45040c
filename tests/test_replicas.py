"""The class-server recipe (``bnviz serve-class``, issue 22 section 6): N Streamlit replicas
behind nginx with cookie session affinity, tested on loopback.

The first tests need neither nginx nor a browser (the configuration, the command's
messages, the prefetch rule on a shared server, the Kubernetes files). The last ones start
``bnviz serve-class --replicas 2`` for real: skipped with the reason where nginx or
chromium is missing (``apt-get install -y nginx``; ``bnviz serve-class`` installs it itself
when it can).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from bnviz import dashboard as dash
from bnviz.cli import main
from bnviz.errors import BnvizError
from bnviz.hosting import replicas as rp
from bnviz.prefetch import Prefetcher
from tests import browser_support as bs

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
NGINX = rp.find_nginx()
NGINX_REASON = ("nginx not found (Debian: apt-get install -y nginx; `bnviz serve-class` "
                "installs it itself as root or with passwordless sudo)")


def _layout(tmp_path, n=2, address="127.0.0.1", port=8080):
    return rp.Layout(replicas=tuple(rp.Replica(f"r{i}", 41000 + i) for i in range(n)),
                     address=address, port=port, run_dir=tmp_path,
                     static_dir=rp.streamlit_static_dir(), max_body_mb=21)


# -- the nginx configuration -------------------------------------------------------------------


def test_the_cookie_names_a_replica_whose_group_lists_the_others_as_backups(tmp_path):
    conf = rp.render_config(_layout(tmp_path, n=3))
    assert "{{" not in conf and "}}" not in conf
    for i in range(3):
        assert f"r{i} bnviz_r{i};" in conf  # the cookie's value picks the replica's group
        group = re.search(rf"upstream bnviz_r{i} \{{(.*?)\}}", conf, re.S).group(1)
        servers = re.findall(r"server (127\.0\.0\.1:\d+)( backup)?", group)
        assert servers[0] == (f"127.0.0.1:{41000 + i}", "")  # its own replica first
        assert sorted(s for s, b in servers[1:] if b) == sorted(
            f"127.0.0.1:{41000 + j}" for j in range(3) if j != i)
    assert "default bnviz_pool;" in conf and "least_conn;" in conf
    assert "listen 127.0.0.1:8080;" in conf and "client_max_body_size 21m;" in conf
    assert f"alias {rp.streamlit_static_dir()}/static/;" in conf
    assert 'proxy_set_header Upgrade $http_upgrade;' in conf
    assert "proxy_read_timeout 1d;" in conf and "max_fails=1 fail_timeout=10s" in conf
    directives = "\n".join(line for line in conf.splitlines()
                           if not line.strip().startswith("#"))
    assert f"pid {tmp_path}/nginx.pid;" in conf
    assert "/etc/" not in directives and "/var/" not in directives


def test_ipv6_and_all_interfaces(tmp_path):
    assert "listen [::1]:9000;" in rp.render_config(_layout(tmp_path, address="::1",
                                                            port=9000))
    layout = _layout(tmp_path, address="0.0.0.0", port=9000)
    assert layout.url == "http://127.0.0.1:9000"
    assert "listen 0.0.0.0:9000;" in rp.render_config(layout)


def test_a_folder_nginx_cannot_hold_is_refused(tmp_path):
    bad = tmp_path / "a b;c"
    with pytest.raises(BnvizError, match="cannot hold"):
        rp.render_config(_layout(bad))


def test_an_unknown_template_field_is_a_bug(tmp_path):
    with pytest.raises(KeyError, match="nosuch"):
        rp.render_config(_layout(tmp_path), template="x {{nosuch}}")


@pytest.mark.skipif(NGINX is None, reason=NGINX_REASON)
def test_nginx_accepts_the_configuration(tmp_path):
    layout = replace(_layout(tmp_path, port=bs.free_port()), user=rp.nginx_user())
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / sub).mkdir(parents=True)
    (tmp_path / "nginx.conf").write_text(rp.render_config(layout))
    done = subprocess.run(rp.nginx_command(NGINX, tmp_path, test=True), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("tomllib", ["stdlib", "missing (Python 3.10)"])
def test_upload_limit_follows_streamlit_config(tomllib, tmp_path, monkeypatch):
    if tomllib != "stdlib":
        monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib fails
    assert rp.max_upload_mb() == 21  # .streamlit/config.toml: maxUploadSize = 20
    (tmp_path / "c.toml").write_text("[server]\nheadless = true\n[x]\nmaxUploadSize = 5\n")
    assert rp.max_upload_mb(tmp_path / "c.toml") == rp.STREAMLIT_DEFAULT_UPLOAD_MB + 1
    (tmp_path / "c.toml").write_text("[server]\nmaxUploadSize = 7  # MB\n")
    assert rp.max_upload_mb(tmp_path / "c.toml") == 8


# -- the command's messages --------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--replicas", "0"], "--replicas must be between 1 and"),
    (["--replicas", "100"], "--replicas must be between 1 and"),
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--address", "localhost;evil"], "is not an IP address"),
])
def test_bad_options_are_one_line_and_exit_2(args, message, capsys):
    assert main(["serve-class", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_taken_port_is_named_before_anything_starts(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve-class", "--port", str(port), "--no-install"]) == 2
    err = capsys.readouterr().err
    assert f"Port {port} on 127.0.0.1 is not available" in err and "--port" in err


def test_missing_nginx_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(rp, "find_nginx", lambda: None)
    with pytest.raises(BnvizError, match="apt-get install -y nginx"):
        rp.ensure_nginx(install=False)
    monkeypatch.setattr(rp.shutil, "which", lambda name: None)
    with pytest.raises(BnvizError, match="no apt-get"):
        rp.ensure_nginx()


def test_missing_nginx_is_installed_with_apt_get_as_root(monkeypatch, capsys):
    calls = []
    installed = []

    def run(cmd, **kw):
        calls.append(cmd)
        if "install" in cmd:
            installed.append(True)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(rp, "find_nginx", lambda: "/usr/sbin/nginx" if installed else None)
    monkeypatch.setattr(rp.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(rp.os, "geteuid", lambda: 0)
    assert rp.ensure_nginx(out=sys.stderr, run=run) == "/usr/sbin/nginx"
    assert calls == [["apt-get", "install", "-y", "--no-install-recommends", "nginx"]]
    assert "installing Debian's package" in capsys.readouterr().err


def test_without_root_or_sudo_nginx_is_not_installed(monkeypatch):
    monkeypatch.setattr(rp, "find_nginx", lambda: None)
    monkeypatch.setattr(rp.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(rp.os, "geteuid", lambda: 1000)
    refused = subprocess.CompletedProcess([], 1, "", "")
    with pytest.raises(BnvizError, match="needs root"):
        rp.ensure_nginx(run=lambda cmd, **kw: refused)


def test_replicas_share_the_cores_unless_the_operator_says(monkeypatch, fresh_settings):
    monkeypatch.delenv("BNVIZ_TORCH_THREADS", raising=False)
    fresh_settings()
    env = rp.replica_env({"PATH": "/bin"}, 2)
    assert env["BNVIZ_SHARED_SERVER"] == "1" and env["PATH"] == "/bin"
    assert env["BNVIZ_TORCH_THREADS"] == str(max(1, (os.cpu_count() or 2) // 4))
    monkeypatch.setenv("BNVIZ_TORCH_THREADS", "3")
    fresh_settings()
    assert "BNVIZ_TORCH_THREADS" not in rp.replica_env({}, 2)  # inherited as it is


def test_replicas_share_the_memory_budget_unless_the_operator_says(monkeypatch, fresh_settings):
    """Each replica sized its budget for the whole machine: N replicas allowed N times it."""
    from bnviz.machine import machine_memory_bytes

    for name in ("BNVIZ_RUN_SLOTS", "BNVIZ_MEMORY_BUDGET_MB"):
        monkeypatch.delenv(name, raising=False)
    fresh_settings()
    env = rp.replica_env({}, 4)
    assert env["BNVIZ_RUN_SLOTS"] == "1"
    assert int(env["BNVIZ_MEMORY_BUDGET_MB"]) == machine_memory_bytes() // 16 // 2**20
    monkeypatch.setenv("BNVIZ_MEMORY_BUDGET_MB", "900")
    monkeypatch.setenv("BNVIZ_RUN_SLOTS", "2")
    fresh_settings()
    env = rp.replica_env({}, 4)
    assert "BNVIZ_MEMORY_BUDGET_MB" not in env and "BNVIZ_RUN_SLOTS" not in env


# -- the supervisor, with stand-ins for the replicas --------------------------------------------

_FAKE_REPLICA = """
import http.server, os, sys, threading, time
port, then = int(sys.argv[1]), sys.argv[2]
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(1.0)
if then == "exit":
    os._exit(3)
server.shutdown()  # still listening, never answering: hung
time.sleep(600)
"""


@pytest.mark.parametrize(("then", "says"), [("exit", "exited with status 3"),
                                           ("hang", "has not answered")])
def test_a_replica_that_dies_or_hangs_is_restarted(then, says, tmp_path):
    replica = rp.Replica("r0", bs.free_port())
    layout = replace(_layout(tmp_path), replicas=(replica,))
    out = io.StringIO()
    server = rp.ClassServer(
        layout, "nginx", out=out, health_every_s=0.2, health_timeout_s=0.3,
        unhealthy_after_s=1.0, startup_timeout_s=30,
        command=lambda r: [sys.executable, "-c", _FAKE_REPLICA, str(r.port), then])
    try:
        server._start_replica(replica)
        first = server.replicas["r0"].proc
        server._wait_healthy()
        deadline = time.monotonic() + 30
        while server.replicas["r0"].restarts == 0:
            assert time.monotonic() < deadline, out.getvalue()
            server._look_after(replica)
            time.sleep(0.05)
        assert first.poll() is not None and server.replicas["r0"].proc is not first
        assert says in out.getvalue() and "replica r0 restarted" in out.getvalue()
        assert json.loads((tmp_path / "state.json").read_text())["replicas"][0]["restarts"] == 1
    finally:
        server.stop(timeout_s=5)
    assert server.replicas["r0"].proc.poll() is not None


# -- the prefetch's "is the browser local" rule behind the proxy --------------------------------


@pytest.mark.parametrize(("shared", "headers", "held"), [
    ("", {"X-Forwarded-For": "127.0.0.1"}, True),  # make run, a browser on the server
    ("", {"X-Forwarded-For": "198.51.100.4"}, False),  # a student's laptop
    ("1", {"X-Forwarded-For": "127.0.0.1"}, False),  # serve-class: the operator's browser
    ("1", {}, False),  # serve-class, a replica's port opened directly
    ("1", {"X-Forwarded-For": "198.51.100.4"}, False),
])
def test_on_a_shared_server_no_browser_holds_the_prefetch_back(shared, headers, held,
                                                               monkeypatch, fresh_settings):
    """Behind serve-class's nginx every peer is 127.0.0.1 and nginx names the client in
    X-Forwarded-For; a class server's cores serve every student, so no browser (not even
    one on the server itself) pauses the prefetch there."""
    monkeypatch.setenv("BNVIZ_SHARED_SERVER", shared)
    fresh_settings()
    pre = Prefetcher(quiet_s=30)
    dash.set_prefetcher(pre)  # the conftest puts the process's own back afterwards
    dash.note_activity(dash.browser_address(None, headers))
    assert (pre._busy_for() > 0) is held


# -- the Kubernetes files (not run here) -------------------------------------------------------


def _k8s_text() -> str:
    return "\n".join(p.read_text() for p in sorted(K8S.glob("*.yaml")))


def test_kubernetes_files_match_the_local_recipe():
    text = _k8s_text()
    for needed in ("kind: Deployment", "kind: Service", "kind: Ingress",
                   'nginx.ingress.kubernetes.io/affinity: "cookie"',
                   f'nginx.ingress.kubernetes.io/session-cookie-name: "{rp.COOKIE}"',
                   "nginx.ingress.kubernetes.io/proxy-read-timeout",
                   f'nginx.ingress.kubernetes.io/proxy-body-size: "{rp.max_upload_mb()}m"',
                   "readinessProbe", "livenessProbe", "BNVIZ_SHARED_SERVER"):
        assert needed in text, needed
    assert text.count(f"path: {rp.HEALTH_PATH}") == 3  # startup, readiness, liveness
    assert "NOT run here" in (K8S / "README.md").read_text()


def test_kubernetes_files_parse():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "Ingress"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert pod["readinessProbe"]["httpGet"]["path"] == rp.HEALTH_PATH
    ingress = kinds["Ingress"]["metadata"]["annotations"]
    assert ingress["nginx.ingress.kubernetes.io/session-cookie-name"] == rp.COOKIE


# -- end to end: 2 replicas + nginx on loopback, two browsers ---------------------------------

_E2E_REASON = NGINX_REASON if NGINX is None else bs.chromium_skip_reason()
TIMEOUT_MS = 120_000
SMALL = "size=64&batch=2"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ClassServerProcess:
    """``bnviz serve-class`` as a subprocess, and what its state file says."""

    def __init__(self, run_dir: Path, replicas: int = 2):
        self.run_dir = run_dir
        self.port = bs.free_port()
        self.log_path = run_dir.parent / "serve-class.log"
        self.pids: set[int] = set()  # every pid it ever reported
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed below
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bnviz.cli", "serve-class", "--replicas", str(replicas),
             "--port", str(self.port), "--run-dir", str(run_dir), "--no-install"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> dict:
        try:
            state = json.loads((self.run_dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        self.pids |= {r["pid"] for r in state["replicas"] if r["pid"]}
        if state["nginx"]["pid"]:
            self.pids.add(state["nginx"]["pid"])
        return state

    def wait(self, ok, what: str, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve-class exited:\n{self.log()}"
            state = self.state()
            if state and ok(state):
                return state
            time.sleep(0.25)
        raise TimeoutError(f"{what} within {timeout}s:\n{self.log()}")

    def replica(self, name: str) -> dict:
        return next(r for r in self.state()["replicas"] if r["name"] == name)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def class_server(tmp_path_factory):
    server = ClassServerProcess(tmp_path_factory.mktemp("serve-class") / "run")
    try:
        server.wait(lambda s: s["ready"], "serve-class was not ready")
        yield server
    finally:
        server.stop()
        for pid in server.pids:  # never leave a process behind, even when a test failed
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class Student:
    """One browser context: every replica named in its responses and its websockets."""

    def __init__(self, browser, server):
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.seen: list[tuple[str, str]] = []  # (replica header, url)
        self.websockets = 0
        self.console = bs.ConsoleLog(self.page)
        self.page.on("response", self._on_response)
        self.page.on("websocket", self._on_websocket)
        self.page.goto(f"{server.url}/?{SMALL}")
        bs.wait_charts(self.page, 4, TIMEOUT_MS)
        bs.wait_idle(self.page, TIMEOUT_MS)

    def _on_response(self, response) -> None:
        replica = response.headers.get(rp.REPLICA_HEADER.lower())
        if replica:
            self.seen.append((replica, response.url))

    def _on_websocket(self, ws) -> None:
        self.websockets += 1

    @property
    def replicas(self) -> set[str]:
        return {r for r, _ in self.seen}

    def cookie(self) -> str | None:
        return next((c["value"] for c in self.context.cookies() if c["name"] == rp.COOKIE),
                    None)

    def rerun(self, layer: str) -> None:
        """Pick a layer and wait for its chart (a rerun on the websocket)."""
        bs.select_option(self.page, "Layer", layer)
        self.page.wait_for_function(
            "(part) => Array.from(document.querySelectorAll('.gtitle'))"
            ".some(t => t.textContent.includes(part))",
            arg=f"{layer.split(': ')[1]}: batch vs running", timeout=TIMEOUT_MS)
        bs.wait_idle(self.page, TIMEOUT_MS)
        assert self.page.locator(bs.EXCEPTION).count() == 0

    def pick_stimulus(self, kind: str) -> None:
        before = bs.chart_signature(self.page, "network input")
        bs.select_option(self.page, "Kind", kind)
        bs.wait_changed(self.page, "network input", before, TIMEOUT_MS)
        bs.wait_idle(self.page, TIMEOUT_MS)

    def upload(self, path: Path) -> None:
        before = bs.chart_signature(self.page, "network input")
        bs.select_option(self.page, "Kind", "upload")
        box = self.page.locator('[data-testid="stFileUploader"] input[type="file"]')
        with self.page.expect_response(lambda r: "/_stcore/upload_file/" in r.url) as put:
            box.set_input_files(str(path))
        assert put.value.ok, put.value.status
        bs.wait_changed(self.page, "network input", before, TIMEOUT_MS)
        bs.wait_idle(self.page, TIMEOUT_MS)
        assert self.page.locator(bs.EXCEPTION).count() == 0

    def close(self) -> None:
        self.context.close()


def _png(path: Path, colour=(30, 160, 60)) -> Path:
    from PIL import Image

    Image.new("RGB", (80, 64), colour).save(path)
    return path


def _two_students_on_different_replicas(browser, server, attempts: int = 6):
    """New clients go to the replica with the fewest connections, so two students
    normally land apart; retried (bounded) so the test never depends on that."""
    first = Student(browser, server)
    assert len(first.replicas) == 1, f"one browser reached several replicas: {first.seen}"
    for _ in range(attempts):
        second = Student(browser, server)
        assert len(second.replicas) == 1, f"one browser, several replicas: {second.seen}"
        if second.replicas != first.replicas:
            return first, second
        second.close()
    raise AssertionError(f"{attempts + 1} browsers all went to {first.replicas}")


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(_E2E_REASON is not None, reason=_E2E_REASON or "")
def test_each_student_stays_on_its_replica_and_survives_the_other_dying(class_server,
                                                                       tmp_path):
    server = class_server
    # nginx serves the frontend's files itself, cached for a year; a replica serves the page
    js = next((rp.streamlit_static_dir() / "static" / "js").glob("*.js")).name
    with urllib.request.urlopen(f"{server.url}/static/js/{js}", timeout=10) as reply:
        assert reply.headers[rp.REPLICA_HEADER] is None
        assert "immutable" in reply.headers["Cache-Control"]
    with bs.chromium() as browser:
        a, b = _two_students_on_different_replicas(browser, server)
        (ra,), (rb,) = a.replicas, b.replicas
        assert a.cookie() == ra and b.cookie() == rb
        for student, colour in ((a, (200, 30, 30)), (b, (30, 30, 200))):
            student.upload(_png(tmp_path / f"{student.cookie()}.png", colour))
            student.rerun("7: _blocks.2._bn1")
        b.pick_stimulus("image")  # so that b's link alone reproduces its view (below)
        for student in (a, b):
            student.rerun("3: _blocks.1._bn0")
        for student, replica in ((a, ra), (b, rb)):
            uploads = [u for r, u in student.seen if "/_stcore/upload_file/" in u]
            assert uploads and student.replicas == {replica}, student.seen
            assert student.websockets == 1  # one session, never reconnected elsewhere
        # b's replica dies: a's student keeps working on the other one
        dead = server.replica(rb)["pid"]
        os.kill(dead, signal.SIGKILL)
        a.rerun("10: _blocks.3._bn1")
        a.rerun("7: _blocks.2._bn1")
        assert a.replicas == {ra} and a.websockets == 1 and a.console.real_errors() == []
        # b's browser reconnects through nginx to the surviving replica (a new session
        # there, from its link); its cookie now names that replica
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while (b.websockets < 2 or b.cookie() != ra) and time.monotonic() < deadline:
            b.page.wait_for_timeout(250)
        assert b.cookie() == ra and b.websockets >= 2, (b.cookie(), b.websockets, b.seen)
        bs.wait_idle(b.page, TIMEOUT_MS)
        b.rerun("7: _blocks.2._bn1")
        a.close()
        b.close()
    # the supervisor restarted the dead replica, and it answers again
    state = server.wait(lambda s: any(r["name"] == rb and r["restarts"] == 1 and r["pid"]
                                      for r in s["replicas"]), "no restart")
    restarted = next(r for r in state["replicas"] if r["name"] == rb)
    assert restarted["pid"] != dead
    deadline = time.monotonic() + 300
    while not _answers(f"http://127.0.0.1:{restarted['port']}{rp.HEALTH_PATH}"):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.5)
    # nginx's log: every request that carried a's cookie was answered by a's replica
    log = (server.run_dir / "nginx-access.log").read_text()
    lines = [line for line in log.splitlines() if f"cookie={ra} " in line]
    assert lines and all(f"replica={ra} " in line for line in lines), lines
    assert "Traceback" not in (server.run_dir / f"{ra}.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(NGINX is None, reason=NGINX_REASON)
def test_sigterm_stops_every_process(class_server):
    """Runs after the browser test (same server): SIGTERM to serve-class ends nginx and
    every replica, restarted ones included, and frees the port."""
    state = class_server.state()
    pids = class_server.pids | {r["pid"] for r in state["replicas"]}
    assert pids and all(_alive(p) for p in [state["nginx"]["pid"]])
    assert class_server.stop() == 0
    leftover = [p for p in pids if _alive(p)]
    assert leftover == [], leftover
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", class_server.port)) != 0
    assert "stopping the class server" in class_server.log()
