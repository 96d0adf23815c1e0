"""Self-healing engines and the quarantine of poison inputs, over real HTTP.

A real PyTorch engine (tiny checkpoint) whose worker thread is stopped mid-load comes back without a
restart of the server; a replay engine standing in for a model that crashes on one image shows that image
quarantined after its second crash, while other requests keep being served.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from helpers.images import png_bytes
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show

from serve_ocr import create_app

POISON_SIZE = (333, 222)


def wait_ready(url: str, timeout: float = 60.0, restarts: int = 0) -> dict:
    """/health once it is ready after at least `restarts` restarts (an engine that died and is not yet seen
    dead still answers ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(url + "/health", timeout=5).json()
        if body["ready"] and body["restarts"] >= restarts:
            return body
        time.sleep(0.1)
    raise AssertionError(f"not ready again after {timeout} s: {body}")


def test_torch_engine_worker_stopped_mid_load_comes_back(tiny_checkpoint: Path) -> None:
    app = create_app(make_settings(tiny_checkpoint, default_max_tokens=64, max_concurrency=2))
    with serve_app(app) as url:
        engine = app.state.service.admission.engines[0]

        def ocr(_: int) -> httpx.Response:
            return httpx.post(url + "/ocr/image/simple", files={"file": ("a.png", png_bytes(200, 120))}, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ocr, i) for i in range(6)]
            while engine.batches == 0:  # the load is running
                time.sleep(0.01)
            engine._jobs.put(None)  # the worker thread ends, as it would on a fatal error
            answers = [f.result() for f in futures]
        assert {r.status_code for r in answers} <= {200, 503}, [show(r) for r in answers]
        for r in answers:
            if r.status_code == 503:
                assert r.headers["content-type"].startswith("application/problem+json") and r.headers["retry-after"]
        # On a loaded box all six may have been queued ahead of the stop and answered 200 before the thread
        # ended: the restart then comes just after the last answer.
        health = wait_ready(url, restarts=1)
        assert health["restarts"] >= 1 and health["engines"][0]["ready"], health
        r = ocr(0)
        assert r.status_code == 200, show(r)
        assert engine.runtime is not None and engine._worker.is_alive()


def test_poison_input_is_quarantined_after_two_crashes(tiny_checkpoint: Path) -> None:
    engine = ReplayEngine("# fine\n", crash_on=lambda req: req.image is not None and req.image.size == POISON_SIZE)
    app = create_app(make_settings(tiny_checkpoint), engine_factory=factory(engine))
    poison = {"file": ("poison.png", png_bytes(*POISON_SIZE))}
    with serve_app(app) as url:
        for crash in (1, 2):
            r = httpx.post(url + "/ocr/image/simple", files=poison, timeout=30)
            assert r.status_code == 503 and r.headers.get("retry-after"), show(r)
            assert "crashed on this input" in r.json()["detail"], show(r)
            health = wait_ready(url, restarts=crash)
            assert health["restarts"] == crash, health
        r = httpx.post(url + "/ocr/image/simple", files=poison, timeout=30)
        assert r.status_code == 422, show(r)
        body = r.json()
        assert body["type"].endswith("/quarantined-input") and "crashed the engine 2 times" in body["detail"], body
        # The same picture in another format is the same input.
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(png_bytes(*POISON_SIZE))).save(buf, format="BMP")
        r = httpx.post(url + "/ocr/image/simple", files={"file": ("poison.bmp", buf.getvalue())}, timeout=30)
        assert r.status_code == 422, show(r)
        ok = httpx.post(url + "/ocr/image/simple", files={"file": ("ok.png", png_bytes(64, 48))}, timeout=30)
        assert ok.status_code == 200, show(ok)
        health = httpx.get(url + "/health").json()
        assert health["quarantined"] == 1 and health["restarts"] == 2 and engine.starts == 3, health


LOOP = "<|ref|>text<|/ref|><|det|>[[10, 10, 990, 990]]<|/det|>\n" + "| 1 | 2 |\n" * 40


def ladder_engine(cures: str | None) -> ReplayEngine:
    """Loops (a table row repeated to max_tokens) until the attempt that `cures` names changes its settings."""

    def answer(req) -> str:
        cured = {
            "ngram": req.sampling.ngram_size <= 10,
            "mode": req.mode.name == "base",
            "prompt": req.prompt.endswith("Free OCR."),
        }
        return "# Fine\n" if cures is not None and cured[cures] else LOOP

    engine = ReplayEngine(answer)
    engine.finish_for = lambda text: "stop" if text == "# Fine\n" else "length"
    return engine


def test_retry_ladder_changes_settings_and_keeps_the_page(tiny_checkpoint: Path) -> None:
    from helpers.pdfs import make_pdf

    for cures, status, attempts in (("ngram", "retried", 2), ("mode", "retried", 3), ("prompt", "degraded", 4),
                                    (None, "truncated", 4)):
        engine = ladder_engine(cures)
        app = create_app(make_settings(tiny_checkpoint), engine_factory=factory(engine))
        with serve_app(app) as url:
            r = httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", make_pdf(1))}, data={"dpi": "72"}, timeout=60)
        assert r.status_code == 200, show(r)
        page = r.json()["pages"][0]
        assert (page["status"], page["attempts"]) == (status, attempts), (cures, page)
        changes = [retry["change"] for retry in page["retries"]]
        assert changes == ["n-gram guard 10/256", "mode base, n-gram guard 10/256",
                           "prompt '<image>\\nFree OCR.', n-gram guard 10/256"][: attempts - 1], changes
        sent = [(req.sampling.ngram_size, req.mode.name, req.prompt.endswith("Free OCR.")) for req in engine.requests]
        assert sent == [(20, "gundam", False), (10, "gundam", False), (10, "base", False), (10, "gundam", True)][
            :attempts
        ], sent
        if status == "truncated":  # every attempt ran away: the first one is kept, marked
            assert page["text"] == LOOP and page["finish_reason"] == "length", page
        else:
            assert page["markdown"].startswith("# Fine") and page["finish_reason"] == "stop", page
        assert r.json()["pages_retried"] == (status in ("retried", "degraded")), r.json()


def test_retry_ladder_can_be_turned_off(tiny_checkpoint: Path) -> None:
    from helpers.pdfs import make_pdf

    engine = ladder_engine("ngram")
    app = create_app(make_settings(tiny_checkpoint, retry_ladder=False), engine_factory=factory(engine))
    with serve_app(app) as url:
        r = httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", make_pdf(1))}, data={"dpi": "72"}, timeout=60)
    page = r.json()["pages"][0]
    assert (page["status"], page["attempts"], len(engine.requests)) == ("truncated", 1, 1), page


def test_job_completes_across_an_engine_death(tiny_checkpoint: Path) -> None:
    """A PDF job runs on the real PyTorch engine; its worker stops mid-job; the engine is restarted in place
    and the job completes with every page (the pages caught by the death are run again, none lost)."""
    from helpers.jobs import submit, wait
    from helpers.pdfs import make_pdf

    app = create_app(make_settings(tiny_checkpoint, default_max_tokens=48, max_concurrency=2))
    with serve_app(app) as url:
        engine = app.state.service.admission.engines[0]
        job = submit(url, make_pdf(8), dpi="72")
        while engine.batches < 2:  # pages are running
            time.sleep(0.01)
        engine._jobs.put(None)  # the worker thread ends, as it would on a fatal error
        done = wait(url, job["id"], timeout=180)
        health = httpx.get(url + "/health").json()
    assert done["status"] == "done" and done["pages_done"] == 8, done
    assert [p["status"] for p in done["pages"]].count("failed") == 0, done
    assert health["restarts"] >= 1 and health["ready"], health
