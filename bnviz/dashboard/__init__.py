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
* :mod:`.budget` estimates a run's memory and time from the model before it runs and
  refuses what does not fit the per-run budget; :mod:`.run_queue` is the one queue every
  network run of the server waits in, and :class:`SharedResult` shares a configuration's
  result between the sessions that ask for it at once.
* :mod:`.charts` is the registry of the layer view's charts (slug, title, figures and
  sentences); :mod:`.texts` holds the sentences for students.

Importing this package imports pandas and PIL.Image first, through :mod:`bnviz.figures`
(why: see there).
"""

from __future__ import annotations

from .budget import (
    ActivationProfile,
    RunEstimate,
    RunOutOfMemory,
    RunTooLarge,
    activation_profile,
    check_budget,
    estimate_caption,
    estimate_run,
    format_bytes,
    is_out_of_memory,
    largest_fitting,
    machine_memory_bytes,
    memory_budget_bytes,
)
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
from .literal import code_span, literal, message, plain
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
    unknown_override_layers,
)
from .resources import (
    configure_torch_threads,
    freeze_long_lived_objects,
    release_memory,
    release_pending,
)
from .run_queue import (
    RunQueue,
    ServerBusy,
    SharedResult,
    progress_text,
    queue_text,
    run_queue,
    run_slots,
    set_run_queue,
)
from .selection import clamp_channel, gallery_channels, layer_from_selection
from .served import (
    base_config,
    input_caption,
    is_served,
    load_served,
    model_choices,
    operator_input,
    served_config,
    served_query,
)
from .serving import (
    EvalPredictions,
    compute_eval_predictions,
    compute_view_data,
    inspect_calls,
    load_shared_model,
    view_cache_entries,
)
from .shapes import has_maps, layer_kind
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
    "base_config",
    "has_maps",
    "input_caption",
    "is_served",
    "layer_kind",
    "load_served",
    "model_choices",
    "operator_input",
    "served_config",
    "served_query",
    "ActivationProfile",
    "RunEstimate",
    "RunOutOfMemory",
    "RunQueue",
    "RunTooLarge",
    "ServerBusy",
    "SharedResult",
    "activation_profile",
    "check_budget",
    "estimate_caption",
    "estimate_run",
    "format_bytes",
    "is_out_of_memory",
    "largest_fitting",
    "machine_memory_bytes",
    "memory_budget_bytes",
    "progress_text",
    "queue_text",
    "run_queue",
    "run_slots",
    "set_run_queue",
    "code_span",
    "literal",
    "message",
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
    "unknown_override_layers",
    "view_cache_entries",
    "view_data",
]
