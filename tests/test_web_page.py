"""The web page in a real headless Chromium: pick by score and genre, the permalink page, escaping, Generate."""

from __future__ import annotations

import pytest

from pitchkeras.server import BackgroundServer
from pitchkeras.store import open_store
from tests.browser import chromium, pick_on_page, wait, write_screenshot
from tests.serve_fixtures import HOSTILE, HOSTILE_GENRE, SERVER_CONFIG, pool_reviews

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def driver():
    browser = chromium()
    yield browser
    browser.quit()


def _by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def test_pick_shows_a_review_and_its_permalink_opens_the_same_text(driver, pool_uri):
    expected = {r.text: r for r in pool_reviews() if r.score == 8.0 and r.genre == "Jazz"}
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, http_port=0) as background:
        driver.get(f"http://127.0.0.1:{background.http_port}/")
        pick_on_page(driver, 8.0, "Jazz")
        assert _by_id(driver, "score-value").text == "8.0"
        text = _by_id(driver, "review-text").text
        assert text in expected, f"the page showed {text!r}, not a stored 8.0 Jazz review"
        assert _by_id(driver, "review-score").text == "Score 8.0" and _by_id(driver, "review-genre").text == "Jazz"
        assert not _by_id(driver, "write").is_displayed()  # no model: no Generate button
        _by_id(driver, "permalink").click()
        wait(driver, lambda d: "/r/" in d.current_url, "the permalink did not open")
        assert driver.current_url.endswith(f"/r/{expected[text].id}")
        assert _by_id(driver, "review-text").text == text
        assert _by_id(driver, "review-genre").text == "Jazz" and "Jazz" in driver.title


def test_markup_in_a_review_is_shown_as_text(driver, hostile_uri):
    with BackgroundServer(hostile_uri, config=SERVER_CONFIG, http_port=0) as background:
        base = f"http://127.0.0.1:{background.http_port}"
        for url in (f"{base}/", f"{base}/r/{HOSTILE.id}"):
            driver.get(url)
            if url.endswith("/"):
                pick_on_page(driver, 5.0, HOSTILE_GENRE)  # the menu lists the genre's markup as text too
            text = _by_id(driver, "review-text")
            assert text.text == HOSTILE.text  # the markup is visible as characters
            assert _by_id(driver, "review-genre").text == HOSTILE_GENRE
            article = _by_id(driver, "review")
            assert driver.execute_script("return arguments[0].querySelectorAll('script, img, b, i').length",
                                         article) == 0
            assert driver.title != "owned"


def test_write_a_new_one_streams_the_review_as_it_is_written(driver, pool_uri, tiny_generator):
    with BackgroundServer(pool_uri, config=SERVER_CONFIG, generator=tiny_generator, http_port=0) as background:
        assert background.wait_until_ready(timeout=300) == "ready"
        driver.get(f"http://127.0.0.1:{background.http_port}/")
        wait(driver, lambda d: _by_id(d, "write").is_displayed(), "the Generate button stayed hidden")
        pick_on_page(driver, 3.0, "Rap")
        _by_id(driver, "write").click()
        # The relaxed post-processing of `tiny_generator` accepts what the untrained model writes.
        wait(driver, lambda d: "A fresh review, now stored." == _by_id(d, "status").text,
             "Generate's review never appeared on the page")
        assert _by_id(driver, "review-genre").text == "Rap" and _by_id(driver, "review-score").text == "Score 3.0"
        # The text arrived in pieces (StreamGenerate's events), each shown as it came.
        assert int(_by_id(driver, "review-text").get_attribute("data-deltas")) >= 2
        permalink = _by_id(driver, "permalink").get_attribute("href")
        with open_store(pool_uri) as store:
            stored = store.get_by_id(permalink.rsplit("/", 1)[1])
        assert stored.genre == "Rap" and stored.model_version == tiny_generator.model.info.model_version


def test_screenshot_helper_writes_a_png(tmp_path):
    path = write_screenshot(tmp_path / "page.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
