"""Webhooks against hostile or careless input (issue 26, low findings), over real HTTP (uvicorn in a thread,
a real receiver): URLs the sender's parser refuses are a 422 at submit; a delivery that raises anything ends
`failed` after its retries, never `pending`; the signature carries its time; a bare allow-list host allows
only the default port.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.jobs import problem, submit, wait
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show
from PIL import Image

from serve_ocr import create_app

SECRET = b"s3cret"
TOLERANCE_S = 300  # what a receiver accepts as fresh; older messages are refused as replays


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(out, "PNG")
    return out.getvalue()


class Receiver(http.server.BaseHTTPRequestHandler):
    calls: list[tuple[dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.calls.append((dict(self.headers), body))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[int]:
    Receiver.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def app_with(tmp_path: Path, engine: ReplayEngine | None = None, **overrides: object):
    settings = make_settings(None, data_dir=str(tmp_path), **overrides)
    return create_app(settings, engine_factory=factory(engine or ReplayEngine("text")))


def post_job(url: str, hook: str) -> httpx.Response:
    return httpx.post(f"{url}/jobs", files={"file": ("a.png", png())}, data={"webhook_url": hook}, timeout=30)


def webhook_state(url: str, job_id: str, until: str) -> dict:
    deadline = time.monotonic() + 30
    while (state := httpx.get(f"{url}/jobs/{job_id}").json())["webhook"]["status"] != until:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    return state


def receiver_accepts(headers: dict, body: bytes) -> bool:
    """What a receiver does with X-Signature-256 (as the README tells it): recompute the HMAC of "t.body" and
    refuse an old `t`."""
    fields = dict(part.split("=", 1) for part in headers["X-Signature-256"].split(","))
    expected = hmac.new(SECRET, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(fields["v1"], expected) and abs(time.time() - int(fields["t"])) < TOLERANCE_S


def test_urls_the_sender_refuses_are_422_at_submit(tmp_path: Path, receiver: int) -> None:
    with serve_app(app_with(tmp_path, webhook_allow=f"127.0.0.1:{receiver}")) as url:
        for bad in (f"http://127.0.0.1:{receiver}/ho\tok", f"http://127.0.0.1:{receiver}/a\nb",
                    "http://[::1/hook", "ftp://127.0.0.1/hook", "http:///hook"):
            body = problem(post_job(url, bad), 422, "webhook_url")
            assert "valid URL" in body["detail"] or "http(s)" in body["detail"], show(body)


def test_a_delivery_that_raises_ends_failed_not_pending(tmp_path: Path, receiver: int) -> None:
    """A row written before the submit check (an older version, another replica) may hold a URL httpx refuses:
    its delivery raises InvalidURL on every attempt; the webhook still ends `failed` after its retries."""
    app = app_with(tmp_path, ReplayEngine("text", delay_s=1.0), webhook_allow=f"127.0.0.1:{receiver}",
                   webhook_retries=2, webhook_backoff_s=0.05)
    with serve_app(app) as url:
        job = submit(url, png(), "a.png", webhook_url=f"http://127.0.0.1:{receiver}/hook")
        store = app.state.jobs.store
        store.update_job(job["id"], webhook_url=f"http://127.0.0.1:{receiver}/ho\tok")  # while the page runs
        assert wait(url, job["id"])["status"] == "done"
        state = webhook_state(url, job["id"], "failed")
        assert state["webhook"]["attempts"] == 3, state
    assert Receiver.calls == []


def test_signature_carries_its_time(tmp_path: Path, receiver: int) -> None:
    settings = {"webhook_allow": f"127.0.0.1:{receiver}", "webhook_secret": SECRET.decode()}
    with serve_app(app_with(tmp_path, **settings)) as url:
        job = submit(url, png(), "a.png", webhook_url=f"http://127.0.0.1:{receiver}/hook")
        webhook_state(url, job["id"], "delivered")
    (headers, body), = Receiver.calls
    assert receiver_accepts(headers, body), headers
    assert json.loads(body)["id"] == job["id"]
    # A replay: the same body under the same signature, an hour later, is refused by that same check.
    t = int(headers["X-Signature-256"].split(",")[0][2:])
    old = {"X-Signature-256": headers["X-Signature-256"].replace(f"t={t}", f"t={t - 3600}")}
    assert not receiver_accepts(old, body)  # the time is signed: moving it breaks the HMAC
    stale = hmac.new(SECRET, f"{t - 3600}.".encode() + body, hashlib.sha256).hexdigest()
    assert not receiver_accepts({"X-Signature-256": f"t={t - 3600},v1={stale}"}, body)  # too old


def test_a_bare_allowed_host_allows_only_its_default_port(tmp_path: Path, receiver: int) -> None:
    with serve_app(app_with(tmp_path, webhook_allow="127.0.0.1", webhook_retries=0)) as url:
        problem(post_job(url, f"http://127.0.0.1:{receiver}/hook"), 422, "not allowed")
        problem(post_job(url, "https://127.0.0.1:80/hook"), 422, "not allowed")  # 80 is not https's default
        for ok in ("http://127.0.0.1/hook", "http://127.0.0.1:80/hook", "https://127.0.0.1/hook"):
            r = post_job(url, ok)
            assert r.status_code == 202, show(r)
    with serve_app(app_with(tmp_path, webhook_allow=f"127.0.0.1:{receiver}")) as url:
        problem(post_job(url, "http://127.0.0.1/hook"), 422, "not allowed")  # host:port allows that port only
        problem(post_job(url, f"http://127.0.0.1:{receiver + 1}/hook"), 422, "not allowed")
        job = post_job(url, f"http://127.0.0.1:{receiver}/hook")
        assert job.status_code == 202, show(job)
        webhook_state(url, job.json()["id"], "delivered")
