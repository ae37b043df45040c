"""Shared fixtures: every device test runs on CPU and, when present, CUDA."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _full_float32_on_cuda():
    """On CUDA, PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default. The
    tests compare against float32 references with float32 tolerances, so CUDA runs them in
    full float32; a no-op without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _no_background_prefetch():
    """In-process tests (AppTest, dashboard) count forwards and compare numbers per run, so
    the dashboard's background prefetch is off there; tests that are about it install their
    own with ``dashboard.set_prefetcher`` (undone here). Servers started by the browser
    tests keep the app's default."""
    from bnviz import dashboard
    from bnviz.prefetch import Prefetcher

    previous = dashboard.set_prefetcher(Prefetcher(enabled=False))
    yield
    dashboard.set_prefetcher(previous)


@pytest.fixture
def fresh_settings(monkeypatch):
    """For tests that change ``BNVIZ_*`` variables with ``monkeypatch.setenv``: call it
    after each change to read them again; afterwards the environment is restored first, then
    read again."""
    from bnviz.settings import settings

    settings.cache_clear()
    yield settings.cache_clear
    monkeypatch.undo()
    settings.cache_clear()


@pytest.fixture(scope="session")
def lite():
    """The offline default model (real ImageNet weights). Tests must not mutate it."""
    import bnviz

    return bnviz.load_model("efficientnet_lite0")


def pytest_report_header(config):
    return f"bnviz test devices: {', '.join(DEVICES)}"


def compiled_probe_or_skip() -> None:
    """Skip where the compiled probe is not built -- but never in CI, where `make test`
    builds it: there a missing kernel is a failure, not a skip."""
    import os

    from bnviz import probe_kernel

    usable, why = probe_kernel._load()
    if not usable:
        if os.environ.get("CI"):
            pytest.fail(f"compiled probe unavailable in CI: {why}")
        pytest.skip(f"compiled probe unavailable: {why}")


@pytest.fixture(params=["compiled", "eager"])
def probe_backend(request):
    """Run a test once with the compiled probe (bnviz.probe_kernel) and once with eager ops."""
    from bnviz import probe_kernel

    if request.param == "compiled":
        compiled_probe_or_skip()
    with probe_kernel.forced(request.param == "compiled"):
        yield request.param
