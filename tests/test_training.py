"""Tests for the Training lab (the bnviz.training package) and ``bnviz train``.

Every claim the lab makes is checked against PyTorch itself: the manual BatchNorm module
against ``nn.BatchNorm2d`` (forward, gradients, running statistics), the detached one for
"same forward, different gradients", the frozen variant for running statistics that never
move, and the momentum study against the running-average formula and against a network
really built with that momentum; the page's figures and tables against the run they are
drawn from, without Streamlit. Runs are short (tens of steps, one CPU thread). One file for
the whole lab (over 600 lines) so that most tests share the one 100-step run of the
``run`` fixture instead of training again.
"""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnviz import cli
from bnviz.errors import BnvizError
from bnviz.training import (
    DEFAULT_MOMENTA,
    LAYERS,
    VARIANTS,
    ManualBatchNorm2d,
    TrainConfig,
    TrainConfigError,
    TrainingJob,
    build_model,
    gradient_check,
    initial_state,
    parse_momenta,
    torch_threads,
    train_lab,
)
from bnviz.training.data import CLASS_NAMES, DataSpec, batch_order, make_dataset
from bnviz.training.figures import (
    fig_loss,
    fig_momentum_acc,
    fig_running,
    fig_train_eval,
    fig_val_acc,
    fig_weight_norm,
    lab_figures,
)
from bnviz.training.tables import final_frame, gradient_frame

SHORT = TrainConfig(steps=100, batch_size=32, lr=0.02, seed=0, eval_every=20, device="cpu")


@pytest.fixture(scope="module")
def run():
    """One 100-step run with every variant and the default momenta (shared by the tests)."""
    return train_lab(SHORT)


def tiny(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=16, eval_every=4, n_train=256, n_val=96, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _history_numbers(result) -> dict:
    d = result.to_dict()
    d.pop("elapsed_s")
    return d


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def test_dataset_is_deterministic_balanced_and_in_range():
    spec = DataSpec(size=16, n_train=240, n_val=60)
    a, b, c = make_dataset(3, spec), make_dataset(3, spec), make_dataset(4, spec)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (240, 1, 16, 16) and a.x_val.shape == (60, 1, 16, 16)
    assert a.x_train.dtype == torch.float32
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    counts = torch.bincount(torch.cat([a.y_train, a.y_val]), minlength=len(CLASS_NAMES))
    assert counts.tolist() == [50] * len(CLASS_NAMES)
    # Not trivially separable by brightness: class means of the pixel mean overlap widely.
    means = a.x_train.mean(dim=(1, 2, 3))
    per_class = torch.stack([means[a.y_train == k].mean() for k in range(len(CLASS_NAMES))])
    assert float(per_class.max() - per_class.min()) < 0.1


def test_batch_order_is_seeded_and_covers_epochs():
    order = batch_order(64, 16, 10, seed=0)
    assert order.shape == (10, 16)
    assert torch.equal(order, batch_order(64, 16, 10, seed=0))
    assert not torch.equal(order, batch_order(64, 16, 10, seed=1))
    assert sorted(order[:4].flatten().tolist()) == list(range(64))  # one epoch = a permutation


# --------------------------------------------------------------------------------------
# The BatchNorm variants against nn.BatchNorm2d
# --------------------------------------------------------------------------------------


def _bn_pair(momentum, detach=False):
    g = torch.Generator().manual_seed(0)
    native = nn.BatchNorm2d(4, momentum=momentum)
    manual = ManualBatchNorm2d(4, momentum=momentum, detach_stats=detach)
    with torch.no_grad():
        native.weight.copy_(torch.rand(4, generator=g) + 0.5)
        native.bias.copy_(torch.randn(4, generator=g))
    manual.load_state_dict(native.state_dict())
    return native, manual


@pytest.mark.parametrize("momentum", [0.1, None])
def test_manual_bn_matches_native_forward_gradients_and_running_stats(momentum):
    native, manual = _bn_pair(momentum)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = (torch.randn(8, 4, 5, 5, generator=g) * 3 + 2).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        w = torch.randn(8, 4, 5, 5, generator=g)
        y1, y2 = native(x), manual(x2)
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(manual.weight.grad, native.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(manual.bias.grad, native.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(manual.running_mean, native.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(manual.running_var, native.running_var, rtol=1e-6, atol=1e-6)
    assert int(manual.num_batches_tracked) == int(native.num_batches_tracked) == 3
    assert not torch.equal(native.running_var, torch.ones(4))  # they really moved
    native.eval()
    manual.eval()
    x = torch.randn(2, 4, 5, 5, generator=g)
    torch.testing.assert_close(manual(x), native(x), rtol=1e-5, atol=1e-5)


def test_detached_bn_same_forward_different_input_gradient():
    _, manual = _bn_pair(0.1)
    _, detached = _bn_pair(0.1, detach=True)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 4, 5, 5, generator=g) + 1).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    # An upstream gradient with a per-channel mean, as a loss typically produces: the true
    # BN gradient removes that mean (it cannot change the output), the detached one keeps it.
    w = torch.randn(8, 4, 5, 5, generator=g) + 1.0
    y1, y2 = manual(x), detached(x2)
    assert torch.equal(y1, y2)  # bit-identical forward
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    rel = float((x2.grad - x.grad).norm() / x.grad.norm())
    assert rel > 1.0
    torch.testing.assert_close(x.grad.sum(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    # weight/bias gradients see only x_hat and dL/dy: identical.
    torch.testing.assert_close(detached.weight.grad, manual.weight.grad)
    torch.testing.assert_close(detached.bias.grad, manual.bias.grad)
    # The running statistics are updated the same way (unlike the version in section 2 of
    # docs/stories.md, which never updated them).
    torch.testing.assert_close(detached.running_var, manual.running_var)


def test_gradient_check_table():
    check = gradient_check(tiny())
    assert check.forward_max_abs_diff["manual"] < 1e-5
    assert check.forward_max_abs_diff["detached"] < 1e-5
    assert check.grad_rel_diff["manual"] < 1e-5
    assert check.grad_rel_diff["detached"] > 0.1
    assert check.grad_cosine["manual"] > 0.99999
    assert check.grad_cosine["detached"] < 0.99
    rows = {r["parameter"]: r for r in check.rows}
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "input image"):
        assert rows[name]["manual_rel_diff"] < 1e-4
        assert rows[name]["detached_rel_diff"] > 0.05, name
    # After the last BatchNorm everything sees the identical forward values.
    for name in ("bn3.weight", "bn3.bias", "fc.weight", "fc.bias"):
        assert rows[name]["detached_rel_diff"] < 1e-5, name
    # ... and it is exactly what a plain nn.BatchNorm2d network computes.
    cfg = tiny().validated()
    data = make_dataset(cfg.seed, cfg.data_spec)
    idx = batch_order(cfg.n_train, cfg.batch_size, 1, cfg.seed)[0]
    model = build_model("native", initial_state(cfg.seed)).set_training(True)
    loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
    loss.backward()
    assert loss.item() == pytest.approx(check.loss["native"], rel=1e-7)
    assert float(model.conv1.weight.grad.norm()) == pytest.approx(
        rows["conv1.weight"]["native_norm"], rel=1e-6)


# --------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------


def test_native_learns_and_detached_learns_differently(run):
    assert run.status == "finished" and run.steps_done == SHORT.steps
    final = {r["variant"]: r for r in run.final_rows()}
    chance = 1 / len(CLASS_NAMES)
    native, detached = final["native"], final["detached"]
    assert native["val_acc_train"] > chance + 0.4
    assert native["val_acc_eval"] > chance + 0.3
    assert native["train_acc"] > chance + 0.4
    # Identical forward, different gradients: in this default-like run it learns far worse.
    assert native["train_acc"] - detached["train_acc"] > 0.15
    assert native["val_acc_eval"] - detached["val_acc_eval"] > 0.15
    # Manual follows native closely (same math; float rounding only).
    assert abs(final["manual"]["loss"] - native["loss"]) < 0.05
    verdict = " ".join(run.verdict)
    assert "detached" in verdict and "gap" in verdict and "no visible difference" not in verdict
    assert f"native reached {100 * native['val_acc_eval']:.0f}%" in verdict


def test_verdict_says_plainly_when_detaching_makes_no_difference(run):
    import copy

    same = copy.deepcopy(run)
    same.histories["detached"] = copy.deepcopy(run.histories["native"])
    same.histories["detached"].variant = "detached"
    text = " ".join(same.verdict)
    assert "detaching the statistics made no visible difference in accuracy" in text
    assert f"{same.gradient.grad_rel_diff['detached']:.2f}" in text  # gradients still differ


def test_detached_weights_grow(run):
    n, d = run.histories["native"], run.histories["detached"]
    assert d.conv_weight_norm[-1] > 1.5 * n.conv_weight_norm[-1]


def test_every_variant_starts_from_the_same_weights_and_batches(run):
    first_losses = {v: h.loss[0] for v, h in run.histories.items()}
    # native/manual/detached share the first forward; frozen normalises differently.
    assert first_losses["manual"] == pytest.approx(first_losses["native"], abs=1e-6)
    assert first_losses["detached"] == pytest.approx(first_losses["native"], abs=1e-6)
    assert run.gradient.loss["native"] == pytest.approx(first_losses["native"], rel=1e-6)


def test_frozen_running_stats_never_change_but_affine_does():
    result = train_lab(tiny(variants=("native", "frozen"), momenta=(), eval_every=1))
    frozen, native = result.histories["frozen"], result.histories["native"]
    assert frozen.running_change == [0.0] * result.steps_done  # checked after every step
    assert all(c > 0 for c in native.running_change)
    assert frozen.affine_change[-1] > 0
    final, start = result.final_state["frozen"], result.initial_state
    for layer in LAYERS:
        assert torch.equal(final[f"{layer}.running_mean"], start[f"{layer}.running_mean"])
        assert torch.equal(final[f"{layer}.running_var"], start[f"{layer}.running_var"])
        assert int(final[f"{layer}.num_batches_tracked"]) == 0
        assert not torch.equal(final[f"{layer}.weight"], start[f"{layer}.weight"])
    assert int(result.final_state["native"]["bn1.num_batches_tracked"]) == result.steps_done
    assert "changed by exactly 0" in " ".join(result.verdict)


def test_momentum_none_is_the_cumulative_mean_of_the_batch_statistics(run):
    for layer in LAYERS:
        trace = run.traces[layer]
        bm = trace.stacked("batch_mean").double()
        bv = trace.stacked("batch_var_unbiased").double()
        steps = torch.arange(1, bm.shape[0] + 1, dtype=torch.float64).view(-1, 1)
        torch.testing.assert_close(trace.stacked("running_mean", "None").double(),
                                   bm.cumsum(0) / steps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trace.stacked("running_var", "None").double(),
                                   bv.cumsum(0) / steps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", ["0.1", "0.01"])
def test_momentum_ema_recomputed_from_recorded_batch_stats(run, momentum):
    m = float(momentum)
    for layer in LAYERS:
        trace = run.traces[layer]
        bm = trace.stacked("batch_mean").double()
        bv = trace.stacked("batch_var_unbiased").double()
        rm, rv = torch.zeros(bm.shape[1], dtype=torch.float64), torch.ones(bm.shape[1],
                                                                           dtype=torch.float64)
        expect_m, expect_v = [], []
        for t in range(bm.shape[0]):
            rm = (1 - m) * rm + m * bm[t]
            rv = (1 - m) * rv + m * bv[t]
            expect_m.append(rm)
            expect_v.append(rv)
        torch.testing.assert_close(trace.stacked("running_mean", momentum).double(),
                                   torch.stack(expect_m), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trace.stacked("running_var", momentum).double(),
                                   torch.stack(expect_v), rtol=1e-5, atol=1e-5)
        # The unbiased variance really is the biased one times count / (count - 1).
        count = SHORT.batch_size * {"bn1": 16 * 16, "bn2": 8 * 8, "bn3": 4 * 4}[layer]
        torch.testing.assert_close(bv, trace.stacked("batch_var").double() * count / (count - 1),
                                   rtol=1e-5, atol=1e-7)


def test_momentum_0_1_study_equals_the_trained_networks_own_running_stats(run):
    final = run.final_state["native"]
    for layer in LAYERS:
        trace = run.traces[layer]
        assert torch.equal(trace.stacked("running_mean", "0.1")[-1],
                           final[f"{layer}.running_mean"])
        assert torch.equal(trace.stacked("running_var", "0.1")[-1],
                           final[f"{layer}.running_var"])


def test_recorded_batch_stats_are_what_native_bn_saw_at_step_1(run):
    data = make_dataset(SHORT.seed, SHORT.validated().data_spec)
    idx = batch_order(SHORT.n_train, SHORT.batch_size, 1, SHORT.seed)[0]
    model = build_model("native", run.initial_state)
    with torch.no_grad():
        conv1 = model.conv1(data.x_train[idx])
    torch.testing.assert_close(run.traces["bn1"].stacked("batch_mean")[0],
                               conv1.mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.traces["bn1"].stacked("batch_var")[0],
                               conv1.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


def test_momentum_study_equals_a_network_trained_with_that_momentum():
    """Running statistics never feed the train-mode forward, so a network built with
    momentum 0.01 follows the same trajectory and ends with the study's statistics."""
    cfg = tiny(variants=("native",), momenta=(0.01, None), steps=10).validated()
    result = train_lab(cfg)
    data = make_dataset(cfg.seed, cfg.data_spec)
    order = batch_order(cfg.n_train, cfg.batch_size, cfg.steps, cfg.seed)
    for momentum, label in ((0.01, "0.01"), (None, "None")):
        model = build_model("native", initial_state(cfg.seed))
        for _, bn in model.bn_layers():
            bn.momentum = momentum
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        with torch_threads(1):
            for idx in order:
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        for name, bn in model.bn_layers():
            trace = result.traces[name]
            torch.testing.assert_close(trace.stacked("running_mean", label)[-1],
                                       bn.running_mean,
                                       rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(trace.stacked("running_var", label)[-1],
                                       bn.running_var,
                                       rtol=1e-6, atol=1e-7)
        assert result.histories["native"].loss[-1] == pytest.approx(loss.item(), rel=1e-6)


def test_momentum_eval_accuracy_and_rows(run):
    assert set(run.momentum_val_acc_eval) == {"0.1", "0.01", "None"}
    n_eval = len(run.histories["native"].eval_step)
    assert all(len(v) == n_eval for v in run.momentum_val_acc_eval.values())
    # momentum 0.1 is the native network's own setting: the same eval accuracy.
    assert run.momentum_val_acc_eval["0.1"] == run.histories["native"].val_acc_eval
    rows = {r["momentum"]: r for r in run.momentum_rows()}
    assert rows["0.01"]["running_mean_lag"] > rows["0.1"]["running_mean_lag"]


def test_determinism_same_seed_same_numbers():
    a, b = train_lab(tiny(seed=5)), train_lab(tiny(seed=5))
    assert _history_numbers(a) == _history_numbers(b)
    c = train_lab(tiny(seed=6, momenta=()))
    assert c.histories["native"].loss != a.histories["native"].loss


def test_should_stop_ends_the_run_early_and_on_update_streams():
    calls = {"n": 0}
    updates = []

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 7

    def on_update(result):
        updates.append((result.steps_done, result.status, torch.get_num_threads()))

    result = train_lab(tiny(steps=50, eval_every=3), should_stop=should_stop,
                       on_update=on_update)
    assert result.status == "stopped" and result.stopped
    assert result.steps_done == 7
    assert all(len(h.loss) == 7 for h in result.histories.values())
    assert result.histories["native"].eval_step == [3, 6, 7]  # final evaluation at the stop
    assert result.verdict[0].startswith("Stopped after 7 of 50 steps")
    assert [u[0] for u in updates] == [3, 6, 7]
    assert updates[-1][1] == "stopped" and updates[0][1] == "running"
    assert all(u[2] == 1 for u in updates)  # one torch thread while training


def test_training_job_trains_in_the_background_and_stops():
    before = torch.get_num_threads()
    job = TrainingJob(tiny(steps=3000, eval_every=5)).start()
    deadline = time.time() + 60
    while job.latest is None and time.time() < deadline:
        time.sleep(0.02)
    snap = job.latest
    assert job.running and snap.status == "running" and snap.steps_done >= 5
    assert torch.get_num_threads() == before  # the worker's setting does not leak here
    job.stop()
    assert job.join(timeout=60)
    result = job.result
    assert job.error is None and result.status == "stopped"
    assert snap.steps_done <= result.steps_done < 3000
    assert job.latest.status == "stopped" and job.latest.steps_done == result.steps_done
    # The snapshot is frozen: it did not grow while training went on.
    assert all(len(h.loss) == snap.steps_done for h in snap.histories.values())
    assert len(snap.traces["bn1"].batch_mean) == snap.steps_done
    assert snap.histories["native"].loss == result.histories["native"].loss[:snap.steps_done]


def test_training_job_reports_errors(monkeypatch):
    import bnviz.training.job as training_job

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(training_job, "train_lab", broken)
    job = TrainingJob(tiny()).start()
    assert job.join(timeout=30)
    assert isinstance(job.error, RuntimeError) and job.result is None and job.latest is None
    with pytest.raises(TrainConfigError):
        TrainingJob(tiny(batch_size=0))  # validated before any thread starts


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    train_lab(tiny(steps=2, variants=("native",), momenta=()))
    assert torch.get_num_threads() == before


def test_to_dict_is_json_and_matches_the_result(run):
    d = json.loads(json.dumps(run.to_dict(), allow_nan=False))
    assert d["status"] == "finished" and d["steps_done"] == SHORT.steps
    assert d["histories"]["native"]["loss"] == run.histories["native"].loss
    assert d["momentum"]["layer"] == "bn2" and d["momentum"]["channels"] == [0, 1, 2]
    assert len(d["momentum"]["running_mean"]["None"]) == SHORT.steps
    assert d["momentum"]["running_mean"]["None"][-1][1] == pytest.approx(
        float(run.traces["bn2"].running_mean["None"][-1][1]))
    assert d["verdict"] == run.verdict
    assert {r["variant"] for r in d["final"]} == set(VARIANTS)
    assert d["gradient_check"]["grad_rel_diff"]["detached"] > 0.1


def test_momentum_study_without_native_variant_trains_a_hidden_native():
    result = train_lab(tiny(variants=("frozen",), momenta=(0.1,)))
    assert list(result.histories) == ["frozen"]
    assert result.study_history is not None and len(result.study_history.loss) == 12
    assert result.momentum_rows()[0]["val_acc_train"] == result.study_history.val_acc_train[-1]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(batch_size=1), "batch size"),
    (dict(batch_size=0), "batch size"),
    (dict(steps=0), "steps"),
    (dict(lr=-1.0), "Learning rate"),
    (dict(lr=float("nan")), "Learning rate"),
    (dict(variants=("native", "bogus")), "Unknown BatchNorm variant"),
    (dict(variants=()), "No BatchNorm variant"),
    (dict(momenta=(2.0,)), "outside [0, 1]"),
    (dict(momenta="0.1,fast"), "not a number"),
    (dict(layer="bn9"), "Unknown BatchNorm layer"),
    (dict(channels=(16,)), "channel"),
    (dict(channels=()), "No channel"),
    (dict(image_size=4), "image size"),
    (dict(eval_every=0), "eval_every"),
    (dict(device="tpu"), "device"),
])
def test_bad_config_raises_a_clear_error(kwargs, needle):
    with pytest.raises(TrainConfigError if "device" not in kwargs else BnvizError) as err:
        TrainConfig(**kwargs).validated()
    assert needle in str(err.value)
    assert "Fix:" in str(err.value)


def test_parse_momenta():
    assert parse_momenta("0.1, 0.01,none") == DEFAULT_MOMENTA
    assert parse_momenta([0.1, None, 0.1]) == (0.1, None)
    assert parse_momenta("") == ()


# --------------------------------------------------------------------------------------
# Figures and tables of the page, without Streamlit
# --------------------------------------------------------------------------------------


def _trace(fig, name: str, nth: int = 0):
    return [t for t in fig.data if t.name == name][nth]


def _same(values, expected) -> None:
    np.testing.assert_array_equal(np.asarray(values, dtype=np.float64),
                                  np.asarray(expected, dtype=np.float64))


def test_history_figures_carry_the_numbers_of_the_run(run):
    loss, acc = fig_loss(run), fig_val_acc(run)
    gap, norm = fig_train_eval(run), fig_weight_norm(run)
    assert loss.layout.title.text.startswith("Training loss")
    assert acc.layout.title.text.startswith("Validation accuracy, eval mode")
    for v, h in run.histories.items():
        _same(_trace(loss, v).x, h.step)
        _same(_trace(loss, v).y, h.loss)
        _same(_trace(acc, v).x, h.eval_step)
        _same(_trace(acc, v).y, h.val_acc_eval)
        _same(_trace(gap, f"{v} eval mode").y, h.val_acc_eval)
        _same(_trace(gap, f"{v} train mode").y, h.val_acc_train)
        _same(_trace(norm, v).y, h.conv_weight_norm)
    assert len(loss.data) == len(acc.data) == len(norm.data) == len(run.histories)
    assert acc.layout.shapes[0].y0 == run.chance  # the chance line


def test_running_statistics_figure_carries_the_traces_of_the_run(run):
    trace = run.traces["bn2"]
    fig = fig_running(run, "bn2", [1, 3])
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["bn2 channel 1: mean", "bn2 channel 1: variance",
                      "bn2 channel 3: mean", "bn2 channel 3: variance"]
    # Per channel: mean panel (batch dots, one line per momentum), then variance panel.
    for row, c in enumerate([1, 3]):
        for panel, (batch, running) in enumerate((("batch_mean", "running_mean"),
                                                 ("batch_var_unbiased", "running_var"))):
            nth = 2 * row + panel
            dots = _trace(fig, "batch statistic", nth)
            _same(dots.x, range(1, SHORT.steps + 1))
            _same(dots.y, trace.stacked(batch)[:, c])
            for label in ("0.1", "0.01", "None"):
                _same(_trace(fig, f"momentum {label}", nth).y,
                      trace.stacked(running, label)[:, c])
    assert fig_running(run, "bn2", []) is None


def test_momentum_figure_carries_the_study_of_the_run(run):
    fig = fig_momentum_acc(run)
    assert f"batch size {SHORT.batch_size}" in fig.layout.title.text
    for label, accs in run.momentum_val_acc_eval.items():
        _same(_trace(fig, f"eval mode, momentum {label}").x, run.momentum_eval_step)
        _same(_trace(fig, f"eval mode, momentum {label}").y, accs)
    _same(_trace(fig, "train mode (batch statistics)").y,
          run.histories["native"].val_acc_train)


def test_figures_without_a_momentum_study_and_all_figures_of_the_page(run):
    no_study = copy.copy(run)
    no_study.traces, no_study.momentum_val_acc_eval = {}, {}
    assert fig_running(no_study, "bn2", [0]) is None
    assert fig_momentum_acc(no_study) is None
    figs = lab_figures(run, "bn3", [5, 2])
    assert list(figs) == ["loss", "acc", "gap", "norm", "momentum", "running"]
    assert [a.text for a in figs["running"].layout.annotations][::2] == [
        "bn3 channel 2: mean", "bn3 channel 5: mean"]  # channels in ascending order
    assert lab_figures(run, "bn3", [])["running"] is None


def test_tables_carry_the_final_numbers_and_the_gradient_check(run):
    frame = final_frame(run)
    rows = run.final_rows()
    assert list(frame["variant"]) == [r["variant"] for r in rows]
    _same(frame["val acc, eval mode"], [r["val_acc_eval"] for r in rows])
    _same(frame["train − eval (points)"], [100 * r["train_minus_eval"] for r in rows])
    assert f"loss (mean of last {run.window} steps)" in frame.columns
    grads = gradient_frame(run)
    assert list(grads["parameter"]) == [r["parameter"] for r in run.gradient.rows]
    _same(grads["detached: relative Δ"], [r["detached_rel_diff"] for r in run.gradient.rows])
    no_check = copy.copy(run)
    no_check.gradient = None
    assert gradient_frame(no_check) is None


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

CLI_ARGS = ["train", "--steps", "12", "--batch-size", "16", "--eval-every", "6", "--seed", "2",
            "--device", "cpu", "--quiet"]


def test_cli_json_matches_headless(capsys):
    assert cli.main(CLI_ARGS + ["--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    expect = train_lab(TrainConfig(steps=12, batch_size=16, eval_every=6, seed=2,
                                   device="cpu")).to_dict()
    assert out["histories"] == expect["histories"]
    assert out["verdict"] == expect["verdict"]
    assert out["config"]["momenta"] == ["0.1", "0.01", "None"]


def test_cli_table_progress_and_verdict(capsys):
    assert cli.main(CLI_ARGS[:-1] + ["--variants", "native,detached", "--momenta", "0.1,none",
                                     "--layer", "bn3", "--channels", "5"]) == 0
    captured = capsys.readouterr()
    assert "step 6/12" in captured.err and "step 12/12" in captured.err
    out = captured.out
    assert "val acc eval-mode" in out and "detached" in out and "frozen" not in out
    assert "gradient check" in out and "- native reached" in out
    assert "|running - batch| mean (bn3)" in out


def test_cli_json_to_file(tmp_path, capsys):
    target = tmp_path / "train.json"
    assert cli.main(CLI_ARGS + ["--variants", "native", "--momenta", "none",
                                "--json", str(target)]) == 0
    data = json.loads(target.read_text())
    assert list(data["histories"]) == ["native"]
    assert "native" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["--batch-size", "0"],
    ["--steps", "abc"],
    ["--variants", "native,bogus"],
    ["--momenta", "0.1,fast"],
    ["--channels", "0,x"],
    ["--channels", "99"],
    ["--layer", "fc"],
    ["--lr", "0"],
    ["--bogus-option"],
])
def test_cli_bad_options_exit_2_with_one_line(args, capsys):
    assert cli.main(["train"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnviz: error:") and "Fix:" in err
    assert len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_cuda_without_gpu_exits_2(capsys):
    assert cli.main(["train", "--device", "cuda", "--steps", "2"]) == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda():
    result = train_lab(TrainConfig(steps=60, eval_every=20, device="cuda"))
    assert result.device.startswith("cuda")
    assert result.gradient.grad_rel_diff["manual"] < 1e-4
    assert result.gradient.grad_rel_diff["detached"] > 0.1
    final = {r["variant"]: r for r in result.final_rows()}
    assert final["native"]["val_acc_train"] > 1 / len(CLASS_NAMES) + 0.2
    assert result.histories["frozen"].running_change[-1] == 0.0
    assert math.isfinite(final["detached"]["loss"])
