"""``bnviz.check_batchnorm`` and ``bnviz check-bn`` (issue 21, section 3).

Every implementation in tests/bn_impls.py is wrong in exactly one classic way; each must be
caught with exactly its diagnosis (no other finding), and the correct one, the native layers
and a native subclass must give none. The reference is always the native layer itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnviz
from bnviz import cli
from bnviz.bn_check import CHECKS, FORMULA, check_batchnorm
from bnviz.bn_check.loading import load_object
from bnviz.errors import BnvizError, DeviceError
from tests import bn_impls as impls

ROOT = Path(__file__).resolve().parents[1]

#: implementation -> {(check, cause)}: the findings it must give, and no others.
WRONG = {
    "BiasedVar": {("running_stats", "biased_running_var")},
    "MomentumReversed": {("running_stats", "momentum_reversed")},
    "EpsOutsideSqrt": {("forward_train", "eps_outside_sqrt"),
                       ("forward_eval", "eps_outside_sqrt")},
    "UnbiasedNormalise": {("forward_train", "unbiased_var_in_normalisation"),
                          ("forward_eval", "unbiased_var_in_normalisation")},
    "DetachedStats": {("grad_input", "detached_stats")},
    "RunningStatsInTrain": {("forward_train", "running_stats_in_train")},
    "BatchStatsInEval": {("forward_eval", "batch_stats_in_eval")},
    "NoBatchCount": {("num_batches_tracked", "nbt_missing"),
                     ("running_stats", "momentum_none_ignored")},
    "IgnoresAffine": {("affine", "affine_ignored")},
    "IgnoresTrackRunningStats": {("forward_eval", "track_ignored_in_eval"),
                                 ("track_running_stats", "track_buffers_kept")},
    "WrongDtype": {("dtype", "wrong_output_dtype")},
    "Float32Inside": {("dtype", "float32_precision"), ("running_stats", "float32_precision")},
    "PlainAttributes": {("state", "not_registered"), ("dtype", "state_not_moved")},
}

#: more single mistakes, each with its diagnosis
MORE = {
    "PerSampleStats": {("forward_train", "per_sample_stats"),
                       ("forward_eval", "per_sample_stats")},
    "StatsOverChannels": {("forward_train", "stats_over_channels"),
                          ("forward_eval", "stats_over_channels")},
    "NoEps": {("forward_train", "no_eps"), ("forward_eval", "no_eps")},
    "NoAffineApplied": {("forward_train", "no_affine_applied"),
                        ("forward_eval", "no_affine_applied")},
    "GammaBetaSwapped": {("forward_train", "gamma_beta_swapped"),
                         ("forward_eval", "gamma_beta_swapped")},
    "DetachedMean": {("grad_input", "detached_mean")},
    "NoGradWeight": {("grad_weight", "no_param_grad")},
    "OutputDetached": {("grad_input", "output_detached")},
    "NoRunningUpdate": {("running_stats", "no_running_update")},
    "FixedMomentum": {("running_stats", "wrong_momentum"),
                      ("running_stats", "momentum_none_ignored")},
    "ReplacesRunning": {("running_stats", "replaces_running")},
    "UpdatesInEval": {("running_stats", "updates_in_eval"),
                      ("num_batches_tracked", "nbt_counts_eval")},
    "NbtNotIncremented": {("num_batches_tracked", "nbt_not_incremented")},
    "OwnBufferNames": {("state", "missing_buffer")},
}

#: the formula line each diagnosis must name
LINES = {
    "biased_running_var": "running_var",
    "momentum_reversed": None,  # both running lines, checked below
    "unbiased_var_in_normalisation": "normalise_train",
    "detached_stats": "grad_input",
    "running_stats_in_train": "normalise_train",
    "batch_stats_in_eval": "normalise_eval",
    "nbt_missing": "num_batches_tracked",
    "momentum_none_ignored": "momentum_none",
    "affine_ignored": "affine",
    "track_ignored_in_eval": "track_running_stats",
    "track_buffers_kept": "track_running_stats",
    "wrong_output_dtype": "dtype",
    "float32_precision": "dtype",
    "not_registered": "state",
    "state_not_moved": "dtype",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The check's tensors are tiny: on a busy machine extra intra-op threads make it several
    times slower, without changing a number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def found(report) -> set[tuple[str, str]]:
    return {(f.check, f.cause) for f in report.findings}


def test_the_correct_implementation_has_no_findings_and_every_check_ran():
    report = check_batchnorm(impls.CorrectBN)
    assert report.ok and report.findings == [], str(report)
    assert report.reference == "nn.BatchNorm2d" and report.dims == 2
    assert report.checks == list(CHECKS)
    assert report.configs == ["default", "momentum=None", "affine=False",
                              "track_running_stats=False", "float64"] + (
        ["cuda"] if torch.cuda.is_available() else [])
    assert "No findings" in str(report)


@pytest.mark.parametrize("impl", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                  impls.NativeSubclass1d])
def test_the_native_layers_check_clean_with_their_dims_inferred(impl):
    report = check_batchnorm(impl)
    assert report.ok, str(report)
    assert report.dims == {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(impl, 1)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_correct_implementation_written_differently_has_no_findings(dims):
    """One-pass variance, rsqrt, addcmul: other rounding, no departure."""
    report = check_batchnorm(impls.OnePassVar, dims=dims, num_features=5)
    assert report.ok, str(report)


@pytest.mark.parametrize("name", sorted(WRONG))
def test_each_wrong_implementation_is_caught_with_its_diagnosis(name):
    report = check_batchnorm(getattr(impls, name))
    assert found(report) == WRONG[name], str(report)
    assert not report.ok
    for finding in report.findings:
        assert finding.formula.split(";  ")[0] in FORMULA.values()
        assert finding.what and finding.fix and finding.configs
        line = LINES.get(finding.cause)
        if line is not None and finding.check != "forward_eval":
            assert finding.formula == FORMULA[line], (finding.cause, finding.formula)
        text = " ".join(str(report).split())  # the report wraps its sentences
        assert finding.what in text and " ".join(finding.formula.split()) in text


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_mistakes_each_with_its_own_diagnosis(name):
    report = check_batchnorm(getattr(impls, name))
    assert found(report) == MORE[name], str(report)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name", ["CorrectBN", *sorted(WRONG)])
def test_the_diagnoses_hold_for_1d_and_3d(name, dims):
    report = check_batchnorm(getattr(impls, name), dims=dims)
    assert found(report) == WRONG.get(name, set()), str(report)
    assert report.reference == f"nn.BatchNorm{dims}d"
    if dims == 1:  # tabular (N, C) and sequence (N, C, L) both
        assert [len(s) for s in report.shapes] == [2, 3]


def test_the_diagnoses_carry_the_numbers_behind_them():
    reversed_ = check_batchnorm(impls.MomentumReversed).by_cause("momentum_reversed")[0]
    assert reversed_.values["used"] == pytest.approx(0.9, abs=1e-4)
    assert reversed_.values["expected"] == pytest.approx(0.1)
    assert reversed_.values["name"] == "running_mean, running_var"
    assert FORMULA["running_mean"] in reversed_.formula
    assert FORMULA["running_var"] in reversed_.formula
    assert "reversed" in reversed_.what and "0.9" in reversed_.what

    biased = check_batchnorm(impls.BiasedVar).by_cause("biased_running_var")[0]
    assert biased.values["count"] == 4 * 3 * 3  # values per channel of the (4, C, 3, 3) input
    assert "biased variance" in biased.what and "n - 1" in biased.what

    none = check_batchnorm(impls.NoBatchCount).by_cause("momentum_none_ignored")[0]
    assert none.configs == ("momentum=None",)
    assert none.values["used"] == pytest.approx(0.1, abs=1e-4)
    assert none.values["expected"] == pytest.approx(1.0)  # the first step's 1 / 1

    detached = check_batchnorm(impls.DetachedStats).by_cause("detached_stats")[0]
    assert "E[x] and Var[x]" in detached.what and ".detach()" in detached.fix


def test_diagnoses_that_need_several_steps_or_channels():
    """With momentum=None the first update copies the batch statistics, so a layer that
    normalises with its running statistics looks, at that step alone, like one that uses the
    unbiased variance; with one channel any single update fits some momentum. The diagnosis
    is the one that explains every step."""
    assert found(check_batchnorm(impls.RunningStatsInTrain, momentum=None)) == {
        ("forward_train", "running_stats_in_train")}
    assert found(check_batchnorm(impls.BiasedVar, num_features=1)) == {
        ("running_stats", "biased_running_var")}

    class ReversedAndBiased(impls.MomentumReversed, impls.BiasedVar):
        pass

    assert found(check_batchnorm(ReversedAndBiased, num_features=2)) == {
        ("running_stats", "biased_running_var"), ("running_stats", "momentum_reversed")}


def test_a_factory_an_instance_and_aliases():
    assert check_batchnorm(impls.make_correct).ok
    assert check_batchnorm(factory=impls.make_correct).ok
    assert check_batchnorm(impls.GammaBeta).ok  # gamma / beta found by alias

    missing = check_batchnorm(impls.ScaleShift)
    assert found(missing) == {("state", "missing_parameter")}  # the rest still checks clean
    assert missing.findings[0].values["name"] == "weight, bias"
    assert check_batchnorm(impls.ScaleShift, names={"weight": "scale", "bias": "shift"}).ok
    assert check_batchnorm(impls.OwnBufferNames,
                           names={"running_mean": "avg_mean", "running_var": "avg_var"}).ok

    bn = impls.CorrectBN(6)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.running_mean.uniform_()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    report = check_batchnorm(bn)
    assert report.ok and report.num_features == 6
    assert report.configs[:2] == ["as given", "float64"]
    assert any("instance" in note for note in report.notes)
    assert bn.training and all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    assert check_batchnorm(nn.BatchNorm3d(3).eval()).ok


def test_a_constructor_without_nn_batchnorms_keywords():
    report = check_batchnorm(impls.OnlyChannels)
    assert found(report) == {("constructor", "constructor_keyword")}
    assert report.findings[0].values["name"] == "eps, momentum, affine, track_running_stats"
    assert any("could not be built" in note and "affine=False" in note
               for note in report.notes)


def test_crashes_and_wrong_outputs_are_findings_not_errors():
    crash = check_batchnorm(impls.WeightAlwaysUsed)
    assert found(crash) == {("affine", "raises")}
    finding = crash.findings[0]
    assert finding.configs == ("affine=False",) and finding.formula == FORMULA["affine"]
    assert "AttributeError" in finding.what

    bad = check_batchnorm(impls.ReturnsTuple)
    assert found(bad) == {("forward_train", "bad_output")}  # one finding for every setting
    assert "tuple" in bad.findings[0].what and len(bad.findings[0].configs) == 5


def test_the_check_leaves_global_state_alone():
    rng = torch.get_rng_state()
    with torch.no_grad():  # the check turns autograd on for itself, and back off
        report = check_batchnorm(impls.DetachedStats)
        assert not torch.is_grad_enabled()
    assert found(report) == {("grad_input", "detached_stats")}
    assert torch.equal(rng, torch.get_rng_state())


def test_report_as_dict_is_json():
    report = check_batchnorm(impls.EpsOutsideSqrt, dims=1)
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert payload["ok"] is False and payload["dims"] == 1
    assert {f["cause"] for f in payload["findings"]} == {"eps_outside_sqrt"}
    assert payload["shapes"] == [[8, 4], [4, 4, 5]]


@pytest.mark.parametrize("kwargs, words", [
    ({"impl": 42}, "not a class"),
    ({"impl": impls.CorrectBN, "factory": impls.make_correct}, "exactly one"),
    ({"impl": impls.CorrectBN, "dims": 4}, "dims=4"),
    ({"impl": impls.CorrectBN, "reference": nn.Linear}, "not a native BatchNorm"),
    ({"impl": impls.CorrectBN, "reference": nn.BatchNorm1d, "dims": 2}, "contradicts"),
    ({"impl": impls.CorrectBN, "dtype": torch.float16}, "dtype"),
    ({"impl": impls.CorrectBN, "momentum": 1.5}, "momentum"),
    ({"impl": impls.CorrectBN, "num_features": 0}, "num_features"),
    ({"impl": impls.CorrectBN, "names": ["weight"]}, "names"),
    ({"impl": impls.CorrectBN, "names": {"gamma": "weight"}}, "names"),
    ({"impl": impls.CorrectBN, "reference": nn.SyncBatchNorm}, "not a native BatchNorm"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, words):
    impl = kwargs.pop("impl")
    with pytest.raises(BnvizError, match=words) as info:
        check_batchnorm(impl, **kwargs)
    assert info.value.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_without_cuda():
    with pytest.raises(DeviceError):
        check_batchnorm(impls.CorrectBN, device="cuda")
    note = check_batchnorm(impls.CorrectBN).notes
    assert any("CUDA" in n for n in note)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda():
    report = check_batchnorm(impls.CorrectBN)
    assert "cuda" in report.configs and report.ok, str(report)
    assert check_batchnorm(impls.CorrectBN, device="cuda").ok
    assert found(check_batchnorm(impls.DetachedStats, device="cuda")) == {
        ("grad_input", "detached_stats")}
    wrong = check_batchnorm(impls.OnesOnCpu)
    assert found(wrong) == {("device", "raises")}, str(wrong)
    assert wrong.findings[0].configs == ("cuda",)
    assert wrong.findings[0].formula == FORMULA["device"]


# --------------------------------------------------------------------------------------------
# loading and the CLI
# --------------------------------------------------------------------------------------------


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_findings_and_exits_1(capsys):
    code, out, err = run(capsys, "check-bn", "tests.bn_impls:BiasedVar")
    assert code == 1, err
    assert "BiasedVar against nn.BatchNorm2d" in out and "biased variance" in out
    assert FORMULA["running_var"] in out and "fix:" in out


def test_cli_exits_0_without_findings_and_takes_options(capsys):
    code, out, err = run(capsys, "check-bn", "tests.bn_impls:CorrectBN", "--dims", "1",
                         "--num-features", "3", "--momentum", "none", "--steps", "2")
    assert code == 0, err
    assert "No findings" in out and "nn.BatchNorm1d" in out and "momentum=None" in out


def test_cli_json_and_names(capsys):
    code, out, err = run(capsys, "check-bn", "tests/bn_impls.py:ScaleShift", "--name",
                         "weight=scale", "--name", "bias=shift", "--json", "-")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["ok"] and payload["implementation"] == "ScaleShift"


@pytest.mark.parametrize("spec, words", [
    ("tests.bn_impls:NOT_A_CLASS", "not a class"),
    ("tests.bn_impls:Missing", "has no attribute"),
    ("no_such_package.layers:MyBN", "No module named 'no_such_package.layers'"),
    ("tests/no_such_file.py:MyBN", "No file"),
    ("CorrectBN", "does not name an object"),
])
def test_cli_bad_spec_is_one_line_and_exit_2(capsys, spec, words):
    code, out, err = run(capsys, "check-bn", spec)
    assert code == 2
    assert err.startswith("bnviz: error:") and words in err and err.count("\n") == 1
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("argv, words", [
    (["--momentum", "fast"], "--momentum"),
    (["--name", "gamma=scale"], "--name"),
    (["--dims", "4"], "invalid choice"),
])
def test_cli_bad_options_exit_2(capsys, argv, words):
    code, _, err = run(capsys, "check-bn", "tests.bn_impls:CorrectBN", *argv)
    assert code == 2 and words in err and err.count("\n") == 1


def test_a_file_that_fails_to_import_is_a_user_error(tmp_path):
    broken = tmp_path / "broken_bn.py"
    broken.write_text("import torch\nclass MyBN(torch.nn.Module):\n    def f(:\n")
    with pytest.raises(BnvizError, match="SyntaxError"):
        load_object(f"{broken}:MyBN")
    needs = tmp_path / "needs_bn.py"
    needs.write_text("import not_installed_anywhere\n")
    with pytest.raises(BnvizError, match="not_installed_anywhere"):
        load_object(f"{needs}:MyBN")
    good = tmp_path / "good_bn.py"
    good.write_text("from torch import nn\nclass Outer:\n    Inner = nn.BatchNorm2d\n")
    assert load_object(f"{good}:Outer.Inner") is nn.BatchNorm2d


@pytest.mark.slow
def test_the_installed_command_finds_modules_in_the_current_directory():
    """The console script's sys.path does not hold the current directory; `bnviz check-bn`
    adds it, as `python -m` does, so the operator's own package is found by name."""
    script = Path(sys.executable).with_name("bnviz")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "bnviz"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name, expected in (("BiasedVar", 1), ("CorrectBN", 0), ("NOT_A_CLASS", 2)):
        proc = subprocess.run([*command, "check-bn", f"tests.bn_impls:{name}"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == expected, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_every_diagnosis_and_formula_line_is_documented():
    from bnviz.bn_check.causes import CAUSES

    doc = (ROOT / "docs" / "check_batchnorm.md").read_text()
    assert [c for c in CAUSES if f"`{c}`" not in doc] == []
    assert [k for k in FORMULA if f"`{k}`" not in doc] == []


def test_bnviz_exports_check_batchnorm():
    assert bnviz.check_batchnorm is check_batchnorm and "check_batchnorm" in bnviz.__all__
