"""The Pitfall lab page's widgets: an experiment's
:class:`~bnviz.pitfalls.base.PageControls` drawn with Streamlit, and their values in the
page's address.

UI side only: every function takes the ``st`` module (or a column of it) as an argument, so
the experiments and the CLI never import Streamlit. Widget keys are
``"<experiment>:<keyword>"``; a layer picker's key also names the model, so that switching
the model starts again from its first layer.

The settings travel in the URL under their ``run()`` keywords (``?experiment=explain&
model=resnet18&layer=bn1&mode=eval``): a widget that has no state yet starts from the
link's value when it is one the widget offers; any other value is named in
:attr:`UrlSettings.ignored` and the widget keeps its default. Link text is never read as a
path and never run (a stimulus is parsed with ``files=False``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import BnvizError
from .base import PageControls, PhotoInputs, StimulusInputs, Widget
from .common import DEFAULT_BATCH_SIZE, DEFAULT_SIZE, SIZE_CHOICES

__all__ = ["UrlSettings", "draw_controls", "layer_names", "models_with_batchnorm",
           "settings_query"]

WEIGHTS_CHOICES = ("auto", "pretrained", "random")
#: "pretrained" is left out for photo experiments: they fall back to random init anyway.
PHOTO_WEIGHTS_CHOICES = ("auto", "random")
WEIGHTS_HELP = ("auto: pretrained when available (efficientnet_lite0 is bundled), else random "
                "init, labelled as such")
MAX_BATCH = 16


@dataclass
class UrlSettings:
    """The link's settings (``{run() keyword: text}``) and the session's widget state they
    seed; what could not be used is collected in ``ignored`` as ``(keyword, text, why)``."""

    given: Mapping[str, str] = field(default_factory=dict)
    state: Any = field(default_factory=dict)  # st.session_state
    ignored: list[tuple[str, str, str]] = field(default_factory=list)

    def start(self, key: str, keyword: str, parse: Callable[[str], Any], why: str) -> bool:
        """Seed widget ``key`` from the link's ``keyword`` while the widget has no state;
        True when the widget has a state (then no default may be passed to it)."""
        if key in self.state:
            return True
        raw = self.given.get(keyword)
        if raw is None:
            return False
        try:
            self.state[key] = parse(str(raw))
        except (ValueError, TypeError, KeyError, BnvizError):
            self.ignored.append((keyword, str(raw), why))
            return False
        return True


def _one_of(options) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        for option in options:
            if str(option) == text.strip():
                return option
        raise ValueError(text)
    return parse


def _int_in(low, high) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if not int(low) <= value <= int(high):
            raise ValueError(text)
        return value
    return parse


def _float_in(low, high) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text.strip())
        if not float(low) <= value <= float(high):  # NaN fails too
            raise ValueError(text)
        return value
    return parse


def _flag(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    return words[text.strip().lower()]


def _several_of(options) -> Callable[[str], list]:
    def parse(text: str) -> list:
        picked = [part.strip() for part in text.split(",") if part.strip()]
        if not picked or any(p not in options for p in picked):
            raise ValueError(text)
        return picked
    return parse


def _choices(options) -> str:
    shown = [str(o) for o in options]
    return "one of " + ", ".join(shown[:8]) + (", ..." if len(shown) > 8 else "")


def settings_query(kwargs: Mapping[str, Any]) -> dict[str, str]:
    """The ``run()`` keywords as link parameters (what :class:`UrlSettings` reads back);
    values a link cannot carry (None, arrays) are left out."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            out[key] = ",".join(value)
    return out


def draw_controls(st: Any, name: str, page: PageControls,
                  url: UrlSettings | None = None) -> dict[str, Any]:
    """Draw the shared inputs, then each row of the experiment's own widgets; return the
    ``run()`` keywords. ``url``: the link's settings, for widgets without a state yet."""
    url = url or UrlSettings()
    if isinstance(page.inputs, StimulusInputs):
        kwargs = stimulus_inputs(st, name, page.inputs, url)
    else:
        kwargs = photo_inputs(st, name, page.inputs, url)
    for row in page.rows:
        slots = st.columns(len(row)) if len(row) > 1 else [st]
        for slot, widget in zip(slots, row):
            kwargs[widget.keyword] = draw_widget(slot, name, widget, kwargs["model"], url)
    return kwargs


@functools.lru_cache(maxsize=16)
def layer_names(model: str, kind: str = "bn") -> tuple[str, ...]:
    """Layer names of ``model``'s architecture, built without weights (names only): its
    BatchNorm layers (``kind="bn"``) or every module ("any")."""
    from ..models import load_model
    from ..modes import bn_layers

    module = load_model(model, weights=None).module
    if kind == "bn":
        return tuple(n for n, _ in bn_layers(module))
    return tuple(n for n, _ in module.named_modules() if n)


def models_with_batchnorm() -> list[str]:
    """Registry models that have BatchNorm layers (AlexNet has none)."""
    from ..models import list_models

    return [m for m in list_models() if m != "alexnet"]


def draw_widget(slot: Any, name: str, widget: Widget, model: str,
                url: UrlSettings | None = None) -> Any:
    """One :class:`~bnviz.pitfalls.base.Widget` on ``slot``; returns its value."""
    url = url or UrlSettings()
    key = f"{name}:{widget.keyword}"
    kind = widget.kind
    word = widget.keyword
    if kind in ("select", "radio"):
        options = list(widget.options)
        index = options.index(widget.default) if widget.default in options else 0
        has = url.start(key, word, _one_of(options), _choices(options))
        start = {} if has else {"index": index}
        if kind == "select":
            return slot.selectbox(widget.label, options, key=key, help=widget.help, **start)
        return slot.radio(widget.label, options, horizontal=True, key=key, help=widget.help,
                          **start)
    if kind == "int":
        has = url.start(key, word, _int_in(widget.low, widget.high),
                        f"a whole number from {int(widget.low)} to {int(widget.high)}")
        start = {} if has else {"value": int(widget.default)}
        return int(slot.number_input(widget.label, min_value=int(widget.low),
                                     max_value=int(widget.high), key=key, help=widget.help,
                                     **start))
    if kind == "float":
        has = url.start(key, word, _float_in(widget.low, widget.high),
                        f"a number from {widget.low:g} to {widget.high:g}")
        start = {} if has else {"value": float(widget.default)}
        return float(slot.number_input(widget.label, min_value=float(widget.low),
                                       max_value=float(widget.high), format=widget.format,
                                       key=key, help=widget.help, **start))
    if kind == "checkbox":
        has = url.start(key, word, _flag, "true or false")
        start = {} if has else {"value": bool(widget.default)}
        return slot.checkbox(widget.label, key=key, help=widget.help, **start)
    if kind in ("layer", "layers"):
        names = list(layer_names(model))
        key = f"{key}:{model}"
        if kind == "layers":
            has = url.start(key, word, _several_of(names), f"{model}'s BatchNorm layers")
            start = {} if has else {"default": names[:1]}
            return list(slot.multiselect(widget.label, names, key=key, help=widget.help,
                                         **start))
        has = url.start(key, word, _one_of(names), f"a BatchNorm layer of {model}")
        start = {} if has else {"index": 0}
        return slot.selectbox(widget.label, names, key=key, help=widget.help, **start)
    raise ValueError(f"unknown widget kind {kind!r}")


def _stimulus_text(text: str) -> str:
    """A stimulus spec from a link, checked as the box checks it (no file is named)."""
    from ..stimuli import parse_stimulus_spec

    parse_stimulus_spec(text, files=False)
    return text


def stimulus_inputs(st: Any, name: str, inputs: StimulusInputs,
                    url: UrlSettings | None = None) -> dict[str, Any]:
    """Model, weights, layer, stimulus, batch composition and size, image size, device."""
    from ..devices import available_devices
    from ..models import list_models
    from ..stimuli import COMPOSITIONS, parse_stimulus_spec

    url = url or UrlSettings()
    models = list(inputs.models) or list_models()
    cols = st.columns(3)
    key = f"{name}:model"
    has = url.start(key, "model", _one_of(models), _choices(models))
    start = {} if has else {"index": models.index(inputs.model)
                            if inputs.model in models else 0}
    model = cols[0].selectbox("Model", models, key=key, **start)
    key = f"{name}:weights"
    has = url.start(key, "weights", _one_of(WEIGHTS_CHOICES), _choices(WEIGHTS_CHOICES))
    weights = cols[1].selectbox(
        "Weights", WEIGHTS_CHOICES, key=key,
        help=f"{WEIGHTS_HELP}. These effects do not depend on the weights.")
    out: dict[str, Any] = {"model": model, "weights": weights}
    if inputs.layer is not None:
        names = list(layer_names(model, inputs.layer))
        if not names:
            cols[2].warning(f"{model} has no BatchNorm layers.")
            out["layer"] = None
        else:
            key = f"{name}:layer:{model}"
            has = url.start(key, "layer", _one_of(names), f"a layer of {model}")
            index = names.index(inputs.default_layer) if inputs.default_layer in names else 0
            start = {} if has else {"index": index}
            out["layer"] = cols[2].selectbox("Layer", names, key=key, **start)
    cols = st.columns(4)
    key = f"{name}:stimulus"
    has = url.start(key, "stimulus", _stimulus_text, "a stimulus such as uniform or "
                                                     "image:name=chelsea")
    out["stimulus"] = cols[0].text_input(
        "Stimulus", key=key, **({} if has else {"value": inputs.stimulus}),
        help="uniform (all ones), uniform:value=0.5, image:chelsea, image:coffee, noise:seed=1",
    )
    # Text from the browser: never a server path (the check reads no file; run() then
    # parses the same text the same way).
    parse_stimulus_spec(out["stimulus"], files=False)
    key = f"{name}:composition"
    has = url.start(key, "composition", _one_of(COMPOSITIONS), _choices(COMPOSITIONS))
    out["composition"] = cols[1].selectbox(
        "Batch composition", COMPOSITIONS, key=key,
        **({} if has else {"index": COMPOSITIONS.index(inputs.composition)}))
    key = f"{name}:batch_size"
    has = url.start(key, "batch_size", _int_in(1, MAX_BATCH),
                    f"a whole number from 1 to {MAX_BATCH}")
    out["batch_size"] = int(cols[2].number_input(
        "Batch size", 1, MAX_BATCH, key=key, **({} if has else {"value": DEFAULT_BATCH_SIZE})))
    key = f"{name}:size"
    has = url.start(key, "size", _one_of(SIZE_CHOICES), _choices(SIZE_CHOICES))
    out["size"] = int(cols[3].select_slider("Image size", list(SIZE_CHOICES), key=key,
                                            **({} if has else {"value": DEFAULT_SIZE})))
    devices = ["auto", *available_devices()]
    key = f"{name}:device"
    url.start(key, "device", _one_of(devices), _choices(devices))
    out["device"] = st.radio("Device", devices, horizontal=True, key=key)
    return out


def photo_inputs(st: Any, name: str, inputs: PhotoInputs,
                 url: UrlSettings | None = None) -> dict[str, Any]:
    """Model (one with BatchNorm), weights, photo, batch size, image size, device."""
    from ..devices import available_devices
    from ..stimuli import PHOTOS

    url = url or UrlSettings()
    models = models_with_batchnorm()
    cols = st.columns(3)
    key = f"{name}:model"
    url.start(key, "model", _one_of(models), _choices(models))
    model = cols[0].selectbox("Model", models, key=key)
    key = f"{name}:weights"
    url.start(key, "weights", _one_of(PHOTO_WEIGHTS_CHOICES), _choices(PHOTO_WEIGHTS_CHOICES))
    weights = cols[1].selectbox("Weights", list(PHOTO_WEIGHTS_CHOICES), key=key,
                                help=WEIGHTS_HELP)
    key = f"{name}:photo"
    url.start(key, "photo", _one_of(PHOTOS), _choices(PHOTOS))
    photo = cols[2].selectbox("Photo", list(PHOTOS), key=key)
    cols = st.columns(3)
    key = f"{name}:batch_size"
    has = url.start(key, "batch_size", _int_in(1, MAX_BATCH),
                    f"a whole number from 1 to {MAX_BATCH}")
    batch = cols[0].number_input("Batch size", min_value=1, max_value=MAX_BATCH, step=1,
                                 key=key, **({} if has else {"value": inputs.batch_size}))
    key = f"{name}:size"
    has = url.start(key, "size", _one_of(SIZE_CHOICES), _choices(SIZE_CHOICES))
    size = cols[1].select_slider("Image size (px)", list(SIZE_CHOICES), key=key,
                                 **({} if has else {"value": DEFAULT_SIZE}))
    devices = ["auto", *available_devices()]
    key = f"{name}:device"
    url.start(key, "device", _one_of(devices), _choices(devices))
    device = cols[2].selectbox("Device", devices, key=key)
    return {"model": model, "weights": weights, "photo": photo, "batch_size": int(batch),
            "size": int(size), "device": device}
