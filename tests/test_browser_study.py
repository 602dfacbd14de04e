"""The study view in headless Chromium: upload a series ZIP, click the strip, step with the keyboard, jump to a
key slice, show the slice heatmap, download the study report.

Reuses the server, browser and waiting helpers of tests/test_browser.py; skips where Chromium is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.study import series_files, zip_files
from ui.navigation import url_path
from tests.test_browser import (  # noqa: F401 - the fixtures are used by name
    artifacts,
    browser,
    click_button,
    overlay_source,
    page_text,
    server,
    wait_for,
    wait_for_text,
    wait_for_upload_input,
)

STRIP_JS = """
for (const gd of document.querySelectorAll('.js-plotly-plot')) {
  if (gd.data && gd.data.length && gd.data[0].type === 'bar' && (gd.data[0].hovertemplate || '').startsWith('slice')) {
    return gd;
  }
}
return null;
"""


def shown_slice(browser) -> int | None:
    """The slice the page shows, from its "Slice N of M" line."""
    found = re.search(r"Slice (\d+) of (\d+):", page_text(browser))
    return int(found.group(1)) if found else None


def strip_bar(browser, number: int):
    """The strip's bar of slice `number` (1-based), as drawn."""
    return browser.execute_script(STRIP_JS.replace(
        "return gd;", f"return gd.querySelectorAll('g.trace.bars g.point path')[{number - 1}] || null;"))


def test_study_zip_strip_click_keyboard_key_slice_heatmap_and_report(server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    upload = tmp_path / "study.zip"
    upload.write_bytes(zip_files(series_files(16, 128)))
    # A fresh server's very first page view may come up as "Page not found" (the models load first): open the
    # home page first, then the task page.
    browser.get(server)
    wait_for_text(browser, "not for diagnosis")
    browser.get(f"{server}/{url_path('Head CT')}")
    wait_for_text(browser, "not for diagnosis")
    assert "Page not found" not in page_text(browser)
    wait_for_upload_input(browser).send_keys(str(upload))
    body = wait_for_text(browser, "Study call:", timeout=180)
    assert "Traceback" not in body and "16 slices read by the model" in body
    first = wait_for(lambda: shown_slice(browser), "the shown slice's line")
    shots = artifacts(tmp_path)
    browser.save_screenshot(str(shots / "study-opened.png"))

    # a click on the strip shows that slice
    target = 3 if first != 3 else 5
    bar = wait_for(lambda: strip_bar(browser, target), "the strip's bars")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", bar)
    ActionChains(browser).move_to_element(bar).click().perform()
    wait_for(lambda: shown_slice(browser) == target, f"slice {target} shown after a click on its bar", page=browser)

    # the slider steps with the keyboard
    slider = browser.find_element(By.CSS_SELECTOR, "input[type='range'][aria-label='Slice']")
    browser.execute_script("arguments[0].focus();", slider)
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    wait_for(lambda: shown_slice(browser) == target + 1, "the arrow key stepping one slice", page=browser)

    # a key slice button jumps to it
    key = wait_for(lambda: [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.startswith("Key slice")],
                   "the key slice buttons")[-1]
    number = int(key.text.split()[-1])
    wait_for(lambda: click_button(browser, key.text), "the key slice button")
    wait_for(lambda: shown_slice(browser) == number, f"key slice {number} shown", page=browser)

    # the heatmap of the shown slice, on demand
    browser.find_element(By.XPATH, "//*[contains(text(), 'Heatmap of this slice')]").click()
    wait_for_text(browser, "CAM for '")
    wait_for(lambda: overlay_source(browser), "the slice's overlay appearing")
    browser.save_screenshot(str(shots / "study-heatmap.png"))

    # the study report
    before = set(browser.downloads.iterdir())
    wait_for(lambda: click_button(browser, "Download the study report"), "the study report button")
    report = wait_for(lambda: [p for p in set(browser.downloads.iterdir()) - before if p.suffix == ".pdf"],
                      "the study report download", timeout=90)[0]
    assert report.read_bytes()[:5] == b"%PDF-" and "study" in report.name
    assert "Traceback" not in page_text(browser)
