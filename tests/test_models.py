"""Tests for bnviz.models: registry, weights sources, checkpoints, preprocessing.

No test touches the network: an autouse fixture replaces the URL opener with one that fails
like an offline machine, and points TORCH_HOME at an empty temporary folder so the real torch
hub cache can neither help nor be polluted. "Pretrained" torchvision weights are simulated by
writing a (perturbed) random state_dict under the exact file name torchvision would download.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bnviz import models
from bnviz.errors import BnvizError, CheckpointError, UnknownModelError, WeightsUnavailableError
from bnviz.models import (
    DEFAULT_MODEL,
    LoadedModel,
    Preprocessing,
    count_bn_layers,
    download_weights,
    fetch_weights,
    from_module,
    list_models,
    load_model,
    weights_status,
)

EXPECTED_MODELS = {
    "efficientnet_lite0",
    "resnet18",
    "resnet50",
    "googlenet",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "vgg11_bn",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "alexnet",
}


def _offline_urlopen(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch) -> Path:
    """Empty TORCH_HOME and no network, for every test; returns the hub checkpoints folder."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(models, "_urlopen", _offline_urlopen)
    models._host_reachable.cache_clear()
    # torch.hub.get_dir() re-reads TORCH_HOME on every call (unless set_dir() was used).
    assert torch.hub.get_dir() == str(home / "hub")
    return home / "hub" / "checkpoints"


def _hub_file(name: str) -> str:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return url.rsplit("/", 1)[1]


def _as_published(monkeypatch, path: Path) -> None:
    """Make the sha256 promise in ``path``'s name match its content: a stand-in for the
    published file (bnviz calls a cached file pretrained only when they match)."""
    from bnviz.models import weights

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(models, "_hash_prefix", lambda filename: digest if filename == path.name
                        else weights._hash_prefix(filename))


def _perturbed_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """State of ``module`` with BN buffers that random init would never produce."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(2.0)
            m.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_state_equal(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() <= expected.keys()
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    return _perturbed_state(torchvision.models.resnet18(weights=None))


@pytest.fixture(scope="module")
def lite() -> LoadedModel:
    return load_model("efficientnet_lite0")


# ------------------------------------------------------------------------------ registry


def test_registry_lists_all_names():
    names = list_models()
    assert names[0] == DEFAULT_MODEL == "efficientnet_lite0"
    assert EXPECTED_MODELS <= set(names)
    assert len(names) == len(set(names))


def test_unknown_model_names_the_available_ones():
    with pytest.raises(UnknownModelError) as info:
        load_model("resnet19")
    message = str(info.value)
    assert "'resnet19'" in message and "Did you mean 'resnet18'?" in message
    for name in EXPECTED_MODELS:
        assert name in message
    with pytest.raises(UnknownModelError, match="choose one of"):
        weights_status("not_a_model")


def test_names_are_forgiving_about_case_and_dashes():
    assert weights_status("EfficientNet-Lite0") == "bundled"


# ------------------------------------------------------------------------------ bundled lite


def test_lite_pretrained_is_bundled_with_tf_style_batchnorm(lite):
    assert lite.name == "efficientnet_lite0"
    assert lite.weights_status == "bundled" and not lite.is_random_init
    assert "bundled" in lite.weights and "pretrained" in lite.weights
    assert not lite.module.training
    assert len(lite.bn_layer_names) == 49 == count_bn_layers(lite.module)
    for name in lite.bn_layer_names:
        bn = lite.module.get_submodule(name)
        assert bn.momentum == pytest.approx(0.01)
        assert bn.eps == pytest.approx(1e-3)
    assert lite.class_names is not None and len(lite.class_names) == 1000
    assert lite.preprocess.input_size == 224
    assert "127" in lite.preprocess.description and "128" in lite.preprocess.description


def _as_input(image, size: int = 224) -> torch.Tensor:
    """uint8 HWC image -> (1, 3, size, size) in [0, 1], resized straight to size x size."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def test_lite_recognises_cat_and_espresso(lite):
    """Proves weights, preprocessing and class-name order are all right at once."""
    batch = torch.cat([_as_input(skimage.data.chelsea()), _as_input(skimage.data.coffee())])
    with torch.no_grad():
        probs = lite.module(lite.preprocess(batch)).softmax(dim=1)
    top_p, top_i = probs.max(dim=1)
    assert lite.class_names[top_i[0]] == "Egyptian cat" and top_p[0] > 0.5
    assert lite.class_names[top_i[1]] == "espresso" and top_p[1] > 0.5


def test_lite_random_init_keeps_lite_preprocessing():
    loaded = load_model("efficientnet_lite0", weights="random")
    assert loaded.is_random_init and loaded.weights == "random init"
    assert loaded.preprocess.mean == pytest.approx((127 / 255,) * 3)
    assert len(loaded.class_names) == 1000


# ------------------------------------------------------------------------------ hub cache


def test_cached_torchvision_weights_are_loaded_exactly(offline_hub, resnet18_state,
                                                       monkeypatch):
    offline_hub.mkdir(parents=True)
    path = offline_hub / _hub_file("resnet18")
    assert path.name == "resnet18-f37072fd.pth"
    torch.save(resnet18_state, path)
    _as_published(monkeypatch, path)
    assert weights_status("resnet18") == "cached"

    loaded = load_model("resnet18")
    assert loaded.weights_status == "cached" and not loaded.is_random_init
    assert "IMAGENET1K_V1" in loaded.weights and "cache" in loaded.weights
    assert loaded.notes["weights_file"] == str(path)
    assert not loaded.module.training
    _assert_state_equal(loaded.module, resnet18_state)
    assert loaded.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert loaded.preprocess.std == pytest.approx((0.229, 0.224, 0.225))
    assert loaded.preprocess.input_size == 224
    assert loaded.class_names[0] == "tench" and len(loaded.class_names) == 1000
    assert len(loaded.bn_layer_names) == 20


def test_cached_googlenet_uses_transform_input_and_drops_aux(offline_hub, monkeypatch):
    source = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    state = _perturbed_state(source)
    offline_hub.mkdir(parents=True)
    torch.save(state, offline_hub / _hub_file("googlenet"))
    _as_published(monkeypatch, offline_hub / _hub_file("googlenet"))

    loaded = load_model("googlenet")
    assert loaded.weights_status == "cached"
    assert loaded.notes["transform_input"] is True
    assert loaded.module.aux1 is None and loaded.module.aux2 is None
    _assert_state_equal(loaded.module, state)
    with torch.no_grad():
        assert loaded.module(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)

    # The same file as a user checkpoint: the aux heads do not fit the default build, and the
    # error says how to make them fit.
    hub_file = str(offline_hub / _hub_file("googlenet"))
    with pytest.raises(CheckpointError, match="aux_logits"):
        load_model("googlenet", weights=hub_file)
    kwargs = {"aux_logits": True, "transform_input": True}
    as_ckpt = load_model("googlenet", weights=hub_file, arch_kwargs=kwargs)
    assert as_ckpt.notes["transform_input"] is True and as_ckpt.weights_status == "checkpoint"
    _assert_state_equal(as_ckpt.module, state)


def test_pretrained_rejects_a_different_head_before_downloading():
    with pytest.raises(BnvizError, match="num_classes=1000"):
        load_model("resnet18", arch_kwargs={"num_classes": 10})


def test_densenet_legacy_keys_are_renamed_like_torchvision_does():
    old = {
        "features.denseblock1.denselayer1.norm.1.weight": torch.ones(1),
        "features.denseblock1.denselayer1.conv.2.weight": torch.ones(1),
        "classifier.weight": torch.ones(1),
    }
    models._remap_legacy_keys("densenet121", old)
    assert sorted(old) == [
        "classifier.weight",
        "features.denseblock1.denselayer1.conv2.weight",
        "features.denseblock1.denselayer1.norm1.weight",
    ]


def test_corrupt_cached_file_says_to_delete_it(offline_hub, monkeypatch):
    offline_hub.mkdir(parents=True)
    (offline_hub / _hub_file("resnet18")).write_bytes(b"not a torch file")
    _as_published(monkeypatch, offline_hub / _hub_file("resnet18"))  # the name's hash matches
    with pytest.raises(CheckpointError, match="delete it"):
        load_model("resnet18")


def test_missing_weights_offline_explain_where_to_put_the_file(offline_hub):
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet18")
    err = info.value
    message = str(err)
    for part in ("resnet18", "resnet18-f37072fd.pth", url, str(offline_hub), "weights=None"):
        assert part in message
    assert "--weights random" in message
    assert (err.url, err.filename, err.cache_dir) == (
        url,
        "resnet18-f37072fd.pth",
        str(offline_hub),
    )
    assert os.listdir(offline_hub) == []  # no partial file left behind


def test_download_reports_progress_and_verifies_hash(tmp_path):
    payload = os.urandom(300_000)
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    calls: list[tuple[int, int]] = []

    def serve(request, timeout):
        assert timeout <= 10
        return urllib.request.urlopen(source.as_uri())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_urlopen", serve)
        dest = cache / f"weights-{digest[:8]}.pth"
        got = download_weights(
            "https://example.invalid/w.pth",
            dest,
            hash_prefix=digest[:8],
            progress=lambda done, total: calls.append((done, total)),
        )
        assert got == str(dest) and dest.read_bytes() == payload
        assert len(calls) > 1
        assert [d for d, _ in calls] == sorted({d for d, _ in calls})
        assert calls[-1] == (len(payload), len(payload))

        bad_prefix = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
        with pytest.raises(WeightsUnavailableError, match="sha256") as info:
            download_weights(
                source.as_uri(), cache / f"other-{bad_prefix}.pth", hash_prefix=bad_prefix
            )
        assert "other-" in str(info.value) and info.value.filename.startswith("other-")
    assert sorted(os.listdir(cache)) == [dest.name]  # rejected file and temp files are gone


def test_load_model_downloads_into_the_cache(offline_hub, resnet18_state, tmp_path, monkeypatch):
    source = tmp_path / "served.pth"
    torch.save(resnet18_state, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    opened: list[str] = []

    def serve(request, timeout):
        opened.append(request.full_url)
        return urllib.request.urlopen(source.as_uri())

    monkeypatch.setattr(models, "_urlopen", serve)
    # The served file is not the official one, so make the file-name hash promise match it.
    monkeypatch.setattr(models, "_hash_prefix", lambda filename: digest[:8])
    calls: list[tuple[int, int]] = []
    loaded = load_model("resnet18", progress=lambda d, t: calls.append((d, t)))
    assert opened == [torchvision.models.get_model_weights("resnet18").DEFAULT.url]
    assert loaded.weights_status == "downloaded" and "downloaded" in loaded.weights
    assert calls[-1] == (source.stat().st_size, source.stat().st_size)
    _assert_state_equal(loaded.module, resnet18_state)
    assert os.listdir(offline_hub) == ["resnet18-f37072fd.pth"]
    assert weights_status("resnet18") == "cached"


def test_fetch_weights_downloads_once_and_builds_no_model(offline_hub, resnet18_state,
                                                        tmp_path, monkeypatch):
    """What the dashboard calls to show a download's progress: the file lands in the hub
    cache, no network is built, a second call and the later load_model read the cache."""
    source = tmp_path / "served.pth"
    torch.save(resnet18_state, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    opened: list[str] = []
    built: list[str] = []

    def serve(request, timeout):
        opened.append(request.full_url)
        return urllib.request.urlopen(source.as_uri())

    build = models._build_torchvision
    monkeypatch.setattr(models, "_urlopen", serve)
    monkeypatch.setattr(models, "_hash_prefix", lambda filename: digest[:8])
    monkeypatch.setattr(models, "_build_torchvision",
                        lambda name, kwargs: built.append(name) or build(name, kwargs))
    calls: list[tuple[int, int]] = []
    path = fetch_weights("resnet18", progress=lambda d, t: calls.append((d, t)))
    assert path == str(offline_hub / "resnet18-f37072fd.pth") and os.path.isfile(path)
    assert len(opened) == 1 and built == []
    assert calls[-1] == (source.stat().st_size, source.stat().st_size)
    assert fetch_weights("resnet18") == path and len(opened) == 1
    loaded = load_model("resnet18")
    assert loaded.weights_status == "cached" and built == ["resnet18"] and len(opened) == 1
    _assert_state_equal(loaded.module, resnet18_state)
    with pytest.raises(BnvizError, match="ships its weights"):
        fetch_weights(DEFAULT_MODEL)


# ------------------------------------------------------------------------------ random init


def test_random_init_is_labelled(resnet18_state):
    for spelling in (None, "random"):
        loaded = load_model("resnet18", weights=spelling)
        assert loaded.weights == "random init" and loaded.weights_status == "random init"
        assert loaded.is_random_init and not loaded.module.training
        assert len(loaded.class_names) == 1000
        assert loaded.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))


def test_random_googlenet_notes_transform_input_false():
    loaded = load_model("googlenet", weights=None)
    assert loaded.notes["transform_input"] is False
    assert loaded.module.aux1 is None


def test_alexnet_has_no_batchnorm_and_still_loads():
    loaded = load_model("alexnet", weights=None)
    assert loaded.bn_layer_names == [] and count_bn_layers(loaded.module) == 0


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module_prefix"])
def test_checkpoint_round_trip(tmp_path, resnet18_state, wrap):
    if wrap == "raw":
        payload: object = resnet18_state
    elif wrap == "module_prefix":
        payload = {f"module.{k}": v for k, v in resnet18_state.items()}
    else:
        payload = {wrap: resnet18_state, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    loaded = load_model("resnet18", weights=str(path))
    assert loaded.weights == f"checkpoint {path}" and loaded.weights_status == "checkpoint"
    assert not loaded.is_random_init and not loaded.module.training
    _assert_state_equal(loaded.module, resnet18_state)


def test_checkpoint_key_problems_are_listed(tmp_path, resnet18_state):
    path = tmp_path / "bad.pt"

    missing = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
    torch.save(missing, path)
    with pytest.raises(CheckpointError) as info:
        load_model("resnet18", weights=path)
    assert "resnet18" in str(info.value)
    assert "2 missing keys (fc.weight, fc.bias)" in str(info.value)

    extra = {**resnet18_state, **{f"extra{i}.weight": torch.zeros(1) for i in range(12)}}
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match=r"12 unexpected keys \(extra0.weight") as info:
        load_model("resnet18", weights=path)
    assert "(+2 more)" in str(info.value)

    reheaded = {**resnet18_state, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    torch.save(reheaded, path)
    with pytest.raises(CheckpointError, match=r"2 shape mismatches \(fc.weight: file \(10, 512\)"):
        load_model("resnet18", weights=path)
    ten = load_model("resnet18", weights=path, arch_kwargs={"num_classes": 10})
    assert ten.class_names is None and ten.module.fc.out_features == 10


class _NotATensor:
    pass


def test_unreadable_checkpoints_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a loadable PyTorch file"):
        load_model("resnet18", weights=corrupt)

    pickled = tmp_path / "pickled.pt"
    torch.save({"a": _NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        load_model("resnet18", weights=pickled)
    assert "torch.save(model.state_dict()" in str(info.value)

    numbers = tmp_path / "numbers.pt"
    torch.save({"a": 1, "b": torch.zeros(1)}, numbers)
    with pytest.raises(CheckpointError, match="not a mapping of tensors"):
        load_model("resnet18", weights=numbers)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("resnet18", weights=str(tmp_path / "nope.pt"))


# ------------------------------------------------------------------------------ custom modules


def test_from_module_finds_1d_and_3d_batchnorm():
    module = nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.Unflatten(1, (1, 2, 2, 2)),
        nn.BatchNorm3d(1),
        nn.InstanceNorm1d(3),
    )
    wrapped = from_module(module, name="toy")
    assert wrapped.bn_layer_names == ["1", "3"]
    assert wrapped.weights_status == "custom" and not wrapped.is_random_init
    assert wrapped.name == "toy" and wrapped.class_names is None
    assert wrapped.module is module and module.training  # used exactly as given
    via_load = load_model(module)
    assert via_load.weights_status == "custom" and via_load.bn_layer_names == ["1", "3"]


# ------------------------------------------------------------------------------ preprocessing


def test_preprocessing_round_trips_and_keeps_shape():
    prep = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, "imagenet")
    raw = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    out = prep(raw)
    assert out.dtype == torch.float32 and out.shape == raw.shape
    expected = (raw.float() - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(
        3, 1, 1
    )
    assert torch.allclose(out, expected)
    assert torch.allclose(prep.invert(out), raw.float(), atol=1e-6)
    with pytest.raises(ValueError):
        prep(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_lite_preprocessing_is_tf_style(lite):
    raw = torch.rand(2, 3, 8, 8)
    assert torch.allclose(lite.preprocess(raw), (raw * 255 - 127) / 128, atol=1e-6)


# ------------------------------------------------------------------------------ weights_status


def test_weights_status(offline_hub, monkeypatch):
    assert weights_status("efficientnet_lite0") == "bundled"
    assert weights_status("mobilenet_v3_small", check_network=False) == "not cached"
    monkeypatch.setattr(models, "_host_reachable", lambda origin: False)
    assert weights_status("mobilenet_v3_small") == "unavailable offline"
    monkeypatch.setattr(models, "_host_reachable", lambda origin: True)
    assert weights_status("mobilenet_v3_small") == "downloadable"
    offline_hub.mkdir(parents=True)
    (offline_hub / _hub_file("mobilenet_v3_small")).write_bytes(b"anything")
    assert weights_status("mobilenet_v3_small") == "cached"


def test_network_probe_treats_http_errors_as_reachable(monkeypatch):
    def http_403(request, timeout):
        assert timeout <= 5
        raise urllib.error.HTTPError(request.full_url, 403, "Forbidden", {}, None)

    monkeypatch.setattr(models, "_urlopen", http_403)
    assert models._host_reachable("https://download.pytorch.org") is True
    monkeypatch.setattr(models, "_urlopen", _offline_urlopen)
    models._host_reachable.cache_clear()
    assert models._host_reachable("https://download.pytorch.org") is False
