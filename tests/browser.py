"""A real headless browser for the web page tests: Debian's Chromium driven by Selenium and chromium-driver.

`chromium()` starts one (the test is skipped where neither Chromium nor its
driver is installed, and fails instead under `CI=true`, where `.ci/run`
installs them). Run as a script, it writes the README's screenshot:

    python -m tests.browser docs/web_page.png
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Offline and quiet: no sandbox (CI runs as root), no GPU, no update checks, sync or first-run pages.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")
WAIT_S = 30  # WebDriverWait's limit for the page to react; a wait, not a timing assertion


def _find(*names: str):
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


def chromium(width: int = 1000, height: int = 900):
    """A Selenium WebDriver on the system's headless Chromium (caller quits it)."""
    browser = _find("chromium", "chromium-browser")
    driver = _find("chromedriver", "chromium-driver")
    if browser is None or driver is None:
        message = "Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    # An explicit driver path: Selenium Manager (which would download a driver) never runs.
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message)


def pick_on_page(driver, score: float, genre: str) -> None:
    """What a visitor does: move the slider to `score` with the keyboard, choose `genre`, click the button."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    wait(driver, lambda d: genre in [o.text for o in Select(d.find_element(By.ID, "genre")).options],
         f"the genre menu never listed {genre!r}")
    slider = driver.find_element(By.ID, "score")
    slider.send_keys(Keys.HOME)
    for _ in range(int(score / 0.5)):
        slider.send_keys(Keys.ARROW_RIGHT)
    Select(driver.find_element(By.ID, "genre")).select_by_visible_text(genre)
    driver.find_element(By.ID, "show").click()
    wait(driver, lambda d: d.find_element(By.ID, "review").is_displayed()
         and d.find_element(By.ID, "review-text").text.strip(), "no review appeared after the click")


SCREENSHOT_REVIEWS = (
    (8.0, "Rock", "The guitars arrive like weather, loud and sudden, and the band knows exactly when to get out of "
                  "their way. Halfway through, the drummer drops out and a single voice carries the melody across "
                  "an empty room; it is the best minute of the record.\nNot every song earns its length, but the "
                  "ones that do will be on repeat for a long time."),
    (5.5, "Jazz", "A pleasant set that never quite decides what it wants to be."),
    (3.0, "Electronic", "Glossy, busy and strangely airless."),
)


def write_screenshot(path: str) -> Path:
    """Serve a small store, pick a review in the browser and save the page as a PNG."""
    import tempfile

    from pitchkeras.server import BackgroundServer, ServerConfig
    from pitchkeras.store import Review, open_store, review_id

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/screenshot.db"
        with open_store(uri) as store:
            store.add_reviews([Review(id=review_id("screenshot-v1", {"score": s, "genre": g}, 0, 0), text=t, score=s,
                                      genre=g, model_version="screenshot-v1") for s, g, t in SCREENSHOT_REVIEWS])
        with BackgroundServer(uri, config=ServerConfig(warmup=False), http_port=0) as background:
            driver = chromium(width=900, height=760)
            try:
                driver.get(f"http://127.0.0.1:{background.http_port}/")
                pick_on_page(driver, 8.0, "Rock")
                path.parent.mkdir(parents=True, exist_ok=True)
                if not driver.save_screenshot(str(path)):
                    raise RuntimeError(f"Chromium could not write {path}")
            finally:
                driver.quit()
    return path


if __name__ == "__main__":
    print(write_screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/web_page.png"))
