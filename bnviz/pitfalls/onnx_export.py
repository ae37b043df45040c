"""The real ``torch.onnx.export``, run with both exporters and checked with onnxruntime.

The mode-guard experiment's story is an export that silently puts a frozen BatchNorm layer
back into training mode. This module does the export for real and reads back what it
produced, so the page can show, for each exporter (the legacy TorchScript one,
``dynamo=False``, and ``dynamo=True``):

* the calls it made to ``model.train`` and which BatchNorm layers' ``training`` flags
  differ afterwards (:func:`export_model`);
* what the ONNX graph holds for each BatchNorm layer: a ``BatchNormalization`` node with
  its ``training_mode`` (0 = running statistics, 1 = batch statistics), or no node at all
  because the exporter folded the layer into the preceding convolution
  (:func:`graph_batchnorms`);
* the exported file run with onnxruntime on the same input, against PyTorch's outputs of
  the same network in eval mode, in train mode and as it was configured
  (:func:`compare_with_pytorch`).

Every export works on the object it is given: pass a private copy.
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..modes import bn_layers

__all__ = ["EXPORTERS", "ExportAttempt", "export_model", "graph_batchnorms", "run_onnx",
           "compare_with_pytorch"]

#: The two exporters of ``torch.onnx.export``, by the keyword that picks them.
EXPORTERS = (False, True)


def exporter_label(dynamo: bool) -> str:
    return f"dynamo={dynamo}"


@dataclass
class ExportAttempt:
    """What one ``torch.onnx.export`` call did to the model's modes, and what it wrote."""

    dynamo: bool
    completed: bool
    error: str | None
    train_calls: list[bool]  # arguments of every model.train(...) the exporter made
    #: BatchNorm layers whose ``training`` flag differs after the export from before it
    flags_changed: list[str] = field(default_factory=list)
    onnx_bytes: bytes | None = None
    seconds: float = 0.0

    @property
    def exporter(self) -> str:
        return exporter_label(self.dynamo)


def export_model(model: nn.Module, x: torch.Tensor, dynamo: bool = False) -> ExportAttempt:
    """``torch.onnx.export(model, (x,), f, dynamo=dynamo)``, watched.

    The calls to ``model.train`` are recorded through an instance attribute (removed
    afterwards), so the result says what the exporter itself did, even when the export then
    fails. Any exception is reported, never raised: an unusable exporter is a finding of
    the experiment, not an error.
    """
    calls: list[bool] = []
    original_train = model.train

    def spy(mode: bool = True):
        calls.append(bool(mode))
        return original_train(mode)

    before = {n: m.training for n, m in bn_layers(model)}
    object.__setattr__(model, "train", spy)
    start = time.perf_counter()
    data = None
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:  # verbose=False: no progress lines on stdout (a CLI's JSON)
                program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
                data = program.model_proto.SerializeToString()
            else:
                buffer = io.BytesIO()
                torch.onnx.export(model, (x,), buffer, dynamo=False)
                data = buffer.getvalue()
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported as data
        error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        object.__delattr__(model, "train")
    changed = [n for n, m in bn_layers(model) if m.training != before.get(n)]
    return ExportAttempt(dynamo, data is not None, error, calls, changed, data,
                         time.perf_counter() - start)


def graph_batchnorms(onnx_bytes: bytes, layer_names: list[str]) -> list[dict[str, Any]]:
    """For each BatchNorm layer: the ``BatchNormalization`` node that computes it, or None.

    A node is matched to a layer by its parameter and buffer inputs, which both exporters
    name after the module (``layer4.1.bn2.running_mean``). ``training_mode`` is the node's
    attribute (ONNX's default 0 when absent: normalise with the running statistics).
    """
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    rows = []
    for name in layer_names:
        wanted = {f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
        node = next((n for n in nodes if wanted & set(n.input)), None)
        if node is None:
            rows.append({"layer": name, "node": None, "training_mode": None,
                         "in_graph": "no BatchNormalization node (folded into the preceding "
                                     "convolution, or computed from other ops)"})
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mode = int(attrs.get("training_mode", 0))
        rows.append({"layer": name, "node": node.name, "training_mode": mode,
                     "in_graph": f"BatchNormalization, training_mode={mode} ("
                                 + ("batch statistics" if mode else "running statistics")
                                 + ")"})
    return rows


def run_onnx(onnx_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    """The exported network's first output on ``x``, computed by onnxruntime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(onnx_bytes, options,
                                           providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
    return session.run(None, feed)[0]


def pytorch_outputs(configured: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """PyTorch's output of copies of ``configured`` with every BatchNorm layer in eval, every
    one in train (batch statistics), and each as configured (the user's per-layer modes).

    Every other module runs in eval: dropout would make the train-mode references random,
    and the exported graphs contain no dropout.
    """
    flags = {n: m.training for n, m in bn_layers(configured)}
    outputs = {}
    for label in ("eval", "train", "as configured"):
        net = copy.deepcopy(configured).eval()
        for name, bn in bn_layers(net):
            bn.train(label == "train" or (label == "as configured" and flags[name]))
        with torch.no_grad():
            out = net(x)
        outputs[label] = _first_tensor(out).detach().cpu().numpy()
    return outputs


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    return next(t for t in out if isinstance(t, torch.Tensor))


def compare_with_pytorch(onnx_output: np.ndarray,
                         references: dict[str, np.ndarray]) -> dict[str, float]:
    """``max |onnxruntime - PyTorch|`` against each reference output."""
    return {label: float(np.abs(onnx_output.astype(np.float64) - ref.astype(np.float64)).max())
            for label, ref in references.items() if ref.shape == onnx_output.shape}


def closest(diffs: dict[str, float]) -> str | None:
    """The PyTorch reference the ONNX output reproduces (the smallest difference)."""
    return min(diffs, key=diffs.get) if diffs else None
