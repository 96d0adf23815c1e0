"""Jobs operations over real HTTP: limits (413/429/503 problem+json), TTL cleanup, API keys and job owners,
signed webhooks with retries. The model stands in as a replay engine (these tests are about the job
machinery, not the text); routes, runner, store and files are the real ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import json
import threading
import time
from pathlib import Path

import httpx
from helpers.jobs import problem, submit, wait
from helpers.pdfs import make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show

from serve_ocr import create_app

TEXT = "<|ref|>text<|/ref|><|det|>[[100, 100, 800, 300]]<|/det|>\nHello jobs"


def app_with(tmp_path: Path, engine: ReplayEngine | None = None, **overrides: object):
    settings = make_settings(None, data_dir=str(tmp_path), **overrides)
    return create_app(settings, engine_factory=factory(engine or ReplayEngine(TEXT)))


def test_limits_are_problem_json(tmp_path: Path) -> None:
    # 5 s a page: the first job (3 pages) is still running when the 429 is asked for, however slowly a loaded
    # box inspects the next upload (it is deleted before the end).
    engine = ReplayEngine(TEXT, delay_s=5.0, max_concurrency=1)
    # No restarts: the last check is the answer while the engine is dead. With ENGINE_RESTART the supervisor
    # (every 0.25 s) could bring it back between kill() and that POST, which then got its 202 (a CI flake).
    settings = {"max_job_pages": 3, "max_jobs_queued": 1, "engine_restart": False}
    # A client that waits as long as `submit` does: each POST inspects its PDF in a render process, which on a
    # loaded 2-core CI box once took past httpx's default 5 s (a flake); the answers' codes are what is checked.
    with serve_app(app_with(tmp_path, engine, **settings)) as url, httpx.Client(timeout=60) as client:
        problem(client.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(4))}), 413, "MAX_JOB_PAGES")
        first = submit(url, make_pdf(3))
        r = client.post(f"{url}/jobs", files={"file": ("b.pdf", make_pdf(1))})
        assert "Retry-After" in r.headers, show(r)
        problem(r, 429, "MAX_JOBS_QUEUED")
        problem(client.post(f"{url}/jobs", data={"prompt": "x"}), 422, "either `file`")
        problem(client.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(2))}, data={"pages": "7"}), 400, "")
        # Resume points outside any stream (found by the fuzzer: a huge id broke the stream mid-answer).
        events = f"{url}/jobs/{first['id']}/events"
        problem(client.get(events, headers={"Last-Event-ID": 'zh2"(G]Qq'}), 422, "Last-Event-ID")
        problem(client.get(events, headers={"Last-Event-ID": "6131694143044622808179015680"}), 422, "Last-Event-ID")
        problem(client.get(events, params={"after": "6131694143044622808179015680"}), 422, "after")
        client.delete(f"{url}/jobs/{first['id']}")
        engine.kill()
        problem(client.post(f"{url}/jobs", files={"file": ("b.pdf", make_pdf(1))}), 503, "died")


def test_a_batch_job_may_pass_max_upload_mb_in_all_but_not_per_file(tmp_path: Path) -> None:
    from helpers.images import image_bytes

    files = [("files", (f"n{i}.png", image_bytes(size=(170, 170), seed=i), "image/png")) for i in range(14)]
    assert all(len(f[1][1]) < 100_000 for f in files) and sum(len(f[1][1]) for f in files) > 1.2e6
    with serve_app(app_with(tmp_path, max_upload_mb=0.1)) as url:
        r = httpx.post(f"{url}/jobs", files=files, timeout=60)  # MAX_BATCH_MB bounds the body, as on /batch
        assert r.status_code == 202, show(r)
        assert wait(url, r.json()["id"])["pages_done"] == 14
        big = [("files", ("big.png", image_bytes(size=(400, 400)), "image/png"))]
        problem(httpx.post(f"{url}/jobs", files=big, timeout=60), 413, "MAX_UPLOAD_MB")


class BackWhenLet(ReplayEngine):
    """A replay engine whose restarts wait until the test lets it back: the supervisor restarts a dead engine
    within its 0.25 s check, and the job could finish before the test looked at it paused (a CI flake)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.let_back = threading.Event()

    async def start(self) -> None:
        if self.starts:  # a restart: as an engine that takes its time to come back
            deadline = time.monotonic() + 60
            while not self.let_back.is_set():
                if time.monotonic() > deadline:
                    raise RuntimeError("the test never let the engine back")
                await asyncio.sleep(0.05)
        await super().start()


def test_engine_gone_mid_job_pauses_it_and_it_resumes(tmp_path: Path) -> None:
    engine = BackWhenLet(TEXT, delay_s=0.3, max_concurrency=1)
    with serve_app(app_with(tmp_path, engine)) as url:
        job = submit(url, make_pdf(5))
        wait(url, job["id"], pages_done=1)
        engine.kill()
        time.sleep(1.0)
        paused = httpx.get(f"{url}/jobs/{job['id']}").json()
        assert paused["status"] == "running" and paused["pages_failed"] == 0, paused  # not N failed pages
        assert paused["pages_done"] < 5, paused
        engine.let_back.set()  # the supervisor's restart now completes
        final = wait(url, job["id"])
        assert final["status"] == "done" and final["pages_done"] == 5 and final["pages_failed"] == 0, final
        assert engine.starts == 2, engine.starts  # the first start and the supervisor's one restart


def test_ttl_cleanup_removes_rows_and_files(tmp_path: Path) -> None:
    with serve_app(app_with(tmp_path, job_ttl_s=1)) as url:
        job = submit(url, make_pdf(2))
        assert wait(url, job["id"])["status"] == "done"
        folder = tmp_path / "jobs" / job["id"]
        assert (folder / "pages").is_dir() and not (folder / "input").exists()  # the upload goes when it ends
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/jobs/{job['id']}").status_code != 404:
            assert time.monotonic() < deadline, "not removed after JOB_TTL_S"
            time.sleep(0.1)
        assert not folder.exists()
        assert job["id"] not in {j["id"] for j in httpx.get(f"{url}/jobs").json()["jobs"]}


def test_api_keys_guard_every_route_and_jobs_belong_to_their_key(tmp_path: Path) -> None:
    a, b = {"X-API-Key": "key-a"}, {"Authorization": "Bearer key-b"}
    with serve_app(app_with(tmp_path, api_key="key-a,key-b")) as url:
        problem(httpx.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(1))}), 401, "API key")
        job = submit(url, make_pdf(1), headers=a)
        wait(url, job["id"], headers=a)
        for path in ("", "/events", "/result", "/download", "/pages/1"):
            problem(httpx.get(f"{url}/jobs/{job['id']}{path}"), 401, "API key")
            problem(httpx.get(f"{url}/jobs/{job['id']}{path}", headers=b), 404, "no job")
            assert httpx.get(f"{url}/jobs/{job['id']}{path}", headers=a).status_code == 200, path
        problem(httpx.delete(f"{url}/jobs/{job['id']}", headers=b), 404, "no job")
        assert httpx.get(f"{url}/jobs", headers=b).json()["total"] == 0
        assert [j["id"] for j in httpx.get(f"{url}/jobs", headers=a).json()["jobs"]] == [job["id"]]
        import sqlalchemy as sa

        with sa.create_engine(f"sqlite:///{tmp_path / 'jobs.sqlite'}").connect() as conn:
            owner = conn.execute(sa.text("select owner from jobs")).scalar_one()
        assert owner == hashlib.sha256(b"key-a").hexdigest()  # a hash, never the key


class Receiver(http.server.BaseHTTPRequestHandler):
    """Fails the first two deliveries with 500, then answers 204; records what it got."""

    calls: list[tuple[dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.calls.append((dict(self.headers), body))
        self.send_response(500 if len(Receiver.calls) <= 2 else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_webhook_signed_retried_and_hosts_allowed(tmp_path: Path) -> None:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_port}/hook"
    try:
        with serve_app(app_with(tmp_path)) as url:  # WEBHOOK_ALLOW unset: nothing allowed
            problem(httpx.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(1))}, data={"webhook_url": hook}),
                    422, "WEBHOOK_ALLOW")
        settings = {"webhook_allow": f"127.0.0.1:{receiver.server_port}", "webhook_secret": "s3cret",
                    "webhook_backoff_s": 0.05}
        with serve_app(app_with(tmp_path, **settings)) as url:
            problem(httpx.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(1))},
                               data={"webhook_url": "http://169.254.169.254/latest"}), 422, "not allowed")
            job = submit(url, make_pdf(2), webhook_url=hook)
            wait(url, job["id"])
            deadline = time.monotonic() + 10
            while (state := httpx.get(f"{url}/jobs/{job['id']}").json())["webhook"]["status"] != "delivered":
                assert time.monotonic() < deadline, state
                time.sleep(0.05)
            assert state["webhook"]["attempts"] == 3, state
        assert len(Receiver.calls) == 3, Receiver.calls  # two failures, then the one delivery
        for headers, body in Receiver.calls:
            t = headers["X-Signature-256"].split(",")[0].removeprefix("t=")
            expected = f"t={t},v1=" + hmac.new(b"s3cret", t.encode() + b"." + body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-Signature-256"], expected), headers
        summary = json.loads(Receiver.calls[-1][1])
        assert summary["id"] == job["id"] and summary["status"] == "done" and summary["pages_done"] == 2, summary
    finally:
        receiver.shutdown()


def test_job_answer_images_are_capped_like_pdf_ocr(tmp_path: Path) -> None:
    """A job's JSON result leaves images past MAX_ANSWER_MB out, with the warning naming it, as /pdf/ocr does;
    its ZIP download keeps them all."""
    import io
    import zipfile

    figure = "<|ref|>image<|/ref|><|det|>[[100, 100, 800, 600]]<|/det|>\n" + TEXT
    with serve_app(app_with(tmp_path, ReplayEngine(figure), max_answer_mb=0.01)) as url:  # ~10 KB of images
        job = submit(url, make_pdf(3), draw_layouts="true", extract_images="true")
        assert wait(url, job["id"])["status"] == "done"
        r = httpx.get(f"{url}/jobs/{job['id']}/result", timeout=60)
        assert r.status_code == 200, show(r)
        answer = r.json()
        assert any("MAX_ANSWER_MB" in w for w in answer["warnings"]), show(r)
        assert answer["layout_pdf"] is None and len(answer["images"]) < 3, show(r)
        archive = httpx.get(f"{url}/jobs/{job['id']}/download", timeout=60)
        with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
            assert len([n for n in z.namelist() if n.startswith("images/")]) == 3, z.namelist()
