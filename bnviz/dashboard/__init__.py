"""Streamlit-free logic behind the dashboard (``app.py``): configuration, caching, view data.

``app.py`` is a thin shell (widgets -> this package -> :mod:`bnviz.figures`). Everything
that can be tested without a browser lives here, as pure functions and frozen dataclasses:

* :mod:`.config`: :class:`DashConfig` is the *whole* configuration of one view;
  :meth:`DashConfig.compute_key` is the part that needs a forward pass (picking a layer,
  channel, element or chart only reads the cache). :mod:`.query` round-trips it through
  URL query parameters, so a link reproduces the exact view.
* :mod:`.overrides`: the per-layer override table as the ``modes`` of :func:`bnviz.inspect`.
* :mod:`.serving` calls :func:`bnviz.inspect` exactly **once** per configuration and
  :mod:`.pipeline` condenses the report at once (:mod:`.condense`) into a compact
  :class:`ViewData` (:mod:`.views`); the activations (hundreds of MB for a batch of 8) are
  dropped, and nothing the size of an activation is ever sent to a browser.
* :mod:`.prefetching` computes the other global mode's view while the charts are read;
  :mod:`.resources` tunes the shared server process.
* :mod:`.charts` is the registry of the layer view's charts (slug, title, figures and
  sentences); :mod:`.texts` holds the sentences for students.

Importing this package imports pandas and PIL.Image first, through :mod:`bnviz.figures`
(why: see there).
"""

from __future__ import annotations

from .charts import (
    DEFAULT_CHART,
    LAYER_CHARTS,
    LAYER_TABS,
    LEGACY_TAB_ORDER,
    Block,
    ChartInput,
    ChartSpec,
    chart,
    chart_from_link,
    chart_titled,
)
from .condense import (
    FORMULA_ELEMENTS,
    HIST_BINS,
    HIST_SAMPLE,
    MAP_BUDGET,
    MAX_GRID,
    SAMPLE_POINTS,
    SAMPLE_SEED,
    CondensedTensors,
    as_4d,
    channel_histograms,
    condense_layer_tensors,
    condense_tensors,
    grid_indices,
    histogram_positions,
    map_side,
    sample_indices,
    subsample_map,
)
from .config import (
    MODE_CHOICES,
    ROW_MODES,
    ROW_TRACKS,
    STIMULUS_CHOICES,
    STIMULUS_WIDGETS,
    UPLOAD_KIND,
    DashConfig,
    ParamWidget,
    RowOverride,
    default_params,
    make_params,
)
from .literal import literal, plain
from .overrides import (
    OVERRIDE_COLUMNS,
    apply_editor_state,
    check_row,
    frame_to_overrides,
    overrides_frame,
    overrides_to_modes,
    records_to_overrides,
)
from .pipeline import (
    OVERLAP_NICE,
    OverlappedCondensing,
    build_view_data,
    condense_layers,
    condense_workers,
    overlap_workers,
)
from .prefetching import (
    DEFAULT_PREFETCH_QUIET_S,
    browser_address,
    eval_predictions,
    note_activity,
    prefetch_other_mode,
    prefetch_quiet_s,
    prefetcher,
    set_prefetcher,
    view_data,
)
from .previews import (
    PREVIEW_GRID,
    PREVIEW_IMAGES,
    InputPreview,
    input_preview,
    preprocessed_preview,
    preview_thumbnails,
    to_png,
)
from .query import (
    config_from_query,
    config_to_query,
    export_file_stem,
    format_overrides,
    parse_overrides,
    stimulus_spec,
)
from .resources import (
    configure_torch_threads,
    freeze_long_lived_objects,
    release_memory,
    release_pending,
)
from .selection import clamp_channel, gallery_channels, layer_from_selection
from .serving import (
    EvalPredictions,
    compute_eval_predictions,
    compute_view_data,
    inspect_calls,
    load_shared_model,
    view_cache_entries,
)
from .texts import (
    EXPLAIN,
    formula_text,
    inplace_layers,
    inplace_text,
    layer_status_text,
    manual_check_note,
    running_update_text,
)
from .uploads import describe_config_stimulus, make_batch, store_upload
from .views import LayerView, ViewData, layer_view, literal_bn, prediction_rows, strip_tensors

__all__ = [
    "literal",
    "plain",
    "Block",
    "ChartInput",
    "ChartSpec",
    "CondensedTensors",
    "DEFAULT_CHART",
    "DEFAULT_PREFETCH_QUIET_S",
    "DashConfig",
    "EXPLAIN",
    "EvalPredictions",
    "FORMULA_ELEMENTS",
    "HIST_BINS",
    "HIST_SAMPLE",
    "InputPreview",
    "LAYER_CHARTS",
    "LAYER_TABS",
    "LEGACY_TAB_ORDER",
    "LayerView",
    "MAP_BUDGET",
    "MAX_GRID",
    "MODE_CHOICES",
    "OVERLAP_NICE",
    "OVERRIDE_COLUMNS",
    "OverlappedCondensing",
    "PREVIEW_GRID",
    "PREVIEW_IMAGES",
    "ParamWidget",
    "ROW_MODES",
    "ROW_TRACKS",
    "RowOverride",
    "SAMPLE_POINTS",
    "SAMPLE_SEED",
    "STIMULUS_CHOICES",
    "STIMULUS_WIDGETS",
    "UPLOAD_KIND",
    "ViewData",
    "apply_editor_state",
    "as_4d",
    "browser_address",
    "build_view_data",
    "channel_histograms",
    "chart",
    "chart_from_link",
    "chart_titled",
    "check_row",
    "clamp_channel",
    "compute_eval_predictions",
    "compute_view_data",
    "condense_layer_tensors",
    "condense_layers",
    "condense_tensors",
    "condense_workers",
    "config_from_query",
    "config_to_query",
    "configure_torch_threads",
    "default_params",
    "describe_config_stimulus",
    "eval_predictions",
    "export_file_stem",
    "format_overrides",
    "formula_text",
    "frame_to_overrides",
    "freeze_long_lived_objects",
    "gallery_channels",
    "grid_indices",
    "histogram_positions",
    "inplace_layers",
    "inplace_text",
    "input_preview",
    "inspect_calls",
    "layer_from_selection",
    "layer_status_text",
    "layer_view",
    "literal_bn",
    "load_shared_model",
    "make_batch",
    "make_params",
    "manual_check_note",
    "map_side",
    "note_activity",
    "overlap_workers",
    "overrides_frame",
    "overrides_to_modes",
    "parse_overrides",
    "prediction_rows",
    "prefetch_other_mode",
    "prefetch_quiet_s",
    "prefetcher",
    "preprocessed_preview",
    "preview_thumbnails",
    "records_to_overrides",
    "release_memory",
    "release_pending",
    "running_update_text",
    "sample_indices",
    "set_prefetcher",
    "stimulus_spec",
    "store_upload",
    "strip_tensors",
    "subsample_map",
    "to_png",
    "view_cache_entries",
    "view_data",
]
