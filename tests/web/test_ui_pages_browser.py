"""/ui as a tool, in headless Chromium that can reach nothing but the test server.

A 3-page PDF shows each page's image (pixels that are not all white, read back from the page's own <img>) with
the layout boxes over it and its text beside it, a running state per page and an ETA while it runs, and a page
strip the arrow keys walk; copy and the `.md` downloads give the job's text. The tiny random checkpoint's text is
all placeholder tokens, which clean to empty markdown, so that test replays a known answer (the model is the only
part replaced: render processes, previews, jobs and routes are the real ones); the others run against a real
`uvicorn serve_ocr:app` process on the tiny checkpoint: the demo notice, an encrypted PDF through the password
field, two files chosen at once that finish as two jobs and are still listed after a reload (GET /jobs), a wrong
and a missing key told apart, and no sideways scroll at 420 px.
With UI_SCREENSHOT=docs/ui.png the first test saves the page as the README's picture.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from helpers.browser import allow_only, foreign, requested_urls, start_chromium
from helpers.replay import ReplayEngine, factory
from helpers.server import data_dir, make_settings, scratch_root, serve_app, serve_process, show
from PIL import Image

from serve_ocr import create_app

KEY = "ui-pages-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PASSWORD = "open sesame"
SCREENSHOT = os.environ.get("UI_SCREENSHOT")
ROOT = Path(__file__).resolve().parents[2]
# The answer for every page of `make_pdf`'s pages, boxes on the 0..999 grid where the page has them.
REPLAY = (
    "<|ref|>title<|/ref|><|det|>[[115, 100, 590, 148]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>image<|/ref|><|det|>[[119, 201, 881, 504]]<|/det|>\n\n"
    "<|ref|>text<|/ref|><|det|>[[140, 535, 600, 565]]<|/det|>\nRevenue grew in every region."
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path):
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_DIR": data_dir(),
           "API_KEY": KEY, "DEFAULT_MAX_TOKENS": "16"}
    with serve_process(env) as url:
        yield url


@pytest.fixture(scope="module")
def replay_server():
    # One page at a time, each a moment long: the page can be seen running and the ETA shown.
    engine = ReplayEngine(REPLAY, delay_s=2.5, max_concurrency=1)
    with serve_app(create_app(make_settings(None, api_key=KEY), engine_factory=factory(engine))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium(Path(tempfile.mkdtemp(prefix="ui-pages-", dir=scratch_root())), width=1280, height=1000)
    try:
        yield driver
    finally:
        driver.quit()


def make_pdf(path: Path, pages: int, **save: object) -> Path:
    import pymupdf

    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=420, height=595)
        page.insert_text((50, 80), "Quarterly report", fontsize=24)
        page.insert_text((340, 570), f"{n + 1}", fontsize=10)
        page.draw_rect(pymupdf.Rect(50, 120, 370, 300), color=(0.1, 0.3, 0.8), fill=(0.85, 0.9, 1.0))
        page.insert_text((60, 330), "Revenue grew in every region.", fontsize=12)
    doc.save(path, **save)
    return path


def make_png(path: Path) -> Path:
    Image.new("RGB", (300, 200), "white").save(path)
    return path


def wait_until(browser, script: str, timeout: float = 120.0):
    """Poll a JavaScript expression until it is truthy; fail with the page's state and console."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.2)
    state = browser.execute_script(
        "return [document.getElementById('job-status').textContent, document.getElementById('progress-text')"
        ".textContent, document.getElementById('message').textContent, document.getElementById('queue').innerText]")
    raise AssertionError(f"timed out on {script}; status/progress/message/queue: {state}; "
                         f"console: {browser.get_log('browser')}")


def open_ui(browser, url: str, key: str = KEY) -> None:
    allow_only(browser, url)
    browser.get(url + "/ui")
    field = browser.find_element("id", "api-key")
    field.clear()
    field.send_keys(key)


def choose(browser, *paths: Path) -> None:
    browser.find_element("id", "file").send_keys("\n".join(str(p) for p in paths))


def wait_job_done(browser, pages: int) -> str:
    """The job in view has ended `done` with `pages` sections whose text and image are shown; its id."""
    wait_until(browser, "document.getElementById('job-status').textContent === 'done' && "
                        f"document.querySelectorAll('#pages .page').length === {pages} && "
                        "[...document.querySelectorAll('#pages .page')].every(s => "
                        "!s.querySelector('.page-actions').hidden && (!s.querySelector('.sheet img') || "
                        "s.querySelector('.sheet img').complete))")
    return browser.execute_script("return document.getElementById('job').dataset.jobId")


# Each page's <img> drawn on a canvas: its size and how many pixels are far from white (the blob URL is the
# page's own origin, so the canvas can be read).
READ_IMAGES = """return [...document.querySelectorAll('#pages .page')].map(s => {
  const img = s.querySelector('.sheet img');
  const text = s.querySelector('.text').getBoundingClientRect();
  const sheet = s.querySelector('.sheet').getBoundingClientRect();
  if (!img) return {page: s.dataset.page, img: null};
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let dark = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] < 600) dark++;
  return {page: s.dataset.page, img: img.src.slice(0, 5), w: img.naturalWidth, h: img.naturalHeight, dark: dark,
          source: s.querySelector('.md-source').textContent, text: s.querySelector('.md').innerText,
          beside: sheet.right <= text.left && sheet.width > 200,
          boxes: [...s.querySelectorAll('.overlay .box')].map(b => b.dataset.label),
          thumb: !!document.querySelector('#strip .thumb[data-page="' + s.dataset.page + '"] img')};
})"""


def test_pdf_pages_show_their_images_beside_their_text(replay_server: str, browser, tmp_path: Path) -> None:
    url = replay_server
    pdf = make_pdf(tmp_path / "report.pdf", 3)
    requested_urls(browser)
    open_ui(browser, url)
    choose(browser, pdf)
    # While it runs: the job and a page say "running" (not "queued"), then an ETA once a page has finished.
    wait_until(browser, "document.getElementById('job-status').textContent === 'running' && "
                        "[...document.querySelectorAll('#pages .page h2 .status')]"
                        ".some(b => b.textContent === 'running')")
    wait_until(browser, "/^about \\d+ s left$/.test(document.getElementById('eta').textContent)")
    job_id = wait_job_done(browser, 3)
    shown = browser.execute_script(READ_IMAGES)
    assert [s["page"] for s in shown] == ["1", "2", "3"], shown
    for section in shown:
        page = httpx.get(f"{url}/jobs/{job_id}/pages/{section['page']}", headers=AUTH, timeout=30)
        assert page.status_code == 200, show(page)
        assert section["img"] == "blob:" and section["dark"] > 500, section  # not a blank sheet
        assert max(section["w"], section["h"]) <= 1024, section
        assert "Quarterly report" in section["source"] and section["source"] == page.json()["markdown"], section
        assert section["text"].startswith("Quarterly report"), section  # rendered, beside the image
        assert section["beside"] and section["thumb"], section
        assert section["boxes"] == ["title", "image", "text"], section
    # The route behind the images: a JPEG of the rendered page for the job's key only.
    image = httpx.get(f"{url}/jobs/{job_id}/pages/2/image", headers=AUTH, timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg", show(image)
    picture = Image.open(io.BytesIO(image.content)).convert("L")
    assert max(picture.size) <= 1024 and picture.getextrema()[0] < 128, picture  # dark ink on the page
    assert httpx.get(f"{url}/jobs/{job_id}/pages/2/image", timeout=30).status_code == 401
    missing = httpx.get(f"{url}/jobs/{job_id}/pages/9/image", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json", show(missing)
    # The strip and the arrow keys.
    body = browser.find_element("tag name", "body")
    for key, page in (("\ue014", "1"), ("\ue014", "2"), ("\ue012", "1")):  # right, right, left
        body.send_keys(key)
        assert browser.execute_script("return document.querySelector('#strip .thumb.current').dataset.page") == page
    if SCREENSHOT:
        save_screenshot(browser, ROOT / SCREENSHOT)
    check_copy_and_markdown(browser, url, job_id)
    urls = requested_urls(browser)
    assert not foreign(urls, url), foreign(urls, url)
    assert any(u.endswith(f"/jobs/{job_id}/pages/1/image") for u in urls), urls


def check_copy_and_markdown(browser, url: str, job_id: str) -> None:
    """Copy puts the document's markdown on the clipboard (read back with the permission granted); `.md` saves
    the document's and one page's markdown."""
    result = httpx.get(f"{url}/jobs/{job_id}/result", headers=AUTH, timeout=30).json()
    assert "Quarterly report" in result["markdown"], result["markdown"]
    browser.execute_cdp_cmd("Browser.grantPermissions", {"origin": url,
                            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    browser.find_element("css selector", '#doc-actions [data-doc="copy"]').click()
    wait_until(browser, "document.querySelector('#doc-actions [data-doc=\"copy\"]').textContent === 'Copied'")
    copied = browser.execute_async_script("navigator.clipboard.readText().then(arguments[0], "
                                          "e => arguments[0]('failed: ' + e))")
    assert copied == result["markdown"], (copied, result["markdown"])
    for selector in ('#doc-actions [data-doc="md"]', '#page-2 [data-page="md"]', '#doc-actions [data-doc="json"]',
                     '#page-2 [data-page="txt"]', '#doc-actions [data-doc="searchable"]'):
        browser.find_element("css selector", selector).click()
    saved = wait_for_files(browser.downloads, ["report.md", "report_p2.md", "report.json", "report_p2.txt",
                                               "report_searchable.pdf"])
    assert saved["report.md"] == result["markdown"], saved
    assert saved["report_p2.md"] == result["pages"][1]["markdown"], saved
    assert json.loads(saved["report.json"])["markdown"] == result["markdown"], saved
    shown = "Quarterly report figure images/2_0.jpg (in the ZIP) Revenue grew in every region."
    assert saved["report_p2.txt"].split() == shown.split(), saved  # the page as shown, without markup
    # The searchable PDF, read out of the job's ZIP (deflated) by the page itself: a whole PDF of the 3 pages.
    import pymupdf

    with pymupdf.open(browser.downloads / "report_searchable.pdf") as doc:
        assert doc.page_count == 3 and "Revenue grew" in doc[0].get_text(), doc[0].get_text()


def save_screenshot(browser, path: Path) -> None:
    """The page at 1100x760 with the first page in view, as a 256-colour PNG (the README's picture stays small)."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1100, "height": 760, "deviceScaleFactor": 1, "mobile": False})
    try:
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        png = browser.get_screenshot_as_png()
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(256)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    assert path.stat().st_size < 300_000, path.stat().st_size


def test_encrypted_pdf_through_the_password_field(server: str, browser, tmp_path: Path) -> None:
    import pymupdf

    pdf = make_pdf(tmp_path / "locked.pdf", 1, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=PASSWORD,
                   owner_pw=PASSWORD + "!")
    open_ui(browser, server)
    # The tiny checkpoint has random weights: the page says so, as /health does.
    assert httpx.get(server + "/health", timeout=30).json()["demo"] is True
    wait_until(browser, "!document.getElementById('demo').hidden && "
                        "document.getElementById('demo').textContent.includes('RANDOM')", 30)
    choose(browser, pdf)  # no password yet: the server's problem detail says which field to fill
    wait_until(browser, "document.getElementById('message').textContent.includes('password')")
    browser.find_element("id", "opt-password").send_keys(PASSWORD)
    choose(browser, pdf)
    wait_job_done(browser, 1)
    [section] = browser.execute_script(READ_IMAGES)
    assert section["dark"] > 500, section


def test_two_files_two_jobs_history_keys_and_phone_width(server: str, browser, tmp_path: Path) -> None:
    pdf, png = make_pdf(tmp_path / "first.pdf", 1), make_png(tmp_path / "second.png")
    open_ui(browser, server)
    browser.find_element("id", "opt-password").clear()
    before = {j["id"] for j in httpx.get(server + "/jobs", headers=AUTH, timeout=30).json()["jobs"]}
    choose(browser, pdf, png)
    wait_until(browser, "document.querySelectorAll('#queue li').length >= " + str(len(before) + 2))
    jobs = httpx.get(server + "/jobs", headers=AUTH, timeout=30).json()["jobs"]
    new = [j for j in jobs if j["id"] not in before]
    assert sorted(j["filename"] or j["kind"] for j in new) == ["batch", "first.pdf"], new
    ids = [j["id"] for j in new]
    for job_id in ids:  # both finish, and the queue says so
        wait_until(browser, f"document.querySelector('#queue li[data-job-id=\"{job_id}\"] .status')"
                            ".textContent === 'done'")

    browser.refresh()  # the history is the server's: a reload lists both (the key stays for the tab)
    wait_until(browser, " && ".join(f"!!document.querySelector('#queue li[data-job-id=\"{i}\"]')" for i in ids))
    pdf_job = next(j["id"] for j in new if j["kind"] == "pdf")
    # A click by script: the queue is redrawn as it refreshes, which can swap the button under a WebDriver click.
    browser.execute_script(f"document.querySelector('#queue li[data-job-id=\"{pdf_job}\"] button').click()")
    wait_job_done(browser, 1)

    # Missing and wrong keys: the server answers 401 to both; the page tells them apart by what it sent.
    assert httpx.get(server + "/jobs", timeout=30).status_code == 401
    assert httpx.get(server + "/jobs", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    key = browser.find_element("id", "api-key")
    key.clear()
    key.send_keys("nope")
    wait_until(browser, "document.getElementById('message').textContent.startsWith('Wrong API key')", 30)
    key.send_keys("\b" * 4)  # input events until the field is empty
    wait_until(browser, "document.getElementById('message').textContent.includes('needs an API key')", 30)
    key.send_keys(KEY)
    wait_until(browser, "document.getElementById('message').textContent === ''", 30)

    # Dark mode follows the system's preference.
    background = "return getComputedStyle(document.body).backgroundColor"
    assert browser.execute_script(background) == "rgb(244, 245, 247)"
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        assert browser.execute_script(background) == "rgb(21, 23, 27)"
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

    # A phone: one column, nothing wider than the screen.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 420, "height": 900, "deviceScaleFactor": 1, "mobile": True})
    try:
        time.sleep(0.5)
        widths = browser.execute_script("const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
        assert widths[0] <= widths[1], widths
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def wait_for_files(folder: Path, names: list[str], timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((folder / n).is_file() for n in names):
            return {n: (folder / n).read_text(encoding="utf-8", errors="replace") for n in names}
        time.sleep(0.1)
    raise AssertionError(f"downloads {names} not saved; the folder has {sorted(p.name for p in folder.iterdir())}")
