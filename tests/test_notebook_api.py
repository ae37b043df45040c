"""Charts and comparisons in a notebook (issue 21, section 4): ``report.figure`` /
:mod:`bnviz.plot` give the dashboard's own figures, ``bnviz.compare`` says per layer how two
reports differ, and ``docs/notebook.ipynb`` runs from top to bottom."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

import bnviz
import bnviz.plot as bplot
from bnviz import dashboard as dash
from bnviz import figures

ROOT = Path(__file__).resolve().parents[1]
SIZE, BATCH = 96, 2
LAYER, CHANNEL = "_blocks.2._bn1", 5


@pytest.fixture(scope="module")
def lite_x():
    return bnviz.make_stimulus("image", SIZE, BATCH, composition="different", name="chelsea")


@pytest.fixture(scope="module")
def train_report(lite, lite_x):
    return bnviz.inspect(lite, lite_x, "train", device="cpu", keep_tensors=True)


@pytest.fixture(scope="module")
def eval_report(lite, lite_x):
    return bnviz.inspect(lite, lite_x, "eval", device="cpu", keep_tensors=True)


@pytest.fixture(scope="module")
def lean_report(lite, lite_x):
    """The train report's configuration without tensors."""
    return bnviz.inspect(lite, lite_x, "train", device="cpu", keep_tensors=False)


@pytest.fixture(scope="module")
def dashboard_view(lite, lite_x):
    """What the dashboard's server makes for the same configuration."""
    return dash.compute_view_data(lite, lite_x, "train", "cpu", random_init=False)


@pytest.fixture(scope="module")
def resnet_report():
    torch.manual_seed(0)
    model = bnviz.load_model("resnet18", weights=None)
    x = bnviz.make_stimulus("image", 64, BATCH, composition="different", name="coffee")
    return bnviz.inspect(model, x, "train", device="cpu", keep_tensors=True)


def _y(trace) -> np.ndarray:
    return np.asarray(trace.y, dtype=np.float64)


# -- report.figure: the dashboard's figures ---------------------------------------------------


def test_statistics_figure_is_the_reports_numbers(train_report):
    fig = train_report.figure("statistics", layer=LAYER, channel=CHANNEL)
    layer = train_report.layer(LAYER)
    by_name = {t.name: _y(t) for t in fig.data}
    for name, tensor in (("batch mean", layer.batch_mean), ("running mean",
                         layer.running_mean_before), ("batch var (biased)", layer.batch_var),
                         ("running var", layer.running_var_before)):
        np.testing.assert_array_equal(by_name[name], tensor.numpy().astype(np.float64))
    assert LAYER in fig.layout.title.text and "batch ones" in fig.layout.title.text


def test_running_update_figure_is_pytorchs_update(train_report):
    layer = train_report.layer(LAYER)
    fig = bplot.figure(train_report, "running-update", LAYER, CHANNEL)
    change = next(t for t in fig.data if t.name == "mean: PyTorch's change")
    expected = layer.running_mean_after.numpy() - layer.running_mean_before.numpy()
    np.testing.assert_array_equal(_y(change), expected.astype(np.float64))


def test_every_figure_equals_the_dashboards(train_report, eval_report, lite, lite_x,
                                            dashboard_view):
    """Figure JSON from the notebook API and from the dashboard's own path (the server's
    compute_view_data, the chart registry's blocks) for the same configuration."""
    view = dashboard_view
    shown = dash.ChartInput(view, view.layer(LAYER), CHANNEL)
    drawn = {}
    for spec in dash.LAYER_CHARTS:
        for block in spec.blocks:
            if block.kind == "figure":
                drawn[block.key] = block.make(shown).to_json()
    kinds = {"chart_stats": "statistics", "chart_maps": "feature-maps",
             "chart_gallery": "gallery", "chart_dist": "distributions",
             "chart_allch": "all-channels", "chart_update": "running-update",
             "chart_manual": "manual-vs-native"}
    assert set(drawn) == set(kinds)  # a new chart in the registry needs a kind here
    for key, kind in kinds.items():
        assert train_report.figure(kind, LAYER, CHANNEL).to_json() == drawn[key], kind
    assert train_report.figure("overview").to_json() == \
        figures.overview_figure(view).to_json()
    reference = dash.compute_eval_predictions(lite, lite_x, "cpu")
    assert train_report.figure("predictions", reference=eval_report, image=1).to_json() == \
        figures.predictions_figure(view.predictions, reference.predictions, 1).to_json()
    # and the whole condensed view is the dashboard's
    assert bplot.view_data(train_report).layer(LAYER).map_output.tobytes() == \
        view.layer(LAYER).map_output.tobytes()


def test_figures_are_valid_plotly(train_report):
    for kind in bplot.FIGURE_KINDS:
        if kind == "inplace":
            continue
        fig = train_report.figure(kind, LAYER, CHANNEL)
        go.Figure(fig.to_dict())  # validates every property


def test_inplace_figure_equals_the_dashboards_and_says_random_init(resnet_report):
    view = dash.build_view_data(resnet_report, random_init=True)
    fig = resnet_report.figure("inplace", "bn1", 2)
    assert fig.to_json() == figures.inplace_figure(view.layer("bn1"), 2,
                                                   view.weights_label).to_json()
    assert figures.RANDOM_INIT_LABEL in fig.layout.title.text
    # without a layer: the first overwritten one
    first = next(ly.label for ly in resnet_report.layers if ly.overwritten_by)
    assert resnet_report.figure("inplace").layout.title.text.startswith(f"{first}, channel 0")


def test_statistics_figures_work_without_tensors(train_report, lean_report):
    for kind in ("statistics", "running-update"):
        assert lean_report.figure(kind, LAYER, CHANNEL).to_json() == \
            train_report.figure(kind, LAYER, CHANNEL).to_json()
    assert lean_report.figure("overview").to_json() == train_report.figure("overview").to_json()


@pytest.mark.parametrize("kind", ["feature-maps", "manual-vs-native", "distributions",
                                  "gallery", "all-channels"])
def test_tensor_figures_without_tensors_name_the_fix(lean_report, kind):
    with pytest.raises(bnviz.BnvizError) as err:
        lean_report.figure(kind, LAYER)
    text = str(err.value)
    assert "keep_tensors=True" in text and repr(LAYER) in text and kind in text


def test_keeping_one_layer_is_enough_for_its_figures(lite, lite_x, train_report):
    one = bnviz.inspect(lite, lite_x, "train", device="cpu", keep_tensors=[LAYER])
    assert one.figure("feature-maps", LAYER, CHANNEL).to_json() == \
        train_report.figure("feature-maps", LAYER, CHANNEL).to_json()
    with pytest.raises(bnviz.BnvizError, match="keep_tensors"):
        one.figure("inplace")


def test_bad_requests_say_what_to_do(train_report, resnet_report):
    with pytest.raises(bnviz.BnvizError, match="overview, statistics"):
        train_report.figure("histogram")
    n = train_report.layer(LAYER).num_features
    with pytest.raises(bnviz.BnvizError, match=f"channel=0 to {n - 1}"):
        train_report.figure("statistics", LAYER, n)
    with pytest.raises(bnviz.LayerError):
        train_report.figure("statistics", "no.such.layer")
    with pytest.raises(bnviz.BnvizError, match="overwritten in place.*resnet18"):
        train_report.figure("inplace")  # efficientnet_lite0's ReLU6 is not in place
    with pytest.raises(bnviz.BnvizError, match="pick a layer whose output is overwritten"):
        resnet_report.figure("inplace", "layer2.0.downsample.1")  # added, not in place
    with pytest.raises(bnviz.BnvizError, match=f"image=0 to {BATCH - 1}"):
        train_report.figure("predictions", image=BATCH)
    # aliases a notebook user is likely to type
    assert train_report.figure("feature_maps", LAYER).to_json() == \
        train_report.figure("feature-maps", LAYER).to_json()


@pytest.mark.slow
def test_import_bnviz_loads_no_plotly_until_plot_is_used():
    code = ("import sys, bnviz; assert 'plotly' not in sys.modules; "
            "assert callable(bnviz.plot.figure); assert 'plotly' in sys.modules; "
            "assert callable(bnviz.compare)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


# -- bnviz.compare ----------------------------------------------------------------------------


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.max(np.abs(a.numpy().astype(np.float64) - b.numpy().astype(np.float64))))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(np.abs(a.numpy()).max(), np.abs(b.numpy()).max())
    return _max_abs(a, b) / float(scale)


def test_train_vs_eval_by_hand(train_report, eval_report):
    frame = bnviz.compare(train_report, eval_report, labels=("train", "eval"))
    assert list(frame["layer"]) == train_report.layer_names
    assert (frame["found_in"] == "both").all()
    for row in frame.itertuples():
        a, b = train_report.layer(row.layer), eval_report.layer(row.layer)
        assert row.stats_used_train == "batch" and row.stats_used_eval == "running"
        assert not row.same_stats
        # train normalised with the batch's statistics, eval with the running ones
        assert row.used_mean_diff == pytest.approx(_max_abs(a.batch_mean, b.running_mean_before),
                                                   rel=1e-12, abs=0)
        assert row.used_var_rel == pytest.approx(_rel(a.batch_var, b.running_var_before),
                                                 rel=1e-12)
        assert row.batch_mean_diff == pytest.approx(_max_abs(a.batch_mean, b.batch_mean),
                                                    rel=1e-12, abs=0)
        assert row.running_mean_diff == 0.0 and row.running_var_rel == 0.0  # same buffers
        assert row.running_var_after_diff == pytest.approx(
            _max_abs(a.running_var_after, b.running_var_after), rel=1e-12, abs=0)
        assert row.output_diff == pytest.approx(_max_abs(a.output, b.output), rel=1e-12, abs=0)
        assert row.output_rel == pytest.approx(_rel(a.output, b.output), rel=1e-12)
        assert row.note == ""
    # the first layer sees the same input in both: same batch statistics
    assert frame.loc[0, "batch_mean_diff"] == 0.0 and frame.loc[0, "input_diff"] == 0.0
    preds = frame.attrs["predictions"]
    top_a = [row[0].index for row in train_report.predictions]
    top_b = [row[0].index for row in eval_report.predictions]
    assert preds["images"] == BATCH
    assert preds["top1_agreement"] == np.mean([x == y for x, y in zip(top_a, top_b)])
    assert frame.attrs["unmatched"] == {"train": [], "eval": []}


def test_without_kept_tensors_outputs_are_not_compared(train_report, lean_report):
    frame = bnviz.compare(train_report, lean_report)
    assert frame["output_diff"].isna().all()
    assert frame.loc[0, "note"] == "input not kept in b; output not kept in b"
    # the same configuration: identical statistics
    assert (frame["batch_mean_diff"] == 0).all() and (frame["running_var_after_diff"] == 0).all()


class _Net(nn.Module):
    """conv -> BN(8) -> conv -> BN(width) [-> extra BN] -> 4 class scores."""

    def __init__(self, width: int, extra: bool, track: bool = True, affine: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width, track_running_stats=track, affine=affine)
        self.extra = nn.BatchNorm2d(width) if extra else None
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.extra is not None:
            x = self.extra(x)
        return self.head(x.mean(dim=(2, 3)))


def _randomised(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


def test_model_a_vs_b_with_other_layers_by_hand():
    torch.manual_seed(0)
    a = _randomised(_Net(8, extra=False), 1)
    b = _randomised(_Net(16, extra=True), 2)
    b.bn1.load_state_dict(a.bn1.state_dict())
    b.conv1.load_state_dict(a.conv1.state_dict())
    x = torch.randn(3, 3, 10, 10)
    ra = bnviz.inspect(a, x, "eval", device="cpu")
    rb = bnviz.inspect(b, x, "eval", device="cpu")
    frame = bnviz.compare(ra, rb, labels=("A", "B"))
    assert list(frame["layer"]) == ["bn1", "bn2", "extra"]
    assert list(frame["found_in"]) == ["both", "both", "B"]
    assert frame.attrs["unmatched"] == {"A": [], "B": ["extra"]}
    bn1, bn2, extra = (frame.iloc[i] for i in range(3))
    # bn1: same weights and input in both
    assert bn1.input_diff == 0.0 and bn1.output_diff == 0.0 and bn1.weight_diff == 0.0
    assert bn1.same_stats and bn1.channels == 8
    # bn2: 8 channels in A, 16 in B -- nothing per channel can be compared
    assert math.isnan(bn2.batch_mean_diff) and math.isnan(bn2.output_diff)
    assert bn2.note == "8 channels in A, 16 in B" and frame["channels"].isna().iloc[1]
    assert extra.note == "only in B" and math.isnan(extra.used_mean_diff)
    assert extra.stats_used_B == "running" and pd.isna(extra.stats_used_A)
    # predictions: all 4 classes are in both top-k lists, so the largest difference is exact
    with torch.no_grad():
        pa = torch.softmax(a(x), dim=1)
        pb = torch.softmax(b(x), dim=1)
    preds = frame.attrs["predictions"]
    assert preds["max_prob_diff"] == pytest.approx(float((pa - pb).abs().max()), abs=1e-6)
    agree = (pa.argmax(1) == pb.argmax(1)).double().mean().item()
    assert preds["top1_agreement"] == agree
    table = bnviz.compare_predictions(ra, rb, labels=("A", "B"))
    assert list(table["agree"]) == (pa.argmax(1) == pb.argmax(1)).tolist()


def test_before_vs_after_fine_tuning_by_hand():
    """Same architecture, other weights: the statistics the layers use and their affine
    parameters differ; one layer lost its running statistics and its affine parameters."""
    torch.manual_seed(0)
    before = _randomised(_Net(8, extra=False), 1)
    after = _randomised(_Net(8, extra=False, track=False, affine=False), 3)
    after.conv1.load_state_dict(before.conv1.state_dict())
    x = torch.randn(2, 3, 6, 6)
    rb = bnviz.inspect(before, x, "eval", device="cpu")
    ra = bnviz.inspect(after, x, "eval", device="cpu")
    frame = bnviz.compare(rb, ra, labels=("before", "after"))
    bn1, bn2 = frame.iloc[0], frame.iloc[1]
    lb, la = rb.layer("bn1"), ra.layer("bn1")
    assert bn1.running_mean_diff == pytest.approx(
        _max_abs(lb.running_mean_before, la.running_mean_before), rel=1e-12, abs=0)
    assert bn1.weight_rel == pytest.approx(_rel(lb.weight, la.weight), rel=1e-12)
    assert bn1.bias_diff == pytest.approx(_max_abs(lb.bias, la.bias), rel=1e-12, abs=0)
    assert bn1.input_diff == 0.0  # same first conv, same input
    # bn2 in "after" has no buffers: it normalises with the batch even in eval
    assert bn2.stats_used_before == "running" and bn2.stats_used_after == "batch"
    assert math.isnan(bn2.running_mean_diff) and math.isnan(bn2.weight_diff)
    assert bn2.note == "no running statistics, affine weight and bias in after"
    assert bn2.used_mean_diff == pytest.approx(
        _max_abs(rb.layer("bn2").running_mean_before, ra.layer("bn2").batch_mean),
        rel=1e-12, abs=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_vs_cuda(lite, lite_x):
    cpu = bnviz.inspect(lite, lite_x, "train", device="cpu")
    gpu = bnviz.inspect(lite, lite_x, "train", device="cuda")
    frame = bnviz.compare(cpu, gpu, labels=("cpu", "cuda"))
    assert frame["same_stats"].all() and frame.attrs["devices"]["cuda"].startswith("cuda")
    assert (frame["batch_mean_rel"] < 1e-3).all() and (frame["output_rel"] < 1e-3).all()
    assert frame.attrs["predictions"]["top1_agreement"] == 1.0


def test_compare_refuses_what_it_cannot_compare(train_report):
    with pytest.raises(bnviz.BnvizError, match="two InspectionReports"):
        bnviz.compare(train_report, train_report.to_frame())
    with pytest.raises(bnviz.BnvizError, match="labels"):
        bnviz.compare(train_report, train_report, labels=("x", "x"))


def test_compare_figure_draws_the_frame(train_report, eval_report):
    frame = bnviz.compare(train_report, eval_report, labels=("train", "eval"))
    fig = bplot.compare_figure(frame)
    go.Figure(fig.to_dict())
    traces = {t.name: t for t in fig.data}
    want = frame["batch_mean_rel"].to_numpy(dtype=np.float64)
    got = _y(traces["batch mean"])
    drawn = want > 0
    np.testing.assert_array_equal(got[drawn], want[drawn])
    assert np.isnan(got[~drawn]).all()  # zeros are left out of the log axis
    np.testing.assert_array_equal(_y(traces["output"]), frame["output_diff"].to_numpy())
    assert list(traces["output"].customdata[0]) == [frame.loc[0, "layer"], "batch", "running"]
    assert "train vs eval" in fig.layout.title.text
    # rows may be filtered
    part = frame[frame["layer"].str.startswith("_blocks.1")]
    assert len(bplot.compare_figure(part).data[0].x) == len(part)
    with pytest.raises(bnviz.BnvizError, match="bnviz.compare"):
        bplot.compare_figure(train_report.to_frame())


# -- the example notebook ---------------------------------------------------------------------


@pytest.mark.slow
def test_example_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernel of this interpreter (this venv), whatever else Jupyter finds on the machine.
    spec = tmp_path / "kernels" / "bnviz-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bnviz test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    nb = nbformat.read(ROOT / "docs" / "notebook.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="bnviz-test",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    kinds = {k for o in outputs for k in o.get("data", {})}
    assert "application/vnd.plotly.v1+json" in kinds  # the figures
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<table" in h and "used_mean_rel" in h for h in html)  # the comparison
