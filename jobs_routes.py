"""Jobs API: submit a PDF or a batch of images, follow it page by page (SSE), read or download its results,
cancel it. A thin router over `jobs/`: the runner, the store, the files and the answers live there.

Results are the sync routes' answers rebuilt from stored pages (`web/answers.py`): `/jobs/{id}/result` is
shaped like `/pdf/ocr` (or `/batch/ocr`), `/jobs/{id}/download` is `/pdf/ocr/download`'s ZIP (or
`/batch/ocr/download`'s). With API keys set, a job is visible only to the key that made it.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from errors import PROBLEM_MEDIA_TYPE, OcrError, ServiceUnavailable, ValidationFailed
from jobs import events, quota, results, views, webhooks
from jobs.schemas import JobDetail, JobList, JobSummary
from jobs.spec import JobSpec
from jobs.store import ACTIVE, TERMINAL
from jobs.submit import create_job, plan_items
from outputs.archive import stream_zip
from service.options import JobForm
from web.answers import (
    BatchRun,
    attachment,
    batch_members,
    batch_response,
    download_stem,
    member_stems,
    page_model,
    pdf_members,
    pdf_response,
)
from web.deps import KnownFieldsOnly, OfficeDep, ServiceDep, file_field, files_field, owner_of, read_upload
from web.forms import form_of
from web.schemas.batch import BatchFileResult, BatchResponse
from web.schemas.common import Problem
from web.schemas.pdf import PdfOcrResponse, PdfPageModel
from web.status import add_status_routes

_PROBLEM = {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}}
router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    dependencies=[KnownFieldsOnly],
    responses={
        404: {**_PROBLEM, "description": "No such job (or page), or another key's job"},
        409: {**_PROBLEM, "description": "The job is not in a state that allows this (ended, page not done)"},
        429: {**_PROBLEM, "description": "Too many jobs queued (MAX_JOBS_QUEUED, MAX_JOBS_QUEUED_PER_KEY), a key's "
              "quota used up (JOB_QUOTA_JOBS_PER_KEY, JOB_QUOTA_BYTES_PER_KEY), or event streams open "
              "(SSE_MAX_STREAMS_PER_KEY, SSE_MAX_STREAMS)"},
        507: {**_PROBLEM, "description": "No room: DATA_QUOTA_JOBS, DATA_QUOTA_BYTES or DATA_MIN_FREE_GB"},
    },
)
STATUSES = (*ACTIVE, *TERMINAL)
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {events.MEDIA_TYPE: {}}, "description": "`id`, `event` (page, progress, done, failed, "
          "cancelled) and one line of JSON `data` per message"}
}
ZIP_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"application/zip": {}}, "description": "The ZIP"}}


class JobNotFound(OcrError):
    status, slug, title = 404, "job-not-found", "No such job"


class JobConflict(OcrError):
    status, slug, title = 409, "job-conflict", "The job is not in a state that allows this"


def runner_dep(request: Request) -> Any:
    runner = getattr(request.app.state, "jobs", None)
    if runner is None:
        raise ServiceUnavailable("the job runner is not running (the server is starting or stopping)")
    return runner


def owner_filter(request: Request) -> str | None:
    settings = request.app.state.settings
    return owner_of(settings, request.headers) if settings.api_keys else None


async def load_job(request: Request, job_id: str) -> tuple[Any, dict[str, Any]]:
    runner = runner_dep(request)
    job = await runner.store.call(runner.store.get, job_id, owner_filter(request))
    if job is None:
        raise JobNotFound(f"no job {job_id!r} (it never existed, was removed after JOB_TTL_S, or is another key's)")
    return runner, job


def _parameters(s: Any) -> dict[str, str]:
    return {
        "file / files": "One PDF or image as `file`, or several images as `files`",
        "options": "As /pdf/ocr (prompt, mode, dpi, pages, password, max_tokens, draw_layouts, extract_images, "
        "ngram_size/ngram_window) and /batch/ocr (clean_formulas)",
        "webhook_url": f"POSTed the summary when the job ends; allowed hosts: {s.webhook_allow or 'none'} "
        "(WEBHOOK_ALLOW), signed `X-Signature-256: t=<unix>,v1=<hex>` under WEBHOOK_SECRET",
        "limits": f"{s.max_job_pages} pages per job (MAX_JOB_PAGES), {s.max_jobs_queued} jobs queued or running "
        f"(MAX_JOBS_QUEUED), results kept {s.job_ttl_s:g} s after the end (JOB_TTL_S)",
        "replicas": "API servers sharing JOB_STORE_URL (PostgreSQL) and DATA_DIR all answer every job; one that "
        f"dies leaves its jobs to the others after JOB_LEASE_S ({s.job_lease_s:g} s)",
    }


# Before the `/{job_id}` routes, which would otherwise take `status` and `info` for job ids.
add_status_routes(
    router,
    "jobs",
    title="jobs",
    features={"sse": True, "webhooks": True, "resume_after_crash": True, "cancel": True, "replicas": True},
    description="Durable jobs: a PDF or a batch of images submitted once and run page by page in the server; "
    "follow it with Server-Sent Events, read the pages finished so far, cancel it, get a signed webhook.",
    endpoints={
        "POST /jobs": "Submit (multipart): 202 with the job and a Location header",
        "GET /jobs": "Jobs, newest first (limit, offset, status)",
        "GET /jobs/{id}": "Status, counts, ETA, per-page entries",
        "GET /jobs/{id}/events": "SSE: page, progress, then done|failed|cancelled; resume with Last-Event-ID",
        "GET /jobs/{id}/result": "The answer so far, shaped like /pdf/ocr (or /batch/ocr)",
        "GET /jobs/{id}/download": "The ZIP of /pdf/ocr/download (or /batch/ocr/download)",
        "GET /jobs/{id}/pages/{n}": "One page (PDF page number, or batch file index)",
        "GET /jobs/{id}/pages/{n}/image": "A PDF page's image (JPEG, long side <= 1024 px)",
        "DELETE /jobs/{id}": "Cancel a running job (engine work stops, finished pages stay); purge an ended "
        "one: 204, its uploads, results and record gone",
    },
    parameters=_parameters,
    examples=[
        'curl -i -X POST "http://localhost:8000/jobs" -F "file=@report.pdf" -F "dpi=144"',
        'curl -N "http://localhost:8000/jobs/<id>/events"',
        'curl -o report.zip "http://localhost:8000/jobs/<id>/download"',
    ],
)


@router.post(
    "",
    status_code=202,
    response_model=JobSummary,
    responses={202: {"model": JobSummary}},
    summary="Submit a PDF, an image or several images as a job; 202 + Location",
)
async def submit(
    request: Request,
    service: ServiceDep,
    office: OfficeDep,
    form: Annotated[JobForm, Depends(form_of(JobForm))],
    file: Annotated[UploadFile | None, file_field("One PDF or image (or send `files` instead)")] = None,
    files: Annotated[list[UploadFile] | None, files_field("Several images, the field repeated (or send `file`)")]
    = None,
) -> JSONResponse:
    runner = runner_dep(request)
    settings = service.settings
    if (file is None) == (not files):
        raise ValidationFailed("send either `file` (one PDF or image) or `files` (several images), not both or none")
    hook = webhooks.check_url(form.webhook_url, settings.webhook_allow) if form.webhook_url else None
    options = form.job_options()
    uploads = [file] if file is not None else list(files or [])
    blobs = [await read_upload(u, settings) for u in uploads]
    if file is not None:  # an office file (DOCX, PPTX, ...) is stored and run as its PDF
        blobs[0] = await office.as_pdf(blobs[0], file.filename)
    kind = "pdf" if file is not None and blobs[0][:1024].find(b"%PDF-") >= 0 else "batch"
    # Bound to its model: the mode and n-gram guard the pages will run with.
    req = service.admit(options.request(settings, kind=kind))
    names = [u.filename or f"file_{i}" for i, u in enumerate(uploads)]
    items, page_count, warnings = await plan_items(service, options.pages, options.password, kind, names, blobs)
    spec = JobSpec.admitted(kind, options, req, filenames=names, stems=member_stems(names),
                            stem=download_stem(names[0]), warnings=warnings)
    job = await create_job(runner, owner=owner_of(settings, request.headers), kind=kind, spec=spec, inputs=blobs,
                           items=items, filename=names[0] if kind == "pdf" else None, page_count=page_count,
                           webhook_url=hook)
    body = views.summary(job)
    return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})


@router.get("", response_model=JobList, summary="Jobs, newest first, paginated; filter by status")
async def list_jobs(
    request: Request,
    status: Annotated[str | None, Query(description=f"One of {', '.join(STATUSES)}")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> dict[str, Any]:
    if status is not None and status not in STATUSES:
        raise ValidationFailed(f"status {status!r} is not a job status; allowed: {', '.join(STATUSES)}")
    runner = runner_dep(request)
    rows, total = await runner.store.call(runner.store.list, owner_filter(request), status, limit, offset)
    return {"jobs": [views.summary(r) for r in rows], "total": total, "limit": limit, "offset": offset}


@router.get("/{job_id}", response_model=JobDetail, summary="A job: status, counts, ETA and per-page entries")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    runner, job = await load_job(request, job_id)
    return views.detail(job, await runner.store.call(runner.store.pages, job_id))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses=SSE_RESPONSE,
    summary="Server-Sent Events: page, progress, then one of done/failed/cancelled",
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id")] = None,
    after: Annotated[
        int | None, Query(ge=0, le=10**12, description="Resume after this event id (without the header)")
    ] = None,
) -> Response:
    runner, _ = await load_job(request, job_id)
    start = events.last_event_id(last_event_id, after)
    key = owner_filter(request) or f"client:{request.client.host if request.client else ''}"
    return events.response(events.streams_of(request.app, runner), key, job_id, start)


@router.get("/{job_id}/result", response_model=PdfOcrResponse | BatchResponse,
            summary="The job's answer so far, shaped like /pdf/ocr (or /batch/ocr)")
async def job_result(request: Request, job_id: str) -> Any:
    runner, job = await load_job(request, job_id)
    pages = await runner.store.call(runner.store.pages, job_id)
    if job["kind"] == "pdf":
        run = await asyncio.to_thread(views.document_run, runner.data_dir, job, pages,
                                    max_answer_bytes=runner.settings.max_answer_bytes)
        return await asyncio.to_thread(pdf_response, run)
    return batch_response(await asyncio.to_thread(views.batch_run, runner.data_dir, job, pages))


@router.get(
    "/{job_id}/download",
    response_class=Response,
    responses=ZIP_RESPONSE,
    summary="The ZIP of /pdf/ocr/download (or /batch/...)",
)
async def job_download(request: Request, job_id: str) -> Response:
    """Streamed: members are read from the job's files as the ZIP is sent (`outputs.archive.stream_zip`)."""
    runner, job = await load_job(request, job_id)
    pages = await runner.store.call(runner.store.pages, job_id)
    if job["kind"] == "pdf":
        stem = JobSpec.load(job["spec"], job_id).stem
        run = await asyncio.to_thread(views.document_run, runner.data_dir, job, pages, files=True)
        searchable = await asyncio.to_thread(views.searchable_of_document, runner.data_dir, job_id)
        members, name = pdf_members(run, stem, searchable), f"{stem}.zip"
    else:
        run = await asyncio.to_thread(views.batch_run, runner.data_dir, job, pages, files=True)
        members, name = batch_members(run), "batch_results.zip"
    return StreamingResponse(stream_zip(members), media_type="application/zip",
                             headers={"Content-Disposition": attachment(name)})


@router.get("/{job_id}/pages/{n}", response_model=PdfPageModel | BatchFileResult,
            summary="One page's result: a PDF page number, or a batch file's index")
async def job_page(request: Request, job_id: str, n: int) -> Any:
    runner, job, row = await finished_page(request, job_id, n)
    item = await asyncio.to_thread(results.load_result, runner.data_dir, row["result_path"])
    if job["kind"] == "pdf":
        return page_model(item)
    filename = JobSpec.load(job["spec"], job_id).filenames[n]
    body = batch_response(BatchRun([filename], [item], "", "", False, 0.0)).results[0]
    return BatchFileResult(**{**body.model_dump(), "index": n})


@router.get("/{job_id}/pages/{n}/image", response_class=FileResponse,
            responses={200: {"content": {"image/jpeg": {}}, "description": "The page as it was rendered"}},
            summary="A PDF page's image as rendered (JPEG, long side <= 1024 px)")
async def job_page_image(request: Request, job_id: str, n: int) -> FileResponse:
    runner, _, row = await finished_page(request, job_id, n)
    if (path := await asyncio.to_thread(results.preview_path, runner.data_dir, row["result_path"])) is None:
        raise JobNotFound(f"page {n} of job {job_id} has no image (image jobs and pages that failed to render don't)")
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def finished_page(request: Request, job_id: str, n: int) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    runner, job = await load_job(request, job_id)
    pages = await runner.store.call(runner.store.pages, job_id)
    key = "page" if job["kind"] == "pdf" else "idx"
    if (row := next((p for p in pages if p[key] == n), None)) is None:
        allowed = "its selected page numbers" if key == "page" else f"file indexes 0..{len(pages) - 1}"
        raise JobNotFound(f"job {job_id} has no page {n}; allowed: {allowed}")
    if not views.finished([row]):
        raise JobConflict(f"page {n} of job {job_id} is {row['status']}; it has no result", page_status=row["status"])
    return runner, job, row


@router.delete(
    "/{job_id}",
    response_model=JobSummary,
    responses={204: {"description": "The job had ended: its uploads, results and record are gone"}},
    summary="Cancel a running job (finished pages stay readable), or purge an ended one (204)",
)
async def cancel_job(request: Request, job_id: str) -> Any:
    runner, job = await load_job(request, job_id)
    if job["status"] in TERMINAL:
        await runner.store.call(quota.purge, runner.store, runner.data_dir, job_id)
        return Response(status_code=204)
    await runner.cancel(job)
    fresh = await runner.store.call(runner.store.get, job_id)
    return views.summary(fresh or job)
