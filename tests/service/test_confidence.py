"""Per-page `confidence` (issue 28): on every route's page or item answer and in job pages, from the real
PyTorch engine's sampled-token log-probabilities; and an unsure page (a replay engine answering with low
log-probabilities) climbs the retry ladder when CONFIDENCE_RETRY_BELOW is set, as a runaway does."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest
from helpers.images import png_bytes
from helpers.jobs import wait
from helpers.pdfs import make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show

from serve_ocr import create_app

IMAGE = png_bytes(96, 64)
PDF = make_pdf(1)


def check(confidence: dict | None, where: str) -> None:
    """A real summary: log-probabilities are <= 0, the lowest under the mean, the share a fraction."""
    assert confidence is not None, where
    assert confidence["tokens"] >= 1, (where, confidence)
    assert confidence["min_logprob"] <= confidence["mean_logprob"] <= 0, (where, confidence)
    assert 0 <= confidence["low_share"] <= 1, (where, confidence)


@pytest.fixture(scope="module")
def url(tiny_checkpoint: Path):
    with serve_app(create_app(make_settings(tiny_checkpoint, default_max_tokens=4))) as base:
        yield base


def post(url: str, path: str, **kwargs) -> dict:
    r = httpx.post(url + path, timeout=120, **kwargs)
    assert r.status_code in (200, 202), show(r)
    return r.json()


def test_every_route_answers_confidence(url: str) -> None:
    image = {"file": ("a.png", IMAGE, "image/png")}
    pdf = {"file": ("doc.pdf", PDF, "application/pdf")}
    batch = [("files", ("a.png", IMAGE, "image/png")), ("files", ("b.png", IMAGE, "image/png"))]
    check(post(url, "/ocr/image/advanced", files=image)["confidence"], "/ocr/image/advanced")
    check(post(url, "/ocr/image/simple", files=image)["confidence"], "/ocr/image/simple")
    check(post(url, "/generate_with_file", files=image)["confidence"], "/generate_with_file")
    body = {"prompt": "Free OCR.", "image_base64": base64.b64encode(IMAGE).decode()}
    check(post(url, "/generate", json=body)["confidence"], "/generate")
    for page in post(url, "/pdf/ocr", files=pdf)["pages"]:
        check(page["confidence"], "/pdf/ocr page")
    for page in post(url, "/pdf/ocr/simple", files=pdf)["pages"]:
        check(page["confidence"], "/pdf/ocr/simple page")
    for item in post(url, "/batch/ocr", files=batch)["results"]:
        check(item["confidence"], "/batch/ocr item")
    for item in post(url, "/batch/ocr/simple", files=batch)["results"]:
        check(item["confidence"], "/batch/ocr/simple item")
    chat = {"model": "deepseek-ocr", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + body["image_base64"]}},
        {"type": "text", "text": "Free OCR."}]}]}
    check(post(url, "/v1/chat/completions", json=chat)["confidence"], "/v1/chat/completions")


def test_job_pages_and_pages_json_carry_confidence(url: str) -> None:
    job = post(url, "/jobs", files={"file": ("doc.pdf", PDF, "application/pdf")})
    detail = wait(url, job["id"])
    assert detail["status"] == "done", detail
    for page in detail["pages"]:
        check(page["confidence"], "GET /jobs/{id} page")
    r = httpx.get(f"{url}/jobs/{job['id']}/download", timeout=60)
    assert r.status_code == 200, show(r)
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("pages.json"))
    for page in manifest["pages"]:
        check(page["confidence"], "pages.json page")
    result = httpx.get(f"{url}/jobs/{job['id']}/result", timeout=60).json()
    for page in result["pages"]:
        check(page["confidence"], "/jobs/{id}/result page")


def unsure_first(request) -> float:
    """Low log-probabilities for the first attempt (the image n-gram guard 30/90), sure ones for the ladder's
    retries (its first step widens the guard's window to 256 or more)."""
    return -5.0 if request.sampling.ngram_window < 256 else -0.1


@pytest.mark.parametrize("below", [-1.0, None])
def test_unsure_page_climbs_the_ladder(below: float | None) -> None:
    engine = ReplayEngine("Hello world, a page of text.", logprob=unsure_first)
    settings = make_settings(None, confidence_retry_below=below)
    with serve_app(create_app(settings, engine_factory=factory(engine))) as base:
        answer = post(base, "/ocr/image/advanced", files={"file": ("a.png", IMAGE, "image/png")})
        page = post(base, "/pdf/ocr", files={"file": ("doc.pdf", PDF, "application/pdf")})["pages"][0]
    if below is None:  # off (the default): the unsure answer is kept as it is
        assert answer["attempts"] == 1 and answer["confidence"]["mean_logprob"] == -5.0, answer
        assert page["status"] == "ok" and page["attempts"] == 1, page
        assert len(engine.requests) == 2, engine.requests
        return
    assert answer["attempts"] == 2, answer
    assert answer["confidence"]["mean_logprob"] == -0.1 and answer["confidence"]["low_share"] == 0, answer
    assert answer["retries"][0]["mean_logprob"] == -0.1, answer
    assert page["status"] == "retried" and page["attempts"] == 2, page
    assert page["confidence"]["mean_logprob"] == -0.1, page
    assert len(engine.requests) == 4, engine.requests
