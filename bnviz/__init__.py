"""bnviz: a live microscope for PyTorch BatchNorm.

Headless use::

    import bnviz
    model = bnviz.load_model("efficientnet_lite0")          # offline, real ImageNet weights
    x = bnviz.make_stimulus("image", name="chelsea", batch_size=8, composition="jitter")
    report = bnviz.inspect(model, x, modes={"_bn0": "train", "_blocks.0._bn1": "eval"})
    report.to_frame()                                       # one row per BN layer
    report.layer("_bn0").stats_used                         # "batch"
    report.layer("_bn0").max_abs_diff                       # manual vs native, ~1e-6

Every number comes from PyTorch itself or from an independent implementation checked
against it (:mod:`bnviz.manual_bn`); the caller's model is never modified unless asked.
"""

from .bn_check import check_batchnorm
from .compare import compare, compare_predictions
from .devices import resolve_device
from .errors import (
    BnvizError,
    CheckpointError,
    DeviceError,
    LayerError,
    ModeError,
    StimulusError,
    UnknownModelError,
    WeightsUnavailableError,
)
from .hosting.serve import serve
from .inspection import InspectionReport, LayerReport, Prediction, inspect
from .manual_bn import batch_stats, manual_batch_norm, manual_running_update
from .models import DEFAULT_MODEL, LoadedModel, list_models, load_model, weights_status
from .modes import LayerMode, parse_mode, stats_used, updates_running_stats
from .stimuli import make_stimulus, make_stimulus_from_spec, parse_stimulus_spec

__version__ = "0.1.0"

__all__ = [
    "BnvizError",
    "CheckpointError",
    "DEFAULT_MODEL",
    "DeviceError",
    "InspectionReport",
    "LayerError",
    "LayerMode",
    "LayerReport",
    "LoadedModel",
    "ModeError",
    "Prediction",
    "StimulusError",
    "UnknownModelError",
    "WeightsUnavailableError",
    "batch_stats",
    "check_batchnorm",
    "compare",
    "compare_predictions",
    "inspect",
    "list_models",
    "load_model",
    "make_stimulus",
    "make_stimulus_from_spec",
    "manual_batch_norm",
    "manual_running_update",
    "parse_mode",
    "parse_stimulus_spec",
    "resolve_device",
    "serve",
    "stats_used",
    "updates_running_stats",
    "weights_status",
]


def __getattr__(name: str):
    # bnviz.plot loads plotly, which ``import bnviz`` must not: it is imported on first use.
    if name == "plot":
        import importlib

        return importlib.import_module(f"{__name__}.plot")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
