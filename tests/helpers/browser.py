
"""The headless Chromium of the docs and UI browser tests, and what its performance log shows."""

from __future__ import annotations

import json
import shutil

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def foreign(urls: list[str], base_url: str) -> list[str]:
    return [u for u in urls if not u.startswith((base_url, "data:", "blob:", "about:", "chrome"))]




def start_chromium(downloads, *, width: int = 1280, height: int = 1600):
    """Headless Chromium under chromedriver that saves downloads into `downloads` and can reach only
    127.0.0.1 (every other host name resolves to nothing); skips the test where Chromium is not installed
    (fails it on CI)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from helpers.tools import missing_tool

    if not (CHROMIUM and CHROMEDRIVER):
        missing_tool("Debian's chromium and chromium-driver are not installed (.ci/run installs them with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", f"--window-size={width},{height}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    return driver


def allow_only(driver, base_url: str) -> None:
    """Block every URL but the test server's and the page's own blob: URLs (uploaded images, downloads)."""
    patterns = [{"urlPattern": base_url + "/*", "block": False}, {"urlPattern": "blob:*",
                "block": False}, {"urlPattern": "*://*:*", "block": True}]
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urlPatterns": patterns})
