"""User text is text, errors are messages, a link's bad values are reported (issue 22,
section 4 and the "Links" bullet of section 5).

* An unexpected exception on any page is one short sentence with a reference; the
  traceback goes to the server log (logger ``bnviz``) and nothing of the exception's text
  (which can name server paths) reaches the page. Streamlit's own fallback shows no details
  either (``client.showErrorDetails``).
* An uploaded file's name is shown as typed, in a code span, cut short.
* A link's bad values are named once: the warnings go away with the student's next change.
* Link values that used to vanish without a word are named: an override for a layer the
  model lacks, a stimulus number the sidebar cannot show, nan/inf, zero or negative sizes.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
import streamlit
import tomllib
from PIL import Image
from streamlit.config import ShowErrorDetailsConfigOptions
from streamlit.testing.v1 import AppTest

from bnviz import dashboard as dash

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PITFALL_PAGE = str(ROOT / "pages" / "1_Pitfall_lab.py")
TRAINING_PAGE = str(ROOT / "pages" / "2_Training_lab.py")
SMALL = {"size": "64", "batch": "2"}
SECRET = "/tmp/secret/path/weights.pt"
SHORT = re.compile(r"Something went wrong while (.+); the server log has the details "
                   r"\(reference ([0-9a-f]{6})\)")
INJECTION = "[log in](http://evil.example) ![](http://127.0.0.1:9/pixel.png) **bold**"

pytestmark = pytest.mark.timeout(900)


def new_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({**SMALL, **query})
    return at


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def page_text(at: AppTest) -> str:
    """Every text element of the page, exceptions included."""
    parts = []
    for kind in ("markdown", "caption", "warning", "error", "info", "success", "title",
                 "header", "subheader"):
        parts += [str(e.value) for e in at.get(kind)]
    parts += [e.message + "\n".join(e.stack_trace) for e in at.exception]
    return "\n".join(parts)


def outside_code_spans(markdown: str) -> str:
    return re.sub(r"(`+).*?\1", "", markdown)


def assert_no_markdown_formed(markdown: str) -> None:
    """Outside code spans no link, image or emphasis can form: every [ ] ! * is escaped."""
    rest = outside_code_spans(markdown)
    assert re.search(r"(?<!\\)[\[\]!*]", rest) is None, rest


def assert_name_not_rendered(markdown: str) -> None:
    """The parts of :data:`INJECTION` form no link, image or emphasis (the page's own
    formatting around them may)."""
    rest = outside_code_spans(markdown)
    assert re.search(r"(?<!\\)\[log in|(?<!\\)!\[|(?<!\\)\*\*bold", rest) is None, rest


def assert_short_message(at: AppTest, caplog, what: str) -> None:
    assert not at.exception, [e.message for e in at.exception]
    shown = [e.value for e in at.error if SHORT.search(e.value)]
    assert len(shown) == 1, [e.value for e in at.error]
    found = SHORT.search(shown[0])
    assert found.group(1) == what
    assert "/tmp/secret" not in page_text(at) and "Traceback" not in page_text(at)
    # The server log has the traceback, under the reference the student sees.
    logged = [r for r in caplog.records if r.name == "bnviz" and found.group(2) in r.message]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert SECRET in logged[0].exc_info[1].args[0]


# -- 1. errors are messages ------------------------------------------------------------------


def test_the_server_config_shows_no_error_details():
    """Streamlit's default ("full") sends the exception's text and traceback to the browser."""
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    value = config["client"]["showErrorDetails"]
    assert value == ShowErrorDetailsConfigOptions.NONE.value
    assert value in {o.value for o in ShowErrorDetailsConfigOptions}


def test_an_unexpected_error_on_the_main_page_is_one_short_message(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise MemoryError(f"Unable to allocate 7.3 TiB reading {SECRET}")

    monkeypatch.setattr(dash, "config_from_query", broken)
    caplog.set_level(logging.ERROR, logger="bnviz")
    at = new_app().run()
    assert_short_message(at, caplog, "drawing this page")


def test_an_unexpected_error_inside_a_fragment_is_one_short_message(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError(f"bad state in {SECRET}")

    monkeypatch.setattr(dash, "layer_status_text", broken)
    caplog.set_level(logging.ERROR, logger="bnviz")
    at = new_app().run()
    assert_short_message(at, caplog, "drawing this page")


def test_st_stop_and_st_rerun_are_not_errors(monkeypatch, caplog):
    """Control flow passes through: a page that stops early shows no error message."""
    def stop(*args, **kwargs):
        streamlit.stop()

    monkeypatch.setattr(dash, "layer_status_text", stop)
    caplog.set_level(logging.ERROR, logger="bnviz")
    at = run(new_app())
    assert not [e for e in at.error if SHORT.search(e.value)]
    assert not [r for r in caplog.records if r.name == "bnviz"]


class _Upload:
    """What st.file_uploader returns: a name and the bytes."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self._data = data

    def getvalue(self) -> bytes:
        return self._data


def _fake_explain_upload(monkeypatch, upload: _Upload) -> None:
    real = streamlit.file_uploader

    def fake(label, *args, key=None, **kwargs):
        real(label, *args, key=key, **kwargs)  # still draw the widget
        return upload if key == "explain:upload" else None

    monkeypatch.setattr(streamlit, "file_uploader", fake)


def _pitfall_app() -> AppTest:
    at = AppTest.from_file(PITFALL_PAGE, default_timeout=600)
    at.query_params["experiment"] = "explain"
    at.session_state["explain:size"] = 64
    return at


def test_an_unexpected_error_in_the_pitfall_lab_is_one_short_message(monkeypatch, caplog):
    """The issue's case: an explain upload whose reading fails with a MemoryError."""
    import bnviz.pitfalls.user_output as user_output

    def broken(*args, **kwargs):
        raise MemoryError(f"Unable to allocate 7.3 TiB for an array read from {SECRET}")

    monkeypatch.setattr(user_output, "load_user_output", broken)
    _fake_explain_upload(monkeypatch, _Upload("mine.npy", b"\x93NUMPY"))
    caplog.set_level(logging.ERROR, logger="bnviz")
    at = _pitfall_app().run()
    assert_short_message(at, caplog, "running the Pitfall lab")


def test_an_unexpected_error_in_the_training_lab_is_one_short_message(monkeypatch, caplog):
    import bnviz.training

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"cannot read {SECRET}")

    monkeypatch.setattr(bnviz.training, "TrainConfig", Broken)
    caplog.set_level(logging.ERROR, logger="bnviz")
    at = AppTest.from_file(TRAINING_PAGE, default_timeout=300).run()
    assert_short_message(at, caplog, "running the Training lab")


def test_an_exception_is_logged_once_however_often_it_is_shown(caplog):
    """The Training lab shows a failed job's error on every rerun: one log entry, one
    reference."""
    from ui.errors import log_unexpected, short_message

    caplog.set_level(logging.ERROR, logger="bnviz")
    try:
        raise ValueError(SECRET)
    except ValueError as exc:
        error = exc
    first, again = log_unexpected(error, "training"), log_unexpected(error, "training")
    assert first == again and re.fullmatch(r"[0-9a-f]{6}", first)
    assert len([r for r in caplog.records if r.name == "bnviz"]) == 1
    assert SECRET not in short_message("training", first)


# -- 2. upload names are shown as typed ------------------------------------------------------


def test_an_explain_upload_name_is_shown_as_typed(monkeypatch):
    _fake_explain_upload(monkeypatch, _Upload(f"{INJECTION}.csv", b"not, numbers\nat, all\n"))
    at = _pitfall_app().run()
    assert not at.exception
    (shown,) = [e.value for e in at.error]
    assert "[log in](http://evil.example)" in shown  # in a code span, exactly as typed
    assert_no_markdown_formed(shown)


def test_a_huge_explain_upload_name_is_cut(monkeypatch):
    _fake_explain_upload(monkeypatch, _Upload("x" * 100_000 + ".csv", b"a,b\nc,d\n"))
    at = _pitfall_app().run()
    assert not at.exception
    (shown,) = [e.value for e in at.error]
    assert len(shown) < 2_000


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_uploaded_image_name_is_shown_as_typed():
    at = run(new_app(stim="upload"))
    at.file_uploader(key="upload").set_value((f"{INJECTION}.png", _png(), "image/png"))
    run(at)
    said = [c.value for c in at.caption if "uploaded image" in c.value]
    assert len(said) == 2 and at.get("plotly_chart")  # the sidebar's and the header's
    for text in said:
        assert "bold" in text
        assert_name_not_rendered(text)
    at.file_uploader(key="upload").set_value((f"{INJECTION}.png", b"\x89PNG broken",
                                              "image/png"))
    run(at)
    assert at.error
    for text in (e.value for e in at.error):
        assert "bold" in text
        assert_name_not_rendered(text)


def test_message_quotes_user_text_as_code_and_escapes_the_rest():
    from bnviz.dashboard.literal import MAX_MESSAGE

    name = f"{INJECTION}.npy"
    text = dash.message(f"{name!r} is not a readable .npy array (bad header).", [name])
    assert text.startswith(dash.code_span(repr(name)))
    assert_no_markdown_formed(text)
    # Even where the quote is not recognised, nothing is rendered.
    assert_no_markdown_formed(dash.message(f"File {name} is bad.", []))
    huge = "y" * 100_000
    assert len(dash.message(f"{huge!r} is empty.", [huge])) < 200
    assert len(dash.message(huge)) <= MAX_MESSAGE + 1  # + the ellipsis
    assert dash.code_span("a`b") == "``a`b``" and dash.code_span("line\nbreak") == "`line break`"


# -- 3. a link's warnings go away with the next change ---------------------------------------


def test_link_warnings_are_named_once_and_go_away_with_the_next_change():
    at = run(new_app(model="resnet19", layer="nosuch"))
    warnings = [w.value for w in at.warning]
    assert any("model=`'resnet19'`" in w for w in warnings)
    assert any("'nosuch'" in w for w in warnings)
    names = list(at.selectbox(key="layer").options)
    at.selectbox(key="layer").set_value(at.selectbox(key="layer").options[1])
    run(at)
    assert not at.warning, [w.value for w in at.warning]
    at.number_input(key="channel").set_value(2)
    run(at)
    at.selectbox(key="composition").set_value("copies")
    run(at)
    assert not at.warning and len(names) > 1


def test_link_warnings_go_away_after_a_sidebar_change():
    at = run(new_app(mode="sideways"))
    assert any("mode=`'sideways'`" in w.value for w in at.warning)
    at.number_input(key="seed").set_value(7)
    run(at)
    assert not at.warning


# -- 4. link values that used to vanish without a word ----------------------------------------


def test_an_override_for_a_layer_the_model_lacks_is_reported():
    at = run(new_app(ov="nosuch:train;_bn0:eval"))
    (warning,) = [w.value for w in at.warning]
    assert "ov=`'nosuch:train'`" in warning and "efficientnet" in warning
    assert at.query_params["ov"] == "_bn0:eval"  # the override it has is used
    at.number_input(key="seed").set_value(3)
    run(at)
    assert not at.warning


def test_a_stimulus_number_the_sidebar_cannot_show_is_reported():
    at = run(new_app(stim="grating:orientation=1e308,frequency=4"))
    (warning,) = [w.value for w in at.warning]
    assert "orientation=`'1e308'`" in warning and "from 0 to 180" in warning
    # the rest of the link's stimulus is kept
    assert at.query_params["stim"] == "grating:contrast=1,frequency=4,orientation=0,phase=0"


def test_a_channel_the_layer_lacks_is_reported():
    at = run(new_app(layer="_bn0", ch="500"))
    (warning,) = [w.value for w in at.warning]
    assert "channel 500" in warning and "_bn0" in warning
    assert at.query_params["ch"] == str(at.number_input(key="channel").value)


@pytest.mark.parametrize("key, value, named", [
    ("stim", "grating:orientation=1e308", "from 0 to 180"),
    ("stim", "grating:orientation=-5", "from 0 to 180"),
    ("stim", "grating:phase=inf", "from 0 to 360"),
    ("stim", "uniform:value=nan", "from 0 to 1"),
    ("stim", "noise:std=-inf", "from 0 to 1"),
    ("stim", "grating:frequency=nan", "at least 0 and at most half the image size"),
    ("stim", "checkerboard:squares=0", "at least 1"),
    ("stim", "checkerboard:squares=1e308", "between 1 and 1024"),
    ("size", "nan", "from 16 to 1024"),
    ("size", "inf", "from 16 to 1024"),
    ("size", "0", "from 16 to 1024"),
    ("size", "-224", "from 16 to 1024"),
    ("size", "1e308", "from 16 to 1024"),
    ("batch", "0", "from 1 to 256"),
    ("batch", "-4", "from 1 to 256"),
    ("batch", "nan", "from 1 to 256"),
    ("seed", "-inf", "from 0 to"),
    ("ch", "nan", "from 0 to"),
    ("el", "inf", "from 0 to"),
    ("ov", "bn1:bogusmode", "Unknown mode 'bogusmode'"),
    ("ov", "bn1:train,momentum=nan", "momentum 'nan' is not valid"),
    ("ov", "bn1:train,momentum=inf", "momentum 'inf' is not valid"),
    ("ov", "bn1:train,momentum=2", "between 0 and 1"),
])
def test_every_bad_link_value_is_named_with_what_is_allowed(key, value, named):
    cfg, problems = dash.config_from_query({key: value})
    assert len(problems) == 1, problems
    assert f"{key}=" in problems[0] or "in link parameter stim" in problems[0]
    assert named in problems[0].replace("\\", "")
    if key == "stim":  # the kind is kept where it is valid, with its default numbers
        assert cfg.param_dict in (dash.default_params(cfg.stimulus), dash.DashConfig().param_dict)
    else:
        assert cfg.compute_key() == dash.DashConfig().compute_key()


def test_one_bad_override_leaves_the_others():
    cfg, problems = dash.config_from_query({"ov": "bn1:bogusmode;bn2:eval;;bn3:train"})
    assert len(problems) == 1 and "'bn1:bogusmode'" in problems[0]
    assert sorted(cfg.override_dict) == ["bn2", "bn3"]


def test_a_bad_stimulus_number_keeps_the_rest_of_the_stimulus():
    cfg, problems = dash.config_from_query({"stim": "grating:orientation=1e308,frequency=4"})
    assert cfg.stimulus == "grating"
    assert cfg.param_dict == {**dash.default_params("grating"), "frequency": 4}
    assert len(problems) == 1 and "using orientation=`0`" in problems[0]


def test_a_seed_inside_the_stimulus_is_used_or_reported():
    cfg, problems = dash.config_from_query({"stim": "noise:seed=3"})
    assert cfg.seed == 3 and problems == []
    cfg, problems = dash.config_from_query({"stim": "noise:seed=3", "seed": "5"})
    assert cfg.seed == 5 and len(problems) == 1 and "seed=`3`" in problems[0]
    cfg, problems = dash.config_from_query({"stim": "noise:seed=3", "seed": "3"})
    assert cfg.seed == 3 and problems == []


def test_unknown_override_layers_are_named():
    overrides = dash.parse_overrides("nosuch:train;_bn0:eval")
    kept, problem = dash.unknown_override_layers(overrides, ["_bn0", "_bn1"], "lite")
    assert list(kept) == ["_bn0"]
    assert "ov=`'nosuch:train'`" in problem and "'nosuch'" in problem
    assert dash.unknown_override_layers(kept, ["_bn0"], "lite") == (kept, None)
    many = {f"x{i}": dash.RowOverride("eval") for i in range(10)}
    kept, problem = dash.unknown_override_layers(many, ["_bn0"], "lite")
    assert kept == {} and "and 7 more" in problem and len(problem) < 600


def test_unbounded_stimulus_numbers_get_a_sensible_fix():
    from bnviz.errors import StimulusError
    from bnviz.stimuli import parse_stimulus_spec

    with pytest.raises(StimulusError) as err:
        parse_stimulus_spec("grating:orientation=nan")
    assert "must be a finite number, got nan" in str(err.value)
    assert "use any finite number for 'orientation'" in str(err.value)
    with pytest.raises(StimulusError) as err:
        parse_stimulus_spec("uniform:value=inf")
    assert "must be a finite number between 0 and 1, got inf" in str(err.value)



# -- in a real browser: a fragment's own rerun is a script run of its own ------------------
#
# AppTest reruns the whole script on every change; a browser reruns only the fragment that
# holds the widget. The server runs app.py through a small wrapper that breaks one layer's
# status sentence, so that picking that layer fails inside the layer fragment.

BROKEN_APP = """
import runpy
from bnviz import dashboard as dash

real = dash.layer_status_text


def broken(layer, overridden):
    if layer.label == "_blocks.2._bn1":
        raise RuntimeError("cannot read /tmp/secret/path/weights.pt")
    return real(layer, overridden)


dash.layer_status_text = broken
runpy.run_path({app!r}, run_name="__main__")
"""


def _chromium_skip_reason() -> str | None:
    from tests import browser_support as bs

    return bs.chromium_skip_reason()


def browser_test(test):
    """Marked like tests/test_browser.py: skipped (with the reason) where chromium is
    missing, unless CI is "true"."""
    reason = _chromium_skip_reason()
    for mark in (pytest.mark.browser, pytest.mark.slow,
                 pytest.mark.skipif(reason is not None, reason=reason or "")):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory):
    from tests import browser_support as bs

    script = tmp_path_factory.mktemp("app") / "broken_app.py"
    script.write_text(BROKEN_APP.format(app=APP), encoding="utf-8")
    with bs.running_server(script=str(script)) as server, bs.chromium() as browser:
        yield server, browser


def _open(browser, server, query: str):
    from tests import browser_support as bs

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(90_000)
    log = bs.ConsoleLog(page)
    page.goto(f"{server.url}/?{query}")
    bs.wait_charts(page, 4)
    bs.wait_idle(page)
    return page, log


@browser_test
def test_in_a_browser_a_channel_change_clears_the_link_warnings(broken_server):
    from tests import browser_support as bs

    server, browser = broken_server
    page, log = _open(browser, server, "size=64&batch=2&model=resnet19&layer=nosuch")
    assert page.get_by_text("Ignored link parameter model=").count() == 1
    assert page.get_by_text("The link names layer").count() == 1
    bs.set_number(page, "Channel", 3)  # a widget of the channel fragment
    page.wait_for_function("() => !document.body.innerText.includes('Ignored link parameter')")
    bs.wait_idle(page)
    assert page.get_by_text("The link names layer").count() == 0
    assert "ch=3" in page.url and "model=efficientnet_lite0" in page.url
    bs.set_number(page, "Channel", 4)
    page.wait_for_function("() => location.href.includes('ch=4')")
    bs.wait_idle(page)
    assert page.get_by_text("Ignored link parameter").count() == 0
    assert page.locator(bs.EXCEPTION).count() == 0 and log.real_errors() == []
    page.close()


@browser_test
def test_in_a_browser_an_error_in_a_fragment_rerun_is_one_short_message(broken_server):
    from tests import browser_support as bs

    server, browser = broken_server
    page, log = _open(browser, server, "size=64&batch=2")
    bs.select_option(page, "Layer", "7: _blocks.2._bn1")  # a rerun of the layer fragment
    page.wait_for_function("() => document.body.innerText.includes('Something went wrong')")
    bs.wait_idle(page)
    text = page.inner_text("body")
    found = SHORT.search(text)
    assert found and found.group(1) == "drawing this page"
    assert "/tmp/secret" not in text and page.locator(bs.EXCEPTION).count() == 0
    assert f"Unexpected error while drawing this page (reference {found.group(2)})" \
        in server.log()
    assert log.real_errors() == []
    page.close()
