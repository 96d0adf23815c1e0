"""The jobs API over HTTP (requests): submit, status, events with reconnects, result, download.

Errors come back as problem+json from the service; `ApiError` carries its `detail` so the summary line says
what the server said (a bad page range, a missing key, ...). Connection losses are `requests` exceptions,
which the caller retries (`follow`) or reports.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests

from ocr_client import sse

TERMINAL = frozenset({"done", "failed", "cancelled"})
LOST = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
SSE_READ_S = 45.0  # the server pings every 15 s, so a silent stream this long is a dead connection
MEDIA = {".pdf": "application/pdf", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
         ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
         ".gif": "image/gif"}


class ApiError(Exception):
    """An HTTP answer that is not the one asked for (4xx/5xx), with the problem document's detail."""

    def __init__(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.problem: dict[str, Any] = {}
        try:
            body = response.json()
            detail = body.get("detail") or body.get("title") or response.text
            self.problem = body if isinstance(body, dict) else {}
        except ValueError:
            detail = response.text[:500]
        super().__init__(f"HTTP {self.status}: {detail}")


def plain_error(error: requests.RequestException, url: str) -> str:
    """One line for a connection failure, in the user's terms: never urllib3's text or a traceback."""
    url = url.rstrip("/")
    if isinstance(error, requests.Timeout):
        return f"the server at {url} did not answer in time (--timeout)"
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:  # requests wraps urllib3 wraps the socket error
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return f"the server at {url} refused the connection (is it running? set the address with --url or OCR_URL)"
        if isinstance(cause, socket.gaierror):
            return f"the host of {url} could not be found (--url or OCR_URL)"
        nested = next((a for a in getattr(cause, "args", ()) if isinstance(a, BaseException)), None)
        cause = getattr(cause, "reason", None) or nested or cause.__cause__ or cause.__context__
    if isinstance(error, requests.ConnectionError):
        return f"could not connect to the server at {url} (--url or OCR_URL)"
    return f"the request to {url} failed: {type(error).__name__}"


class Lost(Exception):
    """The server stayed unreachable through every retry; the job goes on there and a new run resumes it."""


class Client:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _check(self, r: requests.Response, *ok: int) -> requests.Response:
        if r.status_code not in (ok or (200,)):
            raise ApiError(r)
        return r

    def submit(self, path: Path, options: dict[str, Any]) -> dict[str, Any]:
        """POST /jobs with the file and the options given (None ones left out: the server's defaults)."""
        data = {k: str(v) for k, v in options.items() if v is not None}
        with path.open("rb") as f:
            media = MEDIA.get(path.suffix.lower(), "application/octet-stream")
            r = self.session.post(f"{self.url}/jobs", files={"file": (path.name, f, media)}, data=data,
                                  timeout=max(self.timeout, 300.0))  # an upload of a big PDF takes a while
        return self._check(r, 202).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/jobs/{job_id}", timeout=self.timeout)).json()

    def result(self, job_id: str) -> dict[str, Any]:
        return self._check(self.session.get(f"{self.url}/jobs/{job_id}/result", timeout=self.timeout)).json()

    def download(self, job_id: str) -> bytes:
        r = self.session.get(f"{self.url}/jobs/{job_id}/download", timeout=max(self.timeout, 300.0))
        return self._check(r).content

    def events(self, job_id: str, last_id: str | None) -> Iterator[sse.Event]:
        """One connection to the event stream, from after `last_id`; ends when the server closes it."""
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        with self.session.get(f"{self.url}/jobs/{job_id}/events", headers=headers, stream=True,
                              timeout=(self.timeout, max(self.timeout, SSE_READ_S))) as r:
            self._check(r)
            yield from sse.parse(r.iter_lines(decode_unicode=True))


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    return min(cap, base * 2 ** max(0, attempt - 1))


def follow(client: Client, job_id: str, on_event: Callable[[str, Any], None], *, retries: int = 8,
           poll: bool = False, poll_s: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Follow a job until it ends and return its summary (`GET /jobs/{id}`).

    With SSE, a lost connection is retried with exponential backoff (at most `retries` times in a row) and the
    stream resumes after the last event seen (`Last-Event-ID`); with `poll`, `GET /jobs/{id}` is read every
    `poll_s` seconds. `on_event(kind, data)` sees `page`/`progress`/terminal events (polling: `progress`).
    """
    last_id: str | None = None
    failures = 0
    while True:
        try:
            if poll:
                job = client.job(job_id)
                failures = 0
                on_event("progress", job)
                if job["status"] in TERMINAL:
                    return job
                sleep(poll_s)
                continue
            for event in client.events(job_id, last_id):
                failures = 0
                last_id = event.id or last_id
                on_event(event.event, event.data)
                if event.event in TERMINAL:
                    return client.job(job_id)
            job = client.job(job_id)  # the stream closed without an end: a server shutting down, a proxy
            if job["status"] in TERMINAL:
                return job
            failures += 1
        except LOST:
            failures += 1
        except ApiError as e:
            if e.status < 500:
                raise
            failures += 1  # 502/503 from a proxy or a server starting up: worth waiting for
        if failures > retries:
            raise Lost(f"lost the connection to {client.url} {failures} times in a row; run again to "
                                  f"resume job {job_id}")
        sleep(backoff(failures))
