"""The search page of `instret serve` in a real browser: Debian's chromium driven by Selenium
through chromedriver (.ci/run installs both; nothing downloads a browser)."""

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from instret.indexer import build_index
from tests.server_process import Server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# CI installs them (.ci/run), so there a missing browser fails rather than skips.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"), reason="needs Debian's chromium and chromium-driver"
)
# A name that would run script if the page wrote it as HTML.
HOSTILE = "<img src=x onerror=window.pwned=1>.jpg"


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("page")
    photos = shutil.copytree(trained_run.parent / "photos", base / "photos")
    shutil.copy(photos / "a" / "003.jpg", photos / "a" / HOSTILE)
    build_index(photos, trained_run, base / "ix", workers=0, device="cpu")
    server = Server(base / "ix")
    yield photos, server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless, and none of the background connections a closed network refuses.
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,900"]:  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30):
    try:
        return WebDriverWait(driver, timeout).until(lambda d: condition(d))
    except TimeoutException:  # say where the page stood (seen once in CI, under load: a drop)
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"not there after {timeout} s; the page's status line: {status!r}") from None


def hits(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#hits li")


def test_upload_through_the_page_shows_the_image_first_with_its_score(served, browser):
    photos, server = served
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait_for(browser, lambda d: "31 images under" in d.find_element(By.ID, "index-info").text)
    image = photos / "b" / "004.jpg"
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait_for(browser, lambda d: hits(d) and "results for 004.jpg" in d.find_element(By.ID, "status").text)
    first = hits(browser)[0]
    assert first.get_attribute("data-path") == str(image)
    assert first.find_element(By.CLASS_NAME, "score").text == "#1 · 1.0000"
    assert "unrelated pair" in first.find_element(By.CLASS_NAME, "meaning").text  # how unusual the score is
    assert len(hits(browser)) == 20  # the page's default number of results
    thumbnail = first.find_element(By.TAG_NAME, "img")
    wait_for(
        browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumbnail)
    )
    link = first.find_element(By.TAG_NAME, "a")
    assert link.get_attribute("href").endswith(f"/api/v1/image/{first.get_attribute('data-id')}")


def test_clicking_a_result_searches_from_it_by_keyboard(served, browser):
    photos, server = served
    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.find_element(By.ID, "file").send_keys(str(photos / "c" / "001.jpg"))
    wait_for(browser, lambda d: len(hits(d)) == 20)
    second = hits(browser)[1]
    target = second.get_attribute("data-path")
    button = second.find_element(By.TAG_NAME, "button")
    browser.execute_script("arguments[0].focus()", button)
    assert browser.switch_to.active_element == button  # reachable by keyboard: a real button
    button.send_keys("\n")  # Enter on the focused button
    wait_for(browser, lambda d: d.find_element(By.ID, "query-name").text == f"Query: {target}")
    wait_for(browser, lambda d: hits(d) and hits(d)[0].get_attribute("data-path") == target)


def test_names_are_shown_as_text_never_run_as_html(served, browser):
    photos, server = served
    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.find_element(By.ID, "file").send_keys(str(photos / "a" / "003.jpg"))
    wait_for(browser, lambda d: len(hits(d)) == 20)
    names = [h.find_element(By.TAG_NAME, "a").text for h in hits(browser)[:2]]
    assert sorted(names) == sorted(["003.jpg", HOSTILE])  # the copy scores 1.0 too
    assert browser.execute_script("return window.pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#hits img[src='x']")


def test_a_bad_file_shows_the_servers_reason(served, browser, tmp_path):
    photos, server = served
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    status = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#status.error"))
    assert status.text == "notes.jpg: cannot read image: not an image in any format Pillow reads"


def test_duplicate_groups_are_listed(served, browser):
    photos, server = served
    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.find_element(By.ID, "show-dups").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#groups h3"))
    group = browser.find_element(By.CSS_SELECTOR, "#groups ol")
    names = sorted(a.text for a in group.find_elements(By.TAG_NAME, "a"))
    assert names == sorted(["003.jpg", HOSTILE])
    assert "Group 1: exact, 2 files" == browser.find_element(By.CSS_SELECTOR, "#groups h3").text


def test_the_duplicates_button_says_what_is_being_done_while_it_waits(served, browser):
    """A search that takes seconds (tests/slow_instret.py): the status line names the stage and
    counts the seconds, the button waits disabled, then the groups come and it is enabled."""
    photos, _ = served
    slow = Path(__file__).with_name("slow_instret.py")
    with Server(photos.parent / "ix", program=(str(slow),), env={"INSTRET_SLOW_SEARCH": "5"}) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        button = browser.find_element(By.ID, "show-dups")
        button.click()
        waiting = "Finding duplicate groups: searching the index for similar pairs… "
        status = wait_for(
            browser, lambda d: re.fullmatch(f"{waiting}[1-9] s", d.find_element(By.ID, "status").text), timeout=10
        )
        assert status and not button.is_enabled()
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#groups h3"))
        assert button.is_enabled() and browser.find_element(By.ID, "status").text.startswith("1 group(s)")


def test_the_page_fits_a_phone_screen(served, browser):
    photos, server = served
    browser.set_window_size(390, 844)
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        browser.find_element(By.ID, "file").send_keys(str(photos / "a" / "001.jpg"))
        wait_for(browser, lambda d: len(hits(d)) == 20)
        width = browser.execute_script("return document.documentElement.clientWidth")
        scroll = browser.execute_script("return document.documentElement.scrollWidth")
        assert scroll <= width  # no sideways scrolling
        left = {round(h.rect["x"]) for h in hits(browser)}
        assert len(left) == 2  # two columns of results
    finally:
        browser.set_window_size(1000, 900)


def test_browsing_pages_through_the_whole_index(served, browser):
    photos, server = served
    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.find_element(By.ID, "show-images").click()
    shown = lambda d: [li.get_attribute("data-path") for li in d.find_elements(By.CSS_SELECTOR, "#images li")]
    wait_for(browser, lambda d: len(shown(d)) == 31)  # one page of 48 holds them all
    assert sorted(shown(browser)) == sorted(str(p) for p in photos.rglob("*.jpg"))
    assert browser.find_element(By.ID, "page-of").text == "1–31 of 31"
    assert not browser.find_element(By.ID, "next").is_enabled()
    browser.find_elements(By.CSS_SELECTOR, "#images li button")[5].click()  # a/005.jpg: one with no copy
    wait_for(browser, lambda d: hits(d) and hits(d)[0].get_attribute("data-path") == shown(d)[5])


# A file handed to the page as a drop or a paste would hand it (DataTransfer, as the browser makes).
GIVE_FILE = """
const [kind, name, base64] = arguments;
const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
const data = new DataTransfer();
data.items.add(new File([bytes], name, { type: "image/jpeg" }));
const event = kind === "drop"
  ? new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true })
  : new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
(kind === "drop" ? document.getElementById("drop") : document.body).dispatchEvent(event);
"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_a_dropped_or_pasted_image_is_searched(served, browser, kind):
    photos, server = served
    image = photos / "c" / "006.jpg"
    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.execute_script(GIVE_FILE, kind, f"{kind}.jpg", base64.b64encode(image.read_bytes()).decode())
    wait_for(browser, lambda d: hits(d) and f"results for {kind}.jpg" in d.find_element(By.ID, "status").text)
    assert hits(browser)[0].get_attribute("data-path") == str(image)


@pytest.fixture(scope="module")
def served_with_a_file_gone(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("gone")
    photos = shutil.copytree(trained_run.parent / "photos", base / "photos")
    build_index(photos, trained_run, base / "ix", workers=0, device="cpu")
    gone = photos / "b" / "002.jpg"
    kept = shutil.copy(gone, base / "query.jpg")  # the same picture, still at hand to search with
    gone.unlink()
    server = Server(base / "ix")
    yield gone, kept, server
    server.stop()


def test_a_file_gone_since_indexing_is_struck_out_and_can_be_left_out(served_with_a_file_gone, browser):
    gone, query, server = served_with_a_file_gone
    browser.get(f"http://127.0.0.1:{server.port}/")
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait_for(browser, lambda d: hits(d) and "results for query.jpg" in d.find_element(By.ID, "status").text)
    first = hits(browser)[0]
    assert first.get_attribute("data-path") == str(gone)
    assert "missing" in first.get_attribute("class").split()
    tile = first.find_element(By.CSS_SELECTOR, "button.gone")
    assert tile.text == "file missing" and not tile.find_elements(By.TAG_NAME, "img")  # no thumbnail asked for
    assert "gone since indexing: 1 of them (struck out)" in browser.find_element(By.ID, "status").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#hits li.missing")) == 1  # only the deleted one

    browser.find_element(By.ID, "existing-only").click()  # the same search runs again, without the gone file
    wait_for(browser, lambda d: len(hits(d)) == 20 and hits(d)[0].get_attribute("data-path") != str(gone))
    assert str(gone) not in [h.get_attribute("data-path") for h in hits(browser)]
    assert not browser.find_elements(By.CSS_SELECTOR, "#hits li.missing")
