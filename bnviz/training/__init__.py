"""Training lab: watch BatchNorm's statistics learn, live (sections 2 and 5 of
``docs/stories.md``).

One small CNN (conv-BN-ReLU three times, then a linear layer) is trained on generated
images four times side by side, from the *same* initial weights and on the *same* batches,
with four kinds of BatchNorm: native, manual (the core formula), detached (same forward,
no gradient through the statistics) and frozen (eval mode throughout). While the native
network trains, extra BatchNorm layers fed its inputs record the running statistics each
studied momentum would have given.

Modules, one subject each:

- :mod:`~bnviz.training.config`: :class:`TrainConfig`, its validation, the variant names;
- :mod:`~bnviz.training.data`: the generated gratings/checkerboards/rings and batch order;
- :mod:`~bnviz.training.model`: :class:`SmallCNN` and the BatchNorm variants;
- :mod:`~bnviz.training.gradients`: :func:`gradient_check` on one batch;
- :mod:`~bnviz.training.momentum_study`: the running statistics of each momentum;
- :mod:`~bnviz.training.lab`: :func:`train_lab`, the run loop;
- :mod:`~bnviz.training.results` and :mod:`~bnviz.training.verdict`: what a run records
  and what it concludes;
- :mod:`~bnviz.training.thinning`: how a long run keeps a bounded number of curve points;
- :mod:`~bnviz.training.threads`: a run's CPU threads, set for its own thread only;
- :mod:`~bnviz.training.job`: :class:`TrainingJob`, a run in a background thread;
- :mod:`~bnviz.training.jobs`: :class:`JobBoard`, a server's jobs: one per session, a few at
  a time, the others queued, stopped when their session ends;
- :mod:`~bnviz.training.cli`: the ``bnviz train`` subcommand (:func:`register_cli`);
- :mod:`~bnviz.training.figures` and :mod:`~bnviz.training.tables`: the page's plotly
  figures and data frames, pure functions of a :class:`TrainResult` (imported on demand,
  so the CLI never loads plotly).
"""

from __future__ import annotations

from .cli import cmd_train, config_from_args, register_cli
from .config import (
    DEFAULT_MOMENTA,
    LAYERS,
    VARIANT_DESCRIPTIONS,
    VARIANTS,
    TrainConfig,
    TrainConfigError,
    momentum_label,
    parse_momenta,
)
from .data import CLASS_NAMES, Dataset, DataSpec, batch_order, make_dataset
from .gradients import GradientCheck, gradient_check
from .job import TrainingJob
from .jobs import JobBoard, TrainingInProgressError, default_board
from .lab import SGD_MOMENTUM, TRAIN_MODE_VAL_BATCHES, train_lab
from .model import ManualBatchNorm2d, SmallCNN, build_model, initial_state, make_bn
from .results import LayerTrace, TrainResult, VariantHistory
from .threads import torch_threads
from .verdict import NO_GAP_POINTS, verdict_lines

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_MOMENTA",
    "LAYERS",
    "NO_GAP_POINTS",
    "SGD_MOMENTUM",
    "TRAIN_MODE_VAL_BATCHES",
    "VARIANTS",
    "VARIANT_DESCRIPTIONS",
    "DataSpec",
    "Dataset",
    "GradientCheck",
    "JobBoard",
    "LayerTrace",
    "ManualBatchNorm2d",
    "SmallCNN",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainingInProgressError",
    "TrainingJob",
    "VariantHistory",
    "batch_order",
    "build_model",
    "cmd_train",
    "config_from_args",
    "default_board",
    "gradient_check",
    "initial_state",
    "make_bn",
    "make_dataset",
    "momentum_label",
    "parse_momenta",
    "register_cli",
    "torch_threads",
    "train_lab",
    "verdict_lines",
]
