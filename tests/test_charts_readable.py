"""Charts that can be read (issue 20, items 1, 2, 8 and the zero variances of item 7).

Each test reproduces one finding on the figure JSON the browser receives (built by the
figure builders, or read from the page with AppTest) and checks the fix:

* one "overwritten" mask convention with a labelled colour bar, on both pages;
* feature maps of every pixel up to 112 x 112 (block means above, said in the title), a
  colour bar on every heatmap, and an optional shared scale that travels in the link;
* percentages on the prediction bars, axes that show a 1 % bar, stacked prediction panels;
* log axes whose tick labels cannot overlap; zero variances drawn at the axis floor;
* short subplot titles in the sidebar preview, the selected layer marked in the overview,
  one legend symbol per series, both Training-lab curves visible;
* a layout that fits a phone (390 px): wrapped titles, legends below the plot.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch
from torch import nn

import bnviz
from bnviz import dashboard as dash
from bnviz import figures as F
from bnviz.chart_style import CHANGED, MASK_TITLE, UNCHANGED
from bnviz.dashboard.condense import MAX_GRID, map_block
from bnviz.pitfalls import inplace_relu
from bnviz.pitfalls.base import PitfallResult

APP = str(Path(__file__).resolve().parents[1] / "app.py")


# -- helpers ----------------------------------------------------------------------------------


def spec(fig: go.Figure) -> dict:
    """The figure as the browser gets it (numpy arrays as dtype/bdata/shape)."""
    return json.loads(pio.to_json(fig, validate=False))


def arr(value) -> np.ndarray:
    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            shape = value["shape"]
            a = a.reshape([int(s) for s in (shape.split(",") if isinstance(shape, str)
                                            else shape)])
        return a
    return np.asarray(value, dtype=float)


def heatmaps_of(s: dict) -> list[dict]:
    return [t for t in s["data"] if t["type"] == "heatmap"]


def colorbar_of(s: dict, trace: dict) -> dict | None:
    """The colour bar that explains ``trace``'s colours, None if it has none."""
    if "coloraxis" in trace:
        axis = s["layout"][trace["coloraxis"]]
        return None if axis.get("showscale") is False else axis.get("colorbar", {})
    return None if trace.get("showscale") is False else trace.get("colorbar", {})


def colour_at(colorscale: list, value: float) -> str:
    """The colour a discrete (stepped) colour scale gives ``value`` in [0, 1]."""
    below = [c for v, c in colorscale if v <= value]
    return below[-1]


def mask_trace(s: dict) -> dict:
    (mask,) = [t for t in heatmaps_of(s) if t.get("name") == "overwritten"]
    return mask


def title_lines(s: dict) -> list[str]:
    return s["layout"]["title"]["text"].split("<br>")


@pytest.fixture(scope="module")
def resnet224():
    """resnet18 (random init) at 224 px: bn1's maps are 112 x 112, layer1's 56 x 56."""
    torch.manual_seed(0)
    model = bnviz.load_model("resnet18", weights=None)
    x = bnviz.make_stimulus("image", 224, 2, composition="different", name="chelsea")
    report = bnviz.inspect(model, x, "train", device="cpu", keep_tensors=True)
    return report, dash.build_view_data(report, random_init=True)


@pytest.fixture(scope="module")
def lite_eval():
    """The bundled efficientnet_lite0 in eval: ``_bn0`` has running_var 0 in 4 channels."""
    model = bnviz.load_model("efficientnet_lite0")
    x = bnviz.make_stimulus("image", 64, 2, composition="different", name="chelsea")
    return dash.compute_view_data(model, x, "eval", "cpu", random_init=False)


# -- 1. one mask convention, with a legend ----------------------------------------------------


def test_inplace_mask_red_means_changed_with_a_labelled_colour_bar(resnet224):
    report, view = resnet224
    rep, lv = report.layer("bn1"), view.layer("bn1")
    s = spec(F.inplace_figure(lv, 3, view.weights_label))
    mask = mask_trace(s)
    changed = arr(mask["z"]).reshape(len(lv.rows), len(lv.cols))
    # exactly the pixels a reference-keeping hook sees changed (ReLU zeroed the negatives)
    truth = rep.output[0, 3].numpy() != rep.output_reference[0, 3].numpy()
    np.testing.assert_array_equal(changed.astype(bool), truth)
    assert truth.any() and not truth.all()
    assert (mask["zmin"], mask["zmax"]) == (0, 1)
    assert colour_at(mask["colorscale"], 1.0) == CHANGED
    assert colour_at(mask["colorscale"], 0.0) == UNCHANGED
    bar = colorbar_of(s, mask)
    assert bar is not None, "the mask has no colour key"
    ticks = dict(zip(bar["ticktext"], bar["tickvals"]))
    assert set(ticks) == {"unchanged", "changed"}
    assert colour_at(mask["colorscale"], ticks["changed"]) == CHANGED
    assert colour_at(mask["colorscale"], ticks["unchanged"]) == UNCHANGED
    assert MASK_TITLE in [a["text"].replace("<br>", " ") for a in s["layout"]["annotations"]]


def test_pitfall_lab_draws_the_same_mask_convention(resnet224):
    report, view = resnet224
    rep = report.layer("bn1")
    true, ref = rep.output[:, :4].double(), rep.output_reference[:, :4].double()
    result = PitfallResult(
        name="inplace_relu", title="t", verdict="v", reproduced=True, table=[],
        data={"layer": "bn1", "channel": 3},
        arrays={"true_map": true[0, 3].numpy(), "reference_map": ref[0, 3].numpy(),
                "changed_map": (true != ref)[0, 3].double().numpy(),
                "per_channel_overwritten": np.zeros(4), "per_channel_negative": np.zeros(4)})
    lab = spec(inplace_relu.figures(result)[0])
    (mask,) = [t for t in lab["data"] if t.get("name") == "overwritten"]
    main = mask_trace(spec(F.inplace_figure(view.layer("bn1"), 3)))
    assert mask["colorscale"] == main["colorscale"]
    assert list(mask["colorbar"]["ticktext"]) == main["colorbar"]["ticktext"]
    # same pixels red on both pages, and the mask does not take part in the value scale
    np.testing.assert_array_equal(arr(mask["z"]).reshape(112, 112).astype(bool),
                                  arr(main["z"]).reshape(112, 112).astype(bool))
    values = [t for t in lab["data"] if t.get("name") != "overwritten"]
    bound = float(np.abs(true[0, 3].numpy()).max())
    assert all(t["zmax"] == pytest.approx(bound) for t in values)
    assert any(t.get("showscale") is not False for t in values)  # their colour bar


# -- 2. feature maps ----------------------------------------------------------------------------


def test_112_pixel_maps_are_kept_and_drawn_whole(resnet224):
    report, view = resnet224
    rep, lv = report.layer("bn1"), view.layer("bn1")
    assert lv.map_input.shape == (64, 112, 112)
    np.testing.assert_array_equal(lv.map_input, rep.input[0].numpy())
    np.testing.assert_array_equal(lv.map_reference, rep.output_reference[0].numpy())
    s = spec(F.feature_map_figure(lv, 5))
    z_in, z_bn, z_act = (arr(t["z"]).reshape(112, 112) for t in heatmaps_of(s))
    np.testing.assert_array_equal(z_in, rep.input[0, 5].numpy())
    np.testing.assert_array_equal(z_bn, rep.output[0, 5].numpy())
    np.testing.assert_array_equal(z_act, rep.activation_output[0, 5].numpy())
    assert "all 112x112 pixels" in s["layout"]["title"]["text"]
    # every pixel travels: 112 x 112 float32 as base64, not as ~20-byte JSON numbers
    assert heatmaps_of(s)[0]["z"]["dtype"] == "f4"


def test_larger_maps_are_block_means_and_the_title_says_so():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 230, 230)
    report = bnviz.inspect(net, x, "train", device="cpu", keep_tensors=True)
    lv = dash.build_view_data(report, random_init=True).layer("1")
    block = math.ceil(230 / MAX_GRID)
    assert map_block(230, 230, 4) == block == 3 and F.map_block(lv) == block
    full = report.layers[0].input[0, 2].double().numpy()
    padded = np.full((77 * 3, 77 * 3), np.nan)  # the last block has 2 of 3 rows and columns
    padded[:230, :230] = full
    expect = np.nanmean(padded.reshape(77, 3, 77, 3), axis=(1, 3))
    assert lv.map_input.shape == (4, 77, 77) and lv.rows.tolist() == list(range(0, 230, 3))
    np.testing.assert_allclose(lv.map_input[2], expect, rtol=1e-5, atol=1e-5)
    s = spec(F.feature_map_figure(lv, 2))
    assert "means of 3x3 blocks of 230x230" in s["layout"]["title"]["text"].replace("<br>", "")
    assert "3x3 block" in heatmaps_of(s)[0]["hovertemplate"]


def test_every_heatmap_has_a_colour_bar(resnet224):
    _, view = resnet224
    lv = view.layer("bn1")
    pre = dash.input_preview(torch.rand(1, 3, 40, 40))
    figs = {
        "maps": F.feature_map_figure(lv, 1),
        "maps shared": F.feature_map_figure(lv, 1, shared_scale=True),
        "gallery": F.channel_gallery_figure(lv, range(8)),
        "inplace": F.inplace_figure(lv, 1),
        "all channels": F.all_channels_figure(lv, 1),
        "input": F.input_figure(pre.z, pre.rows, pre.cols),
    }
    for name, fig in figs.items():
        s = spec(fig)
        go.Figure(fig.to_dict())  # valid plotly
        for t in heatmaps_of(s):
            assert colorbar_of(s, t) is not None, (name, t.get("name"))
    # own scales: one colour bar per panel, each under its panel
    s = spec(figs["maps"])
    axes = [t["coloraxis"] for t in heatmaps_of(s)]
    assert len(set(axes)) == 3
    for t, ax in zip(heatmaps_of(s), axes):
        bar = s["layout"][ax]["colorbar"]
        domain = s["layout"]["xaxis" + t["xaxis"][1:]]["domain"]
        assert bar["orientation"] == "h" and domain[0] <= bar["x"] <= domain[1]


def test_one_shared_scale_across_before_and_after(resnet224):
    _, view = resnet224
    lv = view.layer("bn1")
    own = spec(F.feature_map_figure(lv, 1))
    shared = spec(F.feature_map_figure(lv, 1, shared_scale=True))
    assert {t["coloraxis"] for t in heatmaps_of(shared)} == {"coloraxis"}
    axis = shared["layout"]["coloraxis"]
    vmax = max(np.abs(m[1]).max() for m in (lv.map_input, lv.map_output, lv.map_activation))
    assert (axis["cmin"], axis["cmax"]) == (pytest.approx(-vmax), pytest.approx(vmax))
    assert "one colour scale" in shared["layout"]["title"]["text"]
    assert "own colour scale each" in own["layout"]["title"]["text"]
    for t in heatmaps_of(own):  # each its own range, centred on 0
        assert own["layout"][t["coloraxis"]]["cmid"] == 0 and "cmin" not in own["layout"][
            t["coloraxis"]]


def test_the_shared_scale_travels_in_the_link():
    cfg = dash.DashConfig(shared_scale=True)
    query = dash.config_to_query(cfg)
    assert query["scale"] == "shared"
    assert dash.config_from_query(query)[0].shared_scale is True
    assert "scale" not in dash.config_to_query(dash.DashConfig())
    back, problems = dash.config_from_query({"scale": "huge"})
    assert back.shared_scale is False and "scale=" in problems[0]


def test_a_channel_rerun_stays_well_under_a_megabyte(resnet224):
    """docs/dashboard.md: a rerun must stay well under 1 MB. A channel switch on the
    Feature maps chart redraws the maps, the gallery and the in-place view."""
    _, view = resnet224
    lv = view.layer("bn1")
    sizes = {name: len(pio.to_json(fig, validate=False)) for name, fig in (
        ("maps", F.feature_map_figure(lv, 1)),
        ("gallery", F.channel_gallery_figure(lv, range(8))),
        ("inplace", F.inplace_figure(lv, 1)))}
    assert sizes["maps"] < 300_000, sizes
    assert sum(sizes.values()) < 700_000, sizes


# -- 3. smaller chart defects ---------------------------------------------------------------


PREDS_TRAIN = ((
    (281, "tabby", 0.0123), (285, "Egyptian cat", 0.0101), (282, "tiger cat", 0.0097),
    (288, "leopard", 0.0082), (3, "American Staffordshire terrier", 0.0061)),)
PREDS_EVAL = (((281, "tabby", 0.62), (282, "tiger cat", 0.21), (285, "Egyptian cat", 0.09),
               (287, "lynx", 0.01), (288, "leopard", 0.004)),)


def test_prediction_bars_carry_percentages_and_stay_visible_when_small():
    s = spec(F.predictions_figure(PREDS_TRAIN, PREDS_EVAL, 0))
    cur, ref = s["data"]
    assert cur["text"] == ["0.61%", "0.82%", "0.97%", "1.01%", "1.23%"]
    assert ref["text"][-1] == "62%" and cur["textposition"] == "outside"
    # a 1.23 % best guess fills most of its axis instead of 1 % of a 0-100 % axis
    top = max(arr(cur["x"]))
    assert top / s["layout"]["xaxis"]["range"][1] > 0.7
    assert s["layout"]["xaxis2"]["range"][1] < 1.0
    # long names are cut on the axis but whole in the hover
    assert max(len(n) for n in cur["y"]) <= F.CLASS_NAME_CHARS
    assert "American Staffordshire terrier" in cur["customdata"]
    # stacked, so neither panel's class names run into the other's bars
    lay = s["layout"]
    assert lay["xaxis"]["domain"] == lay["xaxis2"]["domain"] == [0.0, 1.0]
    assert lay["yaxis"]["domain"][0] > lay["yaxis2"]["domain"][1]


def _tick_labels(axis: dict) -> int:
    """Labelled ticks a log axis with an explicit range and dtick shows."""
    lo, hi = axis["range"]
    if axis["dtick"] == "D2":
        return sum(lo <= math.log10(m * 10.0 ** e) <= hi
                   for e in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5))
    return int((hi - lo) // axis["dtick"]) + 1


def test_log_axes_label_few_enough_ticks_to_stay_apart(lite_eval, resnet224):
    for view in (lite_eval, resnet224[1]):
        for layer in (view.layers[0], view.layers[len(view.layers) // 2], view.layers[-1]):
            s = spec(F.channel_stats_figure(layer, 0))
            axis = s["layout"]["yaxis2"]
            assert axis["type"] == "log" and axis["exponentformat"] == "power"
            assert "dtick" in axis and "range" in axis, axis
            assert _tick_labels(axis) <= 160 // 24 + 1, axis
        axis = spec(F.overview_figure(view))["layout"]["yaxis3"]
        assert axis["type"] == "log" and _tick_labels(axis) <= 150 // 24 + 1, axis
    # many decades: whole decades only, every k-th
    wide = F._log_axis(-9.0, 3.0, 160)
    assert isinstance(wide["dtick"], int) and wide["dtick"] >= 2


def test_zero_running_var_is_drawn_at_the_axis_floor(lite_eval):
    lv = lite_eval.layer("_bn0")
    assert np.flatnonzero(lv.running_var_before == 0).tolist() == [11, 16, 28, 31]
    s = spec(F.channel_stats_figure(lv, 0))
    floor = [t for t in s["data"] if t["name"].startswith("running var = 0")]
    assert len(floor) == 1
    t = floor[0]
    # the note: the legend entry names the channels and where they are drawn
    assert t["name"] == ("running var = 0 in channels 11, 16, 28, 31<br>(▽: drawn at the "
                         "axis floor)")
    assert t.get("showlegend") is not False
    assert arr(t["x"]).tolist() == [11, 16, 28, 31]
    lo, hi = s["layout"]["yaxis2"]["range"]
    y = arr(t["y"])
    assert np.all(lo <= np.log10(y)) and np.all(np.log10(y) < np.log10(
        lv.running_var_before[lv.running_var_before > 0].min()))
    assert t["marker"]["symbol"] != "triangle-up"  # not the running var's own symbol
    assert "= 0 exactly" in t["hovertemplate"]


def test_preview_titles_do_not_run_together():
    pre = dash.input_preview(torch.rand(1, 3, 224, 224))
    s = spec(F.input_figure(pre.z, pre.rows, pre.cols))
    titles = [a for a in s["layout"]["annotations"] if a.get("yanchor") == "bottom"]
    assert [a["text"] for a in titles] == ["ch 0", "ch 1", "ch 2"]
    # the sidebar's chart is ~270 px wide: each title fits between its neighbours' centres
    gap_px = (titles[1]["x"] - titles[0]["x"]) * 270
    assert max(len(a["text"]) for a in titles) * 6.6 < gap_px * 0.8


def test_overview_marks_the_selected_layer(lite_eval):
    names = lite_eval.layer_names
    s = spec(F.overview_figure(lite_eval, names[7]))
    marks = [t for t in s["data"] if t["name"] == f"shown below: {names[7]}"]
    index = lite_eval.layer(names[7]).index
    assert len(marks) == 3 and all(t["x"] == [index] for t in marks)
    assert marks[0]["marker"]["color"] == F.HIGHLIGHT
    lines = [sh for sh in s["layout"]["shapes"] if sh["x0"] == index]
    assert {sh["xref"] for sh in lines} == {"x", "x2", "x3"}
    plain = spec(F.overview_figure(lite_eval))
    assert not [t for t in plain["data"] if t["name"].startswith("shown below")]


def test_every_statistics_series_has_its_own_legend_symbol(lite_eval):
    for layer in (lite_eval.layer("_blocks.1._bn0"), lite_eval.layers[-1]):  # markers, lines
        s = spec(F.channel_stats_figure(layer, 0))
        looks = []
        for t in s["data"]:
            if t.get("showlegend") is False or "=" in t["name"]:
                continue
            if t["mode"] == "markers":
                looks.append((t["marker"]["color"], t["marker"]["symbol"]))
            else:
                looks.append((t["line"]["color"], t["line"]["dash"]))
        assert len(looks) == 4 and len(set(looks)) == 4, looks


def test_training_lab_native_curve_stays_visible_under_manual():
    from bnviz.training import TrainConfig, train_lab
    from bnviz.training.figures import OVERLAP_NOTE, fig_loss, fig_train_eval, fig_val_acc

    result = train_lab(TrainConfig(steps=4, batch_size=16, eval_every=2, n_train=64,
                                   n_val=32, device="cpu", variants=("manual", "native"),
                                   momenta=()))
    for fig in (fig_loss(result), fig_val_acc(result), fig_train_eval(result)):
        names = [t.name for t in fig.data]
        native = [t for t in fig.data if t.name.startswith("native")]
        manual = [t for t in fig.data if t.name.startswith("manual")]
        # native is drawn first (under), wide and see-through; manual thin on top
        assert names.index(native[0].name) < names.index(manual[0].name)
        assert native[0].line.width >= 3 * manual[0].line.width
        assert native[0].opacity < 1
        assert fig.layout.legend.title.text == OVERLAP_NOTE


def test_training_lab_variant_chips_get_room():
    source = (Path(__file__).resolve().parents[1] / "pages" / "2_Training_lab.py").read_text()
    assert "c5, c6, c7, c8 = st.columns(4)" not in source
    assert "c5, c6, c7, c8 = st.columns([3, 2, 1.2, 1.2])" in source


# -- phone width --------------------------------------------------------------------------------


def test_titles_and_legends_fit_a_phone(lite_eval, resnet224):
    _, rview = resnet224
    cases = [(lite_eval, lite_eval.layer("_bn0")), (rview, rview.layer("layer1.0.bn1"))]
    for view, layer in cases:
        label = view.weights_label
        figs = {
            "overview": F.overview_figure(view, layer.label),
            "stats": F.channel_stats_figure(layer, 1, label),
            "update": F.running_update_figure(layer, 1, label),
            "maps": F.feature_map_figure(layer, 1, label),
            "gallery": F.channel_gallery_figure(layer, range(8), "input", label),
            "dist": F.distribution_figure(layer, 1, label),
            "allch": F.all_channels_figure(layer, 1, label),
            "manual": F.manual_vs_native_figure(layer, 1, label),
            "preds": F.predictions_figure(PREDS_TRAIN, PREDS_EVAL, 0, label),
        }
        if layer.map_reference is not None:
            figs["inplace"] = F.inplace_figure(layer, 1, label)
        for name, fig in figs.items():
            s = spec(fig)
            lay = s["layout"]
            # titles wrapped to what a 390 px screen shows (15 px font)
            assert all(len(line) <= F.TITLE_CHARS + 8 for line in title_lines(s)), (
                name, title_lines(s))
            # the legend sits below the plot, with room for the rows it needs on a phone
            legend = lay["legend"]
            assert (legend["yref"], legend["y"], legend["yanchor"]) == (
                "container", 0.0, "bottom"), name
            rows = F._legend_rows(s["data"]) if lay.get("showlegend", True) else 0
            if rows:
                assert lay["margin"]["b"] >= 22 * rows + 30, (name, rows, lay["margin"])
            # room above the plot for every title line
            assert lay["margin"]["t"] >= 19 * len(title_lines(s)) + 14, name
            # subplot titles fit their panel on a 350 px chart
            subtitles = [a for a in lay.get("annotations", ())
                         if a.get("yanchor") == "bottom" and a.get("yref") == "paper"]
            for y in {a["y"] for a in subtitles}:
                row = sorted((a for a in subtitles if a["y"] == y), key=lambda a: a["x"])
                for left, right in zip(row, row[1:]):
                    widths = [6.6 * max(map(len, a["text"].split("<br>")))
                              for a in (left, right)]
                    gap_px = (right["x"] - left["x"]) * F.PHONE_WIDTH
                    assert sum(widths) / 2 <= gap_px, (name, left["text"], right["text"])


def test_wrapped_titles_keep_their_phrases():
    text = F.wrap_title(F.titled("_blocks.3._bn1: batch vs running statistics (BN used the "
                                 "batch ones)", F.RANDOM_INIT_LABEL))
    lines = text.split("<br>")
    assert lines[0] == "_blocks.3._bn1: batch vs running statistics "
    assert F.RANDOM_INIT_LABEL in text  # the label is never broken
    # the browser's text content (lines joined) still reads as the sentence
    assert "".join(lines).startswith("_blocks.3._bn1: batch vs running statistics (BN used")


# -- the page ---------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_page_marks_the_layer_and_shares_the_scale_through_the_link():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"size": "64", "batch": "2", "layer": "_blocks.2._bn1",
                            "tab": "feature-maps", "scale": "shared"})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    charts = {json.loads(el.proto.spec)["layout"]["title"]["text"]: json.loads(el.proto.spec)
              for el in at.get("plotly_chart")}

    def chart(part: str) -> dict:
        found = [s for t, s in charts.items() if part in t]
        assert found, (part, list(charts))
        return found[0]

    overview = chart("Network overview")
    assert [t["name"] for t in overview["data"] if t["name"].startswith("shown below")][0] \
        == "shown below: _blocks.2._bn1"
    maps = chart("_blocks.2._bn1, channel 0, image 0")
    assert {t["coloraxis"] for t in heatmaps_of(maps)} == {"coloraxis"}
    box = at.checkbox(key="maps_shared")
    assert box.value is True
    box.uncheck().run()
    assert not at.exception, [e.message for e in at.exception]
    maps = [json.loads(el.proto.spec) for el in at.get("plotly_chart")
            if "channel 0, image 0" in json.loads(el.proto.spec)["layout"]["title"]["text"]][0]
    assert len({t["coloraxis"] for t in heatmaps_of(maps)}) == 3
    assert "scale" not in at.query_params
    box.check().run()
    assert at.query_params["scale"] == ["shared"] or at.query_params["scale"] == "shared"
