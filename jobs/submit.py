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

from errors import OcrError, PayloadTooLarge
from jobs import results, views
from jobs.spec import JobSpec
from service.results import ItemResult


class TooManyJobs(OcrError):
    status, slug, title = 429, "too-many-jobs", "Too many jobs are waiting"


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
    """Store a new job (its inputs on disk, one row per page) and wake the runner; 413/429 over the limits."""
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
    job_id = uuid.uuid4().hex
    data_dir = runner.data_dir
    for index, data in enumerate(inputs):
        await asyncio.to_thread(results.save_input, data_dir, job_id, index, data)
    done = done or {}
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
    finished = sum(1 for r in rows if r["status"] != "queued")
    failed = sum(1 for r in rows if r["status"] == "failed")
    job = {
        "id": job_id, "owner": owner, "kind": kind, "status": "running" if started_at else "queued",
        "spec": spec.dump(), "filename": filename, "page_count": page_count,
        "pages_total": len(items),
        "pages_done": finished, "pages_failed": failed, "created_at": time.time(), "started_at": started_at,
        "finished_at": None, "error": None, "webhook_url": webhook_url, "webhook_status": None, "webhook_attempts": 0,
    }
    if events:
        events.append(("progress", progress_event(job)))
    await store.call(store.create, job, rows, events)
    runner.kick()
    return job

