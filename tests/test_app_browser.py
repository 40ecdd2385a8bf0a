"""The app in a real browser: Playwright (Python) driving Debian's Chromium, headless.

Sends a message, sees both panes fill, sees the memory gauges update, runs a tiny calibration from
the sliders. The screenshot goes to a temporary folder (the suite changes no tracked file); `make screenshot`
runs the chat test with ``KVQ_SCREENSHOT=docs/screenshot.png`` to refresh the README's. `make test` installs
Chromium (`make browser`); the test skips only when /usr/bin/chromium is absent.
"""

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
QUESTION = "Explain in simple terms the difference between quantitative"  # an example from assets/prompts

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Chromium is not installed at /usr/bin/chromium: `make browser` (or `apt-get install chromium`) enables this test",
)


@pytest.fixture(scope="module")
def page(app_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(app_server)
        page.wait_for_selector("#msg textarea")
        yield page
        browser.close()


def _set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _bot_text(page, elem_id: str) -> str:
    bots = page.locator(f"#{elem_id} [data-testid=bot]")
    return bots.last.inner_text() if bots.count() else ""


@pytest.fixture
def screenshot(tmp_path) -> Path:
    """Where the chat test saves its picture: ``$KVQ_SCREENSHOT`` (``make screenshot``), else a temporary file."""
    return Path(os.environ.get("KVQ_SCREENSHOT") or tmp_path / "screenshot.png")


def test_chat_both_panes_fill(page, screenshot):
    page.get_by_role("button", name="Sampling").click()
    _set_slider(page, "max-new-tokens", 40)
    page.get_by_text(QUESTION).first.click()  # an example question fills the message box
    expect(page.locator("#msg textarea")).to_have_value(re.compile(QUESTION), timeout=15_000)
    page.click("#send")
    for pane in ("left", "right"):
        page.wait_for_function(
            f"() => {{ const s = document.querySelector('#{pane}-stats'); "
            "return s && s.innerText.includes('tokens/s') && !s.innerText.includes('generating'); }",
            timeout=120_000,
        )
    assert _bot_text(page, "left-chat").strip() and _bot_text(page, "right-chat").strip()
    expect(page.locator("#msg textarea")).to_have_value("")
    page.get_by_role("button", name="Sampling").click()  # fold it again for the picture
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 20_000


def test_memory_gauges_update(page):
    page.get_by_role("tab", name="Memory").click()
    page.wait_for_selector("#gauges .gauge-fill")
    first = page.locator("#gauges .gauge-time").inner_text()
    page.wait_for_function(
        "t => { const e = document.querySelector('#gauges .gauge-time'); return e && e.innerText !== t; }",
        arg=first, timeout=15_000,
    )
    gauges = page.locator("#gauges").inner_text()
    assert "KV fp16 (left)" in gauges and "this conversation:" in gauges and "KV pool fp16" in gauges
    banner = page.locator("#nvml-banner").inner_text()
    assert "GPU" in gauges or "NVIDIA" in banner


def test_tiny_calibration_from_the_sliders(page):
    page.get_by_role("tab", name="Calibrate").click()
    _set_slider(page, "calib-samples", 2)
    _set_slider(page, "calib-seqlen", 64)
    page.click("#calib-run")
    page.wait_for_function(
        "() => document.querySelector('#calib-status')?.innerText.includes('Calibrated')", timeout=180_000
    )
    assert "2 samples x 64 tokens" in page.locator("#calib-status").inner_text()
    page.wait_for_selector("#k-heatmap img")
    files = page.locator("#calib-files").inner_text().replace("\n", "")  # names wrap before the extension
    assert "kv_qparams.safetensors" in files and "kv_cache_scales.safetensors" in files
    page.click("#calib-use")
    page.get_by_role("tab", name="Chat").click()
    # the dropdown shows the mode's label ("ours · int8-qk — 0.53x fp16 · needs calibration"), its value is int8-qk
    page.wait_for_function("() => document.querySelector('#kv-mode input')?.value.includes('· int8-qk —')")
