"""Webhooks: when a job ends, its summary is POSTed to the job's `webhook_url`, signed, retried with backoff.

Only hosts listed in WEBHOOK_ALLOW may be called (nothing when it is unset), so a client cannot make the
server send requests to internal addresses; redirects are not followed for the same reason. An entry `host`
allows only the scheme's default port (80 for http, 443 for https); `host:port` allows that port. The URL is
checked at submit with httpx's own parser, the one the sender uses, so a URL the sender would refuse is a 422
then, not a webhook that cannot be sent.

Each attempt is signed with HMAC-SHA256 under WEBHOOK_SECRET over `<t>.<body>`, where `t` is the attempt's
Unix time: `X-Signature-256: t=<t>,v1=<hex>` (Stripe's scheme), so a receiver checks that the summary came
from this server unaltered, and refuses a replay whose `t` is too old. An attempt that fails in any way
(refused, timed out, an answer other than 2xx, any error) is retried; after WEBHOOK_RETRIES the webhook is
`failed` and the log says why.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx

from errors import ValidationFailed

log = logging.getLogger("deepseek_ocr.jobs")
SIGNATURE_HEADER = "X-Signature-256"


def allowed_hosts(setting: str | None) -> set[str]:
    return {h.strip().lower() for h in (setting or "").split(",") if h.strip()}


DEFAULT_PORTS = {"http": 80, "https": 443}


def check_url(url: str, allow: str | None) -> str:
    """The webhook URL when its host and port are allowed by WEBHOOK_ALLOW; 422 saying why otherwise."""
    text = url.strip()
    try:  # the sender's parser: what it refuses (a tab, a bad port, a malformed host) is refused now
        parsed = httpx.Request("POST", text).url
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
        raise ValidationFailed(f"webhook_url {text[:200]!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in DEFAULT_PORTS or not parsed.host:
        raise ValidationFailed(f"webhook_url {text[:200]!r} is not an http(s) URL with a host")
    hosts = allowed_hosts(allow)
    host = parsed.host.lower()
    port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    netloc = f"{host}:{port}"
    bare_ok = host in hosts and port == DEFAULT_PORTS[parsed.scheme]  # a bare host: the default port only
    if not bare_ok and netloc not in hosts:
        allowed = ", ".join(sorted(hosts)) or "none (WEBHOOK_ALLOW is unset)"
        raise ValidationFailed(
            f"webhook_url host and port {netloc!r} are not allowed; allowed: {allowed}. The server's operator "
            "lists them in WEBHOOK_ALLOW (comma-separated `host` for the scheme's default port 80/443, or `host:port`)"
        )
    return text


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """`t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: the time is signed too, so a receiver can refuse
    an old message replayed."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


async def deliver(
    url: str, summary: dict[str, Any], *, secret: str | None, retries: int, backoff_s: float, timeout_s: float = 10.0
) -> tuple[bool, int]:
    """POST `summary` until a 2xx answer or `retries` more attempts; returns (delivered, attempts)."""
    body = json.dumps(summary, ensure_ascii=False).encode()
    attempts = 0
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for attempt in range(retries + 1):
            attempts += 1
            headers = {"Content-Type": "application/json", "User-Agent": "deepseek-ocr-jobs"}
            if secret:  # signed per attempt: a late retry carries its own time
                headers[SIGNATURE_HEADER] = sign(body, secret, int(time.time()))
            try:
                response = await client.post(url, content=body, headers=headers)
                if 200 <= response.status_code < 300:
                    return True, attempts
                log.warning("webhook %s answered %d (attempt %d)", url, response.status_code, attempts)
            except Exception as exc:  # any failure is one failed attempt; a webhook must never stay `pending`
                log.warning("webhook %s failed: %s: %s (attempt %d)", url, type(exc).__name__, exc, attempts)
            if attempt < retries:
                await asyncio.sleep(backoff_s * 2**attempt)
    log.warning("webhook %s failed after %d attempts; its status is `failed`", url, attempts)
    return False, attempts
