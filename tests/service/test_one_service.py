"""Every face through the one service, over real HTTP: `/v1` (the official `openai` SDK, streaming too)
refuses a quarantined input like the other routes and is counted in `/metrics`; an aborted generation has
one answer per route family; one item status vocabulary in `/openapi.json` and MCP's answers; job results
keep the retry ladder's fields; the jobs gauge has samples while a job runs; an over-long prompt is the
model's typed error, a 400, on the real PyTorch engine.

A replay engine stands in for the model where a test needs a crash, an abort or a slow generation.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import openai
import pymupdf
import pytest
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import mcp_server
from jobs import results as job_results
from serve_ocr import create_app
from service.results import ITEM_STATUSES

POISON_SIZE = (333, 222)
PROBLEM = "application/problem+json"


def png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(url: str | None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": "Free OCR."}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def pdf(pages: int) -> bytes:
    doc = pymupdf.open()
    for n in range(pages):
        doc.new_page(width=200, height=150).insert_text((20, 40), f"page {n + 1}")
    return doc.tobytes()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200, show(r)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_ready(url: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = httpx.get(url + "/health", timeout=5).json()
        if body["ready"]:
            return body
        time.sleep(0.05)
    raise AssertionError(f"not ready again: {body}")


def wait_job(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while True:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def submit(url: str, data: bytes, name: str) -> str:
    r = httpx.post(f"{url}/jobs", files={"file": (name, data)}, timeout=60)
    assert r.status_code == 202, show(r)
    return r.json()["id"]


# --------------------------------------------------------------------------------------- /v1 through the service


def test_v1_crashes_strike_and_quarantine_like_every_route() -> None:
    """Two engine deaths under `/v1` calls quarantine the input (the strikes come from `/v1` itself); then
    `/v1`, streaming or not, refuses it with the 422 the image routes give, before any answer starts."""
    engine = ReplayEngine("# fine\n", crash_on=lambda req: req.image is not None and req.image.size == POISON_SIZE)
    app = create_app(make_settings(None), engine_factory=factory(engine))
    poison = png(*POISON_SIZE)
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        for crash in (1, 2):
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model="deepseek-ocr", messages=chat(data_url(poison)))
            assert info.value.status_code == 503, info.value.body
            assert wait_ready(url)["restarts"] == crash
        for stream in (False, True):
            with pytest.raises(openai.UnprocessableEntityError) as info:
                client.chat.completions.create(model="deepseek-ocr", messages=chat(data_url(poison)), stream=stream)
            assert info.value.code == "quarantined_input", info.value.body
        r = httpx.post(url + "/ocr/image/simple", files={"file": ("p.png", poison)}, timeout=30)
        assert r.status_code == 422 and r.json()["type"].endswith("/quarantined-input"), show(r)
        assert r.json()["detail"] == info.value.body["message"], (r.json(), info.value.body)
        answer = client.chat.completions.create(model="deepseek-ocr", messages=chat(data_url(png())))
        assert answer.choices[0].message.content == "# fine\n", answer


def test_v1_calls_move_the_token_and_item_counters() -> None:
    engine = ReplayEngine("# counted\n")  # usage: 10 prompt, 273 image, 42 completion tokens
    with serve_app(create_app(make_settings(None), engine_factory=factory(engine))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        before = scrape(url)
        client.chat.completions.create(model="deepseek-ocr", messages=chat(data_url(png())))
        chunks = list(client.chat.completions.create(model="deepseek-ocr", messages=chat(data_url(png())),
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "# counted\n", chunks
        after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("ocr_tokens_total", kind="completion") == 2 * 42, after
    assert moved("ocr_tokens_total", kind="image") == 2 * 273, after
    route = "/v1/chat/completions"
    assert moved("ocr_items_total", route=route, mode="gundam", status="ok") == 2, after
    assert moved("ocr_finish_reasons_total", reason="stop") == 2, after


# --------------------------------------------------------------------------------------- one answer for an abort


@pytest.fixture(scope="module")
def aborting() -> str:
    engine = ReplayEngine("# half a page\n", finish_reason="abort")
    with serve_app(create_app(make_settings(None), engine_factory=factory(engine))) as url:
        yield url


def assert_aborted_problem(r: httpx.Response) -> None:
    assert r.status_code == 503 and r.headers["content-type"].startswith(PROBLEM), show(r)
    assert r.json()["type"].endswith("/aborted") and r.headers.get("retry-after"), show(r)


@pytest.mark.parametrize("path", ["/ocr/image/simple", "/ocr/image/advanced"])
def test_an_aborted_image_is_a_503_with_retry_after(aborting: str, path: str) -> None:
    assert_aborted_problem(httpx.post(aborting + path, files={"file": ("a.png", png())}, timeout=30))


def test_an_aborted_generate_is_a_503_with_retry_after(aborting: str) -> None:
    body = {"prompt": "<image>\nFree OCR.", "image_base64": base64.b64encode(png()).decode()}
    assert_aborted_problem(httpx.post(aborting + "/generate", json=body, timeout=30))
    assert_aborted_problem(httpx.post(aborting + "/generate_with_file", files={"file": ("a.png", png())}, timeout=30))


def test_an_aborted_chat_completion_is_a_503_streamed_or_not(aborting: str) -> None:
    client = openai.OpenAI(base_url=aborting + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="deepseek-ocr", messages=chat(data_url(png())))
    assert info.value.status_code == 503 and info.value.code == "aborted", info.value.body
    assert info.value.response.headers.get("retry-after"), info.value.response.headers
    body = {"model": "deepseek-ocr", "messages": chat(data_url(png())), "stream": True}
    r = httpx.post(aborting + "/v1/chat/completions", json=body, timeout=30)  # started: the error is an event
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "aborted", r.text


def test_aborted_items_of_pdfs_batches_and_jobs_are_status_aborted(aborting: str) -> None:
    r = httpx.post(aborting + "/pdf/ocr", files={"file": ("d.pdf", pdf(2))}, timeout=60)
    assert r.status_code == 200, show(r)
    answer = r.json()
    assert [p["status"] for p in answer["pages"]] == ["aborted", "aborted"] and answer["pages_aborted"] == 2, answer
    assert all("aborted" in p["error"] for p in answer["pages"]), answer
    files = [("files", ("a.png", png())), ("files", ("b.png", png(80, 60)))]
    r = httpx.post(aborting + "/batch/ocr", files=files, timeout=60)
    assert r.status_code == 200, show(r)
    items = r.json()["results"]
    assert [i["status"] for i in items] == ["aborted", "aborted"], items
    assert all(i["error"]["type"].endswith("/aborted") and i["error"]["status"] == 503 for i in items), items
    job_id = submit(aborting, pdf(1), "d.pdf")
    job = wait_job(aborting, job_id)
    assert [p["status"] for p in job["pages"]] == ["aborted"] and "aborted" in job["pages"][0]["error"], job
    result = httpx.get(f"{aborting}/jobs/{job_id}/result", timeout=30).json()
    assert result["pages"][0]["status"] == "aborted" and result["pages_aborted"] == 1, result


# --------------------------------------------------------------------------------------- one status vocabulary


def test_openapi_and_mcp_use_the_one_status_vocabulary(aborting: str) -> None:
    schemas = httpx.get(aborting + "/openapi.json", timeout=30).json()["components"]["schemas"]
    pages = schemas["PdfPageModel"]["properties"]["status"]
    files = schemas["BatchFileResult"]["properties"]["status"]
    for prop in (pages, files):
        enum = prop.get("enum") or schemas[prop["$ref"].rsplit("/", 1)[-1]]["enum"]
        assert tuple(enum) == ITEM_STATUSES, prop
    job_page = schemas["JobPage"]["properties"]["status"]["enum"]
    assert set(job_page) == {*ITEM_STATUSES, "queued", "running", "cancelled"}, job_page
    assert all(status in mcp_server.INSTRUCTIONS for status in ITEM_STATUSES), mcp_server.INSTRUCTIONS
    answer = {"page_count": len(ITEM_STATUSES), "pages": [{"page": n, "status": s, "markdown": ""}
                                                          for n, s in enumerate(ITEM_STATUSES, 1)]}
    summary = mcp_server.pdf_markdown(answer, "doc.pdf").splitlines()[0]
    assert all(f"1 {status}" in summary for status in ITEM_STATUSES), summary


# --------------------------------------------------------------------------------------- jobs


LOOP = "<|ref|>text<|/ref|><|det|>[[10, 10, 990, 990]]<|/det|>\n" + "| 1 | 2 |\n" * 40


def test_job_results_keep_the_retry_ladder_fields_like_the_sync_answer(tmp_path: Path) -> None:
    """A page that ran away and was cured by a tighter n-gram guard: `/jobs/{id}/result` shows its attempts
    and retries as `/pdf/ocr` does, and the stored result keeps its mode and worker."""
    engine = ReplayEngine(lambda req: "# Fine\n" if req.sampling.ngram_size <= 10 else LOOP)
    engine.finish_for = lambda text: "stop" if text == "# Fine\n" else "length"
    settings = make_settings(None, data_dir=str(tmp_path))
    with serve_app(create_app(settings, engine_factory=factory(engine))) as url:
        r = httpx.post(url + "/pdf/ocr", files={"file": ("d.pdf", pdf(1))}, timeout=60)
        assert r.status_code == 200, show(r)
        sync = r.json()["pages"][0]
        assert sync["status"] == "retried" and sync["attempts"] == 2, sync
        job_id = submit(url, pdf(1), "d.pdf")
        assert wait_job(url, job_id)["status"] == "done"
        page = httpx.get(f"{url}/jobs/{job_id}/result", timeout=30).json()["pages"][0]
    assert {k: page[k] for k in ("status", "attempts", "retries")} == \
        {k: sync[k] for k in ("status", "attempts", "retries")}, (page, sync)
    stored = job_results.load_result(tmp_path, str(next(tmp_path.glob(f"jobs/{job_id}/pages/0/result.json"))
                                                   .relative_to(tmp_path)))
    assert stored.mode == "gundam" and stored.worker is None and stored.attempts == 2, stored  # inline: no name
    assert stored.retries == sync["retries"], stored.retries


def test_the_jobs_gauge_counts_a_running_job() -> None:
    engine = ReplayEngine("# slow\n", delay_s=0.5, max_concurrency=1)
    with serve_app(create_app(make_settings(None), engine_factory=factory(engine))) as url:
        assert sample(scrape(url), "ocr_jobs", status="running") == 0
        job_id = submit(url, pdf(4), "slow.pdf")
        deadline = time.monotonic() + 60
        seen = 0.0
        while not seen and time.monotonic() < deadline:
            seen = sample(scrape(url), "ocr_jobs", status="running")
        assert seen == 1, scrape(url)
        assert wait_job(url, job_id)["status"] == "done"
        samples = scrape(url)
        assert sample(samples, "ocr_jobs", status="running") == 0 and sample(samples, "ocr_jobs", status="done") == 1


# --------------------------------------------------------------------------------------- typed engine errors


def test_a_prompt_over_max_model_len_is_a_400_from_the_model(tiny_checkpoint: Path) -> None:
    """The model raises `PromptTooLong`; the PyTorch engine maps it by type to a 400 naming MAX_MODEL_LEN."""
    settings = make_settings(tiny_checkpoint, max_model_len=512)
    words = " ".join(f"word{n}" for n in range(2000))
    with serve_app(create_app(settings)) as url:
        r = httpx.post(url + "/generate", json={"prompt": words}, timeout=60)
        assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM), show(r)
        body = r.json()
        assert body["type"].endswith("/prompt-too-long") and "MAX_MODEL_LEN=512" in body["detail"], body
        ok = httpx.post(url + "/generate", json={"prompt": "Hello"}, timeout=60)
        assert ok.status_code == 200, show(ok)
