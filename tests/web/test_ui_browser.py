"""The /ui page in a real headless Chromium that can reach nothing but the test server.

A user with an API key opens /ui, types the key, chooses a PDF: the page submits a job, follows its events,
shows one section per page with the markdown (the source equal to the job's result), a box overlay per page,
the progress bar at 100%, and a button that saves the job's ZIP. A second test replays known grounded output
over an image: the boxes land where the model put them, tables render, and markup in the model's text stays
text (nothing it writes can run in the page).
"""

from __future__ import annotations

import io
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from helpers.browser import allow_only, foreign, requested_urls, start_chromium
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, scratch_root, serve_app, show

from serve_ocr import create_app

KEY = "ui-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPLAY = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 150]]<|/det|>\n# Quarterly <b>report</b>\n\n"
    "<|ref|>table<|/ref|><|det|>[[100, 400, 900, 800]]<|/det|>\n"
    "<table><tr><td>Cost</td><td>12</td></tr><tr><td>Profit</td><td>3</td></tr></table>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 850, 500, 950]]<|/det|>\n"
    "Visit <img src=x onerror=\"window.hacked=1\"> **now**<script>window.hacked=2</script>"
)


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium(Path(tempfile.mkdtemp(prefix="ui-downloads-", dir=scratch_root())))
    try:
        yield driver
    finally:
        driver.quit()


def make_pdf(path: Path, pages: int) -> Path:
    import pymupdf

    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=300, height=400)
        page.insert_text((40, 60), f"Page {n + 1} of the UI test", fontsize=14)
    doc.save(path)
    return path


def make_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (400, 300), "white").save(path)
    return path


def wait_until(browser, script: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy; fail with the page's state and console."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.1)
    state = browser.execute_script(
        "return [document.getElementById('job-status').textContent, document.getElementById('progress-text')"
        ".textContent, document.getElementById('message').textContent]")
    raise AssertionError(f"timed out on {script}; status/progress/message: {state}; "
                         f"console: {browser.get_log('browser')}")


def open_ui(browser, url: str, upload: Path) -> str:
    """Open /ui, type the key, choose the file; returns the job id once the page has one."""
    allow_only(browser, url)
    browser.get(url + "/ui")
    key = browser.find_element("id", "api-key")
    key.clear()
    key.send_keys(KEY)
    browser.find_element("id", "file").send_keys(str(upload))
    return wait_until(browser, "document.getElementById('job').dataset.jobId")


def sections(browser) -> list[dict]:
    return browser.execute_script("""return [...document.querySelectorAll('#pages .page')].map(s => ({
        page: s.dataset.page, title: s.querySelector('h2').textContent,
        source: s.querySelector('.md-source').textContent, html: s.querySelector('.md').innerHTML,
        overlay: !!s.querySelector('.sheet .overlay'),
        boxes: [...s.querySelectorAll('.overlay .box')].map(b => ({label: b.dataset.label,
            left: b.style.left, top: b.style.top, rect: b.getBoundingClientRect().toJSON()})),
        sheet: s.querySelector('.sheet').getBoundingClientRect().toJSON()}))""")


def test_pdf_job_progress_markdown_boxes_and_zip(tiny_checkpoint: Path, browser, tmp_path: Path) -> None:
    started = time.monotonic()
    pdf = make_pdf(tmp_path / "three pages.pdf", 3)
    with serve_app(create_app(make_settings(tiny_checkpoint, api_key=KEY))) as url:
        assert httpx.get(url + "/ui", timeout=30).status_code == 200  # the page is open; its API calls are not
        assert httpx.get(url + "/jobs", timeout=30).status_code == 401
        requested_urls(browser)
        job_id = open_ui(browser, url, pdf)
        wait_until(browser, "document.getElementById('progress-text').textContent.endsWith('100%') && "
                            "document.getElementById('job-status').textContent === 'done' && "
                            "document.querySelectorAll('#pages .page .overlay').length === 3")
        assert browser.execute_script("return document.getElementById('progress').value") == 100
        r = httpx.get(f"{url}/jobs/{job_id}/result", headers=AUTH, timeout=30)
        assert r.status_code == 200, show(r)
        result = r.json()
        shown = sections(browser)
        assert [s["page"] for s in shown] == ["1", "2", "3"], shown
        for section, page in zip(shown, result["pages"], strict=True):
            assert section["title"].startswith(f"Page {page['page']}"), section
            assert section["source"] == page["markdown"], (section, page)
            assert section["html"], section  # rendered text, or the "(no text on this page)" note
            assert section["overlay"], section
            assert len(section["boxes"]) == sum(len(b["boxes"]) for b in page["blocks"]), (section, page["blocks"])
        # The key went with every API call: the job belongs to it, and the page showed no error.
        assert browser.execute_script("return document.getElementById('message').textContent") == ""
        assert browser.execute_script("return sessionStorage.getItem('deepseek-ocr.api-key')") == KEY

        browser.find_element("id", "download").click()
        deadline = time.monotonic() + 15
        while not list(browser.downloads.glob("*.zip")) and time.monotonic() < deadline:
            time.sleep(0.1)
        saved = list(browser.downloads.glob("*.zip"))
        assert [p.name for p in saved] == ["three pages.zip"], list(browser.downloads.iterdir())
        expected = httpx.get(f"{url}/jobs/{job_id}/download", headers=AUTH, timeout=30)
        assert expected.status_code == 200, show(expected)
        names = zipfile.ZipFile(io.BytesIO(saved[0].read_bytes())).namelist()
        assert names == zipfile.ZipFile(io.BytesIO(expected.content)).namelist(), names
        assert any(n.endswith(".md") for n in names), names
        urls = requested_urls(browser)
    assert not foreign(urls, url), f"requests to other origins: {foreign(urls, url)}"
    assert any(u.endswith(f"/jobs/{job_id}/events") for u in urls), urls
    # The time the whole flow took is a figure, not a property (each wait above has its own limit): shown with -s.
    print(f"ui flow: {time.monotonic() - started:.1f} s")


def test_image_boxes_over_the_picture_and_model_markup_stays_text(browser, tmp_path: Path) -> None:
    png = make_png(tmp_path / "scan.png")
    settings = make_settings(None, api_key=KEY)
    with serve_app(create_app(settings, engine_factory=factory(ReplayEngine(REPLAY)))) as url:
        allow_only(browser, url)
        browser.get(url + "/ui")
        browser.find_element("id", "api-key").clear()
        browser.execute_script("sessionStorage.clear()")
        browser.find_element("id", "file").send_keys(str(png))  # no key yet: the page says it needs one
        wait_until(browser, "document.getElementById('message').textContent.includes('API key')")
        job_id = open_ui(browser, url, png)
        wait_until(browser, "document.getElementById('job-status').textContent === 'done' && "
                            "document.querySelectorAll('#pages .overlay .box').length === 3")
        r = httpx.get(f"{url}/jobs/{job_id}/pages/0", headers=AUTH, timeout=30)
        assert r.status_code == 200, show(r)
        [section] = sections(browser)
        assert section["source"] == r.json()["markdown"], section
        assert [b["label"] for b in section["boxes"]] == ["title", "table", "text"], section
        # Grid 0..999 over the picture as shown: the title box starts 100/999 of the way across, 50/999 down.
        sheet, title = section["sheet"], section["boxes"][0]["rect"]
        assert abs(title["left"] - sheet["left"] - sheet["width"] * 100 / 999) < 2, section
        assert abs(title["top"] - sheet["top"] - sheet["height"] * 50 / 999) < 2, section
        assert abs(title["width"] - sheet["width"] * 800 / 999) < 3, section
        wait_until(browser, "document.querySelector('.sheet img').complete")
        image = browser.execute_script("const i = document.querySelector('.sheet img'); "
                                       "return [i.src.slice(0, 5), i.naturalWidth]")
        assert image == ["blob:", 400], image  # the uploaded file itself, under the boxes
        html = section["html"]
        assert "<h3>Quarterly &lt;b&gt;report&lt;/b&gt;</h3>" in html, html
        assert "<table><tbody><tr><td>Cost</td><td>12</td></tr>" in html, html
        # The model's own markup is shown as text: no element of it exists, none of it ran.
        assert "<strong>now</strong>" in html and "&lt;script&gt;window.hacked=2&lt;/script&gt;" in html, html
        assert browser.execute_script("return document.querySelectorAll('.md script, .md img, .md b').length") == 0
        assert browser.execute_script("return window.hacked") is None
        assert browser.execute_script("return document.getElementById('progress').value") == 100
