"""bnviz dashboard (main page): live views of every BatchNorm layer of a real network.

A thin shell: widgets -> :mod:`bnviz.dashboard` (configuration, cached inspection, view
data, the registry of the layer's charts) -> :mod:`bnviz.figures` (plotly). Run with
``streamlit run app.py`` (``make run``). It stays one file so the page's layout reads top
to bottom in the order a student sees it; everything that can be tested without a browser
is in the package. It is also the app's entry: its last lines list the pages
(``st.navigation``), so each has a name in the page list, and run the one asked for.

Caching, and why it is safe for a class sharing one server:

* the loaded model is an ``st.cache_resource`` shared by every session; ``bnviz.inspect``
  runs each forward on a private copy, so no session's modes ever touch it;
* each configuration (model, weights, device, stimulus, batch, modes, overrides) is
  inspected once and condensed into a read-only :class:`~bnviz.dashboard.ViewData`, cached
  under the *whole* configuration, so two sessions with different modes can never read each
  other's numbers, and picking another layer, channel or element never reruns the network;
* the configuration lives in the URL query parameters, so a link reproduces the view.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from ui.chart_preload import preload_chart_code
from ui.errors import report_uncaught

if TYPE_CHECKING:
    import torch

st.set_page_config(page_title="bnviz: BatchNorm microscope", page_icon=":microscope:",
                   layout="wide")
preload_chart_code()
report_uncaught("drawing this page")


def microscope() -> None:
    """The main page (defined below)."""
    global _t0
    _t0 = time.perf_counter()
    with drawing_here():
        main()
    log_time("full-run", _t0)


# The page list names each page (with a pages/ folder alone, the first would be "app").
# Listed before PyTorch is imported, so a cold start shows the names at once; this script
# runs first on every page, and its last line runs the page asked for. The pages are found
# from this file (a script that runs this one from elsewhere, as the tests do, finds them).
_PAGES = Path(__file__).resolve().parent / "pages"
PITFALL_PAGE = st.Page(_PAGES / "1_Pitfall_lab.py", title="Pitfall lab",
                       icon=":material/warning:")
PAGE = st.navigation([
    st.Page(microscope, title="BatchNorm microscope", icon=":material/biotech:", default=True),
    PITFALL_PAGE,
    st.Page(_PAGES / "2_Training_lab.py", title="Training lab",
            icon=":material/model_training:"),
])

# Everything below imports PyTorch (seconds in a fresh process): after the preload above.
# The whole package first, then its parts (see tests/test_imports.py).
import bnviz  # noqa: E402
from bnviz import dashboard as dash  # noqa: E402
from bnviz import devices, figures, models, settings, stimuli  # noqa: E402
from bnviz.dashboard import callouts, explain_link, selection, texts  # noqa: E402
from bnviz.dashboard import overrides as per_layer  # noqa: E402

dash.configure_torch_threads()
#: The operator's own model and input (``bnviz serve``, ``bnviz.serve``): chosen by whoever
#: started this server, never by a link (:mod:`bnviz.dashboard.served`).
SERVED, SERVED_ERROR = dash.load_served()

PLOT_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d"]}
CALLOUT_ICONS = {"warning": ":material/warning:", "info": ":material/lightbulb:"}
#: BNVIZ_TIMING=1 logs how long each (partial) rerun takes on the server, so the benchmark
#: can tell server time from browser time.
TIMING = settings.settings().timing


def log_time(what: str, t0: float) -> None:
    if TIMING:
        now = time.perf_counter()
        print(f"bnviz-timing {what} {(now - t0) * 1000:.1f} ms (epoch start "
              f"{time.time() - (now - t0):.3f})", file=sys.stderr, flush=True)


def browser_address() -> str | None:
    """This session's browser address, None if it is on this machine (or unknown)."""
    return dash.browser_address(st.context.ip_address, st.context.headers)


@contextmanager
def drawing_here():
    """Around every run and fragment rerun: while it runs, and for a moment after (while
    the browser draws what it sent), a browser on this machine gets the cores and the
    prefetch of the next view waits (:func:`bnviz.dashboard.note_activity`)."""
    client_ip = browser_address()
    dash.note_activity(client_ip)
    try:
        yield
    finally:
        dash.note_activity(client_ip)


# -- cached resources ------------------------------------------------------------------------


@st.cache_resource(show_spinner=False, max_entries=8)
def get_model(name: str, random_init: bool) -> bnviz.LoadedModel:
    """One shared model per (name, weights), seeded when random; never modified (inspect
    works on copies)."""
    loaded = dash.load_shared_model(name, random_init)
    dash.freeze_long_lived_objects()  # it and the modules live as long as the server
    return loaded


@st.cache_resource(show_spinner=False, max_entries=dash.view_cache_entries())
def get_stimulus(key: str, _cfg: dash.DashConfig, _upload_path: str | None) -> torch.Tensor:
    return dash.make_batch(_cfg, _upload_path)


# A view (and an all-eval reference) is kept in a holder cached per configuration, and
# computed outside the cached function: a cached function's page elements are replayed on
# every later hit, and the run's place in the queue must be drawn on the page of the
# session that waits (shared_run).
@st.cache_resource(show_spinner=False, max_entries=dash.view_cache_entries(), ttl=3 * 3600)
def view_result(key: str) -> dash.SharedResult:
    return dash.SharedResult()


@st.cache_resource(show_spinner=False, max_entries=dash.view_cache_entries(), ttl=3 * 3600)
def eval_result(key: str) -> dash.SharedResult:
    return dash.SharedResult()


def shared_run(holder, key: str, compute):
    """``compute(box)`` once per configuration ``key`` for every session that asks
    (:class:`bnviz.dashboard.SharedResult`); ``box`` is where the run says how many runs
    are ahead of it in the server's queue, and how far a long forward is. A failure keeps
    nothing, not even the empty holder."""
    result = holder(key)
    if result.ready:
        return result.get(lambda: None)
    box = st.empty()
    try:
        return result.get(lambda: compute(box),
                          lambda: box.info("Another session asked for this configuration "
                                           "first: its run is shared with this page."))
    except BaseException:
        if not result.ready and not result.busy:
            holder.clear(key)
        raise
    finally:
        box.empty()


def get_view(key: str, loaded, x: torch.Tensor, modes: dict, device: str,
             random_init: bool) -> dash.ViewData:
    """One inspect call per configuration ``key`` (made ahead of time if it was prefetched);
    the condensed result is shared read-only."""
    return shared_run(view_result, key, lambda box: dash.view_data(
        key, loaded, x, modes, device, random_init=random_init,
        on_wait=lambda ahead: box.info(dash.queue_text(ahead)),
        on_progress=lambda done, total: box.info(dash.progress_text(done, total))))


def get_eval_predictions(key: str, loaded, x: torch.Tensor,
                         device: str) -> dash.EvalPredictions:
    return shared_run(eval_result, key, lambda box: dash.eval_predictions(
        key, loaded, x, device, on_wait=lambda ahead: box.info(dash.queue_text(ahead))))


def run_fits(loaded: bnviz.LoadedModel, cfg: dash.DashConfig, device: str) -> bool:
    """The run's estimate under the controls, and whether it fits this server's per-run
    memory budget: checked before the batch is built; if not, the message says what fits."""
    estimate = dash.estimate_run(loaded, cfg.batch_size, cfg.size, device=device)
    if estimate is not None:
        st.sidebar.caption(dash.estimate_caption(estimate, dash.memory_budget_bytes()))
    try:
        dash.check_budget(loaded, cfg.batch_size, cfg.size, device=device)
    except dash.RunTooLarge as exc:
        st.error(texts.dashboard_message(str(exc)))
        return False
    return True


# -- session state: seeded once from the URL -------------------------------------------------

ss = st.session_state


def _param_key(kind: str, name: str) -> str:
    return f"p_{kind}_{name}"


def init_session() -> None:
    if ss.get("_init"):
        return
    cfg, problems = dash.config_from_query(st.query_params.to_dict(), dash.base_config(SERVED),
                                           models=dash.model_choices(SERVED))
    ss["_init"] = True
    ss["_link_problems"] = problems
    ss["_ov_link_check"] = bool(cfg.override_dict)  # once the model's layers are known
    if "ch" in st.query_params:
        ss["_channel_request"] = cfg.channel  # checked against the layer shown first
    ss["model"] = cfg.model
    ss["random_init"] = cfg.random_init
    ss["device"] = cfg.device
    ss["stimulus"] = cfg.stimulus
    for kind, widgets in dash.STIMULUS_WIDGETS.items():
        given = cfg.param_dict if kind == cfg.stimulus else {}
        for w in widgets:
            ss[_param_key(kind, w.name)] = given.get(w.name, w.default)
    ss["size"] = cfg.size
    ss["batch_size"] = cfg.batch_size
    ss["composition"] = cfg.composition
    ss["seed"] = cfg.seed
    ss["mode"] = cfg.mode
    ss["ov_base"] = cfg.override_dict
    ss["ov_valid"] = cfg.override_dict  # the last overrides without a bad cell
    ss["ov_version"] = 0
    ss["_ov_expanded"] = bool(cfg.override_dict)  # a link with overrides opens the table
    ss["ov_model"] = cfg.model
    ss["_layer_request"] = cfg.layer
    ss["channel"] = cfg.channel
    ss["element"] = dash.FORMULA_ELEMENTS[cfg.element]
    ss["layer_tab"] = dash.chart(cfg.tab).title
    ss["maps_shared"] = cfg.shared_scale
    ss["pred_image"] = cfg.image  # checked against the batch when the predictions are drawn
    ss["weights_errors"] = {}
    ss["_model_shown"] = cfg.model
    ss["_random_by_model"] = {}


def link_warning(text: str) -> None:
    """One warning about the link the page was opened with."""
    st.warning(text)
    ss["_link_warned_in"] = ss.get("_full_run")


def link_warnings() -> None:
    """The link's bad values, named on the page's first run and never again: the widgets
    offer only valid values, so whatever the student changes next is valid."""
    ss["_full_run"] = ss.get("_full_run", 0) + 1
    for problem in ss.pop("_link_problems", []):
        link_warning(problem)


def fragment_starts(fragment: str) -> None:
    """First in every fragment. Its own rerun (a layer or a channel picked) is a script run
    of its own, so it reports unexpected errors again; and it leaves the rest of the page as
    it was, so while the link's warnings are still there, the whole page is drawn once more,
    without them."""
    report_uncaught("drawing this page")
    key = f"_fragment_ran_{fragment}"
    run = ss.get("_full_run")
    if ss.get(key) == run and ss.get("_link_warned_in") == run:
        ss.pop("_link_warned_in")
        st.rerun()
    ss[key] = run


def editor_key() -> str:
    return f"overrides_{ss['model']}_{ss['ov_version']}"


def reset_overrides() -> None:
    ss["ov_base"] = {}
    ss["ov_valid"] = {}
    ss["ov_version"] += 1


def flip_mode(mode: str) -> None:
    ss["mode"] = mode


def model_changed() -> None:
    """Another model: its weights choice is its own (as last left, or pretrained when its
    weights are at hand), not whatever the previous model needed."""
    remembered = ss["_random_by_model"]
    remembered[ss["_model_shown"]] = bool(ss["random_init"])
    name = ss["model"]
    try:
        status = models.weights_status(name, check_network=False)
    except (bnviz.BnvizError, KeyError, ValueError):  # bnviz serve: the operator's own model
        status = "none"
    ss["random_init"] = selection.random_init_for(name, remembered, bool(ss["random_init"]),
                                                  status)


def select_from_overview(names: list[str]) -> None:
    state = ss.get("overview_chart")
    selection = state.get("selection") if state else None
    picked = dash.layer_from_selection(selection, names)
    if picked:
        ss["layer"] = picked


def retry_download(name: str) -> None:
    ss["weights_errors"].pop(name, None)


@st.cache_data(show_spinner=False)
def architecture_bn_count(name: str) -> int:
    """BatchNorm layers of the architecture, built without weights (before any download)."""
    return models.architecture_bn_count(name)


# -- sidebar ---------------------------------------------------------------------------------


def sidebar_model() -> tuple[bnviz.LoadedModel | None, str | None]:
    """Model picker and loading; returns (model, error message)."""
    st.sidebar.selectbox("Model", dash.model_choices(SERVED), key="model", on_change=model_changed,
                         help="efficientnet_lite0 ships its ImageNet weights and works offline.")
    name = ss["model"]
    ss["_model_shown"] = name
    if ss.get("ov_model") != name:  # another model: its layers differ, so do the overrides
        ss["ov_base"], ss["ov_valid"], ss["ov_model"] = {}, {}, name
        ss["ov_version"] += 1
    served = dash.is_served(SERVED, name)
    st.sidebar.checkbox("Use random init (not pretrained)", key="random_init", disabled=served,
                        help="An untrained network: running mean 0 and variance 1 everywhere. "
                             "Every chart is then labelled 'random init'.")
    if served:  # the operator's own model, exactly as they gave it
        loaded = SERVED.loaded
        st.sidebar.caption(f"Your model, given when this server was started: weights "
                           f"{loaded.weights}; {len(loaded.bn_layer_names)} BatchNorm layers.")
        return loaded, None
    random_init = bool(ss["random_init"])
    if architecture_bn_count(name) == 0:  # said before any weights are asked for
        st.sidebar.caption(f"{name} has no BatchNorm layers.")
        return None, None
    status = models.weights_status(name, check_network=False)
    errors: dict = ss["weights_errors"]
    if not random_init and name not in errors and status == "not cached":
        bar = st.sidebar.progress(0.0, text=f"Downloading the {name} weights...")

        def progress(done: int, total: int) -> None:
            frac = done / total if total else 0.0
            bar.progress(min(frac, 1.0), text=f"Downloading the {name} weights: "
                                              f"{done / 2**20:.1f} of {total / 2**20:.1f} MB")
        try:
            # into the torch hub cache; no model built
            models.fetch_weights(name, progress=progress)
        except bnviz.WeightsUnavailableError as exc:
            errors[name] = str(exc)
        bar.empty()
    if not random_init and name in errors:
        st.sidebar.error("Pretrained weights unavailable (see the main page).")
        st.sidebar.button("Retry download", on_click=retry_download, args=(name,))
        return None, texts.dashboard_message(errors[name])
    try:
        with st.spinner(f"Loading {name}..."):
            loaded = get_model(name, random_init)
    except bnviz.BnvizError as exc:
        return None, texts.dashboard_message(str(exc))
    st.sidebar.caption(f"Weights: **{loaded.weights}** (status: {loaded.weights_status}); "
                       f"{len(loaded.bn_layer_names)} BatchNorm layers.")
    return loaded, None


def sidebar_device() -> str | None:
    st.sidebar.radio("Device", devices.DEVICE_CHOICES, key="device", horizontal=True)
    try:
        dev = devices.resolve_device(ss["device"])
    except bnviz.BnvizError as exc:
        st.sidebar.error(texts.dashboard_message(str(exc)))
        return None
    cuda = "cuda" in devices.available_devices()
    st.sidebar.caption(f"In use: **{dev}**" + ("" if cuda else " (no CUDA on this server)"))
    return str(dev)


def sidebar_stimulus() -> tuple[dict, str | None, str]:
    """Stimulus widgets; returns (params, upload path, upload name)."""
    if dash.operator_input(SERVED, ss["model"]):  # the input is the operator's
        keep_stimulus_state()
        return {}, None, ""
    sb = st.sidebar
    sb.subheader("Stimulus")
    sb.selectbox("Kind", dash.STIMULUS_CHOICES, key="stimulus",
                 help="Generated images, bundled photos, or your own upload.")
    kind = ss["stimulus"]
    params = {}
    for w in dash.STIMULUS_WIDGETS[kind]:
        key = _param_key(kind, w.name)
        if w.kind == "choice":
            sb.selectbox(w.label, w.choices, key=key, help=w.help or None)
        elif w.kind == "int":
            sb.number_input(w.label, min_value=int(w.lo), step=int(w.step), key=key,
                            help=w.help or None)
        else:
            kw = {"min_value": float(w.lo)} if w.lo is not None else {}
            if w.hi is not None:
                kw["max_value"] = float(w.hi)
            sb.number_input(w.label, step=float(w.step), key=key, help=w.help or None,
                            format="%g", **kw)
        params[w.name] = ss[key]
    upload_path, upload_name = None, ""
    if kind == dash.UPLOAD_KIND:
        up = sb.file_uploader("Image file", key="upload",
                              type=["png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp"],
                              help="Checked by bnviz before use; at most 20 MB.")
        if up is not None:
            upload_name = up.name
            try:
                digest, upload_path = dash.store_upload(up.getvalue(), up.name)
                ss["_upload_hash"] = digest
            except bnviz.BnvizError as exc:  # it quotes the file's name: shown as typed
                sb.error(dash.message(texts.dashboard_message(str(exc)), [up.name]))
                ss["_upload_hash"] = ""
        else:
            ss["_upload_hash"] = ""
    c1, c2 = sb.columns(2)
    c1.number_input("Image size", min_value=stimuli.MIN_SIZE, max_value=stimuli.MAX_SIZE,
                    step=16, key="size")
    c2.number_input("Batch size", min_value=1, max_value=stimuli.MAX_BATCH_SIZE, step=1,
                    key="batch_size")
    c1, c2 = sb.columns(2)
    c1.selectbox("Composition", stimuli.COMPOSITIONS, key="composition",
                 help="copies: one image repeated; different: different images of the kind; "
                      "jitter: shifted/flipped copies of image 0.")
    c2.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="seed")
    return params, upload_path, upload_name


def keep_stimulus_state() -> None:
    """While the operator's input is shown the stimulus widgets are not drawn, and
    Streamlit forgets an undrawn widget's value: keep one for when they come back."""
    plain = dash.DashConfig()
    for key in ("stimulus", "size", "batch_size", "composition", "seed"):
        ss.setdefault(key, getattr(plain, key))
    for kind, widgets in dash.STIMULUS_WIDGETS.items():
        for w in widgets:
            ss.setdefault(_param_key(kind, w.name), w.default)


def sidebar_modes(used: dict[str, dash.RowOverride]) -> None:
    sb = st.sidebar
    sb.subheader("BatchNorm modes")
    sb.radio("Global mode (all BN layers)", dash.MODE_CHOICES, key="mode", horizontal=True,
             help="eval: normalise with the running statistics (the network as it is meant "
                  "to run); train: normalise with batch statistics and update the running "
                  "ones (a model before model.eval()).")
    sb.caption(f"Per-layer overrides: **{len(used)} active**"
               + (f" ({', '.join(sorted(used))})" if 0 < len(used) <= 3 else "") + ".")
    sb.caption("Set them per layer under **Per-layer settings** on the page.")


def override_state(layer_names: list[str]) -> tuple[dict, dict, list]:
    """The per-layer settings: ``(shown, used, problems)``. ``shown``: the table's rows as the
    student left them; ``problems``: its bad cells, every one; ``used``: the overrides the
    view is computed with and the link carries, ``shown`` when it has no bad cell, else the
    last valid ones (a bad cell never empties the page nor reaches the address)."""
    if ss.pop("_ov_link_check", False):  # the link's overrides, now that the layers are known
        ss["ov_base"], problem = dash.unknown_override_layers(ss["ov_base"], layer_names,
                                                              ss["model"])
        ss["ov_valid"] = ss["ov_base"]
        if problem:
            link_warning(problem)
    shown = dash.apply_editor_state(ss["ov_base"], layer_names, ss.get(editor_key()))
    problems = per_layer.check_overrides(shown, layer_names)
    if problems:
        known = set(layer_names)
        used = {name: row for name, row in ss.get("ov_valid", {}).items() if name in known}
    else:
        used = ss["ov_valid"] = shown
    return shown, used, problems


def keep_override_edits(shown: dict[str, dash.RowOverride]) -> None:
    """The table is not drawn in this run: keep its edits (Streamlit forgets the state of a
    widget that is not drawn) as the table's starting values."""
    if ss.get(editor_key()):
        ss["ov_base"] = shown
        ss["ov_version"] += 1


def settings_editor(loaded: bnviz.LoadedModel, cfg_mode: str, shown: dict, used: dict,
                    problems: list) -> None:
    """The per-layer settings table, in the main area at full width (a stateful expander:
    drawn only while open, so no page waits for the table's code)."""
    layer_names = loaded.bn_layer_names
    box = st.expander("Per-layer settings", expanded=ss.get("_ov_expanded", False),
                      key="ov_open", on_change="rerun")
    if box.open:
        with box:
            st.caption(
                "**mode**: *default* follows the global mode. **track_running_stats**: keep "
                "(the layer's own) | on | off (flag off, buffers kept) | none (no buffers, as "
                "if built with track_running_stats=False). **momentum**: *keep* (blank) is the "
                "layer's own, a number from 0 to 1, or *none* for a cumulative average. "
                "**in effect**: what the layer runs as.")
            if problems:
                st.error(f"**{len(problems)} cell{'' if len(problems) == 1 else 's'} not valid,"
                         " ignored**: the charts show the last valid settings, and the address "
                         "keeps them.\n\n" + "\n".join(f"- {p.text()}" for p in problems))
            defaults = per_layer.layer_defaults(loaded.module)  # what 'keep' keeps
            effect = per_layer.in_effect_column(cfg_mode, shown, used, layer_names, defaults,
                                                bad={p.layer for p in problems})
            st.data_editor(
                dash.overrides_frame(layer_names, ss["ov_base"], effect),
                key=editor_key(), hide_index=True, disabled=["layer", per_layer.IN_EFFECT],
                num_rows="fixed", width="stretch", placeholder=per_layer.KEEP,
                column_config={
                    "layer": st.column_config.TextColumn("layer"),
                    "mode": st.column_config.SelectboxColumn("mode", options=dash.ROW_MODES,
                                                             required=True),
                    "track_running_stats": st.column_config.SelectboxColumn(
                        "track_running_stats", options=dash.ROW_TRACKS, required=True),
                    "momentum": st.column_config.TextColumn(
                        "momentum", help="keep (blank): the layer's own; a number from 0 to 1; "
                                         "none: a cumulative average"),
                    per_layer.IN_EFFECT: st.column_config.TextColumn(
                        per_layer.IN_EFFECT, help="what the layer runs as with this row"),
                },
            )
    else:
        keep_override_edits(shown)  # just closed
        if problems:
            st.warning(f"**{len(problems)} cell{'' if len(problems) == 1 else 's'} of the "
                       "per-layer settings not valid, ignored**: the charts show the last valid "
                       "settings. Open **Per-layer settings** to see which.")
    st.button("Reset all per-layer settings", on_click=reset_overrides, key="reset_overrides",
              disabled=not shown and not problems, help="Remove every per-layer override.")


# -- main views ------------------------------------------------------------------------------


def explain(key: str) -> None:
    st.caption(dash.EXPLAIN[key])


def chart(fig, key: str | None = None, **kw) -> None:
    # theme=None: Streamlit's theme would be merged into every figure in the browser, on
    # every redraw; the figures carry their own colours.
    st.plotly_chart(fig, key=key, config=PLOT_CONFIG, theme=None, **kw)


def view_overview(view: dash.ViewData, selected: str | None = None) -> None:
    st.header("1. Network overview")
    names = view.layer_names
    chart(figures.overview_figure(view, selected), key="overview_chart",
          on_select=lambda: select_from_overview(names), selection_mode="points")
    explain("overview")
    # Drawn only while open: no chart of a fresh server's first page waits for a table.
    table = st.expander("Per-layer table", key="table_open", on_change="rerun")
    if table.open:
        shared = any(r["calls"] > 1 for r in view.overview_rows)  # a module called twice
        cols = ["index", "name", *(["call"] if shared else []), "mode", "stats_used",
                "updates_running", "mean_shift", "log_var_ratio", "max_abs_diff", "activation",
                "activation_inplace", "overwritten_by"]
        table.dataframe(view.overview_frame()[cols], hide_index=True, height=300)


def view_layer(view: dash.ViewData, overrides: dict) -> dash.LayerView:
    """The layer picker and what the layer did (its charts are picked below)."""
    names = view.layer_names
    if ss.get("layer") not in names:
        request = ss.pop("_layer_request", "")
        if request and request not in names:
            link_warning(f"The link names layer {dash.literal(request)}, which {view.model} "
                         f"does not have; showing {dash.literal(names[0])}.")
        ss["layer"] = request if request in names else names[0]
    # persist_state: a run that stops before the pickers (a device error, missing weights)
    # must not reset them (Streamlit forgets the state of a widget that is not drawn).
    st.selectbox("Layer", names, key="layer", persist_state="page",
                 format_func=lambda n: f"{view.layer(n).index}: {n}")
    layer = view.layer(ss["layer"])
    st.markdown(dash.layer_status_text(layer, layer.name in overrides))
    return layer


def view_channel(view: dash.ViewData, layer: dash.LayerView, cfg: dash.DashConfig) -> int:
    """Channel and element pickers, then the picked chart of the layer (only it is built),
    the traps it shows, and the way to the explain experiment."""
    ss["channel"] = dash.clamp_channel(ss.get("channel", 0), layer.num_features)
    request = ss.pop("_channel_request", None)
    if request is not None and request >= layer.num_features:
        link_warning(f"The link names channel {request}, but {dash.literal(layer.label)} has "
                     f"{layer.num_features} (0 to {layer.num_features - 1}); showing channel "
                     f"{ss['channel']}.")
    c1, c2 = st.columns([1, 2])
    c1.number_input("Channel", min_value=0, max_value=layer.num_features - 1, step=1,
                    key="channel", persist_state="page")
    c2.selectbox("Element for the formula", dash.FORMULA_ELEMENTS, key="element",
                 persist_state="page")
    channel = int(ss["channel"])
    # One button row picks which of the layer's charts is drawn (like tabs, but only the
    # picked chart is built): st.tabs would be redrawn by the browser on every layer switch.
    # The state is gone after a run that stopped before this widget (a model error, say):
    # start on the first chart.
    if ss.get("layer_tab") not in dash.LAYER_TABS:
        ss["layer_tab"] = dash.LAYER_TABS[0]
    shown = st.segmented_control("Chart of this layer", dash.LAYER_TABS, key="layer_tab",
                                 required=True, label_visibility="collapsed",
                                 persist_state="page")
    spec = dash.chart_titled(shown)
    if spec.slug == "feature-maps":
        st.checkbox("One colour scale for all panels (before and after BN)", key="maps_shared",
                    persist_state="page", help="Off: each panel spans its own range. On: equal "
                    "colours are equal numbers in every panel.")
    draw_chart(spec, dash.ChartInput(
        view, layer, channel, dash.FORMULA_ELEMENTS.index(ss["element"]),
        shared_scale=bool(ss.get("maps_shared"))))
    st.page_link(PITFALL_PAGE, label="Why doesn't my manual BN match? Open the "
                 "explain experiment for this layer and configuration", icon=":material/search:",
                 query_params=explain_link.explain_query(cfg, layer, channel))
    return channel


def draw_chart(spec: dash.ChartSpec, shown: dash.ChartInput) -> None:
    """One chart of the registry: the traps it shows (callouts), then its figures and
    sentences, in order."""
    # Callouts are notes about the numbers, in their own boxes: the page's warnings are
    # about its input (a link, a setting).
    for callout in callouts.callouts_for(spec.slug, shown.layer, shown.channel):
        st.info(callout.text, icon=CALLOUT_ICONS[callout.level])
    for block in spec.blocks:
        made = block.make(shown)
        if made is None:  # nothing of this kind for the layer's shape (bnviz.dashboard.shapes)
            continue
        if block.kind == "figure":
            chart(made, key=block.key)
        elif block.kind == "markdown":
            st.markdown(made)
        else:
            st.caption(made)


def view_inplace(view: dash.ViewData, layer: dash.LayerView, channel: int) -> None:
    st.header("3. In-place ReLU and forward hooks")
    st.markdown(dash.inplace_text(view, layer))
    rows = dash.inplace_layers(view)
    if layer.map_reference is not None and dash.has_maps(layer):
        chart(figures.inplace_figure(layer, channel, view.weights_label), key="chart_inplace")
        explain("inplace")
    if rows:
        box = st.expander(f"All {len(rows)} layers whose output is overwritten in place",
                          key="inplace_table_open", on_change="rerun")
        if box.open:  # drawn only while open (see view_overview)
            box.dataframe(rows, hide_index=True)


def view_predictions(view: dash.ViewData, reference: dash.EvalPredictions | None) -> int:
    """The predictions of the picked image; returns the image."""
    st.header("4. Predictions")
    if view.predictions is None:
        st.info("This model's output is not a vector of class scores; no predictions.")
        return 0
    n = len(view.predictions)
    if not 0 <= int(ss.get("pred_image") or 0) < n:  # a link's image beyond this batch
        ss["pred_image"] = 0
    image = st.selectbox("Image", list(range(n)), key="pred_image",
                         persist_state="page") if n > 1 else 0
    chart(figures.predictions_figure(view.predictions,
                                     None if reference is None else reference.predictions,
                                     int(image), view.weights_label), key="chart_preds")
    explain("predictions")
    return int(image)


def view_export(view: dash.ViewData, cfg: dash.DashConfig) -> None:
    st.header("5. Export")
    stem = dash.export_file_stem(cfg)
    c1, c2 = st.columns(2)
    overridden = set(cfg.override_dict)
    # Both files are made when clicked (the CSV needs pandas, the JSON takes a while).
    c1.download_button("Per-layer table (CSV)",
                       lambda: per_layer.export_csv(view.overview_frame(), overridden),
                       file_name=f"{stem}.csv", mime="text/csv", key="dl_csv",
                       on_click="ignore")
    c2.download_button("Full report (JSON, the CLI's schema)", view.report_json,
                       file_name=f"{stem}.json", mime="application/json", key="dl_json",
                       on_click="ignore")
    st.caption("The JSON is exactly `bnviz inspect --json` for this configuration (its "
               "`mode_source` is `override` for every layer: the dashboard sets each layer's "
               "mode). The CSV is one row per BatchNorm layer (`report.to_frame()`), with "
               "`mode_source` in this page's words: `global mode` or `per-layer override`.")


# -- the page --------------------------------------------------------------------------------


def current_config(params: dict, overrides: dict) -> dash.DashConfig:
    kind = ss["stimulus"]
    return dash.DashConfig(
        model=ss["model"], random_init=bool(ss["random_init"]), device=ss["device"],
        stimulus=kind, params=dash.make_params(kind, params),
        upload=ss.get("_upload_hash", "") if kind == dash.UPLOAD_KIND else "",
        size=int(ss["size"]), batch_size=int(ss["batch_size"]),
        composition=ss["composition"], seed=int(ss["seed"]), mode=ss["mode"],
        overrides=tuple(sorted(overrides.items())),
        layer=ss.get("layer") or ss.get("_layer_request", ""),
        channel=int(ss.get("channel", 0)),
        element=dash.FORMULA_ELEMENTS.index(ss.get("element", dash.FORMULA_ELEMENTS[0])),
        tab=dash.chart_titled(ss.get("layer_tab")).slug,
        image=picked_image(int(ss["batch_size"])),
        shared_scale=bool(ss.get("maps_shared")),
    )


def picked_image(batch_size: int) -> int:
    image = int(ss.get("pred_image") or 0)
    return image if 0 <= image < batch_size else 0


def with_selection(cfg: dash.DashConfig, **picked) -> dash.DashConfig:
    """``cfg`` with what is picked now: a fragment's rerun leaves the rest of the page (and
    the configuration it was drawn with) as it was, while another fragment may have changed
    its own part since."""
    now = {"layer": ss.get("layer") or cfg.layer, "channel": int(ss.get("channel", 0)),
           "element": dash.FORMULA_ELEMENTS.index(ss.get("element", dash.FORMULA_ELEMENTS[0])),
           "tab": dash.chart_titled(ss.get("layer_tab")).slug,
           "image": picked_image(cfg.batch_size),
           "shared_scale": bool(ss.get("maps_shared", cfg.shared_scale))}
    return replace(cfg, **{**now, **picked})


def intro() -> None:
    """What the page is, and the invitation to flip the global mode and see what changes."""
    st.markdown(texts.INTRO)
    mode = ss["mode"]
    st.info(texts.MODE_INVITATION[mode])
    target, label = texts.MODE_FLIP[mode]
    st.button(label, key="flip_mode", on_click=flip_mode, args=(target,),
              type="primary" if mode == "eval" else "secondary")


def sync_query_params(cfg: dash.DashConfig) -> None:
    wanted = dash.served_query(dash.config_to_query(cfg), SERVED, cfg.model)
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


def main() -> None:
    init_session()
    st.title("bnviz: a live microscope for BatchNorm")
    link_warnings()
    if SERVED_ERROR:
        st.error(SERVED_ERROR)
    intro()

    st.sidebar.header("Network")
    loaded, model_error = sidebar_model()
    device = sidebar_device()
    params, upload_path, upload_name = sidebar_stimulus()
    layer_names = loaded.bn_layer_names if loaded is not None else []
    if loaded is not None:
        shown, used, problems = override_state(layer_names)
    else:
        shown, used, problems = dict(ss["ov_base"]), dict(ss.get("ov_valid", {})), []
    sidebar_modes(used)
    cfg = dash.served_config(current_config(params, used), SERVED)
    sync_query_params(cfg)

    if model_error is not None:
        st.error(model_error)
        st.info("Tick **Use random init (not pretrained)** in the sidebar to continue with an "
                "untrained network (labelled 'random init' on every chart), or put the weights "
                "file where the message says and press **Retry download**.")
        return
    if not layer_names:
        st.warning(f"{cfg.model} has no BatchNorm layers, so there is nothing to inspect "
                   "(AlexNet predates BatchNorm). Pick another model.")
        return
    settings_editor(loaded, cfg.mode, shown, used, problems)
    if device is None:
        st.error("Pick a device this server has (auto or cpu) in the sidebar.")
        return

    log_time("sidebar", _t0)
    operator = dash.operator_input(SERVED, cfg.model)
    stimulus_key = repr(cfg.eval_key()[3:])
    if operator:  # the operator's input: no stimulus, no image preview, no memory estimate
        x = SERVED.x
        st.sidebar.caption(dash.input_caption(SERVED))
    else:
        x = image_input(loaded, cfg, device, stimulus_key, upload_path, upload_name)
        if x is None:
            return

    try:
        modes = dash.overrides_to_modes(cfg.mode, used, layer_names)
        with st.spinner("Running the network and measuring every BatchNorm layer..."):
            view = get_view(repr(cfg.compute_key()), loaded, x, modes, device,
                            cfg.random_init)
    except bnviz.BnvizError as exc:
        get_stimulus.clear(stimulus_key, cfg, upload_path)  # a failed run keeps nothing
        st.error(texts.dashboard_message(str(exc)))
        return

    log_time("view", _t0)
    header(view, cfg, upload_name)
    layer_fragment(view, used, cfg)
    # The all-eval reference run comes last, so the charts above are already on screen
    # while it runs (first visit of a configuration only; it is cached like the view).
    reference = None
    try:
        if operator:  # no class scores to compare for the operator's input
            pass
        elif set(modes.values()) == {"eval"}:  # the current settings *are* all-eval
            reference = dash.EvalPredictions(view.predictions, view.forward_ms)
        else:
            with st.spinner("Running the all-eval reference for the predictions..."):
                reference = get_eval_predictions(repr(cfg.eval_key()), loaded, x, device)
    except bnviz.BnvizError as exc:
        get_stimulus.clear(stimulus_key, cfg, upload_path)
        st.error(texts.dashboard_message(str(exc)))
    if operator:
        st.header("4. Predictions")
        st.info("The input was chosen by whoever started this server, so the dashboard shows "
                "no class predictions for it: the BatchNorm layers above are the point.")
    else:
        predictions_fragment(view, reference, cfg)
    view_export(view, cfg)
    # While the student reads all this, the server computes the same configuration with the
    # other global mode (the usual next question), at low priority: a toggle then only
    # draws. Never while a forward somebody waits for runs, nor while a browser on this
    # machine draws this page (noted now: the run may have started long ago); switched off
    # by BNVIZ_PREFETCH=0.
    dash.note_activity(browser_address())
    dash.prefetch_other_mode(cfg, modes, view, loaded, x, layer_names, device)


def image_input(loaded, cfg: dash.DashConfig, device: str, stimulus_key: str,
                upload_path: str | None, upload_name: str) -> torch.Tensor | None:
    """The stimulus batch of ``cfg``, checked against the memory budget, with its previews
    in the sidebar; None after an error shown on the page."""
    if not run_fits(loaded, cfg, device):
        return None
    try:
        x = get_stimulus(stimulus_key, cfg, upload_path)
    except bnviz.BnvizError as exc:  # an upload's name is shown as typed, never rendered
        st.error(dash.message(texts.dashboard_message(str(exc)), [upload_name]))
        return None
    preview_sidebar(x, loaded, cfg, upload_name)
    # Drawn before the forward: the browser loads and starts its chart code while the
    # network runs (on a cold start that overlaps part of the wait for the first charts).
    try:
        pre = dash.preprocessed_preview(loaded, x)
    except bnviz.BnvizError as exc:  # what inspect would report for this input
        st.error(texts.dashboard_message(str(exc)))
        return None
    st.sidebar.plotly_chart(
        figures.input_figure(pre.z, pre.rows, pre.cols,
                             figures.RANDOM_INIT_LABEL if cfg.random_init else ""),
        config=PLOT_CONFIG, theme=None, key="chart_preprocess")
    st.sidebar.caption(dash.EXPLAIN["preprocess"]
                       + f" Preprocessing: {loaded.preprocess.description}.")
    return x


@st.fragment
def layer_fragment(view: dash.ViewData, overrides: dict, cfg: dash.DashConfig) -> None:
    """Picking a layer reruns only this part of the page: the cached view data is read
    again, nothing is recomputed, the rest of the page is not resent, and only the picked
    chart is drawn again. (The channel fragment inside notes the activity for both.)"""
    t0 = time.perf_counter()
    fragment_starts("layer")
    # The overview is in this fragment because it marks the layer shown below; it is drawn
    # above the picker, once the picker has settled which layer that is.
    overview = st.container()
    st.header("2. Layer view")
    layer = view_layer(view, overrides)
    with overview:
        view_overview(view, layer.label)
    channel_fragment(view, layer.label, cfg)
    log_time("layer-fragment", t0)


@st.fragment
def channel_fragment(view: dash.ViewData, layer_name: str, cfg: dash.DashConfig) -> None:
    """Picking a channel, an element or a chart reruns only this part."""
    t0 = time.perf_counter()
    fragment_starts("channel")
    with drawing_here():
        layer = view.layer(layer_name)
        channel = view_channel(view, layer, cfg)
        view_inplace(view, layer, channel)
        sync_query_params(with_selection(cfg, layer=layer.label, channel=channel))
    log_time("channel-fragment", t0)


@st.fragment
def predictions_fragment(view: dash.ViewData, reference: dash.EvalPredictions | None,
                         cfg: dash.DashConfig) -> None:
    """Picking an image reruns only this part (and writes it into the address)."""
    fragment_starts("predictions")
    with drawing_here():
        image = view_predictions(view, reference)
        sync_query_params(with_selection(cfg, image=image))


def preview_sidebar(x: torch.Tensor, loaded, cfg: dash.DashConfig, upload_name: str) -> None:
    sb = st.sidebar
    sb.caption(f"Input: {texts.describe_batch(cfg, upload_name)}, batch of "
               f"{x.shape[0]} ({cfg.composition}), {x.shape[2]}x{x.shape[3]} pixels.")
    thumbs = dash.preview_thumbnails(x)
    sb.image(thumbs, caption=[f"raw image {i}" for i in range(len(thumbs))], width=64)


def input_text(cfg: dash.DashConfig, upload_name: str) -> str:
    if dash.operator_input(SERVED, cfg.model):
        return SERVED.input_text
    return texts.describe_batch(cfg, upload_name)


def header(view: dash.ViewData, cfg: dash.DashConfig, upload_name: str) -> None:
    if view.random_init:
        st.warning(f"{view.model} runs with **random init (not pretrained)** weights: running "
                   "statistics are 0 and 1 everywhere and predictions are meaningless. Every "
                   "chart is labelled 'random init'.")
    n_over = len(cfg.overrides)
    overrides = (f" with {n_over} per-layer override{'' if n_over == 1 else 's'}"
                 if n_over else "")
    st.caption(
        f"**{view.model}** ({view.weights}) on **{view.device}**; input "
        f"{input_text(cfg, upload_name)}, shape "
        f"{'x'.join(str(s) for s in view.input_shape)}; global mode **{cfg.mode}**"
        f"{overrides}. Forward {view.forward_ms:.0f} ms, summaries {view.build_ms:.0f} ms. "
        "Copy the address bar to share exactly this view."
    )


_t0 = time.perf_counter()
PAGE.run()
