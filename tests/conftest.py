"""Shared fixtures: every device test runs on CPU and, when present, CUDA."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def lite():
    """The offline default model (real ImageNet weights). Tests must not mutate it."""
    import bnviz

    return bnviz.load_model("efficientnet_lite0")


def pytest_report_header(config):
    return f"bnviz test devices: {', '.join(DEVICES)}"
