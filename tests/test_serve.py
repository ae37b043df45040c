"""``bnviz serve`` and ``bnviz.serve(model, x)``: the dashboard on the operator's own model
(examples/my_model.py: BatchNorm3d, BatchNorm1d on a sequence and on a table), its inputs,
the views that fit each shape, and that a link can never name code or a path.

The dashboard's numbers are compared with a native PyTorch forward with hooks.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnviz
from bnviz import cli
from bnviz import dashboard as dash
from bnviz.errors import BnvizError, CheckpointError
from bnviz.hosting import serve as serving
from bnviz.models import custom

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_model.py"
APP = str(ROOT / "app.py")
CLIP = "4x3x8x32x32"  # 4 clips of 8 frames of 32 x 32 pixels


def example(name: str = "build") -> nn.Module:
    return custom.load_model_spec(f"{EXAMPLE}:{name}").module


def native_inputs(module: nn.Module, x, modes: str = "train") -> dict[str, torch.Tensor]:
    """Each BatchNorm layer's input in a native forward (forward pre-hooks), on a copy in
    ``modes`` (the others in eval, as bnviz runs them)."""
    import copy

    net = copy.deepcopy(module).eval()
    seen: dict[str, torch.Tensor] = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(modes == "train")
            m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
    with torch.no_grad():
        net(*(x if isinstance(x, tuple) else (x,)))
    return seen


@pytest.fixture(autouse=True)
def _nothing_served():
    """Every test starts and ends with no operator model in this process."""
    custom.clear_served()
    yield
    custom.clear_served()


# -- the command line: options and errors ------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["serve", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "nosuch"], "is not a registry model nor MODULE:FUNCTION"),
    (["--model", "examples/my_model.py:nope"], "has no attribute 'nope'"),
    (["--model", "examples/missing.py:build"], "No file"),
    (["--model", "no_such_pkg.models:build"], "No module named 'no_such_pkg.models'"),
    (["--model", "examples/my_model.py:build", "--input", "16x32"], "does not run on random "
     "normal 16x32"),
    (["--model", "examples/my_model.py:build", "--input", "0x3"], "has a dimension of 0"),
    (["--model", "examples/my_model.py:build", "--input", "data.csv"],
     "neither a shape nor a .npy/.pt file"),
    (["--model", "examples/my_model.py:build", "--input", "missing.npy"], "does not exist"),
    (["--model", "examples/my_model.py:build", "--port", "0"], "--port must be between"),
    (["--model", "examples/my_model.py:build", "--host", "example.org"],
     "--host 'example.org' is not an IP address"),
    (["--model", "examples/my_model.py:build", "--weights", "missing.pt"],
     "--weights 'missing.pt' is not a file"),
    (["--model", "examples/my_model.py:build", "--seed", "-1"], "--seed must be"),
    (["--model", "examples/my_model.py:build", "--port", "x"], "invalid int value"),
    ([], "the following arguments are required: --model"),
    (["--model", "os:getcwd"], "returned a str, not an nn.Module"),
    (["--model", "os:sep"], "not a function or class"),
    (["--model", "os:system"], "Calling 'os:system' failed"),
])
def test_cli_errors_are_one_line_and_exit_2(args, words, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(serving.subprocess, "Popen", _no_server)
    code, err = run_cli(args, capsys)
    assert code == cli.EXIT_USER_ERROR, err
    assert err.startswith("bnviz: error: ") and err.count("\n") == 1, err
    assert words in err
    assert "Traceback" not in err


def _no_server(*a, **kw):
    raise AssertionError("a server must not start after a user error")


def test_cli_model_without_batchnorm(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plain.py").write_text("from torch import nn\n"
                                       "def build():\n    return nn.Linear(4, 2)\n")
    monkeypatch.setattr(serving.subprocess, "Popen", _no_server)
    code, err = run_cli(["--model", "plain.py:build", "--input", "8x4"], capsys)
    assert code == 2 and "has no BatchNorm layers" in err and err.count("\n") == 1


def test_cli_weights_that_do_not_fit_are_listed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "other.pt"
    torch.save(example("build_tabular").state_dict(), path)
    monkeypatch.setattr(serving.subprocess, "Popen", _no_server)
    code, err = run_cli(["--model", "examples/my_model.py:build", "--input", CLIP,
                         "--weights", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "does not fit" in err and "missing keys" in err and "unexpected keys" in err


def test_cli_writes_a_private_spec_and_starts_the_same_app(tmp_path, capsys, monkeypatch):
    """What the dashboard process gets: the app of the project, and the spec file named in
    BNVIZ_SERVE_SPEC, in a folder only this user can open; removed when the server ends."""
    monkeypatch.chdir(ROOT)
    started = {}

    class FakeProc:
        pid = 12345
        returncode = 0

        def __init__(self, cmd, cwd, env, **kw):
            started.update(cmd=cmd, cwd=cwd, env=env)
            path = Path(env["BNVIZ_SERVE_SPEC"])
            started["spec"] = json.loads(path.read_text())
            started["modes"] = (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777)
            started["folder"] = path.parent

        def poll(self):
            return 0  # exits at once

    monkeypatch.setattr(serving.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(serving, "check_port_free", lambda host, port: None)
    np.save(tmp_path / "extra.npy", np.ones((4, 4), dtype=np.float32))
    code = cli.main(["serve", "--model", "examples/my_model.py:build_two_inputs", "--input",
                     CLIP, "--input", str(tmp_path / "extra.npy"), "--seed", "3", "--port",
                     "8765"])
    assert code == 0
    assert started["cmd"][1:4] == ["-m", "streamlit", "run"]
    assert started["cmd"][4] == APP and "8765" in started["cmd"]
    assert started["cwd"] == serving.ROOT
    assert started["modes"] == (0o600, 0o700)
    spec = started["spec"]
    # absolute paths: the dashboard runs in the project's folder
    assert spec["model"] == f"{EXAMPLE}:build_two_inputs"
    assert spec["inputs"] == [CLIP, str(tmp_path / "extra.npy")] and spec["seed"] == 3
    assert spec["sys_path"] == [str(ROOT)]
    assert not started["folder"].exists()
    err = capsys.readouterr().err
    assert "4 BatchNorm layers" in err


# -- models named by the operator --------------------------------------------------------------


def test_model_spec_by_file_module_and_registry(tmp_path, monkeypatch):
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn = nn.BatchNorm1d(4)
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(self.bn(x))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = custom.load_model_spec("mynets.nets:Net")
    assert by_module.bn_layer_names == ["bn"] and by_module.name == "mynets.nets:Net"
    assert not by_module.module.training  # eval, like registry models
    by_file = custom.load_model_spec(f"{pkg / 'nets.py'}:Net")
    assert by_file.name == "nets.py:Net"
    # the factory runs with torch seeded: the same network in every process
    assert torch.equal(by_file.module.fc.weight, by_module.module.fc.weight)
    assert custom.load_model_spec("resnet18", "random").weights_status == "random init"


@pytest.mark.parametrize(("spec", "words"), [
    ("", "No model given"),
    ("nocolon", "not a registry model"),
    ("examples/my_model.py:", "does not name an object"),
    (":build", "does not name an object"),
    ("examples/my_model.py:torch", "not a function or class"),
])
def test_bad_model_specs(spec, words, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(BnvizError, match=words):
        custom.load_model_spec(spec)


def test_weights_from_a_state_dict(tmp_path):
    trained = example()
    with torch.no_grad():
        for m in trained.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(0.25)
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)
    loaded = custom.load_model_spec(f"{EXAMPLE}:build", str(path))
    assert loaded.weights_status == "checkpoint" and "trained.pt" in loaded.weights
    assert float(loaded.module.head[1].running_mean[0]) == 0.25
    pickled = tmp_path / "code.pt"
    torch.save({"model": trained}, pickled)  # a whole pickled module: refused, not run
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        custom.load_model_spec(f"{EXAMPLE}:build", str(pickled))


# -- inputs ------------------------------------------------------------------------------------


def test_shapes():
    assert custom.parse_shape("16x32") == (16, 32)
    assert custom.parse_shape(" 8 x 3 x16 ") == (8, 3, 16)
    assert custom.parse_shape("8,3") == (8, 3)
    for bad, words in (("16x", "neither a shape"), ("x", "neither a shape"),
                       ("0x3", "dimension of 0"), ("100000x100000", "more than")):
        with pytest.raises(BnvizError, match=words):
            custom.parse_shape(bad)
    a, texts = custom.make_inputs(("4x3", "2x5"), seed=7)
    b, _ = custom.make_inputs(("4x3", "2x5"), seed=7)
    c, _ = custom.make_inputs(("4x3", "2x5"), seed=8)
    assert [t.shape for t in a] == [(4, 3), (2, 5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert texts == ("random normal 4x3 (seed 7)", "random normal 2x5 (seed 7)")


def test_npy_files_are_read_without_pickle(tmp_path):
    good = tmp_path / "rows.npy"
    values = np.arange(24, dtype=np.float64).reshape(6, 4)
    np.save(good, values)
    (t,), (text,) = custom.make_inputs((str(good),))
    assert torch.equal(t, torch.from_numpy(values)) and text == "rows.npy (6x4, float64)"
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(BnvizError, match="pickled Python objects"):
        custom.read_input_file(str(objects))
    pickle_file = tmp_path / "fake.npy"  # a plain pickle named .npy: never unpickled
    pickle_file.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(BnvizError, match="is a pickle .* can run arbitrary code"):
        custom.read_input_file(str(pickle_file))
    text = tmp_path / "text.npy"
    text.write_text("1,2,3\n")
    with pytest.raises(BnvizError, match="not a .npy array file"):
        custom.read_input_file(str(text))
    with pytest.raises(BnvizError, match="not a regular file|directory"):
        custom.read_input_file(str(tmp_path))


def test_a_float64_table_runs_through_float32_weights(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, np.random.default_rng(0).normal(size=(32, 16)))
    served = custom.build_served(custom.ServeSpec(f"{EXAMPLE}:build_tabular",
                                                  inputs=(str(path),)))
    assert served.inputs[0].dtype == torch.float32
    custom.check_served(served)


def test_pt_files_are_loaded_weights_only(tmp_path):
    one, two = torch.randn(4, 3, 8, 16, 16), torch.randn(4, 4)
    torch.save(one, tmp_path / "one.pt")
    torch.save((one, two), tmp_path / "pair.pt")
    assert torch.equal(custom.read_input_file(str(tmp_path / "one.pt"))[0], one)
    got = custom.read_input_file(str(tmp_path / "pair.pt"))
    assert len(got) == 2 and torch.equal(got[1], two)
    torch.save({"x": one}, tmp_path / "dict.pt")
    with pytest.raises(BnvizError, match="not a tensor or a tuple of tensors"):
        custom.read_input_file(str(tmp_path / "dict.pt"))
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # pickled code: never unpickled
    with pytest.raises(BnvizError, match="pickled Python objects"):
        custom.read_input_file(str(tmp_path / "module.pt"))


def test_input_files_have_a_size_limit(tmp_path, monkeypatch):
    np.save(tmp_path / "big.npy", np.zeros((64, 64), dtype=np.float32))
    monkeypatch.setattr(custom, "MAX_INPUT_BYTES", 1000)
    with pytest.raises(BnvizError, match="larger than"):
        custom.read_input_file(str(tmp_path / "big.npy"))


def test_several_inputs_from_a_pt_tuple_run_the_two_input_model(tmp_path):
    torch.save((torch.randn(4, 3, 8, 32, 32), torch.randn(4, 4)), tmp_path / "pair.pt")
    served = custom.build_served(custom.ServeSpec(f"{EXAMPLE}:build_two_inputs",
                                                  inputs=(str(tmp_path / "pair.pt"),)))
    assert isinstance(served.x, tuple) and len(served.x) == 2
    custom.check_served(served)
    report = bnviz.inspect(served.loaded, served.x, modes="train", keep_tensors=False)
    assert report.notes["input_shapes"] == ["4x3x8x32x32", "4x4"]
    seen = native_inputs(served.loaded.module, served.x)
    torch.testing.assert_close(report.layer("head.1").batch_mean, seen["head.1"].mean(dim=0),
                               rtol=1e-5, atol=1e-6)


def test_several_inputs_on_each_device(device):
    """A tuple of inputs reaches ``model(*x)`` on the device, and every layer's statistics
    are the native ones (CPU, and CUDA where there is one)."""
    module = example("build_two_inputs")
    x = (torch.randn(4, 3, 8, 16, 16), torch.randn(4, 4))
    report = bnviz.inspect(module, x, modes="train", device=device)
    assert report.device.startswith(device)
    seen = native_inputs(module, x)
    for label, dims in (("stem.1", (0, 2, 3, 4)), ("temporal.1", (0, 2)), ("head.1", (0,))):
        torch.testing.assert_close(report.layer(label).batch_mean, seen[label].mean(dim=dims),
                                   rtol=1e-4, atol=1e-5)
        assert report.layer(label).max_abs_diff < 1e-4
    with pytest.raises(BnvizError, match="takes one image batch"):
        bnviz.inspect(bnviz.load_model("resnet18", weights=None), x)


# -- the views of each shape -------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_view():
    torch.manual_seed(0)
    module = custom.load_model_spec(f"{EXAMPLE}:build").module
    x = torch.randn(4, 3, 8, 32, 32)
    report = bnviz.inspect(module, x, modes="train")
    return dash.build_view_data(report, random_init=False), native_inputs(module, x), x


def figure_of(view, label: str, block: int = 0, channel: int = 1):
    spec = dash.chart("feature-maps")
    return spec.blocks[block].make(dash.ChartInput(view, view.layer(label), channel))


def test_statistics_equal_a_native_forward(clip_view):
    view, seen, _ = clip_view
    for label, dims in (("stem.1", (0, 2, 3, 4)), ("temporal.1", (0, 2)), ("head.1", (0,))):
        layer = view.layer(label)
        np.testing.assert_allclose(layer.batch_mean, seen[label].mean(dim=dims).numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.batch_var,
                                   seen[label].var(dim=dims, unbiased=False).numpy(),
                                   rtol=1e-4, atol=1e-6)
        assert layer.max_abs_diff < 1e-4


def test_a_table_gets_per_feature_boxes_not_a_heatmap(clip_view):
    view, seen, _ = clip_view
    fig = figure_of(view, "head.1").to_dict()
    assert {t["type"] for t in fig["data"]} == {"box", "scatter"}
    before = fig["data"][0]
    q = np.quantile(seen["head.1"].double().numpy(), [0, 0.25, 0.5, 0.75, 1], axis=0)
    for key, row in (("lowerfence", 0), ("q1", 1), ("median", 2), ("q3", 3),
                     ("upperfence", 4)):
        np.testing.assert_allclose(before[key], q[row], rtol=1e-6, atol=1e-6)
    assert "every feature over the batch of 4" in fig["layout"]["title"]["text"]
    assert figure_of(view, "head.1", block=2) is None  # no gallery of 1x1 "maps"
    assert not dash.has_maps(view.layer("head.1"))


def test_a_sequence_is_a_channel_by_position_heatmap(clip_view):
    view, seen, _ = clip_view
    fig = figure_of(view, "temporal.1").to_dict()
    heat = fig["data"][0]
    assert heat["type"] == "heatmap" and "sequence" in fig["layout"]["title"]["text"]
    np.testing.assert_array_equal(np.asarray(heat["z"], dtype=np.float32),
                                  seen["temporal.1"][0].numpy())  # channels x positions
    assert list(heat["y"]) == list(range(32))


def test_a_volume_shows_its_middle_slice_and_says_so(clip_view):
    view, seen, _ = clip_view
    fig = figure_of(view, "stem.4", channel=3).to_dict()
    d = seen["stem.4"].shape[2]
    assert f"middle depth slice d = {d // 2} of {d}" in fig["layout"]["title"]["text"]
    np.testing.assert_array_equal(np.asarray(fig["data"][0]["z"], dtype=np.float32),
                                  seen["stem.4"][0, 3, d // 2].numpy())
    gallery = figure_of(view, "stem.4", block=2, channel=3).to_dict()
    assert "middle depth slice" in gallery["layout"]["title"]["text"]


def test_every_chart_of_every_shape_is_a_valid_figure(clip_view):
    import plotly.graph_objects as go

    view, _, _ = clip_view
    for layer in view.layers:
        for spec in dash.LAYER_CHARTS:
            for block in spec.blocks:
                made = block.make(dash.ChartInput(view, layer, 1))
                if block.kind == "figure" and made is not None:
                    go.Figure(made.to_dict())


# -- the dashboard on the operator's model (AppTest) -------------------------------------------


@pytest.fixture
def spec_file(tmp_path, monkeypatch, fresh_settings):
    """A server started like ``bnviz serve --model examples/my_model.py:build --input
    4x3x8x32x32``: the spec file and BNVIZ_SERVE_SPEC, as the command writes them."""
    def make(model: str = f"{EXAMPLE}:build", *inputs: str) -> Path:
        spec = custom.ServeSpec(model, inputs=inputs or (CLIP,), seed=0)
        path = tmp_path / "spec.json"
        path.write_text(spec.to_json())
        monkeypatch.setenv("BNVIZ_SERVE_SPEC", str(path))
        fresh_settings()
        return path
    return make


def new_app(**query):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update(query)
    return at


def run(at):
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def charts(at) -> dict[str, dict]:
    return {json.loads(el.proto.spec)["layout"]["title"]["text"]: json.loads(el.proto.spec)
            for el in at.get("plotly_chart")}


@pytest.mark.slow
def test_dashboard_on_the_example_model(spec_file):
    spec_file()
    at = run(new_app(mode="train"))
    served = custom.served_model()
    assert at.selectbox(key="model").value == served.key == "served:my_model.py_build"
    assert at.selectbox(key="model").options[0] == served.key
    assert not [s for s in at.selectbox if s.key == "stimulus"]  # no image stimulus controls
    page = "\n".join(c.value for c in at.caption)
    assert "random normal 4x3x8x32x32 (seed 0)" in page
    assert "stim" not in at.query_params and at.query_params["model"] == served.key
    assert "Predictions" in [h.value.split(". ", 1)[-1] for h in at.header]
    assert not [c for c in charts(at) if "Top-5" in c]
    seen = native_inputs(served.loaded.module, served.x)
    for label, dims in (("stem.1", (0, 2, 3, 4)), ("stem.4", (0, 2, 3, 4)),
                        ("temporal.1", (0, 2)), ("head.1", (0,))):
        at.selectbox(key="layer").set_value(label)
        for title in dash.LAYER_TABS:
            at.segmented_control(key="layer_tab").set_value(title)
            run(at)
            assert charts(at), (label, title)
        at.segmented_control(key="layer_tab").set_value(dash.LAYER_TABS[0])
        run(at)
        stats = next(s for t, s in charts(at).items() if "batch vs running" in t)
        y = [t for t in stats["data"] if t.get("name") == "batch mean"][0]["y"]
        np.testing.assert_allclose(np.asarray(y, dtype=np.float64),
                                   seen[label].mean(dim=dims).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dashboard_on_a_model_with_two_inputs(spec_file):
    spec_file(f"{EXAMPLE}:build_two_inputs", CLIP, "4x4")
    at = run(new_app())
    assert "random normal 4x3x8x32x32 (seed 0) and random normal 4x4 (seed 0)" in "\n".join(
        c.value for c in at.caption)
    at.selectbox(key="layer").set_value("head.1")
    at.segmented_control(key="layer_tab").set_value("Feature maps")
    run(at)
    assert any("every feature over the batch" in t for t in charts(at))


@pytest.mark.slow
@pytest.mark.parametrize("value", ["examples/my_model.py:build", "os:system",
                                   f"{EXAMPLE}:build"])
def test_a_link_cannot_name_code(value, spec_file, monkeypatch):
    """On a plain server and on one serving the example, a link naming a file or a module
    is an unknown model: shown literally, nothing imported, nothing run."""
    monkeypatch.setattr(os, "system", _no_server)
    before = {m for m in sys.modules if m.startswith("bnviz_user_")}
    at = new_app(model=value)
    at.run()
    assert not at.exception
    warning = "\n".join(w.value for w in at.warning)
    assert "Ignored link parameter model=`" in warning and "using" in warning
    assert {m for m in sys.modules if m.startswith("bnviz_user_")} == before
    spec_file()
    at = new_app(model=value)
    at.run()
    assert not at.exception
    assert "Ignored link parameter model=`" in "\n".join(w.value for w in at.warning)
    assert at.selectbox(key="model").value == custom.served_model().key


# -- bnviz.serve(model, x) in this process -------------------------------------------------------

NOTEBOOK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {examples!r})
    import torch, bnviz, my_model
    model, x = my_model.build(), torch.randn(4, 3, 8, 32, 32)
    handle = bnviz.serve(model, x, block={block})
    print("URL", handle.url, handle.model, flush=True)
    if not {block}:
        sys.stdin.readline()  # the test says when to go on
        again = bnviz.serve(my_model.build_tabular(), torch.randn(16, 16), block=False)
        print("SAME", again is handle, again.model, flush=True)
        handle.stop()
        print("STOPPED", handle.running, flush=True)
        third = bnviz.serve(model, x, block=False)  # a new server in the same process
        print("URL", third.url, third.model, flush=True)
        sys.stdin.readline()
        third.stop()
        print("STOPPED", third.running, flush=True)
""")


def start_notebook(block: bool) -> tuple[subprocess.Popen, str]:
    code = NOTEBOOK.format(examples=str(ROOT / "examples"), block=block)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd="/", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "BNVIZ_PREFETCH": "0"})
    deadline = time.monotonic() + 180
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("URL "):  # block=False: serve() returned its handle
            return proc, line.split()[1]
        if line.startswith("bnviz: dashboard of "):  # block=True: serve() says where, waits
            return proc, line.split(" at ")[1].split(". ")[0]
    proc.kill()
    raise AssertionError("".join(lines)[-3000:])


def next_line(proc: subprocess.Popen, prefix: str) -> str:
    """The process's next line starting with ``prefix`` (Streamlit prints its own too)."""
    while True:
        line = proc.stdout.readline()
        assert line, f"the process ended before printing {prefix}"
        if line.startswith(prefix):
            return line


def healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as reply:
        return reply.status == 200


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(600)
def test_serve_in_a_background_thread_opens_in_a_browser():
    from tests import browser_support as bs

    reason = bs.chromium_skip_reason()
    if reason:
        pytest.skip(reason)
    proc, url = start_notebook(block=False)
    try:
        assert healthy(url)
        with bs.chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            bs.wait_charts(page, 2, 120_000)
            bs.wait_idle(page, 120_000)
            body = page.inner_text("body")
            assert "stem.1" in body and "ClipNet" in body
            assert page.locator(bs.EXCEPTION).count() == 0
        proc.stdin.write("\n")
        proc.stdin.flush()
        # served again while running: the same server shows the new model under a new name
        same = next_line(proc, "SAME")
        assert same.split()[:2] == ["SAME", "True"] and "tabularnet" in same, same
        assert next_line(proc, "STOPPED").strip() == "STOPPED False"
        assert healthy(next_line(proc, "URL").split()[1])
        proc.stdin.write("\n")
        proc.stdin.flush()
        out = proc.stdout.read()
        assert proc.wait(60) == 0, out
        assert "STOPPED False" in out
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_blocking_stops_on_ctrl_c():
    import signal

    proc, url = start_notebook(block=True)
    try:
        assert healthy(url)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_what_it_cannot_show():
    with pytest.raises(BnvizError, match="needs an nn.Module"):
        bnviz.serve("resnet18", block=False)
    with pytest.raises(BnvizError, match="no BatchNorm layers"):
        bnviz.serve(nn.Linear(3, 2), torch.randn(4, 3), block=False)
    with pytest.raises(BnvizError, match="does not run on"):
        bnviz.serve(example(), torch.randn(4, 3), block=False)
    with pytest.raises(BnvizError, match="tensor or a tuple of tensors"):
        bnviz.serve(example(), [1, 2], block=False)
    assert custom.served_model() is None  # nothing half-served


def test_a_model_served_again_gets_another_name():
    first = custom.set_served(custom.served_from_objects(example(), torch.randn(4, 3)))
    second = custom.set_served(custom.served_from_objects(example(), torch.randn(4, 3)))
    assert first.key != second.key and custom.served_model() is second


# -- bnviz serve in a real browser -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(600)
def test_bnviz_serve_in_a_real_browser():
    """The issue's check: ``bnviz serve`` on a model outside the registry with BatchNorm1d
    and BatchNorm3d layers, in Chromium: pick a 1d and a 3d layer, every chart is drawn,
    no error box."""
    from tests import browser_support as bs

    reason = bs.chromium_skip_reason()
    if reason:
        pytest.skip(reason)
    port = bs.free_port()
    bs.ARTIFACTS.mkdir(exist_ok=True)
    log = open(bs.ARTIFACTS / f"bnviz-serve-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnviz", "serve", "--model", "examples/my_model.py:build",
         "--input", CLIP, "--port", str(port)], cwd=ROOT, stdout=log,
        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (bs.ARTIFACTS / f"bnviz-serve-{port}.log").read_text()
            try:
                if healthy(url):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        with bs.chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            console = bs.ConsoleLog(page)
            page.goto(url)
            bs.wait_charts(page, 2, 120_000)
            bs.wait_idle(page, 120_000)
            for option, title in (("2: temporal.1", "along the sequence"),
                                  ("3: head.1", "every feature over the batch"),
                                  ("1: stem.4", "middle depth slice")):
                bs.select_option(page, "Layer", option)
                bs.wait_idle(page, 120_000)
                bs.open_tab(page, "Feature maps")
                page.wait_for_function(
                    "(part) => Array.from(document.querySelectorAll('.gtitle'))"
                    ".some(t => t.textContent.includes(part))", arg=title, timeout=120_000)
                bs.wait_idle(page, 120_000)
                assert page.locator(bs.EXCEPTION).count() == 0
                assert page.locator('[data-testid="stAlertContentError"]').count() == 0
                for tab in dash.LAYER_TABS:
                    bs.open_tab(page, tab)
                    bs.wait_idle(page, 120_000)
                    assert page.locator(bs.CHART).count() >= 2, (option, tab)
            page.screenshot(path=str(bs.ARTIFACTS / "serve-my-model.png"), full_page=True)
            assert page.locator(bs.EXCEPTION).count() == 0
            assert console.real_errors() == []
    finally:
        serving._end(proc)
        log.close()
    assert proc.returncode == 0 or proc.returncode == -15
