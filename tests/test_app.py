"""The dashboard (app.py) headless, with streamlit.testing.v1.AppTest.

Every control and view is driven here. Images are small (size=64) and batches tiny so the
whole file runs in a few minutes on two shared cores; the numbers shown are compared with an
independent ``bnviz.inspect`` of the same configuration.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import streamlit
import torch
from PIL import Image
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

import bnviz
from bnviz import dashboard as dash
from bnviz import figures as F

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 180
SMALL = {"size": "64", "batch": "2"}

pytestmark = pytest.mark.timeout(1200)


# -- helpers ----------------------------------------------------------------------------------


def new_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({**SMALL, **query})
    return at


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def arr(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            shape = value["shape"]
            a = a.reshape([int(s) for s in (shape.split(",") if isinstance(shape, str)
                                            else shape)])
        return a
    return np.asarray(value, dtype=float)


def charts(at: AppTest) -> dict[str, dict]:
    """Plotly figures on the page, by title (read from the element protos; without the
    line breaks a long title gets, as the browser's text content reads it)."""
    out = {}
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        out[spec["layout"]["title"]["text"].replace("<br>", "")] = spec
    return out


def chart(at: AppTest, part: str) -> dict:
    found = [s for t, s in charts(at).items() if part in t]
    assert found, f"no chart titled *{part}* in {list(charts(at))}"
    return found[0]


def every_tab(at: AppTest) -> tuple[dict[str, dict], str]:
    """Charts and texts of the whole page with each layer-view tab opened in turn (only the
    open tab's charts exist); leaves the first tab open."""
    found, shown = {}, []
    for i in range(len(dash.LAYER_TABS)):
        open_tab(at, i)
        found.update(charts(at))
        shown.append(texts(at))
    open_tab(at, 0)
    return found, "\n".join(shown)


def open_tab(at: AppTest, index: int) -> AppTest:
    """Pick the layer view's chart ``index`` with its button row (a segmented control)."""
    at.segmented_control(key="layer_tab").set_value(dash.LAYER_TABS[index])
    return run(at)


def texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    return "\n".join(parts)


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def reference(query: dict, modes="train") -> bnviz.InspectionReport:
    """An independent inspection of the configuration a query describes.

    It runs in a fresh thread with the app's torch thread count: PyTorch keeps the intra-op
    thread count per OS thread, and float32 reductions split over a different number of
    threads differ in the last bits. Same threads, same bits."""
    cfg, problems = dash.config_from_query({**SMALL, **query})
    assert not problems
    assert not cfg.random_init, "references are for the pretrained default model"
    dash.configure_torch_threads()
    model = bnviz.load_model(cfg.model)
    x = dash.make_batch(cfg)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault(
        "report", bnviz.inspect(model, x, modes, device="cpu", keep_tensors=True)))
    worker.start()
    worker.join()
    return out["report"]


@pytest.fixture
def captured_files(monkeypatch):
    """Everything the app hands to Streamlit's media manager (downloads), by file name."""
    files: dict[str, object] = {}
    add, add_deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def fake_add(self, data, mimetype, coordinates, file_name=None, **kw):
        if file_name:
            files[file_name] = data
        return add(self, data, mimetype, coordinates, file_name=file_name, **kw)

    def fake_add_deferred(self, fn, mimetype, coordinates, file_name=None, **kw):
        if file_name:
            files[file_name] = fn
        return add_deferred(self, fn, mimetype, coordinates, file_name=file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add", fake_add)
    monkeypatch.setattr(MediaFileManager, "add_deferred", fake_add_deferred)
    return files


# -- the default page ---------------------------------------------------------------------------


def test_default_page_shows_every_view():
    at = run(new_app())
    assert errors(at) == []
    headers = [h.value for h in at.header]
    for h in ("1. Network overview", "2. Layer view", "3. In-place ReLU", "4. Predictions",
              "5. Export"):
        assert any(x.startswith(h) for x in headers), h
    picker = at.segmented_control(key="layer_tab")  # one chart of the layer at a time
    assert [o.content for o in picker.proto.options] == list(dash.LAYER_TABS)
    assert picker.value == dash.LAYER_TABS[0]
    assert picker.proto.required  # clicking the picked chart again cannot empty the view
    assert set(charts(at)) == {  # only the picked chart is built
        "network input (after preprocessing), image 0",
        "Network overview: 49 BatchNorm layers of efficientnet_lite0",
        "_bn0: batch vs running statistics (BN used the running ones)",
        "Top-5 predictions for image 0"}
    every, shown = every_tab(at)
    titles = list(every)
    for part in ("Network overview: 49 BatchNorm layers of efficientnet_lite0",
                 "_bn0: batch vs running statistics", "_bn0, channel 0, image 0",
                 "distribution over the batch", "every channel's distribution",
                 "_bn0: no running-stat update", "manual formula vs native",  # eval
                 "Top-5 predictions", "network input (after preprocessing)"):
        assert any(part in t for t in titles), part
    assert not any("random init" in t for t in titles)
    for key, sentence in dash.EXPLAIN.items():
        if key != "inplace":  # no in-place chart for this model (tested with resnet18)
            assert sentence in shown, f"explanation {key!r} missing"
    # ReLU6 of efficientnet_lite0 is not in place, and the page says so plainly
    assert "not** in place" in shown and "in-place" not in [e for e in errors(at)]
    assert at.sidebar  # controls live in the sidebar
    sidebar = "\n".join(c.value for c in at.sidebar.caption)
    assert "In use: **cpu**" in sidebar or torch.cuda.is_available()
    assert "Weights: **pretrained ImageNet" in sidebar
    assert at.query_params["model"] == "efficientnet_lite0"
    assert at.query_params["layer"] == "_bn0"
    assert at.query_params["mode"] == "eval"  # the network as it is meant to run


@pytest.mark.parametrize("script", ["app.py", "pages/1_Pitfall_lab.py",
                                    "pages/2_Training_lab.py"])
def test_the_chart_code_is_preloaded_before_pytorch_is_imported(script):
    """Every page's first element makes the browser load Streamlit's plotly.js chunk while
    the script imports torch (measured: first chart of a cold start 8.5 -> 7.1 s), and its
    table-grid chunk once the charts are drawn (the first page has no table). It must
    name a chunk this Streamlit really ships (a renamed chunk would silently preload
    nothing), and the script must emit it before its first import of torch or bnviz."""
    path = Path(APP).parent / script
    at = run(new_app()) if script == "app.py" else AppTest.from_file(
        str(path), default_timeout=600).run()
    first = at.main[0]
    assert first.type == "html" and first.proto.unsafe_allow_javascript
    names = re.findall(r"import\(new URL\('\./([^']+)'", first.proto.body)
    # the plotly chunk now; the table grid's once the page's charts are drawn and read
    assert len(names) == 2 and names[0].startswith("PlotlyChart."), first.proto.body
    assert names[1].startswith("DataFrame.") and "__bnvizGridCode" in first.proto.body
    chunk = Path(streamlit.__file__).parent / "static" / "static" / "js" / names[0]
    assert chunk.is_file() and b"Plotly" in chunk.read_bytes()
    grid = chunk.parent / names[1]
    assert grid.is_file() and b"stDataFrame" in grid.read_bytes()
    body = ast.parse(path.read_text(encoding="utf-8")).body

    def position(test) -> int:
        return next(i for i, node in enumerate(body) if test(node))

    preload = position(lambda n: isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                       and getattr(n.value.func, "id", "") == "preload_chart_code")
    heavy = position(lambda n: (isinstance(n, ast.Import) and any(
        a.name.split(".")[0] in ("torch", "bnviz") for a in n.names)) or (
        isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in ("torch", "bnviz")))
    assert preload < heavy


def test_numbers_on_the_page_equal_an_independent_inspection():
    at = run(new_app(seed="11", mode="train"))
    report = reference({"seed": "11"}, "train")
    ref = report.layer("_bn0")
    stats = chart(at, "_bn0: batch vs running statistics")
    batch_mean = next(t for t in stats["data"] if t["name"] == "batch mean")
    np.testing.assert_array_equal(arr(batch_mean["y"]), ref.batch_mean.numpy())
    formula = texts(open_tab(at, 4))
    ex = ref.explain((0, 0, ref.input.shape[2] // 2, ref.input.shape[3] // 2))
    assert ex["equation"] in formula
    # ...and the page says which code computed the differences (the reference's, same process)
    assert dash.manual_check_note(report.manual_check) in formula


# -- selection never recomputes; configuration changes do ---------------------------------------


def test_layer_channel_element_tab_do_not_rerun_the_forward():
    at = run(new_app(seed="101", tab="1", mode="train"))
    calls = dash.inspect_calls()
    before = chart(at, "channel 0, image 0")
    at.selectbox(key="layer").set_value("_blocks.3._bn1")
    run(at)
    at.number_input(key="channel").set_value(7)
    run(at)
    after = chart(at, "_blocks.3._bn1, channel 7, image 0")
    assert arr(after["data"][0]["z"]).shape != arr(before["data"][0]["z"]).shape or not \
        np.array_equal(arr(after["data"][0]["z"]), arr(before["data"][0]["z"]))
    at.selectbox(key="element").set_value(dash.FORMULA_ELEMENTS[2])
    run(at)
    for i in range(len(dash.LAYER_TABS)):
        open_tab(at, i)
    assert "largest input in image 0" in texts(open_tab(at, 4))
    at.selectbox(key="pred_image").set_value(1)
    run(at)
    assert dash.inspect_calls() == calls  # no forward for any of these
    assert "Top-5 predictions for image 1" in "".join(charts(at))
    q = at.query_params
    assert (q["layer"], q["ch"], q["el"], q["tab"]) == ("_blocks.3._bn1", "7", "2",
                                                        "manual-vs-native")

    open_tab(at, 0)
    at.radio(key="mode").set_value("eval")
    run(at)
    now = dash.inspect_calls()
    assert now["view"] == calls["view"] + 1  # a mode change recomputes, once
    assert now["eval"] == calls["eval"]  # all-eval is the current view itself
    assert "BN used the running ones" in "".join(charts(at))

    at.selectbox(key="p_image_name").set_value("coffee")
    run(at)
    assert dash.inspect_calls()["view"] == calls["view"] + 2  # a stimulus change recomputes


def test_switching_back_reuses_the_cache():
    at = run(new_app(seed="102", mode="train"))
    at.radio(key="mode").set_value("eval")
    run(at)
    calls = dash.inspect_calls()
    at.radio(key="mode").set_value("train")
    run(at)
    assert dash.inspect_calls() == calls


def test_a_mode_toggle_takes_the_prefetched_other_mode():
    """With prefetching on (the app's default; conftest switches it off for the other
    in-process tests, which count forwards), the other global mode is computed after the
    page is drawn and the toggle shows it without a forward: the same charts as computing
    it on the toggle itself. It waits until the browser (local, in a test) has had time to
    draw the page: every run notes activity when it ends."""
    from bnviz.prefetch import Prefetcher

    pre = Prefetcher(quiet_s=2.0)
    dash.set_prefetcher(pre)  # the conftest puts the process's own back afterwards
    at = run(new_app(seed="131", mode="train"))
    assert pre.counts["scheduled"] == 1 and pre.counts["started"] == 0  # the page is drawn
    assert pre._busy_for() > 0
    assert pre.idle(TIMEOUT) and pre.counts["finished"] == 1
    calls = dash.inspect_calls()
    at.radio(key="mode").set_value("eval")
    run(at)
    assert dash.inspect_calls()["view"] == calls["view"] and pre.counts["taken"] == 1
    assert "BN used the running ones" in "".join(charts(at))
    assert pre.idle(TIMEOUT) and pre.counts["skipped"] == 1  # train: computed already
    shown = charts(at)

    dash.set_prefetcher(Prefetcher(enabled=False))
    streamlit.cache_resource.clear()  # the same configuration, computed on the spot
    fresh = run(new_app(seed="131", mode="eval"))
    assert dash.inspect_calls()["view"] == calls["view"] + 1
    assert charts(fresh) == shown


# -- controls -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,param,value,expect", [
    ("uniform", "value", 0.5, "uniform (value 0.5)"),
    ("noise", "std", 0.1, "noise (gaussian, mean 0.5, std 0.1"),
    ("grating", "orientation", 45.0, "grating (orientation 45°"),
    ("checkerboard", "squares", 4, "checkerboard (4×4 squares"),
    ("image", "name", "astronaut", "image (astronaut)"),
])
def test_every_stimulus_kind(kind, param, value, expect):
    at = run(new_app(comp="copies"))
    at.selectbox(key="stimulus").set_value(kind)
    run(at)
    key = f"p_{kind}_{param}"
    widget = at.selectbox(key=key) if kind == "image" else at.number_input(key=key)
    widget.set_value(value)
    run(at)
    assert errors(at) == []
    assert expect in texts(at)
    assert at.query_params["stim"].startswith(kind)
    assert at.sidebar.get("image")  # the raw preview
    assert "network input (after preprocessing), image 0" in "".join(charts(at))


def test_bad_stimulus_parameter_shows_the_core_message():
    at = run(new_app(stim="grating"))
    at.number_input(key="p_grating_frequency").set_value(40.0)  # > size/2 = 32
    run(at)
    assert any("half the image size" in e for e in errors(at))
    at.number_input(key="p_grating_frequency").set_value(4.0)
    run(at)
    assert errors(at) == [] and charts(at)


def test_size_batch_composition_seed():
    at = run(new_app())
    at.number_input(key="size").set_value(48)
    at.number_input(key="batch_size").set_value(3)
    at.selectbox(key="composition").set_value("jitter")
    at.number_input(key="seed").set_value(5)
    run(at)
    assert "shape 3x3x48x48" in texts(at)
    q = at.query_params
    assert (q["size"], q["batch"], q["comp"], q["seed"]) == ("48", "3", "jitter", "5")
    assert len(at.selectbox(key="pred_image").options) == 3


def test_device_choice():
    at = run(new_app())
    at.radio(key="device").set_value("cpu")
    run(at)
    assert "In use: **cpu**" in "\n".join(c.value for c in at.sidebar.caption)
    if not torch.cuda.is_available():
        at.radio(key="device").set_value("cuda")
        run(at)
        assert any("CUDA was requested" in e for e in errors(at))
        assert not charts(at).get("Network overview")
        at.radio(key="device").set_value("auto")
        run(at)
        assert errors(at) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_page():
    at = run(new_app(device="cuda"))
    assert errors(at) == []
    assert "on **cuda" in texts(at)


def override_count(at: AppTest) -> str:
    """The sidebar's count of the per-layer overrides (the table is in the main area)."""
    found = [c.value for c in at.sidebar.caption if c.value.startswith("Per-layer overrides")]
    assert len(found) == 1, found
    return found[0]


def editors(at: AppTest) -> list:
    return at.get("data_editor")


def test_per_layer_overrides_through_the_data_editor():
    at = run(new_app(seed="103", mode="train"))
    key = "overrides_efficientnet_lite0_0"
    # the table is drawn only while its expander is open (it costs a fresh server pandas)
    assert editors(at) == [] and override_count(at) == "Per-layer overrides: **0 active**."
    assert at.button(key="reset_overrides").disabled
    at.session_state["ov_open"] = True
    run(at)
    assert len(editors(at)) == 1
    at.session_state[key] = {
        "edited_rows": {0: {"mode": "eval"},
                        1: {"track_running_stats": "none"},
                        2: {"momentum": "none"}},
        "added_rows": [], "deleted_rows": []}
    run(at)
    assert errors(at) == []
    overview = chart(at, "Network overview")
    used = [c[1] for c in overview["data"][0]["customdata"]]
    assert used[0] == "running" and set(used[1:]) == {"batch"}
    modes = [c[2] for c in overview["data"][0]["customdata"]]
    assert modes[1] == "train,track=none,momentum=0.01"
    assert modes[2] == "train,track=on,momentum=none"
    assert at.query_params["ov"] == (
        "_blocks.0._bn1:default,track=none;_blocks.0._bn2:default,momentum=none;_bn0:eval")
    assert "from a per-layer override" in texts(at) and "with 3 per-layer overrides." in texts(at)
    assert override_count(at) == ("Per-layer overrides: **3 active** "
                                  "(_blocks.0._bn1, _blocks.0._bn2, _bn0).")
    # the numbers of the overridden layer are eval numbers
    ref = reference({"seed": "103"}, {"_bn0": "eval"}).layer("_bn0")
    stats = chart(at, "_bn0: batch vs running statistics")
    assert "BN used the running ones" in stats["layout"]["title"]["text"]
    np.testing.assert_array_equal(
        arr(next(t for t in stats["data"] if t["name"] == "running mean")["y"]),
        ref.running_mean_before.numpy())

    # closing the table keeps its edits (the editor's own state goes with it)
    at.session_state["ov_open"] = False
    run(at)
    assert editors(at) == [] and override_count(at).startswith(
        "Per-layer overrides: **3 active**")
    assert at.query_params["ov"] == (
        "_blocks.0._bn1:default,track=none;_blocks.0._bn2:default,momentum=none;_bn0:eval")
    assert [c[1] for c in chart(at, "Network overview")["data"][0]["customdata"]][:2] == [
        "running", "batch"]
    # ... and opening it again shows them as the table's starting values
    at.session_state["ov_open"] = True
    run(at)
    (table,) = editors(at)
    assert table.value["mode"].tolist()[:3] == ["eval", "default", "default"]
    assert table.value["track_running_stats"].tolist()[:3] == ["keep", "none", "keep"]
    # a blank momentum is a missing value, which the table shows as "keep"
    assert [m if isinstance(m, str) else None for m in table.value["momentum"].tolist()[:3]] \
        == [None, None, "none"]

    at.button(key="reset_overrides").click()
    run(at)
    assert "ov" not in at.query_params
    assert override_count(at) == "Per-layer overrides: **0 active**."
    used = [c[1] for c in chart(at, "Network overview")["data"][0]["customdata"]]
    assert set(used) == {"batch"}


def test_bad_momentum_names_the_layer_and_the_app_recovers():
    at = new_app()
    at.session_state["ov_open"] = True
    run(at)
    key = "overrides_efficientnet_lite0_0"
    at.session_state[key] = {"edited_rows": {4: {"momentum": "fast"}}, "added_rows": [],
                             "deleted_rows": []}
    run(at)
    msgs = errors(at)
    assert any("'_blocks.1._bn1'" in e and "momentum" in e for e in msgs)
    at.session_state[key] = {"edited_rows": {4: {"momentum": "0.5"}}, "added_rows": [],
                             "deleted_rows": []}
    run(at)
    assert errors(at) == []
    assert chart(at, "Network overview")["data"][0]["customdata"][4][2].endswith("momentum=0.5")


def test_tables_are_drawn_when_opened_and_equal_the_report():
    """The per-layer table (and the override editor) cost a rerun an Arrow table and a fresh
    browser its grid code: they are built only once their expander is opened."""
    at = run(new_app(seed="105", mode="train"))
    assert at.get("dataframe") == [] and at.get("data_editor") == []
    assert "Per-layer table" in [e.label for e in at.expander]
    at.session_state["table_open"] = True
    run(at)
    (table,) = at.get("dataframe")
    frame = reference({"seed": "105"}, "train").to_frame()
    assert table.value["name"].tolist() == frame["name"].tolist()
    np.testing.assert_array_equal(table.value["mean_shift"].to_numpy(),
                                  frame["mean_shift"].to_numpy())
    assert table.value["stats_used"].tolist() == frame["stats_used"].tolist()
    at.session_state["table_open"] = False
    run(at)
    assert at.get("dataframe") == []


def test_link_reproduces_the_view():
    query = {"model": "resnet18", "weights": "random", "device": "cpu",
             "stim": "grating:contrast=0.5,frequency=4,orientation=30,phase=0", "size": "48",
             "batch": "3", "comp": "jitter", "seed": "3", "mode": "eval",
             "ov": "bn1:train,track=off;layer1.0.bn1:default,momentum=none",
             "layer": "layer1.0.bn1", "ch": "5", "el": "2", "tab": "feature-maps"}
    at = run(new_app(**query))
    assert errors(at) == []
    assert at.selectbox(key="model").value == "resnet18"
    assert at.checkbox(key="random_init").value is True
    assert at.selectbox(key="stimulus").value == "grating"
    assert at.number_input(key="p_grating_orientation").value == 30.0
    assert at.radio(key="mode").value == "eval"
    assert at.selectbox(key="layer").value == "layer1.0.bn1"
    assert at.number_input(key="channel").value == 5
    assert at.selectbox(key="element").value == dash.FORMULA_ELEMENTS[2]
    assert at.session_state["layer_tab"] == dash.LAYER_TABS[1]
    assert dict(at.query_params) == query
    titles = "".join(charts(at))
    assert "layer1.0.bn1, channel 5" in titles and F.RANDOM_INIT_LABEL in titles
    # a second student opening the same link sees the same numbers
    other = run(new_app(**query))
    a = chart(at, "layer1.0.bn1, channel 5, image 0")
    b = chart(other, "layer1.0.bn1, channel 5, image 0")
    for ta, tb in zip(a["data"], b["data"]):
        np.testing.assert_array_equal(arr(ta["z"]), arr(tb["z"]))


def test_an_old_link_with_a_chart_index_opens_the_same_chart():
    """Links made before charts had slugs say ``tab=1``: the same chart opens, and the
    address bar then names it by its slug."""
    by_slug = run(new_app(seed="106", tab="feature-maps"))
    by_index = run(new_app(seed="106", tab="1"))
    assert by_index.session_state["layer_tab"] == by_slug.session_state["layer_tab"] == \
        dash.LAYER_TABS[1]
    assert charts(by_index) == charts(by_slug)
    assert by_index.query_params["tab"] == "feature-maps"
    assert [w.value for w in by_index.warning] == []
    unknown = run(new_app(seed="106", tab="histograms"))
    assert any("tab=`'histograms'`" in w.value for w in unknown.warning)
    assert unknown.session_state["layer_tab"] == dash.LAYER_TABS[0] and charts(unknown)


def test_bad_link_parameters_are_reported_not_fatal():
    at = run(new_app(model="resnet19", mode="sideways", layer="_bn99"))
    warnings = [w.value for w in at.warning]
    assert any("model=`'resnet19'`" in w for w in warnings)
    assert any("mode=`'sideways'`" in w for w in warnings)
    assert any("'_bn99'" in w for w in warnings)
    assert charts(at) and errors(at) == []


INJECTION = ("**Session expired** [log in](http://evil.example) "
             "![](http://127.0.0.1:9/pixel.png)")


def _outside_code_spans(markdown: str) -> str:
    return re.sub(r"(`+).*?\1", "", markdown)


@pytest.mark.parametrize("key", ["layer", "model", "ov", "stim"])
def test_link_text_is_shown_as_text(key):
    """A value from a link is shown literally (in a code span, never as a link or an image)
    and cut short; the page keeps working."""
    at = run(new_app(**{key: INJECTION}))
    shown = [w.value for w in at.warning if "Session expired" in w.value]
    assert shown, [w.value for w in at.warning]
    for text in shown:
        # Outside code spans every Markdown character of the value is escaped: no link, no
        # image, no emphasis can form.
        rest = _outside_code_spans(text)
        assert re.search(r"(?<!\\)[\[\]!*]", rest) is None, rest
    assert charts(at) and errors(at) == []


def test_a_huge_link_value_is_cut():
    at = run(new_app(layer="x" * 100_000, model="y" * 100_000))
    assert at.warning and all(len(w.value) < 1_000 for w in at.warning)
    assert charts(at)


def test_a_link_cannot_name_a_server_file(tmp_path):
    """?stim=<path> reads no file and says the same for a path that exists and one that
    does not (the old wording told them apart)."""
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(photo)
    said = []
    for stim in (str(photo), str(tmp_path / "missing"), "/etc/passwd", "/etc/nonexistent"):
        at = run(new_app(stim=stim))
        warnings = [w.value.replace(stim, "<stim>") for w in at.warning]
        assert warnings and charts(at) and errors(at) == []
        assert at.query_params["stim"] != stim  # the view fell back to a generated stimulus
        said.append(warnings)
    assert said[0] == said[1] and said[2] == said[3]
    assert all("does not exist" not in w and "image format" not in w
               for w in sum(said, []))


def test_exports(captured_files):
    at = run(new_app(seed="104", mode="train"))
    stem = "bnviz_efficientnet_lite0_train_image-name-chelsea"
    assert {b.proto.label for b in at.get("download_button")} == {
        "Per-layer table (CSV)", "Full report (JSON, the CLI's schema)"}
    ref = reference({"seed": "104"}, "train")
    csv = captured_files[f"{stem}.csv"]
    csv = csv() if callable(csv) else csv  # made on the click
    csv = csv.decode() if isinstance(csv, bytes) else csv
    frame = ref.to_frame()
    frame["mode_source"] = "global mode"  # the page's words (the report says "override")
    assert csv == frame.to_csv(index=False)
    produced = captured_files[f"{stem}.json"]()
    assert json.loads(produced) == json.loads(ref.to_json())
    assert len(json.loads(produced)["layers"]) == 49


def _png(color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), color).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_good_and_bad():
    at = run(new_app())
    at.selectbox(key="stimulus").set_value("upload")
    run(at)
    assert any("No image uploaded yet" in e for e in errors(at))
    at.file_uploader(key="upload").set_value(("broken.png", b"\x89PNG not really", "image/png"))
    run(at)
    assert any("broken.png" in e for e in errors(at))
    assert at.selectbox(key="model")  # the app is still there
    at.file_uploader(key="upload").set_value(("green.png", _png(), "image/png"))
    run(at)
    assert errors(at) == []
    assert "uploaded image (green.png)" in texts(at)
    assert at.query_params["stim"] == "upload"
    at.file_uploader(key="upload").set_value(("huge.png", b"0" * (21 * 2**20), "image/png"))
    run(at)
    assert any("huge.png" in e and "MB" in e for e in errors(at))
    at.selectbox(key="stimulus").set_value("image")
    run(at)
    assert errors(at) == [] and charts(at)


def test_missing_weights_offer_random_init(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(bnviz.models, "_urlopen", offline)
    at = run(new_app())
    at.selectbox(key="model").set_value("mobilenet_v2")
    run(at)
    msg = errors(at)
    assert any("pretrained mobilenet_v2 weights" in e and "Fix:" in e and str(tmp_path) in e
               for e in msg)
    assert any(b.label == "Retry download" for b in at.button)
    assert not charts(at)
    at.checkbox(key="random_init").check()
    run(at)
    assert errors(at) == []
    titles = list(charts(at))
    assert titles and all(F.RANDOM_INIT_LABEL in t for t in titles)
    assert any("random init (not pretrained)" in w.value for w in at.warning)
    assert at.query_params["weights"] == "random"


def test_weights_download_shows_progress_and_builds_the_model_once(monkeypatch, tmp_path):
    """Weights not cached yet: the sidebar downloads them (with a progress bar) without
    building a network, then the shared loader builds it once, from the cache."""
    import torchvision

    import bnviz.models as models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = tmp_path / "served.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), source)
    opened: list[str] = []
    built: list[str] = []
    build = models._build_torchvision

    def serve(request, timeout):
        opened.append(request.full_url)
        return urllib.request.urlopen(source.as_uri())

    monkeypatch.setattr(models, "_urlopen", serve)
    monkeypatch.setattr(models, "_hash_prefix", lambda filename: None)
    monkeypatch.setattr(models, "_build_torchvision",
                        lambda name, kwargs: built.append(name) or build(name, kwargs))
    at = run(new_app())
    at.selectbox(key="model").set_value("mobilenet_v2")
    run(at)
    assert errors(at) == [] and charts(at)
    assert len(opened) == 1 and built == ["mobilenet_v2"]
    assert any("status: cached" in c.value for c in at.sidebar.caption)
    assert (tmp_path / "hub" / "checkpoints").is_dir()


def test_inplace_relu_view_for_resnet18():
    at = run(new_app(model="resnet18", weights="random"))
    fig = chart(at, "of the BN output overwritten by relu")
    clone, ref, _ = (arr(t["z"]) for t in fig["data"])
    np.testing.assert_array_equal(ref, np.maximum(clone, 0))
    assert "rewrote" in texts(at) and "clone()" in texts(at)
    assert dash.EXPLAIN["inplace"] in texts(at)
    # the list of every overwritten layer is a table, built when its expander opens
    label = next(e.label for e in at.expander if "overwritten in place" in e.label)
    assert at.get("dataframe") == []
    at.session_state["inplace_table_open"] = True
    run(at)
    (table,) = at.get("dataframe")
    assert f"All {len(table.value)} layers" in label
    assert "bn1" in table.value["layer"].tolist()
    at.selectbox(key="layer").set_value("layer1.0.bn2")
    run(at)
    assert "overwritten by add_" in "".join(charts(at))


def test_model_without_batchnorm():
    at = run(new_app(model="alexnet", weights="random"))
    assert any("no BatchNorm layers" in w.value for w in at.warning)
    assert errors(at) == [] and not charts(at)


@pytest.mark.parametrize("name", [m for m in bnviz.list_models() if m != "alexnet"])
def test_every_registry_model_renders(name):
    """Every view for every registry model (offline: torchvision ones with random init)."""
    weights = "pretrained" if name == "efficientnet_lite0" else "random"
    at = run(new_app(model=name, weights=weights, seed="7"))
    assert errors(at) == []
    titles = "".join(every_tab(at)[0])
    n_bn = len(bnviz.load_model(name, weights=None).bn_layer_names)
    for part in (f"{n_bn} BatchNorm layers of {name}", "batch vs running statistics",
                 "running-stat update", "manual formula vs native", "image 0 (",
                 "distribution over the batch", "Top-5 predictions"):
        assert part in titles, (name, part)
    assert ("random init" in titles) == (weights == "random")
    assert "In-place ReLU" in "".join(h.value for h in at.header)


# -- many students, one server ------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetching"])
def test_two_sessions_interleaved_never_mix_numbers(prefetch):
    """Two students with different modes, runs interleaved: each sees only their numbers,
    and the shared cached model is never changed -- also while the server prefetches each
    one's other mode in the background, next to the other student's forwards."""
    from bnviz.prefetch import Prefetcher

    pre = Prefetcher(enabled=prefetch)
    dash.set_prefetcher(pre)  # the conftest puts the process's own back afterwards
    streamlit.cache_resource.clear()  # both variants compute (or prefetch) every view
    fresh = bnviz.load_model("efficientnet_lite0").module.state_dict()
    a = new_app(seed="105", mode="train")
    b = new_app(seed="105", mode="eval", ov="_bn0:train,momentum=none")
    ref_a = reference({"seed": "105"}, "train")
    names = ref_a.layer_names
    ref_b = reference({"seed": "105"}, {**dict.fromkeys(names, "eval"),
                                        "_bn0": "train,momentum=none"})
    for step in range(3):
        for at, ref, other in ((a, ref_a, ref_b), (b, ref_b, ref_a)):
            if step == 1:
                at.selectbox(key="layer").set_value("_blocks.2._bn1")
            if step == 2:
                at.number_input(key="channel").set_value(3)
            run(at)
            layer = at.selectbox(key="layer").value
            stats = chart(at, f"{layer}: batch vs running")
            used = ref.layer(layer).stats_used
            assert f"BN used the {used} ones" in stats["layout"]["title"]["text"]
            shown = arr(next(t for t in stats["data"] if t["name"] == "batch mean")["y"])
            np.testing.assert_array_equal(shown, ref.layer(layer).batch_mean.numpy())
            overview = chart(at, "Network overview")
            modes = [c[2] for c in overview["data"][0]["customdata"]]
            assert modes == [ly.mode for ly in ref.layers]
            assert modes != [ly.mode for ly in other.layers]
    if prefetch:  # b ran last: its other mode (train, with b's override) was prefetched
        assert pre.idle(TIMEOUT)
        taken, views = pre.counts["taken"], dash.inspect_calls()["view"]
        b.radio(key="mode").set_value("train")
        run(b)
        assert pre.counts["taken"] == taken + 1 and dash.inspect_calls()["view"] == views
        ref_bt = reference({"seed": "105"}, {**dict.fromkeys(names, "train"),
                                             "_bn0": "train,momentum=none"})
        stats = chart(b, "_blocks.2._bn1: batch vs running")
        np.testing.assert_array_equal(
            arr(next(t for t in stats["data"] if t["name"] == "batch mean")["y"]),
            ref_bt.layer("_blocks.2._bn1").batch_mean.numpy())
        overview = chart(b, "Network overview")
        assert [c[2] for c in overview["data"][0]["customdata"]] == \
            [ly.mode for ly in ref_bt.layers]
    a_upd = chart(open_tab(a, 3), "_blocks.2._bn1: running-stat update")
    assert "momentum 0.01" in a_upd["layout"]["title"]["text"]
    # Train-mode forwards of both sessions must not have touched the shared model's running
    # statistics: a third session in eval still sees exactly a fresh model's numbers.
    c = run(new_app(seed="105", mode="eval", layer="_blocks.2._bn1"))
    ref_c = reference({"seed": "105"}, "eval").layer("_blocks.2._bn1")
    stats = chart(c, "_blocks.2._bn1: batch vs running")
    np.testing.assert_array_equal(
        arr(next(t for t in stats["data"] if t["name"] == "running mean")["y"]),
        ref_c.running_mean_before.numpy())
    fresh_mean = fresh[[k for k in fresh if k.endswith("_blocks.2._bn1.running_mean")][0]]
    np.testing.assert_array_equal(ref_c.running_mean_before.numpy(), fresh_mean.numpy())
    assert chart(open_tab(c, 2), "_blocks.2._bn1, channel 0: distribution")
