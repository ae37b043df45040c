"""Integrity of what is cached and loaded (issue 22, section 5): weights in the torch hub
cache are called pretrained only when they are the published file, a damaged compiled probe
is never loaded, checkpoints that run code, use an unreadable pickle or hold NaN are refused
in one line, and the CLI's numbers are checked instead of falling back to defaults."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import types
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

import bnviz
from bnviz import cli, models, probe_kernel
from bnviz.errors import BnvizError, CheckpointError, WeightsUnavailableError
from bnviz.models import fetch_weights, load_model
from bnviz.models import weights as weights_module

ROOT = Path(__file__).resolve().parents[1]
RESNET18_FILE = "resnet18-f37072fd.pth"
RESNET18_URL = "https://download.pytorch.org/models/" + RESNET18_FILE


def _offline(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME, no network; returns the hub checkpoints folder (created)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(models, "_urlopen", _offline)
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("bnviz: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# -- 1. the hub cache: only the published file is called pretrained ---------------------------


def test_random_weights_under_the_published_name_are_not_called_pretrained(hub, resnet18_state,
                                                                         capsys):
    """A random init saved as resnet18-f37072fd.pth was labelled "pretrained IMAGENET1K_V1".
    Its sha256 does not start with f37072fd: offline, that is a WeightsUnavailableError (the
    dashboard's random-init offer) that says the file is not the published one."""
    path = hub / RESNET18_FILE
    torch.save(resnet18_state, path)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet18")
    err = info.value
    message = str(err)
    assert f"is not the published {RESNET18_FILE}" in message
    assert f"starts with {_sha(path)[:8]}, but the file name promises f37072fd" in message
    assert "delete it" in message and "--weights random" in message
    assert (err.url, err.filename, err.cache_dir) == (RESNET18_URL, RESNET18_FILE, str(hub))
    assert path.read_bytes()  # the user's file is left where it was
    with pytest.raises(WeightsUnavailableError, match="not the published"):
        fetch_weights("resnet18")  # what the dashboard calls before building the model
    assert load_model("resnet18", weights=None).weights == "random init"
    line = _one_line_exit_2(capsys, ["inspect", "--model", "resnet18", "--size", "64"])
    assert "not the published" in line and "pretrained" in line


def test_a_file_whose_hash_matches_its_name_is_pretrained_and_hashed_once(hub, resnet18_state,
                                                                          monkeypatch):
    """The right prefix: labelled pretrained from the cache; the file is hashed once per
    process (per path, size, mtime), not on every load."""
    path = hub / RESNET18_FILE
    torch.save(resnet18_state, path)
    digest = _sha(path)
    monkeypatch.setattr(models, "_hash_prefix", lambda filename: digest[:10])
    hashed: list[int] = []

    def counting_sha256(*args):
        hashed.append(1)
        return hashlib.sha256(*args)

    monkeypatch.setattr(weights_module, "hashlib", types.SimpleNamespace(sha256=counting_sha256))
    for _ in range(3):
        loaded = load_model("resnet18")
        assert loaded.weights_status == "cached" and "pretrained IMAGENET1K_V1" in loaded.weights
    assert len(hashed) == 1
    # Replaced by another file: hashed again, and refused.
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in resnet18_state.items()},
               path)
    with pytest.raises(WeightsUnavailableError, match="not the published"):
        load_model("resnet18")
    assert len(hashed) == 3  # the new file, then the (offline) download's running hash


def test_a_wrong_cached_file_is_replaced_by_a_verified_download(hub, resnet18_state, tmp_path,
                                                                monkeypatch):
    """Online, the file that is not the published one is downloaded again: the verified copy
    replaces it, and the model says "downloaded"."""
    served = tmp_path / "served.pth"
    torch.save(resnet18_state, served)
    digest = _sha(served)
    stale = hub / RESNET18_FILE
    stale.write_bytes(b"a file someone put here")
    opened: list[str] = []

    def serve(request, timeout):
        opened.append(request.full_url)
        return urllib.request.urlopen(served.as_uri())

    monkeypatch.setattr(models, "_urlopen", serve)
    monkeypatch.setattr(models, "_hash_prefix", lambda filename: digest[:8])
    loaded = load_model("resnet18")
    assert opened == [RESNET18_URL]
    assert loaded.weights_status == "downloaded"
    assert stale.read_bytes() == served.read_bytes()
    assert sorted(os.listdir(hub)) == [RESNET18_FILE]  # no partial file left
    assert load_model("resnet18").weights_status == "cached" and len(opened) == 1


# -- 2. the compiled probe: verified before it is loaded -------------------------------------


def _kernel_into(cache: Path, monkeypatch, fresh_settings) -> Path:
    """A built, recorded kernel in ``cache``: copied from the default cache when that one
    verifies (saves a compile), else built."""
    shipped = probe_kernel.library_path()
    monkeypatch.setenv("BNVIZ_CACHE_DIR", str(cache))
    fresh_settings()
    target = probe_kernel.library_path()
    if shipped.exists() and probe_kernel.verify(shipped) is None:
        cache.mkdir(parents=True)
        shutil.copy2(shipped, target)
        shutil.copy2(probe_kernel.record_path(shipped), probe_kernel.record_path(target))
    else:
        probe_kernel.build()
    assert probe_kernel.verify(target) is None
    return target


def _bnviz(*argv: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BNVIZ_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "bnviz", *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_a_truncated_kernel_is_not_loaded_and_build_kernel_rebuilds_it(tmp_path, monkeypatch,
                                                                      fresh_settings):
    """A truncated .so killed `inspect` and even `build-kernel` with SIGBUS (exit 135): in
    the dashboard, the whole server. Now inspect uses the eager check and says so in one
    line; build-kernel rebuilds it, also saying so."""
    if probe_kernel._compiler() is None:
        pytest.skip("no C++ compiler")
    cache = tmp_path / "kernels"
    library = _kernel_into(cache, monkeypatch, fresh_settings)
    size = library.stat().st_size
    with open(library, "r+b") as fh:
        fh.truncate(size // 2)
    assert "truncated" in probe_kernel.verify(library)

    done = _bnviz("inspect", "--size", "64", "--weights", "random", cache=cache)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if "compiled probe" in line]
    assert len(lines) == 1 and "was not loaded" in lines[0] and "truncated" in lines[0]
    assert "eager check" in lines[0] and "bnviz build-kernel" in lines[0]
    assert "(eager check)" in done.stdout

    done = _bnviz("build-kernel", cache=cache)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and "rebuilding the compiled probe" in done.stderr
    assert "truncated" in done.stderr and "compiled probe ready" in done.stdout
    assert library.stat().st_size == size and probe_kernel.verify(library) is None


def test_kernel_verification_needs_the_build_record(tmp_path, monkeypatch, fresh_settings):
    """Size and hash are checked without loading the library; a library without its record
    (from an older bnviz) is not trusted either."""
    monkeypatch.setenv("BNVIZ_CACHE_DIR", str(tmp_path))
    fresh_settings()
    library = probe_kernel.library_path()
    library.write_bytes(b"\x7fELF" + bytes(1000))
    assert "no build record" in probe_kernel.verify(library)
    probe_kernel._write_record(library)
    assert probe_kernel.verify(library) is None
    library.write_bytes(b"\x7fELF" + bytes(999) + b"\x01")  # same size, one byte differs
    assert "sha256 differs" in probe_kernel.verify(library)
    probe_kernel.record_path(library).write_text("{not json")
    assert "cannot be read" in probe_kernel.verify(library)
    usable, why = probe_kernel._load()
    assert not usable and "was not loaded" in why and "bnviz build-kernel" in why


# -- 3. the CLI: bad numbers and checkpoints get one line and exit 2 -------------------------


@pytest.mark.parametrize("argv,needle", [
    (["--top-k", "-3"], "--top-k must be a whole number from 1"),
    (["--top-k", "0"], "--top-k must be a whole number from 1"),
    (["--size", "0"], "--size must be a whole number from 16"),
    (["--model", ""], "Unknown model ''"),
], ids=["top-k-negative", "top-k-zero", "size-zero", "model-empty"])
def test_inspect_numbers_and_names_are_checked_not_defaulted(capsys, argv, needle):
    line = _one_line_exit_2(capsys, ["inspect", *argv])
    assert needle in line and "Fix:" in line


class _PrintsOnLoad:
    def __reduce__(self):
        return (print, ("pwned",))


class _CallsTheOsOnLoad:
    def __reduce__(self):  # harmless, but from the os module that torch's loader blocks
        return (os.getcwd, ())


@pytest.mark.parametrize("payload,named", [
    (_PrintsOnLoad(), "print"),
    (_CallsTheOsOnLoad(), "getcwd"),
    ({"fc.weight": torch.zeros(1), "x": _CallsTheOsOnLoad()}, "getcwd"),
], ids=["print", "os-call", "os-call-in-dict"])
def test_a_checkpoint_that_runs_code_is_called_so_not_corrupt(tmp_path, capsys, payload, named):
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_model("resnet18", weights=path)
    message = str(info.value)
    assert "pickled Python objects" in message and named in message
    assert "can run arbitrary code" in message and "corrupt" not in message
    line = _one_line_exit_2(capsys, ["inspect", "--model", "resnet18", "--weights", str(path)])
    assert "pickled Python objects" in line
    assert "pwned" not in capsys.readouterr().out


def test_legacy_pickle_protocol_3_loads_without_torchs_warning(tmp_path, resnet18_state):
    path = tmp_path / "legacy.pt"
    torch.save(resnet18_state, path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model("resnet18", weights=path)
    assert [str(w.message) for w in caught] == []
    assert loaded.weights_status == "checkpoint"
    for key, value in loaded.module.state_dict().items():
        assert torch.equal(value, resnet18_state[key]), key


@pytest.mark.parametrize("how", ["pickle.dump", "legacy-protocol-4"])
def test_a_pickle_torch_cannot_read_safely_gets_one_clear_line(tmp_path, resnet18_state, how):
    """A plain pickle.dump (or torch.save with pickle_protocol=4, legacy format) printed
    torch's protocol warning and was called corrupt."""
    path = tmp_path / "legacy.pt"
    if how == "pickle.dump":
        import pickle

        with open(path, "wb") as fh:
            pickle.dump(dict(resnet18_state), fh, protocol=4)
    else:
        torch.save(resnet18_state, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    done = subprocess.run(
        [sys.executable, "-m", "bnviz", "inspect", "--model", "resnet18", "--weights",
         str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("bnviz: error: ")
    assert "pickled with protocol 4" in done.stderr and "torch.save(model.state_dict()" in \
        done.stderr
    assert "Detected pickle protocol" not in done.stderr and "corrupt" not in done.stderr


# -- 4. non-finite weights are named and refused ----------------------------------------------


def test_a_nan_checkpoint_is_refused_naming_the_buffer(tmp_path, resnet18_state, capsys):
    state = {k: v.clone() for k, v in resnet18_state.items()}
    state["layer2.0.bn1.running_var"][[3, 7, 9]] = float("nan")
    state["conv1.weight"][0, 0, 0, 0] = float("inf")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_model("resnet18", weights=path)
    message = str(info.value)
    assert isinstance(info.value, BnvizError)
    assert "NaN or infinite values in 2 tensors" in message
    assert "layer2.0.bn1.running_var (3 of 128 values: 3 NaN, 0 infinite)" in message
    assert "conv1.weight (1 of 9,408 values: 0 NaN, 1 infinite)" in message
    assert "diverged" in message  # the fix says where NaN weights come from
    line = _one_line_exit_2(capsys, ["inspect", "--model", "resnet18", "--weights", str(path),
                                     "--size", "64"])
    assert "layer2.0.bn1.running_var" in line


def test_a_nan_file_under_the_published_name_says_to_delete_it(hub, resnet18_state,
                                                              monkeypatch):
    state = {k: v.clone() for k, v in resnet18_state.items()}
    state["bn1.running_var"][0] = float("nan")
    path = hub / RESNET18_FILE
    torch.save(state, path)
    digest = _sha(path)
    monkeypatch.setattr(models, "_hash_prefix", lambda filename: digest[:8])
    with pytest.raises(CheckpointError, match=r"bn1.running_var \(1 of 64 values") as info:
        load_model("resnet18")
    assert "delete it" in str(info.value)


# -- the Python API refuses what the CLI refuses -----------------------------------------------

@pytest.mark.parametrize("top_k", [-3, 0, 1.5, True])
def test_inspect_api_refuses_a_bad_top_k(top_k):
    """`bnviz.inspect(top_k=-3)` raised torch's own RuntimeError from topk."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(bnviz.BnvizError, match="top_k"):
        bnviz.inspect(net, torch.rand(2, 3, 8, 8), top_k=top_k, device="cpu")


def test_inspect_api_names_non_finite_inputs():
    """A NaN input ran and every number came out NaN; now it is refused and counted."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    x = torch.rand(2, 3, 8, 8)
    x[1, 2, 0, :3] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(bnviz.BnvizError, match=r"4 of 384 values are not finite \(3 NaN, 1 "):
        bnviz.inspect(net, x, device="cpu")


def test_weights_from_a_fifo_are_refused_without_blocking(tmp_path):
    """A guard: `--weights <fifo>` must never reach torch.load, which would block forever."""
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "bnviz", "inspect", "--model", "resnet18", "--weights",
         str(fifo), "--device", "cpu"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "is not a" in done.stderr
    assert "Traceback" not in done.stderr
