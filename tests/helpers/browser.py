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


