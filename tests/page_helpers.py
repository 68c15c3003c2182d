"""Driving `serve`'s drift page in a real browser: headless Chromium from Debian (`chromium`, with Debian's
`chromium-driver`; Selenium is told where both are, so its manager downloads nothing), downloads into a
folder of the test's, and the plotted points read back from the rendered SVG."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from conftest import need

# Two user turns; the first one this model answers briefly (its reply ends by itself).
TURNS = ("Say hello in one short sentence.", "Name one colour.")


def browser(downloads: Path):
    need(
        shutil.which("chromium") is not None and shutil.which("chromedriver") is not None,
        "the page tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    )
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,950"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


class Page:
    """The page at `base` (the server's root) in `driver`, its downloads in `downloads`."""

    def __init__(self, driver, base: str, downloads: Path, key: str | None = None):
        from selenium.webdriver.common.by import By

        self.driver, self.downloads, self.by = driver, downloads, By
        driver.get(base + "/")
        if key:
            field = self.find("#key")
            field.send_keys(key)
            driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
        self.wait(lambda: self.find("#setting").get_attribute("value"), "the settings to load")

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def wait(self, condition, what: str, seconds: float = 240):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        status = self.find("#status").text
        raise AssertionError(f"waited {seconds} s for {what}; the page says {status!r}")

    def type(self, field: str, text: str) -> None:
        self.find(field).clear()
        self.find(field).send_keys(text)

    def choose(self, select: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.find(select)).select_by_value(value)

    def send(self, text: str) -> None:
        self.find("#message").send_keys(text)
        self.find("#send").click()
        self.wait(lambda: self.find("body").get_attribute("data-busy") == "false", "the replies")
        assert not self.find("#status").text, self.find("#status").text

    def points(self, setting: str) -> dict[tuple[int, int], float]:
        """(assistant turn, layer) -> the plotted projection, from the SVG's points."""
        circles = self.driver.find_elements(self.by.CSS_SELECTOR, f'#plot circle.point[data-setting="{setting}"]')
        return {
            (int(c.get_attribute("data-turn")), int(c.get_attribute("data-layer"))): float(
                c.get_attribute("data-value")
            )
            for c in circles
        }

    def finished(self, setting: str) -> list[str]:
        """Why each reply of the setting's column ended ("stop", "length")."""
        notes = self.driver.find_elements(self.by.CSS_SELECTOR, f'.column[data-setting="{setting}"] .assistant')
        return [n.get_attribute("data-finish") for n in notes]

    def taus(self, setting: str) -> dict[int, float]:
        lines = self.driver.find_elements(self.by.CSS_SELECTOR, f'#plot line.tau[data-setting="{setting}"]')
        return {int(line.get_attribute("data-layer")): float(line.get_attribute("data-value")) for line in lines}

    def transcript(self, setting: str) -> list[str]:
        messages = self.driver.find_elements(self.by.CSS_SELECTOR, f'.column[data-setting="{setting}"] .message')
        return [m.text for m in messages]

    def download(self, button: str, name: str) -> Path:
        target = self.downloads / name
        target.unlink(missing_ok=True)
        self.find(button).click()
        self.wait(lambda: target.is_file() and target.stat().st_size > 0, f"{name} to download", 30)
        time.sleep(0.3)  # written whole (Chromium renames a finished download into place)
        return target

    def load(self, path: Path) -> None:
        self.driver.execute_script("arguments[0].hidden = false", self.find("#file"))
        self.find("#file").send_keys(str(path))


def project(conversation: Path, model_dir: Path, axis: Path, *cap: str) -> dict[tuple[int, int], float]:
    """`assistant-axis project` of a saved conversation: (assistant turn, layer) -> its projection."""
    out = conversation.with_suffix(".parquet")
    command = [sys.executable, "-m", "assistant_axis.cli", "project", str(conversation), "--model", str(model_dir)]
    subprocess.run([*command, "--axis", str(axis), *cap, "--out", str(out)], check=True, capture_output=True)
    frame = pd.read_parquet(out)
    replies = frame[frame["role"] == "assistant"]
    order = {turn: i + 1 for i, turn in enumerate(sorted(replies["turn"].unique()))}
    return {
        (order[t], int(layer)): float(v)
        for t, layer, v in zip(replies["turn"], replies["layer"], replies["projection"], strict=True)
    }


def messages(path: Path) -> list[dict]:
    return json.loads(path.read_text())
