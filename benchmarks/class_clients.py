"""Simulated students for ``benchmarks/bench_class.py``: a light client that speaks
Streamlit's own websocket protocol, and a student in a real browser (Playwright).

The websocket client does what the browser's Streamlit frontend does, without drawing:
it connects to ``ws://host:port/_stcore/stream`` (subprotocol ``streamlit``, the cookies an
HTTP GET of the page set, so a proxy's session affinity applies), sends ``BackMsg``
protobufs (``rerun_script`` with the page's query string and the state of every widget on
the page, the fragment's id for a fragment rerun, ``is_auto_rerun`` for a fragment that
refreshes itself) and reads the ``ForwardMsg`` replies. Widget ids, fragment ids, options
and values are learned from the deltas of the session's own runs, so nothing depends on how
Streamlit derives its ids. A run's latency is from sending the ``BackMsg`` to its
``script_finished`` message ("server" in the tables: what a browser waits for before it
can draw).

Every reply is checked against the student's own configuration (cross-talk): the page's
header names its model, photo and global mode, the layer's sentence its layer and the mode
the view *data* ran in, the query string the server writes into the address bar its whole
state, and the overview chart (the numbers of every BatchNorm layer) must be the same for
every student with the same configuration and never one already seen for another.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

#: Script statuses that end a run (2 is "finished early for a rerun": the next run follows).
FINISHED = (ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_WITH_COMPILE_ERROR,
            ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY)
RUN_TIMEOUT_S = 240.0
TRAINING_TIMEOUT_S = 300.0
#: The twelve actions of a student's script, in the proportions a lesson has them (shuffled
#: per student for free exploration); more or fewer actions repeat or cut this list.
ACTION_MIX = ("layer", "toggle", "layer", "photo", "channel", "layer", "toggle", "chart",
              "layer", "photo", "channel", "toggle")
#: A Training-lab student: a default training run (watched until it finishes), then three
#: display changes while reading the charts.
TRAINING_MIX = ("train", "display", "display", "display")
READING_S = (1.5, 5.0)


def widget_key(widget_id: str) -> str:
    """The user key of a Streamlit widget id (``$$ID-<hash>-<key>``), else the id."""
    if widget_id.startswith("$$ID-"):
        parts = widget_id.split("-", 2)
        if len(parts) == 3 and parts[2] != "None":
            return parts[2]
    return widget_id


@dataclass
class Widget:
    """One widget of the page as the frontend holds it: where it is and its value."""

    id: str
    kind: str
    fragment_id: str
    options: list[str]
    state: WidgetState | None  # None: the frontend sends nothing for it (buttons)
    proto: Any = None


def _options(kind: str, w) -> list[str]:
    if kind == "button_group":
        return [o.content for o in w.options]
    return list(getattr(w, "options", []))


def initial_state(kind: str, w) -> WidgetState | None:
    """The value the frontend would send for a widget the server just drew."""
    st = WidgetState(id=w.id)
    if kind in ("selectbox", "radio"):
        if w.HasField("raw_value"):
            st.string_value = w.raw_value
        elif w.HasField("default") and 0 <= w.default < len(w.options):
            st.string_value = w.options[w.default]
        else:
            return None
    elif kind == "number_input":
        if w.HasField("value"):
            value = w.value
        elif w.HasField("default"):
            value = w.default
        else:
            return None
        if w.data_type == w.FLOAT:
            st.double_value = value
        else:
            st.int_value = int(value)
    elif kind == "checkbox":
        st.bool_value = w.value if w.set_value else w.default
    elif kind in ("multiselect", "button_group"):
        opts = _options(kind, w)
        values = list(w.raw_values) if w.set_value else [opts[i] for i in w.default
                                                          if 0 <= i < len(opts)]
        st.string_array_value.data.extend(values)
    elif kind == "slider" and len(w.options):
        idx = w.value if w.set_value else w.default
        st.string_array_value.data.extend(w.options[int(i)] for i in idx)
    elif kind == "slider":
        st.double_array_value.data.extend(w.value if w.set_value else w.default)
    else:
        return None
    return st


def set_value(widget: Widget, value: Any) -> None:
    """Change a widget's value as the user would (the value is its label on screen)."""
    st = WidgetState(id=widget.id)
    if widget.kind in ("selectbox", "radio"):
        st.string_value = str(value)
    elif widget.kind == "number_input":
        if widget.proto is not None and widget.proto.data_type == widget.proto.FLOAT:
            st.double_value = float(value)
        else:
            st.int_value = int(value)
    elif widget.kind in ("checkbox", "expandable"):
        st.bool_value = bool(value)
    elif widget.kind in ("multiselect", "button_group"):
        st.string_array_value.data.extend([value] if isinstance(value, str) else value)
    else:
        raise ValueError(f"cannot set a {widget.kind} widget")
    widget.state = st


@dataclass
class Run:
    """The replies to one BackMsg (or to a rerun the server started itself)."""

    sent_at: float
    finished_at: float | None = None
    status: int | None = None
    fragment: bool = False
    texts: list[str] = field(default_factory=list)  # markdown, captions, alerts
    alerts: list[tuple[str, str]] = field(default_factory=list)  # (format, body)
    errors: list[str] = field(default_factory=list)
    charts: dict[str, str] = field(default_factory=dict)  # user key -> digest of its data
    query: str | None = None
    bytes: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def latency(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.sent_at


def _chart_digest(spec: str) -> str:
    """Digest of a plotly figure's data (its numbers), not its layout."""
    try:
        data = json.loads(spec).get("data")
    except ValueError:
        data = spec
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def get_cookies(base_url: str, headers: dict[str, str],
                timeout: float = 60.0) -> tuple[str, str]:
    """GET the page as a browser would first; return the cookies it set (a proxy's session
    affinity cookie, Streamlit's XSRF cookie) as a Cookie header value, and the replica
    that answered (``X-Bnviz-Replica``, set by ``bnviz serve-class``'s nginx; else '')."""
    req = urllib.request.Request(base_url + "/", headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()
        cookies = [c.split(";", 1)[0] for c in resp.headers.get_all("Set-Cookie") or []]
        replica = resp.headers.get("X-Bnviz-Replica", "")
    return "; ".join(cookies), replica


class Session:
    """One browser tab of the app, without the browser."""

    def __init__(self, base_url: str, query: str = "", *, forwarded_for: str | None = None,
                 page_hash: str = ""):
        self.base_url = base_url.rstrip("/")
        self.query = query
        self.page_hash = page_hash
        self.headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        self.widgets: dict[str, Widget] = {}
        self.pages: dict[str, str] = {}  # page name -> script hash
        self.auto_reruns: dict[str, float] = {}  # fragment id -> interval (s)
        self.current: Run | None = None
        self.closed = False
        self.close_reason = ""
        self.ws = None
        self.replica = ""
        self._reader: asyncio.Task | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        cookie, self.replica = await loop.run_in_executor(None, get_cookies, self.base_url,
                                                          self.headers)
        headers = dict(self.headers)
        if cookie:
            headers["Cookie"] = cookie
        url = self.base_url.replace("http://", "ws://", 1) + "/_stcore/stream"
        self.ws = await websockets.connect(url, subprotocols=["streamlit"],
                                           additional_headers=headers, max_size=None,
                                           open_timeout=60, ping_interval=None)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing anyway
                pass

    # -- replies ---------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                msg = ForwardMsg()
                msg.ParseFromString(data)
                self._handle(msg, len(data))
        except websockets.ConnectionClosed as exc:
            self.close_reason = f"connection closed ({exc})"
        finally:
            self.closed = True
            if self.current is not None and not self.current.done.is_set():
                self.current.errors.append(self.close_reason or "connection closed")
                self.current.done.set()

    def _run(self) -> Run:
        if self.current is None or self.current.done.is_set():
            # a rerun the server started by itself (st.rerun after a fragment)
            self.current = Run(sent_at=time.perf_counter())
        return self.current

    def _handle(self, msg: ForwardMsg, size: int) -> None:
        kind = msg.WhichOneof("type")
        run = self._run() if kind not in ("auto_rerun", "stop_auto_rerun") else self.current
        if run is not None:
            run.bytes += size
        if kind == "new_session":
            # a full run starts: the frontend drops its auto-reruns; the run re-registers
            # those that are still on the page
            self.auto_reruns.clear()
            self.page_hash = msg.new_session.page_script_hash or self.page_hash
        elif kind == "navigation":
            # the page the frontend names in its reruns (new_session names the main script)
            self.pages = {p.page_name: p.page_script_hash for p in msg.navigation.app_pages}
            self.page_hash = msg.navigation.page_script_hash or self.page_hash
        elif kind == "page_info_changed":
            self.query = msg.page_info_changed.query_string
            run.query = self.query
        elif kind == "auto_rerun":
            self.auto_reruns[msg.auto_rerun.fragment_id] = msg.auto_rerun.interval
        elif kind == "stop_auto_rerun":
            for fid in msg.stop_auto_rerun.fragment_ids:
                self.auto_reruns.pop(fid, None)
        elif kind == "delta":
            self._delta(msg, run)
        elif kind == "script_finished":
            if msg.script_finished in FINISHED:
                run.status = msg.script_finished
                run.finished_at = time.perf_counter()
                run.done.set()

    def _delta(self, msg: ForwardMsg, run: Run) -> None:
        delta = msg.delta
        which = delta.WhichOneof("type")
        if which == "add_block":
            block = delta.add_block
            if block.WhichOneof("type") == "expandable" and block.expandable.id:
                key = widget_key(block.expandable.id)
                st = WidgetState(id=block.expandable.id, bool_value=block.expandable.expanded)
                old = self.widgets.get(key)
                self.widgets[key] = Widget(block.expandable.id, "expandable",
                                           delta.fragment_id, [],
                                           old.state if old and old.id == block.expandable.id
                                           else st)
            return
        if which != "new_element":
            return
        el = delta.new_element
        kind = el.WhichOneof("type")
        sub = getattr(el, kind)
        if kind == "markdown":
            run.texts.append(sub.body)
        elif kind == "alert":
            fmt = type(sub).Format.Name(sub.format)
            run.alerts.append((fmt, sub.body))
            run.texts.append(sub.body)
            if fmt == "ERROR":
                run.errors.append(f"error message: {sub.body[:200]}")
        elif kind == "exception":
            run.errors.append(f"exception {sub.type}: {sub.message[:200]}")
        elif kind == "plotly_chart" and sub.id:
            run.charts[widget_key(sub.id)] = _chart_digest(sub.spec)
        wid = getattr(sub, "id", "") if kind not in ("plotly_chart", "download_button") else ""
        if not wid:
            return
        key = widget_key(wid)
        old = self.widgets.get(key)
        keep = old is not None and old.id == wid and not getattr(sub, "set_value", False)
        self.widgets[key] = Widget(wid, kind, delta.fragment_id, _options(kind, sub),
                                   old.state if keep else initial_state(kind, sub), sub)

    # -- requests --------------------------------------------------------------------------

    def widget(self, key: str) -> Widget:
        try:
            return self.widgets[key]
        except KeyError:
            raise KeyError(f"no widget with key {key!r} on the page "
                           f"(have: {sorted(self.widgets)})") from None

    def find_widget(self, predicate) -> Widget | None:
        return next((w for w in self.widgets.values() if predicate(w)), None)

    async def rerun(self, *, fragment_id: str = "", trigger: str | None = None,
                    auto: bool = False, page_hash: str | None = None,
                    timeout: float = RUN_TIMEOUT_S) -> Run:
        """Send a ``rerun_script`` with every widget's state (the click ``trigger`` set) and
        wait for its ``script_finished``."""
        if self.closed:
            run = Run(sent_at=time.perf_counter())
            run.errors.append(self.close_reason or "connection closed")
            return run
        msg = BackMsg()
        cs = msg.rerun_script
        cs.query_string = self.query
        cs.page_script_hash = self.page_hash if page_hash is None else page_hash
        cs.fragment_id = fragment_id
        cs.is_auto_rerun = auto
        for key, w in self.widgets.items():
            if key == trigger:
                cs.widget_states.widgets.append(WidgetState(id=w.id, trigger_value=True))
            elif w.state is not None:
                cs.widget_states.widgets.append(w.state)
        run = Run(sent_at=time.perf_counter(), fragment=bool(fragment_id))
        self.current = run
        await self.ws.send(msg.SerializeToString())
        try:
            await asyncio.wait_for(run.done.wait(), timeout)
        except TimeoutError:
            run.errors.append(f"no script_finished within {timeout:.0f} s")
        return run

    async def change(self, key: str, value: Any, **kw) -> Run:
        """Set widget ``key`` to ``value`` and rerun what the frontend would rerun: the
        widget's fragment, or the whole page."""
        w = self.widget(key)
        set_value(w, value)
        return await self.rerun(fragment_id=w.fragment_id, **kw)


# -- cross-talk checks ---------------------------------------------------------------------


@dataclass
class Expected:
    """What one student's page must show: its own configuration."""

    model: str = "efficientnet_lite0"
    photo: str = "chelsea"
    mode: str = "eval"  # the page opens in eval
    layer: str = ""  # BN layer name (without the "i: " prefix)
    channel: int = 0

    def compute_key(self) -> tuple:
        # the overview marks the layer shown below it, so its traces depend on the layer too
        return (self.model, self.photo, self.mode, self.layer)


class ChartRegistry:
    """Overview-chart digests seen per configuration, shared by all students of a run:
    the same configuration must give the same numbers, and numbers already seen for one
    configuration must never come back for another."""

    def __init__(self):
        self.by_config: dict[tuple, set[str]] = defaultdict(set)
        self.owner: dict[str, tuple] = {}

    def check(self, key: tuple, digest: str) -> list[str]:
        problems = []
        owner = self.owner.setdefault(digest, key)
        if owner != key:
            problems.append(f"overview numbers of {owner} shown for {key}")
        seen = self.by_config[key]
        if seen and digest not in seen:
            problems.append(f"overview numbers for {key} differ between sessions")
        seen.add(digest)
        return problems


def check_run(run: Run, exp: Expected, registry: ChartRegistry | None, *,
              full: bool) -> list[str]:
    """Cross-talk problems in one run's replies (empty: all of it is this student's)."""
    problems = []
    header = next((t for t in run.texts if "global mode **" in t), None)
    if full:
        if header is None:
            problems.append("no header in a full run")
        else:
            for want in (f"**{exp.model}**", f"global mode **{exp.mode}**"):
                if want not in header:
                    problems.append(f"header lacks {want!r}: {header[:160]!r}")
            # one photo for the batch, or a different one per image starting with it
            if f"image ({exp.photo})" not in header and f"photos {exp.photo}" not in header:
                problems.append(f"header lacks photo {exp.photo!r}: {header[:160]!r}")
    status = next((t for t in run.texts if " ran as `" in t), None)
    if status is not None and exp.layer:
        if not status.startswith(f"`{exp.layer}`"):
            problems.append(f"layer text is not about {exp.layer}: {status[:80]!r}")
        if f"ran as `{exp.mode}" not in status:
            problems.append(f"layer ran in another mode than {exp.mode}: {status[:160]!r}")
    if run.query:
        q = dict(urllib.parse.parse_qsl(run.query))
        wanted = {"model": exp.model, "mode": exp.mode, "stim": f"image:name={exp.photo}"}
        if exp.layer and "layer" in q:
            wanted["layer"] = exp.layer
        for k, v in wanted.items():
            if q.get(k) != v:
                problems.append(f"address bar {k}={q.get(k)!r}, expected {v!r}")
    digest = run.charts.get("overview_chart")
    if registry is not None and digest is not None:
        problems += registry.check(exp.compute_key(), digest)
    return problems


# -- the students --------------------------------------------------------------------------


@dataclass
class PageFacts:
    """What a first session learned about the page (shared with the browser students)."""

    layers: list[str]  # the layer picker's labels, "i: name"
    photos: list[str]
    tabs: list[str]
    main_hash: str = ""
    training_hash: str = ""


@dataclass
class StudentResult:
    index: int
    kind: str  # "websocket" or "browser"
    role: str  # "free", "follower", "training"
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    training_s: list[float] = field(default_factory=list)  # the job's own elapsed time
    training_wall_s: list[float] = field(default_factory=list)  # Start -> "Finished" seen
    errors: list[str] = field(default_factory=list)
    checked: int = 0
    violations: list[str] = field(default_factory=list)
    actions_done: int = 0
    replica: str = ""

    def to_json(self) -> dict:
        return {"index": self.index, "kind": self.kind, "role": self.role,
                "times": dict(self.times), "training_s": self.training_s,
                "training_wall_s": self.training_wall_s, "errors": self.errors,
                "checked": self.checked, "violations": self.violations,
                "actions_done": self.actions_done, "replica": self.replica}


@dataclass
class Plan:
    """One student's script: the kinds of its actions, the random choices of their values
    (shared by the lesson's followers), and when to act."""

    kinds: list[str]
    value_rng: random.Random
    pace_rng: random.Random
    beat_s: float | None = None  # lesson: the teacher's step k is at start + k * beat_s
    start: float = 0.0

    async def wait_turn(self, step: int, last_done: float) -> None:
        """Read for 1.5-5 s (free), or until the teacher's step plus a reaction of up to
        2 s, but at least 1.5 s after the last action (lesson)."""
        lo, hi = READING_S
        if self.beat_s is None:
            target = last_done + self.pace_rng.uniform(lo, hi)
        else:
            target = max(last_done + lo,
                         self.start + step * self.beat_s + self.pace_rng.uniform(0.0, 2.0))
        await asyncio.sleep(max(0.0, target - time.perf_counter()))


def make_kinds(n_actions: int, training: bool, rng: random.Random | None) -> list[str]:
    mix = TRAINING_MIX if training else ACTION_MIX
    kinds = [mix[i % len(mix)] for i in range(n_actions)]
    if rng is not None and not training:
        rng.shuffle(kinds)
    return kinds


def next_value(kind: str, exp: Expected, facts: PageFacts, rng: random.Random,
               tab: str) -> Any:
    """The value an action sets, drawn from ``rng`` (the same for every follower)."""
    if kind == "layer":
        choices = [lab for lab in facts.layers if lab.split(": ", 1)[1] != exp.layer]
        return rng.choice(choices)
    if kind == "toggle":
        return "eval" if exp.mode == "train" else "train"
    if kind == "photo":
        return rng.choice([p for p in facts.photos if p != exp.photo])
    if kind == "channel":
        return rng.choice([c for c in range(16) if c != exp.channel])
    if kind == "chart":
        return rng.choice([t for t in facts.tabs if t != tab])
    raise ValueError(kind)


def apply_expected(kind: str, value: Any, exp: Expected) -> None:
    if kind == "layer":
        exp.layer = value.split(": ", 1)[1]
    elif kind == "toggle":
        exp.mode = value
    elif kind == "photo":
        exp.photo = value
    elif kind == "channel":
        exp.channel = int(value)


async def learn_page(base_url: str, query: str, forwarded_for: str | None) -> tuple[
        PageFacts, float, list[str]]:
    """Open the app once (warms the server up): the page's layers, photos, charts and
    pages, the first page's latency and its errors."""
    s = Session(base_url, query, forwarded_for=forwarded_for)
    await s.open()
    try:
        run = await s.rerun()
        if "layer" not in s.widgets:
            raise RuntimeError(f"the first page has no layer picker (status {run.status}, "
                               f"errors {run.errors}, texts {run.texts[:3]})")
        facts = PageFacts(layers=s.widget("layer").options,
                          photos=s.widget("p_image_name").options,
                          tabs=s.widget("layer_tab").options,
                          main_hash=s.page_hash,
                          training_hash=s.pages.get("Training lab", ""))
        return facts, run.latency, run.errors
    finally:
        await s.close()


async def websocket_student(res: StudentResult, base_url: str, query: str, plan: Plan,
                            facts: PageFacts, registry: ChartRegistry, deadline: float,
                            forwarded_for: str | None) -> None:
    """A student without a browser: the whole script over the websocket protocol."""
    s = Session(base_url, query, forwarded_for=forwarded_for)
    training = res.role == "training"
    try:
        await s.open()
        res.replica = s.replica
        if training:
            run = await s.rerun(page_hash=facts.training_hash)
            res.times["first_page_training"].append(run.latency)
            res.errors += run.errors
        else:
            run = await s.rerun()
            res.times["first_page"].append(run.latency)
            res.errors += run.errors
            exp = Expected(layer=s.widget("layer").state.string_value.split(": ", 1)[1])
            res.violations += check_run(run, exp, registry, full=True)
            res.checked += 1
        last = time.perf_counter()
        for step, kind in enumerate(plan.kinds, start=1):
            await plan.wait_turn(step, last)
            if time.perf_counter() > deadline or s.closed:
                break
            if training:
                await _training_action(s, kind, res, plan.value_rng)
            else:
                tab = s.widget("layer_tab").state.string_array_value.data[0]
                value = next_value(kind, exp, facts, plan.value_rng, tab)
                key = {"layer": "layer", "toggle": "mode", "photo": "p_image_name",
                       "channel": "channel", "chart": "layer_tab"}[kind]
                run = await s.change(key, value)
                apply_expected(kind, value, exp)
                res.times[kind].append(run.latency)
                res.errors += run.errors
                res.violations += check_run(run, exp, registry, full=not run.fragment)
                res.checked += 1
            res.actions_done += 1
            last = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - one student's failure is a counted error
        res.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        await s.close()


_FINISHED_RE = re.compile(r"Finished (\d+) steps in ([0-9.]+) s")


async def _training_action(s: Session, kind: str, res: StudentResult,
                           rng: random.Random) -> None:
    if kind == "display":
        w = s.widget("tl_layer")
        value = rng.choice([o for o in w.options if o != w.state.string_value])
        run = await s.change("tl_layer", value)
        res.times["display"].append(run.latency)
        res.errors += run.errors
        return
    submit = s.find_widget(lambda w: w.kind == "button" and w.proto.is_form_submitter)
    if submit is None:
        res.errors.append("no Start training button")
        return
    key = widget_key(submit.id)
    t0 = time.perf_counter()
    run = await s.rerun(trigger=key)
    res.times["start_training"].append(run.latency)
    res.errors += run.errors
    deadline = t0 + TRAINING_TIMEOUT_S
    while True:
        found = next((m for _, body in run.alerts if (m := _FINISHED_RE.search(body))), None)
        bad = [b for f, b in run.alerts
               if f == "WARNING" and b.startswith(("Stopped", "Left the queue"))]
        if found:
            res.training_s.append(float(found.group(2)))
            res.training_wall_s.append(time.perf_counter() - t0)
            return
        if bad or run.errors or s.closed:
            res.errors.append(f"training did not finish: {(bad or run.errors or ['closed'])[0]}")
            return
        if time.perf_counter() > deadline:
            res.errors.append(f"training did not finish within {TRAINING_TIMEOUT_S:.0f} s")
            return
        if s.auto_reruns:  # the status fragment refreshes itself while the job runs
            fid, interval = next(iter(s.auto_reruns.items()))
            await asyncio.sleep(interval)
            run = await s.rerun(fragment_id=fid, auto=True)
        else:  # nothing refreshes: the last run should have said how it ended
            await asyncio.sleep(1.0)
            run = await s.rerun()
        res.errors += run.errors


# -- a student in a real browser -----------------------------------------------------------

STATUS = '[data-testid="stStatusWidget"]'

#: True when the page shows what ``exp`` says (header, layer sentence); read in the page.
_SHOWS_JS = """([model, mode, photo, layer]) => {
  const texts = Array.from(document.querySelectorAll(
      '[data-testid="stMarkdownContainer"], [data-testid="stCaptionContainer"]'))
      .map(e => e.innerText);
  const header = texts.find(t => t.includes('global mode'));
  const status = texts.find(t => t.includes(' ran as '));
  if (!header || !status) return false;
  return header.includes(model) && header.includes('global mode ' + mode)
      && (header.includes('image (' + photo + ')') || header.includes('photos ' + photo))
      && (!layer || (status.startsWith(layer + ' (') && status.includes('ran as ' + mode)));
}"""

#: The in-page clock has seen the rerun end: no status widget, at least one message after
#: the input event, and 600 ms without a chart change or a server message.
_SETTLED_JS = """() => { const b = window.__bench; if (b.t0 === null) return false;
  if (document.querySelector('""" + STATUS + """')) return false;
  const ws = window.__wsLast === null ? -1 : window.__wsLast - b.t0;
  const last = Math.max(b.last === null ? -1 : b.last, ws);
  return last >= 0 && performance.now() - b.t0 - last > 600; }"""


async def browser_student(res: StudentResult, browser, base_url: str, query: str, plan: Plan,
                          facts: PageFacts, deadline: float, forwarded_for: str | None,
                          clock_js: str, ws_js: str) -> None:
    """A student in Chromium: the same script, timed inside the page from the input event
    until the charts are redrawn and the rerun's last message has arrived (as
    ``bench_dashboard.py`` does), and checked against what the page shows."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    context = await browser.new_context(viewport={"width": 1400, "height": 1000},
                                        extra_http_headers=headers)
    page = await context.new_page()
    page.set_default_timeout(RUN_TIMEOUT_S * 1000)
    exp = Expected()
    tab = facts.tabs[0]
    try:
        await page.add_init_script(f"({ws_js})()")
        t0 = time.perf_counter()
        response = await page.goto(f"{base_url}/?{query}")
        res.replica = (response.headers.get("x-bnviz-replica", "") if response else "")
        await page.wait_for_function(
            "() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length >= 4")
        await _wait_idle(page)
        res.times["first_page"].append(time.perf_counter() - t0)
        exp.layer = await page.evaluate(
            "() => (Array.from(document.querySelectorAll('[data-testid=\"stMarkdownContainer\"]'))"
            ".map(e => e.innerText).find(t => t.includes(' ran as ')) || '').split(' (')[0]")
        await page.evaluate(clock_js)
        last = time.perf_counter()
        for step, kind in enumerate(plan.kinds, start=1):
            await plan.wait_turn(step, last)
            if time.perf_counter() > deadline:
                break
            value = next_value(kind, exp, facts, plan.value_rng, tab)
            want = Expected(**vars(exp))
            apply_expected(kind, value, want)
            shows = [want.model, want.mode, want.photo, want.layer]
            try:
                seconds = await _browser_action(page, kind, value,
                                                shows if kind in SHOWN_KINDS else None)
            except Exception as exc:  # noqa: BLE001 - a timeout is a counted error
                res.errors.append(f"browser {kind}: {type(exc).__name__}: {str(exc)[:200]}")
                break
            apply_expected(kind, value, exp)
            if kind == "chart":
                tab = value
            res.times[kind].append(seconds)
            ok = await page.evaluate(_SHOWS_JS, [exp.model, exp.mode, exp.photo, exp.layer])
            res.checked += 1
            if not ok:
                res.violations.append(f"browser page does not show {exp} after {kind}")
            errors = await page.locator('[data-testid="stException"], '
                                        '[data-testid="stAlertContentError"]').count()
            if errors:
                res.errors.append(f"{errors} error element(s) on the page after {kind}")
            res.actions_done += 1
            last = time.perf_counter()
    except Exception as exc:  # noqa: BLE001
        res.errors.append(f"browser: {type(exc).__name__}: {str(exc)[:200]}")
    finally:
        await context.close()


async def _wait_idle(page, settle_ms: int = 150) -> None:
    while True:
        await page.wait_for_timeout(settle_ms)
        if await page.locator(STATUS).count() == 0:
            await page.wait_for_timeout(settle_ms)
            if await page.locator(STATUS).count() == 0:
                return


#: Actions whose result the page states in words (header, layer sentence): the browser
#: student waits for those words before it waits for the page to settle, so a long forward
#: (no message for a while) is never taken for the end of the rerun.
SHOWN_KINDS = ("layer", "toggle", "photo")


async def _browser_action(page, kind: str, value: Any, shows: list | None) -> float:
    """Do one action the way a student does; seconds from the input event until the page
    settled (measured in the page)."""
    arm = "() => { window.__bench.armed = true; window.__bench.t0 = null; }"
    if kind in ("layer", "photo"):
        label = "Layer" if kind == "layer" else "photo"
        box = page.get_by_role("combobox", name=label, exact=True).first
        await box.click()
        await box.fill(value)
        target = page.locator('[role="option"]').filter(
            has=page.get_by_text(value, exact=True)).first
        await target.wait_for()
        await page.evaluate(arm)
        await target.click()
    elif kind == "toggle":
        group = page.locator('[data-testid="stRadio"]').filter(
            has=page.get_by_text("Global mode (all BN layers)", exact=True)).first
        await page.evaluate(arm)
        await group.get_by_text(value, exact=True).first.click()
    elif kind == "channel":
        box = page.get_by_label("Channel", exact=True).first
        await box.fill(str(value))
        await page.evaluate(arm)
        await box.press("Enter")
    elif kind == "chart":
        await page.evaluate(arm)
        await page.locator('[data-testid="stButtonGroup"]').get_by_role(
            "radio", name=value, exact=True).first.click()
    else:
        raise ValueError(kind)
    if shows is not None:
        await page.wait_for_function(_SHOWS_JS, arg=shows, polling=100)
    await page.wait_for_function(_SETTLED_JS, polling=100)
    return await page.evaluate(
        "() => Math.max(window.__bench.last === null ? 0 : window.__bench.last, "
        "window.__wsLast === null ? 0 : window.__wsLast - window.__bench.t0)") / 1000
