"""``inspect``: one forward pass, every BatchNorm layer measured, the caller's model untouched.

How it works, and why (the steps in order: :func:`bnviz.inspection.run._run_on_copy`):

* **A private copy** (:mod:`.copies`). The forward runs on a copy of the model whose
  modules and buffers are copied (a train-mode forward writes buffers) and whose
  parameters are shared read-only; the caller's hooks are left behind. Modes are applied
  to the copy only, so threads can inspect one shared model with different modes at once
  and the caller's model comes back exactly as it was; ``commit=True`` copies the
  running-stat update back. Copies are pooled and reused while the model's fingerprint
  (:mod:`.fingerprint`) is unchanged.
* **One forward, each BN layer wrapped** (:mod:`.session`). Every layer's running
  buffers are copied at once just before the forward (:mod:`.snapshot`). Each BN layer's
  forward is wrapped (an instance ``forward``: hooks would put every call on
  ``nn.Module``'s slow path) and measures what needs the activation itself right after
  the layer ran: on the CPU one call of the compiled probe writing the finished check into
  network-wide blocks (:mod:`.blocks`); elsewhere (CUDA, float64, a layer called twice)
  :func:`bnviz.manual_bn.probe_layer`, with the arithmetic done for all those layers at
  once after the forward. On small inputs the fixed cost of many tiny tensor ops and
  Python calls per layer, not memory traffic, is what an inspection pays.
* **A layer that applies its own activation** (timm's ``BatchNormAct2d``, :mod:`.fused`)
  is measured when its ``drop``/``act`` child receives the normalised value, before an
  in-place activation overwrites it; the activation's output is kept separately.
* **Copy-on-write, not clone-always** (:mod:`.watch`). Kept tensors are held by
  reference; a torch-function mode clones one only when an in-place op is about to
  overwrite it, and names the activation consuming each BN output -- exactly why a hook
  that keeps a reference can see post-ReLU values. A statistics-only forward reuses what
  an earlier forward with the same training flags and input shape learned and skips
  the watch.
* **The report** (:mod:`.layer_reports`, :mod:`.report`) is built after the forward with
  vectorised arithmetic and a few concatenated copies.
"""

from __future__ import annotations

# Besides the public names: the tensor_sink API, helpers the dashboard and the pitfall labs
# use, and internals that benchmarks/bench_inspect.py and tests reach for.
from .copies import _POOL as _POOL
from .fingerprint import _scan as _scan
from .layer_reports import _params_report as _params_report
from .report import InspectionReport, LayerReport, Prediction
from .run import inspect
from .run import logits_of as logits_of
from .run import single_value_error as single_value_error
from .session import KeptTensors as KeptTensors
from .session import TensorSink as TensorSink
from .watch import ACTIVATIONS as ACTIVATIONS

__all__ = ["inspect", "InspectionReport", "LayerReport", "Prediction"]
