"""The per-layer settings table: its rows as :class:`RowOverride`, checked, and turned into
the ``modes`` dict :func:`bnviz.inspect` takes.

A row that does not make sense raises :class:`~bnviz.errors.ModeError` naming the layer;
:func:`check_overrides` lists every bad cell of the table at once (the page keeps showing
the last valid view meanwhile), and :func:`in_effect` says what a row amounts to for its
layer, with the layer's own settings filled in where the row keeps them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..errors import ModeError
from ..modes import bn_layers, has_running_stats, parse_mode
from .config import MODE_CHOICES, ROW_MODES, ROW_TRACKS, RowOverride
from .literal import literal
from .texts import format_momentum

OVERRIDE_COLUMNS = ("layer", "mode", "track_running_stats", "momentum")
#: The read-only column beside the editable ones: the layer's settings in effect.
IN_EFFECT = "in effect"
#: What a blank momentum cell shows (the data editor's placeholder) and means: the layer's own.
KEEP = "keep"
_MOMENTUM_FIX = ("leave it blank (keep) for the layer's own momentum, write a number between 0 "
                 "and 1, or 'none' for a cumulative average.")


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
        if not _momentum_ok(momentum):
            raise ModeError(f"Invalid momentum {row.momentum!r}.")
        parse_mode(text)
    except ModeError as exc:
        raise ModeError(f"Layer {name!r}: momentum {row.momentum!r} is not valid.",
                        _MOMENTUM_FIX) from exc
    return text


def _momentum_ok(momentum: str) -> bool:
    """A momentum cell is one value: a comma or '=' would smuggle options into the mode."""
    text = momentum.strip().lower()
    if not text:
        return True
    if "," in text or "=" in text:
        return False
    try:
        parse_mode(f"train,momentum={text}")
    except ModeError:
        return False
    return True


@dataclass(frozen=True)
class CellProblem:
    """One bad cell of the per-layer settings table."""

    layer: str
    column: str  # "mode" | "track_running_stats" | "momentum"
    value: str
    fix: str

    def text(self) -> str:
        """One line of Markdown; the cell's text is shown literally (it is typed text)."""
        return (f"layer {literal(self.layer)}: {self.column} {literal(self.value)} is not valid: "
                f"{self.fix}")


def check_overrides(overrides: Mapping[str, RowOverride],
                    layer_names: Sequence[str]) -> list[CellProblem]:
    """Every bad cell of the table, in table order (none: the overrides can be used)."""
    problems = []
    order = {name: i for i, name in enumerate(layer_names)}
    for name in sorted(overrides, key=lambda n: order.get(n, len(order))):
        row = overrides[name]
        if row.mode not in ROW_MODES:
            problems.append(CellProblem(name, "mode", row.mode,
                                        f"pick one of {', '.join(ROW_MODES)}."))
        if row.track not in ROW_TRACKS:
            problems.append(CellProblem(name, "track_running_stats", row.track,
                                        f"pick one of {', '.join(ROW_TRACKS)}."))
        if not _momentum_ok(row.momentum):
            problems.append(CellProblem(name, "momentum", row.momentum, _MOMENTUM_FIX))
    return problems


@dataclass(frozen=True)
class LayerDefaults:
    """A BatchNorm layer's own settings in the model as loaded: what a row that keeps them
    (mode 'default' aside) leaves in effect."""

    momentum: float | None
    track: str  # "on" | "off" (buffers, flag off) | "none" (no buffers)


def layer_defaults(module) -> dict[str, LayerDefaults]:
    """``{layer name: LayerDefaults}`` for every BatchNorm layer of ``module``."""
    out = {}
    for name, bn in bn_layers(module):
        buffers = has_running_stats(bn)
        track = ("on" if bn.track_running_stats and buffers else "off" if buffers else "none")
        out[name] = LayerDefaults(bn.momentum, track)
    return out


def in_effect(global_mode: str, row: RowOverride | None, own: LayerDefaults | None) -> str:
    """What a layer runs as under ``row`` (None: no override), in the words the layer view
    uses (``train,track=on,momentum=0.1``): the layer's own track and momentum filled in
    where the row keeps them; without ``own``, 'keep' stands for them."""
    row = row or RowOverride()
    mode = global_mode if row.mode == "default" else row.mode
    if row.track != "keep":
        track = row.track
    else:
        track = own.track if own is not None else KEEP
    momentum = row.momentum.strip().lower()
    if momentum in ("none", "null", "cumulative"):
        shown = "none"
    elif momentum:
        shown = format_momentum(float(momentum))
    else:
        shown = format_momentum(own.momentum) if own is not None else KEEP
    if track == "none":
        return f"{mode},track=none (no running statistics)"
    return f"{mode},track={track},momentum={shown}"


def in_effect_column(global_mode: str, shown: Mapping[str, RowOverride],
                     valid: Mapping[str, RowOverride], layer_names: Sequence[str],
                     defaults: Mapping[str, LayerDefaults],
                     bad: Collection[str] = ()) -> list[str]:
    """The read-only column: each layer's settings in effect; for a row with a bad cell
    (``bad``), a warning and the last valid settings, which are the ones in effect."""
    out = []
    for name in layer_names:
        effect = in_effect(global_mode, valid.get(name), defaults.get(name))
        out.append(f"⚠ ignored, still {effect}" if name in bad else effect)
    return out


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


def overrides_frame(layer_names: Sequence[str], overrides: Mapping[str, RowOverride],
                    effect: Sequence[str] | None = None):
    """The table the data editor shows: one row per BN layer, defaults where not overridden.

    A blank momentum is a missing value (None), which the editor shows as :data:`KEEP`
    (its placeholder), never as "None": that would read as momentum=None. With
    ``effect`` (:func:`in_effect_column`), the read-only column :data:`IN_EFFECT` comes
    last."""
    rows = []
    for name in layer_names:
        row = overrides.get(name, RowOverride())
        rows.append({"layer": name, "mode": row.mode, "track_running_stats": row.track,
                     "momentum": row.momentum or None})
    frame = pd.DataFrame(rows, columns=list(OVERRIDE_COLUMNS))
    frame["momentum"] = pd.Series([r["momentum"] for r in rows], dtype=object)  # None, not NaN
    if effect is not None:
        frame[IN_EFFECT] = list(effect)
    return frame


def _cell(value: Any, default: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value).strip()


def _momentum_cell(value: Any) -> str:
    text = _cell(value, "")
    return "" if text.lower() == KEEP else text


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
            momentum=_momentum_cell(rec.get("momentum")),
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


def export_csv(frame, overridden: Collection[str]) -> str:
    """The dashboard's per-layer table as CSV, with ``mode_source`` in the page's words: a
    layer's mode came from the global mode or from a per-layer override.

    (The report says "override" for every layer the dashboard set, which is all of them;
    the page said "from the global mode" for most.) ``frame`` is a private copy."""
    frame["mode_source"] = ["per-layer override" if name in overridden else "global mode"
                            for name in frame["name"]]
    return frame.to_csv(index=False)
