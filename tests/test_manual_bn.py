"""The independent BN implementation and the mode vocabulary, against PyTorch itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnviz import manual_bn
from bnviz.errors import ModeError
from bnviz.modes import (
    LayerMode,
    apply_mode,
    describe_state,
    parse_mode,
    stats_used,
    updates_running_stats,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("eval", LayerMode(False)),
        ("train", LayerMode(True)),
        ("train,momentum=none", LayerMode(True, momentum=None)),
        ("Eval, track=none", LayerMode(False, track="none")),
        ("train,track=off,momentum=0.25", LayerMode(True, track="off", momentum=0.25)),
    ],
)
def test_parse_mode_round_trip(text, expected):
    mode = parse_mode(text)
    assert mode == expected
    assert parse_mode(str(mode)) == mode


@pytest.mark.parametrize(
    "text", ["", "evaluate", "train,track", "train,track=yes", "eval,momentum=-1",
             "eval,momentum=abc", "train,momentum=0.1,momentum=0.2", "train,foo=1"],
)
def test_parse_mode_errors(text):
    with pytest.raises(ModeError) as err:
        parse_mode(text)
    assert "Fix:" in str(err.value)


def _forward_changes_buffers(bn, x):
    before = None if bn.running_mean is None else bn.running_mean.clone()
    with torch.no_grad():
        y = bn(x)
    after = None if bn.running_mean is None else bn.running_mean.clone()
    return y, before is not None and not torch.equal(before, after)


@pytest.mark.parametrize("mode", ["train", "eval", "train,track=off", "eval,track=off",
                                  "train,track=none", "eval,track=none", "eval,track=on"])
def test_stats_used_matches_pytorch_behaviour(mode):
    """stats_used/updates_running_stats predict what BatchNorm2d.forward really does."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.fill_(0.2)
        bn.running_var.fill_(2.0)
    apply_mode(bn, parse_mode(mode))
    predicted_stats, predicted_update = stats_used(bn), updates_running_stats(bn)
    y, changed = _forward_changes_buffers(bn, x)
    batch = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    uses_batch = torch.allclose(y, batch, atol=1e-6)
    assert predicted_stats == ("batch" if uses_batch else "running")
    assert predicted_update == changed
    assert describe_state(bn).startswith(mode.split(",")[0])


def test_track_none_then_on_creates_fresh_buffers():
    bn = nn.BatchNorm2d(2)
    apply_mode(bn, parse_mode("train,track=none"))
    assert bn.running_mean is None and describe_state(bn).startswith("train,track=none")
    apply_mode(bn, parse_mode("train,track=on"))
    assert torch.equal(bn.running_mean, torch.zeros(2)) and torch.equal(bn.running_var,
                                                                        torch.ones(2))


def test_batch_stats_and_formula_match_native():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 7) * 2 - 1
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    stats = manual_bn.batch_stats(x)
    assert stats.count == 3 * 6 * 7
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(stats.mean, mean)
    torch.testing.assert_close(stats.var, var)
    torch.testing.assert_close(stats.var_unbiased, x.var(dim=(0, 2, 3), unbiased=True))
    y = manual_bn.manual_batch_norm(x, stats.mean, stats.var, w, b, 1e-5)
    native = nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    torch.testing.assert_close(y, native, rtol=1e-5, atol=1e-5)
    # The classic slip: the unbiased variance in the normalisation does NOT match.
    wrong = manual_bn.manual_batch_norm(x, stats.mean, stats.var_unbiased, w, b, 1e-5)
    assert (wrong - native).abs().max() > 1e-3


def test_check_layer_is_stable_for_near_constant_channels(probe_backend):
    """A uniform image gives conv outputs that are almost constant: large mean, tiny var.

    E[x^2] - E[x]^2 in float32 would cancel catastrophically; the two-pass scheme must
    agree with a float64 reference.
    """
    torch.manual_seed(2)
    x = 100.0 + 1e-3 * torch.randn(2, 3, 16, 16)
    x[:, :, 0, :] += 0.5  # a border row, as padding produces
    w, b = torch.ones(3), torch.zeros(3)
    y = nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    check = manual_bn.check_layer(x, y, weight=w, bias=b, eps=1e-5)
    ref_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(check.batch.var.double(), ref_var, rtol=1e-4, atol=1e-9)
    assert check.max_abs_diff < 1e-3


def test_check_layer_detects_a_wrong_output(probe_backend):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 4)
    y = nn.functional.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    y_bad = y.clone()
    y_bad[1, 2, 3, 3] += 0.5
    check = manual_bn.check_layer(x, y_bad, weight=None, bias=None, eps=1e-5)
    assert check.max_abs_diff == pytest.approx(0.5, abs=1e-5)
    assert check.channel_max_abs_diff[2] == pytest.approx(0.5, abs=1e-5)
    assert check.channel_max_abs_diff[:2].max() < 1e-5
    # Running statistics path: compared with the eval-mode native output.
    rm, rv = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.5, 1.5, 2.0])
    y_eval = nn.functional.batch_norm(x, rm, rv, None, None, False, 0.0, 1e-5)
    ok = manual_bn.check_layer(x, y_eval, weight=None, bias=None, eps=1e-5, running_mean=rm,
                               running_var=rv, use_running=True)
    assert ok.max_abs_diff < 1e-5
    wrong = manual_bn.check_layer(x, y_eval, weight=None, bias=None, eps=1e-5)
    assert wrong.max_abs_diff > 0.1  # batch statistics do not explain an eval output


def test_running_update_and_factor():
    assert manual_bn.running_update_factor(0.1, 5) == 0.1
    assert manual_bn.running_update_factor(None, 4) == 0.25
    with pytest.raises(ValueError):
        manual_bn.running_update_factor(None, 0)
    bn = nn.BatchNorm2d(3, momentum=0.3).train()
    x = torch.randn(4, 3, 5, 5)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        bn(x)
    s = manual_bn.batch_stats(x)
    m, v = manual_bn.manual_running_update(rm0, rv0, s.mean, s.var_unbiased, 0.3)
    torch.testing.assert_close(m, bn.running_mean)
    torch.testing.assert_close(v, bn.running_var)


def test_explain_element_text():
    e = manual_bn.explain_element(2.0, mean=1.0, var=3.0, eps=1.0, weight=0.5, bias=0.25,
                                  native=0.5)
    assert e["x_hat"] == pytest.approx(0.5) and e["manual"] == pytest.approx(0.5)
    assert e["abs_diff"] == pytest.approx(0.0)
    assert e["equation"].startswith("y = (2 - 1) / sqrt(3 + 1) * 0.5 + 0.25")


def test_summarise_keeps_layers_apart_and_reports_non_finite_outputs(probe_backend):
    """Many probes summarised together give each layer its own numbers; a NaN or inf in the
    native output is reported as such, never as a small difference."""
    torch.manual_seed(3)
    xs = [torch.randn(2, c, 3, 3) * (i + 1) + i for i, c in enumerate([2, 5, 3])]
    ys = [manual_bn.manual_batch_norm(x, *(lambda s: (s.mean, s.var))(manual_bn.batch_stats(x)),
                                      None, None, 1e-5) for x in xs]
    ys[1] = ys[1].clone()
    ys[1][0, 4, 1, 1] += 0.25  # one wrong value in layer 1, channel 4
    probes = [manual_bn.probe_layer(x, y, weight=None, bias=None, eps=1e-5) for x, y in zip(xs, ys)]
    checks = manual_bn.summarise(probes)
    assert checks[0].max_abs_diff < 1e-5 and checks[2].max_abs_diff < 1e-5
    assert checks[1].max_abs_diff == pytest.approx(0.25, abs=1e-5)
    assert int(checks[1].channel_max_abs_diff.argmax()) == 4
    for x, check in zip(xs, checks):
        ref = manual_bn.batch_stats(x)
        torch.testing.assert_close(check.batch.mean, ref.mean)
        torch.testing.assert_close(check.batch.var, ref.var)
    bad = ys[0].clone()
    bad[1, 1, 0, 0] = float("nan")
    nan_check = manual_bn.check_layer(xs[0], bad, weight=None, bias=None, eps=1e-5)
    assert math.isnan(nan_check.max_abs_diff)
    bad[1, 1, 0, 0] = float("inf")
    inf_check = manual_bn.check_layer(xs[0], bad, weight=None, bias=None, eps=1e-5)
    assert math.isinf(inf_check.max_abs_diff) and inf_check.channel_max_abs_diff[0] < 1e-5
