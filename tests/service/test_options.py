"""Options typed once: every OCR route's form fields, `/generate`'s JSON body and the job spec come from the
options model of their kind (service/options.py), read from the real server's /openapi.json; a job's spec is
the typed `JobSpec`, and rows stored before it was typed (a flat dict) still run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pymupdf
import pytest
from helpers.jobs import problem, wait
from helpers.server import make_settings, serve_app, show
from pydantic import BaseModel

from config import DOCUMENT_PROMPT
from jobs import results
from jobs.spec import JobSpec
from jobs.store import Store, default_url
from serve_ocr import create_app
from service.options import (
    BatchOptions,
    BatchSimpleOptions,
    GenerateOptions,
    ImageOptions,
    ImageSimpleOptions,
    JobForm,
    JobOptions,
    PdfOptions,
    PdfSimpleOptions,
)

# route -> (its options model, its file fields)
FORMS: dict[str, tuple[type[BaseModel], set[str]]] = {
    "/generate_with_file": (GenerateOptions, {"file", "files"}),
    "/ocr/image/advanced": (ImageOptions, {"file"}),
    "/ocr/image/simple": (ImageSimpleOptions, {"file"}),
    "/pdf/ocr": (PdfOptions, {"file"}),
    "/pdf/ocr/download": (PdfOptions, {"file"}),
    "/pdf/ocr/simple": (PdfSimpleOptions, {"file"}),
    "/batch/ocr": (BatchOptions, {"files"}),
    "/batch/ocr/download": (BatchOptions, {"files"}),
    "/batch/ocr/simple": (BatchSimpleOptions, {"files"}),
    "/jobs": (JobForm, {"file", "files"}),
}


def pdf(pages: int) -> bytes:
    doc = pymupdf.open()
    for n in range(pages):
        doc.new_page(width=300, height=200).insert_text((30, 60), f"Page {n + 1}", fontsize=18)
    data = doc.tobytes()
    doc.close()
    return data


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("data")
    settings = make_settings(tiny_checkpoint, data_dir=str(data_dir), max_concurrency=4)
    with serve_app(create_app(settings)) as base:
        yield base, data_dir


@pytest.fixture(scope="module")
def openapi(server: tuple[str, Path]) -> dict[str, Any]:
    r = httpx.get(server[0] + "/openapi.json", timeout=60)
    assert r.status_code == 200, show(r)
    return r.json()


def body_schema(openapi: dict[str, Any], path: str, media: str) -> dict[str, Any]:
    schema = openapi["paths"][path]["post"]["requestBody"]["content"][media]["schema"]
    return openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]


def test_every_multipart_route_is_one_options_model_plus_its_files(openapi: dict[str, Any]) -> None:
    multipart = {p for p, item in openapi["paths"].items()
                 if "multipart/form-data" in item.get("post", {}).get("requestBody", {}).get("content", {})}
    assert multipart == set(FORMS), multipart ^ set(FORMS)  # a new form route names its options model here
    for path, (model, files) in FORMS.items():
        props = body_schema(openapi, path, "multipart/form-data")["properties"]
        assert set(props) == set(model.model_fields) | files, (path, set(props) ^ (set(model.model_fields) | files))
        for name, field in model.model_fields.items():
            assert props[name]["description"] == field.description, (path, name, props[name])
            if field.examples == [""]:  # the empty box: what Swagger UI sends untouched means "not set"
                assert props[name]["examples"] == [""], (path, name, props[name])


def test_generate_json_body_is_the_generate_options_plus_the_image(openapi: dict[str, Any]) -> None:
    props = body_schema(openapi, "/generate", "application/json")["properties"]
    assert set(props) == set(GenerateOptions.model_fields) | {"image_base64"}, props
    assert all(p.get("examples") != [""] for p in props.values()), props  # no empty boxes in a JSON body


def test_job_spec_holds_the_job_options_model() -> None:
    assert JobSpec.model_fields["options"].annotation is JobOptions
    # What `POST /jobs` reads beside the options is where to report the end, kept with the job row.
    assert set(JobForm.model_fields) == set(JobOptions.model_fields) | {"webhook_url"}


def test_post_jobs_stores_a_typed_spec_of_the_sent_options(server: tuple[str, Path]) -> None:
    url, data_dir = server
    fields = {"mode": "tiny", "dpi": "72", "max_tokens": "4", "pages": "2", "draw_layouts": "false",
              "ngram_size": "", "prompt": ""}  # "" is an untouched Swagger box: not set
    r = httpx.post(f"{url}/jobs", files={"file": ("two.pdf", pdf(2))}, data=fields, timeout=60)
    assert r.status_code == 202, show(r)
    job_id = r.json()["id"]
    assert wait(url, job_id)["status"] == "done"
    store = Store(default_url(data_dir))
    try:
        spec = JobSpec.load(store.get(job_id)["spec"], job_id)
    finally:
        store.close()
    assert spec.kind == "pdf" and spec.filenames == ["two.pdf"] and spec.stem == "two", spec
    o = spec.options
    assert (o.mode, o.dpi, o.max_tokens, o.pages, o.draw_layouts, o.ngram_size, o.prompt) == \
        ("tiny", 72, 4, "2", False, None, ""), o
    assert spec.prompt_text == DOCUMENT_PROMPT and spec.ngram[0] > 0, spec  # bound: the model's PDF guard


def legacy_row(job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id, "owner": "", "kind": spec.get("kind", "pdf"), "status": "queued", "spec": json.dumps(spec),
        "filename": "old.pdf", "page_count": 2, "pages_total": 2, "pages_done": 0, "pages_failed": 0,
        "created_at": time.time(), "started_at": None, "finished_at": None, "error": None, "webhook_url": None,
        "webhook_status": None, "webhook_attempts": 0,
    }


def page_rows() -> list[dict[str, Any]]:
    return [{"idx": i, "page": i + 1, "file": None, "status": "queued", "attempts": 0, "finish_reason": None,
             "tokens": None, "elapsed": None, "error": None, "result_path": None, "worker": None} for i in range(2)]


def insert(data_dir: Path, job_id: str, spec: dict[str, Any]) -> None:
    """A job row as a server before the typed spec wrote it, into the running server's store."""
    results.save_input(data_dir, job_id, 0, pdf(2))
    store = Store(default_url(data_dir))
    try:
        store.create(legacy_row(job_id, spec), page_rows())
    finally:
        store.close()


def test_a_job_stored_before_the_typed_spec_still_runs(server: tuple[str, Path]) -> None:
    """Decision: pre-typed rows are converted on read (no migration step), so an upgraded server finishes
    the jobs a previous version queued. The flat dict is what `POST /jobs` wrote before."""
    url, data_dir = server
    model = httpx.get(url + "/").json()["models"][0]["name"]
    old = {"kind": "pdf", "prompt": "", "default_prompt": DOCUMENT_PROMPT, "mode": "tiny", "max_tokens": 4,
           "ngram": [20, 50], "dpi": 72, "pages": None, "password": None, "draw_layouts": True,
           "extract_images": True, "clean_formulas": True, "filenames": ["old.pdf"], "stems": ["old"],
           "mode_name": "tiny", "prompt_text": DOCUMENT_PROMPT, "stem": "old", "model": model, "warnings": []}
    insert(data_dir, "0" * 31 + "1", old)
    httpx.get(f"{url}/jobs", timeout=30)  # nothing to kick: the runner's loop finds queued rows itself
    final = wait(url, "0" * 31 + "1")
    assert final["status"] == "done" and final["pages_done"] == 2, final
    result = httpx.get(f"{url}/jobs/{'0' * 31 + '1'}/result", timeout=60)
    assert result.status_code == 200 and [p["page"] for p in result.json()["pages"]] == [1, 2], show(result)
    assert result.json()["mode"] == "tiny", show(result)
    download = httpx.get(f"{url}/jobs/{'0' * 31 + '1'}/download", timeout=60)
    assert download.status_code == 200 and 'old.zip' in download.headers["content-disposition"], show(download)


def test_an_unreadable_spec_fails_the_job_and_is_a_clear_409(server: tuple[str, Path]) -> None:
    url, data_dir = server
    job_id = "0" * 31 + "2"
    insert(data_dir, job_id, {"kind": "pdf", "dpi": "high", "filenames": ["old.pdf"]})
    final = wait(url, job_id)
    assert final["status"] == "failed" and "stored spec" in final["error"] and "dpi" in final["error"], final
    r = httpx.get(f"{url}/jobs/{job_id}/result", timeout=60)
    body = problem(r, 409, "stored spec")
    assert "Submit the job again" in body["detail"] and body["job_id"] == job_id, show(r)
