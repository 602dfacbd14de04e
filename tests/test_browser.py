"""The real upload -> prediction -> heatmap path in headless Chromium (Debian's chromium package).

Skips with a reason where Chromium, its driver or selenium is missing; `.ci/run` installs them.
Screenshots go to $SECONDLOOK_ARTIFACTS (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, encode, make_dicom, synthetic_slice

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ("--headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update "
         "--disable-sync --no-first-run --disable-dev-shm-usage --window-size=1400,1800").split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the app did not start within 60 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for_text(driver, text: str, timeout: float = 120.0) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if text in body:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{text!r} did not appear; page says: {body[:2000]}")


def wait_for_either(driver, first: str, second: str, timeout: float = 120.0) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if first in body or second in body:
            return body
        time.sleep(0.5)
    raise AssertionError(f"neither {first!r} nor {second!r} appeared; page says: {body[:2000]}")


def wait_for_upload_input(driver, timeout: float = 120.0):
    """The file input appears once the page's model has loaded."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        inputs = driver.find_elements(By.CSS_SELECTOR, "input[type=file]")
        if inputs:
            return inputs[0]
        time.sleep(0.5)
    raise AssertionError("no upload field appeared")


def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SECONDLOOK_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.parametrize(
    "page,filename,make",
    [
        ("Brain_MRI", "scan.png", lambda: encode(synthetic_slice(200, seed=11))),
        ("Lung_CT", "slice.dcm", lambda: make_dicom(((synthetic_slice(128, seed=3).astype("int16") * 8)))),
    ],
)
def test_upload_shows_prediction_and_heatmap(server, browser, tmp_path: Path, page: str, filename: str, make) -> None:
    from selenium.webdriver.common.by import By

    upload = tmp_path / filename
    upload.write_bytes(make())
    browser.get(f"{server}/{page}")
    wait_for_text(browser, "not for diagnosis")
    wait_for_upload_input(browser).send_keys(str(upload))
    body = wait_for_either(browser, "Model output:", "Not classified")
    if "Model output:" not in body:  # a synthetic image may be flagged by the wrong-input guard
        browser.find_element(By.XPATH, "//*[contains(text(), \"Show the model's output anyway\")]").click()
        body = wait_for_text(browser, "Model output:")
    wait_for_text(browser, "Grad-CAM for")
    deadline = time.time() + 60
    while time.time() < deadline:
        images = [img for img in browser.find_elements(By.TAG_NAME, "img") if img.size["width"] > 100]
        if len(images) >= 2:
            break
        time.sleep(0.5)
    assert len(images) >= 2, "original and overlay should both be shown"
    assert "Traceback" not in body
    browser.save_screenshot(str(artifacts(tmp_path) / f"{page}.png"))


def test_bad_upload_gets_a_message_in_the_browser(server, browser, tmp_path: Path) -> None:
    upload = tmp_path / "report.png"
    upload.write_bytes(b"%PDF-1.4 this is a report, not an image")
    browser.get(f"{server}/Brain_MRI")
    wait_for_text(browser, "not for diagnosis")
    wait_for_upload_input(browser).send_keys(str(upload))
    body = wait_for_text(browser, "not a readable image")
    assert "Traceback" not in body
