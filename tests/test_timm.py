"""timm models: loading (``"timm:<name>"``) and BatchNorm layers that apply their own
activation (timm's ``BatchNormAct2d``), checked against PyTorch on random weights.

No test touches the network: the Hugging Face hub cache is an empty temporary folder, the
download server is unreachable (``_host_reachable``) and "pretrained" weights are files made
here, in the hub cache's own layout or handed to timm's loader as a local file.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")
huggingface_hub = pytest.importorskip("huggingface_hub")

from safetensors.torch import save_file  # noqa: E402
from timm.layers import BatchNormAct2d, convert_sync_batchnorm  # noqa: E402

import bnviz  # noqa: E402
from bnviz import models  # noqa: E402
from bnviz.errors import CheckpointError, UnknownModelError, WeightsUnavailableError  # noqa: E402
from bnviz.models import TIMM_MODELS, load_model, weights_status  # noqa: E402

_BN = nn.modules.batchnorm._BatchNorm
_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache and torch hub cache, and no network."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(models, "_host_reachable", lambda origin: False)

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return cache


def _perturbed(module: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """``module``'s state with BN buffers and weights random init never makes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, _BN):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.num_batches_tracked.fill_(9)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key


def _hub_cache_file(cache: Path, hub_id: str, state: dict[str, torch.Tensor]) -> Path:
    """``state`` saved where the hub client keeps ``hub_id``'s model.safetensors."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(_COMMIT)
    snapshot = repo / "snapshots" / _COMMIT
    snapshot.mkdir(parents=True)
    path = snapshot / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def resnet18d_state() -> dict[str, torch.Tensor]:
    return _perturbed(timm.create_model("resnet18d"))


# ------------------------------------------------------------------------------ loading


def test_random_init_is_labelled_with_timm_preprocessing():
    loaded = load_model("timm:ResNet18D", weights=None)
    assert loaded.name == "timm:resnet18d"
    assert loaded.weights == "random init" and loaded.is_random_init
    assert not loaded.module.training
    cfg = timm.data.resolve_model_data_config(loaded.module)
    pre = loaded.preprocess
    assert pre.mean == pytest.approx(cfg["mean"]) and pre.std == pytest.approx(cfg["std"])
    assert pre.input_size == cfg["input_size"][1] == 224
    assert "bicubic" in pre.description and "center crop 224" in pre.description
    assert "resize 256" in pre.description  # 224 / crop_pct 0.875
    assert loaded.notes["timm_data_config"]["interpolation"] == "bicubic"
    assert len(loaded.class_names) == 1000
    report = bnviz.inspect(loaded, torch.rand(2, 3, 64, 64), keep_tensors=False)
    assert report.preprocessing == pre.description
    assert report.weights == "random init" and report.model == "timm:resnet18d"
    assert report.to_dict()["notes"]["timm_data_config"]["crop_pct"] == 0.875


def test_non_imagenet_normalisation_is_not_called_imagenet():
    pre = load_model("timm:tf_efficientnet_lite0", weights=None).preprocess
    assert pre.mean == pytest.approx((0.5, 0.5, 0.5)) and pre.std == pytest.approx((0.5,) * 3)
    assert "ImageNet" not in pre.description


def test_offline_pretrained_raises_weights_unavailable_without_waiting(offline_hf):
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("timm:resnet18d")
    err = info.value
    assert "could not be downloaded" in err.problem and "HF_HUB_OFFLINE" in err.problem
    assert "weights=None" in err.fix and "--weights random" in err.fix
    assert err.url.endswith("timm/resnet18d.ra2_in1k/resolve/main/model.safetensors")
    assert err.cache_dir == str(offline_hf)


def test_unreachable_hub_raises_weights_unavailable(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline, but not told so
    with pytest.raises(WeightsUnavailableError, match="huggingface.co is not reachable"):
        load_model("timm:efficientnet_b0")
    with pytest.raises(WeightsUnavailableError):
        models.fetch_weights("timm:efficientnet_b0")
    assert weights_status("timm:efficientnet_b0") == "unavailable offline"
    assert weights_status("timm:efficientnet_b0", check_network=False) == "not cached"


def test_cached_hub_weights_load_through_timms_loader(offline_hf, resnet18d_state,
                                                      monkeypatch):
    path = _hub_cache_file(offline_hf, "timm/resnet18d.ra2_in1k", resnet18d_state)
    calls = []
    create = timm.create_model

    def spy(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs.get("pretrained_cfg_overlay")))
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    assert weights_status("timm:resnet18d", check_network=False) == "cached"
    loaded = load_model("timm:resnet18d")
    assert calls == [("resnet18d", True, {"file": str(path)})]
    assert loaded.weights_status == "cached"
    assert loaded.weights == "pretrained timm/resnet18d.ra2_in1k (Hugging Face hub cache)"
    assert loaded.notes["weights_file"] == str(path)
    _assert_state(loaded.module, resnet18d_state)
    assert models.fetch_weights("timm:resnet18d") == str(path)


def test_download_goes_to_the_hub_cache_with_progress(offline_hf, resnet18d_state,
                                                      monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_host_reachable", lambda origin: True)
    asked = []

    def fake_download(repo, filename, *, revision=None, cache_dir=None, tqdm_class=None):
        asked.append((repo, filename, cache_dir))
        path = _hub_cache_file(Path(cache_dir), repo, resnet18d_state)
        size = path.stat().st_size
        with tqdm_class(total=size, initial=0, unit="B", desc=filename) as bar:
            bar.update(size // 2)
            bar.update(size - size // 2)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    seen = []
    loaded = load_model("timm:resnet18d", progress=lambda done, total: seen.append((done, total)))
    assert asked == [("timm/resnet18d.ra2_in1k", "model.safetensors", str(offline_hf))]
    assert loaded.weights_status == "downloaded"
    assert "downloaded to Hugging Face hub cache" in loaded.weights
    size = Path(loaded.notes["weights_file"]).stat().st_size
    assert seen == [(size // 2, size), (size, size)]
    _assert_state(loaded.module, resnet18d_state)


def test_timm_pretrained_cfg_overlay_file_loads_local_weights(tmp_path, resnet18d_state):
    path = tmp_path / "mine.pth"
    torch.save(resnet18d_state, path)
    loaded = load_model("timm:resnet18d",
                        arch_kwargs={"pretrained_cfg_overlay": {"file": str(path)}})
    assert loaded.weights_status == "checkpoint" and str(path) in loaded.weights
    _assert_state(loaded.module, resnet18d_state)


def test_unreadable_pretrained_files_say_what_to_do(offline_hf, tmp_path, resnet18d_state):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("timm:resnet18d",
                   arch_kwargs={"pretrained_cfg_overlay": {"file": str(tmp_path / "no.pth")}})
    path = _hub_cache_file(offline_hf, "timm/resnet18d.ra2_in1k", resnet18d_state)
    path.write_bytes(path.read_bytes()[:1000])  # a truncated download
    with pytest.raises(CheckpointError, match="could not be loaded by timm") as info:
        load_model("timm:resnet18d")
    assert str(path) in info.value.problem and "delete it" in info.value.fix


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_files_load_strictly(tmp_path, resnet18d_state, suffix):
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        torch.save(resnet18d_state, path)
    else:
        save_file(resnet18d_state, str(path))
    loaded = load_model("timm:resnet18d", weights=str(path))
    assert loaded.weights_status == "checkpoint"
    _assert_state(loaded.module, resnet18d_state)


def test_unknown_names_list_close_matches():
    with pytest.raises(UnknownModelError) as info:
        load_model("timm:resnet50x", weights=None)
    assert "timm:resnet50d" in info.value.problem
    assert "timm.list_models" in info.value.fix
    with pytest.raises(UnknownModelError, match="no pretrained tag 'nope'") as info:
        load_model("timm:efficientnet_b0.nope", weights=None)
    assert "timm:efficientnet_b0.ra_in1k" in info.value.fix
    with pytest.raises(UnknownModelError):
        load_model("timm:", weights=None)


def test_curated_list_is_timm_models_with_batchnorm_and_pretrained_weights():
    assert "timm:efficientnet_b0" in TIMM_MODELS and "timm:resnet50d" in TIMM_MODELS
    for name in TIMM_MODELS:
        assert models._resolve_name(name) == name
        assert models.architecture_bn_count(name) > 0, name
        assert timm.models.get_pretrained_cfg(name[5:]).hf_hub_id, name
        assert weights_status(name, check_network=False) == "not cached"


# ------------------------------------------------------------------- BatchNormAct2d


def _native_calls(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Every BN layer's input, normalised output and activation output, from hooks on the
    model itself (clones: timm's activations run in place)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if not isinstance(m, _BN):
            continue
        entry = seen.setdefault(name, {})
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, e=entry: e.__setitem__("input", args[0].detach().clone())))
        first = m._modules.get("drop") if isinstance(m, BatchNormAct2d) else None
        if first is not None:
            handles.append(first.register_forward_pre_hook(
                lambda mod, args, e=entry: e.__setitem__("pre", args[0].detach().clone())))
        handles.append(m.register_forward_hook(
            lambda mod, args, out, e=entry: e.__setitem__("out", out.detach().clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _bn_train_copy(model: nn.Module) -> nn.Module:
    """``model`` with its BN layers in train mode and everything else in eval, as
    ``inspect(modes="train")`` runs it."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, _BN):
            m.training = True
    return twin


@pytest.fixture(scope="module")
def timm_nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: timm.create_model(name).eval() for name in ("resnet18d", "efficientnet_b0")}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("arch", ["resnet18d", "efficientnet_b0"])
def test_every_layer_matches_pytorch(timm_nets, arch, mode):
    """ResNet-D (plain BatchNorm2d) and EfficientNet (BatchNormAct2d with SiLU or nothing):
    statistics, outputs before the activation, activation outputs and running updates, all
    against the native model with hooks."""
    model = timm_nets[arch]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    native_model = model if mode == "eval" else _bn_train_copy(model)
    native = _native_calls(native_model, x)
    report = bnviz.inspect(model, x, modes=mode, device="cpu")
    bns = dict((n, m) for n, m in model.named_modules() if isinstance(m, _BN))
    assert [layer.name for layer in report.layers] == list(bns)
    fused = 0
    for layer in report.layers:
        m, got = bns[layer.name], native[layer.name]
        # manual vs native on the same quantity: tiny next to the output's scale
        assert layer.max_rel_diff < 1e-5, (layer.name, layer.max_abs_diff)
        torch.testing.assert_close(layer.input, got["input"], rtol=0, atol=0)
        xd = got["input"].double()
        torch.testing.assert_close(layer.batch_mean.double(), xd.mean(dim=(0, 2, 3)),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.batch_var.double(),
                                   xd.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
        training = mode == "train"
        expected = F.batch_norm(got["input"], None if training else m.running_mean,
                                None if training else m.running_var, m.weight, m.bias,
                                training, 0.0, m.eps)
        # the layer's BN output is the normalised value, before any activation
        torch.testing.assert_close(layer.output, expected, rtol=1e-5, atol=1e-5)
        act = getattr(m, "act", None)
        if isinstance(act, nn.Identity) or act is None:
            assert layer.fused_activation is None
            torch.testing.assert_close(layer.output, got["out"], rtol=0, atol=0)
        else:
            fused += 1
            assert layer.fused_activation == type(act).__name__ == "SiLU"
            assert layer.activation == "silu" and layer.activation_inplace is True
            torch.testing.assert_close(layer.output, got["pre"], rtol=0, atol=0)
            torch.testing.assert_close(layer.activation_output, F.silu(layer.output),
                                       rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer.activation_output, got["out"], rtol=0, atol=0)
            # a hook keeping a reference to F.batch_norm's result sees the activation
            assert layer.overwritten_by == "silu"
            torch.testing.assert_close(layer.output_reference, got["out"], rtol=0, atol=0)
        if training:
            twin = dict(native_model.named_modules())[layer.name]
            torch.testing.assert_close(layer.running_mean_after, twin.running_mean,
                                       rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.running_var_after, twin.running_var,
                                       rtol=1e-5, atol=1e-6)
            assert layer.running_update_max_abs_diff < 1e-5
    assert fused == (33 if arch == "efficientnet_b0" else 0)


def test_statistics_only_runs_compare_the_same_quantity(timm_nets):
    model = timm_nets["efficientnet_b0"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for _ in range(2):  # the second run reuses what the first learned about consumers
        for mode in ("train", "eval"):
            report = bnviz.inspect(model, x, modes=mode, keep_tensors=False, device="cpu")
            assert max(layer.max_rel_diff for layer in report.layers) < 1e-5
            bn1 = report.layer("bn1")
            assert (bn1.fused_activation, bn1.activation, bn1.output) == ("SiLU", "silu", None)


def _twins(act: type[nn.Module], drop: bool = False) -> tuple[nn.Module, nn.Module]:
    """One net with BatchNormAct2d and one with BatchNorm2d followed by the same activation,
    same parameters."""
    torch.manual_seed(5)
    fused = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 6, 3),
        bn=BatchNormAct2d(6, act_layer=act, drop_layer=nn.Dropout if drop else None),
        head=nn.Conv2d(6, 4, 1)))
    plain = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 6, 3), bn=nn.BatchNorm2d(6),
                                      act=act(inplace=True), head=nn.Conv2d(6, 4, 1)))
    _perturbed(fused, seed=6)
    plain.load_state_dict(fused.state_dict())
    return fused.eval(), plain.eval()


@pytest.mark.parametrize("mode", ["eval", "train", "train,track=off", "eval,track=none",
                                  "train,momentum=none", "eval,track=on"])
def test_batchnormact_behaves_like_batchnorm_then_activation(mode):
    fused, plain = _twins(nn.ReLU)
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(7))
    a = bnviz.inspect(fused, x, modes=mode, device="cpu", commit=True)
    b = bnviz.inspect(plain, x, modes=mode, device="cpu", commit=True)
    la, lb = a.layer("bn"), b.layer("bn")
    assert la.type == "BatchNormAct2d" and la.fused_activation == "ReLU"
    assert lb.fused_activation is None
    assert (la.mode, la.stats_used, la.updates_running_stats) == (
        lb.mode, lb.stats_used, lb.updates_running_stats)
    assert la.max_abs_diff < 1e-5 and lb.max_abs_diff < 1e-5
    for field in ("batch_mean", "batch_var", "running_mean_after", "running_var_after",
                  "output", "activation_output"):
        va, vb = getattr(la, field), getattr(lb, field)
        assert (va is None) == (vb is None), field
        if va is not None:
            torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=field)
    torch.testing.assert_close(la.activation_output, F.relu(la.output), rtol=0, atol=0)
    assert (la.activation, la.activation_inplace, la.overwritten_by) == (
        lb.activation, lb.activation_inplace, lb.overwritten_by) == ("relu", True, "relu")
    _assert_state(fused, plain.state_dict())  # the same running update, committed


def test_layer_dropout_stays_off_in_a_train_mode_inspection():
    """modes="train" is the BN layer's own: the dropout inside a norm-act layer runs in
    eval like every other non-BN module (other_modules="eval")."""
    fused, _ = _twins(nn.ReLU, drop=True)
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(8))
    layer = bnviz.inspect(fused, x, modes="train", device="cpu").layer("bn")
    torch.testing.assert_close(layer.activation_output, F.relu(layer.output), rtol=0, atol=0)
    assert layer.max_abs_diff < 1e-5
    assert not fused.bn.drop.training  # the caller's model is untouched


def test_sync_batchnorm_act_keeps_its_activation(timm_nets):
    model = convert_sync_batchnorm(copy.deepcopy(timm_nets["efficientnet_b0"])).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    report = bnviz.inspect(model, x, modes="eval", device="cpu", keep_tensors=["bn1"])
    assert max(layer.max_rel_diff for layer in report.layers) < 1e-5
    bn1 = report.layer("bn1")
    assert bn1.fused_activation == "SiLU"
    torch.testing.assert_close(bn1.activation_output, F.silu(bn1.output), rtol=1e-6, atol=1e-6)
    top = probs.topk(5, dim=1)
    for row, values, indices in zip(report.predictions, top.values, top.indices):
        assert [p.index for p in row] == indices.tolist()
        assert [p.probability for p in row] == pytest.approx(values.tolist(), rel=1e-5)


def test_batchnormact_on_every_device(device):
    """The general check (eager on CUDA) measures the same pre-activation value."""
    fused, plain = _twins(nn.SiLU)
    x = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(10))
    for mode in ("train", "eval"):
        la = bnviz.inspect(fused, x, modes=mode, device=device).layer("bn")
        lb = bnviz.inspect(plain, x, modes=mode, device=device).layer("bn")
        assert la.max_rel_diff < 1e-5 and la.fused_activation == "SiLU"
        for field in ("batch_mean", "batch_var", "output", "activation_output"):
            torch.testing.assert_close(getattr(la, field), getattr(lb, field), rtol=0, atol=0)
