"""The dashboard in a real headless Chromium against a real gateway and a real node runtime: sign in,
watch a job's curves grow while it trains, read its logs, download another job's weights, cancel it from
the page, see the node. Debian's ``chromium`` and ``chromium-driver`` (scripts/test installs them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DIGITS_SPEC, REPO, bearer
from tests.node_runtime.node_harness import Api, NodeProcess, long_digits, wait_until

pytestmark = pytest.mark.timeout(180)

KEY_STORAGE = "cyxwiz.api_key"
# A name that would be markup if the page ever parsed server strings as HTML.
HOSTILE_NAME = "<img src=x id=pwned onerror=alert(1)> & \"digits\""


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("needs Debian's chromium and chromium-driver on PATH; scripts/test installs them with apt "
                    "when run as root")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options,
                              service=Service(chromedriver, log_output=str(tmp_path / "chromedriver.log")))
    # the page itself 1280x800 (the window's size includes the browser's own bars)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver: Any, css: str) -> str:
    """The text of the first element ``css`` finds ("" if none), read again if the page redrew it meanwhile
    (tables are rebuilt every two seconds)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def read() -> tuple[str] | None:
        try:
            found = driver.find_elements("css selector", css)
            return (str(found[0].text) if found else "",)
        except StaleElementReferenceException:
            return None

    steady = wait_until(read, 10, what=f"a steady {css}")
    assert steady is not None
    return steady[0]


def points(driver: Any, chart: str = "loss-chart") -> int:
    return int(driver.find_element("id", chart).get_attribute("data-points"))


def click(driver: Any, css: str) -> None:
    """Click an element of a table the page redraws every two seconds (found again if it was replaced, waited
    for if it is not drawn yet)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def clicked() -> bool:
        try:
            driver.find_element("css selector", css).click()
        except (NoSuchElementException, StaleElementReferenceException):  # not drawn yet, or redrawn
            return False
        return True

    wait_until(clicked, 20, what=f"a click on {css}")


def sign_in(driver: Any, key: str) -> None:
    field = driver.find_element("id", "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element("id", "sign-in-button").click()


def test_dashboard_follows_cancels_and_downloads(browser: Any, api: Api, api_url: str, creds: dict[str, str],
                                                 start_node: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node = start_node(slots=2, name="dash-node")
    api.wait_nodes(1)
    long_job = api.submit(long_digits(epochs=3000, name="digits-mlp-long"))
    short_job = api.submit({**DIGITS_SPEC, "name": HOSTILE_NAME, "training": {"epochs": 2}})

    browser.get(f"{api_url}/ui")
    sign_in(browser, "cwk_wrong-key")
    wait_until(lambda: text_of(browser, "#error") == "unknown API key", 20, what="the API's error message")
    assert browser.find_element("id", "dashboard").is_displayed() is False
    sign_in(browser, creds["api_key"])
    wait_until(lambda: browser.find_element("id", "dashboard").is_displayed(), 20, what="the dashboard")
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_STORAGE}')") == creds["api_key"]
    assert browser.execute_script("return localStorage.length") == 0

    # the jobs table: a hostile name shows as text, never as markup
    wait_until(lambda: text_of(browser, f"#jobs-body tr[data-job-id='{short_job}'] td.name") == HOSTILE_NAME, 20,
               what="the job's row with its name as text")
    assert browser.find_elements("id", "pwned") == []
    assert text_of(browser, f"#jobs-body tr[data-job-id='{long_job}'] td:nth-child(2)") == "digits-mlp-long"

    # the running job's page, linkable by its hash: the curves gain points while it trains
    click(browser, f"#jobs-body tr[data-job-id='{long_job}'] a")
    assert browser.current_url.endswith(f"#job={long_job}")
    wait_until(lambda: text_of(browser, "#job-status") == "running", 60, what="the job page to show it running")
    first = wait_until(lambda: points(browser), 60, what="the loss chart's first points")
    wait_until(lambda: points(browser) > first + 2, 60, what="the loss chart to grow while the job trains")
    assert points(browser, "accuracy-chart") > 0
    assert browser.find_elements("css selector", "#loss-chart polyline[data-series='loss']")
    wait_until(lambda: text_of(browser, "#job-facts dd[data-field='name']") == "digits-mlp-long", 20,
               what="the job's facts")
    wait_until(lambda: "loss" in text_of(browser, "#job-metrics"), 20, what="the job's metrics")
    assert "dash-node" in text_of(browser, "#attempts-body")

    logs = httpx.get(f"{api_url}/v1/jobs/{long_job}/logs", params={"tail": "200"}, headers=bearer(creds["api_key"]))
    if logs.status_code == 200:  # the logs endpoint exists (issue 12 part 2): a line of it shows on the page
        line = wait_until(lambda: next(iter(api.http.get(f"/v1/jobs/{long_job}/logs", params={"tail": "200"},
                                                         headers=api.headers).text.splitlines()), ""),
                          60, what="a log line of the job")
        wait_until(lambda: line in text_of(browser, "#job-logs"), 20, what="the log line on the page")
    else:
        assert text_of(browser, "#job-logs") == "no logs yet"

    wait_until(lambda: "dash-node" in text_of(browser, "#nodes-body"), 20, what="the node in the nodes table")
    node_row = text_of(browser, "#nodes-body tr")
    assert "online" in node_row and "/2" in node_row
    assert text_of(browser, "#queue-body tr[data-class='cpu']").startswith("cpu")

    screenshot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    if os.environ.get("CYXWIZ_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, REPO / "docs" / "dashboard.png")

    # the short job's weights, through the page's button, byte for byte
    api.wait_status(short_job, ("completed",), 60)
    browser.get(f"{api_url}/ui#job={short_job}")  # a link to a job page opens it (signed in: same tab)
    wait_until(lambda: text_of(browser, "#job-status") == "completed", 20, what="the short job's page")
    wait_until(lambda: text_of(browser, "#job-facts dd[data-field='name']") == HOSTILE_NAME, 20,
               what="the hostile name as text on the job page")
    assert browser.find_elements("id", "pwned") == []
    button = browser.find_element("id", "download-button")
    wait_until(lambda: button.is_enabled(), 20, what="the download button")
    button.click()
    saved = tmp_path / "downloads" / f"{short_job}.safetensors"
    wait_until(saved.exists, 30, what="the downloaded weights")
    assert saved.read_bytes() == api.artifact(short_job)
    browser.refresh()  # a reload keeps the key (sessionStorage) and reopens the job its address names
    wait_until(lambda: text_of(browser, "#job-status") == "completed", 20, what="the job page after a reload")
    wait_until(lambda: points(browser) > 0, 20, what="a finished job's curves")

    # cancel the long job from its page
    click(browser, f"#jobs-body tr[data-job-id='{long_job}'] td.name")  # the row opens it too
    wait_until(lambda: text_of(browser, "#job-status") == "running", 20, what="the long job's page again")
    browser.find_element("id", "cancel-button").click()
    wait_until(lambda: text_of(browser, "#job-status") == "cancelled", 20, what="the page to show it cancelled")
    assert api.job(long_job)["status"] == "cancelled"
    wait_until(lambda: text_of(browser, f"#jobs-body tr[data-job-id='{long_job}'] td:nth-child(4)") == "cancelled",
               20, what="the jobs table to show it cancelled")
    assert not browser.find_element("id", "cancel-button").is_enabled()

    # nothing the page did broke its own Content-Security-Policy or threw
    console = browser.get_log("browser")
    assert [entry for entry in console if "Content Security Policy" in entry["message"]] == []
    assert [entry for entry in console if entry["source"] == "javascript"] == []  # no uncaught script error

    browser.find_element("id", "sign-out").click()
    assert browser.find_element("id", "api-key").is_displayed()
    assert browser.execute_script(f"return sessionStorage.getItem('{KEY_STORAGE}')") is None
    assert node.alive()
