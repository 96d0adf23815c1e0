"""Swagger UI's "Try it out" in a real headless Chromium: pick a file, Execute, and get the route's answer.

The form test (test_swagger_forms.py) models what Swagger UI sends; this one is the browser itself on the
real `/docs` page of a real server on the tiny checkpoint. For each multipart route a user would try first,
the test expands the operation, clicks "Try it out", sets the file input(s) to a real file, leaves every
other field as Swagger UI fills it (on `POST /jobs` that includes the `files` array's item, which Swagger UI
sends as an empty `files=` part even when it is removed), clicks "Execute" and reads the status of the live
response Swagger UI shows. Every wait is for a positive signal under a generous deadline: the machine that
runs this may be small and busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymupdf
import pytest
from helpers.browser import CHROMEDRIVER, CHROMIUM
from helpers.server import make_settings, serve_app
from helpers.tools import missing_tool
from PIL import Image
from selenium import webdriver

from serve_ocr import create_app

RENDER_S = 120.0  # /docs: the bundle, /openapi.json and every operation rendered
ANSWER_S = 300.0  # one OCR request on the tiny checkpoint, on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[str]:
    """No API key: Swagger UI's requests go out as a user's would, without Authorize."""
    with serve_app(create_app(make_settings(tiny_checkpoint))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        missing_tool("Debian's chromium and chromium-driver are not installed (.ci/run installs them with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--window-size=1280,2000",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files a user picks: a small PNG and a one-page PDF."""
    folder = tmp_path_factory.mktemp("swagger-uploads")
    png = folder / "page.png"
    Image.new("RGB", (96, 64), (250, 250, 250)).save(png)
    pdf = folder / "report.pdf"
    doc = pymupdf.open()
    page = doc.new_page(width=300, height=200)
    page.insert_text((30, 60), "Swagger try-out", fontsize=18)
    doc.save(pdf)
    doc.close()
    return {"png": png, "pdf": pdf}


def wait_for(what: str, probe: Callable[[], Any], timeout: float, state: Callable[[], str]) -> Any:
    """Poll `probe` until it returns something truthy; fail naming `what` and the page's state."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; {state()}")
        time.sleep(0.2)


def operation(browser: Any, path: str) -> Any:
    """The POST operation block of `path` on /docs (Swagger UI marks its path with `data-path`)."""
    found = browser.find_elements("css selector", f".opblock-post .opblock-summary-path[data-path='{path}']")
    if not found:
        return None
    return found[0].find_element("xpath", "./ancestor::div[contains(@class, 'opblock-post')]")


def live_response(block: Any) -> dict[str, str] | None:
    """Status, body and curl of the live response Swagger UI shows under the operation, once it is there."""
    return block.parent.execute_script(
        """const block = arguments[0];
        const status = block.querySelector('.live-responses-table .response .response-col_status');
        if (!status || !status.textContent.trim()) return null;
        const body = block.querySelector('.live-responses-table .response-col_description pre');
        const curl = block.querySelector('.curl-command .curl, .curl-command pre, .curl');
        return {status: status.textContent.trim(), body: body ? body.textContent : '',
                curl: curl ? curl.textContent : ''};""",
        block,
    )


def page_state(browser: Any) -> Callable[[], str]:
    return lambda: f"page:\n{browser.execute_script('return document.body.innerText')[-3000:]}"


def try_it_out(browser: Any, server: str, path: str, pick: Callable[[Any], None]) -> dict[str, str]:
    """Open /docs, expand `path`, "Try it out", let `pick` set the file inputs, Execute; the live response."""
    state = page_state(browser)
    browser.get(server + "/docs")
    block = wait_for(f"the operation POST {path}", lambda: operation(browser, path), RENDER_S, state)
    block.find_element("css selector", ".opblock-summary-control").click()
    wait_for("the Try it out button", lambda: block.find_elements("css selector", ".try-out__btn"), RENDER_S, state)
    block.find_element("css selector", ".try-out__btn").click()
    wait_for("the form's file inputs", lambda: block.find_elements("css selector", "input[type=file]"), RENDER_S,
             state)
    pick(block)
    block.find_element("css selector", "button.execute").click()
    return wait_for(f"the live response of POST {path}", lambda: live_response(block), ANSWER_S, state)


def file_input(block: Any, field: str, item: int = 0) -> Any:
    return block.find_elements("css selector", f"tr[data-property-name='{field}'] input[type=file]")[item]


def shown(response: dict[str, str]) -> str:
    return f"Swagger UI showed HTTP {response['status']}\ncurl: {response['curl']}\nbody: {response['body'][:3000]}"


@pytest.mark.parametrize(
    ("path", "field", "upload"),
    [("/ocr/image/advanced", "file", "png"), ("/pdf/ocr", "file", "pdf")],
)
def test_try_it_out_with_one_file_answers_200(
    server: str, browser: Any, uploads: dict[str, Path], path: str, field: str, upload: str
) -> None:
    response = try_it_out(browser, server, path, lambda block: file_input(block, field).send_keys(str(uploads[upload])))
    assert response["status"] == "200", shown(response)
    assert '"pages"' in response["body"] or '"markdown"' in response["body"], shown(response)


def test_try_it_out_batch_with_two_images_and_an_empty_item_answers_200(
    server: str, browser: Any, uploads: dict[str, Path]
) -> None:
    def pick(block: Any) -> None:
        file_input(block, "files").send_keys(str(uploads["png"]))  # the array's first item, there from the start
        block.find_element("css selector", "tr[data-property-name='files'] .json-schema-form-item-add").click()
        file_input(block, "files", 1).send_keys(str(uploads["png"]))
        block.find_element("css selector", "tr[data-property-name='files'] .json-schema-form-item-add").click()
        # ... and a third item left without a file: Swagger UI sends it as a text part (its pre-fill).

    response = try_it_out(browser, server, "/batch/ocr", pick)
    assert response["status"] == "200", shown(response)
    assert response["body"].count('"filename": "page.png"') == 2, shown(response)


@pytest.mark.parametrize("remove_files_item", [False, True], ids=["files-item-left", "files-item-removed"])
def test_try_it_out_job_with_a_pdf_answers_202(
    server: str, browser: Any, uploads: dict[str, Path], remove_files_item: bool
) -> None:
    """`file` picked; the `files` array left as Swagger UI shows it (one empty item), or its item removed."""

    def pick(block: Any) -> None:
        file_input(block, "file").send_keys(str(uploads["pdf"]))
        if remove_files_item:
            block.find_element("css selector", "tr[data-property-name='files'] .json-schema-form-item-remove").click()

    response = try_it_out(browser, server, "/jobs", pick)
    assert response["status"] == "202", shown(response)
    assert '"status"' in response["body"] and '"links"' in response["body"], shown(response)
