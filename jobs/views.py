"""What a job looks like to clients: its summary and status document, and the sync routes' answers rebuilt
from its stored page results (the same `web.web/answers.py` functions as `/pdf/ocr` and `/batch/ocr`).

Also how a stored job spec (the form options) becomes the `OcrRequest` and `PostOptions` its pages run with.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from config import Settings
from jobs import results
from outputs.searchable import searchable_from_images, searchable_from_pdf
from service.postprocess import PostOptions
from service.request import OcrRequest
from service.results import BatchRun, DocumentRun


def request_of(settings: Settings, spec: dict[str, Any]) -> OcrRequest:
    """The request the job was admitted with: its model, mode and n-gram guard as they were bound then."""
    return OcrRequest.build(
        settings,
        prompt=spec["prompt"],
        default_prompt=spec["default_prompt"],
        mode=spec.get("mode_name") or spec["mode"],
        max_tokens=spec["max_tokens"],
        ngram=tuple(spec["ngram"]),  # type: ignore[arg-type]
        model=spec.get("model"),
        kind=spec["kind"],
    )


def post_options(spec: dict[str, Any]) -> PostOptions:
    if spec["kind"] == "pdf":
        return PostOptions(draw=spec["draw_layouts"], annotated_format="jpeg", crop=spec["extract_images"])
    return PostOptions(crop=spec["extract_images"], clean_formulas=spec["clean_formulas"])


def iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z") if ts else None


def links(job_id: str) -> dict[str, str]:
    base = f"/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "result": f"{base}/result", "download": f"{base}/download"}


def summary(job: dict[str, Any]) -> dict[str, Any]:
    """The job without its pages: the POST answer, list entries, webhook bodies and terminal events."""
    return {
        "id": job["id"],
        "kind": job["kind"],
        "status": job["status"],
        "filename": job["filename"],
        "pages_total": job["pages_total"],
        "pages_done": job["pages_done"],
        "pages_failed": job["pages_failed"],
        "created_at": iso(job["created_at"]),
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "error": job["error"],
        "links": links(job["id"]),
    }


def eta_s(job: dict[str, Any]) -> float | None:
    """Seconds left at the pace of the pages finished so far (None until one has finished)."""
    if job["status"] != "running" or not job["started_at"] or not job["pages_done"]:
        return None
    rate = (time.time() - job["started_at"]) / job["pages_done"]
    return round(rate * (job["pages_total"] - job["pages_done"]), 1)


def page_entry(row: dict[str, Any]) -> dict[str, Any]:
    where = {"page": row["page"]} if row["page"] is not None else {"index": row["idx"], "file": row["file"]}
    return {
        **where,
        "status": row["status"],
        "finish_reason": row["finish_reason"],
        "completion_tokens": row["tokens"],
        "elapsed_s": row["elapsed"],
        "error": row["error"],
        "attempts": row["attempts"],
        "worker": row["worker"],
    }


def replica(job: dict[str, Any]) -> str | None:
    """The replica running the job now: the holder of its lease while the job is active and the lease live."""
    if job["status"] not in ("queued", "running") or not job["lease_owner"]:
        return None
    return job["lease_owner"] if (job["lease_expires"] or 0) >= time.time() else None


def detail(job: dict[str, Any], pages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        **summary(job),
        "eta_s": eta_s(job),
        "replica": replica(job),
        "webhook": {"status": job["webhook_status"], "attempts": job["webhook_attempts"]} if job["webhook_url"]
        else None,
        "pages": [page_entry(p) for p in pages],
    }


def finished(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pages if p["result_path"] and p["status"] not in ("queued", "running", "cancelled")]


def document_run(
    data_dir: Path, job: dict[str, Any], pages: list[dict[str, Any]], *, max_answer_bytes: int | None = None
) -> DocumentRun:
    """The finished pages as the `DocumentRun` `/pdf/ocr` answers from (read from disk; CPU: worker pool).
    `max_answer_bytes` (MAX_ANSWER_MB) caps the images of the JSON answer built from it, as for /pdf/ocr."""
    spec = json.loads(job["spec"])
    items = [results.load_result(data_dir, p["result_path"]) for p in finished(pages)]
    end = job["finished_at"] or time.time()
    run = DocumentRun(spec["mode_name"], job["page_count"] or 0, spec["dpi"], items, list(spec.get("warnings", [])),
                      time.perf_counter(), max_answer_bytes=max_answer_bytes)
    run.started -= end - (job["started_at"] or job["created_at"])
    return run


def write_searchable(data_dir: Path, job: dict[str, Any], pages: list[dict[str, Any]]) -> None:
    """The searchable PDF(s) of an ended job, from its upload (kept until now): one for a PDF job (the original
    pages with the text laid under them), one per finished image of a batch job."""
    spec = json.loads(job["spec"])
    done = finished(pages)
    if not done:
        return
    folder = results.job_dir(data_dir, job["id"])
    if job["kind"] == "pdf":
        texts = [(p["page"], results.load_result(data_dir, p["result_path"]).text) for p in done]
        source = results.read_input(data_dir, job["id"], 0)
        pdf = searchable_from_pdf(source, texts, password=spec.get("password"))
        results.write_atomic(folder / "searchable.pdf", pdf)
        return
    for p in done:
        item = results.load_result(data_dir, p["result_path"])
        if item.post is None:
            continue
        source = results.read_input(data_dir, job["id"], p["idx"])
        pdf = searchable_from_images([(source, item.text, None)])
        results.write_atomic(folder / "searchable" / f"{p['idx']}.pdf", pdf)


def searchable_of_document(data_dir: Path, job_id: str) -> bytes | None:
    path = results.job_dir(data_dir, job_id) / "searchable.pdf"
    return path.read_bytes() if path.is_file() else None


def batch_run(data_dir: Path, job: dict[str, Any], pages: list[dict[str, Any]]) -> BatchRun:
    spec = json.loads(job["spec"])
    done = finished(pages)
    items = [results.load_result(data_dir, p["result_path"]) for p in done]
    for p, item in zip(done, items, strict=True):
        path = results.job_dir(data_dir, job["id"]) / "searchable" / f"{p['idx']}.pdf"
        if item.post is not None and path.is_file():
            item.post.searchable_pdf = path.read_bytes()
    end = job["finished_at"] or time.time()
    elapsed = round(end - (job["started_at"] or job["created_at"]), 3)
    return BatchRun([spec["filenames"][p["idx"]] for p in done], items, spec["prompt_text"], spec["mode_name"],
                    spec["clean_formulas"], elapsed)
