"""Files and data from outside (issue 22, sections 3 and 5): uploads in a private folder that
expires, only regular files read (never blocking), no server path in any message, non-finite
data named and refused, exports that never fail on NaN, ragged tables reported."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import streamlit
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest
from torch import nn

import bnviz
from bnviz import cli
from bnviz import dashboard as dash
from bnviz.dashboard import uploads
from bnviz.errors import BnvizError, StimulusError
from bnviz.models import from_module
from bnviz.pitfalls.user_output import MAX_USER_VALUES, load_user_output, user_array
from bnviz.serialize import to_json
from bnviz.stimuli import MAX_IMAGE_BYTES, load_image
from bnviz.stimuli.finite import nonfinite_summary

ROOT = Path(__file__).resolve().parents[1]


def _png(color=(10, 200, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _float_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def _huge_npy_header() -> bytes:
    """A .npy file whose header claims 10^12 float64 values (8 TB), followed by 64 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    return buf.getvalue() + b"\0" * 64


def _strict(text: str):
    """json.loads that refuses NaN/Infinity tokens (what strict JSON readers do)."""
    def bad(token):
        raise AssertionError(f"non-JSON token {token}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture
def store(monkeypatch, tmp_path):
    """A fresh upload store (a fresh server), with the system temp folder moved to tmp_path so
    that the old shared location can be planted with a file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fresh = uploads.UploadStore()
    monkeypatch.setattr(uploads, "_STORE", fresh)
    yield fresh
    fresh.close()


def _upload_cfg(digest: str = "", **kw) -> dash.DashConfig:
    return dash.DashConfig(stimulus=dash.UPLOAD_KIND, params=(), size=kw.pop("size", 32),
                           batch_size=kw.pop("batch_size", 1), upload=digest, **kw)


# -- 1. uploads: a private folder, made fresh, files there not trusted, deleted in time -------


def test_upload_folder_is_private_and_fresh(store, tmp_path):
    green, red = _png((10, 200, 30)), _png((250, 0, 0))
    digest = hashlib.sha256(green).hexdigest()
    # Someone else on the machine plants a file where the old code kept this upload.
    planted = tmp_path / "bnviz-uploads" / digest[:32] / "photo.png"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(red)
    got, path = dash.store_upload(green, "photo.png")
    assert got == digest and Path(path) != planted
    folder = Path(store.folder)
    assert Path(path).is_relative_to(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    x = dash.make_batch(_upload_cfg(digest), path)
    assert torch.allclose(x[0, 1], torch.full((32, 32), 200 / 255))  # green, not the red plant
    # Another server gets a folder of its own.
    other = uploads.UploadStore()
    try:
        other.store(green, "photo.png")
        assert other.folder != store.folder
        assert stat.S_IMODE(os.stat(other.folder).st_mode) == 0o700
    finally:
        other.close()


def test_a_file_the_store_did_not_write_is_never_read(store, tmp_path):
    planted = tmp_path / "planted.png"
    planted.write_bytes(_png())
    for path in (str(planted), "/etc/passwd", "/etc/nonexistent"):
        with pytest.raises(StimulusError) as err:
            dash.make_batch(_upload_cfg(), path)
        assert str(err.value) == str(uploads._gone())  # the same words, whatever the path
    # A stored file changed behind the store's back is not trusted either.
    digest, path = dash.store_upload(_png(), "mine.png")
    Path(path).write_bytes(_png((0, 0, 0)))
    with pytest.raises(StimulusError, match="no longer on the server"):
        dash.make_batch(_upload_cfg(digest), path)


def test_uploads_expire_and_go_at_exit(store, monkeypatch, fresh_settings):
    monkeypatch.setenv("BNVIZ_UPLOAD_TTL_S", "60")
    fresh_settings()
    clock = [1000.0]
    monkeypatch.setattr(uploads, "time", types.SimpleNamespace(time=lambda: clock[0]))
    da, pa = dash.store_upload(_png((1, 2, 3)), "a.png")
    clock[0] += 30
    db, pb = dash.store_upload(_png((4, 5, 6)), "b.png")
    clock[0] += 31  # a: 61 s unused, b: 31 s
    dash.store_upload(_png((7, 8, 9)), "c.png")
    assert not os.path.exists(pa) and os.path.exists(pb)
    with pytest.raises(StimulusError, match="no longer on the server") as err:
        dash.make_batch(_upload_cfg(da), pa)
    assert store.folder not in str(err.value)
    dash.make_batch(_upload_cfg(db), pb)
    clock[0] += 59
    dash.make_batch(_upload_cfg(db), pb)  # a use keeps it: b is fresh again
    clock[0] += 2  # c: 61 s unused, b: 2 s
    assert store.expire() == 1 and os.path.exists(pb)
    # At exit the whole folder goes.
    code = ("from bnviz import dashboard as d; import io; from PIL import Image; "
            "b = io.BytesIO(); Image.new('RGB', (8, 8)).save(b, format='PNG'); "
            "d.store_upload(b.getvalue(), 'x.png'); "
            "from bnviz.dashboard.uploads import upload_store; print(upload_store().folder)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True).stdout.strip()
    assert out and not os.path.exists(out)


def test_upload_messages_name_the_file_never_the_server_path(store):
    digest, path = dash.store_upload(b"this is not an image", "notes.png")
    with pytest.raises(StimulusError) as err:
        dash.make_batch(_upload_cfg(digest), path)
    message = str(err.value)
    assert "notes.png" in message
    for secret in (path, store.folder, tempfile.gettempdir(), "/tmp", digest[:32]):
        assert secret not in message
    # A name is quoted on one line, cut to 80 characters; the page shows it literally.
    name = "[log in](javascript:alert(1))\n**x**" + "y" * 500 + ".png"
    digest, path = dash.store_upload(b"junk", name)
    with pytest.raises(StimulusError) as err:
        dash.make_batch(_upload_cfg(digest), path)
    message = str(err.value)
    quoted = "'[log in](javascript:alert(1)) **x**" + "y" * 44 + "…'"
    assert quoted in message and "\n" not in message
    shown = dash.message(message, [name])
    assert "`'[log in](javascript:alert(1)) **x**yyy" in shown
    assert shown.count("](") == 1 and shown.count("`") == 2  # only inside one code span
    assert "\\[log in\\]\\(javascript" in dash.describe_config_stimulus(_upload_cfg(digest),
                                                                        name)


@pytest.mark.parametrize("composition,batch", [("copies", 3), ("jitter", 3), ("different", 4)])
def test_upload_batch_is_the_file_stimulus(store, tmp_path, composition, batch):
    data = _png((90, 20, 160), size=(50, 41))
    digest, path = dash.store_upload(data, "p.png")
    cfg = _upload_cfg(digest, size=32, batch_size=batch, composition=composition, seed=5)
    own = tmp_path / "p.png"
    own.write_bytes(data)
    expected = bnviz.make_stimulus("file", 32, batch, composition=composition, seed=5,
                                   path=str(own))
    assert torch.equal(dash.make_batch(cfg, path), expected)


# -- 2. only regular files, stat first, never blocking -----------------------------------------


def _finishes(fn, path: str, seconds: float = 20.0):
    """Run ``fn(path)`` in a thread; if it blocks (a FIFO open), release it and fail."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # lets the blocked reader go
        os.close(fd)
        worker.join(seconds)
        pytest.fail(f"reading {path} blocked")
    return out


def test_fifo_device_directory_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    for fn in (lambda p: load_image(p, 32), load_user_output):
        out = _finishes(fn, fifo)
        assert isinstance(out.get("error"), BnvizError), out
        assert "not a regular file" in str(out["error"])
    for path in ("/dev/null", str(tmp_path)):
        with pytest.raises(BnvizError, match="not a regular file|directory"):
            load_image(path, 32)
        with pytest.raises(BnvizError, match="not a regular file|directory"):
            load_user_output(path)


def test_size_is_checked_from_stat_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:  # sparse: nothing to read, only its size
        fh.truncate(MAX_IMAGE_BYTES + 1)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    with pytest.raises(StimulusError, match="larger than"):
        load_image(str(big), 32)
    assert str(big) not in opened


def test_cli_fifo_stimulus_exits_2_at_once(tmp_path):
    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "bnviz", "inspect", "--stimulus", fifo, "--weights", "random",
         "--model", "resnet18", "--size", "32"],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a regular file" in lines[0], proc.stderr


def test_npy_header_claiming_a_trillion_values_is_refused_before_allocating(tmp_path, capsys):
    data = _huge_npy_header()
    with pytest.raises(BnvizError, match="claims 1,000,000,000,000 values"):
        load_user_output(data, "huge.npy")
    path = tmp_path / "huge.npy"
    path.write_bytes(data)
    code = cli.main(["pitfalls", "explain", "--size", "32", "--user-output", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "claims" in err
    # A truncated array is named as such, not a numpy traceback.
    buf = io.BytesIO()
    np.save(buf, np.arange(12.0))
    with pytest.raises(BnvizError, match="truncated"):
        load_user_output(buf.getvalue()[:-8], "short.npy")
    assert MAX_USER_VALUES < 10**12


class _Upload:
    def __init__(self, name: str, data: bytes):
        self.name, self._data = name, data

    def getvalue(self) -> bytes:
        return self._data


def test_pitfall_lab_huge_npy_upload_is_a_message(monkeypatch):
    real = streamlit.file_uploader

    def fake(label, *args, key=None, **kwargs):
        shown = real(label, *args, key=key, **kwargs)
        return _Upload("huge.npy", _huge_npy_header()) if key == "explain:upload" else shown

    monkeypatch.setattr(streamlit, "file_uploader", fake)
    at = AppTest.from_file(str(ROOT / "pages" / "1_Pitfall_lab.py"), default_timeout=600)
    at.query_params["experiment"] = "explain"
    at.session_state["explain:size"] = 64
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and "claims 1,000,000,000,000 values" in at.error[0].value


# -- 4. non-finite data: named and refused; exports write null ---------------------------------


def test_nonfinite_summary_names_counts_images_and_channels():
    x = torch.zeros(4, 3, 8, 8)
    assert nonfinite_summary(x) is None
    x[1, 2, 0, 0] = float("nan")
    x[3, 2, 5, 5] = float("inf")
    x[3, 0, 1, 1] = float("-inf")
    text = nonfinite_summary(x)
    assert text == ("3 of 768 values are not finite (1 NaN, 2 infinite), in images 1, 3, "
                    "channels 0, 2")
    assert nonfinite_summary(np.array([1.0, np.nan])) == (
        "1 of 2 values is not finite (1 NaN, 0 infinite), the first at index (1,)")


@pytest.mark.parametrize("fill,needle", [(np.nan, "4,096 NaN"), (np.inf, "1 infinite")])
def test_float_tiff_with_nan_or_inf_is_refused_with_counts(tmp_path, fill, needle):
    values = np.random.default_rng(0).random((64, 64))
    if np.isnan(fill):
        values[:] = fill
    else:
        values[3, 4] = fill
    path = tmp_path / "scan.tif"
    path.write_bytes(_float_tiff(values))
    with pytest.raises(StimulusError) as err:
        bnviz.make_stimulus("file", 32, path=str(path))
    assert needle in str(err.value) and "scan.tif" in str(err.value)
    if not np.isnan(fill):
        assert "(3, 4)" in str(err.value)  # where the first one is
    # A finite float TIFF still loads.
    path.write_bytes(_float_tiff(np.random.default_rng(0).random((64, 64))))
    assert torch.isfinite(bnviz.make_stimulus("file", 32, path=str(path))).all()


def test_cli_nan_image_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "nan.tif"
    path.write_bytes(_float_tiff(np.full((48, 48), np.nan)))
    code = cli.main(["inspect", "--stimulus", str(path), "--weights", "random", "--model",
                     "resnet18", "--size", "32", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "NaN" in err


def test_dashboard_nan_upload_is_refused_and_names_no_path(store):
    digest, path = dash.store_upload(_float_tiff(np.full((40, 40), np.nan)), "scan.tif")
    with pytest.raises(StimulusError) as err:
        dash.make_batch(_upload_cfg(digest), path)
    message = str(err.value)
    assert "1,600 NaN" in message and "scan.tif" in message
    assert store.folder not in message and "/tmp" not in message


def test_user_output_nonfinite_names_where():
    y = np.zeros((2, 3, 4, 4))
    y[1, 2, 0, 0] = np.nan
    with pytest.raises(BnvizError, match=r"1 NaN, 0 infinite\), in image 1, channel 2"):
        user_array(y)


def test_report_with_nan_statistics_is_strict_json_with_null():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        module[0].weight[0].fill_(float("nan"))  # channel 0 of the BN input is NaN
    report = bnviz.inspect(from_module(module), torch.rand(2, 3, 16, 16))
    payload = _strict(report.to_json())
    layer = payload["layers"][0]
    assert layer["batch_mean"][0] is None and layer["batch_mean"][1] is not None
    assert payload["predictions"][0][0]["probability"] is None
    assert _strict(to_json({"a": float("nan"), "b": [np.float32("inf"), 1.5]})) == {
        "a": None, "b": [None, 1.5]}


# -- 5. a ragged CSV is reported, its first row never dropped ----------------------------------


def test_ragged_csv_is_reported_with_row_and_width():
    with pytest.raises(BnvizError, match=r"line 2 has 2 values, but the table has 3 columns"):
        load_user_output(b"1,2,3\n4,5\n6,7\n", "mine.csv")
    with pytest.raises(BnvizError, match=r"line 4 has 3 values, but the table has 2 columns"):
        load_user_output(b"a,b\n1,2\n3,4\n5,6,7\n", "mine.csv")
    # A header line (words) is still skipped; a first row of numbers never is.
    assert load_user_output(b"x,y\n1,2\n3,4\n", "m.csv").tolist() == [[1, 2], [3, 4]]
    assert load_user_output(b"1,2\n3,4\n", "m.csv").tolist() == [[1, 2], [3, 4]]
    assert load_user_output(b"# comment\n1 2\n3 4\n", "m.txt").tolist() == [[1, 2], [3, 4]]


# -- the dashboard end to end ------------------------------------------------------------------


def test_app_upload_of_a_nan_tiff_is_a_message_without_paths():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.query_params.update({"size": "64", "batch": "2"})
    at.run()
    at.selectbox(key="stimulus").set_value("upload")
    at.run()
    at.file_uploader(key="upload").set_value(
        ("scan [x](javascript:alert(1)).tif", _float_tiff(np.full((40, 40), np.nan)),
         "image/tiff"))
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    errors = [e.value for e in at.error]
    assert any("1,600 NaN" in e for e in errors), errors
    folder = uploads.upload_store().folder
    assert any("`'scan [x](javascript:alert(1)).tif'`" in e for e in errors), errors
    for e in errors:
        assert folder not in e and tempfile.gettempdir() not in e
