"""Creating jobs: limits, the stored input, the page rows, and the pages a sync request already finished.

Used by `POST /jobs` and by the sync routes' deadline handoff (`jobs.handoff`): a job created from a sync
request starts with the pages that request finished, stored as done (one attempt each), so none is redone.
Who owns a job (`owner`, a hash of the API key) is the caller's to say: jobs/ reads no HTTP request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import images
from errors import OcrError, PayloadTooLarge, UnsupportedMediaType
from jobs import quota, results, views
from jobs.spec import JobSpec
from jobs.store import UPLOADING
from pdf.office import office_kind
from service.ocr import OcrService, document_notes
from service.results import ItemResult


class TooManyJobs(OcrError):
    status, slug, title = 429, "too-many-jobs", "Too many jobs are waiting"


async def plan_items(service: OcrService, pages: str | None, password: str | None, kind: str, names: list[str],
                     blobs: list[bytes]) -> tuple[list[dict[str, Any]], int | None, list[str]]:
    """The job's item rows, its page count and the document's notes: a PDF's selected pages (opened in a
    render process), or one row per image of a batch (a PDF or office file there is a 415)."""
    if kind == "pdf":
        async with service.render_pool.document(blobs[0], password=password, max_pages=10**9) as doc:
            items = [{"page": n} for n in images.parse_page_ranges(pages, doc.page_count)]
            return items, doc.page_count, document_notes(doc)
    for name, blob in zip(names, blobs, strict=True):
        if blob[:1024].find(b"%PDF-") >= 0:
            raise UnsupportedMediaType(f"{name} is a PDF; send one PDF per job as `file` (not in `files`)")
        if kind_of := office_kind(blob, name):
            raise UnsupportedMediaType(f"{name} is a {kind_of.upper()} document; send it as `file`, one per job")
    return [{"file": name} for name in names], None, []


def page_fields(result: ItemResult, path: str) -> dict[str, Any]:
    return {
        "status": result.status,
        "finish_reason": result.finish_reason,
        "tokens": result.usage.completion_tokens,
        "elapsed": result.elapsed_s,
        "error": result.error,
        "result_path": path,
        "confidence": result.confidence.summary() if result.confidence is not None else None,
    }


def page_event(row: dict[str, Any], result: ItemResult) -> dict[str, Any]:
    where = {"page": row["page"]} if row.get("page") is not None else {"index": row["idx"], "file": row["file"]}
    return {**where, "status": result.status, "markdown": result.post.markdown if result.post else "",
            "error": result.error}


def progress_event(job: dict[str, Any]) -> dict[str, Any]:
    return {"pages_total": job["pages_total"], "pages_done": job["pages_done"], "pages_failed": job["pages_failed"],
            "eta_s": views.eta_s(job)}


async def create_job(
    runner: Any,
    *,
    owner: str,
    kind: str,
    spec: JobSpec,
    inputs: Sequence[bytes],
    items: list[dict[str, Any]],
    filename: str | None,
    page_count: int | None,
    webhook_url: str | None,
    done: dict[int, ItemResult] | None = None,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Store a new job (its inputs on disk, one row per page) and wake the runner; 413 past MAX_JOB_PAGES, 429 or
    507 past a quota (`jobs.quota`)."""
    settings, store = runner.settings, runner.store
    if len(items) > settings.max_job_pages:
        raise PayloadTooLarge(
            f"the job has {len(items)} pages or files; at most {settings.max_job_pages} are accepted per job "
            "(MAX_JOB_PAGES). Split the document with `pages` or send several jobs",
            pages=len(items), max_job_pages=settings.max_job_pages,
        )
    active = await store.call(store.count_active)
    if active >= settings.max_jobs_queued:
        raise TooManyJobs(
            f"{active} jobs are queued or running (MAX_JOBS_QUEUED={settings.max_jobs_queued}); retry later",
            headers={"Retry-After": "30"},
        )
    data_dir = runner.data_dir
    await asyncio.to_thread(quota.check_new_job, settings, store, data_dir, owner, sum(len(b) for b in inputs))
    job_id = uuid.uuid4().hex
    job = {
        "id": job_id, "owner": owner, "kind": kind, "status": UPLOADING,
        "spec": spec.dump(), "filename": filename, "page_count": page_count,
        "pages_total": len(items),
        "pages_done": 0, "pages_failed": 0, "created_at": time.time(), "started_at": started_at,
        "finished_at": None, "error": None, "webhook_url": webhook_url, "webhook_status": None, "webhook_attempts": 0,
    }
    # The row first, its files after: a file under DATA_DIR/jobs always has a row, and one that fails to be
    # written (a dropped client, a full disk) takes its row and files with it.
    await store.call(store.create, job, [])
    try:
        rows, events = await _write_files(runner, job_id, inputs, items, done or {})
        job["pages_done"] = sum(1 for r in rows if r["status"] != "queued")
        job["pages_failed"] = sum(1 for r in rows if r["status"] == "failed")
        job["status"] = "running" if started_at else "queued"
        if events:
            events.append(("progress", progress_event(job)))
        size = await asyncio.to_thread(quota.folder_bytes, results.job_dir(data_dir, job_id))
        await store.call(store.admit, job_id, job["status"], rows, events, size, job["pages_done"],
                         job["pages_failed"])
    except BaseException as exc:
        # Blocking on purpose: a cancelled handler (the client went away) still removes what it wrote.
        results.remove_job(data_dir, job_id)
        store.delete(job_id)
        if isinstance(exc, OSError):
            raise quota.InsufficientStorage(f"the job's files could not be written under DATA_DIR: {exc}",
                                            setting="DATA_DIR") from exc
        raise
    runner.kick()
    return job



async def _write_files(runner: Any, job_id: str, inputs: Sequence[bytes], items: list[dict[str, Any]],
                       done: dict[int, ItemResult]) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """The job's uploads and the results a sync request already finished, on disk; its page rows and events."""
    data_dir = runner.data_dir
    for index, data in enumerate(inputs):
        await asyncio.to_thread(results.save_input, data_dir, job_id, index, data)
    rows, events = [], []
    for idx, item in enumerate(items):
        # Every row has every column: an executemany takes its columns from the first row.
        row = {"idx": idx, "page": item.get("page"), "file": item.get("file"), "status": "queued", "attempts": 0,
               "finish_reason": None, "tokens": None, "elapsed": None, "error": None, "result_path": None,
               "worker": None, "confidence": None}
        if idx in done:
            path = await asyncio.to_thread(results.save_result, data_dir, job_id, idx, done[idx])
            row.update(page_fields(done[idx], path), attempts=1, worker=runner.page_worker(done[idx]))
            events.append(("page", page_event(row, done[idx])))
        rows.append(row)
    return rows, events
