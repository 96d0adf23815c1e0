"""What a job looks like to clients: its summary and status document, and the sync routes' answers rebuilt
from its stored page results (the same `web/answers.py` functions as `/pdf/ocr` and `/batch/ocr`).

The job's options and names come from its typed spec (`jobs.spec.JobSpec`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

from jobs import results
from jobs.spec import JobSpec
from service.results import BatchRun, DocumentRun


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
        "confidence": row.get("confidence"),
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
    data_dir: Path, job: dict[str, Any], pages: list[dict[str, Any]], *, max_answer_bytes: int | None = None,
    files: bool = False,
) -> DocumentRun:
    """The finished pages as the `DocumentRun` `/pdf/ocr` answers from (read from disk; CPU: worker pool).
    `max_answer_bytes` (MAX_ANSWER_MB) caps the images of the JSON answer built from it, as for /pdf/ocr.
    With `files`, images are paths (`jobs.results.load_result`): the download streams them."""
    spec = JobSpec.load(job["spec"], job["id"])
    items = [results.load_result(data_dir, p["result_path"], files=files) for p in finished(pages)]
    end = job["finished_at"] or time.time()
    run = DocumentRun(spec.mode_name, job["page_count"] or 0, spec.options.dpi, items, list(spec.warnings),
                      time.perf_counter(), max_answer_bytes=max_answer_bytes)
    run.started -= end - (job["started_at"] or job["created_at"])
    return run


async def write_searchable(render_pool: Any, data_dir: Path, job: dict[str, Any], pages: list[dict[str, Any]]) -> None:
    """The searchable PDF(s) of an ended job, from its upload (kept until now): one for a PDF job (the original
    pages with the text laid under them), one per finished image of a batch job. Written by render processes
    (`pdf.render_pool.RenderPool`); files are read and written in threads, off the event loop."""
    spec = JobSpec.load(job["spec"], job["id"])
    done = finished(pages)
    if not done or render_pool.unavailable is not None:  # without PyMuPDF the download has no searchable PDF
        return
    folder = results.job_dir(data_dir, job["id"])
    if job["kind"] == "pdf":
        items = await asyncio.to_thread(lambda: [results.load_result(data_dir, p["result_path"]) for p in done])
        source = await asyncio.to_thread(results.read_input, data_dir, job["id"], 0)
        texts = [(p["page"], item.text) for p, item in zip(done, items, strict=True)]
        pdf = await render_pool.searchable_pdf(source, texts, password=spec.options.password)
        await asyncio.to_thread(results.write_atomic, folder / "searchable.pdf", pdf)
        return
    for p in done:
        item = await asyncio.to_thread(results.load_result, data_dir, p["result_path"])
        if item.post is None:
            continue
        source = await asyncio.to_thread(results.read_input, data_dir, job["id"], p["idx"])
        pdf = await render_pool.searchable_image(source, item.text)
        await asyncio.to_thread(results.write_atomic, folder / "searchable" / f"{p['idx']}.pdf", pdf)


def searchable_of_document(data_dir: Path, job_id: str) -> Path | None:
    path = results.job_dir(data_dir, job_id) / "searchable.pdf"
    return path if path.is_file() else None


def batch_run(data_dir: Path, job: dict[str, Any], pages: list[dict[str, Any]], *, files: bool = False) -> BatchRun:
    """The finished files as `/batch/ocr`'s run; with `files`, images and searchable PDFs are paths (a download
    streams them)."""
    spec = JobSpec.load(job["spec"], job["id"])
    done = finished(pages)
    items = [results.load_result(data_dir, p["result_path"], files=files) for p in done]
    for p, item in zip(done, items, strict=True):
        path = results.job_dir(data_dir, job["id"]) / "searchable" / f"{p['idx']}.pdf"
        if item.post is not None and files and path.is_file():
            item.post.searchable_pdf = path  # type: ignore[assignment]
    end = job["finished_at"] or time.time()
    elapsed = round(end - (job["started_at"] or job["created_at"]), 3)
    return BatchRun([spec.filenames[p["idx"]] for p in done], items, spec.prompt_text, spec.mode_name,
                    spec.options.clean_formulas, elapsed)
