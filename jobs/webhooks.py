"""Webhooks: when a job ends, its summary is POSTed to the job's `webhook_url`, signed, retried with backoff.

Only hosts listed in WEBHOOK_ALLOW may be called (nothing when it is unset), so a client cannot make the
server send requests to internal addresses; redirects are not followed for the same reason. The body is
signed with HMAC-SHA256 under WEBHOOK_SECRET: `X-Signature-256: sha256=<hex>` (the GitHub convention), so
a receiver can check that the summary came from this server and was not altered.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import urllib.parse
from typing import Any

import httpx

from errors import ValidationFailed

log = logging.getLogger("deepseek_ocr.jobs")
SIGNATURE_HEADER = "X-Signature-256"


def allowed_hosts(setting: str | None) -> set[str]:
    return {h.strip().lower() for h in (setting or "").split(",") if h.strip()}


def check_url(url: str, allow: str | None) -> str:
    """The webhook URL when its host (or host:port) is in WEBHOOK_ALLOW; 422 saying why otherwise."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValidationFailed(f"webhook_url {url!r} is not an http(s) URL")
    hosts = allowed_hosts(allow)
    host = parsed.hostname.lower()
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    if host not in hosts and netloc not in hosts:
        allowed = ", ".join(sorted(hosts)) or "none (WEBHOOK_ALLOW is unset)"
        raise ValidationFailed(
            f"webhook_url host {netloc!r} is not allowed; allowed hosts: {allowed}. "
            "The server's operator lists them in WEBHOOK_ALLOW (comma-separated host or host:port)"
        )
    return url.strip()


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def deliver(
    url: str, summary: dict[str, Any], *, secret: str | None, retries: int, backoff_s: float, timeout_s: float = 10.0
) -> tuple[bool, int]:
    """POST `summary` until a 2xx answer or `retries` more attempts; returns (delivered, attempts)."""
    body = json.dumps(summary, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "deepseek-ocr-jobs"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    attempts = 0
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for attempt in range(retries + 1):
            attempts += 1
            try:
                response = await client.post(url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return True, attempts
                log.warning("webhook %s answered %d (attempt %d)", url, response.status_code, attempts)
            except httpx.HTTPError as exc:
                log.warning("webhook %s failed: %s (attempt %d)", url, exc, attempts)
            if attempt < retries:
                await asyncio.sleep(backoff_s * 2**attempt)
    return False, attempts
