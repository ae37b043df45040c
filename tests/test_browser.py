"""End to end in a real browser: Debian's chromium driven by Playwright against
``streamlit run app.py`` on 127.0.0.1.

Skipped (with the reason) only where /usr/bin/chromium is missing *and* CI is not "true";
under CI=true a missing browser fails. Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import json

import pytest

from bnviz.dashboard import chart_titled
from tests import browser_support as bs

_REASON = bs.chromium_skip_reason()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

SMALL = "size=64&batch=2"
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def server():
    srv = bs.start_server(timeout=120)
    yield srv
    bs.stop_server(srv)


@pytest.fixture(scope="module")
def browser():
    with bs.chromium() as b:
        yield b


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    log = bs.ConsoleLog(pg)
    seen = len(server.log())
    yield pg
    context.close()
    assert log.real_errors() == [], log.real_errors()
    # an exception in the script shows on the page, not in the console: the server logs it
    assert "Traceback" not in server.log()[seen:], server.log()[seen:][-3000:]


def open_app(page, server, query: str = SMALL, charts: int = 4) -> None:
    page.goto(f"{server.url}/?{query}")
    bs.wait_charts(page, charts, TIMEOUT_MS)
    bs.wait_idle(page, TIMEOUT_MS)
    assert page.locator(bs.EXCEPTION).count() == 0


def wait_title(page, part: str) -> None:
    page.wait_for_function(
        "(part) => Array.from(document.querySelectorAll('.gtitle'))"
        ".some(t => t.textContent.includes(part))", arg=part, timeout=TIMEOUT_MS)
    bs.wait_idle(page, TIMEOUT_MS)


def shot(page, name: str) -> None:
    bs.ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(bs.ARTIFACTS / name))


def scroll_to(page, text: str) -> None:
    """Scroll the heading ``text`` to the top of the window (for screenshots)."""
    page.get_by_role("heading", name=text).first.evaluate(
        "e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)


# -- tests ------------------------------------------------------------------------------------


def test_loads_with_every_chart_and_no_errors(page, server):
    open_app(page, server, "size=224&batch=4", charts=4)
    titles = bs.chart_titles(page)
    for part in ("Network overview: 49 BatchNorm layers of efficientnet_lite0",
                 "_bn0: batch vs running statistics", "Top-5 predictions",
                 "network input (after preprocessing)"):
        assert any(part in t for t in titles), (part, titles)
    assert page.get_by_text("not** in place").count() == 0  # markdown rendered, not raw
    assert page.get_by_text("are not in place", exact=False).count() >= 1
    assert "layer=_bn0" in page.url and "model=efficientnet_lite0" in page.url
    shot(page, "01-overview.png")
    # the per-layer table is built when opened (a rerun), with one row per BN layer; the
    # grid's code was fetched while the charts were read (the first page has no table)
    grids = page.locator('[data-testid="stDataFrame"]')
    assert grids.count() == 0
    page.wait_for_function("() => performance.getEntriesByType('resource')"
                           ".some(e => e.name.includes('/DataFrame.'))", timeout=TIMEOUT_MS)
    page.get_by_text("Per-layer table", exact=True).click()
    grids.first.wait_for(timeout=TIMEOUT_MS)
    bs.wait_idle(page, TIMEOUT_MS)
    assert grids.first.locator("table").first.get_attribute("aria-rowcount") == "50"
    assert page.locator(bs.CHART).count() == 12  # the four charts are still drawn
    scroll_to(page, "2. Layer view")
    shot(page, "02-layer-view.png")
    # every tab of the layer view draws its charts when opened
    for tab, part in (("Feature maps", "_bn0, channel 0, image 0"),
                      ("Distributions", "_bn0: every channel's distribution"),
                      ("Running-stat update", "_bn0: no running-stat update"),  # eval
                      ("Manual vs native", "_bn0: manual formula vs native BatchNorm")):
        bs.open_tab(page, tab)
        wait_title(page, part)
        assert f"tab={chart_titled(tab).slug}" in page.url
    shot(page, "05-manual-vs-native.png")


def test_chart_code_is_loaded_before_any_chart(page, server):
    """app.py preloads Streamlit's plotly.js chunk before it imports torch: even a page that
    draws no chart at all (a network without BatchNorm) has loaded it, without an error."""
    page.goto(f"{server.url}/?model=alexnet&weights=random")
    page.get_by_text("has no BatchNorm layers", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    bs.wait_idle(page, TIMEOUT_MS)
    assert page.locator('[data-testid="stPlotlyChart"]').count() == 0
    loaded = page.evaluate("() => performance.getEntriesByType('resource')"
                           ".map(e => e.name).filter(n => n.includes('/PlotlyChart.'))")
    assert len(loaded) == 1, loaded


def test_layer_and_channel_change_the_charts(page, server):
    open_app(page, server, charts=4)
    stats_before = bs.chart_signature(page, "batch vs running")
    bs.select_option(page, "Layer", "7: _blocks.2._bn1")
    wait_title(page, "_blocks.2._bn1: batch vs running")
    assert bs.chart_signature(page, "batch vs running") != stats_before
    bs.open_tab(page, "Feature maps")
    wait_title(page, "_blocks.2._bn1, channel 0, image 0")
    maps_before = bs.chart_signature(page, "image 0 (")
    bs.set_number(page, "Channel", 5)
    wait_title(page, "_blocks.2._bn1, channel 5, image 0")
    bs.wait_changed(page, "image 0 (", maps_before, TIMEOUT_MS)
    assert "layer=_blocks.2._bn1" in page.url and "ch=5" in page.url


def test_clicking_the_overview_opens_the_layer(page, server):
    open_app(page, server)
    overview = page.locator('[data-testid="stPlotlyChart"]').filter(
        has=page.locator(".gtitle", has_text="Network overview")).first
    point = overview.locator(".scatterlayer .trace .points path").nth(5)
    box = point.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 15, y)
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    page.mouse.click(x, y)
    wait_title(page, "_blocks.1._bn2: batch vs running")
    assert page.get_by_role("combobox", name="Layer").input_value() == "5: _blocks.1._bn2"


def test_global_mode_and_a_per_layer_override(page, server):
    open_app(page, server)
    bs.click_radio(page, "Global mode (all BN layers)", "eval")
    wait_title(page, "_bn0: batch vs running statistics (BN used the running ones)")
    assert "mode=eval" in page.url
    # the override table (st.data_editor, a canvas grid): row 0 = _bn0, column "mode"
    # the table is built when its expander opens (a rerun), not on the first page
    assert page.locator('[data-testid="stDataFrame"]').count() == 0
    page.locator('[data-testid="stMainBlockContainer"]').get_by_text(
        "Per-layer settings", exact=True).click()
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.wait_for(timeout=TIMEOUT_MS)
    bs.wait_idle(page, TIMEOUT_MS)
    bs.edit_grid_select(page, grid, row=0, col=1, option="train")
    wait_title(page, "_bn0: batch vs running statistics (BN used the batch ones)")
    page.get_by_text("1 active", exact=False).first.wait_for(timeout=TIMEOUT_MS)
    assert "ov=_bn0%3Atrain" in page.url
    shot(page, "03-override.png")


def test_stimulus_change(page, server):
    open_app(page, server)
    before = bs.chart_signature(page, "network input (after preprocessing)")
    preds = bs.chart_signature(page, "Top-5 predictions")
    bs.select_option(page, "Kind", "grating")
    bs.wait_changed(page, "network input (after preprocessing)", before, TIMEOUT_MS)
    bs.wait_changed(page, "Top-5 predictions", preds, TIMEOUT_MS)
    bs.wait_idle(page, TIMEOUT_MS)
    assert page.get_by_text("grating (orientation 0°", exact=False).count() >= 1
    assert "stim=grating" in page.url


def test_model_change_missing_weights_then_random_init(page, server):
    open_app(page, server)
    bs.select_option(page, "Model", "resnet18")
    # offline here: the core's message and the explicit random-init choice
    err = page.locator('[data-testid="stAlertContentError"]').filter(has_text="Fix:")
    err.first.wait_for(timeout=TIMEOUT_MS)
    assert "resnet18" in err.first.inner_text()
    page.get_by_test_id("stCheckbox").get_by_text("Use random init (not pretrained)").click()
    wait_title(page, "overwritten by relu")
    titles = bs.chart_titles(page)
    assert titles and all("random init (not pretrained)" in t for t in titles), titles
    assert "weights=random" in page.url
    scroll_to(page, "3. In-place ReLU and forward hooks")
    shot(page, "04-inplace-relu.png")


def test_export_json_download(page, server):
    open_app(page, server)
    button = page.get_by_role("button", name="Full report (JSON, the CLI's schema)")
    button.scroll_into_view_if_needed()
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        button.click()
    download = info.value
    assert download.suggested_filename.endswith(".json")
    data = json.loads(open(download.path(), encoding="utf-8").read())
    assert data["model"] == "efficientnet_lite0" and len(data["layers"]) == 49
    assert data["layers"][0]["stats_used"] == "running"  # the first page runs in eval


def test_a_link_reproduces_the_view(page, server, browser):
    open_app(page, server)
    bs.select_option(page, "Layer", "10: _blocks.3._bn1")
    wait_title(page, "_blocks.3._bn1: batch vs running")
    bs.open_tab(page, "Feature maps")
    bs.set_number(page, "Channel", 3)
    wait_title(page, "_blocks.3._bn1, channel 3, image 0")
    link = page.url
    assert "tab=feature-maps" in link
    original = bs.chart_data(page, "_blocks.3._bn1, channel 3, image 0")
    assert len(original) > 1000
    other = browser.new_context(viewport=VIEWPORT).new_page()
    log = bs.ConsoleLog(other)
    other.goto(link)
    bs.wait_charts(other, 4, TIMEOUT_MS)
    bs.wait_idle(other, TIMEOUT_MS)
    wait_title(other, "_blocks.3._bn1, channel 3, image 0")
    assert bs.chart_data(other, "_blocks.3._bn1, channel 3, image 0") == original
    assert log.real_errors() == []
    other.context.close()
