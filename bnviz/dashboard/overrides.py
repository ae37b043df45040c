"""The per-layer override table: its rows as :class:`RowOverride`, checked, and turned into
the ``modes`` dict :func:`bnviz.inspect` takes.

A row that does not make sense raises :class:`~bnviz.errors.ModeError` naming the layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from ..errors import ModeError
from ..modes import parse_mode
from .config import MODE_CHOICES, ROW_MODES, ROW_TRACKS, RowOverride

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
