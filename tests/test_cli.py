"""The bnviz CLI: tables, the public JSON schema, exit codes and one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch

from bnviz import cli, models

LAYER_KEYS = {
    "name", "num_features", "training", "track_running_stats", "momentum", "eps", "stats_used",
    "batch_mean", "batch_var", "running_mean_before", "running_var_before", "running_mean_after",
    "running_var_after", "weight", "bias", "num_batches_tracked_before",
    "num_batches_tracked_after", "max_abs_diff",
}


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_table_default_model(capsys):
    code, out, err = run(capsys, "inspect", "--stimulus", "image:chelsea", "--size", "128")
    assert code == 0, err
    assert "efficientnet_lite0" in out and "_blocks.15._bn2" in out
    assert "manual vs native BN: max relative difference" in out
    assert "eval,track=on,momentum=0.01" in out


def test_inspect_json_schema_and_modes(capsys):
    code, out, err = run(
        capsys, "inspect", "--stimulus", "grating:orientation=45", "--batch-size", "2",
        "--size", "96", "--mode", "eval", "--layer-mode", "_bn0=train,momentum=none",
        "--layer-mode", "_blocks.0._bn1=eval,track=none", "--json", "-",
    )
    assert code == 0, err
    payload = json.loads(out)
    assert {"model", "weights", "device", "input_shape", "predictions", "layers"} <= set(payload)
    assert payload["input_shape"] == [2, 3, 96, 96] and payload["device"] == "cpu"
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert len(layers) == 49
    for layer in layers.values():
        assert LAYER_KEYS <= set(layer)
        assert layer["max_abs_diff"] < 1e-3
    bn0 = layers["_bn0"]
    assert bn0["training"] and bn0["stats_used"] == "batch" and bn0["momentum"] is None
    assert bn0["num_batches_tracked_after"] == bn0["num_batches_tracked_before"] + 1
    assert bn0["running_mean_after"] != bn0["running_mean_before"]
    none = layers["_blocks.0._bn1"]
    assert none["stats_used"] == "batch" and none["running_mean_before"] is None
    assert layers["_blocks.1._bn0"]["stats_used"] == "running"
    assert len(payload["predictions"]) == 2 and len(payload["predictions"][0]) == 5


def test_inspect_json_to_file(tmp_path, capsys):
    target = tmp_path / "r.json"
    code, _, err = run(capsys, "inspect", "--size", "64", "--json", str(target))
    assert code == 0, err
    assert json.loads(target.read_text())["model"] == "efficientnet_lite0"


def test_inspect_image_file_and_alexnet(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(path)
    code, out, err = run(capsys, "inspect", "--stimulus", str(path), "--size", "64")
    assert code == 0, err
    code, out, err = run(capsys, "inspect", "--model", "alexnet", "--weights", "random",
                         "--size", "64")
    assert code == 0, err
    assert "no BatchNorm layers" in out and "random init" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["inspect", "--model", "resnet19"], "resnet19"),
        (["inspect", "--mode", "training"], "train' or 'eval"),
        (["inspect", "--layer-mode", "_bn99=eval"], "_bn99"),
        (["inspect", "--layer-mode", "oops"], "NAME=MODE"),
        (["inspect", "--stimulus", "missing.png"], "missing.png"),
        (["inspect", "--stimulus", "grating:orientaton=45"], "orientaton"),
        (["inspect", "--batch-size", "0"], "batch-size"),
        (["inspect", "--weights", "/nonexistent/ckpt.pt"], "ckpt.pt"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("bnviz: error: ") and needle in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cuda_missing(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    code, _, err = run(capsys, "inspect", "--size", "64", "--device", "cuda")
    assert code == 2 and "CUDA" in err and "--device cpu" in err


def test_single_value_per_channel_is_explained(capsys):
    # resnet18 at 32 px, batch 1, train mode: layer4 sees 1x1 maps -> one value per channel.
    code, _, err = run(capsys, "inspect", "--model", "resnet18", "--weights", "random",
                       "--size", "32", "--mode", "train")
    assert code == 2 and "one value per channel" in err and "layer4" in err


def test_missing_weights_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(models, "_urlopen", offline)
    code, _, err = run(capsys, "inspect", "--model", "resnet18")
    assert code == 2
    assert "resnet18-f37072fd.pth" in err and "download.pytorch.org" in err
    assert str(tmp_path) in err and "random" in err


def test_models_listing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    code, out, err = run(capsys, "models", "--offline", "--json", "-")
    assert code == 0, err
    rows = {r["model"]: r for r in json.loads(out)["models"]}
    assert rows["efficientnet_lite0"] == {"model": "efficientnet_lite0", "bn_layers": 49,
                                          "weights": "bundled"}
    assert rows["alexnet"]["bn_layers"] == 0
    assert rows["resnet18"]["bn_layers"] == 20 and rows["resnet18"]["weights"] == "not cached"
    assert rows["googlenet"]["bn_layers"] == 57


def test_console_script_no_traceback():
    """The real entry point, in a subprocess: exit status and stderr as a user sees them."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "bnviz", "inspect", "--model", "nope"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("bnviz: error: Unknown model") or "nope" in proc.stderr
    assert "Traceback" not in proc.stderr
