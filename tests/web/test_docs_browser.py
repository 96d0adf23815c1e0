"""/docs and /redoc render in a real headless Chromium that can reach nothing but the test server.

An offline GPU host is the product's home: the docs pages must load all their JavaScript and CSS from the
service. Two guards: Chromium starts with every host name
but 127.0.0.1 resolving to nothing (`--host-resolver-rules`), and Chrome DevTools blocks every URL outside
the test server's origin, IP literals included (`Network.setBlockedURLs` with an allow pattern first).
The performance log then shows that the page did not even try another origin.
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import httpx
import pytest
from helpers.browser import CHROMEDRIVER, CHROMIUM, foreign, requested_urls
from helpers.server import make_settings, serve_app, show
from helpers.tools import missing_tool
from selenium import webdriver

from serve_ocr import create_app

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path):
    """A server that requires an API key: the docs pages and their assets must still load without one."""
    with serve_app(create_app(make_settings(tiny_checkpoint, api_key="docs-test-key"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        missing_tool("Debian's chromium and chromium-driver are not installed (.ci/run installs them with apt-get)")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1280,2000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    try:
        yield driver
    finally:
        driver.quit()


def allow_only(driver, base_url: str) -> None:
    """Block every URL but the test server's: the first matching pattern decides (Chrome DevTools)."""
    patterns = [{"urlPattern": base_url + "/*", "block": False}, {"urlPattern": "*://*:*", "block": True}]
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urlPatterns": patterns})


def operation_count(base_url: str) -> int:
    r = httpx.get(base_url + "/openapi.json", timeout=30)
    assert r.status_code == 200, show(r)
    return sum(1 for item in r.json()["paths"].values() for method in item if method in HTTP_METHODS)


def wait_for(driver, css: str, count: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    found = 0
    while time.monotonic() < deadline:
        found = len(driver.find_elements("css selector", css))
        if found >= count:
            return found
        time.sleep(0.25)
    return found


def test_swagger_ui_renders_every_operation_offline(server: str, browser) -> None:
    allow_only(browser, server)
    expected = operation_count(server)
    requested_urls(browser)  # drop earlier entries
    browser.get(server + "/docs")
    found = wait_for(browser, ".opblock", expected)
    urls = requested_urls(browser)
    assert found == expected, (
        f"Swagger UI rendered {found} operations of {expected}; page:\n{browser.page_source[:3000]}"
    )
    assert not foreign(urls, server), f"requests to other origins: {foreign(urls, server)}"
    assert any(u.endswith("/static/docs/swagger-ui-bundle.js") for u in urls), urls
    assert any(u.endswith("/static/docs/swagger-ui.css") for u in urls), urls
    styled = browser.execute_script("return getComputedStyle(document.querySelector('.opblock')).borderStyle")
    assert styled == "solid", "swagger-ui.css did not apply"


def test_redoc_renders_every_operation_offline(server: str, browser) -> None:
    allow_only(browser, server)
    expected = operation_count(server)
    requested_urls(browser)
    browser.get(server + "/redoc")
    css = "[data-section-id*='operation/'] h2"
    found = wait_for(browser, css, expected)
    urls = requested_urls(browser)
    assert found == expected, f"ReDoc rendered {found} operations of {expected}; page:\n{browser.page_source[:3000]}"
    assert not foreign(urls, server), f"requests to other origins: {foreign(urls, server)}"
    assert any(u.endswith("/static/docs/redoc.standalone.js") for u in urls), urls


def test_docs_and_their_assets_need_no_key_and_open_nothing_else(server: str) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect", "/openapi.json", "/static/docs/swagger-ui.css"):
        r = httpx.get(server + path, timeout=30)
        assert r.status_code == 200, f"{path}: {show(r)}"
    redoc = httpx.get(server + "/static/docs/redoc.standalone.js", timeout=30)
    assert redoc.status_code == 200 and b"cdn.redoc.ly" not in redoc.content, show(redoc)
    assert "https://" not in httpx.get(server + "/docs").text + httpx.get(server + "/redoc").text
    # The open prefix does not open a route reached through `..` (sent raw; clients would normalise it).
    host, port = server.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/static/../generate", body=b"{}", headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 401
    conn.close()
