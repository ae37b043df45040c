"""Pitfall lab experiments 1-4 (explain, inplace-relu, partial-forward, track-stats) and the
``bnviz pitfalls`` CLI, checked against native PyTorch computed independently here.

Small images (64 px) and batches of 2 keep the whole file fast on a laptop CPU; the effects
do not depend on the image size.
"""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bnviz
from bnviz.errors import BnvizError, LayerError
from bnviz.pitfalls import EXPERIMENTS
from bnviz.pitfalls.explain import run as explain
from bnviz.pitfalls.formulas import CANDIDATES
from bnviz.pitfalls.inplace_relu import run as inplace_relu
from bnviz.pitfalls.partial_forward import METHODS
from bnviz.pitfalls.partial_forward import run as partial_forward
from bnviz.pitfalls.track_stats import run as track_stats
from bnviz.pitfalls.user_output import load_user_output

SIZE = 64
KW = {"size": SIZE, "batch_size": 2}


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_untouched(module, state, training) -> None:
    after = module.state_dict()
    assert state.keys() == after.keys()
    for k, v in state.items():
        assert torch.equal(v, after[k]), k
    assert [m.training for m in module.modules()] == training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def _layer_input(loaded, layer: str, raw: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    """The BN layer's real input, captured by our own hook on our own copy (eval)."""
    module = copy.deepcopy(loaded.module).eval()
    bn = module.get_submodule(layer)
    box = {}
    def keep(mod, args):  # no return value: a returned value would replace the input
        box["x"] = args[0].clone()

    handle = bn.register_forward_pre_hook(keep)
    with torch.no_grad():
        module(loaded.preprocess(raw))
    handle.remove()
    return box["x"], bn


def _rel(a, ref) -> float:
    a, ref = torch.as_tensor(a).double(), torch.as_tensor(ref).double()
    return float((a - ref).abs().max() / ref.abs().max())


def _formulas(x: torch.Tensor, bn: torch.nn.Module, stats: str) -> dict[str, torch.Tensor]:
    """Every candidate written out independently of bnviz (float64)."""
    x = x.double()
    w = bn.weight.detach().double().view(1, -1, 1, 1)
    b = bn.bias.detach().double().view(1, -1, 1, 1)
    eps = bn.eps
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    var_u = x.var(dim=(0, 2, 3), unbiased=True, keepdim=True)
    rm = bn.running_mean.double().view(1, -1, 1, 1)
    rv = bn.running_var.double().view(1, -1, 1, 1)
    um, uv = (mean, var) if stats == "batch" else (rm, rv)
    sm = x.mean(dim=(2, 3), keepdim=True)
    sv = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    return {
        "batch": (x - mean) / torch.sqrt(var + eps) * w + b,
        "running": (x - rm) / torch.sqrt(rv + eps) * w + b,
        "batch_unbiased": (x - mean) / torch.sqrt(var_u + eps) * w + b,
        "no_affine": (x - um) / torch.sqrt(uv + eps),
        "eps_outside": (x - um) / (torch.sqrt(uv) + eps) * w + b,
        "per_sample": (x - sm) / torch.sqrt(sv + eps) * w + b,
    }


# --------------------------------------------------------------------------------------------
# 1. explain
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, correct", [("train", "batch"), ("eval", "running")])
def test_explain_only_the_correct_formula_matches(lite, device, mode, correct):
    state, training = _state(lite.module), [m.training for m in lite.module.modules()]
    r = explain(lite, mode=mode, device=device, **KW)
    _assert_untouched(lite.module, state, training)

    rows = {row["key"]: row for row in r.table}
    assert [row["key"] for row in r.table] == [c.key for c in CANDIDATES]
    assert r.data["stats_used"] == ("batch" if mode == "train" else "running")
    assert rows[correct]["matches"] and rows[correct]["correct_for_mode"]
    assert rows[correct]["max_rel_err"] < 1e-5
    assert [k for k, row in rows.items() if row["matches"]] == [correct]
    for key, row in rows.items():
        if key != correct:
            assert row["max_rel_err"] > 1e-5, key  # each mistake is visible on this input
    assert r.reproduced
    assert f"Only '{rows[correct]['candidate']}' matches" in r.verdict
    assert r.device.startswith(device)

    # Independent native output: F.batch_norm on the real input captured by our own hook.
    raw = bnviz.make_stimulus("uniform", SIZE, 2, composition="different")
    x, bn = _layer_input(lite, "_bn0", raw)
    with torch.no_grad():
        native = F.batch_norm(x, bn.running_mean.clone(), bn.running_var.clone(), bn.weight,
                              bn.bias, training=mode == "train", momentum=0.0, eps=bn.eps)
    row = SIZE // 4  # _bn0 has stride 2: the map is SIZE/2 high, the curve is its middle row
    assert np.allclose(r.arrays["native_curve"], native[0, 0, row].double().numpy(),
                       rtol=0, atol=1e-5 * float(native.abs().max()))
    assert r.data["native_first_value"] == pytest.approx(float(native[0, 0, 0, 0]), rel=1e-5)
    formulas = _formulas(x, bn, r.data["stats_used"])
    for key, f in formulas.items():
        assert rows[key]["max_rel_err"] == pytest.approx(_rel(f, native), rel=1e-3, abs=1e-7), key


def test_explain_layer_without_running_stats_uses_batch_statistics(lite):
    r = explain(lite, mode="eval,track=none", **KW)
    rows = {row["key"]: row for row in r.table}
    assert r.data["stats_used"] == "batch"
    assert rows["batch"]["matches"] and rows["batch"]["correct_for_mode"]
    assert rows["running"]["max_rel_err"] is None and not rows["running"]["matches"]
    assert [k for k, row in rows.items() if row["matches"]] == ["batch"]


@pytest.mark.parametrize("wrong", ["running", "batch_unbiased", "no_affine", "eps_outside",
                                   "per_sample"])
def test_explain_attributes_a_wrong_user_output(lite, wrong):
    raw = bnviz.make_stimulus("uniform", SIZE, 2, composition="different")
    x, bn = _layer_input(lite, "_bn0", raw)
    mine = _formulas(x, bn, "batch")[wrong].float().numpy()  # the user's float32 result
    r = explain(lite, mode="train", user_output=mine, **KW)
    assert r.data["user"]["explained_by"] == [wrong]
    assert r.data["user"]["covers"] == "the whole batch"
    label = next(row["candidate"] for row in r.table if row["key"] == wrong)
    assert f"is explained by '{label}'" in r.verdict


def test_explain_user_output_parts_and_files(lite, tmp_path):
    raw = bnviz.make_stimulus("uniform", SIZE, 2, composition="different")
    x, bn = _layer_input(lite, "_bn0", raw)
    f = _formulas(x, bn, "batch")
    # One channel map of image 0, saved as CSV with a header line, read from a path.
    path = tmp_path / "mine.csv"
    channel_map = f["running"][0, 3].numpy()
    with open(path, "w") as fh:
        fh.write(",".join(f"c{i}" for i in range(channel_map.shape[1])) + "\n")
        np.savetxt(fh, channel_map, delimiter=",", fmt="%.9g")
    r = explain(lite, channel=3, user_output=str(path), **KW)
    assert r.data["user"]["covers"] == "image 0, channel 3"
    assert r.data["user"]["explained_by"] == ["running"]
    assert "user_curve" in r.arrays
    # One image, as .npy bytes; the correct formula "matches the layer".
    buf = io.BytesIO()
    np.save(buf, f["batch"][1].float().numpy())
    arr = load_user_output(buf.getvalue(), "mine.npy")
    r = explain(lite, user_output=arr, user_image=1, **KW)
    assert r.data["user"]["explained_by"][0] == "batch"
    assert "matches the layer" in r.data["user"]["verdict"]


def test_explain_bad_user_output_and_layer(lite):
    with pytest.raises(BnvizError, match="fits no part"):
        explain(lite, user_output=np.zeros(7), **KW)
    with pytest.raises(BnvizError, match="NaN"):
        explain(lite, user_output=np.full((2, 32, 32, 32), np.nan), **KW)
    with pytest.raises(LayerError, match="_bn0"):
        explain(lite, layer="_bn_zero", **KW)
    with pytest.raises(BnvizError, match="Unsupported file type"):
        load_user_output(b"1,2,3", "mine.xlsx")
    with pytest.raises(BnvizError, match="not a table of numbers"):
        load_user_output(b"a,b\nc,d\n", "mine.csv")
    with pytest.raises(BnvizError, match="not a readable .npy"):
        load_user_output(b"garbage", "mine.npy")
    assert load_user_output(b"x,y\n1,2\n3,4\n", "m.csv").tolist() == [[1, 2], [3, 4]]


# --------------------------------------------------------------------------------------------
# 2. inplace-relu
# --------------------------------------------------------------------------------------------


def _true_bn_output(loaded, layer, raw, device="cpu"):
    """Our own hook with .clone(): the BN output before anything else touches it (run on
    the pitfall's device, whose kernels need not match the CPU's bit for bit)."""
    module = copy.deepcopy(loaded.module).eval().to(device)
    box = {}
    def keep(mod, args, out):  # no return value: a returned value would replace the output
        box["y"] = out.detach().cpu().clone()

    h = module.get_submodule(layer).register_forward_hook(keep)
    with torch.no_grad():
        module(loaded.preprocess(raw.to(device)))
    h.remove()
    return box["y"]


@pytest.fixture(scope="module")
def resnet18():
    return bnviz.load_model("resnet18", weights=None)  # offline-safe; effect is weight-free


def test_inplace_relu_resnet18(resnet18, device):
    state, training = _state(resnet18.module), [m.training for m in resnet18.module.modules()]
    r = inplace_relu(resnet18, device=device, **KW)
    _assert_untouched(resnet18.module, state, training)
    raw = bnviz.make_stimulus("image", SIZE, 2, name="chelsea", composition="different")
    true = _true_bn_output(resnet18, "bn1", raw, device)
    negative = float((true < 0).double().mean())
    assert 0.05 < negative < 0.95
    assert r.data["overwritten_fraction"] == pytest.approx(negative, abs=1e-12)
    assert r.data["reference_equals_relu_of_true_output"]
    assert r.data["next_module"] == "relu" and r.data["next_module_is_activation"]
    ref, clone, pre = r.table[0], r.table[1], r.table[2]
    assert not ref["equals_true_output"] and ref["min_value"] == 0.0
    assert clone["equals_true_output"] and clone["min_value"] == pytest.approx(
        float(true.min()))
    assert pre["available"] and pre["equals_true_output"]
    c = r.data["channel"]
    assert np.array_equal(r.arrays["true_map"], true[0, c].double().numpy())
    assert np.array_equal(r.arrays["reference_map"], torch.relu(true[0, c]).double().numpy())
    assert r.reproduced and f"{negative:.1%}" in r.verdict


def test_inplace_relu_googlenet_functional_relu():
    g = bnviz.load_model("googlenet", weights=None, arch_kwargs={"transform_input": True})
    r = inplace_relu(g, **KW)
    raw = bnviz.make_stimulus("image", SIZE, 2, name="chelsea", composition="different")
    true = _true_bn_output(g, "conv1.bn", raw)
    assert r.data["layer"] == "conv1.bn"
    assert r.data["overwritten_fraction"] == pytest.approx(float((true < 0).double().mean()))
    assert r.data["reference_equals_relu_of_true_output"]
    # F.relu(x, inplace=True): no activation module to pre-hook; the next module is too late.
    assert not r.data["next_module_is_activation"] and r.data["next_module"] == "maxpool1"
    by_method = {row["method"]: row for row in r.table}
    assert not by_method["forward pre-hook on the following activation module"]["available"]
    late = next(row for m, row in by_method.items() if m.startswith("forward pre-hook on the next"))
    assert not late["equals_true_output"]
    assert by_method["forward hook with output.clone()"]["equals_true_output"]
    assert r.reproduced and "called as a function" in r.verdict


def test_inplace_relu_not_in_place_is_not_reported(lite):
    r = inplace_relu(lite, **KW)  # EfficientNet-Lite: ReLU6 is not in place
    assert r.data["overwritten_fraction"] == 0.0
    assert r.table[0]["equals_true_output"]
    assert not r.reproduced and "0 values changed" in r.verdict


# --------------------------------------------------------------------------------------------
# 3. partial-forward
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def googlenet():
    return bnviz.load_model("googlenet", weights=None, arch_kwargs={"transform_input": True})


def _case_rows(result, case_prefix):
    rows = [r for r in result.table if r["case"].startswith(case_prefix)]
    return {key: next(r for r in rows if r["method"] == m) for key, m in METHODS.items()}


def test_partial_forward_googlenet_sequential_skips_transform_input(googlenet, device):
    state, training = _state(googlenet.module), [m.training for m in googlenet.module.modules()]
    r = partial_forward(googlenet, repeats=1, device=device, **KW)
    _assert_untouched(googlenet.module, state, training)
    assert googlenet.module.transform_input  # the caller's flag was never flipped

    main = _case_rows(r, "googlenet, transform_input=True")
    for key in "cd":
        assert main[key]["status"] == "ok" and main[key]["max_rel_diff"] <= 1e-6
    assert main["b"]["status"] == "ok" and not main["b"]["agrees_with_a"]
    assert main["b"]["max_rel_diff"] > 1e-2

    # Independently: the first conv on the transformed vs the raw model input.
    raw = bnviz.make_stimulus("image", SIZE, 2, name="chelsea", composition="different")
    x = googlenet.preprocess(raw)
    conv = googlenet.module.conv1.conv
    with torch.no_grad():
        real = conv(googlenet.module._transform_input(x))
        skipped = conv(x)
    assert main["a"]["first_value"] == pytest.approx(float(real.flatten()[0]), rel=1e-5)
    assert main["b"]["first_value"] == pytest.approx(float(skipped.flatten()[0]), rel=1e-5)
    assert main["b"]["max_abs_diff"] == pytest.approx(float((real - skipped).abs().max()),
                                                      rel=1e-5)

    control = _case_rows(r, "googlenet, transform_input=False")
    assert all(control[k]["agrees_with_a"] for k in "bcd")
    flat = _case_rows(r, "resnet18")
    assert flat["b"]["status"].startswith("error") and not flat["b"]["agrees_with_a"]
    assert flat["c"]["agrees_with_a"] and flat["d"]["agrees_with_a"]
    diags = {c["case"].split(" (")[0]: c["diagnosis"] for c in r.data["cases"]}
    assert diags["googlenet, transform_input=True"]["cause"] == "transform_input"
    assert diags["googlenet, transform_input=True"]["explained"]
    assert diags["googlenet, transform_input=False"] == {}
    assert diags["resnet18"]["cause"] == "flatten" and diags["resnet18"]["explained"]
    assert diags["resnet18"]["full_input_shape"] == [2, 512]
    assert r.reproduced
    assert "transform_input=True" in r.verdict and "Early exit" in r.verdict
    assert main["d"]["time_ms"] < main["a"]["time_ms"]  # early exit stops after conv1


def test_partial_forward_agrees_without_transform_input(googlenet):
    r = partial_forward(googlenet, transform_input=False, compare_transform=False,
                        flatten_case=False, layer="inception3a", repeats=1, **KW)
    rows = _case_rows(r, "googlenet, transform_input=False")
    assert all(rows[k]["agrees_with_a"] for k in "bcd")
    assert [c["case"] for c in r.data["cases"]] == ["googlenet, transform_input=False"]
    with pytest.raises(LayerError, match="no module"):
        partial_forward(googlenet, layer="conv99", flatten_case=False, repeats=1, **KW)


# --------------------------------------------------------------------------------------------
# 4. track-stats
# --------------------------------------------------------------------------------------------


def test_track_stats_rows_match_pytorch(lite, device):
    state, training = _state(lite.module), [m.training for m in lite.module.modules()]
    r = track_stats(lite, device=device, **KW)
    _assert_untouched(lite.module, state, training)
    raw = bnviz.make_stimulus("image", SIZE, 2, name="chelsea", composition="different")
    x, bn = _layer_input(lite, "_bn0", raw)

    def variant(key):
        if key == "default":
            return copy.deepcopy(bn)
        if key == "flag_off":
            layer = copy.deepcopy(bn)
            layer.track_running_stats = False
            return layer
        layer = torch.nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum,
                                     track_running_stats=False)
        layer.load_state_dict({"weight": bn.weight, "bias": bn.bias})
        return layer

    with torch.no_grad():
        by_batch = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        by_running = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                  False, 0.0, bn.eps)
    assert _rel(by_batch, by_running) > 1e-3  # the two statistics are distinguishable here
    assert len(r.table) == 6
    for row in r.table:
        layer = variant(row["key"]).train(row["mode"] == "train")
        before = None if layer.running_mean is None else layer.running_mean.clone()
        with torch.no_grad():
            y = layer(x)
        expected = "batch" if torch.allclose(y, by_batch, rtol=0, atol=1e-5) else (
            "running" if torch.allclose(y, by_running, rtol=0, atol=1e-5) else "neither")
        assert row["stats_used"] == expected, row
        assert row["has_buffers"] == (before is not None)
        changed = before is not None and not torch.equal(before, layer.running_mean)
        assert row["buffers_changed"] == changed, row
        assert row["prediction_ok"]
    cell = {(row["key"], row["mode"]): row for row in r.table}
    assert cell[("built_without", "eval")]["stats_used"] == "batch"
    assert cell[("flag_off", "eval")]["stats_used"] == "running"
    assert not cell[("flag_off", "train")]["buffers_changed"]
    assert cell[("default", "train")]["buffers_changed"]
    assert cell[("default", "train")]["num_batches_tracked"].endswith(
        str(int(bn.num_batches_tracked) + 1))
    assert r.reproduced and "no running buffers" in r.verdict


# --------------------------------------------------------------------------------------------
# The figures, the JSON and the CLI
# --------------------------------------------------------------------------------------------


def test_figures_and_json_are_built_from_results(lite):
    from bnviz.pitfalls import load_all

    experiments = load_all()
    r = explain(lite, **KW)
    figs = experiments["explain"].figures(r)
    bars = figs[0].data[0]
    assert list(bars.x) == [row["candidate"] for row in r.table]
    assert bars.y[0] == pytest.approx(r.table[0]["max_rel_err"])
    payload = json.loads(r.to_json())
    assert payload["name"] == "explain" and payload["verdict"] == r.verdict
    assert len(payload["table"]) == len(CANDIDATES)
    r = track_stats(lite, **KW)
    grid = experiments["track-stats"].figures(r)[0].data[0]
    assert "batch statistics<br>no buffers" in np.asarray(grid.text).ravel().tolist()


def test_cli_has_every_experiment_and_rejects_unknown_names(capsys):
    from bnviz.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")
    pitfalls = sub.choices["pitfalls"]
    names = list(next(a for a in pitfalls._subparsers._group_actions).choices)
    assert names == list(EXPERIMENTS)
    assert main(["pitfalls"]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["pitfalls", "no-such-thing"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err
    assert main(["pitfalls", "explain", "--model", "resnet1800"]) == 2
    assert "Unknown model" in capsys.readouterr().err


def test_cli_text_and_json(capsys, tmp_path):
    from bnviz.cli import main

    assert main(["pitfalls", "track-stats", "--size", str(SIZE)]) == 0
    out = capsys.readouterr().out
    assert "built with track_running_stats=False" in out and "verdict:" in out
    assert main(["pitfalls", "explain", "--size", str(SIZE), "--mode", "eval", "--json",
                 "-"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["name"] == "explain"
    assert payload["data"]["matching_candidates"] == ["running"]
    target = tmp_path / "relu.json"
    assert main(["pitfalls", "inplace-relu", "--size", str(SIZE), "--weights", "random",
                 "--json", str(target)]) == 0
    saved = json.loads(target.read_text())
    assert saved["weights"] == "random init" and saved["reproduced"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_experiments_on_cuda(lite):
    r = explain(lite, device="cuda", **KW)
    assert r.device.startswith("cuda") and r.reproduced
    r = track_stats(lite, device="cuda", **KW)
    assert r.device.startswith("cuda") and r.reproduced
    r = partial_forward("googlenet", weights="random", device="cuda", repeats=1, **KW)
    assert r.device.startswith("cuda") and r.reproduced
