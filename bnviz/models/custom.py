"""The operator's own network and input for the dashboard (``bnviz serve``, ``bnviz.serve``).

Whoever starts the server names the model and the input; a browser never does. ``bnviz
serve`` writes its options as a :class:`ServeSpec` into a private file (a folder only its
user can open) and gives the dashboard its path in ``BNVIZ_SERVE_SPEC``; ``bnviz.serve(model,
x)`` puts the objects themselves in this process's :func:`served_model`. The dashboard reads
only these two: no link, upload or widget can make the server import code or read a path.

A model is a registry name, ``pkg.module:factory`` or ``path/to/file.py:factory`` (a
function or class returning an ``nn.Module``, called with torch seeded so every start shows
the same network), optionally with a state_dict (``weights_only=True``, checked key by key
as for registry models). The input is left to the dashboard's image stimuli, or given: a
shape such as ``16x32`` (random normal values from ``seed``), a ``.npy`` file (read without
pickle) or a ``.pt`` file (``weights_only=True``) holding a tensor or a tuple of tensors;
several inputs are passed to the model's forward as ``model(*inputs)``.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import BnvizError
from ..settings import settings
from ..validation import seeded_call
from .loaded import LoadedModel, from_module

#: The largest input file read (a tensor of 256 M float32 values).
MAX_INPUT_BYTES = 2**30
#: The most values a random input may have (1 GB of float32).
MAX_INPUT_ELEMENTS = 2**28
#: ``16x32``, ``8 x 3 x 16``, ``8,3,16``: the dimensions of a random input.
_SHAPE = re.compile(r"^\s*\d+(\s*[x×,]\s*\d+)*\s*$")
_FILE_KINDS = (".npy", ".pt", ".pth")
INPUT_FIX = ("give a shape such as 16x32 (random normal values), or a .npy file (saved "
             "with np.save, no pickled objects) or a .pt file (torch.save of a tensor or a "
             "tuple of tensors).")
#: What links call a served model: ``served:<name>`` (lower case, as link values are read).
SERVED_PREFIX = "served:"


# -- inputs ------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    """``"16x32"`` -> ``(16, 32)``; every dimension at least 1, at most
    :data:`MAX_INPUT_ELEMENTS` values in all."""
    if not _SHAPE.match(str(text)):
        raise BnvizError(f"Input {text!r} is neither a shape nor a .npy/.pt file.", INPUT_FIX)
    dims = tuple(int(d) for d in re.split(r"[x×,]", str(text).replace(" ", "")))
    if min(dims) < 1:
        raise BnvizError(f"Input shape {text!r} has a dimension of 0.",
                         "give every dimension at least 1, e.g. 16x32.")
    if int(np.prod(dims, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
        raise BnvizError(f"Input shape {text!r} has more than {MAX_INPUT_ELEMENTS:,} values.",
                         "use a smaller batch or shape.")
    return dims


def is_input_file(item: str) -> bool:
    return str(item).lower().endswith(_FILE_KINDS)


def _read_bytes(path: str, label: str) -> bytes:
    from ..stimuli.files import read_regular_file

    return read_regular_file(path, MAX_INPUT_BYTES, label, error=BnvizError,
                             missing_fix="check the path of the --input file.")


def _npy_tensor(data: bytes, label: str) -> torch.Tensor:
    if not data.startswith(b"\x93NUMPY"):  # np.load would take anything else for a pickle
        what = ("a pickle (pickle.dump), which bnviz refuses to load because unpickling it "
                "can run arbitrary code" if data[:1] == b"\x80" else "not a .npy array file")
        raise BnvizError(f"{label} is {what}.", "save an array of numbers with np.save(path, "
                         "array).")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise BnvizError(f"{label} holds pickled Python objects, which bnviz refuses to "
                             "load because unpickling them can run arbitrary code.",
                             "save an array of numbers: np.save(path, array.astype("
                             "'float32')).") from None
        raise BnvizError(f"{label} is not a .npy array file ({exc}).", INPUT_FIX) from None
    except (OSError, EOFError) as exc:
        raise BnvizError(f"{label} is not a .npy array file ({exc}).", INPUT_FIX) from None
    if isinstance(array, np.lib.npyio.NpzFile) or not isinstance(array, np.ndarray):
        raise BnvizError(f"{label} is not a single array.", INPUT_FIX)
    if array.dtype.kind not in "biuf":
        raise BnvizError(f"{label} holds {array.dtype} values, not numbers.", INPUT_FIX)
    return torch.from_numpy(np.ascontiguousarray(array))


def _pt_tensors(data: bytes, path: str, label: str) -> tuple[torch.Tensor, ...]:
    from .checkpoint import _unreadable_problem

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
        raise BnvizError(_unreadable_problem(path, label, exc), INPUT_FIX) from None
    items = tuple(obj) if isinstance(obj, tuple | list) else (obj,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        kinds = ", ".join(sorted({type(t).__name__ for t in items})) or "nothing"
        raise BnvizError(f"{label} holds {kinds}, not a tensor or a tuple of tensors.",
                         INPUT_FIX)
    return items


def read_input_file(path: str) -> tuple[torch.Tensor, ...]:
    """The tensor(s) of a ``.npy`` (no pickle) or ``.pt`` (``weights_only=True``) file."""
    label = f"input file {os.path.basename(path)!r}"
    data = _read_bytes(path, label)
    if path.lower().endswith(".npy"):
        return (_npy_tensor(data, label),)
    return _pt_tensors(data, path, label)


def make_inputs(items: tuple[str, ...], seed: int = 0
                ) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...]]:
    """The inputs ``items`` name (shapes and files, in order) and a description of each."""
    gen = torch.Generator().manual_seed(int(seed))
    tensors: list[torch.Tensor] = []
    texts: list[str] = []
    for item in items:
        if is_input_file(item):
            found = read_input_file(item)
            tensors.extend(found)
            name = os.path.basename(item)
            texts.extend(f"{name}{f' [{i}]' if len(found) > 1 else ''} "
                         f"({_shape_text(t)}, {str(t.dtype).removeprefix('torch.')})"
                         for i, t in enumerate(found))
        else:
            shape = parse_shape(item)
            tensors.append(torch.randn(shape, generator=gen))
            texts.append(f"random normal {_shape_text(tensors[-1])} (seed {seed})")
    return tuple(tensors), tuple(texts)


def _shape_text(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape)


def _as_model_dtype(inputs: tuple[torch.Tensor, ...], module: nn.Module
                    ) -> tuple[torch.Tensor, ...]:
    """Floating inputs in the dtype of the model's parameters (a float64 array saved by
    numpy would not run through float32 weights); integer inputs (indices) as they are."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is None:
        return inputs
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


# -- the model ---------------------------------------------------------------------------------


def is_registry_name(spec: str) -> bool:
    from .registry import list_models

    return ":" not in spec and spec.strip().lower().replace("-", "_") in list_models()


def _call_factory(obj: Any, spec: str) -> nn.Module:
    from ..bn_check.candidate import short_error

    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise BnvizError(f"{spec!r} names a {type(obj).__name__}, not a function or class.",
                         "name a function (or class) that returns an nn.Module, e.g. "
                         "examples/my_model.py:build.")
    try:
        built = seeded_call(obj, seed=0)  # the same random init in every process
    except Exception as exc:
        raise BnvizError(f"Calling {spec!r} failed: {short_error(exc)}.",
                         "give a function that takes no arguments and returns the model.") \
            from None
    if not isinstance(built, nn.Module):
        raise BnvizError(f"{spec!r} returned a {type(built).__name__}, not an nn.Module.",
                         "return the model (a torch.nn.Module) from that function.")
    return built


def _apply_weights(module: nn.Module, weights: str, name: str) -> None:
    from .checkpoint import _apply_state_dict, _checkpoint_path, _read_state_dict

    shown, path = _checkpoint_path(weights)
    label = f"checkpoint {os.path.basename(shown)!r}"
    fix = ("save it with torch.save(model.state_dict(), path) from the same model, or "
           "leave --weights out.")
    state = _read_state_dict(path, label, fix)
    _apply_state_dict(module, state, name, label, fix)


def load_model_spec(spec: str, weights: str | None = None) -> LoadedModel:
    """The model ``spec`` names (see the module docstring), on the CPU in eval mode."""
    from .load import load_model

    spec = str(spec).strip()
    if not spec:
        raise BnvizError("No model given.", "pass --model NAME, MODULE:FUNCTION or "
                                            "FILE.py:FUNCTION.")
    if is_registry_name(spec):
        return load_model(spec, weights=weights or "pretrained")
    if ":" not in spec:
        from .registry import list_models

        raise BnvizError(f"{spec!r} is not a registry model nor MODULE:FUNCTION.",
                         f"pass one of {', '.join(list_models())}, or name your own: "
                         "pkg.module:build or path/to/file.py:build.")
    from ..bn_check.loading import load_object

    module = _call_factory(load_object(spec), spec)
    where, _, attr = spec.rpartition(":")
    name = f"{os.path.basename(where)}:{attr}"
    if weights:
        _apply_weights(module, weights, name)
    loaded = from_module(module.cpu().eval(), name=name)
    loaded.weights = (f"state_dict {os.path.basename(str(weights))!r}" if weights
                      else f"as {attr}() builds it (torch seeded with 0)")
    loaded.weights_status = "checkpoint" if weights else "custom"
    return loaded


# -- what the server shows ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServeSpec:
    """What ``bnviz serve`` was started with, as the dashboard process reads it."""

    model: str
    weights: str | None = None
    inputs: tuple[str, ...] = ()
    seed: int = 0
    #: folders put on ``sys.path`` first (the operator's working folder, for pkg.module)
    sys_path: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSpec:
        data = json.loads(text)
        return cls(model=str(data["model"]), weights=data.get("weights"),
                   inputs=tuple(str(i) for i in data.get("inputs", ())),
                   seed=int(data.get("seed", 0)),
                   sys_path=tuple(str(p) for p in data.get("sys_path", ())))


@dataclass
class ServedModel:
    """The operator's model and input, as the dashboard shows them.

    ``key`` is the model's name in the picker and in links; ``inputs`` None means the
    dashboard's image stimuli are used, as for registry models. ``default_only``: a registry
    model as it is (only the dashboard's default model changes).
    """

    key: str
    loaded: LoadedModel | None
    inputs: tuple[torch.Tensor, ...] | None = None
    input_texts: tuple[str, ...] = ()
    default_only: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def operator_input(self) -> bool:
        """The input is the operator's (no image stimulus controls, no predictions)."""
        return self.inputs is not None

    @property
    def x(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What :func:`bnviz.inspect` gets: one tensor, or the tuple of several."""
        assert self.inputs is not None
        return self.inputs[0] if len(self.inputs) == 1 else self.inputs

    @property
    def input_text(self) -> str:
        """``random normal 16x32 (seed 0)``; several inputs joined with ``and``."""
        return " and ".join(self.input_texts)

    @property
    def batch_size(self) -> int:
        assert self.inputs is not None
        return int(self.inputs[0].shape[0]) if self.inputs[0].dim() else 1


def served_key(name: str, generation: int = 1) -> str:
    """``served:<name>`` as a link can carry it (lower case, no ``-``); a model served later
    in the same process gets another key, so nothing cached for the first is shown for it."""
    token = re.sub(r"[^a-z0-9_.]+", "_", name.lower()).strip("_") or "model"
    return f"{SERVED_PREFIX}{token}" + (f"_{generation}" if generation > 1 else "")


def build_served(spec: ServeSpec) -> ServedModel:
    """Load the model and make the inputs ``spec`` names (errors: :class:`BnvizError`)."""
    import sys

    for folder in reversed(spec.sys_path):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    if is_registry_name(spec.model) and not spec.weights and not spec.inputs:
        name = spec.model.strip().lower().replace("-", "_")
        return ServedModel(key=name, loaded=None, default_only=True)
    loaded = load_model_spec(spec.model, spec.weights)
    inputs, texts = (make_inputs(spec.inputs, spec.seed) if spec.inputs else (None, ()))
    if inputs is not None and loaded.preprocess.identity:
        inputs = _as_model_dtype(inputs, loaded.module)
    return ServedModel(key=served_key(loaded.name), loaded=loaded, inputs=inputs,
                       input_texts=texts)


def check_served(served: ServedModel) -> None:
    """One eval forward of the model on its input, with every BatchNorm layer measured (as
    the dashboard will): a wrong shape or a model without BatchNorm is said now, in the
    terminal, not on the first page."""
    from ..bn_check.candidate import short_error
    from ..inspection import inspect

    loaded = served.loaded
    if loaded is None:
        return
    if not loaded.bn_layer_names:
        raise BnvizError(f"{loaded.name} has no BatchNorm layers, so there is nothing to "
                         "inspect.", "serve a model with BatchNorm1d/2d/3d layers.")
    if served.inputs is None:
        from ..stimuli import make_stimulus

        x: Any = make_stimulus("noise", loaded.preprocess.input_size, 2, seed=0)
        what = "2 images of 3 x 224 x 224 (the dashboard's image stimuli)"
        fix = ("give its input with --input, e.g. --input 16x32 for 16 rows of 32 "
               "features, or a .npy/.pt file.")
    else:
        x = served.x
        what = served.input_text
        fix = ("give --input in the shape the model's forward takes (repeat --input for "
               "a model with several inputs).")
    try:
        inspect(loaded, x, modes="eval", keep_tensors=False, device="cpu")
    except BnvizError:
        raise
    except Exception as exc:
        raise BnvizError(f"{loaded.name} does not run on {what}: {short_error(exc)}.",
                         fix) from None


# -- the model this process serves -------------------------------------------------------------

_LOCK = threading.Lock()
_IN_PROCESS: list[ServedModel] = []  # set by bnviz.serve(): at most one
_FROM_SPEC: dict[str, ServedModel] = {}  # BNVIZ_SERVE_SPEC's file -> what it names
_GENERATION = [0]


def served_from_objects(model: Any, x: Any = None, *, name: str | None = None
                        ) -> ServedModel:
    """``model`` (an ``nn.Module`` or a :class:`LoadedModel`) and ``x`` (a tensor, a tuple
    of tensors, or None for the image stimuli) as a :class:`ServedModel` (not served yet:
    :func:`set_served`).

    The module is used as it is (never modified: every run is on a private copy); ``x`` is
    copied, so later changes to it in a notebook do not change what is shown."""
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, nn.Module):
        loaded = from_module(model, name=name or type(model).__name__)
    else:
        raise BnvizError(f"serve() needs an nn.Module, got {type(model).__name__}.",
                         "pass your model (a torch.nn.Module) or bnviz.load_model(name).")
    inputs = None
    texts: tuple[str, ...] = ()
    if x is not None:
        items = tuple(x) if isinstance(x, tuple | list) else (x,)
        if not items or not all(isinstance(t, torch.Tensor) for t in items):
            raise BnvizError(f"serve() needs x as a tensor or a tuple of tensors, got "
                             f"{type(x).__name__}.", "pass the batch your model takes.")
        inputs = tuple(t.detach().clone() for t in items)
        texts = tuple(f"the tensor given to serve() ({_shape_text(t)}, "
                      f"{str(t.dtype).removeprefix('torch.')})" for t in inputs)
    return ServedModel(key=served_key(loaded.name), loaded=loaded, inputs=inputs,
                       input_texts=texts)


def set_served(served: ServedModel) -> ServedModel:
    """Make ``served`` what this process's dashboard shows (instead of any earlier one),
    under a key no earlier model of this process had."""
    from dataclasses import replace

    with _LOCK:
        _GENERATION[0] += 1
        served = replace(served, key=served_key(served.loaded.name, _GENERATION[0]))
        _IN_PROCESS[:] = [served]
    return served


def clear_served() -> None:
    """Forget the model :func:`set_served` set (the server that showed it stopped)."""
    with _LOCK:
        _IN_PROCESS.clear()


def read_spec(path: str) -> ServeSpec:
    try:
        with open(path, encoding="utf-8") as fh:
            return ServeSpec.from_json(fh.read())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BnvizError(f"The server's model settings could not be read ({exc}).",
                         "start the server again with bnviz serve.") from None


def served_model() -> ServedModel | None:
    """What this process's dashboard shows besides the registry: the model given to
    ``bnviz.serve()`` in this process, else the one ``bnviz serve`` named (loaded once),
    else None."""
    with _LOCK:
        if _IN_PROCESS:
            return _IN_PROCESS[0]
        path = settings().serve_spec
        if not path:
            return None
        if path not in _FROM_SPEC:
            _FROM_SPEC[path] = build_served(read_spec(path))
        return _FROM_SPEC[path]
