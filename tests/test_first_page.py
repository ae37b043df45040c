"""The first page answers the student's question (issue 20, items 3-7 and 9): it opens in
eval and invites a flip to train, names itself in the page list, edits per-layer settings
at full width with what is in effect beside them, survives bad cells, speaks the
dashboard's words, points out the traps in the numbers where they happen, keeps what the
student picked, and links to the Pitfall lab's explain experiment with the same settings.

AppTests at 64 px with batches of 2 (or 4); the callouts' numbers are checked against an
independent native PyTorch forward.
"""

from __future__ import annotations

import copy
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

import bnviz
from bnviz import dashboard as dash
from bnviz.dashboard import callouts, explain_link, texts
from bnviz.dashboard import overrides as per_layer

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
PITFALL_PAGE = str(ROOT / "pages" / "1_Pitfall_lab.py")
TIMEOUT = 180
SMALL = {"size": "64", "batch": "2"}

pytestmark = pytest.mark.timeout(900)


def new_app(**query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({**SMALL, **query})
    return at


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def titles(at: AppTest) -> str:
    import json

    return " ".join(json.loads(el.proto.spec)["layout"]["title"]["text"]
                    for el in at.get("plotly_chart"))


def texts_of(at: AppTest, *kinds: str) -> list[str]:
    return [el.value for kind in kinds for el in getattr(at, kind)]


def edit(at: AppTest, rows: dict) -> AppTest:
    """The table's edits, as the browser sends them (the table's key has a version: closing
    it folds its edits into its starting values)."""
    key = f"overrides_efficientnet_lite0_{at.session_state['ov_version']}"
    at.session_state[key] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
    return run(at)


def overview_stats(at: AppTest) -> list[str]:
    import json

    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        if "Network overview" in spec["layout"]["title"]["text"]:
            return [c[1] for c in spec["data"][0]["customdata"]]
    raise AssertionError("no overview chart")


# -- item 5: the first page answers the question --------------------------------------------


def test_the_first_page_opens_in_eval_and_invites_a_flip_to_train():
    at = run(new_app())
    assert at.radio(key="mode").value == "eval" and at.query_params["mode"] == "eval"
    assert "BN used the running ones" in titles(at)
    assert texts.INTRO in texts_of(at, "markdown")
    assert texts.MODE_INVITATION["eval"] in texts_of(at, "info")
    flip = at.button(key="flip_mode")
    assert flip.label == "Flip to train and see what changes"
    flip.click()
    run(at)
    assert at.radio(key="mode").value == "train" and at.query_params["mode"] == "train"
    assert "BN used the batch ones" in titles(at)
    assert texts.MODE_INVITATION["train"] in texts_of(at, "info")
    assert at.button(key="flip_mode").label == "Back to eval"


def test_the_page_list_names_every_page():
    """With a pages/ folder alone Streamlit names the main page after its file, "app"."""
    at = run(new_app())
    pages = {info["page_name"]: info["url_pathname"] for info in at._registered_pages.values()}
    assert pages == {"BatchNorm microscope": "", "Pitfall lab": "Pitfall_lab",
                     "Training lab": "Training_lab"}


def test_the_running_update_names_the_unbiased_variance():
    at = run(new_app(mode="train", tab="running-update", layer="_blocks.1._bn1"))
    notes = texts_of(at, "info")
    assert any("**unbiased** batch variance" in n and "n/(n - 1)" in n for n in notes), notes
    # n = N x H x W = 2 x 16 x 16 = 512 for this layer at 64 px
    assert any("2 x 16 x 16 = 512" in n and "512/511" in n for n in notes), notes


def test_why_doesnt_my_manual_bn_match_opens_the_explain_experiment():
    at = run(new_app(model="resnet18", weights="random", layer="layer1.0.bn2", ch="3",
                     stim="uniform:value=0.5", comp="copies", mode="train"))
    (link,) = at.get("page_link")
    assert "Why doesn't my manual BN match?" in link.proto.label
    assert link.proto.page == "Pitfall_lab"
    query = dict(re.findall(r"([^&=]+)=([^&]*)", link.proto.query_string))
    assert query["experiment"] == "explain" and query["layer"] == "layer1.0.bn2"
    assert (query["model"], query["weights"], query["mode"], query["channel"]) == (
        "resnet18", "random", "train", "3")
    # the Pitfall lab reads them back: the experiment runs on that layer and configuration
    from urllib.parse import unquote

    lab = AppTest.from_file(PITFALL_PAGE, default_timeout=600)
    lab.query_params.update({k: unquote(v) for k, v in query.items()})
    run(lab)
    assert lab.selectbox(key="pitfall:experiment").value == "explain"
    assert lab.selectbox(key="explain:layer:resnet18").value == "layer1.0.bn2"
    assert lab.selectbox(key="explain:weights").value == "random"
    assert lab.text_input(key="explain:stimulus").value == "uniform:value=0.5"
    assert lab.number_input(key="explain:channel").value == 3
    assert not lab.error and not lab.warning
    verdict = [m.value for m in [*lab.success, *lab.info] if "**Verdict.**" in m.value]
    assert verdict and "layer1.0.bn2" in verdict[0]


def test_explain_link_maps_to_what_the_experiment_offers():
    cfg = dash.DashConfig(size=200, batch_size=32, stimulus="noise",
                          params=dash.make_params("noise", {}), seed=5)

    class Layer:
        name, training, has_running_stats, track_running_stats = "_bn0", True, True, False

    query = explain_link.explain_query(cfg, Layer(), 2)
    assert query["size"] == "224" and query["batch_size"] == "16"
    assert query["mode"] == "train,track=off"
    assert query["stimulus"] == "noise:mean=0.5,std=0.25,seed=5"
    upload = explain_link.explain_query(dash.DashConfig(stimulus="upload", params=()), Layer(), 0)
    assert "stimulus" not in upload  # an upload cannot travel in a link


# -- item 3: the per-layer settings at full width --------------------------------------------


def test_the_settings_table_is_in_the_main_area_with_what_is_in_effect():
    at = new_app()
    at.session_state["ov_open"] = True
    run(at)
    assert at.sidebar.get("data_editor") == []
    (table,) = at.main.get("data_editor")
    assert "Per-layer settings" in [e.label for e in at.main.expander]
    assert table.proto.placeholder == per_layer.KEEP  # a blank momentum reads "keep"
    columns = list(table.value.columns)
    assert columns == [*per_layer.OVERRIDE_COLUMNS, per_layer.IN_EFFECT]
    effect = table.value[per_layer.IN_EFFECT].tolist()
    # efficientnet_lite0's own momentum is 1 - 0.99 = 0.010000000000000009: shown as 0.01
    lite = bnviz.load_model("efficientnet_lite0").module
    assert lite._bn0.momentum != 0.01 and f"{lite._bn0.momentum:.6g}" == "0.01"
    assert effect[0] == "eval,track=on,momentum=0.01"
    edit(at, {0: {"mode": "train", "momentum": "none"}, 1: {"track_running_stats": "none"},
              2: {"momentum": "0.25"}, 3: {"momentum": "0.3"}})
    edit(at, {0: {"mode": "train", "momentum": "none"}, 1: {"track_running_stats": "none"},
              2: {"momentum": "0.25"}, 3: {"momentum": None}})  # cleared: keep again
    (table,) = at.main.get("data_editor")
    effect = table.value[per_layer.IN_EFFECT].tolist()
    assert effect[:4] == ["train,track=on,momentum=none", "eval,track=none (no running statistics)",
                          "eval,track=on,momentum=0.25", "eval,track=on,momentum=0.01"]
    assert at.query_params["ov"] == (
        "_blocks.0._bn1:default,track=none;_blocks.0._bn2:default,momentum=0.25;"
        "_bn0:train,momentum=none")


def test_in_effect_fills_in_the_layers_own_settings():
    own = per_layer.LayerDefaults(momentum=1 - 0.99, track="on")
    row = dash.RowOverride
    assert per_layer.in_effect("eval", None, own) == "eval,track=on,momentum=0.01"
    assert per_layer.in_effect("eval", row("train", "off", ""), own) == \
        "train,track=off,momentum=0.01"
    assert per_layer.in_effect("train", row("default", "keep", "NONE"), own) == \
        "train,track=on,momentum=none"
    assert per_layer.in_effect("train", row(momentum="0.1"), None) == \
        "train,track=keep,momentum=0.1"
    frame = dash.overrides_frame(["a", "b"], {"b": row(momentum="0.2")}, ["x", "y"])
    assert frame["momentum"].tolist() == [None, "0.2"] and frame[per_layer.IN_EFFECT].tolist() \
        == ["x", "y"]
    assert dash.records_to_overrides([{"layer": "a", "mode": "default",
                                       "track_running_stats": "keep", "momentum": "keep"}]) == {}


# -- item 4: bad cells never empty the page --------------------------------------------------


def test_check_overrides_lists_every_bad_cell():
    row = dash.RowOverride
    overrides = {"c": row(momentum="1.5"), "a": row(momentum="abc"), "b": row(mode="sideways"),
                 "d": row(momentum="0.1,track=off"), "e": row(momentum="0.5")}
    problems = per_layer.check_overrides(overrides, ["a", "b", "c", "d", "e"])
    assert [(p.layer, p.column, p.value) for p in problems] == [
        ("a", "momentum", "abc"), ("b", "mode", "sideways"), ("c", "momentum", "1.5"),
        ("d", "momentum", "0.1,track=off")]  # a comma cannot smuggle in another option
    assert "`'abc'`" in problems[0].text() and "`'a'`" in problems[0].text()
    with pytest.raises(bnviz.BnvizError):
        dash.check_row("d", overrides["d"], "train")


def test_bad_cells_are_all_listed_and_the_last_valid_view_stays():
    at = new_app(mode="train")
    at.session_state["ov_open"] = True
    run(at)
    edit(at, {0: {"mode": "eval"}})
    assert at.query_params["ov"] == "_bn0:eval"
    good = overview_stats(at)
    assert good[0] == "running" and set(good[1:]) == {"batch"}
    edit(at, {0: {"mode": "eval"}, 4: {"momentum": "abc"}, 6: {"momentum": "1.5"},
              7: {"mode": "train"}})
    (error,) = [e.value for e in at.error]
    assert "'_blocks.1._bn1'" in error and "`'abc'`" in error
    assert "'_blocks.2._bn0'" in error and "`'1.5'`" in error  # the second bad cell too
    assert "2 cells not valid, ignored" in error
    assert overview_stats(at) == good  # the last valid view, still drawn in full
    assert "Top-5 predictions" in titles(at)
    assert at.query_params["ov"] == "_bn0:eval"  # nothing invalid in the address
    (table,) = at.main.get("data_editor")
    effect = table.value[per_layer.IN_EFFECT].tolist()
    assert effect[4].startswith("⚠ ignored, still train") and effect[6].startswith("⚠")
    assert effect[7] == "train,track=on,momentum=0.01"  # valid, but not used yet
    # closed, the table still says so above the charts
    at.session_state["ov_open"] = False
    run(at)
    assert any("2 cells" in w and "ignored" in w for w in texts_of(at, "warning"))
    assert overview_stats(at) == good
    at.session_state["ov_open"] = True
    run(at)
    edit(at, {4: {"momentum": "0.5"}, 6: {"momentum": ""}})
    assert [e.value for e in at.error] == []
    assert at.query_params["ov"] == (
        "_blocks.1._bn1:default,momentum=0.5;_blocks.2._bn1:train;_bn0:eval")


# -- item 6: the right words -------------------------------------------------------------------


def test_a_layer_without_running_statistics_is_described_as_such():
    at = run(new_app(mode="eval", ov="_bn0:default,track=none", tab="running-update"))
    said = "\n".join(texts_of(at, "markdown"))
    assert "has **no running statistics**" in said
    assert "left its running statistics unchanged" not in said
    assert "track_running_stats=None" not in said
    assert "as if built with track_running_stats=False" in said


def test_momentum_is_written_with_six_significant_digits():
    assert texts.format_momentum(1 - 0.99) == "0.01"
    assert texts.format_momentum(None) == "none"
    at = run(new_app(mode="train"))
    said = "\n".join(texts_of(at, "markdown"))
    assert "(momentum 0.01)" in said and "0.0100000000" not in said


@pytest.fixture
def captured_files(monkeypatch):
    files: dict[str, object] = {}
    add_deferred = MediaFileManager.add_deferred

    def fake_add_deferred(self, fn, mimetype, coordinates, file_name=None, **kw):
        if file_name:
            files[file_name] = fn
        return add_deferred(self, fn, mimetype, coordinates, file_name=file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add_deferred", fake_add_deferred)
    return files


def test_the_csv_says_where_each_mode_came_from(captured_files):
    import io

    import pandas as pd

    at = run(new_app(mode="train", ov="_bn0:eval"))
    assert "(from a per-layer override)" in "\n".join(texts_of(at, "markdown"))  # on _bn0
    made = captured_files["bnviz_efficientnet_lite0_train_image-name-chelsea.csv"]()
    frame = pd.read_csv(io.StringIO(made))
    sources = dict(zip(frame["name"], frame["mode_source"]))
    assert sources["_bn0"] == "per-layer override"
    assert set(sources.values()) == {"per-layer override", "global mode"}
    assert list(sources.values()).count("global mode") == 48


def test_messages_name_the_dashboards_controls():
    device = str(bnviz.errors.DeviceError(
        "CUDA was requested but no CUDA device is available on this machine.",
        "use --device cpu (or auto), or install a CUDA build of PyTorch on a GPU machine."))
    said = texts.dashboard_message(device)
    assert "--device" not in said and "under Device in the sidebar" in said
    weights = ("The pretrained resnet18 weights are not cached. Fix: download it, or use "
               "weights=None (CLI: --weights random) for an explicitly random-initialised "
               "model.")
    said = texts.dashboard_message(weights)
    assert "CLI" not in said and "--" not in said
    assert "tick 'Use random init (not pretrained)' in the sidebar" in said
    assert texts.dashboard_message("Fix: check --layer-mode and --batch-size.") == \
        "Fix: check the Per-layer settings table and Batch size."


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_error_on_the_page_speaks_the_dashboards_words():
    at = run(new_app(device="cuda"))
    shown = [e.value for e in [*at.error, *at.sidebar.error]]
    assert any("CUDA was requested" in e for e in shown)
    assert not any("--device" in e for e in shown)


def test_a_garbage_npy_is_not_called_pickled():
    from bnviz.pitfalls.user_output import load_user_output

    with pytest.raises(bnviz.BnvizError) as err:
        load_user_output(b"this is not an array at all", "mine.npy")
    assert "pickle" not in str(err.value) and "not a readable .npy" in str(err.value)


def test_uniform_different_is_described_as_the_batch_holds_it():
    at = run(new_app(stim="uniform:value=1", comp="different", batch="4"))
    said = "\n".join(texts_of(at, "caption")) + "\n".join(
        c.value for c in at.sidebar.caption)
    assert "uniform, a different level per image (1, 0.75, 0.5, 0.25)" in said
    assert "uniform (value 1)" not in said
    cfg, _ = dash.config_from_query({**SMALL, "stim": "uniform:value=1", "comp": "different",
                                     "batch": "4"})
    x = dash.make_batch(cfg)  # the levels are the batch's own pixels
    np.testing.assert_allclose([float(x[i].mean()) for i in range(4)], [1, 0.75, 0.5, 0.25])


# -- item 7: traps pointed out where they happen ----------------------------------------------


@pytest.fixture(scope="module")
def trap_view():
    """efficientnet_lite0 at 64 px, batch 2, train, _bn0 with momentum=None; and the native
    input of every BN layer, from hooks on a plain copy of the model in train mode."""
    loaded = bnviz.load_model("efficientnet_lite0")
    cfg = dash.DashConfig(size=64, batch_size=2, mode="train")
    x = dash.make_batch(cfg)
    names = loaded.bn_layer_names
    modes = dash.overrides_to_modes("train", {"_bn0": dash.RowOverride(momentum="none")}, names)
    view = dash.compute_view_data(loaded, x, modes, "cpu", random_init=False)
    net = copy.deepcopy(loaded.module).train()
    inputs, bns = {}, dict(net.named_modules())
    for name in names:
        bns[name].register_forward_pre_hook(
            lambda m, a, name=name: inputs.setdefault(name, a[0].detach().clone()))
    before = {n: (bns[n].running_mean.clone(), bns[n].running_var.clone()) for n in names}
    with torch.no_grad():
        net(loaded.preprocess(x))
    return view, inputs, before, bns


def test_momentum_none_on_fresh_weights_replaces_the_statistics(trap_view):
    view, inputs, before, bns = trap_view
    layer = view.layer("_bn0")
    c = 1
    callout = callouts.replaced_statistics(layer, c)
    assert callout is not None and callout.level == "warning"
    unbiased = inputs["_bn0"].var(dim=(0, 2, 3), unbiased=True)[c].item()
    old = before["_bn0"][1][c].item()
    assert bns["_bn0"].num_batches_tracked.item() == 1  # it was 0: factor 1/1
    assert f"(1 - 1) * {old:.6g} + 1 * {unbiased:.6g}" in callout.text
    assert f"**{layer.running_var_after[c]:.6g}**" in callout.text
    np.testing.assert_allclose(layer.running_var_after[c], unbiased, rtol=1e-5)
    # momentum 0.01 elsewhere: no such callout
    assert callouts.replaced_statistics(view.layer("_blocks.0._bn1"), c) is None


def test_zero_variance_channels_are_named(trap_view):
    view, _, before, _ = trap_view
    zeros = callouts.zero_variance_channels(view.layer("_bn0"))
    assert zeros == torch.nonzero(before["_bn0"][1] == 0).flatten().tolist() == [11, 16, 28, 31]
    text = callouts.zero_variance(view.layer("_bn0")).text
    assert "Channels 11, 16, 28, 31 of `_bn0` have running_var 0" in text
    whole = next(name for name, (_, var) in before.items() if bool((var > 0).all()))
    assert callouts.zero_variance_channels(view.layer(whole)) == []
    assert callouts.zero_variance(view.layer(whole)) is None


def test_few_values_per_channel_name_the_factor(trap_view):
    view, inputs, _, _ = trap_view
    last = view.layers[-1]
    n = inputs[last.name][:, 0].numel()
    assert last.count == n == 8
    biased = inputs[last.name].var(dim=(0, 2, 3), unbiased=False)
    unbiased = inputs[last.name].var(dim=(0, 2, 3), unbiased=True)
    factor = callouts.unbiased_factor(n)
    np.testing.assert_allclose((unbiased / biased).numpy(), factor, rtol=1e-4)
    text = callouts.few_values(last).text
    assert "n = N x H x W = 2 x 2 x 2 = 8" in text and "8/7" in text and "1.143" in text
    assert callouts.few_values(view.layer("_bn0")) is None  # 2048 values: no trap


def test_the_largest_shift_is_named_next_to_the_mean(trap_view):
    view, inputs, before, _ = trap_view
    name = "_blocks.2._bn1"
    layer = view.layer(name)
    mean, var = before[name]
    shift = (inputs[name].mean(dim=(0, 2, 3)) - mean) / torch.sqrt(var + layer.eps)
    c, value, average = callouts.largest_shift(layer)
    assert c == int(shift.abs().argmax())
    np.testing.assert_allclose(value, shift[c].item(), rtol=1e-4)
    np.testing.assert_allclose(average, shift.abs().mean().item(), rtol=1e-4)
    text = callouts.shift_outlier(layer, 0).text
    assert f"channel {c}**" in text and f"{average:.3g}" in text


def test_the_callouts_show_on_the_page():
    at = run(new_app())  # eval, _bn0, statistics
    notes = texts_of(at, "info")  # callouts: notes about the numbers, not page warnings
    assert not at.warning
    assert any("Channels 11, 16, 28, 31 of `_bn0` have running_var 0" in w for w in notes)
    assert any("**Largest shift: channel" in i for i in texts_of(at, "info"))
    at = run(new_app(mode="train", ov="_bn0:default,momentum=none", tab="running-update"))
    assert any("One forward replaces the stored statistics" in w
               for w in texts_of(at, "info"))
    at.selectbox(key="layer").set_value("_bn1")
    run(at)
    assert any("Only n = N x H x W = 2 x 2 x 2 = 8 values per channel" in w
               for w in texts_of(at, "info"))


# -- item 9: what the student picked is kept, and only that -----------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    opened: list = []

    def no_network(*args, **kwargs):
        opened.append(args)
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(bnviz.models, "_urlopen", no_network)
    return opened


def test_missing_weights_keep_the_chart_and_random_init_is_per_model(offline):
    at = run(new_app(tab="manual-vs-native", layer="_blocks.1._bn1", ch="3"))
    at.selectbox(key="model").set_value("resnet18")
    run(at)
    assert any("pretrained resnet18 weights" in e.value for e in at.error)
    at.checkbox(key="random_init").check()
    run(at)
    assert at.session_state["layer_tab"] == "Manual vs native"
    assert at.query_params["tab"] == "manual-vs-native"
    at.selectbox(key="model").set_value("efficientnet_lite0")  # bundled weights
    run(at)
    assert at.checkbox(key="random_init").value is False
    assert at.query_params["weights"] == "pretrained" and not at.error
    at.selectbox(key="model").set_value("resnet18")  # as it was left: random init
    run(at)
    assert at.checkbox(key="random_init").value is True and not at.error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_error_keeps_the_layer_channel_and_chart():
    at = run(new_app(layer="_blocks.1._bn1", ch="3", tab="distributions"))
    at.radio(key="device").set_value("cuda")
    run(at)
    assert at.error and not at.get("plotly_chart")
    at.radio(key="device").set_value("auto")
    run(at)
    assert at.selectbox(key="layer").value == "_blocks.1._bn1"
    assert at.number_input(key="channel").value == 3
    assert at.session_state["layer_tab"] == "Distributions"
    q = at.query_params
    assert (q["layer"], q["ch"], q["tab"]) == ("_blocks.1._bn1", "3", "distributions")


def test_the_predictions_image_is_in_the_address():
    at = run(new_app())
    assert "img" not in at.query_params
    at.selectbox(key="pred_image").set_value(1)
    run(at)
    assert at.query_params["img"] == "1"
    again = run(new_app(img="1"))
    assert again.selectbox(key="pred_image").value == 1
    assert "Top-5 predictions for image 1" in titles(again)
    beyond = run(new_app(img="9"))  # more than the batch holds: image 0, quietly fixed
    assert beyond.selectbox(key="pred_image").value == 0 and "img" not in beyond.query_params


def test_alexnet_says_it_has_no_batchnorm_before_asking_for_weights(offline):
    at = run(new_app(model="alexnet"))  # pretrained, not cached, offline
    assert any("no BatchNorm layers" in w.value for w in at.warning)
    assert not at.error and not at.sidebar.error and offline == []
    assert not at.get("plotly_chart")


def test_the_pitfall_lab_keeps_experiment_and_settings_in_the_address():
    lab = AppTest.from_file(PITFALL_PAGE, default_timeout=600)
    lab.query_params["experiment"] = "fold"
    lab.session_state["explain:size"] = 64
    run(lab)
    assert lab.query_params["experiment"] == "fold"
    lab.selectbox(key="pitfall:experiment").set_value("explain")
    run(lab)
    assert lab.query_params["experiment"] == "explain"
    assert lab.query_params["size"] == "64" and lab.query_params["model"] == "efficientnet_lite0"
    lab.selectbox(key="explain:mode").set_value("eval")
    run(lab)
    assert lab.query_params["mode"] == "eval"
    address = dict(lab.query_params)
    again = AppTest.from_file(PITFALL_PAGE, default_timeout=600)
    again.query_params.update(address)
    run(again)
    assert again.selectbox(key="explain:mode").value == "eval"
    assert again.select_slider(key="explain:size").value == 64
    assert dict(again.query_params) == address
    bad = AppTest.from_file(PITFALL_PAGE, default_timeout=600)
    bad.query_params.update({**address, "mode": "[x](http://evil.example)", "size": "65"})
    run(bad)
    said = [w.value for w in bad.warning]
    assert any("mode=`'[x](http://evil.example)'`" in w for w in said), said
    assert any("size=`'65'`" in w for w in said), said
    assert bad.selectbox(key="explain:mode").value == "train"  # the default
    assert bad.query_params["mode"] == "train"


# -- in a real browser: the page list, the table's width, the explain link --------------------


@pytest.mark.browser
@pytest.mark.slow
def test_first_page_in_a_browser():
    """Chromium at 1400x1000 against ``streamlit run app.py``: the page list names the
    main page, the settings table spans the main area, and "Why doesn't my manual BN
    match?" opens the Pitfall lab's explain experiment with the layer and settings, whose
    address then follows the experiment picked."""
    from tests import browser_support as bs

    reason = bs.chromium_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    timeout_ms = 120_000
    with bs.running_server(timeout=120) as server, bs.chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(timeout_ms)
        nav = page.locator('[data-testid="stSidebarNav"]')
        # First on this fresh server: a link to a lab (ui/navigation.py) -- named pages too,
        # and the link's experiment kept.
        page.goto(f"{server.url}/Pitfall_lab?experiment=track-stats")
        nav.get_by_text("BatchNorm microscope", exact=True).wait_for(timeout=timeout_ms)
        page.get_by_text("Verdict.", exact=False).first.wait_for(timeout=timeout_ms)
        bs.wait_idle(page, timeout_ms)
        assert "experiment=track-stats" in page.url
        assert nav.get_by_text("app", exact=True).count() == 0
        # (opened on a page's path, the frontend first probes it as a base path: two 404s
        # in the console, see tests/test_pitfalls_browser.py; the console is read from here)
        log = bs.ConsoleLog(page)
        page.goto(f"{server.url}/?size=64&batch=2&layer=_blocks.1._bn1&ch=2")
        bs.wait_charts(page, 4, timeout_ms)
        bs.wait_idle(page, timeout_ms)
        assert nav.get_by_text("BatchNorm microscope", exact=True).count() == 1
        assert nav.get_by_text("Pitfall lab", exact=True).count() == 1
        assert nav.get_by_text("app", exact=True).count() == 0
        assert page.get_by_role("button", name="Flip to train and see what changes").count() == 1
        page.locator('[data-testid="stMainBlockContainer"]').get_by_text(
            "Per-layer settings", exact=True).click()
        grid = page.locator('[data-testid="stDataFrame"]').first
        grid.wait_for(timeout=timeout_ms)
        bs.wait_idle(page, timeout_ms)
        sidebar = page.locator('[data-testid="stSidebar"]').bounding_box()
        box = grid.bounding_box()
        assert box["x"] > sidebar["x"] + sidebar["width"] and box["width"] > 800, box
        bs.ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(bs.ARTIFACTS / "first-page-settings.png"))
        page.get_by_text("Why doesn't my manual BN match?", exact=False).first.click()
        page.wait_for_url("**/Pitfall_lab?**", timeout=timeout_ms)
        page.get_by_text("Verdict.", exact=False).first.wait_for(timeout=timeout_ms)
        bs.wait_idle(page, timeout_ms)
        url = page.url
        for part in ("experiment=explain", "layer=_blocks.1._bn1", "mode=eval", "size=64",
                     "channel=2", "batch_size=2"):
            assert part in url, (part, url)
        assert page.locator(bs.EXCEPTION).count() == 0
        from bnviz.pitfalls import REGISTRY

        bs.select_option(page, "Experiment",
                         f"2. {REGISTRY['inplace-relu'].title}  (inplace-relu)")
        page.wait_for_url("**experiment=inplace-relu**", timeout=timeout_ms)
        bs.wait_idle(page, timeout_ms)
        assert "layer=_blocks" not in page.url  # the new experiment starts from its defaults
        assert log.real_errors() == [], log.real_errors()
        assert "Traceback" not in server.log()
