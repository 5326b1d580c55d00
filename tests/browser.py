"""Headless Debian Chromium driven by selenium (chromium-driver) for the map tests: console, network, pixels.

WebGL runs on SwiftShader (``--enable-unsafe-swiftshader``); the browser log (console messages, failed
loads) and the performance log (every network response with its status) are read back through
chromedriver. Chromium and chromedriver are Debian's (``.ci/run`` installs them); the paths are fixed so
selenium never looks for or downloads a driver.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

CHROMIUM = os.environ.get("PIXELS_XR_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PIXELS_XR_CHROMEDRIVER", "/usr/bin/chromedriver")
WIDTH, HEIGHT = 1000, 720


class Browser:
    """One headless Chromium session; ``close()`` ends it."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--use-gl=angle",
                    f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1", "--no-first-run",
                    "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                    "--proxy-server=direct://"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_script_timeout(60)

    def close(self) -> None:
        self.driver.quit()

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        """Poll ``predicate`` until truthy; after ``timeout`` fail naming ``what`` and the page's errors."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; page errors: {self.page_errors()}; "
                             f"console: {self.console()}")

    def idle_count(self) -> int:
        return int(self.js("return window.pixelsXr ? window.pixelsXr.idle : 0") or 0)

    def wait_idle(self, after: int = 0) -> None:
        """Wait for the map's ``idle`` event after ``after`` earlier ones, with every tile loaded."""
        self.wait(lambda: self.idle_count() > after and self.js(
            "const m = window.pixelsXr.map; return m.loaded() && m.areTilesLoaded()"), "the map's idle event")

    def page_errors(self) -> list[str]:
        return list(self.js("return window.pixelsXr ? window.pixelsXr.errors : []") or [])

    def console(self) -> list[dict]:
        """Console messages and failed loads since the last call."""
        return self.driver.get_log("browser")

    def responses(self) -> list[tuple[str, int]]:
        """(url, status) of every network response since the last call."""
        out = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.responseReceived":
                response = message["params"]["response"]
                out.append((response["url"], int(response["status"])))
        return out

    def canvas(self) -> np.ndarray:
        """The map canvas as the user sees it: (H, W, 3) uint8 from a screenshot of its element."""
        from PIL import Image
        from selenium.webdriver.common.by import By

        png = self.driver.find_element(By.CSS_SELECTOR, "#map canvas").screenshot_as_png
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
