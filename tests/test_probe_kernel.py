"""The compiled probe (bnviz/csrc/probe.cpp) against float64 references and the eager path."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled_probe_or_skip
from torch import nn

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


def test_switch_off_and_build_failures_are_explained(monkeypatch, tmp_path, capsys,
                                                     fresh_settings):
    monkeypatch.setenv("BNVIZ_PROBE_KERNEL", "0")
    fresh_settings()
    usable, why = probe_kernel._load()
    assert not usable and "BNVIZ_PROBE_KERNEL" in why
    monkeypatch.delenv("BNVIZ_PROBE_KERNEL")
    monkeypatch.setenv("BNVIZ_CACHE_DIR", str(tmp_path))
    fresh_settings()
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
    fresh_settings()
    with pytest.raises(probe_kernel.KernelBuildError, match="BNVIZ_CACHE_DIR"):
        probe_kernel.build()


@pytest.mark.slow
def test_a_compiler_without_openmp_still_builds_a_working_check(monkeypatch, tmp_path,
                                                                fresh_settings):
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
    fresh_settings()
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


def _blocks(width: int, layers: int):
    return torch.full((6, width), float("nan")), torch.full((3, layers), float("nan"),
                                                             dtype=torch.float64)


NO_UPDATE = (None, None, None, None, 0.0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_finished_checks_in_blocks_equal_the_summary_of_the_same_probes(train):
    """``probe_into`` does summarise()'s arithmetic per channel inside the kernel: its
    columns must equal summarise() of the compiled probe of the same layer to the last bit
    -- mean, both variances, per-channel and per-layer differences, output scale -- for
    every shape (one value per channel included, where the unbiased variance is None), with
    and without affine, NaN in the output included."""
    compiled_probe_or_skip()
    shapes = [s for s in SHAPES if not (train and math.prod(s) // s[1] == 1)]
    cases = []
    for i, shape in enumerate(shapes):
        x, y, w, b, rm, rv = _layer(shape, train, affine=i % 2 == 0, seed=i)
        if i == 2:
            y = y.clone()
            y.view(-1)[3] = float("nan")
        cases.append((x, y, w, b, rm, rv))
    sizes = [x.shape[1] for x, *_ in cases]
    # the layers' columns in reverse order, after a gap of two columns
    starts = [2 + sum(sizes[i + 1:]) for i in range(len(sizes))]
    out, maxima = _blocks(sum(sizes) + 2, len(cases) + 1)
    op = torch.ops.bnviz.probe_into.default
    for i in reversed(range(len(cases))):
        x, y, w, b, rm, rv = cases[i]
        scale = None if train else (torch.rsqrt(rv + 1e-3) * (w if w is not None else 1.0))
        op(x, y, out, maxima, starts[i], i + 1, w, b, 1e-3, None if train else rm, scale,
           *NO_UPDATE)
    counts = [math.prod(x.shape) // x.shape[1] for x, *_ in cases]
    found = manual_bn.block_checks(out, maxima, starts, sizes, counts,
                                   list(range(1, len(cases) + 1)))
    for (x, y, w, b, rm, rv), check in zip(cases, found, strict=True):
        _, want = _probe(x, y, w, b, rm, rv, train, compiled=True)
        assert check.batch.count == want.batch.count
        assert torch.equal(check.batch.mean, want.batch.mean)
        assert torch.equal(check.batch.var, want.batch.var)
        if want.batch.var_unbiased is None:
            assert check.batch.var_unbiased is None
        else:
            assert torch.equal(check.batch.var_unbiased, want.batch.var_unbiased)
        assert torch.equal(check.channel_max_abs_diff.nan_to_num(-1),
                           want.channel_max_abs_diff.nan_to_num(-1))
        for field in ("max_abs_diff", "max_rel_diff", "output_rms_max"):
            a, e = getattr(check, field), getattr(want, field)
            assert (math.isnan(a) and math.isnan(e)) or a == e, field
    assert math.isnan(found[2].max_abs_diff)


def test_probe_into_refuses_columns_outside_its_blocks():
    compiled_probe_or_skip()
    x, y, w, b, rm, rv = _layer((2, 3, 4, 4), train=True, affine=True)
    out, maxima = _blocks(4, 2)
    op = torch.ops.bnviz.probe_into.default
    with pytest.raises(RuntimeError, match="do not fit a block of 4"):
        op(x, y, out, maxima, 2, 0, w, b, 1e-3, None, None, *NO_UPDATE)
    with pytest.raises(RuntimeError, match="layer 2 out of range"):
        op(x, y, out, maxima, 0, 2, w, b, 1e-3, None, None, *NO_UPDATE)
    with pytest.raises(RuntimeError, match="float64 CPU block"):
        op(x, y, out, maxima.float(), 0, 0, w, b, 1e-3, None, None, *NO_UPDATE)
    with pytest.raises(RuntimeError, match="needs a block of 6 rows"):
        op(x, y, out[:4].contiguous(), maxima, 0, 0, w, b, 1e-3, None, None, rm, rv, rm, rv, 0.1)
    with pytest.raises(RuntimeError, match="needs all four"):
        op(x, y, out, maxima, 0, 0, w, b, 1e-3, None, None, rm, rv, None, None, 0.1)


class _Irregular(nn.Module):
    """Everything that takes a layer off the one-call-per-layer path of the blocks: a layer
    called twice, one never called, float64 parameters, layers called out of order, and a
    layer the forward switches to eval itself."""

    def __init__(self):
        super().__init__()
        self.first = nn.BatchNorm2d(4)
        self.unused = nn.BatchNorm2d(4)
        self.twice = nn.BatchNorm2d(4)
        self.wide = nn.BatchNorm2d(4).double()
        self.switched = nn.BatchNorm2d(4)
        self.late = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.late(x) * 0.5 + 1.0  # registered last, called first
        x = torch.relu(self.twice(x))
        x = self.twice(x * 2.0 + 1.0)
        x = self.wide(x.double()).float()
        self.switched.eval()
        return self.first(self.switched(x))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_irregular_forwards_mix_block_and_general_checks(mode, monkeypatch):
    """The blocks serve the layers they can; the others go through the general probe; the
    report is identical to one made without the blocks (every layer probed on its own by
    the compiled probe) and agrees with the eager check."""
    compiled_probe_or_skip()
    torch.manual_seed(3)
    net = _Irregular()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    x = torch.randn(3, 4, 6, 5) * 2 + 0.5
    from bnviz.inspection import run as inspection  # where _flat_run is looked up

    with probe_kernel.forced(True):
        blocks = bnviz.inspect(net, x, modes=mode, keep_tensors=False)
        real_flat_run = inspection._flat_run
        monkeypatch.setattr(inspection, "_flat_run", lambda *a: None)
        single = bnviz.inspect(net, x, modes=mode, keep_tensors=False)
        monkeypatch.setattr(inspection, "_flat_run", real_flat_run)
    with probe_kernel.forced(False):
        eager = bnviz.inspect(net, x, modes=mode, keep_tensors=False)
    assert blocks.manual_check == "compiled+eager"  # the float64 layer runs eagerly
    assert [layer.name for layer in blocks.layers] == ["late", "twice", "twice", "wide",
                                                      "switched", "first"]
    assert blocks.layer("switched").stats_used == "running"
    for a, s, e in zip(blocks.layers, single.layers, eager.layers, strict=True):
        assert a.name == s.name == e.name
        for field in ("batch_mean", "batch_var", "batch_var_unbiased", "channel_max_abs_diff",
                      "running_mean_after", "running_var_after", "manual_running_mean_after",
                      "manual_running_var_after"):
            got, want = getattr(a, field), getattr(s, field)
            if want is None:
                assert got is None and getattr(e, field) is None, (a.name, field)
                continue
            assert torch.equal(got, want), (a.name, field)
            torch.testing.assert_close(got, getattr(e, field), rtol=1e-4, atol=2e-5)
        assert a.max_abs_diff == s.max_abs_diff and a.max_rel_diff == s.max_rel_diff
        assert a.update_factor == s.update_factor == e.update_factor
        assert a.running_update_max_abs_diff == s.running_update_max_abs_diff
        assert a.max_rel_diff < 1e-5 and e.max_rel_diff < 1e-5


def test_lite0_inspection_through_the_blocks_equals_per_layer_probes(lite, monkeypatch):
    """The usual forward: every layer of efficientnet_lite0 goes through the blocks, and the
    report is bit-identical to per-layer compiled probes summarised afterwards."""
    compiled_probe_or_skip()
    from bnviz.inspection import run as inspection  # where _flat_run is looked up

    raw = bnviz.make_stimulus("image", name="coffee", size=64, batch_size=2,
                              composition="jitter")
    summarised = []
    real_summarise = manual_bn.summarise

    def counting(probes, *args, **kwargs):
        summarised.append(len(probes))
        return real_summarise(probes, *args, **kwargs)

    monkeypatch.setattr(manual_bn, "summarise", counting)
    with probe_kernel.forced(True):
        for mode in ("eval", "train,momentum=none"):
            blocks = bnviz.inspect(lite, raw, modes=mode, keep_tensors=False)
            assert summarised == []  # every layer came from the blocks
            with monkeypatch.context() as m:
                m.setattr(inspection, "_flat_run", lambda *a: None)
                single = bnviz.inspect(lite, raw, modes=mode, keep_tensors=False)
            assert summarised == [49]  # and here every layer from its own probe
            summarised.clear()
            for a, s in zip(blocks.layers, single.layers, strict=True):
                for field in ("batch_mean", "batch_var", "batch_var_unbiased",
                              "channel_max_abs_diff", "running_mean_after",
                              "manual_running_mean_after", "manual_running_var_after"):
                    got, want = getattr(a, field), getattr(s, field)
                    assert (got is None and want is None) or torch.equal(got, want), field
                assert (a.max_abs_diff, a.max_rel_diff) == (s.max_abs_diff, s.max_rel_diff)
                assert (a.update_factor, a.running_update_max_abs_diff) == (
                    s.update_factor, s.running_update_max_abs_diff)
                if mode.startswith("train"):
                    assert a.running_update_max_abs_diff < 1e-4  # float32 rounding of ~100


def test_a_layer_the_operator_refuses_is_checked_the_general_way(monkeypatch):
    """The hook only makes cheap tests before calling the operator; when the operator itself
    refuses a layer (RuntimeError, raised before it writes), that layer is probed the
    general way and the report is the same as without the blocks."""
    compiled_probe_or_skip()
    from bnviz.inspection import run as inspection  # where _flat_run is looked up

    net = _Irregular()
    x = torch.randn(2, 4, 5, 5)
    real_flat_run = inspection._flat_run
    refused = []

    def picky_flat_run(*args):
        flat = real_flat_run(*args)
        op = flat.op
        twice_column = flat.layout.offsets["twice"]

        def refusing(x, y, out, maxima, offset, *rest):
            if offset == twice_column:
                refused.append(offset)
                raise RuntimeError("bnviz::probe: refused for this test")
            return op(x, y, out, maxima, offset, *rest)

        flat.op = refusing
        return flat

    with probe_kernel.forced(True):
        monkeypatch.setattr(inspection, "_flat_run", picky_flat_run)
        picky = bnviz.inspect(net, x, modes="train", keep_tensors=False)
        monkeypatch.setattr(inspection, "_flat_run", lambda *a: None)
        single = bnviz.inspect(net, x, modes="train", keep_tensors=False)
    assert refused  # the first call of "twice" was refused; its second call is general anyway
    for a, s in zip(picky.layers, single.layers, strict=True):
        assert torch.equal(a.batch_var, s.batch_var) and a.max_abs_diff == s.max_abs_diff
