"""bnviz.inspect against native PyTorch: modes, flags, momentum, dims, state, threads."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import bnviz
from bnviz.errors import BnvizError, LayerError, ModeError
from bnviz.modes import apply_mode, parse_mode


def small_net(bn_cls=nn.BatchNorm2d, conv_cls=nn.Conv2d, channels=6, inplace=True):
    torch.manual_seed(0)
    net = nn.Sequential(
        conv_cls(3, channels, 3, padding=1),
        bn_cls(channels),
        nn.ReLU(inplace=inplace),
        conv_cls(channels, channels, 3, padding=1),
        bn_cls(channels, momentum=0.3),
    )
    # Non-trivial running statistics and affine parameters, so batch vs running matters.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.num_batches_tracked.fill_(3)
    return net.eval()


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        {n: (m.track_running_stats, m.momentum) for n, m in model.named_modules()
         if isinstance(m, nn.modules.batchnorm._BatchNorm)},
    )


def assert_unchanged(model, snap):
    state, flags, hooks, bn_attrs = snapshot(model)
    assert state.keys() == snap[0].keys()
    for k in state:
        assert torch.equal(state[k], snap[0][k]), k
    assert flags == snap[1]
    assert hooks == snap[2]
    assert bn_attrs == snap[3]


def native_reference(model: nn.Module, x: torch.Tensor, mode: str | None,
                     device: str = "cpu"):
    """Run PyTorch itself on a deepcopy with the mode applied, on ``device`` (the one the
    inspection ran on: CUDA kernels need not match the CPU's bit for bit); capture BN
    in/out by clone, returned on the CPU."""
    ref = copy.deepcopy(model).to(device)
    x = x.to(device)
    bns = [(n, m) for n, m in ref.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mode is not None:
        for _, m in bns:
            apply_mode(m, parse_mode(mode))
    before = {n: (None if m.running_mean is None else m.running_mean.cpu().clone(),
                  None if m.running_var is None else m.running_var.cpu().clone())
              for n, m in bns}
    captured = {}

    def hook(name):
        def fn(mod, inp, out):
            captured[name] = (inp[0].detach().cpu().clone(), out.detach().cpu().clone())
        return fn

    for n, m in bns:
        m.register_forward_hook(hook(n))
    with torch.no_grad():
        ref(x)
    after = {n: (None if m.running_mean is None else m.running_mean.cpu().clone(),
                 None if m.running_var is None else m.running_var.cpu().clone(),
                 None if m.num_batches_tracked is None else int(m.num_batches_tracked))
             for n, m in bns}
    return captured, before, after


MODE_CASES = [
    # mode, expected stats_used, expected "buffers change"
    ("eval", "running", False),
    ("train", "batch", True),
    ("train,momentum=none", "batch", True),
    ("train,momentum=0.5", "batch", True),
    ("train,track=off", "batch", False),  # flag flipped: buffers kept but not updated
    ("eval,track=off", "running", False),  # ... and eval still uses them
    ("eval,track=none", "batch", False),  # built without buffers: batch stats even in eval
    ("train,track=none", "batch", False),
    ("eval,track=on", "running", False),
]


@pytest.mark.parametrize("mode,expected_stats,changes", MODE_CASES)
def test_modes_match_native(device, mode, expected_stats, changes):
    net = small_net()
    snap = snapshot(net)
    x = torch.randn(4, 3, 10, 10) * 2 + 0.5
    report = bnviz.inspect(net, x, modes=mode, device=device)
    captured, before, after = native_reference(net, x, mode, device)
    assert_unchanged(net, snap)
    assert len(report.layers) == 2
    for layer in report.layers:
        inp, out = captured[layer.name]
        assert layer.stats_used == expected_stats
        assert layer.updates_running_stats == changes
        assert layer.mode_source == "override"
        # Kept tensors are exactly PyTorch's.
        torch.testing.assert_close(layer.input, inp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.output, out, rtol=1e-6, atol=1e-6)
        # The manual check really compares against native: tiny difference.
        assert layer.max_abs_diff < 1e-5 and layer.max_rel_diff < 1e-5
        torch.testing.assert_close(layer.manual_output(), out, rtol=1e-5, atol=1e-5)
        # Batch statistics are the biased ones over (N, H, W).
        var, mean = torch.var_mean(inp.double(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(layer.batch_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.batch_var.double(), var, rtol=1e-5, atol=1e-6)
        # Running statistics before/after are what PyTorch has before/after.
        rm_b, rv_b = before[layer.name]
        rm_a, rv_a, nbt_a = after[layer.name]
        if rm_b is None:
            assert layer.running_mean_before is None and layer.running_mean_after is None
        else:
            assert torch.equal(layer.running_mean_before, rm_b)
            assert torch.equal(layer.running_var_before, rv_b)
            assert torch.equal(layer.running_mean_after, rm_a)
            assert torch.equal(layer.running_var_after, rv_a)
            assert layer.num_batches_tracked_after == nbt_a
            assert (not torch.equal(rm_a, rm_b)) == changes
        if changes:
            assert layer.running_update_max_abs_diff < 1e-5
            torch.testing.assert_close(layer.manual_running_mean_after, rm_a)
            torch.testing.assert_close(layer.manual_running_var_after, rv_a)
        else:
            assert layer.running_update_max_abs_diff is None


def test_momentum_none_is_cumulative_average():
    net = small_net()
    x = torch.randn(4, 3, 8, 8)
    layer = bnviz.inspect(net, x, modes="train,momentum=none").layers[0]
    assert layer.num_batches_tracked_before == 3 and layer.num_batches_tracked_after == 4
    assert layer.update_factor == pytest.approx(1 / 4)
    n = layer.count
    expected = 0.75 * layer.running_var_before + 0.25 * layer.batch_var * n / (n - 1)
    torch.testing.assert_close(layer.running_var_after, expected)


def test_model_own_settings_kept_when_not_named():
    net = small_net()
    net[1].train()  # only the first BN in train mode: the model's own setting
    report = bnviz.inspect(net, torch.randn(2, 3, 6, 6), modes={"4": "train,track=off"})
    first, second = report.layers
    assert first.mode_source == "model" and first.stats_used == "batch" and first.training
    assert second.mode_source == "override" and second.mode.startswith("train,track=off")
    assert not second.updates_running_stats


@pytest.mark.parametrize(
    "bn_cls,conv_cls,shape",
    [
        (nn.BatchNorm1d, nn.Conv1d, (3, 3, 9)),
        (nn.BatchNorm3d, nn.Conv3d, (2, 3, 3, 4, 5)),
        (nn.BatchNorm2d, nn.Conv2d, (1, 3, 5, 5)),  # batch size 1: stats over H*W
    ],
)
@pytest.mark.parametrize("mode", ["train", "eval", "eval,track=none", "train,momentum=none"])
def test_1d_3d_and_batch_one(device, bn_cls, conv_cls, shape, mode):
    net = small_net(bn_cls, conv_cls)
    x = torch.randn(*shape)
    report = bnviz.inspect(net, x, modes=mode, device=device)
    captured, _, after = native_reference(net, x, mode, device)
    for layer in report.layers:
        assert layer.type == bn_cls.__name__
        torch.testing.assert_close(layer.output, captured[layer.name][1], rtol=1e-6, atol=1e-6)
        assert layer.max_rel_diff < 1e-5
        if layer.updates_running_stats:
            torch.testing.assert_close(layer.running_var_after, after[layer.name][1])


def test_batchnorm1d_on_2d_input_and_single_value_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU())
    report = bnviz.inspect(net, torch.randn(6, 4), modes="train")
    assert report.layers[0].count == 6 and report.layers[0].max_rel_diff < 1e-5
    # One value per channel in train mode: PyTorch refuses; bnviz names the layer and the fix.
    with pytest.raises(LayerError) as err:
        bnviz.inspect(net, torch.randn(1, 4), modes="train")
    msg = str(err.value)
    assert "'1'" in msg and "one value per channel" in msg and "eval" in msg
    # ... and eval is fine with a single sample.
    assert bnviz.inspect(net, torch.randn(1, 4), modes="eval").layers[0].stats_used == "running"


def test_syncbatchnorm_treated_as_batchnorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU())
    report = bnviz.inspect(net, torch.randn(2, 3, 8, 8), modes="train")
    layer = report.layers[0]
    assert "SyncBatchNorm" in layer.type
    x = torch.randn(2, 3, 8, 8)
    report = bnviz.inspect(net, x, modes="train")
    with torch.no_grad():
        c = net[0](x)
        expected = torch.nn.functional.batch_norm(c, None, None, net[1].weight, net[1].bias,
                                                  True, 0.1, net[1].eps)
    torch.testing.assert_close(report.layers[0].output, expected)
    assert isinstance(net[1], nn.SyncBatchNorm)  # the caller's layer is untouched


def test_state_untouched_and_commit(device):
    net = small_net()
    net[1].train()
    snap = snapshot(net)
    handle = net[1].register_forward_hook(lambda *a: None)  # a caller's hook survives
    snap = snapshot(net)
    x = torch.randn(4, 3, 6, 6)
    for mode in ["train", "eval,track=none", "train,momentum=none", "train,track=off"]:
        bnviz.inspect(net, x, modes=mode, device=device)
        assert_unchanged(net, snap)
    # commit=True writes exactly the update a native train-mode forward makes.
    ref = copy.deepcopy(net)
    ref.train()
    with torch.no_grad():
        ref(x)
    report = bnviz.inspect(net, x, modes="train", device=device, commit=True)
    assert report.committed
    for name in ("1", "4"):
        assert torch.allclose(dict(net.named_modules())[name].running_mean,
                              dict(ref.named_modules())[name].running_mean, atol=1e-6)
        assert int(dict(net.named_modules())[name].num_batches_tracked) == 4
    assert net[1].training and not net[4].training  # flags still untouched
    handle.remove()


def test_inplace_relu_copy_on_write_and_activation():
    net = small_net(inplace=True)
    x = torch.randn(3, 3, 8, 8)
    report = bnviz.inspect(net, x, modes="train")
    layer = report.layer("1")
    assert layer.activation == "relu" and layer.activation_inplace is True
    assert layer.overwritten_by == "relu"
    # native output = pre-ReLU values; a reference-keeping hook sees post-ReLU values.
    torch.testing.assert_close(layer.activation_output, torch.relu(layer.output))
    assert torch.equal(layer.output_reference, layer.activation_output)
    negative = float((layer.output < 0).float().mean())
    assert layer.overwritten_fraction() == pytest.approx(negative)
    assert 0.2 < negative < 0.8
    # Last BN has no following activation and is never overwritten.
    last = report.layer("4")
    assert last.activation is None and last.overwritten_by is None
    assert torch.equal(last.output_reference, last.output)
    # With a non-inplace ReLU nothing is overwritten.
    report = bnviz.inspect(small_net(inplace=False), x, modes="train")
    assert report.layer("1").activation_inplace is False
    assert report.layer("1").overwritten_fraction() == 0.0


def test_residual_inplace_add_is_detected():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x  # in place on the BN output, like torchvision's BasicBlock
            return self.relu(out)

    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 3, 6, 6)
    layer = bnviz.inspect(block, x, modes="train").layers[0]
    assert layer.overwritten_by == "add_" and layer.activation is None
    with torch.no_grad():
        expected = torch.nn.functional.batch_norm(block.conv(x), None, None, block.bn.weight,
                                                  block.bn.bias, True)
    torch.testing.assert_close(layer.output, expected)
    torch.testing.assert_close(layer.output_reference, torch.relu(expected + x))


def test_keep_tensors_selection_and_stats_only():
    net = small_net()
    x = torch.randn(2, 3, 6, 6)
    report = bnviz.inspect(net, x, modes="train", keep_tensors=["4"])
    assert report.layer("1").input is None and report.layer("4").input is not None
    with pytest.raises(LayerError):
        report.layer("1").manual_output()
    report2 = bnviz.inspect(net, x, modes="train", keep_tensors=False)
    assert all(layer.output is None for layer in report2.layers)
    # Statistics do not depend on what is kept.
    for a, b in zip(report.layers, report2.layers):
        assert torch.equal(a.batch_mean, b.batch_mean) and a.max_abs_diff == b.max_abs_diff
    with pytest.raises(LayerError, match="did you mean"):
        bnviz.inspect(net, x, keep_tensors=["44"])


def test_bad_modes_and_layers():
    net = small_net()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ModeError, match="train' or 'eval"):
        bnviz.inspect(net, x, modes="training")
    with pytest.raises(ModeError, match="momentum"):
        bnviz.inspect(net, x, modes="train,momentum=2")
    with pytest.raises(ModeError, match="track"):
        bnviz.inspect(net, x, modes="eval,track=maybe")
    with pytest.raises(LayerError, match="Unknown BatchNorm layer 'bn9'"):
        bnviz.inspect(net, x, modes={"bn9": "eval"})
    with pytest.raises(BnvizError, match="tensor"):
        bnviz.inspect(net, [[1.0]])


def test_cuda_missing_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: nothing to refuse")
    with pytest.raises(bnviz.DeviceError, match="CUDA"):
        bnviz.inspect(small_net(), torch.randn(2, 3, 6, 6), device="cuda")


def test_explain_element_uses_the_statistics_the_mode_dictates():
    net = small_net()
    x = torch.randn(2, 3, 6, 6)
    for mode, stats in [("train", "batch"), ("eval", "running")]:
        layer = bnviz.inspect(net, x, modes=mode).layer("1")
        e = layer.explain((1, 2, 3, 4))
        assert e["stats"] == stats
        expected_mean = layer.batch_mean[2] if stats == "batch" else layer.running_mean_before[2]
        assert e["mean"] == pytest.approx(float(expected_mean))
        assert e["manual"] == pytest.approx(e["native"], abs=1e-5)
        assert e["native"] == pytest.approx(float(layer.output[1, 2, 3, 4]))


def test_concurrent_inspections_on_one_shared_model():
    """A class on one server: many threads, one model, different modes, no cross-talk."""
    net = small_net()
    snap = snapshot(net)
    modes = ["train", "eval", "eval,track=none", "train,momentum=none", "train,track=off"]
    x = torch.randn(4, 3, 12, 12)
    expected = {m: bnviz.inspect(net, x, modes=m, keep_tensors=False) for m in modes}
    results: list[tuple[str, object]] = []
    errors: list[BaseException] = []

    def worker(mode):
        try:
            for _ in range(4):
                results.append((mode, bnviz.inspect(net, x, modes=mode, keep_tensors=False)))
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(m,)) for m in modes * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == len(threads) * 4
    for mode, report in results:
        ref = expected[mode]
        for a, b in zip(report.layers, ref.layers):
            assert a.stats_used == b.stats_used and a.mode == b.mode
            assert torch.equal(a.batch_mean, b.batch_mean)
            assert (a.running_mean_after is None) == (b.running_mean_after is None)
            if a.running_mean_after is not None:
                assert torch.equal(a.running_mean_after, b.running_mean_after)
    assert_unchanged(net, snap)


def test_default_model_real_weights(lite):
    snap = snapshot(lite.module)
    x = bnviz.make_stimulus("image", name="chelsea", batch_size=2, composition="jitter")
    report = bnviz.inspect(lite, x, modes="eval", keep_tensors=False)
    assert report.predictions[0][0].label == "Egyptian cat"
    assert len(report.layers) == 49
    assert all(layer.momentum == pytest.approx(0.01) for layer in report.layers)
    assert all(layer.eps == 1e-3 for layer in report.layers)
    assert max(layer.max_rel_diff for layer in report.layers) < 1e-4
    torch.testing.assert_close(report.model_input, lite.preprocess(x))
    assert report.preprocessing == lite.preprocess.description
    train = bnviz.inspect(lite, x, modes="train", keep_tensors=["_bn0"])
    assert all(layer.stats_used == "batch" for layer in train.layers)
    assert max(layer.max_rel_diff for layer in train.layers) < 1e-4
    assert max(layer.running_update_max_abs_diff for layer in train.layers) < 1e-3
    first = train.layer("_bn0")
    assert first.activation == "hardtanh" and first.activation_inplace is False  # ReLU6
    frame = train.to_frame()
    assert list(frame["name"]) == train.layer_names and frame["mean_shift"].notna().all()
    assert_unchanged(lite.module, snap)


def test_alexnet_has_no_batchnorm():
    m = bnviz.load_model("alexnet", weights=None)
    report = bnviz.inspect(m, torch.rand(1, 3, 64, 64), keep_tensors=False)
    assert report.layers == [] and "no_batchnorm" in report.notes
    assert report.predictions is not None and len(report.predictions[0]) == 5


def test_json_schema():
    import json

    net = small_net()
    payload = json.loads(bnviz.inspect(net, torch.randn(2, 3, 6, 6), modes="eval,track=none")
                         .to_json())
    for key in ("model", "weights", "device", "input_shape", "predictions", "layers"):
        assert key in payload
    layer = payload["layers"][0]
    for key in ("name", "num_features", "training", "track_running_stats", "momentum", "eps",
                "stats_used", "batch_mean", "batch_var", "running_mean_before",
                "running_var_before", "running_mean_after", "running_var_after", "weight",
                "bias", "num_batches_tracked_before", "num_batches_tracked_after",
                "max_abs_diff"):
        assert key in layer
    assert layer["running_mean_before"] is None and layer["stats_used"] == "batch"
    assert len(layer["batch_mean"]) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_report_tensors_on_cpu_and_match_cpu():
    net = small_net()
    x = torch.randn(4, 3, 8, 8)
    gpu = bnviz.inspect(net, x, modes="train", device="cuda")
    cpu = bnviz.inspect(net, x, modes="train", device="cpu")
    assert gpu.device.startswith("cuda")
    for a, b in zip(gpu.layers, cpu.layers):
        assert a.output.device.type == "cpu"
        torch.testing.assert_close(a.output, b.output, rtol=1e-4, atol=1e-4)
        assert a.max_rel_diff < 1e-5


def test_pooled_copies_are_reset_between_calls():
    """Reusing a private copy must not leak one call's modes or buffers into the next."""
    net = small_net()
    x = torch.randn(3, 3, 6, 6)
    fresh_eval = bnviz.inspect(net, x, modes="eval", keep_tensors=False)
    for mode in ["train", "eval,track=none", "train,momentum=none", "train,track=off"]:
        bnviz.inspect(net, x, modes=mode, keep_tensors=False)
        again = bnviz.inspect(net, x, keep_tensors=False)  # model's own settings: eval
        for a, b in zip(again.layers, fresh_eval.layers):
            assert a.mode == b.mode and a.stats_used == "running"
            assert torch.equal(a.running_mean_before, b.running_mean_before)
            assert a.num_batches_tracked_before == b.num_batches_tracked_before
    # An in-place weight edit and a replaced module on the caller's model are seen at once.
    with torch.no_grad():
        net[1].weight.mul_(2)
    edited = bnviz.inspect(net, x, keep_tensors=False)
    assert torch.equal(edited.layers[0].weight, net[1].weight)
    net[4] = nn.BatchNorm2d(6, momentum=0.7).eval()
    replaced = bnviz.inspect(net, x, keep_tensors=False)
    assert replaced.layers[1].momentum == 0.7


class _Scaled(nn.Module):
    """Multiplies by its ``gain`` buffer once one is registered (a buffer added later)."""

    def forward(self, x):
        gain = self._buffers.get("gain")
        return x if gain is None else x * gain


def test_a_buffer_registered_after_inspecting_is_used():
    """Pooled copies are reset buffer by buffer; a buffer the caller registers later must
    retire the copy (the fingerprint lists buffer names), not be silently missing."""
    net = nn.Sequential(_Scaled(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 6, 6)
    before = bnviz.inspect(net, x, modes="train", keep_tensors=False)
    net[0].register_buffer("gain", torch.tensor(3.0))
    after = bnviz.inspect(net, x, modes="train", keep_tensors=False)
    with torch.no_grad():
        conv_out = net[1](x * 3.0)
    torch.testing.assert_close(after.layers[0].batch_mean, conv_out.mean(dim=(0, 2, 3)))
    assert not torch.allclose(after.layers[0].batch_mean, before.layers[0].batch_mean)


class _SwitchesToEval(nn.Module):
    """A forward that puts its BN layer in eval before calling it (model code wins)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        self.bn.eval()
        return self.bn(self.conv(x))


def test_a_layer_changed_by_the_forward_itself_is_reported_as_it_ran():
    """The state recorded for a layer is the one its call actually ran with, even when the
    model's forward changes it after inspect applied the requested modes."""
    net = _SwitchesToEval()
    report = bnviz.inspect(net, torch.randn(2, 3, 6, 6), modes="train", keep_tensors=True)
    layer = report.layers[0]
    assert layer.training is False and layer.stats_used == "running"
    assert layer.mode.startswith("eval") and layer.max_abs_diff < 1e-5


class _FailsAfterBN(nn.Module):
    """A BN layer, then the forward raises ``error`` (what a device out of memory does)."""

    def __init__(self, error: Exception):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.error = error

    def forward(self, x):
        self.bn(x)
        raise self.error


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    # cuDNN and cuBLAS say "alloc failed", not "out of memory": same problem, same fix
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("CUDA error: out of memory"),
])
def test_out_of_memory_becomes_a_clear_error(error):
    with pytest.raises(bnviz.DeviceError) as err:
        bnviz.inspect(_FailsAfterBN(error), torch.randn(2, 3, 4, 4))
    assert "out of memory" in str(err.value).lower() and "smaller batch" in str(err.value)


def test_other_runtime_errors_are_not_called_out_of_memory():
    from bnviz.devices import is_cuda_oom

    assert not is_cuda_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_cuda_oom(ValueError("allocation of a large batch"))
    assert is_cuda_oom(torch.cuda.OutOfMemoryError("anything"))


def test_activation_found_after_a_discarded_bn_output():
    """A BN output nobody consumes must not hide the activation of the next BN layer."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.probe = nn.BatchNorm2d(3)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            self.probe(x)  # result discarded: its pending output is freed at once
            return torch.relu(self.bn(x))

    report = bnviz.inspect(Branchy().eval(), torch.randn(2, 3, 4, 4), keep_tensors=False)
    assert report.layer("probe").activation is None
    assert report.layer("bn").activation == "relu"


def test_stats_only_equals_keep_all_and_learns_consumers_once(monkeypatch):
    """A statistics-only rerun skips the per-op watch but reports exactly the same numbers."""
    from bnviz.inspection import watch

    calls = {"n": 0}
    real = watch.ConsumerWatch.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        calls["n"] += 1
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(watch.ConsumerWatch, "__torch_function__", counting)
    net = small_net()
    x = torch.randn(4, 3, 8, 8)
    for mode in ["eval", "train", "train,momentum=none", "eval,track=none"]:
        full = bnviz.inspect(net, x, modes=mode, keep_tensors=True)
        calls["n"] = 0
        first = bnviz.inspect(net, x, modes=mode, keep_tensors=False)
        second = bnviz.inspect(net, x, modes=mode, keep_tensors=False)
        assert calls["n"] == 0  # consumers were learned by the keep-all forward
        for a, b, c in zip(full.layers, first.layers, second.layers, strict=True):
            for other in (b, c):
                assert (other.activation, other.activation_inplace) == (
                    a.activation, a.activation_inplace)
                assert torch.equal(other.batch_mean, a.batch_mean)
                assert torch.equal(other.batch_var, a.batch_var)
                assert torch.equal(other.channel_max_abs_diff, a.channel_max_abs_diff)
                assert other.max_abs_diff == a.max_abs_diff
                assert other.running_update_max_abs_diff == a.running_update_max_abs_diff
    assert full.layers[0].activation == "relu" and full.layers[0].activation_inplace
    # A new input shape is a new code path as far as the cache knows: watched again.
    bnviz.inspect(net, torch.randn(2, 3, 5, 5), keep_tensors=False)
    assert calls["n"] > 0


def test_activation_detection_follows_training_flags():
    """A forward that branches on self.training is watched again when the flags differ."""

    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) if self.training else torch.sigmoid(y)

    net = Branching().eval()
    x = torch.randn(2, 3, 4, 4)
    kw = {"keep_tensors": False, "other_modules": "keep"}
    assert bnviz.inspect(net, x, **kw).layer("bn").activation == "sigmoid"
    net.train()
    assert bnviz.inspect(net, x, **kw).layer("bn").activation == "relu"
    net.eval()
    assert bnviz.inspect(net, x, **kw).layer("bn").activation == "sigmoid"


def test_mixed_affine_and_dtypes_in_one_network(device):
    """Per-layer results survive the all-layers-at-once arithmetic: affine and plain layers,
    float32 and float64 layers in one forward, eval and train."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.BatchNorm2d(4, affine=False)
            self.b = nn.BatchNorm2d(4).double()
            self.c = nn.BatchNorm2d(5)
            self.conv = nn.Conv2d(4, 5, 1)

        def forward(self, x):
            x = self.a(x)
            x = self.b(x.double()).float()
            return self.c(self.conv(x))

    torch.manual_seed(1)
    net = Mixed()
    with torch.no_grad():
        for m in (net.a, net.b, net.c):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        net.b.weight.uniform_(0.5, 2)
        net.c.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    for mode in ["eval", "train"]:
        report = bnviz.inspect(net.eval(), x, modes=mode, device=device)
        captured, _, after = native_reference(net, x, mode, device)
        for layer in report.layers:
            inp, out = captured[layer.name]
            assert layer.batch_mean.dtype == inp.dtype
            assert layer.max_rel_diff < 1e-5, (mode, layer.name)
            var, mean = torch.var_mean(inp.double(), dim=(0, 2, 3), unbiased=False)
            torch.testing.assert_close(layer.batch_mean.double(), mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.batch_var.double(), var, rtol=1e-5, atol=1e-6)
            if mode == "train":
                assert layer.running_update_max_abs_diff < 1e-5
                assert torch.equal(layer.running_mean_after, after[layer.name][0])
        assert report.layer("a").weight is None and report.layer("b").weight.dtype == torch.float64


class _WritesItsBuffers(nn.Module):
    """An eval-mode forward whose own code writes a BN layer's buffers (in place, and by
    replacing the tensor) before calling it: "after" must show what the layer ended with."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.inplace, self.replaced, self.untouched = (nn.BatchNorm2d(4) for _ in range(3))

    def forward(self, x):
        with torch.no_grad():
            self.inplace.running_mean.add_(1.0)
        self.replaced.running_var = self.replaced.running_var * 2.0
        x = self.inplace(self.conv(x))
        return self.untouched(self.replaced(x))


def test_running_stats_after_an_eval_forward_follow_writes_by_the_model():
    """Buffers nothing wrote keep the report's copies from before the forward (one copy,
    not two); any write -- in place or by replacing the tensor -- is seen."""
    net = _WritesItsBuffers().eval()
    x = torch.randn(2, 3, 5, 5)
    for _ in range(2):  # a fresh private copy, then a pooled one
        report = bnviz.inspect(net, x, modes="eval", keep_tensors=False)
        inplace, replaced, untouched = (report.layer(n)
                                        for n in ("inplace", "replaced", "untouched"))
        torch.testing.assert_close(inplace.running_mean_after, inplace.running_mean_before + 1)
        torch.testing.assert_close(replaced.running_var_after, replaced.running_var_before * 2)
        assert torch.equal(untouched.running_mean_after, net.untouched.running_mean)
        assert untouched.running_mean_after is untouched.running_mean_before
        assert inplace.num_batches_tracked_after == inplace.num_batches_tracked_before == 0
    # and the caller's model was not touched by either forward
    assert torch.equal(net.inplace.running_mean, torch.zeros(4))
    assert torch.equal(net.replaced.running_var, torch.ones(4))


def test_other_modules_eval_and_keep_alternate():
    """The non-BN flags are reset only when ``other_modules`` changes: alternating "keep"
    (a Dropout in train mode stays random) and "eval" (deterministic) must never leak."""

    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.drop(x))

    net = WithDropout().train()
    x = torch.randn(4, 3, 6, 6) + 2.0
    want = x.mean(dim=(0, 2, 3))
    for other in ("eval", "keep", "eval", "eval", "keep", "eval"):
        means = [bnviz.inspect(net, x, modes="train", other_modules=other,
                               keep_tensors=False).layer("bn").batch_mean for _ in range(2)]
        if other == "eval":
            torch.testing.assert_close(means[0], want)
            assert torch.equal(means[0], means[1])
        else:
            assert not torch.allclose(means[0], want, atol=1e-3)
            assert not torch.equal(means[0], means[1])
    assert net.drop.training and net.bn.training


def test_layer_names_follow_renamed_and_replaced_modules():
    """Layer names are cached per module structure; a renamed child (same module objects)
    or a BN layer replaced by another type under the same name must be seen."""
    from collections import OrderedDict

    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 1), bn=nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 4, 4)

    def names():
        return [layer.name for layer in bnviz.inspect(net, x, keep_tensors=False).layers]

    assert names() == ["bn"]
    bn = net.bn
    del net.bn
    net.add_module("norm", bn)
    assert names() == ["norm"]
    net.norm = nn.GroupNorm(2, 4)
    report = bnviz.inspect(net, x, keep_tensors=False)
    assert report.layers == [] and "no_batchnorm" in report.notes
    net.norm = bn
    assert names() == ["norm"]


class _RecordingSink:
    """A TensorSink that notes what it is handed, and when, relative to the forward."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.handed: dict[str, bnviz.inspection.KeptTensors] = {}
        self.changed_names: list[str] = []

    def ready(self, name, tensors) -> None:
        self.events.append(f"ready {name}")
        # what the values were at hand-off time (the tensors themselves may change later)
        self.handed[name] = bnviz.inspection.KeptTensors(
            *(t.clone() if isinstance(t, torch.Tensor) else t for t in tensors))

    def changed(self, name) -> None:
        self.events.append(f"changed {name}")
        self.changed_names.append(name)


#: What the forward below has reached (module level: inspect runs a deep copy of the net).
_FORWARD_EVENTS: list[str] = []


class _LateWrites(nn.Module):
    """BN layers whose tensors change after the next BN layer started: an in-place add on
    an activation output, and a BN module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.BatchNorm2d(4)
        self.c = nn.BatchNorm2d(4)
        self.d = nn.BatchNorm2d(4)

    def forward(self, x):
        act = torch.relu(self.a(self.conv1(x)))  # out of place: a new tensor
        y = self.b(self.conv2(act))
        _FORWARD_EVENTS.append("b done")
        act.add_(1.0)  # later, in place, on a's activation output
        y = self.c(y + act)
        y = self.d(y)
        return self.c(y)  # c again: its record is replaced


def test_tensor_sink_gets_layers_during_the_forward_and_hears_of_later_changes():
    events = _FORWARD_EVENTS
    events.clear()
    torch.manual_seed(0)
    net = _LateWrites().eval()
    x = torch.randn(2, 3, 5, 5)
    sink = _RecordingSink(events)
    report = bnviz.inspect(net, x, modes="train", keep_tensors=True, tensor_sink=sink)
    # a is handed over when b starts, before the forward reaches the rest of the network
    assert events.index("ready a") < events.index("b done")
    assert events.index("ready b") > events.index("b done")  # handed when c starts
    assert sorted(sink.handed) == ["a", "b", "c", "d"]  # every kept layer, once
    assert sorted(set(sink.changed_names)) == ["a", "c"]
    # the report keeps what a's activation produced, not what the later add_ made of it
    a = report.layer("a")
    torch.testing.assert_close(a.activation_output, torch.relu(a.output))
    torch.testing.assert_close(a.activation_output, sink.handed["a"].activation_output)
    # unchanged layers: the report's tensors are exactly the ones handed over
    for name in ("b", "d"):
        layer, kept = report.layer(name), sink.handed[name]
        assert torch.equal(layer.input, kept.input) and torch.equal(layer.output, kept.output)
        assert torch.equal(layer.output_reference, kept.output_reference)
        assert kept.overwritten_by == layer.overwritten_by
    # nothing is handed over when no tensors are kept, or only for the named layers
    none = _RecordingSink([])
    bnviz.inspect(net, x, modes="train", keep_tensors=False, tensor_sink=none)
    assert none.handed == {}
    some = _RecordingSink([])
    bnviz.inspect(net, x, modes="train", keep_tensors=["b"], tensor_sink=some)
    assert list(some.handed) == ["b"]
