"""The Pitfall lab page's widgets: an experiment's
:class:`~bnviz.pitfalls.base.PageControls` drawn with Streamlit.

UI side only: every function takes the ``st`` module (or a column of it) as an argument, so
the experiments and the CLI never import Streamlit. Widget keys are
``"<experiment>:<keyword>"``; a layer picker's key also names the model, so that switching
the model starts again from its first layer.
"""

from __future__ import annotations

import functools
from typing import Any

from .base import PageControls, PhotoInputs, StimulusInputs, Widget
from .common import DEFAULT_BATCH_SIZE, DEFAULT_SIZE, SIZE_CHOICES

__all__ = ["draw_controls", "layer_names", "models_with_batchnorm"]

WEIGHTS_CHOICES = ("auto", "pretrained", "random")
#: "pretrained" is left out for photo experiments: they fall back to random init anyway.
PHOTO_WEIGHTS_CHOICES = ("auto", "random")
WEIGHTS_HELP = ("auto: pretrained when available (efficientnet_lite0 is bundled), else random "
                "init, labelled as such")


def draw_controls(st: Any, name: str, page: PageControls) -> dict[str, Any]:
    """Draw the shared inputs, then each row of the experiment's own widgets; return the
    ``run()`` keywords."""
    if isinstance(page.inputs, StimulusInputs):
        kwargs = stimulus_inputs(st, name, page.inputs)
    else:
        kwargs = photo_inputs(st, name, page.inputs)
    for row in page.rows:
        slots = st.columns(len(row)) if len(row) > 1 else [st]
        for slot, widget in zip(slots, row):
            kwargs[widget.keyword] = draw_widget(slot, name, widget, kwargs["model"])
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


def draw_widget(slot: Any, name: str, widget: Widget, model: str) -> Any:
    """One :class:`~bnviz.pitfalls.base.Widget` on ``slot``; returns its value."""
    key = f"{name}:{widget.keyword}"
    kind = widget.kind
    if kind in ("select", "radio"):
        options = list(widget.options)
        index = options.index(widget.default) if widget.default in options else 0
        if kind == "select":
            return slot.selectbox(widget.label, options, index=index, key=key, help=widget.help)
        return slot.radio(widget.label, options, index=index, horizontal=True, key=key,
                          help=widget.help)
    if kind == "int":
        return int(slot.number_input(widget.label, min_value=int(widget.low),
                                     max_value=int(widget.high), value=int(widget.default),
                                     key=key, help=widget.help))
    if kind == "float":
        return float(slot.number_input(widget.label, min_value=float(widget.low),
                                       max_value=float(widget.high),
                                       value=float(widget.default), format=widget.format,
                                       key=key, help=widget.help))
    if kind == "checkbox":
        return slot.checkbox(widget.label, bool(widget.default), key=key, help=widget.help)
    if kind in ("layer", "layers"):
        names = list(layer_names(model))
        if kind == "layers":
            return list(slot.multiselect(widget.label, names, default=names[:1],
                                         key=f"{key}:{model}", help=widget.help))
        return slot.selectbox(widget.label, names, index=0, key=f"{key}:{model}",
                              help=widget.help)
    raise ValueError(f"unknown widget kind {kind!r}")


def stimulus_inputs(st: Any, name: str, inputs: StimulusInputs) -> dict[str, Any]:
    """Model, weights, layer, stimulus, batch composition and size, image size, device."""
    from ..devices import available_devices
    from ..models import list_models
    from ..stimuli import COMPOSITIONS, parse_stimulus_spec

    models = list(inputs.models) or list_models()
    cols = st.columns(3)
    model = cols[0].selectbox("Model", models, index=models.index(inputs.model)
                              if inputs.model in models else 0, key=f"{name}:model")
    weights = cols[1].selectbox(
        "Weights", WEIGHTS_CHOICES, key=f"{name}:weights",
        help=f"{WEIGHTS_HELP}. These effects do not depend on the weights.")
    out: dict[str, Any] = {"model": model, "weights": weights}
    if inputs.layer is not None:
        names = list(layer_names(model, inputs.layer))
        if not names:
            cols[2].warning(f"{model} has no BatchNorm layers.")
            out["layer"] = None
        else:
            index = names.index(inputs.default_layer) if inputs.default_layer in names else 0
            out["layer"] = cols[2].selectbox("Layer", names, index=index,
                                             key=f"{name}:layer:{model}")
    cols = st.columns(4)
    out["stimulus"] = cols[0].text_input(
        "Stimulus", inputs.stimulus, key=f"{name}:stimulus",
        help="uniform (all ones), uniform:value=0.5, image:chelsea, image:coffee, noise:seed=1",
    )
    # Text from the browser: never a server path (the check reads no file; run() then
    # parses the same text the same way).
    parse_stimulus_spec(out["stimulus"], files=False)
    out["composition"] = cols[1].selectbox(
        "Batch composition", COMPOSITIONS, index=COMPOSITIONS.index(inputs.composition),
        key=f"{name}:composition")
    out["batch_size"] = int(cols[2].number_input("Batch size", 1, 16, DEFAULT_BATCH_SIZE,
                                                 key=f"{name}:batch_size"))
    out["size"] = int(cols[3].select_slider("Image size", list(SIZE_CHOICES), DEFAULT_SIZE,
                                            key=f"{name}:size"))
    out["device"] = st.radio("Device", ["auto", *available_devices()], horizontal=True,
                             key=f"{name}:device")
    return out


def photo_inputs(st: Any, name: str, inputs: PhotoInputs) -> dict[str, Any]:
    """Model (one with BatchNorm), weights, photo, batch size, image size, device."""
    from ..devices import available_devices
    from ..stimuli import PHOTOS

    cols = st.columns(3)
    model = cols[0].selectbox("Model", models_with_batchnorm(), index=0, key=f"{name}:model")
    weights = cols[1].selectbox("Weights", list(PHOTO_WEIGHTS_CHOICES), index=0,
                                key=f"{name}:weights", help=WEIGHTS_HELP)
    photo = cols[2].selectbox("Photo", list(PHOTOS), index=0, key=f"{name}:photo")
    cols = st.columns(3)
    batch = cols[0].number_input("Batch size", min_value=1, max_value=16,
                                 value=inputs.batch_size, step=1, key=f"{name}:batch_size")
    size = cols[1].select_slider("Image size (px)", list(SIZE_CHOICES), value=DEFAULT_SIZE,
                                 key=f"{name}:size")
    device = cols[2].selectbox("Device", ["auto", *available_devices()], index=0,
                               key=f"{name}:device")
    return {"model": model, "weights": weights, "photo": photo, "batch_size": int(batch),
            "size": int(size), "device": device}
