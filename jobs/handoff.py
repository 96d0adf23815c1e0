"""The sync routes' deadline handoff: past PDF_TIMEOUT_S / BATCH_TIMEOUT_S, finished work is not thrown away.

`/pdf/ocr` and `/batch/ocr` run their items here. When the deadline passes, the items still in flight are
cancelled (their engine work aborted), and a job is created from the request's input and the items already
finished (stored as done, never redone); the 504 names it (`job_id`, and in the detail text), and the job
runs the rest. A client that disconnects cancels the request instead: no job, everything aborted.
Without a job runner (it failed to start) this is the plain deadline of `web.deps.deadline`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import images
from errors import DeadlineExceeded, OcrError
from jobs import runner_of
from jobs.spec import JobSpec
from jobs.submit import create_job, document_notes, owner_of
from service.admission import in_window
from service.ocr import OcrService
from service.postprocess import PostOptions
from service.request import OcrRequest
from service.results import DocumentRun, ItemResult
from web import metrics
from web.deps import deadline, read_upload

log = logging.getLogger("deepseek_ocr.jobs")


async def document(
    service: OcrService, req: OcrRequest, data: bytes, options: Any, post: PostOptions, *, filename: str | None
) -> DocumentRun:
    """`service.document` under PDF_TIMEOUT_S, handing the rest to a job at the deadline."""
    settings = service.settings
    runner = runner_of(service)
    if runner is None:
        async with deadline(settings.pdf_timeout_s, "PDF_TIMEOUT_S"):
            return await service.document(req, data, password=options.password, pages=options.pages,
                                          dpi=options.dpi, options=post)
    started = time.perf_counter()
    finished: dict[int, ItemResult] = {}
    async with service.render_pool.document(data, password=options.password, max_pages=settings.max_pdf_pages) as doc:
        selected = images.parse_page_ranges(options.pages, doc.page_count)

        async def one(i: int) -> ItemResult:
            finished[i] = result = await service.page(req, doc, selected[i], dpi=options.dpi, options=post)
            return result

        results = await _within(settings.pdf_timeout_s, range(len(selected)), service.window, one)
        notes = document_notes(doc)
    if results is None:
        from web.answers import download_stem, member_stems

        names = [filename or "document.pdf"]
        spec = JobSpec.of_request("pdf", options, req, post, filenames=names, stems=member_stems(names),
                                  stem=download_stem(filename), warnings=notes)
        job = await _create(runner, owner=_owner(settings), kind="pdf", spec=spec, inputs=[data],
                               items=[{"page": n} for n in selected], filename=filename, page_count=doc.page_count,
                               webhook_url=None, done=finished, started_at=time.time())
        raise _handed_off(job, settings.pdf_timeout_s, "PDF_TIMEOUT_S", len(finished), len(selected))
    return DocumentRun(req.mode.name, doc.page_count, options.dpi, results, notes, started,
                       max_answer_bytes=settings.max_answer_bytes)


async def batch(
    service: OcrService, req: OcrRequest, files: list[Any], names: list[str], stems: list[str], options: Any,
    post: PostOptions,
) -> list[ItemResult]:
    """Every file through `service.file` under BATCH_TIMEOUT_S, handing the rest to a job at the deadline."""
    settings = service.settings
    finished: dict[int, ItemResult] = {}

    async def one(index: int) -> ItemResult:
        read = functools.partial(read_upload, files[index], settings)
        finished[index] = result = await service.file(req, read, post, label=stems[index])
        return result

    runner = runner_of(service)
    if runner is None:
        async with deadline(settings.batch_timeout_s, "BATCH_TIMEOUT_S"):
            return await in_window(range(len(files)), service.window, one)
    results = await _within(settings.batch_timeout_s, range(len(files)), service.window, one)
    if results is not None:
        return results
    blobs = []
    for index, upload in enumerate(files):
        if index in finished:
            blobs.append(b"")  # never read again: the job has its result
            continue
        await upload.seek(0)
        blobs.append(await read_upload(upload, settings))
    spec = JobSpec.of_request("batch", options, req, post, filenames=names, stems=stems)
    job = await _create(runner, owner=_owner(settings), kind="batch", spec=spec, inputs=blobs,
                           items=[{"file": n} for n in names], filename=None, page_count=None, webhook_url=None,
                           done=finished, started_at=time.time())
    raise _handed_off(job, settings.batch_timeout_s, "BATCH_TIMEOUT_S", len(finished), len(files))


async def _within(seconds: float, items: Any, window: int, fn: Callable[[Any], Awaitable[ItemResult]]) -> Any:
    """The items' results, or None when `seconds` passed (the unfinished ones are cancelled then)."""
    try:
        async with asyncio.timeout(seconds):
            return await in_window(items, window, fn)
    except TimeoutError:
        return None


def _owner(settings: Any) -> str:
    scope = metrics.current_scope.get() or {}
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
    return owner_of(settings, headers)


async def _create(runner: Any, **fields: Any) -> dict[str, Any] | None:
    """The job, or None when the job limits refuse it (the answer is then the plain 504)."""
    try:
        return await create_job(runner, **fields)
    except OcrError as exc:
        log.warning("deadline handoff: no job (%s)", exc.detail)
        return None


def _handed_off(job: dict[str, Any] | None, seconds: float, setting: str, done: int, total: int) -> DeadlineExceeded:
    if job is None:
        return DeadlineExceeded(
            f"the request did not finish within {seconds:g} s ({setting}); its engine work was aborted and no job "
            f"could take over (MAX_JOBS_QUEUED / MAX_JOB_PAGES). Send less work per request or raise {setting}"
        )
    job_id = job["id"]
    return DeadlineExceeded(
        f"the request did not finish within {seconds:g} s ({setting}): {done} of {total} items were done. "
        f"The work continues as job {job_id}: follow it at /jobs/{job_id} (events, result, download), "
        f"or send less work per request or raise {setting}",
        job_id=job_id,
        job=f"/jobs/{job_id}",
        headers={"Location": f"/jobs/{job_id}"},
    )
