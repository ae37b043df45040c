"""A :class:`DashConfig` as URL query parameters, and back: a link reproduces the exact view
(an instructor sends one link to a class).

Bad values in a link never stop the page: each keeps the default and is reported in one
sentence naming the parameter, the value and what was used instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..devices import DEVICE_CHOICES
from ..errors import BnvizError, ModeError, StimulusError
from ..models import list_models
from ..stimuli import COMPOSITIONS, MAX_BATCH_SIZE, MAX_SIZE, MIN_SIZE, parse_stimulus_spec
from ..validation import check_int
from .charts import DEFAULT_CHART, LAYER_CHARTS, LEGACY_TAB_ORDER, chart_from_link
from .condense import FORMULA_ELEMENTS
from .config import (
    MODE_CHOICES,
    ROW_MODES,
    ROW_TRACKS,
    STIMULUS_WIDGETS,
    UPLOAD_KIND,
    DashConfig,
    ParamWidget,
    RowOverride,
    make_params,
)
from .literal import code_span, literal, plain
from .overrides import check_row
from .uploads import UNSAFE_NAME

_QUERY_KEYS = ("model", "weights", "device", "stim", "size", "batch", "comp", "seed", "mode",
               "ov", "layer", "ch", "el", "tab", "img", "scale")


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


def _parse_override_item(item: str) -> tuple[str, RowOverride]:
    """One ``LAYER:MODE[,option...]`` of a link; raises :class:`ModeError` if malformed."""
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
    return name, row


def _override_items(text: str) -> list[str]:
    return [item for item in (p.strip() for p in text.split(";")) if item]


def parse_overrides(text: str) -> dict[str, RowOverride]:
    """Inverse of :func:`format_overrides`; raises :class:`ModeError` if malformed."""
    return dict(_parse_override_item(item) for item in _override_items(text))


def unknown_override_layers(overrides: Mapping[str, RowOverride], layer_names: Sequence[str],
                            model: str) -> tuple[dict[str, RowOverride], str | None]:
    """Overrides from a link split by whether ``model`` has the layer they name: returns
    the ones it has, and a sentence naming the others (None if there are none).

    A link's overrides can only be checked once the model is loaded; the sentence is shown
    with the link's other problems instead of dropping them without a word."""
    known = set(layer_names)
    kept = {name: row for name, row in overrides.items() if name in known}
    unknown = {name: row for name, row in overrides.items() if name not in known}
    if not unknown:
        return kept, None
    names = sorted(unknown)
    listed = ", ".join(repr(n) for n in names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else "")
    layer_word = "layer" if len(names) == 1 else "layers"
    why = f"{model} has no BatchNorm {layer_word} {listed}; the override table lists its layers"
    shown = format_overrides(unknown) or ";".join(names)
    return kept, (f"Ignored link parameter ov={literal(shown)} "
                  f"({plain(why)}); using {'the other overrides' if kept else 'no overrides'}.")


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
    if cfg.tab != DEFAULT_CHART:
        q["tab"] = cfg.tab
    if cfg.image:
        q["img"] = str(cfg.image)
    if cfg.shared_scale:
        q["scale"] = "shared"
    return q


def _widget_range(w: ParamWidget) -> str:
    unit = w.label.partition(" (")[2].rstrip(")")  # "orientation (degrees)" -> "degrees"
    span = (f"from {_fmt_number(w.lo)} to {_fmt_number(w.hi)}" if w.hi is not None
            else f"of at least {_fmt_number(w.lo)}" + (f" and {w.help}" if w.help else ""))
    number = "a whole number" if w.kind == "int" else "a number"
    return f"{w.name} must be {number} {span}" + (f" ({unit})" if unit else "")


def _drop_values_widgets_cannot_show(text: str) -> tuple[str, list[str]]:
    """A stimulus spec from a link without the numbers its widget cannot show (not finite,
    or outside the widget's range), and a sentence for each one dropped.

    The core accepts any finite orientation, say, but the sidebar's number box offers 0 to
    180; Streamlit would put such a value back to the default without a word."""
    head, sep, rest = text.partition(":")
    kind = head.strip().lower()
    widgets = {w.name: w for w in STIMULUS_WIDGETS.get(kind, ()) if w.kind in ("float", "int")}
    if not sep or not widgets:
        return text, []
    kept, dropped = [], []
    for item in rest.split(","):
        key, eq, raw = item.partition("=")
        w = widgets.get(key.strip().lower())
        try:
            number = float(raw.strip()) if eq and w is not None else None
        except ValueError:
            number = None  # not a number at all: the core names it
        if w is None or number is None or (
                math.isfinite(number) and (w.lo is None or number >= w.lo)
                and (w.hi is None or number <= w.hi)):
            kept.append(item)
            continue
        dropped.append(
            f"Ignored {plain(w.name)}={literal(raw.strip())} in link parameter stim "
            f"({plain(_widget_range(w))}); using {plain(w.name)}="
            f"{code_span(_fmt_number(w.default))}.")
    kept_items = [item for item in kept if item.strip()]
    return (f"{head}:{','.join(kept_items)}" if kept_items else head), dropped


def _seed_from_stim(seed: Any, q: Mapping[str, str], changes: dict[str, Any],
                    problems: list[str], kept: int) -> None:
    """A ``seed=`` inside ``stim`` (the CLI's form) is the view's seed, unless the link
    also has a ``seed`` parameter; either way nothing is dropped without a word."""
    if "seed" in q:
        if q["seed"].strip() == str(seed):
            return
        problems.append(f"Ignored seed={literal(seed)} in link parameter stim (the link's "
                        f"seed parameter is used); using seed={code_span(q['seed'])}.")
        return
    try:
        changes["seed"] = check_int("seed", seed, 0, 2**31 - 1)
    except BnvizError:
        problems.append(f"Ignored seed={literal(seed)} in link parameter stim (expected a "
                        f"whole number from 0 to {2**31 - 1}); using seed={literal(kept)}.")


def _first(value: Any) -> str:
    if isinstance(value, list | tuple):
        return str(value[-1]) if value else ""
    return str(value)


def config_from_query(query: Mapping[str, Any], base: DashConfig | None = None, *,
                      models: Sequence[str] | None = None) -> tuple[DashConfig, list[str]]:
    """Read a configuration from query parameters; bad values keep ``base``'s and are listed.

    Returns ``(config, problems)``: each problem is a sentence naming the parameter, the
    value and what was used instead, for the dashboard to show as a warning. Unknown keys
    are ignored (other pages may add their own). ``models``: the names the model picker
    offers (default: the registry's; a server started with ``bnviz serve`` adds the
    operator's): a link picks one of them, nothing else.
    """
    cfg = base or DashConfig()
    problems: list[str] = []
    changes: dict[str, Any] = {}
    q = {k: _first(v) for k, v in query.items() if k in _QUERY_KEYS}

    def bad(key: str, why: str, kept: Any) -> None:
        problems.append(f"Ignored link parameter {key}={literal(q[key])} ({plain(why)}); "
                        f"using {literal(kept)}.")

    if "model" in q:
        names = list_models() if models is None else list(models)
        name = q["model"].strip().lower().replace("-", "_")
        if name in names:
            changes["model"] = name
        else:
            bad("model", f"not one of {', '.join(names)}", cfg.model)
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
            text, dropped = _drop_values_widgets_cannot_show(text)
            try:
                kind, params = parse_stimulus_spec(text, files=False)
                if kind not in STIMULUS_WIDGETS:
                    raise StimulusError(f"kind {kind!r} is not offered by the dashboard",
                                        "upload the file instead")
            except BnvizError as exc:
                bad("stim", exc.problem.rstrip("."),
                    stimulus_spec(cfg.stimulus, cfg.param_dict))
            else:
                problems.extend(dropped)
                seed = params.pop("seed", None)
                if seed is not None:
                    _seed_from_stim(seed, q, changes, problems, cfg.seed)
                changes["stimulus"], changes["params"] = kind, make_params(kind, params)
    for key, attr, lo, hi in (("size", "size", MIN_SIZE, MAX_SIZE),
                              ("batch", "batch_size", 1, MAX_BATCH_SIZE),
                              ("seed", "seed", 0, 2**31 - 1),
                              ("ch", "channel", 0, 1 << 20),
                              ("el", "element", 0, len(FORMULA_ELEMENTS) - 1),
                              ("img", "image", 0, MAX_BATCH_SIZE - 1)):
        if key in q:
            try:
                changes[attr] = check_int(key, q[key], lo, hi)
            except BnvizError:
                bad(key, f"expected a whole number from {lo} to {hi}", getattr(cfg, attr))
    if "tab" in q:
        slug = chart_from_link(q["tab"])
        if slug is not None:
            changes["tab"] = slug
        else:
            bad("tab", f"use one of {', '.join(spec.slug for spec in LAYER_CHARTS)} "
                       f"(or 0 to {len(LEGACY_TAB_ORDER) - 1})", cfg.tab)
    if "scale" in q:
        if q["scale"] in ("shared", "own"):
            changes["shared_scale"] = q["scale"] == "shared"
        else:
            bad("scale", "use shared (one colour scale for the feature maps) or own",
                "shared" if cfg.shared_scale else "own")
    if "comp" in q:
        if q["comp"] in COMPOSITIONS:
            changes["composition"] = q["comp"]
        else:
            bad("comp", f"use one of {', '.join(COMPOSITIONS)}", cfg.composition)
    if "mode" in q:
        if q["mode"] in MODE_CHOICES:
            changes["mode"] = q["mode"]
        else:
            bad("mode", "use train or eval", cfg.mode)
    if "ov" in q:
        # Each override stands alone: a bad one is named and the others are used.
        overrides: dict[str, RowOverride] = {}
        items = _override_items(q["ov"])
        for item in items:
            try:
                name, row = _parse_override_item(item)
            except BnvizError as exc:
                problems.append(
                    f"Ignored link parameter ov={literal(item)} ({plain(exc)}); using "
                    f"{'no overrides' if len(items) == 1 else 'no override for it'}.")
            else:
                overrides[name] = row
        changes["overrides"] = tuple(sorted(overrides.items()))
    if "layer" in q:
        changes["layer"] = q["layer"].strip()
    return replace(cfg, **changes), problems


def export_file_stem(cfg: DashConfig) -> str:
    """The name the exported files start with: model, mode and stimulus."""
    stim = UNSAFE_NAME.sub("-", stimulus_spec(cfg.stimulus, cfg.param_dict))
    return f"bnviz_{cfg.model}_{cfg.mode}_{stim}".strip("-_")
