"""The Pitfall lab page (pages/1_Pitfall_lab.py) in Streamlit's AppTest.

Every registered experiment must render without an exception and show its verdict, its
table and at least one chart; the explainer's "Why doesn't *my* manual BN match?" upload
must attribute an uploaded wrong output to the right formula and turn a bad file into an
error box. Experiments 1-4 run at 64 px (their size control is seeded through session
state); the others run with their page defaults.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit
import torch
from streamlit.testing.v1 import AppTest

from bnviz.pitfalls import EXPERIMENTS, load_all
from bnviz.pitfalls.explain import run as explain

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "1_Pitfall_lab.py")
SMALL = 64
OWN = ("explain", "inplace-relu", "partial-forward", "track-stats")  # size control known


def _app(name: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=600)
    at.query_params["experiment"] = name
    if name in OWN:
        at.session_state[f"{name}:size"] = SMALL
    return at


def _verdicts(at: AppTest) -> list[str]:
    return [e.value for e in [*at.success, *at.info] if "**Verdict.**" in e.value]


def _check_rendered(at: AppTest, name: str) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    experiment = load_all()[name]
    assert at.header[0].value == experiment.title
    assert len(_verdicts(at)) == 1
    assert len(at.dataframe) >= 1
    charts = at.get("plotly_chart")
    assert charts, f"{name}: no chart"
    spec = json.loads(charts[0].proto.spec)
    assert spec["data"], f"{name}: empty figure"


def test_page_lists_all_experiments_in_order():
    at = _app("explain").run()
    select = at.selectbox(key="pitfall:experiment")
    assert select.value == "explain"
    assert [o.split("(")[-1].rstrip(")") for o in select.options] == list(EXPERIMENTS)
    _check_rendered(at, "explain")
    # The verdict is the headless function's, computed with the same defaults.
    assert _verdicts(at)[0] == f"**Verdict.** {explain(size=SMALL).verdict}"


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiment_renders(name):
    at = _app(name).run()
    _check_rendered(at, name)


def test_explain_controls_change_the_result():
    at = _app("explain").run()
    at.selectbox(key="explain:mode").set_value("eval").run()
    assert not at.exception and not at.error
    verdict = _verdicts(at)[0]
    assert "in mode eval normalises with running statistics" in verdict
    assert "Only 'running statistics' matches" in verdict
    at.text_input(key="explain:stimulus").set_value("nonsense-kind").run()
    assert not at.exception
    assert at.error and "nonsense-kind" in at.error[0].value


def test_the_stimulus_box_takes_no_server_path(tmp_path, monkeypatch):
    """A path typed into the Settings' stimulus box is refused before anything is read, with
    the same words whether the file exists or not."""
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(photo)
    import bnviz.stimuli.batch as batch

    def no_read(*args, **kwargs):
        raise AssertionError("a file was opened for a stimulus typed in the browser")

    monkeypatch.setattr(batch, "load_image", no_read)
    said = []
    for text in (str(photo), str(tmp_path / "missing.png"), f"file:{photo}"):
        at = _app("explain").run()
        at.text_input(key="explain:stimulus").set_value(text).run()
        assert not at.exception, [e.value for e in at.exception]
        messages = [e.value for e in at.error]
        assert messages and "Files cannot be named here" in messages[0]
        assert str(tmp_path) not in messages[0]
        said.append(messages[0])
    assert said[0] == said[1] == said[2]


class _Upload:
    """What st.file_uploader returns: a name and the bytes."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self._data = data

    def getvalue(self) -> bytes:
        return self._data


def _fake_uploader(monkeypatch, upload):
    real = streamlit.file_uploader

    def fake(label, *args, key=None, **kwargs):
        if key == "explain:upload":
            real(label, *args, key=key, **kwargs)  # still draw the widget
            return upload
        return real(label, *args, key=key, **kwargs)

    monkeypatch.setattr(streamlit, "file_uploader", fake)


def _running_formula_output() -> np.ndarray:
    """A user who normalised with the running statistics while the layer was in train mode."""
    import bnviz

    base = explain(size=SMALL)
    x = torch.from_numpy(base.arrays["input"]).double()
    bn = bnviz.load_model("efficientnet_lite0").module._bn0
    view = (1, -1, 1, 1)
    y = (x - bn.running_mean.double().view(view)) / torch.sqrt(
        bn.running_var.double().view(view) + bn.eps)
    y = y * bn.weight.detach().double().view(view) + bn.bias.detach().double().view(view)
    return y.float().numpy()


def test_upload_is_attributed_to_the_running_statistics_formula(monkeypatch):
    buf = io.BytesIO()
    np.save(buf, _running_formula_output())
    _fake_uploader(monkeypatch, _Upload("mine.npy", buf.getvalue()))
    at = _app("explain").run()
    assert not at.exception and not at.error
    mine = [e.value for e in at.success if e.value.startswith("**Your output.**")]
    assert len(mine) == 1
    assert "is explained by 'running statistics'" in mine[0]
    assert "call model.eval()" in mine[0]
    # the comparison table and the "your output" charts are shown
    assert len(at.dataframe) == 2
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in
              at.get("plotly_chart")]
    assert "Your output vs each candidate" in titles


def test_bad_upload_shows_an_error_and_the_page_keeps_running(monkeypatch):
    _fake_uploader(monkeypatch, _Upload("mine.csv", b"1,2,3\n4,5,6\n"))
    at = _app("explain").run()
    assert not at.exception
    assert len(at.error) == 1 and "fits no part" in at.error[0].value
    assert len(_verdicts(at)) == 1  # the main result is still there
