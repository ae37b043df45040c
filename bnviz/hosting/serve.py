"""``bnviz serve`` and ``bnviz.serve(model, x)``: the dashboard on the operator's own network.

Both open the same dashboard (``app.py`` and its pages) with one more model in its picker,
the operator's, shown first (see :mod:`bnviz.models.custom` for what a model and an input
can be, and for why no link can name another):

- ``bnviz serve --model examples/my_model.py:build --input 8x3x16x64x64`` checks the model
  and the input here (one forward, every BatchNorm layer measured; a mistake is one line
  and exit status 2), writes them into a private file and runs ``streamlit run app.py``
  with ``BNVIZ_SERVE_SPEC`` naming that file. Ctrl-C stops it and removes the file.
- ``bnviz.serve(model, x)`` (a notebook) runs Streamlit's own server in this process, on a
  thread with its own event loop, so the dashboard reads the very module and tensor given:
  ``block=True`` serves until Ctrl-C; ``block=False`` returns a :class:`ServeHandle` (its
  ``url``; ``stop()``). One such server per process: serving again replaces the model it
  shows.

Only :func:`_start_in_process` imports Streamlit (its server, not its page elements), when
it is called: ``import bnviz`` stays free of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BnvizError
from ..models.custom import (
    ServeSpec,
    build_served,
    check_served,
    clear_served,
    is_input_file,
    served_from_objects,
    set_served,
)
from .replicas import APP, HEALTH_PATH, ROOT, check_address, check_port_free

DEFAULT_PORT = 8501
#: How long a server may take to answer its health check (a cold start imports PyTorch).
STARTUP_TIMEOUT_S = 120.0


def _url(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _check_port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BnvizError(f"--port must be between 1 and 65535, got {port!r}.",
                         "pass e.g. --port 8501.")
    return port


def _check_host(host: str) -> str:
    try:
        return check_address(host)
    except BnvizError:
        raise BnvizError(f"--host {host!r} is not an IP address.",
                         "pass 127.0.0.1 (this machine only) or 0.0.0.0 (every network "
                         "interface).") from None


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}{HEALTH_PATH}", timeout=timeout_s) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# -- bnviz serve -------------------------------------------------------------------------------


def spec_from_args(args) -> ServeSpec:
    """The :class:`ServeSpec` of the command line, with every path made absolute (the
    dashboard runs in the project's folder)."""
    def absolute(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    model = str(args.model).strip()
    where, sep, attr = model.rpartition(":")
    if sep and (where.endswith(".py") or "/" in where or os.sep in where):
        model = f"{absolute(where)}:{attr}"
    inputs = tuple(absolute(i) if is_input_file(i) else i for i in (args.input or ()))
    seed = args.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BnvizError(f"--seed must be a whole number of at least 0, got {seed!r}.",
                         "pass e.g. --seed 0.")
    weights = absolute(args.weights) if args.weights else None
    if weights is not None and not os.path.isfile(weights):
        raise BnvizError(f"--weights {args.weights!r} is not a file.",
                         "give the path of a state_dict saved with "
                         "torch.save(model.state_dict(), path).")
    return ServeSpec(model=model, weights=weights,
                     inputs=inputs, seed=seed, sys_path=(os.getcwd(),))


def write_spec(spec: ServeSpec) -> tuple[Path, Path]:
    """``(folder, file)``: the spec in a new folder only this user can open (0700), the file
    itself 0600. The dashboard finds it through ``BNVIZ_SERVE_SPEC``, never a link."""
    folder = Path(tempfile.mkdtemp(prefix="bnviz-serve-"))  # mode 0700
    path = folder / "spec.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(spec.to_json())
    return folder, path


def streamlit_command(host: str, port: int, python: str = sys.executable) -> list[str]:
    return [python, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
            "--server.address", host, "--server.headless", "true"]


def register_cli(subparsers: Any) -> None:
    """Add ``bnviz serve`` to the main parser's subcommands."""
    p = subparsers.add_parser(
        "serve", help="open the dashboard on your own model and input",
        description="Start the dashboard with your model first in its picker: a registry "
                    "name, pkg.module:factory or path/to/file.py:factory (a function or "
                    "class returning an nn.Module). The model and input are checked with "
                    "one forward before the server starts. Ctrl-C stops it.")
    p.add_argument("--model", required=True,
                   help="registry name, pkg.module:factory or path/to/file.py:factory")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="a state_dict file for the model (loaded with weights_only=True)")
    p.add_argument("--input", action="append", default=[], metavar="SHAPE|FILE",
                   help="the model's input: a shape such as 16x32 or 8x3x16x64x64 (random "
                        "normal values), a .npy file (no pickle) or a .pt file (a tensor or "
                        "a tuple of tensors); repeat for a model with several inputs. "
                        "Leave out for image models: the dashboard's stimuli")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs (default 0)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on: 127.0.0.1 (default: this machine only) or "
                        "0.0.0.0 (every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT})")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    port = _check_port(args.port)
    host = _check_host(args.host)
    if not APP.is_file():
        raise BnvizError(f"bnviz serve runs the dashboard of the project's folder, and {APP} "
                         "is missing.", "run it from a checkout of bnviz (pip install -e .).")
    spec = spec_from_args(args)
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python -m` does: the operator's own package, by name
        sys.path.insert(0, cwd)
    served = build_served(spec)
    check_served(served)
    check_port_free(host, port)
    say = _say
    if served.default_only:
        say(f"model {served.key} (the dashboard's default)")
    else:
        loaded = served.loaded
        shown = (served.input_text if served.operator_input
                 else "the dashboard's image stimuli")
        say(f"model {loaded.name} ({len(loaded.bn_layer_names)} BatchNorm layers, weights "
            f"{loaded.weights}); input {shown}")
    folder, path = write_spec(spec)
    env = dict(os.environ, BNVIZ_SERVE_SPEC=str(path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(streamlit_command(host, port), cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    stopping = []
    previous = {s: signal.signal(s, lambda *_: stopping.append(True))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = _url(host, port)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        ready = False
        while not stopping and proc.poll() is None:
            if not ready and _healthy(url):
                ready = True
                say(f"dashboard ready at {url} (pid {proc.pid}). Ctrl-C stops it.")
            if not ready and time.monotonic() > deadline:
                raise BnvizError(f"The dashboard did not answer {HEALTH_PATH} within "
                                 f"{STARTUP_TIMEOUT_S:.0f} s.", "see the messages above.")
            time.sleep(0.2)
        return 0 if stopping else (proc.returncode or 0)
    finally:
        _end(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(folder, ignore_errors=True)


def _end(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _say(text: str) -> None:
    print(f"bnviz: {text}", file=sys.stderr, flush=True)


# -- bnviz.serve(model, x) ---------------------------------------------------------------------


@dataclass
class ServeHandle:
    """A dashboard served from this process: open :attr:`url`; :meth:`stop` ends it."""

    url: str
    model: str  # the model's name in the dashboard's picker (served:...)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: Any = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (and forget the model it showed); safe to call twice."""
        with _SERVER_LOCK:
            if _SERVER and _SERVER[0] is self:
                _SERVER.clear()
        if self._stop is not None and self.running:
            self._stop()
            self._thread.join(timeout_s)
        clear_served()

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self.running:
                self._thread.join(0.5)
        except KeyboardInterrupt:
            self.stop()

    def _repr_html_(self) -> str:  # a notebook shows the link
        return f'bnviz dashboard: <a href="{self.url}" target="_blank">{self.url}</a>'


_SERVER_LOCK = threading.Lock()
_SERVER: list[ServeHandle] = []  # the one in-process server


def serve(model, x=None, *, port: int | None = None, host: str = "127.0.0.1",
          block: bool = True) -> ServeHandle:
    """Open the dashboard on ``model`` (an ``nn.Module`` or ``bnviz.load_model(...)``) and
    its input ``x`` (a tensor, a tuple of tensors for a model with several inputs, or None
    for the dashboard's image stimuli).

    The model and input are checked with one forward first (:class:`BnvizError` if it
    fails). ``block=True`` serves until Ctrl-C; ``block=False`` (a notebook) serves from a
    background thread and returns at once: ``handle.url`` to open, ``handle.stop()`` to end
    it. While a server of this process runs, serving again shows the new model on the same
    server (reload the page). ``port=None`` picks a free one.
    """
    host = _check_host(host)
    if port is not None:
        _check_port(port)
    served = served_from_objects(model, x)
    check_served(served)
    with _SERVER_LOCK:
        running = _SERVER[0] if _SERVER and _SERVER[0].running else None
    if running is not None and port not in (None, running.port):
        running.stop()
        running = None
    if running is None and port is not None:
        check_port_free(host, port)
    served = set_served(served)
    if running is not None:  # the same server shows the new model from its next page
        running.model = served.key
        handle = running
    else:
        try:
            handle = _start_in_process(host, port or 0, served.key)
        except BaseException:
            clear_served()
            raise
    if block:
        _say(f"dashboard of {served.key} at {handle.url}. Ctrl-C stops it.")
        handle.wait()
    return handle


def _start_in_process(host: str, port: int, key: str) -> ServeHandle:
    """Streamlit's server for ``app.py`` on its own thread and event loop; returns once it
    answers its health check. ``port`` 0: one the system picks."""
    from streamlit import config as st_config
    from streamlit.runtime import Runtime
    from streamlit.web import bootstrap
    from streamlit.web.server import Server

    if Runtime.exists():
        raise BnvizError("A Streamlit server already runs in this process.",
                         "stop it first, or call bnviz.serve() from a plain Python process "
                         "or notebook.")
    if str(ROOT) not in sys.path:  # app.py imports its ui package from there
        sys.path.insert(0, str(ROOT))
    st_config._main_script_path = str(APP)  # the project's .streamlit/config.toml applies
    bootstrap.load_config_options({"server.port": port, "server.address": host,
                                   "server.headless": True, "server.fileWatcherType": "none",
                                   "browser.gatherUsageStats": False})
    started = threading.Event()
    state: dict[str, Any] = {}

    async def run() -> None:
        server = Server(str(APP), False)
        state["loop"] = asyncio.get_running_loop()
        state["server"] = server
        try:
            await server.start()
            bootstrap.prepare_streamlit_environment(str(APP))
        except BaseException as exc:  # includes the SystemExit of a port taken meanwhile
            state["error"] = exc
            started.set()
            return
        started.set()
        await server.stopped

    def main() -> None:
        try:
            asyncio.run(run())
        finally:
            server = state.get("server")
            # Streamlit keeps one runtime per process and never forgets it: forgotten here,
            # so a later serve() in the same notebook can start another.
            if server is not None and Runtime._instance is server._runtime:
                Runtime._instance = None
            started.set()

    thread = threading.Thread(target=main, name="bnviz-serve", daemon=True)
    thread.start()
    started.wait(STARTUP_TIMEOUT_S)
    if "error" in state or not thread.is_alive():
        thread.join(10)
        exc = state.get("error")
        raise BnvizError(f"The dashboard's server did not start ({exc!r}).",
                         "pass another port, or port=None for a free one.")
    actual = int(st_config.get_option("server.port"))
    url = _url(host, actual)

    def stop() -> None:
        loop, server = state["loop"], state["server"]
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(server.stop)

    handle = ServeHandle(url=url, model=key, _thread=thread, _stop=stop)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(url):
        if time.monotonic() > deadline or not thread.is_alive():
            handle.stop()
            raise BnvizError(f"The dashboard's server did not answer at {url}.",
                             "see the messages above.")
        time.sleep(0.1)
    with _SERVER_LOCK:
        _SERVER[:] = [handle]
    return handle
