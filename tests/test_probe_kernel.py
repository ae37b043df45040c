"""The compiled probe (bnviz/csrc/probe.cpp) against float64 references and the eager path."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled_probe_or_skip

import bnviz
from bnviz import manual_bn, probe_kernel
from bnviz.cli import main as cli_main

# (N, C, *spatial): tails shorter than a vector, rows longer than the float-sum block (1024),
# BatchNorm1d with and without a length, 3d, and a single value per channel row.
SHAPES = [(2, 3, 4, 4), (1, 5, 7, 7), (3, 4, 17), (6, 5), (2, 3, 2, 3, 5), (4, 3, 45, 47),
          (1, 2, 1, 1)]


def _layer(shape, train: bool, affine: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g) * 0.7 + 3.0
    w = torch.rand(c, generator=g) + 0.5 if affine else None
    b = torch.randn(c, generator=g) if affine else None
    rm = torch.randn(c, generator=g)
    rv = torch.rand(c, generator=g) + 0.2
    y = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=train, momentum=0.1, eps=1e-3)
    return x, y, w, b, rm, rv


def _probe(x, y, w, b, rm, rv, train: bool, compiled: bool):
    with probe_kernel.forced(compiled):
        probe = manual_bn.probe_layer(x, y, weight=w, bias=b, eps=1e-3, running_mean=rm,
                                      running_var=rv, use_running=not train)
    return probe, manual_bn.summarise([probe])[0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_compiled_probe_matches_float64_and_eager(shape, train, affine):
    compiled_probe_or_skip()
    if train and math.prod(shape) // shape[1] == 1:
        pytest.skip("PyTorch refuses a train-mode batch with one value per channel")
    x, y, w, b, rm, rv = _layer(shape, train, affine)
    probe, fast = _probe(x, y, w, b, rm, rv, train, compiled=True)
    assert probe.backend == "compiled"
    eager_probe, eager = _probe(x, y, w, b, rm, rv, train, compiled=False)
    assert eager_probe.backend == "eager"

    ref = manual_bn.batch_stats(x.double())
    torch.testing.assert_close(fast.batch.mean.double(), ref.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.batch.var.double(), ref.var, rtol=1e-5, atol=1e-7)
    assert fast.batch.mean.dtype == torch.float32 and fast.batch.count == ref.count
    # The manual output agrees with native BN in both implementations, at float32 rounding.
    assert fast.max_abs_diff < 2e-5 and eager.max_abs_diff < 2e-5
    assert fast.channel_max_abs_diff.shape == (shape[1],)
    assert fast.output_rms_max == pytest.approx(eager.output_rms_max, rel=1e-4)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("where", [(1, 2, 0, 0), (0, 1, 5, 30), (1, 0, 5, 46)],
                         ids=["first", "vector-body", "row-tail"])
def test_compiled_probe_finds_one_wrong_value(train, where):
    """One wrong value anywhere in a row (vector body or scalar tail) is found, in its channel,
    with its size; NaN and inf in the native output are reported as such."""
    compiled_probe_or_skip()
    x, y, w, b, rm, rv = _layer((2, 3, 6, 47), train, affine=True, seed=1)
    bad = y.clone()
    bad[where] += 0.5
    probe, check = _probe(x, bad, w, b, rm, rv, train, compiled=True)
    assert probe.backend == "compiled"
    assert check.max_abs_diff == pytest.approx(0.5, abs=1e-4)
    assert int(check.channel_max_abs_diff.argmax()) == where[1]
    others = [c for c in range(3) if c != where[1]]
    assert check.channel_max_abs_diff[others].max() < 1e-5
    bad[where] = float("nan")
    _, nan_check = _probe(x, bad, w, b, rm, rv, train, compiled=True)
    assert math.isnan(nan_check.max_abs_diff)
    assert math.isnan(nan_check.channel_max_abs_diff[where[1]])
    bad[where] = float("inf")
    _, inf_check = _probe(x, bad, w, b, rm, rv, train, compiled=True)
    assert math.isinf(inf_check.max_abs_diff)
    assert inf_check.channel_max_abs_diff[others].max() < 1e-5


def test_compiled_probe_keeps_near_constant_and_shifted_channels_exact():
    """Tiny variance on a large mean (a uniform image), and an eval batch whose mean is far
    from the running mean (the dashboard's whole point): the one-pass sums must not cancel."""
    compiled_probe_or_skip()
    torch.manual_seed(4)
    x = 100.0 + 1e-3 * torch.randn(2, 3, 16, 33)
    x[:, :, 0, :] += 0.5
    for train in (True, False):
        rm, rv = torch.full((3,), -50.0), torch.full((3,), 1e-4)
        y = F.batch_norm(x, rm.clone(), rv.clone(), None, None, training=train, eps=1e-3)
        _, check = _probe(x, y, None, None, rm, rv, train, compiled=True)
        ref = x.double().var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(check.batch.var.double(), ref, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(check.batch.mean.double(), x.double().mean(dim=(0, 2, 3)))
        # float32 resolves 100.03 to ~4e-6; times the scale 1/std ~ 8: ~3e-5 either way
        assert check.max_rel_diff < 1e-4


def test_layers_the_kernel_does_not_take_run_eagerly():
    """float64, channels-last (non-contiguous) and integer-free CPU layers outside its remit
    fall back to the eager probe, with the same numbers."""
    compiled_probe_or_skip()
    x, y, w, b, rm, rv = _layer((2, 4, 5, 6), train=True, affine=True)
    with probe_kernel.forced(True):
        as64 = manual_bn.probe_layer(x.double(), y.double(), weight=w.double(), bias=b.double(),
                                     eps=1e-3)
        cl = manual_bn.probe_layer(x.to(memory_format=torch.channels_last),
                                   y.to(memory_format=torch.channels_last), weight=w, bias=b,
                                   eps=1e-3)
    assert as64.backend == "eager" and cl.backend == "eager"
    eager = manual_bn.summarise([cl])[0]
    _, fast = _probe(x, y, w, b, rm, rv, True, compiled=True)
    torch.testing.assert_close(fast.batch.mean, eager.batch.mean)
    torch.testing.assert_close(fast.batch.var, eager.batch.var, rtol=1e-5, atol=1e-6)


def test_inspect_reports_which_check_ran_and_both_agree(lite):
    """A whole efficientnet_lite0 inspection through either implementation: same modes and
    statistics to float32 rounding, manual == native in both, and the report says which ran."""
    compiled_probe_or_skip()
    raw = bnviz.make_stimulus("image", name="chelsea", size=96, batch_size=2,
                              composition="jitter")
    for mode in ("train", "eval"):
        with probe_kernel.forced(True):
            fast = bnviz.inspect(lite, raw, modes=mode, device="cpu", keep_tensors=False)
        with probe_kernel.forced(False):
            slow = bnviz.inspect(lite, raw, modes=mode, device="cpu", keep_tensors=False)
        assert fast.manual_check == "compiled" and slow.manual_check == "eager"
        assert fast.to_dict()["manual_check"] == "compiled"
        for a, b in zip(fast.layers, slow.layers, strict=True):
            assert a.stats_used == b.stats_used
            torch.testing.assert_close(a.batch_mean, b.batch_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.batch_var, b.batch_var, rtol=1e-4, atol=1e-6)
            assert a.max_rel_diff < 1e-4 and b.max_rel_diff < 1e-4
            torch.testing.assert_close(a.channel_max_abs_diff, b.channel_max_abs_diff,
                                       rtol=0, atol=2e-4)


def test_switch_off_and_build_failures_are_explained(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("BNVIZ_PROBE_KERNEL", "0")
    usable, why = probe_kernel._load()
    assert not usable and "BNVIZ_PROBE_KERNEL" in why
    monkeypatch.delenv("BNVIZ_PROBE_KERNEL")
    monkeypatch.setenv("BNVIZ_CACHE_DIR", str(tmp_path))
    usable, why = probe_kernel._load()
    assert not usable and "bnviz build-kernel" in why
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(probe_kernel.KernelBuildError, match="compiler output in"):
        probe_kernel.build()
    assert list(tmp_path.glob("*.log")) and not list(tmp_path.glob("*.so*"))
    assert cli_main(["build-kernel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnviz: error: The compiled probe was not built")
    assert "Fix:" in err[0]
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("BNVIZ_CACHE_DIR", str(blocked / "kernels"))
    with pytest.raises(probe_kernel.KernelBuildError, match="BNVIZ_CACHE_DIR"):
        probe_kernel.build()


@pytest.mark.slow
def test_a_compiler_without_openmp_still_builds_a_working_check(monkeypatch, tmp_path):
    """Apple's clang has no -fopenmp: the build retries without it (the check then runs on
    the calling thread) and gives the same numbers."""
    compiled_probe_or_skip()
    cxx = probe_kernel._compiler()
    fake = tmp_path / "cxx-without-openmp"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && "
                    "{ echo 'unsupported option -fopenmp' >&2; exit 1; }; done\n"
                    f"exec {cxx} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("BNVIZ_CACHE_DIR", str(tmp_path / "kernels"))
    path = probe_kernel.build()
    assert path.exists() and not list(path.parent.glob("*.log"))
    # Load it in a fresh interpreter (this one has the OpenMP build registered already).
    import subprocess
    import sys
    code = (
        "import torch, torch.nn.functional as F\n"
        f"torch.ops.load_library({str(path)!r})\n"
        "from bnviz import manual_bn, probe_kernel\n"
        "x = torch.randn(2, 3, 9, 37) * 2 + 1\n"
        "y = F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)\n"
        "with probe_kernel.forced(True):\n"
        "    p = manual_bn.probe_layer(x, y, weight=None, bias=None, eps=1e-5)\n"
        "c = manual_bn.summarise([p])[0]\n"
        "assert p.backend == 'compiled' and c.max_abs_diff < 1e-5, c.max_abs_diff\n"
        "torch.testing.assert_close(c.batch.var, x.var(dim=(0, 2, 3), unbiased=False))\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "BNVIZ_CACHE_DIR": str(tmp_path / "kernels")})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
