"""bnviz.figures: every chart's content equals PyTorch's numbers; no Streamlit involved.

Figures are compared through their JSON (what the browser receives), decoded the way
plotly.js decodes numpy arrays, so a test fails if a chart shows anything but the report.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import bnviz
from bnviz import dashboard as dash
from bnviz import figures as F

SIZE, BATCH = 64, 2


@pytest.fixture(scope="module")
def lite_report():
    model = bnviz.load_model("efficientnet_lite0")
    x = bnviz.make_stimulus("image", SIZE, BATCH, composition="different", name="chelsea")
    return bnviz.inspect(model, x, "train", device="cpu", keep_tensors=True)


@pytest.fixture(scope="module")
def lite_view(lite_report):
    return dash.build_view_data(lite_report, random_init=False)


@pytest.fixture(scope="module")
def resnet_report():
    torch.manual_seed(0)
    model = bnviz.load_model("resnet18", weights=None)
    x = bnviz.make_stimulus("image", SIZE, BATCH, composition="different", name="coffee")
    return bnviz.inspect(model, x, "train", device="cpu", keep_tensors=True)


@pytest.fixture(scope="module")
def resnet_view(resnet_report):
    return dash.build_view_data(resnet_report, random_init=True)


@pytest.fixture(scope="module")
def eval_lite_view():
    model = bnviz.load_model("efficientnet_lite0")
    x = bnviz.make_stimulus("image", SIZE, BATCH, composition="different", name="chelsea")
    return dash.compute_view_data(model, x, "eval", "cpu", random_init=False)


def spec(fig: go.Figure) -> dict:
    """The figure as the browser gets it."""
    return json.loads(pio.to_json(fig, validate=False))


def arr(value) -> np.ndarray:
    """Decode a plotly JSON array (plain list or {"dtype", "bdata", "shape"})."""
    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            shape = value["shape"]
            shape = [int(s) for s in (shape.split(",") if isinstance(shape, str) else shape)]
            a = a.reshape(shape)
        return a
    return np.asarray(value, dtype=float)


def trace(s: dict, name: str) -> dict:
    found = [t for t in s["data"] if t.get("name") == name]
    assert found, f"no trace {name!r} in {[t.get('name') for t in s['data']]}"
    return found[0]


def title(s: dict) -> str:
    return s["layout"]["title"]["text"]


_P = dash.input_preview(torch.linspace(0, 1, 3 * 20 * 20).view(1, 3, 20, 20))
_PREVIEW = (_P.z, _P.rows, _P.cols)


def all_figures(view: dash.ViewData, layer: dash.LayerView, channel: int = 1):
    label = view.weights_label
    figs = {
        "overview": F.overview_figure(view),
        "stats": F.channel_stats_figure(layer, channel, label),
        "update": F.running_update_figure(layer, channel, label),
        "maps": F.feature_map_figure(layer, channel, label),
        "gallery": F.channel_gallery_figure(layer, [0, 1, 2], "input", label),
        "dist": F.distribution_figure(layer, channel, label),
        "allch": F.all_channels_figure(layer, channel, label),
        "manual": F.manual_vs_native_figure(layer, channel, label),
        "preds": F.predictions_figure(view.predictions, view.predictions, 0, label),
        # the sidebar's network-input chart (its numbers: test_input_figure_is_the_model_input)
        "pre": F.input_figure(*_PREVIEW, label),
    }
    if layer.map_reference is not None:
        figs["inplace"] = F.inplace_figure(layer, channel, label)
    return figs


# -- validity ---------------------------------------------------------------------------------


def test_every_figure_is_valid_plotly(lite_view, resnet_view, eval_lite_view):
    """The builders skip plotly's validation for speed; here it runs on every figure."""
    cases = [(lite_view, lite_view.layer("_bn0")), (resnet_view, resnet_view.layer("bn1")),
             (eval_lite_view, eval_lite_view.layer("_blocks.4._bn2")),
             (lite_view, lite_view.layers[-1])]  # 1280 channels: the step-line variants
    for view, layer in cases:
        figs = all_figures(view, layer)
        for name, fig in figs.items():
            assert isinstance(fig, go.Figure), name
            go.Figure(fig.to_dict())  # raises on any invalid property
    assert "inplace" in all_figures(resnet_view, resnet_view.layer("bn1"))
    # many channels: one step line per trace instead of one SVG node per channel
    big = spec(F.channel_stats_figure(lite_view.layers[-1]))
    assert {t["mode"] for t in big["data"]} == {"lines"}
    small = spec(F.channel_stats_figure(lite_view.layers[0]))
    assert {t["mode"] for t in small["data"]} == {"markers"}


def test_random_init_label_on_every_chart(lite_view, resnet_view):
    for name, fig in all_figures(resnet_view, resnet_view.layer("bn1")).items():
        assert F.RANDOM_INIT_LABEL in title(spec(fig)), name
    for name, fig in all_figures(lite_view, lite_view.layer("_bn0")).items():
        assert "random init" not in title(spec(fig)), name


def test_payload_is_small(lite_view):
    total = sum(len(pio.to_json(f, validate=False))
                for f in all_figures(lite_view, lite_view.layer("_bn0")).values())
    assert total < 600_000  # the budget per rerun is 2 MB for everything


def _arrays_in(value, path=""):
    """Paths of base64-encoded (typed) arrays anywhere in a JSON value."""
    if isinstance(value, dict):
        if "bdata" in value:
            return [path]
        return [p for k, v in value.items() for p in _arrays_in(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _arrays_in(v, f"{path}[{i}]")]
    return []


def test_figures_redraw_once_in_the_browser(lite_view, resnet_view):
    """What lets plotly.js skip the second, identical draw Streamlit asks for (see
    ``figures._plain_data``): plain arrays, a data revision, no object-valued template."""
    for view, layer in ((lite_view, lite_view.layer("_bn0")), (lite_view, lite_view.layers[-1]),
                        (resnet_view, resnet_view.layer("bn1"))):
        for name, fig in all_figures(view, layer).items():
            s = spec(fig)
            assert s["layout"]["template"] == "none", name
            if name == "pre":  # the input preview stays base64 (see figures.input_figure)
                continue
            assert _arrays_in(s["data"]) == [], name
            assert isinstance(s["layout"]["datarevision"], str), name
    # the revision follows the numbers: same data -> same revision, other data -> another
    layer = lite_view.layer("_bn0")
    rev = spec(F.channel_stats_figure(layer, 1))["layout"]["datarevision"]
    assert spec(F.channel_stats_figure(layer, 2))["layout"]["datarevision"] == rev
    other = spec(F.channel_stats_figure(lite_view.layers[1], 1))["layout"]["datarevision"]
    assert other != rev


def test_plain_lists_keep_float32_values_exactly(lite_view):
    layer = lite_view.layers[-1]
    s = spec(F.channel_stats_figure(layer))
    y = np.asarray(trace(s, "batch mean")["y"], dtype=np.float64)
    assert np.array_equal(y.astype(np.float32), layer.batch_mean)
    assert np.array_equal(y, layer.batch_mean.astype(np.float64))  # no rounding at all


def test_input_preview_before_the_forward_equals_the_report(lite_report, lite_view):
    """The sidebar draws the network input before inspect runs: same numbers."""
    model = bnviz.load_model("efficientnet_lite0")
    x = bnviz.make_stimulus("image", SIZE, BATCH, composition="different", name="chelsea")
    pre = dash.preprocessed_preview(model, x)
    after = dash.input_preview(lite_report.model_input)  # what the network really received
    np.testing.assert_array_equal(pre.z, after.z)
    np.testing.assert_array_equal(pre.rows, after.rows)
    np.testing.assert_array_equal(pre.cols, after.cols)


def test_manual_scatter_is_svg(lite_view):
    s = spec(F.manual_vs_native_figure(lite_view.layer("_bn0"), 0))
    assert {t["type"] for t in s["data"]} <= {"scatter", "bar"}  # no WebGL without a GPU


# -- content equals PyTorch ---------------------------------------------------------------------


def test_overview_points_are_the_report_table(lite_report, lite_view):
    s = spec(F.overview_figure(lite_view))
    frame = lite_report.to_frame()
    for col, name in (("mean_shift", "mean shift"), ("log_var_ratio", "log var ratio"),
                      ("max_abs_diff", "max |manual - native|")):
        t = trace(s, name)
        np.testing.assert_allclose(arr(t["y"]), frame[col].to_numpy(dtype=float))
        assert [c[0] for c in t["customdata"]] == lite_report.layer_names
    assert "49 BatchNorm layers" in title(s)


def test_batch_mean_trace_is_the_reports(lite_report, lite_view):
    rep = lite_report.layer("_blocks.3._bn1")
    s = spec(F.channel_stats_figure(lite_view.layer(rep.name), 2))
    np.testing.assert_array_equal(arr(trace(s, "batch mean")["y"]), rep.batch_mean.numpy())
    np.testing.assert_array_equal(arr(trace(s, "running mean")["y"]),
                                  rep.running_mean_before.numpy())
    np.testing.assert_array_equal(arr(trace(s, "batch var (biased)")["y"]),
                                  rep.batch_var.numpy())
    np.testing.assert_array_equal(arr(trace(s, "running var")["y"]),
                                  rep.running_var_before.numpy())
    # and the batch statistics really are the mean / biased variance of the conv output
    x = rep.input.double()
    np.testing.assert_allclose(arr(trace(s, "batch mean")["y"]), x.mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arr(trace(s, "batch var (biased)")["y"]),
                               x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-7)
    assert "batch ones" in title(s)


def test_running_update_bars(lite_report, lite_view):
    rep = lite_report.layer("_bn0")
    s = spec(F.running_update_figure(lite_view.layer("_bn0"), 0))
    np.testing.assert_array_equal(arr(trace(s, "mean: PyTorch's change")["y"]),
                                  (rep.running_mean_after - rep.running_mean_before).numpy())
    np.testing.assert_array_equal(arr(trace(s, "var: PyTorch's change")["y"]),
                                  (rep.running_var_after - rep.running_var_before).numpy())
    by_hand = arr(trace(s, "var: factor * (batch - before), by hand")["y"])
    np.testing.assert_allclose(
        by_hand, (rep.momentum * (rep.batch_var_unbiased - rep.running_var_before)).numpy(),
        rtol=1e-4, atol=1e-7)
    # the update is momentum * (batch - before): check it against the formula itself
    expected = rep.momentum * (rep.batch_mean - rep.running_mean_before)
    np.testing.assert_allclose(arr(trace(s, "mean: PyTorch's change")["y"]), expected,
                               rtol=1e-4, atol=1e-7)
    assert "momentum 0.01" in title(s)


def test_no_update_in_eval(eval_lite_view):
    s = spec(F.running_update_figure(eval_lite_view.layer("_bn0")))
    assert "no running-stat update" in title(s)
    assert "eval mode" in s["layout"]["annotations"][0]["text"]


def test_feature_maps_are_tensor_values(lite_report, lite_view):
    rep, lv = lite_report.layer("_blocks.1._bn0"), lite_view.layer("_blocks.1._bn0")
    s = spec(F.feature_map_figure(lv, 4))
    rows, cols = lv.rows, lv.cols
    z_in, z_bn, z_act = (arr(t["z"]) for t in s["data"])
    np.testing.assert_array_equal(z_in, rep.input[0, 4].numpy()[np.ix_(rows, cols)])
    np.testing.assert_array_equal(z_bn, rep.output[0, 4].numpy()[np.ix_(rows, cols)])
    np.testing.assert_array_equal(z_act,
                                  rep.activation_output[0, 4].numpy()[np.ix_(rows, cols)])
    np.testing.assert_array_equal(arr(s["data"][0]["y"]), rows)
    # ReLU6 (hardtanh) clamps the BN output: checked on the real tensors
    np.testing.assert_allclose(z_act, np.clip(z_bn, 0, 6), atol=1e-6)


def test_gallery_shows_the_requested_channels(lite_report, lite_view):
    rep, lv = lite_report.layer("_bn0"), lite_view.layer("_bn0")
    s = spec(F.channel_gallery_figure(lv, [5, 7], "output"))
    for t, c in zip(s["data"], (5, 7)):
        np.testing.assert_array_equal(arr(t["z"]), rep.output[0, c].numpy()[np.ix_(lv.rows,
                                                                                   lv.cols)])


def test_distribution_bars_are_the_counts(lite_report, lite_view):
    rep, lv = lite_report.layer("_bn0"), lite_view.layer("_bn0")
    s = spec(F.distribution_figure(lv, 3))
    bars = [t for t in s["data"] if t["type"] == "bar"]
    np.testing.assert_array_equal(arr(bars[0]["y"]), lv.hist_input[1][3])
    np.testing.assert_array_equal(arr(bars[1]["y"]), lv.hist_output[1][3])
    assert arr(bars[0]["y"]).sum() == lv.hist_count
    # the batch-mean line sits at the report's batch mean of channel 3
    xs = [sh["x0"] for sh in s["layout"]["shapes"]]
    assert float(rep.batch_mean[3]) in xs and float(rep.running_mean_before[3]) in xs


def test_all_channels_heatmap(lite_view):
    lv = lite_view.layer("_blocks.2._bn1")
    s = spec(F.all_channels_figure(lv, 1))
    z = arr(s["data"][0]["z"])
    # colour = log(1 + count) to 4 decimals (small JSON); the counts themselves are exact
    np.testing.assert_allclose(z, np.log1p(lv.hist_input[1].astype(np.float64)), atol=5e-5)
    np.testing.assert_array_equal(np.rint(np.expm1(z)), lv.hist_input[1])
    np.testing.assert_array_equal(arr(trace(s, "batch mean")["x"]), lv.batch_mean)


def test_manual_scatter_is_the_literal_formula(lite_report, lite_view):
    """y of the scatter = (x - mean) / sqrt(var + eps) * gamma + beta on the real inputs."""
    rep, lv = lite_report.layer("_blocks.6._bn1"), lite_view.layer("_blocks.6._bn1")
    s = spec(F.manual_vs_native_figure(lv, 0))
    pts = trace(s, "elements")
    idx = arr(pts["customdata"]).astype(np.int64)
    n, c, h, w = idx.T
    x = rep.input.numpy()[n, c, h, w].astype(np.float64)
    literal = ((x - rep.batch_mean.numpy()[c]) / np.sqrt(rep.batch_var.numpy()[c] + rep.eps)
               * rep.weight.numpy()[c] + rep.bias.numpy()[c])
    np.testing.assert_allclose(arr(pts["y"]), literal, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(arr(pts["x"]), rep.output.numpy()[n, c, h, w])
    ident = trace(s, "identity y = x")
    assert ident["x"] == ident["y"]
    assert ident["x"][0] <= arr(pts["x"]).min() and ident["x"][1] >= arr(pts["x"]).max()
    np.testing.assert_array_equal(arr(trace(s, "max |diff|")["y"]),
                                  rep.channel_max_abs_diff.numpy())
    assert "manual (batch statistics)" in s["layout"]["yaxis"]["title"]["text"]


def test_manual_scatter_uses_running_stats_in_eval(eval_lite_view):
    lv = eval_lite_view.layer("_bn0")
    s = spec(F.manual_vs_native_figure(lv))
    pts = trace(s, "elements")
    c = arr(pts["customdata"]).astype(np.int64)[:, 1]
    x = lv.sample_input.astype(np.float64)
    literal = ((x - lv.running_mean_before[c]) / np.sqrt(lv.running_var_before[c] + lv.eps)
               * lv.weight[c] + lv.bias[c])
    np.testing.assert_allclose(arr(pts["y"]), literal, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(arr(pts["y"]), arr(pts["x"]), rtol=1e-4, atol=1e-4)


def test_inplace_figure(resnet_report, resnet_view):
    rep, lv = resnet_report.layer("layer1.0.bn1"), resnet_view.layer("layer1.0.bn1")
    s = spec(F.inplace_figure(lv, 2, resnet_view.weights_label))
    clone, ref, changed = (arr(t["z"]) for t in s["data"])
    sel = np.ix_(lv.rows, lv.cols)
    np.testing.assert_array_equal(clone, rep.output[0, 2].numpy()[sel])
    np.testing.assert_array_equal(ref, rep.output_reference[0, 2].numpy()[sel])
    np.testing.assert_array_equal(changed, (clone != ref).astype(np.float32))
    np.testing.assert_array_equal(ref, np.maximum(clone, 0))  # exactly what ReLU wrote
    assert f"{rep.overwritten_fraction():.1%}" in title(s)


def test_inplace_figure_for_the_residual_add(resnet_report, resnet_view):
    """bn2 of a BasicBlock is not followed by a ReLU but overwritten by ``out += identity``."""
    rep, lv = resnet_report.layer("layer1.0.bn2"), resnet_view.layer("layer1.0.bn2")
    assert lv.overwritten_by == "add_" and lv.activation is None
    s = spec(F.inplace_figure(lv, 0))
    assert "add_" in title(s)
    np.testing.assert_array_equal(arr(s["data"][1]["z"]),
                                  rep.output_reference[0, 0].numpy()[np.ix_(lv.rows, lv.cols)])


def test_inplace_figure_refuses_layers_not_overwritten(lite_view):
    with pytest.raises(ValueError, match="not overwritten"):
        F.inplace_figure(lite_view.layer("_bn0"), 0)


def test_predictions_figure(lite_report, lite_view, eval_lite_view):
    s = spec(F.predictions_figure(lite_view.predictions, eval_lite_view.predictions, 1))
    cur, ref = s["data"]
    top = lite_report.predictions[1]
    assert cur["y"] == [p.label for p in top][::-1]
    np.testing.assert_allclose(cur["x"], [p.probability for p in top][::-1])
    assert ref["y"] == [p[1] for p in eval_lite_view.predictions[1]][::-1]
    assert "image 1" in title(s)


def test_input_figure_is_the_model_input(lite_report):
    pre = dash.input_preview(lite_report.model_input)
    s = spec(F.input_figure(pre.z, pre.rows, pre.cols))
    for i, t in enumerate(s["data"]):
        np.testing.assert_array_equal(
            arr(t["z"]), lite_report.model_input[0, i].numpy()[np.ix_(pre.rows, pre.cols)])
