"""The real upload -> prediction -> heatmap path in headless Chromium (Debian's chromium package).

Skips with a reason where Chromium, its driver or selenium is missing; `.ci/run` installs them.
Screenshots go to $SECONDLOOK_ARTIFACTS (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from benchmarks.server import serve
from tests.conftest import encode, head_ct_dicom, make_dicom, synthetic_slice

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ("--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update "
         "--disable-sync --no-first-run --disable-dev-shm-usage --window-size=1400,1800").split()


@pytest.fixture(scope="module")
def server():
    try:
        with serve(timeout=90) as running:
            yield running.url
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait_for(condition, what: str, timeout: float = 60.0, page=None):
    """Poll `condition` until it returns something truthy; fail naming `what` (and the page's text)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    text = page_text(page) if page is not None else ""
    said = f"; page says: {text[:1000]} [...] {text[-2000:]}" if len(text) > 3000 else f"; page says: {text}" if text else ""
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s{said}")


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_either(driver, first: str, second: str, timeout: float = 120.0) -> str:
    """The page's text once it shows `first` or `second`."""
    def shown() -> str | None:
        body = page_text(driver)
        return body if first in body or second in body else None

    return wait_for(shown, f"{first!r} or {second!r} appearing", timeout, page=driver)


def wait_for_text(driver, text: str, timeout: float = 120.0) -> str:
    return wait_for_either(driver, text, text, timeout)


def wait_for_upload_input(driver, timeout: float = 120.0):
    """The file input appears once the page's model has loaded."""
    from selenium.webdriver.common.by import By

    return wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "input[type=file]"), "the upload field appearing",
                    timeout, page=driver)[0]


def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SECONDLOOK_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


VIEWER_JS = """
for (const gd of document.querySelectorAll('.js-plotly-plot')) {
  if (gd.data && gd.data.length === 2 && gd.data.every(t => t.type === 'image')) { return gd; }
}
return null;
"""


def click_button(driver, text: str) -> bool:
    """Click the first current button whose text contains `text`, in one step (the page may re-render
    between two); a button left over from the previous run (Streamlit marks it data-stale) is not clicked."""
    return driver.execute_script(
        "for (const b of document.querySelectorAll('button')) {"
        " if (b.innerText.includes(arguments[0]) && !b.disabled && !b.closest('[data-stale=\"true\"]')) {"
        " b.click(); return true; } } return false;", text)


def overlay_source(driver) -> str:
    """The overlay the synced viewer has drawn: the href of the second <image> plotly rendered."""
    return driver.execute_script(VIEWER_JS.replace("return gd;", "const drawn = gd.querySelectorAll('image');"
                                                   " return drawn.length === 2 ? drawn[1].getAttribute('href') : '';")) or ""


def viewer_ranges(driver) -> list:
    """[x range, y range, x2 range, y2 range] of the viewer's axes as plotly holds them."""
    return driver.execute_script(VIEWER_JS.replace(
        "return gd;", "const l = gd._fullLayout; return [l.xaxis.range, l.yaxis.range, l.xaxis2.range, l.yaxis2.range];"))


@pytest.mark.parametrize("path,title", [("", "SecondLook"), ("brain-mri", "Brain MRI"), ("chest-x-ray", "Chest X-ray"),
                                        ("lung-ct", "Lung CT"), ("head-ct", "Head CT"), ("model-cards", "Model cards"),
                                        ("batch", "Batch")])
def test_every_page_opens(server, browser, path: str, title: str) -> None:
    browser.get(f"{server}/{path}")
    body = wait_for_text(browser, "not for diagnosis")
    assert title in body and "Traceback" not in body


def pick(browser, label: str, option: str) -> None:
    """Choose `option` in the select box labelled `label`."""
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.CSS_SELECTOR, f"input[role='combobox'][aria-label='{label}']")
    box.find_element(By.XPATH, "following-sibling::button").click()
    wait_for(lambda: [o for o in browser.find_elements(By.CSS_SELECTOR, "[role='option']") if o.text == option],
             f"the {label} list opening")[0].click()


@pytest.mark.parametrize(
    "page,filename,make,output",
    [
        ("brain-mri", "scan.png", lambda: encode(synthetic_slice(200, seed=11)), None),
        ("chest-x-ray", "chest.png", lambda: encode(synthetic_slice(300, seed=12)), None),
        ("lung-ct", "slice.dcm", lambda: make_dicom(((synthetic_slice(128, seed=3).astype("int16") * 8))), None),
        ("head-ct", "IMG0007.dcm", head_ct_dicom, "skull fracture"),  # a finding of the multi-label model
    ],
)
def test_upload_heatmap_controls_and_download(server, browser, tmp_path: Path, page: str, filename: str, make,
                                              output: str | None) -> None:
    """Upload -> prediction -> heatmap (of a chosen output); move the opacity slider; pick another method;
    download the PNG and the PDF."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    upload = tmp_path / filename
    upload.write_bytes(make())
    browser.get(f"{server}/{page}")
    wait_for_text(browser, "not for diagnosis")
    wait_for_upload_input(browser).send_keys(str(upload))
    body = wait_for_either(browser, "Model output:", "Not classified")
    if "Model output:" not in body:  # a synthetic image may be flagged by the wrong-input guard
        browser.find_element(By.XPATH, "//*[contains(text(), \"Show the model's output anyway\")]").click()
        body = wait_for_text(browser, "Model output:")
    wait_for_text(browser, "CAM for '")
    if output is not None:
        pick(browser, "Explain output", output)
        wait_for_text(browser, f"for '{output}'")
    first = wait_for(lambda: overlay_source(browser), "the overlay appearing")
    assert "Traceback" not in body
    shots = artifacts(tmp_path)
    browser.save_screenshot(str(shots / f"{page}-result.png"))

    opacity = browser.find_element(By.CSS_SELECTOR, "input[type='range'][aria-label='Heatmap opacity']")
    browser.execute_script("arguments[0].focus();", opacity)
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT).perform()
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "input[type='range'][aria-label='Heatmap opacity']")
             .get_attribute("value") == "0.55", "the opacity slider moving to 0.55")
    moved = wait_for(lambda: (src := overlay_source(browser)) and src != first and src, "the overlay re-blending")

    pick(browser, "Method", "LayerCAM")
    wait_for_text(browser, "LayerCAM for")
    wait_for(lambda: (src := overlay_source(browser)) and src != moved, "the LayerCAM overlay")
    browser.save_screenshot(str(shots / f"{page}-layercam.png"))

    before = set(browser.downloads.iterdir())
    wait_for(lambda: click_button(browser, "Download the overlay"), "the download button")
    saved = wait_for(lambda: [p for p in set(browser.downloads.iterdir()) - before if p.suffix == ".png"],
                     "the PNG download")[0]
    assert saved.name.startswith("secondlook-") and "layercam" in saved.name
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = set(browser.downloads.iterdir())
    wait_for(lambda: click_button(browser, "one-page report"), "the report button")
    report = wait_for(lambda: [p for p in set(browser.downloads.iterdir()) - before if p.suffix == ".pdf"],
                      "the PDF download")[0]
    assert report.read_bytes()[:5] == b"%PDF-" and filename.split(".")[0] not in report.name
    body = page_text(browser)
    assert "Traceback" not in body and "LayerCAM for" in body


def test_zooming_one_viewer_panel_zooms_the_other(server, browser, tmp_path: Path) -> None:
    """Drag a zoom box on the image: the overlay panel follows to the same region."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    upload = tmp_path / "zoom.png"
    upload.write_bytes(encode(synthetic_slice(200, seed=11)))
    browser.get(f"{server}/brain-mri")
    wait_for_text(browser, "not for diagnosis")
    wait_for_upload_input(browser).send_keys(str(upload))
    if "Model output:" not in wait_for_either(browser, "Model output:", "Not classified"):
        browser.find_element(By.XPATH, "//*[contains(text(), \"Show the model's output anyway\")]").click()
    wait_for(lambda: overlay_source(browser), "the viewer drawing the overlay")
    wait_for_text(browser, "Faithfulness (ROAD)")  # the fragment has finished drawing
    before = viewer_ranges(browser)
    assert before[0] == before[2] and before[1] == before[3]
    drag = wait_for(lambda: browser.execute_script(VIEWER_JS.replace(
        "return gd;", "return gd.querySelector(\".nsewdrag[data-subplot='xy']\");")), "the viewer's drag layer")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", drag)
    ActionChains(browser).move_to_element_with_offset(drag, -60, -60).click_and_hold().pause(0.2) \
        .move_by_offset(20, 15).pause(0.1).move_by_offset(20, 15).pause(0.1).move_by_offset(40, 30).pause(0.2) \
        .release().perform()
    after = wait_for(lambda: (r := viewer_ranges(browser)) != before and r, "the zoom taking effect")
    assert after[0] == after[2] and after[1] == after[3]  # both panels show the same region
    assert abs(after[0][1] - after[0][0]) < abs(before[0][1] - before[0][0]) / 2  # and it is a zoom
    browser.save_screenshot(str(artifacts(tmp_path) / "viewer-zoomed.png"))


def test_bad_upload_gets_a_message_in_the_browser(server, browser, tmp_path: Path) -> None:
    upload = tmp_path / "report.png"
    upload.write_bytes(b"%PDF-1.4 this is a report, not an image")
    browser.get(f"{server}/brain-mri")
    wait_for_text(browser, "not for diagnosis")
    wait_for_upload_input(browser).send_keys(str(upload))
    body = wait_for_text(browser, "not a readable image")
    assert "Traceback" not in body


FIRST_SCREEN_JS = """
const inView = r => r && r.width > 0 && r.top >= 0 && r.bottom <= window.innerHeight + 1;
let viewer = null;
for (const gd of document.querySelectorAll('.js-plotly-plot')) {
  if (gd.data && gd.data.length === 2 && gd.data.every(t => t.type === 'image')) { viewer = gd; }
}
const panels = viewer ? [...viewer.querySelectorAll('image')].map(i => i.getBoundingClientRect()) : [];
let call = null;
for (const h of document.querySelectorAll('h3')) { if (h.innerText.startsWith('Model output:')) { call = h; } }
const callBox = call ? call.getBoundingClientRect() : null;
return {height: window.innerHeight, width: window.innerWidth, scroll: window.scrollY,
        panels: panels.map(r => [r.left, r.top, r.right, r.bottom]), panelsInView: panels.map(inView),
        call: callBox ? [callBox.left, callBox.top, callBox.right, callBox.bottom] : null, callInView: inView(callBox),
        callText: call ? call.innerText : null};
"""


def first_screen_upload(browser, server: str, page: str, upload: Path) -> dict:
    """Open a page at 1400 x 1000, upload, and report where the image, the heatmap and the call are on the first
    screen (no scrolling)."""
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/{page}")
    wait_for_text(browser, "not for diagnosis")
    wait_for_upload_input(browser).send_keys(str(upload))
    if "Model output:" not in wait_for_either(browser, "Model output:", "Not classified"):
        browser.find_element(By.XPATH, "//*[contains(text(), \"Show the model's output anyway\")]").click()
        wait_for_text(browser, "Model output:")
    wait_for(lambda: overlay_source(browser), "the viewer drawing the overlay")
    browser.execute_script("window.scrollTo(0, 0);")
    return wait_for(lambda: (p := browser.execute_script(FIRST_SCREEN_JS)) and len(p["panels"]) == 2 and p,
                    "the viewer's two panels")


@pytest.mark.parametrize("page,make", [
    ("brain-mri", lambda: real_or_synthetic("brain_mri")),
    ("head-ct", head_ct_dicom),
])
def test_the_first_screen_holds_image_heatmap_and_call(server, browser, tmp_path: Path, page: str, make) -> None:
    """At 1400 x 1000, without scrolling: the image and its heatmap (the viewer's two panels) and the call with its
    probability are all on screen, the heatmap beside the image and the call beside them."""
    upload = tmp_path / ("scan.dcm" if page == "head-ct" else "scan.webp")
    upload.write_bytes(make())
    # the viewport itself 1400 x 1000 (a window of that size loses some of it to the browser's frame)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    try:
        where = first_screen_upload(browser, server, page, upload)
        browser.save_screenshot(str(artifacts(tmp_path) / f"first-screen-{page}.png"))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert where["height"] == 1000 and where["width"] == 1400, where
    assert all(where["panelsInView"]), where
    assert where["callInView"] and "%" in where["callText"], where
    (left_image, _, right_image, _), (left_map, _, _, _) = where["panels"][0], where["panels"][1]
    assert right_image <= left_map + 2, where  # heatmap beside the image
    assert where["call"][0] >= where["panels"][1][2] - 2, where  # the call beside them, to the right


def real_or_synthetic(key: str) -> bytes:
    """A real held-out-like image of the model's data where the folder is present, else a synthetic slice."""
    from tests.conftest import DATA_ROOT

    folder = DATA_ROOT / key / "train"
    files = sorted(folder.glob("*/*.webp")) if folder.is_dir() else []
    return files[len(files) // 2].read_bytes() if files else encode(synthetic_slice(256, seed=21))
