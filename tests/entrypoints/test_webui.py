"""The chat page in a real headless Chromium: streamed reply, tokens/s figure, stop button.

Driven with selenium through Debian's `chromium` and `chromium-driver` (the set-up
installs them when missing). Screenshots land in test-artifacts/ for a person to look at.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.entrypoints.conftest import metric_value, wait_for

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("chromium and chromedriver are missing: run `make setup`")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,900")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _text(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[-1].text if found else ""


def test_chat_page_streams_a_reply_and_stops_it(browser, server):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(server.url + "/")
    assert wait_for(lambda: _text(browser, "#model") == "smol", timeout=10)

    # A short reply, to the end: text streams in, then the stats line shows tokens/s.
    browser.execute_script("document.getElementById('max-tokens').value = '24'")
    browser.execute_script("document.getElementById('temperature').value = '0'")
    browser.find_element(By.ID, "input").send_keys("Name three colours.")
    browser.find_element(By.ID, "send").click()
    assert wait_for(lambda: _text(browser, ".message.assistant") != "", timeout=30)
    assert wait_for(lambda: "tokens/s" in _text(browser, ".message.assistant .stats"), 60)
    assert wait_for(lambda: browser.find_element(By.ID, "send").is_displayed(), 60)
    stats = _text(browser, ".message.assistant .stats")
    assert "TTFT" in stats and "24 tokens" in stats, stats
    browser.save_screenshot(str(ARTIFACTS / "webui.png"))

    # A long reply, stopped midway: the page says so and the server frees the request.
    browser.execute_script("document.getElementById('max-tokens').value = '1500'")
    browser.find_element(By.ID, "input").send_keys("Write a long story about a lighthouse.")
    browser.find_element(By.ID, "send").click()
    reply = ".message.assistant:last-child .content"
    assert wait_for(lambda: len(_text(browser, reply)) > 80, 60)  # well into the reply
    browser.find_element(By.ID, "stop").click()
    assert wait_for(lambda: "stopped" in _text(browser, ".message.assistant .stats"), 10)
    stopped_at = _text(browser, reply)
    time.sleep(1.0)
    assert _text(browser, reply) == stopped_at  # nothing more streams in
    tokens = int(_text(browser, ".message.assistant .stats").split(" tokens")[-2].split()[-1])
    assert 10 < tokens < 1500  # stopped midway, not at max_tokens

    import httpx

    def idle() -> bool:
        text = httpx.get(server.url + "/metrics").text
        return metric_value(text, "pagedllm:num_requests_running") == 0

    assert wait_for(idle, timeout=10)

    browser.set_window_size(390, 844)  # a phone's width
    browser.save_screenshot(str(ARTIFACTS / "webui-phone.png"))
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390  # nothing overflows sideways
