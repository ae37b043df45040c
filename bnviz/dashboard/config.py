"""The whole configuration of one dashboard view (:class:`DashConfig`) and the controls
that set it: stimulus parameters, global mode, per-layer override rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..models import DEFAULT_MODEL
from ..modes import TRACK_CHOICES
from ..stimuli import DEFAULT_PARAMS, PHOTOS
from .charts import DEFAULT_CHART

MODE_CHOICES = ("train", "eval")
ROW_MODES = ("default", "train", "eval")  # "default": the global mode applies to the row
ROW_TRACKS = ("keep", *TRACK_CHOICES)
UPLOAD_KIND = "upload"
STIMULUS_CHOICES = ("image", "uniform", "noise", "grating", "checkerboard", UPLOAD_KIND)


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
        ParamWidget("name", "photo", "choice", DEFAULT_PARAMS["image"]["name"],
                    choices=PHOTOS, help="scikit-image's bundled photographs"),
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


def make_params(kind: str, params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Parameters of ``kind`` in a canonical, hashable form (defaults filled in)."""
    full = default_params(kind)
    full.update({k: v for k, v in params.items() if k in full})
    return tuple(sorted(full.items()))


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
    # eval: the network as it is meant to run (the first page invites a flip to train)
    mode: str = "eval"
    overrides: tuple[tuple[str, RowOverride], ...] = ()
    # selection: changes what is shown, never what is computed
    layer: str = ""
    channel: int = 0
    element: int = 0  # index into FORMULA_ELEMENTS
    tab: str = DEFAULT_CHART  # the slug of the layer chart shown (bnviz.dashboard.charts)
    image: int = 0  # the image whose predictions are shown
    shared_scale: bool = False  # the feature maps' panels on one colour scale

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
        """The fields that need a forward pass: layer/channel/element/tab/image are left
        out."""
        return (self.model, self.random_init, self.device, self.stimulus, self.params,
                self.upload, self.size, self.batch_size, self.composition, self.seed,
                self.mode, self.overrides)

    def eval_key(self) -> tuple:
        """The fields the all-eval reference run depends on (no modes, no overrides)."""
        return (self.model, self.random_init, self.device, self.stimulus, self.params,
                self.upload, self.size, self.batch_size, self.composition, self.seed)
