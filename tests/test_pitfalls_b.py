"""Pitfall experiments 5-8 (mode guard, conv-BN folding, detached statistics, freezing BN).

Every verdict is checked against native PyTorch computed here independently: the mode guard
really restores flags that a round trip loses, folded eval outputs agree and train-mode ones
do not, detached gradients match the analytic formula and differ from native BN's, and the
freeze table matches a direct optimizer step.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnviz import cli
from bnviz.errors import BnvizError, LayerError
from bnviz.modes import bn_layers
from bnviz.pitfalls import REGISTRY, common, load_all
from bnviz.pitfalls import detach as detach_mod
from bnviz.pitfalls import fold as fold_mod
from bnviz.pitfalls import freeze as freeze_mod
from bnviz.pitfalls import mode_guard as mg
from bnviz.stimuli import make_stimulus

SMALL = {"size": 64}
NAMES = ("mode-guard", "fold", "detach", "freeze")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def photo_input(lite, batch_size=2, size=64):
    raw = make_stimulus("image", size=size, batch_size=batch_size, composition="jitter",
                        name="chelsea")
    return lite.preprocess(raw)


def module_state(module: nn.Module) -> tuple[dict, list]:
    return ({k: v.clone() for k, v in module.state_dict().items()},
            [m.training for m in module.modules()])


# One run per experiment, shared by the tests of this module (the machine is small).


@pytest.fixture(scope="module")
def guard_result(lite):
    return mg.run(model=lite, layers=["_bn0", "_blocks.1._bn0"], method="round-trip",
                  batch_size=2, **SMALL)


@pytest.fixture(scope="module")
def fold_result(lite):
    return fold_mod.run(model=lite, batch_size=2, **SMALL)


@pytest.fixture(scope="module")
def detach_results(lite):
    return {loss: detach_mod.run(model=lite, loss=loss, batch_size=2, **SMALL)
            for loss in ("network", "random")}


@pytest.fixture(scope="module")
def freeze_result(lite):
    before = module_state(lite.module)
    result = freeze_mod.run(model=lite, batch_size=2, **SMALL)
    return result, before, module_state(lite.module)


# --------------------------------------------------------------------------------------------
# 5. Mode audit and guard
# --------------------------------------------------------------------------------------------


def test_audit_lists_exactly_the_differing_layers(lite):
    net = copy.deepcopy(lite.module)
    net.train()
    assert mg.audit_modes(net) == []
    frozen = ["_bn0", "_blocks.3._bn1", "_bn1"]
    for name in frozen:
        net.get_submodule(name).eval()
    rows = mg.audit_modes(net)
    assert [r.layer for r in rows] == frozen
    assert all(r.layer_training is False and r.model_training is True for r in rows)
    assert rows[0]._asdict() == {"layer": "_bn0", "layer_training": False,
                                 "model_training": True}
    net.eval()  # recursive: every layer follows again
    assert mg.audit_modes(net) == []
    net.get_submodule("_blocks.0._bn2").train()
    assert mg.audit_modes(net) == [mg.ModeRow("_blocks.0._bn2", True, False)]


def test_round_trip_loses_modes_and_guard_restores_them(lite):
    net = copy.deepcopy(lite.module).train()
    net._bn0.eval()
    net._blocks[0]._bn1.eval()
    mg.round_trip(net)  # net.train(net.training): the premise of the story
    assert net._bn0.training and net._blocks[0]._bn1.training

    net = copy.deepcopy(lite.module).train()
    net._bn0.eval()
    net._blocks[0]._bn1.eval()
    before = [m.training for m in net.modules()]
    with mg.preserve_modes(net) as snapshot:
        mg.round_trip(net)
        assert net._bn0.training  # lost inside the block...
    assert [m.training for m in net.modules()] == before  # ...and restored on exit
    assert snapshot["_bn0"] is False and snapshot[""] is True


def test_guard_restores_on_exception(lite):
    net = copy.deepcopy(lite.module).train()
    net._bn0.eval()
    with pytest.raises(RuntimeError, match="boom"), mg.preserve_modes(net):
        net.eval()
        raise RuntimeError("boom")
    assert net.training and not net._bn0.training
    assert [r.layer for r in mg.audit_modes(net)] == ["_bn0"]


def test_onnx_export_attempt_is_reported_and_spy_removed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    net[1].eval()
    attempt = mg.try_onnx_export(net, torch.randn(2, 3, 8, 8))
    assert "train" not in net.__dict__  # the spy is gone
    assert attempt.completed and attempt.error is None and attempt.onnx_bytes
    # The legacy exporter switches to eval and back to the *top-level* flag: if it made the
    # calls, the BN layer's own eval mode is lost; if it made none, the mode is untouched.
    assert attempt.flags_changed == (["1"] if net[1].training else [])
    if attempt.train_calls:
        assert attempt.train_calls[-1] is True and net[1].training
    else:
        assert not net[1].training


def _small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    with torch.no_grad():  # running statistics far from this batch's
        for i in (1, 4):
            net[i].running_mean.uniform_(-1, 1)
            net[i].running_var.uniform_(0.5, 2)
    net.train()
    net[1].eval()
    return net, torch.randn(2, 3, 10, 10)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_export_runs_and_onnxruntime_matches_pytorch(dynamo):
    import onnx
    import onnxruntime

    from bnviz.pitfalls import onnx_export

    net, x = _small_net()
    flags = [m.training for m in net.modules()]
    configured = copy.deepcopy(net)
    attempt = onnx_export.export_model(net, x, dynamo=dynamo)
    assert attempt.completed, attempt.error
    # Flags: compared with the module itself after the export.
    assert attempt.flags_changed == [n for n, m in net.named_modules()
                                     if isinstance(m, nn.BatchNorm2d) and m.training
                                     != configured.get_submodule(n).training]
    if not dynamo:
        assert attempt.train_calls == [False, True] and attempt.flags_changed == ["1"]
    else:
        assert [m.training for m in net.modules()] == flags
    # onnxruntime, run here directly, against PyTorch's all-eval output of the same net.
    session = onnxruntime.InferenceSession(attempt.onnx_bytes,
                                           providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref_eval = copy.deepcopy(configured).eval()(x).numpy()
    assert abs(out - ref_eval).max() < 1e-5
    assert abs(onnx_export.run_onnx(attempt.onnx_bytes, x) - out).max() == 0
    diffs = onnx_export.compare_with_pytorch(out, onnx_export.pytorch_outputs(configured, x))
    assert diffs["eval"] < 1e-5 and diffs["train"] > 1e-2 and diffs["as configured"] > 1e-2
    assert onnx_export.closest(diffs) == "eval"
    # The graph: what onnx itself lists.
    nodes = [n for n in onnx.load_from_string(attempt.onnx_bytes).graph.node
             if n.op_type == "BatchNormalization"]
    rows = onnx_export.graph_batchnorms(attempt.onnx_bytes, ["1", "4"])
    assert sum(r["node"] is not None for r in rows) == len(nodes)


def test_graph_batchnorms_reads_nodes_and_training_mode():
    """An export that keeps BatchNormalization nodes (TrainingMode.PRESERVE): each layer's
    node and its training_mode, read back from the file."""
    import io

    import onnx

    from bnviz.pitfalls import onnx_export

    net, x = _small_net()
    buffer = io.BytesIO()
    torch.onnx.export(copy.deepcopy(net), (x,), buffer, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE)
    rows = {r["layer"]: r for r in onnx_export.graph_batchnorms(buffer.getvalue(), ["1", "4"])}
    modes = {}
    for node in onnx.load_from_string(buffer.getvalue()).graph.node:
        if node.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            modes[node.input[1].split(".")[0]] = attrs.get("training_mode", 0)
    assert modes == {"1": 0, "4": 1}  # layer 1 frozen in eval, layer 4 training
    assert rows["1"]["training_mode"] == 0 and "running statistics" in rows["1"]["in_graph"]
    assert rows["4"]["training_mode"] == 1 and "batch statistics" in rows["4"]["in_graph"]
    folded = onnx_export.graph_batchnorms(buffer.getvalue(), ["7"])[0]
    assert folded["node"] is None and "no BatchNormalization node" in folded["in_graph"]


def test_mode_guard_run_matches_direct_pytorch(lite, guard_result):
    result = guard_result
    assert result.reproduced and result.data["method"] == "round-trip"
    rows = {r["layer"]: r for r in result.table}
    assert set(rows) == {"_bn0", "_blocks.1._bn0"}
    # Direct check of _bn0 (first layer: its input does not depend on dropout).
    x = photo_input(lite)
    net = copy.deepcopy(lite.module).train()
    net._bn0.eval()
    net.train(net.training)
    mean0 = net._bn0.running_mean.clone()
    with torch.no_grad():
        net(x)
    direct = float((net._bn0.running_mean - mean0).abs().max())
    assert direct > 0
    row = rows["_bn0"]
    assert row["after_operation"] == "train" and row["after_operation_with_guard"] == "eval"
    assert row["running_mean_change"] == pytest.approx(direct, rel=1e-5)
    assert row["batches_tracked_change"] == 1
    assert row["running_mean_change_with_guard"] == 0.0
    assert row["batches_tracked_change_with_guard"] == 0
    assert [r["layer"] for r in result.data["audit_before"]] == ["_bn0", "_blocks.1._bn0"]
    assert result.data["audit_after"] == []
    assert result.data["audit_guarded"] == result.data["audit_before"]
    assert "left 2 of them in train mode" in result.verdict


def test_mode_guard_auto_uses_export_or_says_it_fell_back():
    result = mg.run(model="resnet18", weights="random", batch_size=2, **SMALL)
    data = result.data
    assert result.weights == "random init" and "(random init)" in result.verdict
    assert data["method"] in ("export", "round-trip")
    # onnx is a dependency: the export completes, with both exporters.
    assert data["method"] == "export" and data["export_completed"]
    assert data["exporter_train_calls"] == [False, True]
    assert "torch.onnx.export" in result.verdict
    legacy, dynamo = data["exporters"]
    assert (legacy["exporter"], dynamo["exporter"]) == ("dynamo=False", "dynamo=True")
    assert legacy["completed"] and dynamo["completed"]
    assert legacy["layers_lost"] == ["bn1"]
    assert legacy["onnxruntime_matches"] == "eval"
    assert legacy["onnxruntime_max_diff"]["eval"] < 1e-4
    assert [g["layer"] for g in legacy["graph"]] == ["bn1"]
    assert "dynamo=True" in result.verdict and "onnxruntime" in result.verdict
    figs = REGISTRY["mode-guard"].figures(result)
    assert len(figs) == 3 and list(figs[2].data[0].x) == ["dynamo=False", "dynamo=True"]
    assert result.reproduced
    assert result.table[0]["after_operation"] == "train"
    assert result.table[0]["after_operation_with_guard"] == "eval"


def test_mode_guard_bad_input():
    with pytest.raises(LayerError, match="_bn00"):
        mg.run(layers=["_bn00"], method="round-trip", **SMALL)
    with pytest.raises(BnvizError, match="method"):
        mg.run(method="teleport", **SMALL)
    with pytest.raises(LayerError, match="no BatchNorm"):
        mg.run(model="alexnet", weights="random", **SMALL)


# --------------------------------------------------------------------------------------------
# 6. Conv-BN folding
# --------------------------------------------------------------------------------------------


class _SharedConv(nn.Module):
    """conv1's output feeds BN *and* a skip connection: folding it would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.conv1(x)
        return self.bn2(self.conv2(self.bn1(a))) + a


def _randomise_stats(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for _, bn in bn_layers(module):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.randn(bn.num_features, generator=gen))


@pytest.mark.parametrize("finder", ["fx", "hooks"])
def test_pairs_skip_a_conv_whose_output_is_reused(finder):
    net = _SharedConv().eval()
    _randomise_stats(net)
    x = torch.randn(2, 3, 8, 8)
    pairs, _ = fold_mod.find_conv_bn_pairs(net, x, finder)
    assert pairs == [("conv2", "bn2")]
    folded = fold_mod.fold_conv_bn(net, pairs)
    assert isinstance(folded.bn2, nn.Identity) and isinstance(folded.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)
    assert not isinstance(net.bn2, nn.Identity)  # the original is untouched


def test_fx_and_hooks_find_the_same_pairs_on_lite(lite):
    x = photo_input(lite, batch_size=1)
    fx_pairs, how_fx = fold_mod.find_conv_bn_pairs(lite.module, x, "fx")
    hook_pairs, how_hooks = fold_mod.find_conv_bn_pairs(lite.module, x, "hooks")
    assert len(fx_pairs) == 49 and sorted(fx_pairs) == sorted(hook_pairs)
    assert "fx" in how_fx and "hooks" in how_hooks
    assert ("_conv_stem", "_bn0") in fx_pairs


def test_folded_conv_keeps_static_same_padding(lite):
    pairs = [("_conv_stem", "_bn0"), ("_blocks.1._depthwise_conv", "_blocks.1._bn1")]
    folded = fold_mod.fold_conv_bn(lite.module, pairs)
    for conv_name, bn_name in pairs:
        conv, fused = lite.module.get_submodule(conv_name), folded.get_submodule(conv_name)
        assert type(fused) is type(conv) and type(conv).__name__ == "Conv2dStaticSamePadding"
        assert repr(fused.static_padding) == repr(conv.static_padding)
        assert "ZeroPad2d" in repr(fused.static_padding)
        bn = lite.module.get_submodule(bn_name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        assert torch.allclose(fused.weight, conv.weight * scale.view(-1, 1, 1, 1), atol=1e-6)
        assert torch.allclose(fused.bias, bn.bias - bn.running_mean * scale, atol=1e-5)
        assert isinstance(folded.get_submodule(bn_name), nn.Identity)
    # The stem alone, folded vs original (eval), on a real photo: the padding must match.
    x = photo_input(lite)
    with torch.no_grad():
        ref = lite.module._bn0(lite.module._conv_stem(x))
        out = folded._conv_stem(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fold_run_eval_agrees_train_does_not(lite, fold_result):
    result = fold_result
    data = result.data
    assert result.reproduced
    assert data["pairs_folded"] == 49 and data["unfolded_bn_layers"] == []
    assert data["fused_conv_type"] == data["conv_type"] == "Conv2dStaticSamePadding"
    ev, ev_inter, tr, tr_inter = result.table
    assert ev["max_rel_diff"] < 1e-4 and ev_inter["max_rel_diff"] < 1e-4
    assert tr["max_rel_diff"] > 1e-2 and tr_inter["max_rel_diff"] > 1e-2
    # Independent numbers: fold with torch's own fuse function, compare with the original.
    x = photo_input(lite)
    folded = copy.deepcopy(lite.module).eval()
    for conv_name, bn_name in data["pairs"]:
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(folded.get_submodule(conv_name),
                                                        folded.get_submodule(bn_name))
        common.replace_module(folded, conv_name, fused)
        common.replace_module(folded, bn_name, nn.Identity())
    train_bn = copy.deepcopy(lite.module).eval()
    for _, bn in bn_layers(train_bn):
        bn.train()
    with torch.no_grad():
        ref, out, trained = lite.module(x), folded(x), train_bn(x)
    assert ev["max_abs_diff"] == pytest.approx(float((out - ref).abs().max()), rel=0.2, abs=1e-5)
    assert tr["max_abs_diff"] == pytest.approx(float((out - trained).abs().max()), rel=1e-4)
    bn = lite.module._bn0
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert torch.allclose(torch.tensor(data["scale"]), scale, rtol=1e-5)
    assert f"{float(scale.min()):.3g}" in result.verdict
    assert not lite.module.training  # the shared model is untouched


def test_fold_resnet18_random_init_labelled():
    result = fold_mod.run(model="resnet18", weights="random", layer="layer2.0.bn1",
                          batch_size=2, **SMALL)
    assert result.weights == "random init" and "resnet18 (random init)" in result.verdict
    assert result.data["pairs_folded"] == 20 and result.data["layer"] == "layer2.0.bn1"
    assert result.table[0]["max_rel_diff"] < 1e-4 and result.table[2]["max_rel_diff"] > 1e-2
    with pytest.raises(LayerError, match="layer9"):
        fold_mod.run(model="resnet18", weights="random", layer="layer9.bn", **SMALL)


# --------------------------------------------------------------------------------------------
# 7. Detached statistics
# --------------------------------------------------------------------------------------------


def test_capture_bn_input_is_the_conv_output(lite):
    x = photo_input(lite)
    net = copy.deepcopy(lite.module)
    captured = detach_mod.capture_bn_input(net, "_bn0", x)
    with torch.no_grad():
        assert torch.equal(captured, net._conv_stem(x))
    assert not net.training


def test_detached_gradients_against_analytic_formulas(lite):
    """Native BN's gradient is (g/σ)(dy - mean(dy) - x̂·mean(dy·x̂)); detached is (g/σ)·dy."""
    net = copy.deepcopy(lite.module)
    x0 = detach_mod.capture_bn_input(net, "_bn0", photo_input(lite)).double()
    bn = copy.deepcopy(net._bn0).double()
    dims = (0, 2, 3)
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    mean, var = x0.mean(dims, keepdim=True), x0.var(dims, unbiased=False, keepdim=True)
    sigma = torch.sqrt(var + bn.eps)
    xhat = (x0 - mean) / sigma
    gamma = bn.weight.detach().view(1, -1, 1, 1)
    true = gamma / sigma * (dy - dy.mean(dims, keepdim=True)
                            - xhat * (dy * xhat).mean(dims, keepdim=True))
    detached_formula = gamma / sigma * dy

    def grad(mod):
        x = x0.clone().requires_grad_(True)
        (mod(x) * dy).sum().backward()
        return x.grad

    native = copy.deepcopy(bn).train()
    assert torch.allclose(grad(native), true, rtol=1e-6, atol=1e-9 * true.abs().max())
    manual = detach_mod.ManualBatchNorm(bn, detach_stats=False, unbiased=False)
    assert torch.allclose(grad(manual), true, rtol=1e-6, atol=1e-9 * true.abs().max())
    det = detach_mod.ManualBatchNorm(bn, detach_stats=True, unbiased=False)
    assert torch.allclose(grad(det), detached_formula, rtol=1e-9)
    assert (grad(det) - true).norm() > 1e-3 * true.norm()
    assert detach_mod.shift_scale_fraction(grad(det) - true, x0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("loss", ["network", "random"])
def test_detach_run_verdict_matches_numbers(detach_results, loss):
    result = detach_results[loss]
    rows = {key: row for (key, *_), row in zip(detach_mod.VARIANTS, result.table)}
    native, manual, det, unb = rows["native"], rows["manual"], rows["detached"], rows["unbiased"]
    scale = result.data["output_max_abs"]
    assert result.reproduced
    assert native["updates_running_stats"] is True and det["updates_running_stats"] is False
    # Non-detached manual BN equals native: output and every gradient.
    assert manual["forward_max_abs_diff"] < 1e-5 * scale
    assert manual["input_grad_rel_diff"] < 1e-5
    assert manual["gamma_grad_rel_diff"] < 1e-5 and manual["beta_grad_rel_diff"] < 1e-5
    # Detached: same output and gamma/beta gradients, different input gradient.
    assert det["forward_max_abs_diff"] < 1e-5 * scale
    assert det["input_grad_rel_diff"] > 100 * manual["input_grad_rel_diff"]
    assert det["gamma_grad_rel_diff"] < 1e-5 and det["beta_grad_rel_diff"] < 1e-5
    assert det["input_grad_change_in_shift_scale_directions"] > 0.999
    assert det["shift_grad_norm"] > 1e3 * native["shift_grad_norm"]
    # The unbiased var() changes the forward output itself: by the factor sqrt(n/(n-1)).
    n = result.data["layer_input_shape"][0] * 32 * 32
    assert unb["forward_max_abs_diff"] > 1e3 * det["forward_max_abs_diff"]
    assert unb["forward_max_abs_diff"] < 2 * (1 - ((n - 1) / n) ** 0.5) * 60 * scale
    assert f"{det['input_grad_rel_diff']:.1%}" in result.verdict
    # With a plain sum(y) the true input gradient vanishes; the detached one does not.
    assert result.data["sum_loss_input_grad_norm_native"] < (
        1e-6 * result.data["sum_loss_input_grad_norm_detached"])


def test_detach_network_loss_matches_direct_autograd(lite, detach_results):
    """The network-loss gradient at _bn0 equals a direct backward through the full model."""
    result = detach_results["network"]
    x = photo_input(lite)
    net = copy.deepcopy(lite.module).eval()
    net._bn0.train()
    grads = {}

    def keep_grad(_m, _inp, out):
        out.register_hook(lambda g: grads.setdefault("x", g))

    net._conv_stem.register_forward_hook(keep_grad)
    loss = F.cross_entropy(net(x), torch.full((2,), 281))
    loss.backward()
    assert result.table[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert result.table[0]["input_grad_norm"] == pytest.approx(float(grads["x"].norm()),
                                                                 rel=1e-4)


# --------------------------------------------------------------------------------------------
# 8. Freezing BN
# --------------------------------------------------------------------------------------------


def test_freeze_table_matches_the_story(freeze_result):
    result, before, after = freeze_result
    rows = {key: row for key, row in zip(freeze_mod.VARIANTS, result.table)}
    assert result.reproduced and all(result.data["story_checks"].values())
    assert len(result.data["story_checks"]) == 3
    t, rg, ev = rows["train"], rows["requires_grad"], rows["eval"]
    both, af = rows["eval_requires_grad"], rows["affine_false"]
    assert (t["affine_params_change"], t["running_stats_change"],
            t["output_uses_batch_stats"]) == ("yes", "yes", "yes")
    assert (rg["affine_params_change"], rg["running_stats_change"],
            rg["output_uses_batch_stats"]) == ("no", "yes", "yes")
    assert (ev["affine_params_change"], ev["running_stats_change"],
            ev["output_uses_batch_stats"]) == ("yes", "no", "no")
    assert (both["affine_params_change"], both["running_stats_change"],
            both["output_uses_batch_stats"]) == ("no", "no", "no")
    assert af["affine_params_change"].startswith("n/a") and af["layers_affine_changed"] == "n/a"
    assert (af["running_stats_change"], af["output_uses_batch_stats"]) == ("yes", "yes")
    assert rg["max_affine_change"] == 0.0 and ev["max_running_change"] == 0.0
    assert all(r["other_params_changed"] == "51/51" for r in result.table)
    assert t["max_rel_err_batch_formula"] < 1e-4 < t["max_rel_err_running_formula"]
    assert ev["max_rel_err_running_formula"] < 1e-4 < ev["max_rel_err_batch_formula"]
    assert "eval() alone does not stop the optimizer" in result.verdict
    assert before[1] == after[1]  # the shared model came back exactly as it was
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_freeze_requires_grad_row_matches_a_direct_step(lite, freeze_result):
    result = freeze_result[0]
    x = photo_input(lite)
    net = copy.deepcopy(lite.module).eval()
    for _, bn in bn_layers(net):
        bn.train()
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    w0, m0 = net._bn0.weight.clone(), net._bn0.running_mean.clone()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(net(x), torch.full((2,), 281))
    loss.backward()
    opt.step()
    assert torch.equal(net._bn0.weight, w0)
    assert not torch.equal(net._bn0.running_mean, m0)
    row = result.table[1]
    assert row["variant"] == "requires_grad=False"
    assert row["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    per_layer = result.data["per_layer"]["requires_grad"]
    assert per_layer["affine_changed"] == [False] * 49
    assert per_layer["running_changed"] == [True] * 49
    assert per_layer["stats_used"] == ["batch"] * 49


def test_without_affine_copies_running_stats(lite):
    bn = lite.module._bn0
    new = freeze_mod.without_affine(bn)
    assert new.weight is None and new.bias is None and not new.affine
    assert torch.equal(new.running_mean, bn.running_mean)
    assert torch.equal(new.running_var, bn.running_var)
    assert new.eps == bn.eps and new.momentum == bn.momentum


def test_freeze_bad_input():
    with pytest.raises(BnvizError, match="variant"):
        freeze_mod.run(variants=["melt"], **SMALL)
    with pytest.raises(BnvizError, match="Learning rate"):
        freeze_mod.run(lr=-1, **SMALL)
    with pytest.raises(BnvizError, match="batch size"):
        freeze_mod.run(batch_size=0, **SMALL)


# --------------------------------------------------------------------------------------------
# Registry, CLI, figures, CUDA
# --------------------------------------------------------------------------------------------


def test_registered_with_complete_protocol():
    load_all()
    for name in NAMES:
        exp = REGISTRY[name]
        assert exp.title and exp.story and exp.explanation.count("\n\n") >= 1
        parser = argparse.ArgumentParser()
        exp.add_arguments(parser)
        kwargs = exp.kwargs_from_args(parser.parse_args([]))
        assert kwargs["size"] == common.DEFAULT_SIZE and kwargs["model"] == "efficientnet_lite0"
        assert callable(exp.controls)
    parser = argparse.ArgumentParser()
    REGISTRY["freeze"].add_arguments(parser)
    kwargs = REGISTRY["freeze"].kwargs_from_args(
        parser.parse_args(["--variant", "eval", "--lr", "0.5", "--size", "64"]))
    assert kwargs["variants"] == ["eval"] and kwargs["lr"] == 0.5 and kwargs["size"] == 64


def test_cli_fold_json_with_defaults(capsys):
    code = cli.main(["pitfalls", "fold", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(out)
    assert payload["name"] == "fold" and payload["reproduced"] is True
    assert payload["model"] == "efficientnet_lite0" and payload["data"]["pairs_folded"] == 49
    assert payload["table"][0]["max_rel_diff"] < 1e-4


def test_cli_mode_guard_json_holds_both_exports(capsys):
    """The dynamo exporter prints progress unless told not to: stdout stays pure JSON."""
    code = cli.main(["pitfalls", "mode-guard", "--size", "64", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(out)
    exporters = payload["data"]["exporters"]
    assert [e["exporter"] for e in exporters] == ["dynamo=False", "dynamo=True"]
    assert all(e["completed"] and e["onnxruntime_matches"] == "eval" for e in exporters)
    assert payload["data"]["export_completed"] is True


def test_cli_user_errors_exit_2(capsys):
    assert cli.main(["pitfalls", "freeze", "--model", "alexnet", "--weights", "random"]) == 2
    err = capsys.readouterr().err
    assert "no BatchNorm" in err and "Traceback" not in err
    assert cli.main(["pitfalls", "detach", "--layer", "_bn99", "--size", "64"]) == 2
    assert "_bn99" in capsys.readouterr().err


def test_figures_are_pure_and_show_the_result(fold_result, freeze_result, guard_result,
                                              detach_results):
    figs = REGISTRY["fold"].figures(fold_result)
    assert len(figs) == 3 and all(f.to_json() for f in figs)
    assert list(figs[1].data[0].y) == pytest.approx(fold_result.data["scale"])
    heat = REGISTRY["freeze"].figures(freeze_result[0])[0]
    assert [list(r) for r in heat.data[0].z] == [
        [1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [None, 1.0, 1.0]]
    z = REGISTRY["mode-guard"].figures(guard_result)[0].data[0].z
    assert [list(r) for r in z] == [[0, 1, 0], [0, 1, 0]]
    det = detach_results["random"]
    figs = REGISTRY["detach"].figures(det)
    assert len(figs) == 3 and all(f.to_json() for f in figs)
    rel = [r["input_grad_rel_diff"] for r in det.table[1:]]
    assert list(figs[0].data[0].y) == pytest.approx([max(v, 1e-16) for v in rel])


@CUDA
@pytest.mark.parametrize("name", NAMES)
def test_runs_on_cuda(lite, name):
    kwargs = {"model": lite, "device": "cuda", "batch_size": 2, **SMALL}
    if name == "mode-guard":
        kwargs["method"] = "round-trip"
    result = REGISTRY[name].run(**kwargs)
    assert result.device.startswith("cuda") and result.reproduced, result.verdict
