"""bnviz dashboard (main page): live views of every BatchNorm layer of a real network.

A thin shell: widgets -> :mod:`bnviz.dashboard` (configuration, cached inspection, view
data, the registry of the layer's charts) -> :mod:`bnviz.figures` (plotly). Run with
``streamlit run app.py`` (``make run``). It stays one file of about 600 lines so the page's
layout reads top to bottom in the order a student sees it; everything that can be tested
without a browser is in the package.

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

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import streamlit as st

from ui.chart_preload import preload_chart_code

if TYPE_CHECKING:
    import torch

st.set_page_config(page_title="bnviz: BatchNorm microscope", page_icon=":microscope:",
                   layout="wide")
preload_chart_code()

# Everything below imports PyTorch (seconds in a fresh process): after the preload above.
# The whole package first, then its parts (see tests/test_imports.py).
import bnviz  # noqa: E402
from bnviz import dashboard as dash  # noqa: E402
from bnviz import devices, figures, models, settings, stimuli  # noqa: E402

dash.configure_torch_threads()

PLOT_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d"]}
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


@st.cache_resource(show_spinner=False, max_entries=dash.view_cache_entries(), ttl=3 * 3600)
def get_view(key: str, _loaded, _x: torch.Tensor, modes_json: str, device: str,
             random_init: bool) -> dash.ViewData:
    """One inspect call per configuration ``key`` (made ahead of time if it was prefetched);
    the condensed result is shared read-only."""
    return dash.view_data(key, _loaded, _x, json.loads(modes_json), device,
                          random_init=random_init)


@st.cache_resource(show_spinner=False, max_entries=dash.view_cache_entries(), ttl=3 * 3600)
def get_eval_predictions(key: str, _loaded, _x: torch.Tensor,
                         device: str) -> dash.EvalPredictions:
    return dash.eval_predictions(key, _loaded, _x, device)


# -- session state: seeded once from the URL -------------------------------------------------

ss = st.session_state


def _param_key(kind: str, name: str) -> str:
    return f"p_{kind}_{name}"


def init_session() -> None:
    if ss.get("_init"):
        return
    cfg, problems = dash.config_from_query(st.query_params.to_dict())
    ss["_init"] = True
    ss["_link_problems"] = problems
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
    ss["ov_version"] = 0
    ss["_ov_expanded"] = bool(cfg.override_dict)  # a link with overrides opens the table
    ss["ov_model"] = cfg.model
    ss["_layer_request"] = cfg.layer
    ss["channel"] = cfg.channel
    ss["element"] = dash.FORMULA_ELEMENTS[cfg.element]
    ss["layer_tab"] = dash.chart(cfg.tab).title
    ss["weights_errors"] = {}


def editor_key() -> str:
    return f"overrides_{ss['model']}_{ss['ov_version']}"


def reset_overrides() -> None:
    ss["ov_base"] = {}
    ss["ov_version"] += 1


def select_from_overview(names: list[str]) -> None:
    state = ss.get("overview_chart")
    selection = state.get("selection") if state else None
    picked = dash.layer_from_selection(selection, names)
    if picked:
        ss["layer"] = picked


def retry_download(name: str) -> None:
    ss["weights_errors"].pop(name, None)


# -- sidebar ---------------------------------------------------------------------------------


def sidebar_model() -> tuple[bnviz.LoadedModel | None, str | None]:
    """Model picker and loading; returns (model, error message)."""
    st.sidebar.selectbox("Model", models.list_models(), key="model",
                         help="efficientnet_lite0 ships its ImageNet weights and works offline.")
    name = ss["model"]
    if ss.get("ov_model") != name:  # another model: its layers differ, so do the overrides
        ss["ov_base"], ss["ov_model"] = {}, name
        ss["ov_version"] += 1
    st.sidebar.checkbox("Use random init (not pretrained)", key="random_init",
                        help="An untrained network: running mean 0 and variance 1 everywhere. "
                             "Every chart is then labelled 'random init'.")
    random_init = bool(ss["random_init"])
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
        return None, errors[name]
    try:
        with st.spinner(f"Loading {name}..."):
            loaded = get_model(name, random_init)
    except bnviz.BnvizError as exc:
        return None, str(exc)
    st.sidebar.caption(f"Weights: **{loaded.weights}** (status: {loaded.weights_status}); "
                       f"{len(loaded.bn_layer_names)} BatchNorm layers.")
    return loaded, None


def sidebar_device() -> str | None:
    st.sidebar.radio("Device", devices.DEVICE_CHOICES, key="device", horizontal=True)
    try:
        dev = devices.resolve_device(ss["device"])
    except bnviz.BnvizError as exc:
        st.sidebar.error(str(exc))
        return None
    cuda = "cuda" in devices.available_devices()
    st.sidebar.caption(f"In use: **{dev}**" + ("" if cuda else " (no CUDA on this server)"))
    return str(dev)


def sidebar_stimulus() -> tuple[dict, str | None, str]:
    """Stimulus widgets; returns (params, upload path, upload name)."""
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
            except bnviz.BnvizError as exc:
                sb.error(str(exc))
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


def sidebar_modes(layer_names: list[str]) -> dict[str, dash.RowOverride]:
    sb = st.sidebar
    sb.subheader("BatchNorm modes")
    sb.radio("Global mode (all BN layers)", dash.MODE_CHOICES, key="mode", horizontal=True,
             help="train: normalise with batch statistics and update the running ones; "
                  "eval: normalise with the running statistics.")
    base = ss["ov_base"]
    edits = ss.get(editor_key())
    active = dash.apply_editor_state(base, layer_names, edits)
    sb.caption(f"Per-layer overrides: **{len(active)} active**"
               + (f" ({', '.join(sorted(active))})" if 0 < len(active) <= 3 else "") + ".")
    # Drawn only while open (a stateful expander): a table is serialised with Arrow and needs
    # the browser's grid code (1.2 MB of JavaScript), which no chart waits for any more.
    # The label stays the same, so the open/closed state survives every edit.
    box = sb.expander("Per-layer overrides", expanded=ss.get("_ov_expanded", False),
                      key="ov_open", on_change="rerun")
    sb.button("Reset all", on_click=reset_overrides, key="reset_overrides",
              disabled=not active, help="Remove every per-layer override.")
    if not box.open:
        if edits:  # just closed: keep its edits (Streamlit forgets an undrawn widget's state)
            ss["ov_base"] = active
            ss["ov_version"] += 1
        return active
    with box:
        st.caption("mode 'default' follows the global mode; track_running_stats: keep | on | "
                   "off (flag off, buffers kept) | none (no buffers, as if built with "
                   "track_running_stats=False); momentum: blank keeps the layer's, 'none' "
                   "is a cumulative average.")
        edited = st.data_editor(
            dash.overrides_frame(layer_names, base),
            key=editor_key(), hide_index=True, disabled=["layer"], num_rows="fixed",
            column_config={
                "layer": st.column_config.TextColumn("layer"),
                "mode": st.column_config.SelectboxColumn("mode", options=dash.ROW_MODES,
                                                         required=True),
                "track_running_stats": st.column_config.SelectboxColumn(
                    "track_running_stats", options=dash.ROW_TRACKS, required=True),
                "momentum": st.column_config.TextColumn("momentum"),
            },
        )
    return dash.frame_to_overrides(edited)


# -- main views ------------------------------------------------------------------------------


def explain(key: str) -> None:
    st.caption(dash.EXPLAIN[key])


def chart(fig, key: str | None = None, **kw) -> None:
    # theme=None: Streamlit's theme would be merged into every figure in the browser, on
    # every redraw; the figures carry their own colours.
    st.plotly_chart(fig, key=key, config=PLOT_CONFIG, theme=None, **kw)


def view_overview(view: dash.ViewData) -> None:
    st.header("1. Network overview")
    names = view.layer_names
    chart(figures.overview_figure(view), key="overview_chart",
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
            st.warning(f"The link names layer {dash.literal(request)}, which {view.model} "
                       f"does not have; showing {dash.literal(names[0])}.")
        ss["layer"] = request if request in names else names[0]
    st.selectbox("Layer", names, key="layer",
                 format_func=lambda n: f"{view.layer(n).index}: {n}")
    layer = view.layer(ss["layer"])
    st.markdown(dash.layer_status_text(layer, layer.name in overrides))
    return layer


def view_channel(view: dash.ViewData, layer: dash.LayerView) -> int:
    """Channel and element pickers, then the picked chart of the layer (only it is built)."""
    ss["channel"] = dash.clamp_channel(ss.get("channel", 0), layer.num_features)
    c1, c2 = st.columns([1, 2])
    c1.number_input("Channel", min_value=0, max_value=layer.num_features - 1, step=1,
                    key="channel")
    c2.selectbox("Element for the formula", dash.FORMULA_ELEMENTS, key="element")
    channel = int(ss["channel"])
    # One button row picks which of the layer's charts is drawn (like tabs, but only the
    # picked chart is built): st.tabs would be redrawn by the browser on every layer switch.
    # The state is gone after a run that stopped before this widget (a model error, say):
    # start on the first chart.
    if ss.get("layer_tab") not in dash.LAYER_TABS:
        ss["layer_tab"] = dash.LAYER_TABS[0]
    shown = st.segmented_control("Chart of this layer", dash.LAYER_TABS, key="layer_tab",
                                 required=True, label_visibility="collapsed")
    draw_chart(dash.chart_titled(shown), dash.ChartInput(
        view, layer, channel, dash.FORMULA_ELEMENTS.index(ss["element"])))
    return channel


def draw_chart(spec: dash.ChartSpec, shown: dash.ChartInput) -> None:
    """One chart of the registry: its figures and sentences, in order."""
    for block in spec.blocks:
        made = block.make(shown)
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
    if layer.map_reference is not None:
        chart(figures.inplace_figure(layer, channel, view.weights_label), key="chart_inplace")
        explain("inplace")
    if rows:
        box = st.expander(f"All {len(rows)} layers whose output is overwritten in place",
                          key="inplace_table_open", on_change="rerun")
        if box.open:  # drawn only while open (see view_overview)
            box.dataframe(rows, hide_index=True)


def view_predictions(view: dash.ViewData, reference: dash.EvalPredictions | None) -> None:
    st.header("4. Predictions")
    if view.predictions is None:
        st.info("This model's output is not a vector of class scores; no predictions.")
        return
    n = len(view.predictions)
    image = st.selectbox("Image", list(range(n)), key="pred_image") if n > 1 else 0
    chart(figures.predictions_figure(view.predictions,
                                     None if reference is None else reference.predictions,
                                     int(image), view.weights_label), key="chart_preds")
    explain("predictions")


def view_export(view: dash.ViewData, cfg: dash.DashConfig) -> None:
    st.header("5. Export")
    stem = dash.export_file_stem(cfg)
    c1, c2 = st.columns(2)
    # Both files are made when clicked (the CSV needs pandas, the JSON takes a while).
    c1.download_button("Per-layer table (CSV)", lambda: view.table_csv,
                       file_name=f"{stem}.csv", mime="text/csv", key="dl_csv",
                       on_click="ignore")
    c2.download_button("Full report (JSON, the CLI's schema)", view.report_json,
                       file_name=f"{stem}.json", mime="application/json", key="dl_json",
                       on_click="ignore")
    st.caption("The JSON is exactly `bnviz inspect --json` for this configuration; the CSV is "
               "one row per BatchNorm layer (`report.to_frame()`).")


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
    )


def sync_query_params(cfg: dash.DashConfig) -> None:
    wanted = dash.config_to_query(cfg)
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


def main() -> None:
    init_session()
    st.title("bnviz: a live microscope for BatchNorm")
    for problem in ss.get("_link_problems", []):
        st.warning(problem)

    st.sidebar.header("Network")
    loaded, model_error = sidebar_model()
    device = sidebar_device()
    params, upload_path, upload_name = sidebar_stimulus()
    layer_names = loaded.bn_layer_names if loaded is not None else []
    overrides = sidebar_modes(layer_names) if loaded is not None else dict(ss["ov_base"])
    cfg = current_config(params, overrides)
    sync_query_params(cfg)

    if model_error is not None:
        st.error(model_error)
        st.info("Tick **Use random init (not pretrained)** in the sidebar to continue with an "
                "untrained network (labelled 'random init' on every chart), or put the weights "
                "file where the message says and press **Retry download**.")
        return
    if device is None:
        st.error("Pick a device this server has (auto or cpu) in the sidebar.")
        return
    if not layer_names:
        st.warning(f"{cfg.model} has no BatchNorm layers, so there is nothing to inspect "
                   "(AlexNet predates BatchNorm). Pick another model.")
        return

    log_time("sidebar", _t0)
    try:
        x = get_stimulus(repr(cfg.eval_key()[3:]), cfg, upload_path)
    except bnviz.BnvizError as exc:
        st.error(str(exc))
        return
    preview_sidebar(x, loaded, cfg, upload_name)
    # Drawn before the forward: the browser loads and starts its chart code while the
    # network runs (on a cold start that overlaps part of the wait for the first charts).
    try:
        pre = dash.preprocessed_preview(loaded, x)
    except bnviz.BnvizError as exc:  # what inspect would report for this input
        st.error(str(exc))
        return
    st.sidebar.plotly_chart(
        figures.input_figure(pre.z, pre.rows, pre.cols,
                             figures.RANDOM_INIT_LABEL if cfg.random_init else ""),
        config=PLOT_CONFIG, theme=None, key="chart_preprocess")
    st.sidebar.caption(dash.EXPLAIN["preprocess"]
                       + f" Preprocessing: {loaded.preprocess.description}.")

    try:
        modes = dash.overrides_to_modes(cfg.mode, overrides, layer_names)
        with st.spinner("Running the network and measuring every BatchNorm layer..."):
            view = get_view(repr(cfg.compute_key()), loaded, x, json.dumps(modes), device,
                            cfg.random_init)
    except bnviz.BnvizError as exc:
        st.error(str(exc))
        return

    log_time("view", _t0)
    header(view, cfg, upload_name)
    view_overview(view)
    st.header("2. Layer view")  # outside the fragment: not resent on every layer switch
    layer_fragment(view, overrides, cfg)
    # The all-eval reference run comes last, so the charts above are already on screen
    # while it runs (first visit of a configuration only; it is cached like the view).
    reference = None
    try:
        if set(modes.values()) == {"eval"}:  # the current settings *are* all-eval
            reference = dash.EvalPredictions(view.predictions, view.forward_ms)
        else:
            with st.spinner("Running the all-eval reference for the predictions..."):
                reference = get_eval_predictions(repr(cfg.eval_key()), loaded, x, device)
    except bnviz.BnvizError as exc:
        st.error(str(exc))
    predictions_fragment(view, reference)
    view_export(view, cfg)
    # While the student reads all this, the server computes the same configuration with the
    # other global mode (the usual next question), at low priority: a toggle then only
    # draws. Never while a forward somebody waits for runs, nor while a browser on this
    # machine draws this page (noted now: the run may have started long ago); switched off
    # by BNVIZ_PREFETCH=0.
    dash.note_activity(browser_address())
    dash.prefetch_other_mode(cfg, modes, view, loaded, x, layer_names, device)


@st.fragment
def layer_fragment(view: dash.ViewData, overrides: dict, cfg: dash.DashConfig) -> None:
    """Picking a layer reruns only this part of the page: the cached view data is read
    again, nothing is recomputed, the rest of the page is not resent, and only the picked
    chart is drawn again. (The channel fragment inside notes the activity for both.)"""
    t0 = time.perf_counter()
    layer = view_layer(view, overrides)
    channel_fragment(view, layer.label, cfg)
    log_time("layer-fragment", t0)


@st.fragment
def channel_fragment(view: dash.ViewData, layer_name: str, cfg: dash.DashConfig) -> None:
    """Picking a channel, an element or a chart reruns only this part."""
    t0 = time.perf_counter()
    with drawing_here():
        layer = view.layer(layer_name)
        channel = view_channel(view, layer)
        view_inplace(view, layer, channel)
        sync_query_params(replace(
            cfg, layer=layer.label, channel=channel,
            element=dash.FORMULA_ELEMENTS.index(ss["element"]),
            tab=dash.chart_titled(ss.get("layer_tab")).slug))
    log_time("channel-fragment", t0)


@st.fragment
def predictions_fragment(view: dash.ViewData, reference: dash.EvalPredictions | None) -> None:
    with drawing_here():
        view_predictions(view, reference)


def preview_sidebar(x: torch.Tensor, loaded, cfg: dash.DashConfig, upload_name: str) -> None:
    sb = st.sidebar
    sb.caption(f"Input: {dash.describe_config_stimulus(cfg, upload_name)}, batch of "
               f"{x.shape[0]} ({cfg.composition}), {x.shape[2]}x{x.shape[3]} pixels.")
    thumbs = dash.preview_thumbnails(x)
    sb.image(thumbs, caption=[f"raw image {i}" for i in range(len(thumbs))], width=64)


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
        f"{dash.describe_config_stimulus(cfg, upload_name)}, shape "
        f"{'x'.join(str(s) for s in view.input_shape)}; global mode **{cfg.mode}**"
        f"{overrides}. Forward {view.forward_ms:.0f} ms, summaries {view.build_ms:.0f} ms. "
        "Copy the address bar to share exactly this view."
    )


_t0 = time.perf_counter()
with drawing_here():
    main()
log_time("full-run", _t0)
