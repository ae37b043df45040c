"""A :class:`DashConfig` as URL query parameters, and back: a link reproduces the exact view
(an instructor sends one link to a class).

Bad values in a link never stop the page: each keeps the default and is reported in one
sentence naming the parameter, the value and what was used instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
    RowOverride,
    make_params,
)
from .literal import literal, plain
from .overrides import check_row
from .uploads import UNSAFE_NAME

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
    if cfg.tab != DEFAULT_CHART:
        q["tab"] = cfg.tab
    return q


def _first(value: Any) -> str:
    if isinstance(value, list | tuple):
        return str(value[-1]) if value else ""
    return str(value)


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
        problems.append(f"Ignored link parameter {key}={literal(q[key])} ({plain(why)}); "
                        f"using {literal(kept)}.")

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
                kind, params = parse_stimulus_spec(text, files=False)
                if kind not in STIMULUS_WIDGETS:
                    raise StimulusError(f"kind {kind!r} is not offered by the dashboard",
                                        "upload the file instead")
                params.pop("seed", None)
                changes["stimulus"], changes["params"] = kind, make_params(kind, params)
            except BnvizError as exc:
                bad("stim", exc.problem.rstrip("."),
                    stimulus_spec(cfg.stimulus, cfg.param_dict))
    for key, attr, lo, hi in (("size", "size", MIN_SIZE, MAX_SIZE),
                              ("batch", "batch_size", 1, MAX_BATCH_SIZE),
                              ("seed", "seed", 0, 2**31 - 1),
                              ("ch", "channel", 0, 1 << 20),
                              ("el", "element", 0, len(FORMULA_ELEMENTS) - 1)):
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
        try:
            changes["overrides"] = tuple(sorted(parse_overrides(q["ov"]).items()))
        except BnvizError as exc:
            bad("ov", str(exc), "no overrides")
    if "layer" in q:
        changes["layer"] = q["layer"].strip()
    return replace(cfg, **changes), problems


def export_file_stem(cfg: DashConfig) -> str:
    """The name the exported files start with: model, mode and stimulus."""
    stim = UNSAFE_NAME.sub("-", stimulus_spec(cfg.stimulus, cfg.param_dict))
    return f"bnviz_{cfg.model}_{cfg.mode}_{stim}".strip("-_")
