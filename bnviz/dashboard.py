"""Streamlit-free logic behind the dashboard (``app.py``): configuration, caching, view data.

``app.py`` is a thin shell (widgets -> this module -> :mod:`bnviz.figures`). Everything that
can be tested without a browser lives here, as pure functions and frozen dataclasses:

* :class:`DashConfig` is the *whole* configuration of one view. It round-trips through URL
  query parameters (:func:`config_to_query` / :func:`config_from_query`) so that a link
  reproduces the exact view -- an instructor sends one link to a class.
* :meth:`DashConfig.compute_key` is the part of the configuration that needs a forward
  pass. Selecting another layer, channel or element does not change it, so those
  interactions only read the cache and never rerun the network.
* :func:`compute_view_data` calls :func:`bnviz.inspect` exactly **once** per configuration
  and immediately condenses the report into a compact :class:`ViewData`: per-channel
  statistics vectors, feature maps subsampled to at most :data:`MAX_GRID` x :data:`MAX_GRID`
  for image 0, fixed-bin histograms, a fixed random sample of elements for scatter plots and
  a few exactly stored elements for the written-out formula. The full activation tensors
  (hundreds of MB for a batch of 8) are dropped right after, so a cached configuration costs
  tens of MB at most and nothing the size of an activation is ever sent to a browser.
* The per-layer override table (``st.data_editor``) is converted to the ``modes`` dict that
  :func:`bnviz.inspect` takes by :func:`overrides_to_modes`, with a :class:`~bnviz.errors.
  ModeError` naming the layer when a row does not make sense.

Numbers in :class:`ViewData` are PyTorch's own (copied from the report, never recomputed)
except the manual-formula values of the scatter sample, which are the literal formula
evaluated on the stored inputs -- the same thing :meth:`LayerReport.manual_output` computes.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import importlib
import io
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from .devices import DEVICE_CHOICES
from .errors import BnvizError, ModeError, StimulusError
from .inspection import InspectionReport, LayerReport, UsedStatistics
from .models import DEFAULT_MODEL, list_models
from .modes import TRACK_CHOICES, parse_mode
from .prefetch import Cancelled, JobSignal, Prefetcher, lower_thread_priority

# The submodule itself, without importing the package first (see bnviz/manual_bn.py's
# import of probe_kernel: ``from . import x`` can deadlock concurrent first imports).
stimuli = importlib.import_module(f"{__package__}.stimuli")

__all__ = [
    "DashConfig",
    "LayerView",
    "RowOverride",
    "ViewData",
    "build_view_data",
    "compute_view_data",
    "config_from_query",
    "config_to_query",
    "frame_to_overrides",
    "overrides_frame",
    "overrides_to_modes",
]

# -- sizes of what is kept per configuration ------------------------------------------------

#: Feature maps are kept for image 0 on a grid of at most MAX_GRID x MAX_GRID *actual*
#: elements (every s-th row and column, not pooled), so every heatmap pixel is a real value.
MAX_GRID = 16
#: ... and at most about this many values per layer and kind, so that wide layers (DenseNet
#: concatenates up to 1024 channels) do not dominate the memory of a cached configuration.
MAP_BUDGET = 160_000
#: Fixed number of bins of the per-channel histograms, and how many (image, position) pairs
#: per layer they count (the same positions in every channel; all of them when fewer).
HIST_BINS = 24
HIST_SAMPLE = 512
#: Elements per layer in the manual-vs-native scatter sample (fixed seed: reproducible).
#: 1000 points draw in ~40 ms as SVG in a browser without a GPU (3000: ~140 ms); the
#: per-channel maximum difference next to the scatter covers *every* element anyway.
SAMPLE_POINTS = 1000
SAMPLE_SEED = 0
#: Cap on the raw-stimulus preview thumbnails.
PREVIEW_IMAGES = 8
PREVIEW_GRID = 56

MODE_CHOICES = ("train", "eval")
ROW_MODES = ("default", "train", "eval")  # "default": the global mode applies to the row
ROW_TRACKS = ("keep", *TRACK_CHOICES)
UPLOAD_KIND = "upload"
STIMULUS_CHOICES = ("image", "uniform", "noise", "grating", "checkerboard", UPLOAD_KIND)

#: The layer view's charts, one shown at a time (picked like tabs; ``tab`` in a link). Only
#: the picked one is built and sent, so a layer or channel switch redraws one or two charts
#: instead of eight.
LAYER_TABS = (
    "Batch vs running statistics",
    "Feature maps",
    "Distributions",
    "Running-stat update",
    "Manual vs native",
)

#: Elements stored exactly for the formula, per channel, in this order.
FORMULA_ELEMENTS = (
    "centre of image 0",
    "top-left of image 0",
    "largest input in image 0",
    "smallest input in image 0",
    "centre of the last image",
)

# -- stimulus controls ----------------------------------------------------------------------


@dataclass(frozen=True)
class ParamWidget:
    """How the dashboard offers one stimulus parameter (the core validates it again)."""

    name: str
    label: str
    kind: str  # "float" | "int" | "choice"
    default: Any
    lo: float | None = None
    hi: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""


STIMULUS_WIDGETS: dict[str, tuple[ParamWidget, ...]] = {
    "image": (
        ParamWidget("name", "photo", "choice", stimuli.DEFAULT_PARAMS["image"]["name"],
                    choices=stimuli.PHOTOS, help="scikit-image's bundled photographs"),
    ),
    "uniform": (
        ParamWidget("value", "pixel value", "float", 1.0, 0.0, 1.0, 0.05,
                    help="every pixel of every channel; 1.0 is 'an image of all ones'"),
    ),
    "noise": (
        ParamWidget("mean", "mean", "float", 0.5, 0.0, 1.0, 0.05),
        ParamWidget("std", "std", "float", 0.25, 0.0, 1.0, 0.05),
    ),
    "grating": (
        ParamWidget("orientation", "orientation (degrees)", "float", 0.0, 0.0, 180.0, 5.0),
        ParamWidget("frequency", "frequency (cycles per image)", "float", 8.0, 0.0, None, 1.0,
                    help="at most half the image size"),
        ParamWidget("phase", "phase (degrees)", "float", 0.0, 0.0, 360.0, 5.0),
        ParamWidget("contrast", "contrast", "float", 1.0, 0.0, 1.0, 0.05),
    ),
    "checkerboard": (
        ParamWidget("squares", "squares per side", "int", 8, 1, None, 1,
                    help="at most the image size"),
        ParamWidget("contrast", "contrast", "float", 1.0, 0.0, 1.0, 0.05),
    ),
    UPLOAD_KIND: (),
}


def default_params(kind: str) -> dict[str, Any]:
    return {w.name: w.default for w in STIMULUS_WIDGETS.get(kind, ())}


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class RowOverride:
    """One row of the per-layer override table; the defaults mean "no override"."""

    mode: str = "default"  # default | train | eval
    track: str = "keep"  # keep | on | off | none
    momentum: str = ""  # "" keep | "none" cumulative | a number in [0, 1]

    @property
    def is_default(self) -> bool:
        return self.mode == "default" and self.track == "keep" and self.momentum == ""


@dataclass(frozen=True)
class DashConfig:
    """Everything that defines one dashboard view; hashable, so usable as a cache key."""

    model: str = DEFAULT_MODEL
    random_init: bool = False
    device: str = "auto"
    stimulus: str = "image"
    params: tuple[tuple[str, Any], ...] = (("name", "chelsea"),)
    upload: str = ""  # sha256 of an uploaded image (kind "upload"); never in the URL
    size: int = 224
    batch_size: int = 4  # four different photos: a real batch, and a first view in seconds
    composition: str = "different"
    seed: int = 0
    mode: str = "train"
    overrides: tuple[tuple[str, RowOverride], ...] = ()
    # selection: changes what is shown, never what is computed
    layer: str = ""
    channel: int = 0
    element: int = 0
    tab: int = 0

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def override_dict(self) -> dict[str, RowOverride]:
        return dict(self.overrides)

    @property
    def weights(self) -> str:
        return "random" if self.random_init else "pretrained"

    def compute_key(self) -> tuple:
        """The fields that need a forward pass: layer/channel/element are left out."""
        return (self.model, self.random_init, self.device, self.stimulus, self.params,
                self.upload, self.size, self.batch_size, self.composition, self.seed,
                self.mode, self.overrides)

    def eval_key(self) -> tuple:
        """The fields the all-eval reference run depends on (no modes, no overrides)."""
        return (self.model, self.random_init, self.device, self.stimulus, self.params,
                self.upload, self.size, self.batch_size, self.composition, self.seed)


def make_params(kind: str, params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Parameters of ``kind`` in a canonical, hashable form (defaults filled in)."""
    full = default_params(kind)
    full.update({k: v for k, v in params.items() if k in full})
    return tuple(sorted(full.items()))


# -- query parameters -----------------------------------------------------------------------

_QUERY_KEYS = ("model", "weights", "device", "stim", "size", "batch", "comp", "seed", "mode",
               "ov", "layer", "ch", "el", "tab")


def _fmt_number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}" if math.isfinite(v) else str(v)
    return str(v)


def stimulus_spec(kind: str, params: Mapping[str, Any]) -> str:
    """``kind:name=value,...`` as the CLI's ``--stimulus`` writes it."""
    if kind == UPLOAD_KIND:
        return UPLOAD_KIND
    if not params:
        return kind
    return kind + ":" + ",".join(f"{k}={_fmt_number(v)}" for k, v in sorted(params.items()))


def format_overrides(overrides: Mapping[str, RowOverride]) -> str:
    """``_bn0:train,track=off;_blocks.0._bn1:eval`` (only rows that override something)."""
    items = []
    for name, row in overrides.items():
        if row.is_default:
            continue
        parts = [row.mode]
        if row.track != "keep":
            parts.append(f"track={row.track}")
        if row.momentum != "":
            parts.append(f"momentum={row.momentum}")
        items.append(f"{name}:{','.join(parts)}")
    return ";".join(items)


def parse_overrides(text: str) -> dict[str, RowOverride]:
    """Inverse of :func:`format_overrides`; raises :class:`ModeError` if malformed."""
    out: dict[str, RowOverride] = {}
    for item in (p.strip() for p in text.split(";")):
        if not item:
            continue
        name, sep, rest = item.rpartition(":")
        if not sep or not name:
            raise ModeError(
                f"Cannot read the per-layer override {item!r}.",
                "write LAYER:MODE[,track=on|off|none][,momentum=X], e.g. _bn0:train,track=off; "
                "separate layers with ';'.",
            )
        parts = [p.strip().lower() for p in rest.split(",")]
        mode, track, momentum = parts[0], "keep", ""
        if mode not in ROW_MODES:
            raise ModeError(f"Unknown mode {mode!r} for layer {name!r} in the link.",
                            f"use one of: {', '.join(ROW_MODES)}.")
        for opt in parts[1:]:
            key, _, value = opt.partition("=")
            if key == "track" and value in ROW_TRACKS:
                track = value
            elif key == "momentum" and value:
                momentum = value
            else:
                raise ModeError(f"Unknown option {opt!r} for layer {name!r} in the link.",
                                "use track=on|off|none or momentum=<0..1>|none.")
        row = RowOverride(mode, track, momentum)
        check_row(name, row, "train")
        out[name] = row
    return out


def config_to_query(cfg: DashConfig) -> dict[str, str]:
    """The query parameters that reproduce ``cfg`` (an upload cannot travel in a link)."""
    q = {
        "model": cfg.model,
        "weights": cfg.weights,
        "device": cfg.device,
        "stim": stimulus_spec(cfg.stimulus, cfg.param_dict),
        "size": str(cfg.size),
        "batch": str(cfg.batch_size),
        "comp": cfg.composition,
        "seed": str(cfg.seed),
        "mode": cfg.mode,
    }
    ov = format_overrides(cfg.override_dict)
    if ov:
        q["ov"] = ov
    if cfg.layer:
        q["layer"] = cfg.layer
    q["ch"] = str(cfg.channel)
    if cfg.element:
        q["el"] = str(cfg.element)
    if cfg.tab:
        q["tab"] = str(cfg.tab)
    return q


def _first(value: Any) -> str:
    if isinstance(value, list | tuple):
        return str(value[-1]) if value else ""
    return str(value)


def _int_in(text: str, lo: int, hi: int) -> int:
    n = int(text)
    if not lo <= n <= hi:
        raise ValueError(f"must be between {lo} and {hi}")
    return n


def config_from_query(query: Mapping[str, Any],
                      base: DashConfig | None = None) -> tuple[DashConfig, list[str]]:
    """Read a configuration from query parameters; bad values keep ``base``'s and are listed.

    Returns ``(config, problems)``: each problem is a sentence naming the parameter, the
    value and what was used instead, for the dashboard to show as a warning. Unknown keys
    are ignored (other pages may add their own).
    """
    cfg = base or DashConfig()
    problems: list[str] = []
    changes: dict[str, Any] = {}
    q = {k: _first(v) for k, v in query.items() if k in _QUERY_KEYS}

    def bad(key: str, why: str, kept: Any) -> None:
        problems.append(f"Ignored link parameter {key}={q[key]!r} ({why}); using {kept!r}.")

    if "model" in q:
        name = q["model"].strip().lower().replace("-", "_")
        if name in list_models():
            changes["model"] = name
        else:
            bad("model", f"not one of {', '.join(list_models())}", cfg.model)
    if "weights" in q:
        if q["weights"] in ("random", "pretrained"):
            changes["random_init"] = q["weights"] == "random"
        else:
            bad("weights", "use pretrained or random", cfg.weights)
    if "device" in q:
        if q["device"] in DEVICE_CHOICES:
            changes["device"] = q["device"]
        else:
            bad("device", f"use one of {', '.join(DEVICE_CHOICES)}", cfg.device)
    if "stim" in q:
        text = q["stim"].strip()
        if text == UPLOAD_KIND:
            changes["stimulus"], changes["params"] = UPLOAD_KIND, ()
        else:
            try:
                kind, params = stimuli.parse_stimulus_spec(text)
                if kind not in STIMULUS_WIDGETS:
                    raise StimulusError(f"kind {kind!r} is not offered by the dashboard",
                                        "upload the file instead")
                params.pop("seed", None)
                changes["stimulus"], changes["params"] = kind, make_params(kind, params)
            except BnvizError as exc:
                bad("stim", exc.problem.rstrip("."),
                    stimulus_spec(cfg.stimulus, cfg.param_dict))
    for key, attr, lo, hi in (("size", "size", stimuli.MIN_SIZE, stimuli.MAX_SIZE),
                              ("batch", "batch_size", 1, stimuli.MAX_BATCH_SIZE),
                              ("seed", "seed", 0, 2**31 - 1),
                              ("ch", "channel", 0, 1 << 20),
                              ("el", "element", 0, len(FORMULA_ELEMENTS) - 1),
                              ("tab", "tab", 0, len(LAYER_TABS) - 1)):
        if key in q:
            try:
                changes[attr] = _int_in(q[key], lo, hi)
            except ValueError:
                bad(key, f"expected a whole number from {lo} to {hi}", getattr(cfg, attr))
    if "comp" in q:
        if q["comp"] in stimuli.COMPOSITIONS:
            changes["composition"] = q["comp"]
        else:
            bad("comp", f"use one of {', '.join(stimuli.COMPOSITIONS)}", cfg.composition)
    if "mode" in q:
        if q["mode"] in MODE_CHOICES:
            changes["mode"] = q["mode"]
        else:
            bad("mode", "use train or eval", cfg.mode)
    if "ov" in q:
        try:
            changes["overrides"] = tuple(sorted(parse_overrides(q["ov"]).items()))
        except BnvizError as exc:
            bad("ov", str(exc), "no overrides")
    if "layer" in q:
        changes["layer"] = q["layer"].strip()
    return replace(cfg, **changes), problems


# -- per-layer overrides --------------------------------------------------------------------

OVERRIDE_COLUMNS = ("layer", "mode", "track_running_stats", "momentum")


def check_row(name: str, row: RowOverride, global_mode: str) -> str:
    """The mode string for one override row; :class:`ModeError` naming the layer if bad."""
    if row.mode not in ROW_MODES:
        raise ModeError(f"Layer {name!r}: unknown mode {row.mode!r}.",
                        f"pick one of {', '.join(ROW_MODES)} in the override table.")
    if row.track not in ROW_TRACKS:
        raise ModeError(f"Layer {name!r}: unknown track_running_stats {row.track!r}.",
                        f"pick one of {', '.join(ROW_TRACKS)} in the override table.")
    parts = [global_mode if row.mode == "default" else row.mode]
    if row.track != "keep":
        parts.append(f"track={row.track}")
    momentum = row.momentum.strip().lower()
    if momentum:
        parts.append(f"momentum={momentum}")
    text = ",".join(parts)
    try:
        parse_mode(text)
    except ModeError as exc:
        raise ModeError(
            f"Layer {name!r}: momentum {row.momentum!r} is not valid.",
            "leave momentum blank to keep the layer's own, write a number between 0 and 1, "
            "or 'none' for a cumulative average.",
        ) from exc
    return text


def overrides_to_modes(global_mode: str, overrides: Mapping[str, RowOverride],
                       layer_names: Sequence[str]) -> dict[str, str]:
    """``{layer: mode string}`` for :func:`bnviz.inspect`: the global mode for every layer,
    replaced by a row's override where it has one. Unknown layer names raise ModeError."""
    if global_mode not in MODE_CHOICES:
        raise ModeError(f"Unknown global mode {global_mode!r}.", "use train or eval.")
    known = set(layer_names)
    unknown = [n for n in overrides if n not in known]
    if unknown:
        raise ModeError(
            f"The overrides name layers this model does not have: {', '.join(unknown)}.",
            "press 'reset all' or pick the model these overrides were made for.",
        )
    modes = {}
    for name in layer_names:
        row = overrides.get(name)
        modes[name] = global_mode if row is None else check_row(name, row, global_mode)
    return modes


def overrides_frame(layer_names: Sequence[str], overrides: Mapping[str, RowOverride]):
    """The table the data editor shows: one row per BN layer, defaults where not overridden."""
    rows = []
    for name in layer_names:
        row = overrides.get(name, RowOverride())
        rows.append({"layer": name, "mode": row.mode, "track_running_stats": row.track,
                     "momentum": row.momentum})
    return pd.DataFrame(rows, columns=list(OVERRIDE_COLUMNS))


def _cell(value: Any, default: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value).strip()


def frame_to_overrides(frame) -> dict[str, RowOverride]:
    """Rows of the edited table that differ from the defaults, as ``{layer: RowOverride}``."""
    return records_to_overrides(frame.to_dict("records"))


def records_to_overrides(records: Iterable[Mapping[str, Any]]) -> dict[str, RowOverride]:
    """:func:`frame_to_overrides` for table rows as dicts (``layer``, ``mode``,
    ``track_running_stats``, ``momentum``); blank cells mean the defaults."""
    out: dict[str, RowOverride] = {}
    for rec in records:
        row = RowOverride(
            mode=_cell(rec.get("mode"), "default") or "default",
            track=_cell(rec.get("track_running_stats"), "keep") or "keep",
            momentum=_cell(rec.get("momentum"), ""),
        )
        if not row.is_default:
            out[str(rec["layer"])] = row
    return out


def apply_editor_state(base: Mapping[str, RowOverride], layer_names: Sequence[str],
                       state: Mapping[str, Any] | None) -> dict[str, RowOverride]:
    """Fold an ``st.data_editor`` state (``{"edited_rows": {row: {col: value}}}``) into
    ``base``: what the table shows after those edits, as overrides.

    Plain dicts, no pandas: the app calls this on every run, also while the table is not
    drawn (its expander closed). Rows outside the table are ignored."""
    records = []
    for name in layer_names:
        row = base.get(name, RowOverride())
        records.append({"layer": name, "mode": row.mode, "track_running_stats": row.track,
                        "momentum": row.momentum})
    for row, edits in ((state or {}).get("edited_rows") or {}).items():
        if 0 <= int(row) < len(records):
            for col, value in edits.items():
                if col in OVERRIDE_COLUMNS[1:]:
                    records[int(row)][col] = value
    return records_to_overrides(records)


# -- uploads --------------------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def store_upload(data: bytes, name: str) -> tuple[str, str]:
    """Keep an uploaded file on disk for :func:`bnviz.make_stimulus` ``("file", path=...)``.

    Returns ``(sha256, path)``. The file keeps its (sanitised) original name inside a folder
    named by its hash, so error messages name the file the student uploaded.
    """
    if len(data) > stimuli.MAX_IMAGE_BYTES:
        raise StimulusError(
            f"The uploaded file {name!r} is {len(data) / 2**20:.1f} MB, more than the "
            f"{stimuli.MAX_IMAGE_BYTES // 2**20} MB bnviz accepts.",
            "upload a smaller image (a few hundred pixels is plenty at 224x224).",
        )
    digest = hashlib.sha256(data).hexdigest()
    folder = os.path.join(tempfile.gettempdir(), "bnviz-uploads", digest[:32])
    os.makedirs(folder, exist_ok=True)
    safe = _SAFE_NAME.sub("_", os.path.basename(name or "upload")) or "upload"
    path = os.path.join(folder, safe)
    if not os.path.exists(path):
        tmp = path + f".{os.getpid()}.{threading.get_ident()}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    return digest, path


def make_batch(cfg: DashConfig, upload_path: str | None = None) -> torch.Tensor:
    """The raw input batch of ``cfg`` (``bnviz.make_stimulus``); StimulusError if bad."""
    if cfg.stimulus == UPLOAD_KIND:
        if not upload_path:
            raise StimulusError("No image uploaded yet.",
                                "upload a PNG or JPEG in the sidebar, or pick another stimulus.")
        return stimuli.make_stimulus("file", cfg.size, cfg.batch_size,
                                     composition=cfg.composition, seed=cfg.seed,
                                     path=upload_path)
    return stimuli.make_stimulus(cfg.stimulus, cfg.size, cfg.batch_size,
                                 composition=cfg.composition, seed=cfg.seed, **cfg.param_dict)


def describe_config_stimulus(cfg: DashConfig, upload_name: str = "") -> str:
    if cfg.stimulus == UPLOAD_KIND:
        return f"uploaded image ({upload_name or 'none yet'})"
    return stimuli.describe_stimulus(cfg.stimulus, **cfg.param_dict)


# -- view data ------------------------------------------------------------------------------


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    if t is None:
        return None
    a = t.detach().cpu().numpy().copy()
    a.flags.writeable = False  # shared by sessions through the cache: read-only
    return a


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) viewed as (N, C, H, W): 2-D inputs get H=W=1, 3-D inputs H=1,
    volumes fold depth into H. BatchNorm statistics do not depend on this layout."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    if t.dim() == 3:
        return t.reshape(t.shape[0], t.shape[1], 1, t.shape[2])
    return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])


def grid_indices(length: int, max_points: int = MAX_GRID) -> np.ndarray:
    """Every s-th index of ``range(length)`` with s chosen so at most ``max_points`` remain."""
    step = max(1, math.ceil(length / max_points))
    return np.arange(0, length, step, dtype=np.int64)


def map_side(channels: int, budget: int = MAP_BUDGET, max_side: int = MAX_GRID) -> int:
    """Grid side for a layer's maps: MAX_GRID, smaller when channels x side^2 > budget."""
    return int(max(4, min(max_side, math.isqrt(max(budget // max(channels, 1), 1)))))


def subsample_map(t: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``t[..., rows, :][..., cols]`` as a read-only float32 array (actual values, no pooling)."""
    r = torch.tensor(rows, dtype=torch.int64)
    c = torch.tensor(cols, dtype=torch.int64)
    sub = t.index_select(-2, r).index_select(-1, c)
    return _frozen(sub.detach().to(torch.float32).cpu().numpy())


def histogram_positions(n: int, length: int, k: int = HIST_SAMPLE,
                        seed: int = SAMPLE_SEED) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``k`` fixed random (image, position) pairs shared by all channels of a layer, or
    None when the layer has at most ``k`` values per channel (then all are used).

    Remembered per shape: many layers share one, and drawing the permutation costs ~1 ms
    per layer at batch 8 (the returned tensors are shared, so never written to).
    """
    return _histogram_positions(n, length, k, seed)


@functools.lru_cache(maxsize=256)
def _histogram_positions(n: int, length: int, k: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    total = n * length
    if total <= k:
        return None
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randperm(total, generator=gen)[:k].sort().values
    return pos // length, pos % length


def channel_histograms(x4: torch.Tensor, bins: int = HIST_BINS,
                       positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel histograms of a (N, C, H, W) tensor over common fixed bins.

    ``positions`` (from :func:`histogram_positions`) restricts the count to the same
    sampled (image, pixel) positions in every channel; without it every value counts. The
    edges span the sampled values' min..max so channels share one axis. Returns ``(edges
    (bins+1,), counts (C, bins))``. One bucketize pass and one bincount, no loop over
    channels (a 1280-channel layer would otherwise cost 1280 kernel launches).
    """
    n, c = x4.shape[:2]
    x3 = x4.detach().reshape(n, c, -1)
    if positions is None:  # every value: no copy, channels stay on dim 1
        vals, offsets_shape = x3, (1, c, 1)
    else:
        vals, offsets_shape = x3[positions[0], :, positions[1]], (1, c)  # (k, C)
    vals = vals.to(torch.float32)
    lo, hi = (float(v) for v in torch.aminmax(vals))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # inf/nan (a diverged layer)
        finite = vals[torch.isfinite(vals)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        vals = vals.nan_to_num(nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    scale = bins / (hi - lo)
    # clamp to [0, bins - 0.5] then truncate: floor for these non-negative values
    idx = (vals - lo).mul_(scale).clamp_(0, bins - 0.5).to(torch.int32)
    idx += (torch.arange(c, dtype=torch.int32) * bins).view(offsets_shape)
    counts = torch.bincount(idx.reshape(-1), minlength=c * bins).view(c, bins)
    # with sampled positions a channel has at most HIST_SAMPLE values: 16 bits suffice
    small = counts.numel() == 0 or int(counts.max()) <= torch.iinfo(torch.int16).max
    dtype = torch.int16 if small else torch.int32
    return _frozen(edges), _frozen(counts.to(dtype).numpy())


def sample_indices(shape: Sequence[int], k: int = SAMPLE_POINTS,
                   seed: int = SAMPLE_SEED) -> np.ndarray:
    """``min(k, numel)`` distinct element indices (rows of (n, c, h, w)), fixed seed.

    Remembered per shape (read-only array): layers and configurations share shapes.
    """
    return _sample_indices(tuple(int(d) for d in shape), k, seed)


@functools.lru_cache(maxsize=256)
def _sample_indices(shape: tuple[int, ...], k: int, seed: int) -> np.ndarray:
    numel = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(numel, size=min(k, numel), replace=False))
    idx = np.stack(np.unravel_index(flat, shape), axis=1).astype(_index_dtype(shape))
    return _frozen(idx)


def _index_dtype(shape: Sequence[int]) -> type:
    """The smallest integer type holding every index of ``shape`` (int16 in practice)."""
    return np.int16 if max(shape) <= np.iinfo(np.int16).max else np.int32


def literal_bn(x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float,
               weight: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` elementwise in float32 (the formula
    exactly as :func:`bnviz.manual_bn.manual_batch_norm` writes it, on gathered values)."""
    def t(a) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    y = (t(x) - t(mean)) / torch.sqrt(t(var) + eps)
    if weight is not None:
        y = y * t(weight)
    if bias is not None:
        y = y + t(bias)
    return y.numpy()


@dataclass(frozen=True)
class CondensedTensors:
    """The activation-sized part of a :class:`LayerView`: what is read from the kept
    tensors (maps, histograms, samples, formula elements). Made apart from the statistics so
    it can be computed on another core while the forward is still running."""

    # image-0 feature maps on a grid: (C, len(rows), len(cols)); actual values
    rows: np.ndarray
    cols: np.ndarray
    map_input: np.ndarray
    map_output: np.ndarray
    map_activation: np.ndarray | None
    map_reference: np.ndarray | None  # what a reference-keeping hook saw (if overwritten)
    # per-channel histograms over hist_count sampled (image, position) pairs of all images:
    # edges (B+1,), counts (C, B)
    hist_count: int
    hist_input: tuple[np.ndarray, np.ndarray]
    hist_output: tuple[np.ndarray, np.ndarray]
    hist_activation: tuple[np.ndarray, np.ndarray] | None
    # scatter sample: indices (S, 4) and values (S,)
    sample_index: np.ndarray
    sample_input: np.ndarray
    sample_native: np.ndarray
    sample_activation: np.ndarray | None
    # exactly stored elements for the formula: (C, E, 4) indices, (C, E) values
    element_index: np.ndarray
    element_input: np.ndarray
    element_native: np.ndarray
    element_activation: np.ndarray | None
    overwritten_fraction: float  # of the BN output, as a reference-keeping hook sees it


@dataclass(frozen=True)
class LayerView(CondensedTensors, UsedStatistics):
    """What the dashboard shows of one BN layer: numbers from the report, no activations
    (the statistics here, what was read from its tensors in :class:`CondensedTensors`)."""

    name: str
    type: str
    index: int
    call: int  # which call of a module called more than once (LayerReport.call)
    calls: int
    num_features: int
    input_shape: tuple[int, ...]
    mode: str
    mode_source: str
    training: bool
    track_running_stats: bool
    has_running_stats: bool
    momentum: float | None
    eps: float
    affine: bool
    stats_used: str
    updates_running_stats: bool
    count: int
    update_factor: float | None
    num_batches_tracked_before: int | None
    num_batches_tracked_after: int | None
    max_abs_diff: float
    max_rel_diff: float
    running_update_max_abs_diff: float | None
    activation: str | None
    activation_inplace: bool | None
    overwritten_by: str | None
    # per-channel vectors (C,)
    batch_mean: np.ndarray
    batch_var: np.ndarray
    batch_var_unbiased: np.ndarray | None
    running_mean_before: np.ndarray | None
    running_var_before: np.ndarray | None
    running_mean_after: np.ndarray | None
    running_var_after: np.ndarray | None
    manual_running_mean_after: np.ndarray | None
    manual_running_var_after: np.ndarray | None
    weight: np.ndarray | None
    bias: np.ndarray | None
    channel_max_abs_diff: np.ndarray
    mean_shift: np.ndarray | None
    log_var_ratio: np.ndarray | None
    # the scatter sample through the literal formula, with the statistics BN used
    sample_manual: np.ndarray

    label = LayerReport.label

    @property
    def spatial(self) -> tuple[int, int]:
        shape = self.input_shape
        if len(shape) == 4:
            return shape[2], shape[3]
        if len(shape) == 2:
            return 1, 1
        if len(shape) == 3:
            return 1, shape[2]
        return int(np.prod(shape[2:-1])), shape[-1]

    def element(self, channel: int, which: int) -> dict:
        """The formula for stored element ``which`` of ``channel`` with its actual numbers
        (:func:`bnviz.manual_bn.explain_element`, as :meth:`LayerReport.explain` does)."""
        from .manual_bn import explain_element

        c = int(channel)
        out = explain_element(
            float(self.element_input[c, which]),
            mean=float(self.used_mean[c]),
            var=float(self.used_var[c]),
            eps=self.eps,
            weight=None if self.weight is None else float(self.weight[c]),
            bias=None if self.bias is None else float(self.bias[c]),
            native=float(self.element_native[c, which]),
            stats=self.stats_used,
        )
        out["index"] = tuple(int(v) for v in self.element_index[c, which])
        out["label"] = FORMULA_ELEMENTS[which]
        out["activation"] = self.activation
        out["after_activation"] = (None if self.element_activation is None
                                   else float(self.element_activation[c, which]))
        return out


@dataclass(frozen=True)
class ViewData:
    """One configuration's condensed inspection: everything the views draw, picklable."""

    model: str
    weights: str
    random_init: bool
    device: str
    input_shape: tuple[int, ...]
    preprocessing: str | None
    notes: dict[str, Any]
    forward_ms: float
    build_ms: float
    layers: tuple[LayerView, ...]
    predictions: tuple[tuple[tuple[int, str, float], ...], ...] | None
    #: ``report.overview_rows()``: one plain dict per layer, read-only (shared by sessions)
    overview_rows: tuple[dict[str, Any], ...]
    stats_report: InspectionReport  # the report without activation tensors (for JSON export)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        """Every layer's label (``name#k`` for the calls of a module called twice or more)."""
        return [layer.label for layer in self.layers]

    # The per-layer table as pandas objects is made on first use, not with the view: the
    # charts need only the rows; only the opened table and the CSV need a DataFrame. Two
    # sessions racing here build equal values; either is kept.
    @functools.cached_property
    def overview(self):
        """The per-layer table, equal to ``report.to_frame()`` (shared: do not modify)."""
        return pd.DataFrame(list(self.overview_rows))

    @functools.cached_property
    def table_csv(self) -> str:
        """The per-layer table as CSV (the dashboard's export)."""
        return self.overview.to_csv(index=False)

    def overview_frame(self):
        """A private copy of the per-layer table (the cached one is shared by sessions)."""
        return self.overview.copy()

    def layer(self, name: str) -> LayerView:
        """The layer labelled ``name``; a module's plain name gives its first call (as
        :meth:`InspectionReport.layer` does)."""
        for layer in self.layers:
            if layer.label == name:
                return layer
        for layer in self.layers:
            if layer.name == name and layer.call == 1:
                return layer
        from .modes import unknown_layer_error

        raise unknown_layer_error(name, self.layer_names)

    def report_json(self) -> str:
        """The full report in the CLI's schema: ``report.to_json()``, serialised on demand
        (half a second for 49 layers, so only when someone downloads it)."""
        return self.stats_report.to_json()

    @property
    def weights_label(self) -> str:
        """The label every chart carries when the network is not pretrained."""
        return "random init (not pretrained)" if self.random_init else ""

    def nbytes(self) -> int:
        """Approximate memory of the arrays held (for the benchmark's memory report)."""
        total = len(repr(self.overview_rows))
        seen: set[int] = set()
        for layer in self.layers:
            for f in fields(layer):
                v = getattr(layer, f.name)
                arrays = [v] if isinstance(v, np.ndarray) else (
                    list(v) if isinstance(v, tuple) and v and isinstance(v[0], np.ndarray)
                    else [])
                for a in arrays:
                    if id(a) not in seen:  # shared arrays count once
                        seen.add(id(a))
                        total += a.nbytes
        return total


def _formula_elements(x4: torch.Tensor) -> np.ndarray:
    """(C, E, 4) indices of the elements in :data:`FORMULA_ELEMENTS`, per channel."""
    n, c, h, w = x4.shape
    flat0 = x4[0].reshape(c, -1)
    amax = flat0.argmax(dim=1).numpy()
    amin = flat0.argmin(dim=1).numpy()
    idx = np.zeros((c, len(FORMULA_ELEMENTS), 4), dtype=_index_dtype(x4.shape))
    ch = np.arange(c)
    idx[:, :, 1] = ch[:, None]
    idx[:, 0, 2:] = (h // 2, w // 2)
    idx[:, 1, 2:] = (0, 0)
    idx[:, 2, 2], idx[:, 2, 3] = amax // w, amax % w
    idx[:, 3, 2], idx[:, 3, 3] = amin // w, amin % w
    idx[:, 4, 0] = n - 1
    idx[:, 4, 2:] = (h // 2, w // 2)
    return idx


class _Picker:
    """The sampled points and the formula's elements of a layer, read from each tensor
    (input, output, activation) with one indexing op instead of one per array."""

    def __init__(self, sidx: np.ndarray, eidx: np.ndarray) -> None:
        flat = np.concatenate([sidx.astype(np.int64), eidx.reshape(-1, 4).astype(np.int64)])
        self._index = tuple(torch.from_numpy(np.ascontiguousarray(flat[:, i]))
                            for i in range(4))
        self._split = len(sidx)
        self._eshape = eidx.shape[:-1]

    def __call__(self, x4: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        vals = x4[self._index].detach().to(torch.float32).numpy()
        return (_frozen(vals[:self._split]),
                _frozen(vals[self._split:].reshape(self._eshape)))


def condense_tensors(input: torch.Tensor, output: torch.Tensor,
                     activation_output: torch.Tensor | None,
                     output_reference: torch.Tensor | None,
                     overwritten_by: str | None) -> CondensedTensors:
    """Read one layer's kept tensors into small arrays (the tensors are read, not kept)."""
    x4 = as_4d(input)
    y4 = as_4d(output)
    a4 = None if activation_output is None else as_4d(activation_output)
    overwritten = overwritten_by is not None and output_reference is not None
    ref4 = as_4d(output_reference) if overwritten else None
    n, channels, h, w = x4.shape
    side = map_side(channels)
    rows, cols = grid_indices(h, side), grid_indices(w, side)
    pos = histogram_positions(n, h * w)
    sidx = sample_indices(tuple(x4.shape))
    eidx = _formula_elements(x4)
    pick = _Picker(sidx, eidx)
    s_in, e_in = pick(x4)
    s_nat, e_nat = pick(y4)
    s_act, e_act = (None, None) if a4 is None else pick(a4)
    map_act = None if a4 is None else subsample_map(a4[0], rows, cols)
    map_ref = None if ref4 is None else subsample_map(ref4[0], rows, cols)
    if map_ref is not None and map_act is not None and np.array_equal(map_ref, map_act):
        map_ref = map_act  # an in-place activation: what the hook sees *is* its output
    fraction = float((output != output_reference).float().mean()) if overwritten else 0.0
    return CondensedTensors(
        rows=_frozen(rows), cols=_frozen(cols),
        map_input=subsample_map(x4[0], rows, cols),
        map_output=subsample_map(y4[0], rows, cols),
        map_activation=map_act, map_reference=map_ref,
        hist_count=n * h * w if pos is None else len(pos[0]),
        hist_input=channel_histograms(x4, positions=pos),
        hist_output=channel_histograms(y4, positions=pos),
        hist_activation=None if a4 is None else channel_histograms(a4, positions=pos),
        sample_index=sidx, sample_input=s_in, sample_native=s_nat, sample_activation=s_act,
        element_index=_frozen(eidx), element_input=e_in, element_native=e_nat,
        element_activation=e_act, overwritten_fraction=fraction,
    )


def condense_layer_tensors(layer: LayerReport) -> CondensedTensors:
    """:func:`condense_tensors` of a kept :class:`LayerReport`."""
    if layer.input is None or layer.output is None:
        raise BnvizError(f"Layer {layer.name!r} was inspected without keeping tensors.",
                         "call inspect(..., keep_tensors=True) before building view data.")
    return condense_tensors(layer.input, layer.output, layer.activation_output,
                            layer.output_reference, layer.overwritten_by)


def layer_view(layer: LayerReport, condensed: CondensedTensors | None = None) -> LayerView:
    """Condense one kept :class:`LayerReport` (its tensors are read, not kept).

    ``condensed``: its tensors already condensed (during the forward); read them otherwise.
    """
    c = condense_layer_tensors(layer) if condensed is None else condensed
    ch = c.sample_index[:, 1]
    used_mean = layer.used_mean.numpy()
    used_var = layer.used_var.numpy()
    weight = None if layer.weight is None else layer.weight.numpy()
    bias = None if layer.bias is None else layer.bias.numpy()
    s_man = literal_bn(c.sample_input, used_mean[ch], used_var[ch], layer.eps,
                       None if weight is None else weight[ch],
                       None if bias is None else bias[ch])
    shift = layer.mean_shift()
    ratio = layer.log_var_ratio()
    return LayerView(
        name=layer.name, type=layer.type, index=layer.index, call=layer.call, calls=layer.calls,
        num_features=layer.num_features,
        input_shape=tuple(layer.input_shape), mode=layer.mode, mode_source=layer.mode_source,
        training=layer.training, track_running_stats=layer.track_running_stats,
        has_running_stats=layer.has_running_stats, momentum=layer.momentum, eps=layer.eps,
        affine=layer.affine, stats_used=layer.stats_used,
        updates_running_stats=layer.updates_running_stats, count=layer.count,
        update_factor=layer.update_factor,
        num_batches_tracked_before=layer.num_batches_tracked_before,
        num_batches_tracked_after=layer.num_batches_tracked_after,
        max_abs_diff=layer.max_abs_diff, max_rel_diff=layer.max_rel_diff,
        running_update_max_abs_diff=layer.running_update_max_abs_diff,
        activation=layer.activation, activation_inplace=layer.activation_inplace,
        overwritten_by=layer.overwritten_by,
        batch_mean=_np(layer.batch_mean), batch_var=_np(layer.batch_var),
        batch_var_unbiased=_np(layer.batch_var_unbiased),
        running_mean_before=_np(layer.running_mean_before),
        running_var_before=_np(layer.running_var_before),
        running_mean_after=_np(layer.running_mean_after),
        running_var_after=_np(layer.running_var_after),
        manual_running_mean_after=_np(layer.manual_running_mean_after),
        manual_running_var_after=_np(layer.manual_running_var_after),
        weight=_np(layer.weight), bias=_np(layer.bias),
        channel_max_abs_diff=_np(layer.channel_max_abs_diff),
        mean_shift=_np(shift), log_var_ratio=_np(ratio),
        sample_manual=_frozen(s_man),
        **{f.name: getattr(c, f.name) for f in fields(CondensedTensors)},
    )


def strip_tensors(report: InspectionReport) -> InspectionReport:
    """A copy of ``report`` without activation-sized tensors: statistics vectors only.

    ``to_dict()``/``to_json()`` of the copy equal the original's (they never read the
    activations); keeping it costs a few hundred KB instead of hundreds of MB.
    """
    layers = [replace(layer, input=None, output=None, activation_output=None,
                      output_reference=None) for layer in report.layers]
    return replace(report, layers=layers, model_input=torch.empty(0))


@dataclass(frozen=True)
class InputPreview:
    """Image 0 of what the network receives (after its preprocessing), on a grid of at most
    :data:`PREVIEW_GRID` x :data:`PREVIEW_GRID` real values: ``z`` is (3, rows, cols)."""

    z: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def input_preview(model_input: torch.Tensor) -> InputPreview:
    """The preview of an already preprocessed batch (``report.model_input``)."""
    mi = as_4d(model_input)
    rows, cols = grid_indices(mi.shape[2], PREVIEW_GRID), grid_indices(mi.shape[3], PREVIEW_GRID)
    return InputPreview(subsample_map(mi[0], rows, cols), _frozen(rows), _frozen(cols))


def preprocessed_preview(loaded, x: torch.Tensor) -> InputPreview:
    """The same preview *before* any forward: ``loaded.preprocess`` is exactly what
    :func:`bnviz.inspect` applies, so the app can draw it while the network still runs
    (the browser then loads its chart code during the forward, not after it)."""
    return input_preview(loaded.preprocess(x.detach()))


def prediction_rows(report: InspectionReport
                    ) -> tuple[tuple[tuple[int, str, float], ...], ...] | None:
    """The report's top-k per image as plain ``(index, label, probability)`` tuples."""
    if report.predictions is None:
        return None
    return tuple(tuple((p.index, p.label, float(p.probability)) for p in row)
                 for row in report.predictions)


_CONDENSE_LOCK = threading.Lock()


def condense_workers() -> int:
    """Threads that condense layers: one per core (``BNVIZ_CONDENSE_WORKERS`` overrides)."""
    wanted = os.environ.get("BNVIZ_CONDENSE_WORKERS", "")
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else (os.cpu_count() or 1)


#: The process-wide pools, created on first use: name -> executor.
_POOLS: dict[str, ThreadPoolExecutor] = {}


def _pool(name: str, workers: int, initializer: Callable[[], None] | None = None,
          ) -> ThreadPoolExecutor:
    with _CONDENSE_LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(workers, thread_name_prefix=f"bnviz-{name}",
                                              initializer=initializer)
        return _POOLS[name]


def _condense_pool() -> ThreadPoolExecutor | None:
    return _pool("condense", condense_workers()) if condense_workers() > 1 else None


def overlap_workers() -> int:
    """Threads that condense layers *while the forward runs*: the cores the forward leaves
    free (cores - torch threads, at least 1); 0 when ``BNVIZ_OVERLAP=0`` or with one
    condense worker."""
    if os.environ.get("BNVIZ_OVERLAP") == "0" or condense_workers() <= 1:
        return 0
    return max(1, (os.cpu_count() or 1) - torch.get_num_threads())


#: Scheduling priority (``nice``) of the threads that condense during the forward.
OVERLAP_NICE = 10


def _yield_to_others() -> None:
    """Run this thread at a lower priority, so it only takes CPU that nobody else wants.

    Why: on a laptop the student's browser shares the cores with the server, and on a
    class server other sessions' forwards do. Measured with the browser on the same 2
    cores, a condensing worker at normal priority took the core the browser needed to draw
    the first charts of a cold start (~0.5 s later). At nice 10 it gets what the browser
    and the forwards leave; whatever it has not done by the forward's end is done by the
    normal-priority pool, as without it.
    """
    lower_thread_priority(OVERLAP_NICE)


def _overlap_pool() -> ThreadPoolExecutor | None:
    workers = overlap_workers()
    return _pool("overlap", workers, _yield_to_others) if workers > 0 else None


class OverlappedCondensing:
    """A :class:`bnviz.inspection.TensorSink` that condenses each layer on a spare core as
    soon as the forward hands it over, so most of the condensing is done when the forward
    ends (batch 8, efficientnet_lite0, 2 cores: the ~300 ms of condensing fits inside the
    ~450 ms forward instead of following it).

    A layer the forward changes after handing it over (an in-place op on one of its tensors
    later in the network, say) is condensed again from the finished report, so the result
    is always what :func:`condense_layers` makes from the report alone.
    """

    def __init__(self, pool: ThreadPoolExecutor | None,
                 cancel: threading.Event | None = None) -> None:
        self._pool = pool
        self._cancel = cancel
        self.jobs: dict[str, Future] = {}  # layer -> its condensing, as handed over
        self.stale: set[str] = set()

    def ready(self, name: str, tensors) -> None:
        if isinstance(self._cancel, JobSignal):  # a prefetch: wait while a page is drawn
            self._cancel.pause_while_busy()
        if self._cancel is not None and self._cancel.is_set():
            self.cancel_all()
            raise Cancelled(f"stopped before {name}: a forward somebody waits for started")
        if self._pool is not None:  # without a pool it only watches ``cancel``
            self.jobs[name] = self._pool.submit(condense_tensors, *tensors)

    def cancel_all(self) -> None:
        """Cancel every handed-over layer whose condensing has not started."""
        for job in self.jobs.values():
            job.cancel()

    def changed(self, name: str) -> None:
        self.stale.add(name)
        job = self.jobs.get(name)
        if job is not None:
            job.cancel()  # not worth finishing if it has not started: it would be redone

    def job(self, name: str) -> Future | None:
        """The layer's condensing if it is still valid, else None (condense the report's)."""
        return None if name in self.stale else self.jobs.get(name)


def condense_layers(layers: Sequence[LayerReport],
                    overlapped: OverlappedCondensing | None = None, *,
                    pooled: bool = True,
                    pause: Callable[[], None] | None = None) -> tuple[LayerView, ...]:
    """:func:`layer_view` of every layer, largest first, on a process-wide thread pool.

    Condensing runs after the forward while the student waits and the browser is idle, so
    it may use every core: the layers are independent, and their tensor ops (gathers,
    bucketing, counting) release the GIL. Batch 8, efficientnet_lite0, one torch thread, 2
    cores: 336 -> ~200 ms per configuration. One pool for the whole process, with one worker
    per core, so concurrent sessions queue their layers instead of oversubscribing the
    cores. Each layer's result does not depend on the thread that made it.

    ``overlapped``: the layers handed over during the forward; those already condensed (or
    being condensed) are taken from it, the pool does the rest. ``pooled=False``: the rest
    is done in the calling thread (a low-priority prefetch must not hand its work to the
    normal-priority pool), calling ``pause`` before each layer (a prefetch waits there
    while a page is drawn).
    """
    condensed: list[CondensedTensors | None] = [None] * len(layers)
    running: dict[int, Future] = {}  # started on the overlap pool: wait for those
    todo = []
    for i, layer in enumerate(layers):
        # handed over under the call's key: the name for a first call, the label after it
        key = layer.name if layer.call == 1 else layer.label
        job = overlapped.job(key) if overlapped is not None else None
        if job is not None and not job.cancel():  # started (or done) during the forward
            running[i] = job
        else:
            todo.append(i)
    todo.sort(key=lambda i: -_numel(layers[i].input))
    pool = _condense_pool() if pooled else None

    def condense_here(i: int) -> CondensedTensors:
        if pause is not None:
            pause()
        return condense_layer_tensors(layers[i])

    work = (condense_here(i) for i in todo) if pool is None or len(todo) < 2 \
        else pool.map(lambda i: condense_layer_tensors(layers[i]), todo)
    for i, c in zip(todo, work, strict=True):
        condensed[i] = c
    for i, job in running.items():
        condensed[i] = job.result()
    return tuple(layer_view(layer, c) for layer, c in zip(layers, condensed, strict=True))


def _numel(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel()


def manual_check_note(manual_check: str) -> str:
    """Which code computed the right-hand chart's differences (``report.manual_check``)."""
    return {
        "compiled": "Differences computed by bnviz's compiled check (bnviz/csrc/probe.cpp: the "
                    "same formula, reading each activation once or twice).",
        "eager": "Differences computed with eager PyTorch ops (the compiled check is not built "
                 "on this server: `bnviz build-kernel`).",
    }.get(manual_check, f"Differences computed by: {manual_check} (per layer, whichever applies).")


def build_view_data(report: InspectionReport, *, random_init: bool,
                    meta: Mapping[str, Any] | None = None,
                    overlapped: OverlappedCondensing | None = None,
                    pooled: bool = True,
                    pause: Callable[[], None] | None = None) -> ViewData:
    """Condense a report made with ``keep_tensors=True`` into a :class:`ViewData`
    (``overlapped``, ``pooled`` and ``pause``: see :func:`condense_layers`)."""
    t0 = time.perf_counter()
    layers = condense_layers(report.layers, overlapped, pooled=pooled, pause=pause)
    return ViewData(
        model=report.model, weights=report.weights, random_init=random_init,
        device=report.device, input_shape=tuple(report.input_shape),
        preprocessing=report.preprocessing,
        notes={k: v for k, v in report.notes.items() if isinstance(v, str | int | float | bool)
               or (isinstance(v, list) and all(isinstance(i, str) for i in v))},
        forward_ms=report.forward_ms, build_ms=(time.perf_counter() - t0) * 1000,
        layers=layers, predictions=prediction_rows(report),
        overview_rows=tuple(report.overview_rows()),
        stats_report=strip_tensors(report),
        meta=dict(meta or {}),
    )


# -- running the network (counted, so tests can prove selection does not recompute) -------

_COUNTER_LOCK = threading.Lock()
INSPECT_CALLS = {"view": 0, "eval": 0, "prefetch": 0}


def _count(kind: str) -> None:
    with _COUNTER_LOCK:
        INSPECT_CALLS[kind] += 1


def inspect_calls() -> dict[str, int]:
    with _COUNTER_LOCK:
        return dict(INSPECT_CALLS)


def compute_view_data(loaded, x: torch.Tensor, modes: Mapping[str, str] | str | None,
                      device: str, *, random_init: bool,
                      meta: Mapping[str, Any] | None = None,
                      cancel: threading.Event | None = None) -> ViewData:
    """One :func:`bnviz.inspect` call (all tensors kept), condensed; the report is dropped.

    ``cancel`` (given by a prefetch): checked at every BatchNorm layer (CPU); once set, the
    forward stops there with :class:`bnviz.prefetch.Cancelled` (a prefetch that a waiting
    student overtook). What is left to condense after such a forward is done in the calling
    (low-priority) thread, not on the normal-priority pool. A prefetch's ``cancel``
    (:class:`bnviz.prefetch.JobSignal`) also pauses the work at every layer while a page is
    being drawn.
    """
    from .inspection import inspect

    _count("view" if cancel is None else "prefetch")
    _forward_started()
    pool = _overlap_pool()
    overlapped = OverlappedCondensing(pool, cancel) \
        if pool is not None or cancel is not None else None
    try:
        try:
            report = inspect(loaded, x, modes=modes, device=device, keep_tensors=True,
                             tensor_sink=overlapped)
        except BaseException:
            if overlapped is not None:
                overlapped.cancel_all()
            raise
        try:
            return build_view_data(
                report, random_init=random_init, meta=meta, overlapped=overlapped,
                pooled=cancel is None,
                pause=cancel.pause_while_busy if isinstance(cancel, JobSignal) else None)
        finally:
            del report
    finally:
        _forward_finished()


def view_data(key: Any, loaded, x: torch.Tensor, modes: Mapping[str, str], device: str, *,
              random_init: bool, prefetcher: Prefetcher | None = None) -> ViewData:
    """The view of configuration ``key``: prefetched if it was, else computed now.

    The app's cached loader calls this, so a configuration is computed at most once in the
    foreground.
    """
    pre = PREFETCH if prefetcher is None else prefetcher
    view = pre.take(key)
    if view is None:
        with pre.foreground(key):
            view = compute_view_data(loaded, x, modes, device, random_init=random_init)
    return view


def prefetch_other_mode(cfg: DashConfig, modes: Mapping[str, str], view: ViewData, loaded,
                        x: torch.Tensor, layer_names: Sequence[str], device: str, *,
                        prefetcher: Prefetcher | None = None) -> bool:
    """Ask for ``cfg`` with the other global mode (same overrides), the view a student
    most likely opens next; False if there is nothing to ask for. ``modes`` and ``view``:
    what ``cfg`` ran with and showed (remembered, so it is not prefetched again).

    Also offers the all-eval reference predictions when ``view`` is all-eval, so a toggle
    away from eval does not need a second forward for them.

    Only on the CPU: a prefetch stops or pauses at the BatchNorm layers the CPU forward
    hands over as it goes (:class:`OverlappedCondensing`); a CUDA forward hands nothing
    over, so it could neither make way for a student's forward nor pause, and both would
    hold every kept activation in GPU memory at once.
    """
    pre = PREFETCH if prefetcher is None else prefetcher
    pre.remember(repr(cfg.compute_key()))
    if not pre.enabled:
        return False
    if not str(device).startswith("cpu"):
        return False
    if set(modes.values()) == {"eval"}:
        pre.offer(("eval", repr(cfg.eval_key())),
                  EvalPredictions(view.predictions, view.forward_ms))
    other = replace(cfg, mode="eval" if cfg.mode == "train" else "train")
    try:
        other_modes = overrides_to_modes(other.mode, other.override_dict, layer_names)
    except BnvizError:  # an override that is invalid in the other mode: nothing to show
        return False
    random_init = cfg.random_init
    return pre.schedule(
        repr(other.compute_key()),
        lambda cancel: compute_view_data(loaded, x, other_modes, device,
                                         random_init=random_init, cancel=cancel))


def eval_predictions(key: Any, loaded, x: torch.Tensor, device: str, *,
                     prefetcher: Prefetcher | None = None) -> EvalPredictions:
    """The all-eval reference of ``key`` (:meth:`DashConfig.eval_key`): offered by an
    all-eval view of the same input if there was one, else computed now."""
    pre = PREFETCH if prefetcher is None else prefetcher
    ref = pre.take(("eval", key))
    if ref is None:
        with pre.foreground(("eval", key)):
            ref = compute_eval_predictions(loaded, x, device)
    return ref


def _release_delay() -> float:
    """``BNVIZ_RELEASE_DELAY_S`` as seconds (>= 0), 120 when unset or not a number."""
    wanted = os.environ.get("BNVIZ_RELEASE_DELAY_S", "")
    try:
        return max(0.0, float(wanted)) if wanted else 120.0
    except ValueError:
        return 120.0


#: Seconds without a forward before the freed activation memory goes back to the system
#: (``BNVIZ_RELEASE_DELAY_S``, default 120; see :func:`release_memory` for why so long).
RELEASE_DELAY_S = _release_delay()
_RELEASE_LOCK = threading.Lock()
_RELEASE = {"running": 0, "timer": None}


def _forward_started() -> None:
    with _RELEASE_LOCK:
        _RELEASE["running"] += 1
        timer = _RELEASE["timer"]
        if timer is not None:
            timer.cancel()
            _RELEASE["timer"] = None


def _forward_finished() -> None:
    with _RELEASE_LOCK:
        _RELEASE["running"] -= 1
        if _RELEASE["running"] == 0:
            timer = threading.Timer(RELEASE_DELAY_S, _release_when_idle)
            timer.daemon = True
            _RELEASE["timer"] = timer
            timer.start()


def _release_when_idle() -> None:
    with _RELEASE_LOCK:
        if _RELEASE["running"]:  # a forward started meanwhile; it schedules the next one
            return
        _RELEASE["timer"] = None
    release_memory()


def release_pending() -> bool:
    """Whether a deferred :func:`release_memory` is scheduled (for tests)."""
    with _RELEASE_LOCK:
        return _RELEASE["timer"] is not None


def release_memory() -> None:
    """Hand the freed activation memory back to the operating system.

    A kept report of a batch of 8 is ~650 MB; after it is dropped glibc keeps most of that
    in its heap, so a server's RSS would grow by hundreds of MB per configuration instead of
    the ~40 MB its condensed view really holds. ``malloc_trim`` returns it (measured: 1.54 GB
    -> 1.10 GB after one configuration). A no-op where glibc is not the allocator.

    :func:`compute_view_data` calls it only once no forward has run for
    :data:`RELEASE_DELAY_S` seconds: the next forward would otherwise fault all those pages
    in again (measured, efficientnet_lite0, batch 8, one thread: forward 720-870 ms right
    after a trim, 430-570 ms reusing the heap). The delay is two minutes, not seconds,
    because a student reads the charts before the next change: with a 10 s delay, a mode
    toggle after 12 s of reading took 0.95-1.37 s on the server, with 120 s 0.45-0.75 s
    (five toggles each, two runs). The price is that a server idle for less than two
    minutes still holds one forward's activations (~650 MB at batch 8) as free heap.
    """
    # Streamlit's collection after every rerun is switched off (``runner.postScriptGC`` in
    # .streamlit/config.toml: it delayed every layer switch by ~40 ms); reference cycles a
    # session left behind are collected here, while nobody waits, before the heap is trimmed.
    gc.collect()
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - attribute check: musl, macOS lack it
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    # PyTorch keeps freed GPU memory reserved for its next allocation; on a GPU shared by
    # other sessions' processes that looks like a leak, so it goes back too (same delay).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


_LIBC: Any = None


@dataclass(frozen=True)
class EvalPredictions:
    """Top-k per image of the all-eval reference run (predictions only, no tensors)."""

    predictions: tuple[tuple[tuple[int, str, float], ...], ...] | None
    forward_ms: float


def compute_eval_predictions(loaded, x: torch.Tensor, device: str) -> EvalPredictions:
    """The reference run for the predictions view: every BN layer in eval, no tensors."""
    from .inspection import inspect

    _count("eval")
    report = inspect(loaded, x, modes="eval", device=device, keep_tensors=False)
    return EvalPredictions(prediction_rows(report), report.forward_ms)


# -- exports --------------------------------------------------------------------------------


def export_file_stem(cfg: DashConfig) -> str:
    stim = _SAFE_NAME.sub("-", stimulus_spec(cfg.stimulus, cfg.param_dict))
    return f"bnviz_{cfg.model}_{cfg.mode}_{stim}".strip("-_")


# -- selection helpers ----------------------------------------------------------------------


def layer_from_selection(selection: Mapping[str, Any] | None,
                         layer_names: Iterable[str]) -> str | None:
    """The layer a click on the overview chart picked (its points carry the layer name as
    ``customdata``), or None when the selection names no known layer."""
    names = set(layer_names)
    points = (selection or {}).get("points") or []
    for point in points:
        data = point.get("customdata")
        if isinstance(data, list | tuple):
            data = data[0] if data else None
        if isinstance(data, str) and data in names:
            return data
    return None


def clamp_channel(channel: int, num_features: int) -> int:
    return int(min(max(int(channel), 0), max(num_features - 1, 0)))


def gallery_channels(channel: int, num_features: int, size: int = 8) -> list[int]:
    """The block of ``size`` channels that contains ``channel`` (0-7, 8-15, ...).

    A block rather than "the next eight": moving to a neighbouring channel usually keeps
    the same block, so the gallery chart stays as it is and is not drawn again."""
    start = (int(channel) // size) * size
    return list(range(start, min(start + size, num_features)))


def preview_thumbnails(x: torch.Tensor, limit: int = PREVIEW_IMAGES,
                       max_side: int = 112) -> list[np.ndarray]:
    """Up to ``limit`` raw images of the batch as uint8 HxWx3 arrays, at most ``max_side``
    pixels (every s-th pixel) -- what the sidebar preview shows."""
    out = []
    for img in x[:limit]:
        rows = grid_indices(img.shape[1], max_side)
        cols = grid_indices(img.shape[2], max_side)
        small = img.index_select(1, torch.from_numpy(rows)).index_select(2, torch.from_numpy(cols))
        out.append((small.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return out


def to_png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- texts for students (one per chart; app.py shows them under each chart) ------------------

EXPLAIN: dict[str, str] = {
    "overview": (
        "Each point is one BatchNorm layer, in the order the forward pass reaches it. The top "
        "row says how far this batch's mean is from the running mean the layer learned in "
        "training (in running standard deviations), the middle row compares the variances "
        "(0 = equal), and the bottom row checks that the literal formula reproduces PyTorch's "
        "output. Orange points normalised with the batch statistics, blue points with the "
        "running ones: click a point to open that layer below."
    ),
    "channel_stats": (
        "One dot per channel: the mean and (biased) variance of this batch's conv output, "
        "next to the running mean and variance stored in the layer. In train mode BatchNorm "
        "uses the orange (batch) numbers, in eval mode the blue (running) ones; where the two "
        "differ a lot, train and eval give different outputs for the same image."
    ),
    "distribution": (
        "Histograms of the selected channel over the whole batch: the conv output that "
        "enters BatchNorm, the normalised output, and what the activation makes of it. "
        "BatchNorm only shifts and scales each channel, so the shape stays the same while the "
        "axis changes; notice where the batch mean and the running mean sit."
    ),
    "all_channels": (
        "Every row is one channel's histogram of the conv output, with its batch mean marked. "
        "Channels live on very different scales, which is why BatchNorm keeps one mean and "
        "one variance per channel (not one per layer, and not a history of batches)."
    ),
    "feature_maps": (
        "The selected channel of image 0 as a heatmap: before BatchNorm, after it, and after "
        "the activation that follows. Each pixel is a real value of the tensor (a regular "
        "subset of positions, never averaged); hover to read it."
    ),
    "gallery": (
        "The block of eight channels around the selected one (conv output, image 0), each on "
        "its own colour scale. Different channels respond to different patterns of the "
        "stimulus; change the channel above to move to another block."
    ),
    "running_update": (
        "What this forward pass does to the stored running statistics: running = (1 - "
        "momentum) * running + momentum * batch statistic, with the unbiased variance. With "
        "a small momentum the change per batch is tiny; momentum=None averages all batches "
        "seen so far. In eval mode (or with tracking off) nothing is updated."
    ),
    "manual": (
        "Left: the formula (x - mean) / sqrt(var + eps) * gamma + beta, applied by hand with "
        "the statistics the layer actually used, against PyTorch's output: the dots lie on the "
        "identity line. Right: the largest difference per channel over every element, about "
        "a millionth of the size of the values: float32 rounding and nothing else."
    ),
    "formula": (
        "The same formula for one element with its actual numbers. In train mode the mean and "
        "variance are this batch's (per channel, over N x H x W values, biased variance); in "
        "eval mode they are the running ones."
    ),
    "inplace": (
        "A forward hook that stores a reference to BatchNorm's output does not keep what "
        "BatchNorm computed if the next module works in place: the ReLU overwrites the same "
        "memory. Left is a clone taken right after BatchNorm, middle is what the stored "
        "reference holds at the end of the forward, right marks the overwritten values."
    ),
    "predictions": (
        "The network's five most likely ImageNet classes for the selected image, with the "
        "current BatchNorm settings (left) and with every BatchNorm layer in eval mode "
        "(right), which is how the network is meant to run at inference. Train mode makes an "
        "image's prediction depend on the other images in its batch."
    ),
    "preprocess": (
        "What the network actually receives: the raw pixels after the model's normalisation, "
        "one map per colour channel (hover for values)."
    ),
}


# -- sentences shown next to the charts -------------------------------------------------------


def _g(v: float | None, digits: int = 6) -> str:
    return "None" if v is None else f"{v:.{digits}g}"


def layer_status_text(layer: LayerView, overridden: bool) -> str:
    """One sentence: the layer's state, which statistics it used and whether it updated."""
    stats = ("**batch** statistics (mean and biased variance over N x H x W = "
             f"{layer.count} values per channel)" if layer.stats_used == "batch"
             else "its **running** statistics")
    update = ("and **updated** its running statistics" if layer.updates_running_stats
              else "and left its running statistics unchanged")
    source = "a per-layer override" if overridden else "the global mode"
    act = (f"followed by `{layer.activation}`"
           + (" **in place**" if layer.activation_inplace else " (not in place)")
           if layer.activation else "not directly followed by an activation")
    return (f"`{layer.label}` ({layer.type}, {layer.num_features} channels, input "
            f"{'x'.join(str(s) for s in layer.input_shape)}) ran as `{layer.mode}` "
            f"(from {source}). It normalised with {stats} {update}; it is {act}.")


def running_update_text(layer: LayerView, channel: int) -> str:
    """The update of one channel written out with its numbers: before -> after."""
    c = int(channel)
    if not layer.updates_running_stats or layer.running_mean_after is None:
        if not layer.has_running_stats:
            return (f"`{layer.label}` has no running statistics (track_running_stats=None "
                    "behaviour): it uses batch statistics in train *and* eval.")
        return (f"No update: in `{layer.mode}` the running statistics of `{layer.label}` are "
                f"{'read' if layer.stats_used == 'running' else 'ignored'}, not written. "
                f"Channel {c}: running mean {_g(float(layer.running_mean_before[c]))}, "
                f"running var {_g(float(layer.running_var_before[c]))}.")
    f = layer.update_factor
    why = ("momentum" if layer.momentum is not None
           else f"1/num_batches_tracked = 1/{layer.num_batches_tracked_after}")
    unb = layer.batch_var_unbiased
    return (
        f"Channel {c}, factor {_g(f)} ({why}):  \n"
        f"running_mean: (1 - {_g(f)}) * {_g(float(layer.running_mean_before[c]))} + {_g(f)} * "
        f"{_g(float(layer.batch_mean[c]))} -> **{_g(float(layer.running_mean_after[c]))}**  \n"
        f"running_var: (1 - {_g(f)}) * {_g(float(layer.running_var_before[c]))} + {_g(f)} * "
        f"{_g(None if unb is None else float(unb[c]))} (unbiased batch var) -> "
        f"**{_g(float(layer.running_var_after[c]))}**  \n"
        f"num_batches_tracked: {layer.num_batches_tracked_before} -> "
        f"{layer.num_batches_tracked_after}; largest difference between this manual update "
        f"and PyTorch's over all channels: {_g(layer.running_update_max_abs_diff, 3)}."
    )


def formula_text(ex: Mapping[str, Any]) -> str:
    """Markdown for :meth:`LayerView.element`'s dict."""
    n, c, h, w = ex["index"]
    stats = "this batch's" if ex["stats"] == "batch" else "the running"
    lines = [
        f"Element x[{n}, {c}, {h}, {w}] ({ex['label']}), normalised with {stats} statistics "
        f"of channel {c}:",
        "",
        f"- x = {ex['x']:.7g}, mean = {ex['mean']:.7g}, var = {ex['var']:.7g}, "
        f"eps = {ex['eps']:g}, gamma = {ex['weight']:.7g}, beta = {ex['bias']:.7g}",
        f"- `{ex['equation']}`",
        f"- PyTorch's BatchNorm output: **{ex['native']:.7g}** (|manual - native| = "
        f"{ex['abs_diff']:.2g})",
    ]
    if ex.get("after_activation") is not None:
        lines.append(f"- after `{ex['activation']}`: {ex['after_activation']:.7g}")
    return "\n".join(lines)


def inplace_layers(view: ViewData) -> list[dict[str, Any]]:
    """Layers whose BN output a reference-keeping hook would see changed (table rows)."""
    rows = []
    for layer in view.layers:
        if layer.overwritten_by is not None:
            rows.append({"layer": layer.label, "activation": layer.activation,
                         "in place": bool(layer.activation_inplace),
                         "overwritten by": layer.overwritten_by,
                         "overwritten fraction": layer.overwritten_fraction})
    return rows


def inplace_text(view: ViewData, layer: LayerView) -> str:
    """Plain words for the in-place view, also (especially) when nothing is in place."""
    rows = inplace_layers(view)
    if not rows:
        acts = sorted({f"{ly.activation}" for ly in view.layers if ly.activation})
        return (f"No BatchNorm output of {view.model} is overwritten in place: its "
                f"activations ({', '.join(acts) or 'none'}) are **not** in place, so a forward "
                "hook that keeps a reference sees exactly the BatchNorm output. Pick a model "
                "with `ReLU(inplace=True)` such as resnet18 to see the effect.")
    if layer.overwritten_by is None:
        consumer = (f"consumed by {layer.activation} out of place" if layer.activation
                    else "not followed by an activation")
        return (f"`{layer.label}` is not overwritten in place (its output is {consumer}). "
                f"{len(rows)} of {len(view.layers)} layers of {view.model} are: pick one in "
                "the table.")
    frac = layer.overwritten_fraction or 0.0
    return (f"`{layer.label}` is followed by `{layer.activation or layer.overwritten_by}`"
            f"{' in place' if layer.activation_inplace else ''}: `{layer.overwritten_by}` "
            f"rewrote **{frac:.1%}** of its output in the same memory. A hook that kept "
            "a reference sees the rewritten values; `output.clone()` in the hook (or a "
            "forward pre-hook on the next module) sees the true BatchNorm output.")


# -- process settings ------------------------------------------------------------------------

_THREADS_SET = False


def configure_torch_threads() -> int:
    """Limit PyTorch's intra-op threads for a shared server; returns the count in use.

    Many sessions run forwards at the same time on one server. With the default (one
    OpenMP thread per core) concurrent forwards oversubscribe the cores and the spinning
    threads slow everything down by up to 10x (measured on 2 shared cores: a 0.6 s forward
    took 6 s). Default: half the cores (at least 1); ``BNVIZ_TORCH_THREADS`` overrides.

    Once per process is enough: PyTorch stores the count globally and every new thread
    (Streamlit runs each rerun in a new one) adopts it before its first parallel op. It also
    makes results bit-identical across sessions: float32 reductions split over a different
    number of threads differ in the last bits.
    """
    global _THREADS_SET
    if not _THREADS_SET:
        wanted = os.environ.get("BNVIZ_TORCH_THREADS", "")
        n = int(wanted) if wanted.isdigit() and int(wanted) > 0 else max(
            1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(min(n, torch.get_num_threads()) if not wanted else n)
        _THREADS_SET = True
    return torch.get_num_threads()


def freeze_long_lived_objects() -> int:
    """Exempt every object alive now (modules, the loaded model) from garbage collection
    scans; returns how many objects are exempt.

    By default Streamlit runs ``gc.collect(2)`` after every script run, fragment reruns
    included (``runner.postScriptGC``). With PyTorch, torchvision, plotly and pandas
    imported, that is a scan of ~450k objects: ~250 ms on a 2-core machine, holding the GIL,
    so the server could not send the finished rerun to the browser in that time (measured: a
    10 ms layer switch reached the browser 250-300 ms after the click). ``gc.freeze()`` moves
    the objects alive now into the permanent generation, so a full collection only scans
    what was created since and still frees every reference cycle a session creates. (What
    is imported later, such as plotly's lazily loaded modules, still made the post-run scan
    35-50 ms when pandas was imported late too, so the repository's config also switches it
    off; Python's own collector and :func:`release_memory` do the collecting. The freeze
    keeps those collections short.)

    Call it once a model has been loaded (the app does, when it loads one): at that point
    nearly everything alive lives as long as the process, and a collection right after the
    imports and the model load finds no garbage to free (measured: 0 objects), so nothing
    collectable is frozen.
    """
    gc.freeze()
    return gc.get_freeze_count()


def view_cache_entries() -> int:
    """How many configurations the server keeps condensed (``BNVIZ_VIEW_CACHE``, default 16)."""
    wanted = os.environ.get("BNVIZ_VIEW_CACHE", "")
    return int(wanted) if wanted.isdigit() and int(wanted) > 0 else 16


#: See :func:`prefetch_quiet_s` and BENCHMARKS.md (runs Y).
DEFAULT_PREFETCH_QUIET_S = 0.75


def prefetch_quiet_s() -> float:
    """``BNVIZ_PREFETCH_QUIET_S``: seconds the prefetch waits after a rerun that a browser
    on this machine asked for (default 0.75; 0: never waits). See :func:`note_activity`."""
    wanted = os.environ.get("BNVIZ_PREFETCH_QUIET_S", "")
    try:
        value = float(wanted) if wanted else DEFAULT_PREFETCH_QUIET_S
    except ValueError:
        value = DEFAULT_PREFETCH_QUIET_S
    return value if value >= 0 else DEFAULT_PREFETCH_QUIET_S


_LOOPBACK = ("127.", "::1", "::ffff:127.", "localhost")


def browser_address(ip_address: object, headers: Mapping[str, Any] | None = None) -> str | None:
    """Where a session's browser runs, for :func:`note_activity`: its address, or None when
    it is (or may be) on this machine.

    ``ip_address`` is Streamlit's ``st.context.ip_address`` (the TCP peer; None for
    localhost) and ``headers`` its ``st.context.headers``. A reverse proxy on the server
    itself makes every peer 127.0.0.1, but names the real client in ``X-Forwarded-For``
    (first entry) or ``X-Real-IP``; that address is used when there is one. It is only a
    hint for scheduling (a client can forge it), never used for anything that matters to
    security.
    """
    address = ip_address
    for name in ("X-Forwarded-For", "X-Real-IP") if hasattr(headers, "get") else ():
        value = headers.get(name)
        first = value.split(",")[0].strip() if isinstance(value, str) else ""
        if first:
            address = first
            break
    if not isinstance(address, str) or not address or address.lower().startswith(_LOOPBACK):
        return None
    return address


def note_activity(client_ip: object) -> None:
    """A rerun of a session whose browser connects from ``client_ip`` starts or ends.

    ``None`` (Streamlit's ``st.context.ip_address`` for a browser on localhost), or anything
    that is not an address string (unknown), means the browser may draw on this machine's
    cores, so the prefetch waits until that is done
    (:meth:`bnviz.prefetch.Prefetcher.activity`). A student's browser on another machine
    does not share the server's cores: its reruns do not hold the prefetch back
    (:func:`browser_address` finds it behind a reverse proxy that says where the client is).
    """
    if not isinstance(client_ip, str):
        PREFETCH.activity()


#: The process-wide prefetcher of views (``BNVIZ_PREFETCH=0`` switches it off): see
#: :mod:`bnviz.prefetch` and :func:`prefetch_other_mode`. It remembers as many computed
#: configurations as the app's view cache holds, so what that cache has dropped is
#: prefetched again; it keeps at most 4 finished views nobody has taken yet (~40-80 MB each
#: at batch 8).
PREFETCH = Prefetcher(capacity=4, enabled=os.environ.get("BNVIZ_PREFETCH") != "0",
                      remembered=view_cache_entries(), quiet_s=prefetch_quiet_s())
