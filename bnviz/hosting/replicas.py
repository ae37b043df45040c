"""``bnviz serve-class``: N Streamlit replicas of the dashboard behind Debian's nginx, on one
machine (``make serve-class REPLICAS=N``).

One Streamlit process tops out near 4-5 cores (about a fifth of its work holds the GIL), so a
class past that grows by processes. Streamlit keeps a session's widget state, uploads and
media in the process that serves it, so every request of a browser must reach the same
replica: nginx routes by a cookie that names the replica (``bnviz_replica=r0``; the
configuration is ``deploy/nginx/bnviz.conf.template``, which explains the rule). Each
replica loads its own model and keeps its own caches: memory grows with N.

What runs, all as the current user and all stopped together on Ctrl-C or SIGTERM:

- N ``streamlit run app.py`` processes on 127.0.0.1 (ports picked free; the project's
  ``.streamlit/config.toml``; ``BNVIZ_SHARED_SERVER=1``);
- nginx in the foreground, configured from the template into a private run folder (its pid
  file, logs and temporary files there, nothing under ``/etc``); it serves the frontend's
  static files itself;
- this supervisor, which polls each replica's ``/_stcore/health`` and restarts a replica
  that exited or stopped answering (nginx meanwhile sends its students to another one).

Nothing here imports Streamlit (bnviz's core stays Streamlit-free); :func:`render_config`
and the other helpers are pure and tested without nginx.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import BnvizError
from ..machine import machine_memory_bytes
from ..settings import settings

#: The affinity cookie; its value names a replica (:attr:`Replica.name`).
COOKIE = "bnviz_replica"
#: Response header nginx adds: the replica that answered (empty for nginx's own files).
REPLICA_HEADER = "X-Bnviz-Replica"
HEALTH_PATH = "/_stcore/health"
ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app.py"
TEMPLATE = ROOT / "deploy" / "nginx" / "bnviz.conf.template"
STREAMLIT_CONFIG = ROOT / ".streamlit" / "config.toml"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
MAX_REPLICAS = 32
#: Resident memory of one replica serving a few students (docs/dashboard.md, README's
#: "Hosting for a class"); only used to warn before starting more than fit.
REPLICA_MEMORY_BYTES = int(2.5 * 2**30)
#: Streamlit's own default for ``server.maxUploadSize`` (MB).
STREAMLIT_DEFAULT_UPLOAD_MB = 200
#: Only these characters in a path written into nginx's configuration (no quoting needed,
#: no ``$`` variables, no ``;`` or braces).
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@%,=-]+$")


@dataclass(frozen=True)
class Replica:
    """One Streamlit process: its name (the cookie's value) and its port on 127.0.0.1."""

    name: str
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Layout:
    """Everything the nginx configuration depends on."""

    replicas: tuple[Replica, ...]
    address: str  # where nginx listens (an IP address)
    port: int
    run_dir: Path
    static_dir: Path  # Streamlit's frontend (the folder that holds index.html)
    max_body_mb: int
    user: str = ""  # "name group" when nginx is started by root, else ""

    @property
    def listen(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.address, self.address)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


# -- the configuration (pure) ------------------------------------------------------------------


def render_config(layout: Layout, template: str | None = None) -> str:
    """nginx's configuration for ``layout``: ``template`` (default: the project's
    ``deploy/nginx/bnviz.conf.template``) with its ``{{field}}`` places filled."""
    if template is None:
        template = TEMPLATE.read_text(encoding="utf-8")
    for path in (layout.run_dir, layout.static_dir):
        if not _SAFE_PATH.match(str(path)):
            raise BnvizError(f"The folder {str(path)!r} has characters nginx's configuration "
                             "cannot hold as they are.",
                             "use a folder whose path has only letters, digits and ._-/ "
                             "(--run-dir, or TMPDIR for the default).")
    pad = " " * 8
    fail = "max_fails=1 fail_timeout=10s"
    routes = [f"{pad}{r.name} bnviz_{r.name};" for r in layout.replicas]
    answered = [f'{pad}"~(^|[ ,]){re.escape(r.address)}$" {r.name};' for r in layout.replicas]
    pool = [f"{pad}server {r.address} {fail};" for r in layout.replicas]
    groups = []
    for r in layout.replicas:
        others = [f"{pad}server {o.address} backup;" for o in layout.replicas if o != r]
        groups.append("\n".join([f"    upstream bnviz_{r.name} {{",
                                 f"{pad}server {r.address} {fail};", *others, "    }"]))
    fields = {
        "user": f"user {layout.user};" if layout.user else "",
        "run_dir": str(layout.run_dir),
        "cookie": COOKIE,
        "route_map": "\n".join(routes),
        "answered_map": "\n".join(answered),
        "pool_servers": "\n".join(pool),
        "replica_upstreams": "\n".join(groups),
        "listen": layout.listen,
        "max_body_mb": str(layout.max_body_mb),
        "static_dir": str(layout.static_dir),
    }

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in fields:
            raise KeyError(f"unknown field {{{{{name}}}}} in the nginx template")
        return fields[name]

    return re.sub(r"\{\{(\w+)\}\}", fill, template)


def replica_names(n: int) -> list[str]:
    return [f"r{i}" for i in range(n)]


def max_upload_mb(config_path: Path = STREAMLIT_CONFIG) -> int:
    """``server.maxUploadSize`` of the project's Streamlit configuration (MB), plus 1 MB for
    the request's own framing: nginx must pass what Streamlit accepts."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError:
        text = ""
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # 3.10: the one value, from the [server] table
        table = re.search(r"^\[server\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        found = table and re.search(r"^\s*maxUploadSize\s*=\s*(\d+)\s*(#.*)?$", table.group(1),
                                    re.M)
        value = int(found.group(1)) if found else None
    else:
        try:
            value = tomllib.loads(text).get("server", {}).get("maxUploadSize")
        except tomllib.TOMLDecodeError:
            value = None
    size = value if isinstance(value, int) and value > 0 else STREAMLIT_DEFAULT_UPLOAD_MB
    return size + 1


def streamlit_static_dir() -> Path:
    """Streamlit's frontend folder (``index.html`` and ``static/``), found without
    importing Streamlit."""
    spec = importlib.util.find_spec("streamlit")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        static = Path(folder) / "static"
        if (static / "index.html").is_file():
            return static
    raise BnvizError("Streamlit's frontend files were not found.",
                     "install the project first (make run, or pip install -e .).")


def replica_env(base: Mapping[str, str], replicas: int) -> dict[str, str]:
    """The environment of each replica: ``base`` and the shared-server flag, and (unless
    the operator set it) torch threads shared out, so N replicas do not each take half the
    cores."""
    env = dict(base)
    env["BNVIZ_SHARED_SERVER"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if settings().torch_threads is None:
        env["BNVIZ_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 2) // (2 * replicas)))
    # Each replica would otherwise size its run slots and memory budget for the whole
    # machine, and N replicas together would allow N times the memory meant for one.
    if settings().run_slots is None:
        env["BNVIZ_RUN_SLOTS"] = "1"
    if settings().memory_budget_mb is None:
        slots = settings().run_slots or 1
        env["BNVIZ_MEMORY_BUDGET_MB"] = str(
            max(1, machine_memory_bytes() // (4 * replicas * slots) // 2**20))
    return env


def replica_command(replica: Replica, python: str = sys.executable) -> list[str]:
    return [python, "-m", "streamlit", "run", str(APP),
            "--server.port", str(replica.port), "--server.address", "127.0.0.1",
            "--server.headless", "true"]


def nginx_command(nginx: str, run_dir: Path, *, test: bool = False) -> list[str]:
    cmd = [nginx, "-p", f"{run_dir}/", "-e", str(run_dir / "nginx-error.log"),
           "-c", str(run_dir / "nginx.conf")]
    return cmd + ["-t", "-q"] if test else cmd


def nginx_user() -> str:
    """``user`` for nginx's workers when root starts it (they would run as ``nobody``, who
    cannot read the private run folder): the current user, as for every other process."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return ""
    import grp
    import pwd

    return f"{pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name}"


def check_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError as exc:
        raise BnvizError(f"--address {address!r} is not an IP address.",
                         "pass 127.0.0.1 (this machine only) or 0.0.0.0 (every network "
                         "interface: the class).") from exc


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports on 127.0.0.1 that are free now (held together while chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def check_port_free(address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            raise BnvizError(f"Port {port} on {address} is not available ({exc.strerror}).",
                             "pass another --port (make serve-class PORT=...).") from exc


# -- nginx -------------------------------------------------------------------------------------


def find_nginx() -> str | None:
    """nginx's executable, or None. Debian puts it in /usr/sbin, which is not on an
    ordinary user's PATH."""
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)


def ensure_nginx(*, install: bool = True, out: TextIO = sys.stderr,
                 run: Callable[..., Any] = subprocess.run) -> str:
    """nginx's executable; when it is missing and ``install``, Debian's package is
    installed with apt-get (as root, or with passwordless sudo). Raises
    :class:`BnvizError` saying how to install it when that is not possible."""
    found = find_nginx()
    if found:
        return found
    fix = ("install it (Debian/Ubuntu: sudo apt-get install -y nginx) and run again; "
           "nothing else of nginx's is used, its own service can stay stopped.")
    if not install:
        raise BnvizError("nginx is not installed.", fix)
    if shutil.which("apt-get") is None:
        raise BnvizError("nginx is not installed, and this system has no apt-get.", fix)
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None or run(["sudo", "-n", "true"], capture_output=True,
                                               check=False).returncode != 0:
            raise BnvizError("nginx is not installed, and installing it needs root.", fix)
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("bnviz: nginx is missing; installing Debian's package (apt-get install -y nginx)",
          file=out, flush=True)
    install_cmd = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", "nginx"]
    done = run(install_cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # stale package lists are the usual reason: refresh once
        run([*prefix, "apt-get", "update"], env=env, capture_output=True, check=False)
        done = run(install_cmd, env=env, capture_output=True, text=True, check=False)
    found = find_nginx()
    if done.returncode != 0 or not found:
        last = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise BnvizError(f"apt-get could not install nginx ({last[0]}).", fix)
    return found


# -- the supervisor ----------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Linux: the child gets SIGTERM if the supervisor dies without stopping it (killed),
    so no replica or nginx outlives it."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


@dataclass
class _Running:
    """A supervised process and what the supervisor knows about it."""

    name: str
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    healthy_at: float | None = None  # last successful health check of this process
    checked_at: float = 0.0
    quick_deaths: int = 0  # exits soon after a start, in a row: the restart backs off
    restart_at: float | None = None
    restarts: int = 0


class ClassServer:
    """Starts, watches and stops the replicas and nginx of one :class:`Layout`.

    :meth:`start` returns once every replica answers its health check and nginx listens;
    :meth:`watch` restarts replicas until :meth:`request_stop`; :meth:`stop` ends every
    process it started (SIGTERM, then SIGKILL of its process group). The state (pids,
    ports, restarts) is written to ``run_dir/state.json`` after every change.
    """

    def __init__(self, layout: Layout, nginx: str, *, env: Mapping[str, str] | None = None,
                 out: TextIO = sys.stderr, poll_s: float = 0.5, health_every_s: float = 3.0,
                 health_timeout_s: float = 3.0, unhealthy_after_s: float = 60.0,
                 startup_timeout_s: float = 300.0,
                 command: Callable[[Replica], list[str]] = replica_command):
        self.layout = layout
        self.nginx = nginx
        self.env = replica_env(os.environ if env is None else env, len(layout.replicas))
        self.out = out
        self.poll_s = poll_s
        self.health_every_s = health_every_s
        self.health_timeout_s = health_timeout_s
        self.unhealthy_after_s = unhealthy_after_s
        self.startup_timeout_s = startup_timeout_s
        self.command = command
        self.replicas = {r.name: _Running(r.name) for r in layout.replicas}
        self.proxy = _Running("nginx")
        self.ready = False
        # a plain flag: a signal handler must not take the locks a threading.Event uses
        self._stopping = False
        # urllib would otherwise send 127.0.0.1 requests to an HTTP proxy from the environment
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        run_dir = self.layout.run_dir
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (run_dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        (run_dir / "nginx.conf").write_text(render_config(self.layout), encoding="utf-8")
        checked = subprocess.run(nginx_command(self.nginx, run_dir, test=True),
                                 capture_output=True, text=True, check=False)
        if checked.returncode != 0:
            raise BnvizError(f"nginx refused the configuration bnviz wrote "
                             f"({_last_line(checked.stderr)}).",
                             f"see {run_dir / 'nginx.conf'}; this is a bug in bnviz, "
                             "please report it with that file.")
        for replica in self.layout.replicas:
            self._start_replica(replica)
        self._write_state()
        self._wait_healthy()
        self._start_nginx()
        self.ready = True
        self._write_state()

    def request_stop(self, *_: object) -> None:
        """Ask :meth:`watch` (or a :meth:`start` in progress) to return; safe in a signal
        handler."""
        self._stopping = True

    def _pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self._stopping

    def watch(self) -> int:
        """Keep the replicas up until :meth:`request_stop`; 0, or 1 if nginx ended."""
        while not self._pause(self.poll_s):
            if self.proxy.proc is not None and self.proxy.proc.poll() is not None:
                self._say(f"nginx exited with status {self.proxy.proc.returncode} "
                          f"(log: {self.layout.run_dir / 'nginx-error.log'}); stopping")
                return 1
            for replica in self.layout.replicas:
                self._look_after(replica)
        return 0

    def stop(self, timeout_s: float = 15.0) -> None:
        """End nginx first (no new requests reach a stopping replica), then every replica."""
        self._stopping = True
        _end([self.proxy.proc], timeout_s)
        _end([r.proc for r in self.replicas.values()], timeout_s)
        self._write_state()

    # -- replicas ----------------------------------------------------------------------

    def _start_replica(self, replica: Replica) -> None:
        run = self.replicas[replica.name]
        with open(self.layout.run_dir / f"{replica.name}.log", "ab") as log:
            run.proc = subprocess.Popen(
                self.command(replica), cwd=ROOT, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        run.started_at = run.checked_at = time.monotonic()
        run.healthy_at = None
        run.restart_at = None

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        waiting = {r.name: r for r in self.layout.replicas}
        while waiting:
            for name, replica in list(waiting.items()):
                proc = self.replicas[name].proc
                if proc.poll() is not None:
                    raise BnvizError(
                        f"Replica {name} exited during start-up with status "
                        f"{proc.returncode} (log: {self.layout.run_dir / (name + '.log')}).",
                        "run 'make run' to see why the dashboard does not start.")
                if self._healthy(replica):
                    self.replicas[name].healthy_at = time.monotonic()
                    del waiting[name]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise BnvizError(f"Replicas {', '.join(waiting)} did not answer "
                                 f"{HEALTH_PATH} within {self.startup_timeout_s:.0f} s.",
                                 f"see their logs in {self.layout.run_dir}.")
            if self._pause(0.25):
                raise KeyboardInterrupt

    def _healthy(self, replica: Replica) -> bool:
        try:
            with self._http.open(f"http://{replica.address}{HEALTH_PATH}",
                                 timeout=self.health_timeout_s) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _look_after(self, replica: Replica) -> None:
        run = self.replicas[replica.name]
        now = time.monotonic()
        if run.restart_at is not None:
            if now >= run.restart_at:
                self._start_replica(replica)
                run.restarts += 1
                self._say(f"replica {replica.name} restarted (pid {run.proc.pid})")
                self._write_state()
            return
        code = run.proc.poll()
        if code is None and now - run.checked_at >= self.health_every_s:
            run.checked_at = now
            if self._healthy(replica):
                run.healthy_at = now
                if now - run.started_at > 60:
                    run.quick_deaths = 0
            elif now - (run.healthy_at or run.started_at) > (
                    self.unhealthy_after_s if run.healthy_at else self.startup_timeout_s):
                self._say(f"replica {replica.name} (pid {run.proc.pid}) has not answered "
                          f"{HEALTH_PATH} for {self.unhealthy_after_s:.0f} s; restarting it")
                _end([run.proc], 10.0)
                code = run.proc.returncode
        if code is None:
            return
        run.quick_deaths = run.quick_deaths + 1 if now - run.started_at < 60 else 0
        delay = min(30.0, 2.0 ** run.quick_deaths - 1)
        run.restart_at = now + delay
        self._say(f"replica {replica.name} (pid {run.proc.pid}) exited with status {code}; "
                  f"restarting it{f' in {delay:.0f} s' if delay >= 1 else ''} "
                  f"(log: {self.layout.run_dir / (replica.name + '.log')})")
        self._write_state()

    # -- nginx -------------------------------------------------------------------------

    def _start_nginx(self) -> None:
        run_dir = self.layout.run_dir
        with open(run_dir / "nginx-stderr.log", "ab") as log:
            self.proxy.proc = subprocess.Popen(
                nginx_command(self.nginx, run_dir), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        self.proxy.started_at = time.monotonic()
        deadline = time.monotonic() + 15
        url = f"{self.layout.url}{HEALTH_PATH}"
        while time.monotonic() < deadline:
            if self.proxy.proc.poll() is not None:
                log = (run_dir / "nginx-error.log").read_text(errors="replace")
                raise BnvizError(f"nginx did not start ({_last_line(log)}).",
                                 "pass another --port if that one is taken "
                                 "(make serve-class PORT=...).")
            try:
                with self._http.open(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BnvizError(f"nginx did not answer on {self.layout.url} within 15 s.",
                         f"see {run_dir / 'nginx-error.log'}.")

    # -- reporting ---------------------------------------------------------------------

    def state(self) -> dict:
        """What runs now: the url, nginx's pid and each replica's name, port, pid and
        restarts (``run_dir/state.json``)."""
        return {
            "ready": self.ready,
            "url": self.layout.url,
            "run_dir": str(self.layout.run_dir),
            "nginx": {"pid": _pid(self.proxy.proc)},
            "replicas": [
                {"name": r.name, "port": r.port, "pid": _pid(self.replicas[r.name].proc),
                 "restarts": self.replicas[r.name].restarts}
                for r in self.layout.replicas],
        }

    def _write_state(self) -> None:
        path = self.layout.run_dir / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2), encoding="utf-8")
        os.replace(tmp, path)

    def _say(self, text: str) -> None:
        print(f"bnviz: {text}", file=self.out, flush=True)


def _pid(proc: subprocess.Popen | None) -> int | None:
    return proc.pid if proc is not None and proc.poll() is None else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _end(procs: Sequence[subprocess.Popen | None], timeout_s: float) -> None:
    """SIGTERM to each running process, then SIGKILL to the process group of any still
    running after ``timeout_s`` (each was started as its group's leader)."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in live:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def memory_warning(replicas: int) -> str | None:
    """A warning when ``replicas`` would need more memory than is available now (Linux's
    MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    except (OSError, ValueError, IndexError):
        return None
    available = info.get("MemAvailable")
    needed = replicas * REPLICA_MEMORY_BYTES
    if available is None or needed <= available:
        return None
    return (f"{replicas} replicas need about {needed / 2**30:.1f} GB (each loads its own "
            f"model and caches), and {available / 2**30:.1f} GB are available; "
            "consider fewer replicas (REPLICAS=...)")


# -- the command -------------------------------------------------------------------------------


def register_cli(subparsers: Any) -> None:
    """Add ``bnviz serve-class`` to the main parser's subcommands."""
    p = subparsers.add_parser(
        "serve-class", help="serve the dashboard to a class: N replicas behind nginx",
        description="Start N Streamlit replicas of the dashboard on 127.0.0.1 and nginx in "
                    "front of them (installed with apt-get when missing), with cookie "
                    "session affinity, websocket proxying, the frontend's files served by "
                    "nginx, and health checks. Ctrl-C stops everything.")
    p.add_argument("--replicas", type=int, default=2, help="Streamlit processes (default 2)")
    p.add_argument("--port", type=int, default=8501, help="nginx's port (default 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="nginx's address: 127.0.0.1 (default: this machine only) or "
                        "0.0.0.0 (every interface, for a class on the network)")
    p.add_argument("--run-dir", default=None,
                   help="folder for nginx's configuration, logs and pid files, kept "
                        "afterwards (default: a new private temporary folder, removed on a "
                        "clean stop)")
    p.add_argument("--no-install", action="store_true",
                   help="do not install nginx when it is missing")
    p.set_defaults(func=cmd_serve_class)


def cmd_serve_class(args) -> int:
    if not 1 <= args.replicas <= MAX_REPLICAS:
        raise BnvizError(f"--replicas must be between 1 and {MAX_REPLICAS}, got "
                         f"{args.replicas}.", "pass e.g. --replicas 2.")
    if not 1 <= args.port <= 65535:
        raise BnvizError(f"--port must be between 1 and 65535, got {args.port}.",
                         "pass e.g. --port 8501.")
    address = check_address(args.address)
    if not APP.is_file() or not TEMPLATE.is_file():
        raise BnvizError(f"serve-class runs from the project's folder, and {APP} or "
                         f"{TEMPLATE} is missing.", "run it from a checkout of bnviz.")
    check_port_free(address, args.port)
    nginx = ensure_nginx(install=not args.no_install)
    warning = memory_warning(args.replicas)
    if warning:
        print(f"bnviz: warning: {warning}", file=sys.stderr, flush=True)
    own_dir = args.run_dir is None
    if own_dir:
        run_dir = Path(tempfile.mkdtemp(prefix="bnviz-class-"))  # mode 0700
    else:
        run_dir = Path(args.run_dir).resolve()
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ports = free_ports(args.replicas)
    layout = Layout(
        replicas=tuple(Replica(n, p) for n, p in zip(replica_names(args.replicas), ports)),
        address=address, port=args.port, run_dir=run_dir,
        static_dir=streamlit_static_dir(), max_body_mb=max_upload_mb(), user=nginx_user())
    server = ClassServer(layout, nginx)
    previous = {s: signal.signal(s, server.request_stop) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    clean = False
    try:
        print(f"bnviz: starting {args.replicas} replica{'s' if args.replicas > 1 else ''} "
              f"and nginx (run folder {run_dir})",
              file=sys.stderr, flush=True)
        server.start()
        names = ", ".join(f"{r['name']} on 127.0.0.1:{r['port']} (pid {r['pid']})"
                          for r in server.state()["replicas"])
        print(f"bnviz: class server ready at {layout.url}: {names}; nginx pid "
              f"{server.proxy.proc.pid}. Ctrl-C stops everything.", file=sys.stderr,
              flush=True)
        code = server.watch()
        clean = code == 0
        return code
    except KeyboardInterrupt:
        clean = True
        return 0
    finally:
        print("bnviz: stopping the class server", file=sys.stderr, flush=True)
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if own_dir and clean:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif own_dir:
            print(f"bnviz: logs kept in {run_dir}", file=sys.stderr, flush=True)
