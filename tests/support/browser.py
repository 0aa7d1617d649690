"""A real browser for the console tests: Debian's chromium driven by Selenium through Debian's chromedriver,
headless, with axe-core (npm, installed by `make setup`) for the accessibility check.

Without the browser the tests skip and say how to install it, unless TUNEPLANE_REQUIRE_BROWSER=1 (set by
.ci/run), where a missing browser is a failure: CI must never pass by skipping them."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.config import REPO

INSTALL = "sudo apt-get install -y chromium chromium-driver"
AXE = sorted(REPO.glob("build/axe-core-*/axe.min.js"))
DESKTOP, PHONE = (1280, 800), (390, 844)


def require_browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    if not AXE:
        missing.append("axe-core (make setup)")
    if missing:
        message = f"no {', '.join(missing)} for the browser tests; install with: {INSTALL} (and make setup)"
        if os.environ.get("TUNEPLANE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    assert chromium and driver
    return chromium, driver


def start_browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


class Page:
    """The console in the browser: waits, reads and checks the way every test needs."""

    def __init__(self, driver: Any, base_url: str, shots: Path):
        self.driver, self.base_url, self.shots = driver, base_url, shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, route: str = "") -> None:
        self.driver.get(f"{self.base_url}/console/{route}")

    def go(self, route: str) -> None:
        self.driver.execute_script("window.location.hash = arguments[0]", route)

    def wait(self, condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                found = condition()
                if found:
                    return found
            except Exception as exc:  # the element is not there yet, or went stale between polls
                last = exc
            time.sleep(0.2)
        self.shot(f"timeout-{what.replace(' ', '-')[:40]}")
        raise AssertionError(f"timed out waiting for {what}; last error: {last}")

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def text(self, selector: str = "main") -> str:
        return str(self.css(selector).text)

    def sign_in(self, token: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self.open()
        field = self.wait(lambda: self.css("#token"), what="sign-in form")
        field.send_keys(token, Keys.ENTER)  # the keyboard alone signs in
        self.wait(lambda: self.css("#nav").is_displayed(), what="signed in")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def size(self, width_height: tuple[int, int]) -> None:
        self.driver.set_window_size(*width_height)

    def axe(self) -> list[dict[str, Any]]:
        """axe-core's serious and critical violations on the page as it is now."""
        if self.driver.execute_script("return typeof window.axe") == "undefined":
            # Evaluated in the page's global scope through the DevTools protocol, which the page's CSP (no inline
            # or injected scripts) does not govern.
            self.driver.execute_cdp_cmd("Runtime.evaluate", {"expression": AXE[-1].read_text()})
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations), e => done(String(e)));"
        )
        assert isinstance(result, list), result
        return [
            {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:3]}
            for v in result
            if v["impact"] in ("serious", "critical")
        ]

    def csp_violations(self) -> list[str]:
        """Console messages since the last call that report a Content-Security-Policy refusal."""
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if "Content Security Policy" in entry["message"] or "Refused to" in entry["message"]
        ]


@contextmanager
def browser_session(base_url: str, shots: Path) -> Iterator[Page]:
    driver = start_browser()
    try:
        yield Page(driver, base_url, shots)
    finally:
        driver.quit()
