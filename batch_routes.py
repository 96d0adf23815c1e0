"""Batch OCR routes: many images in one request, one markdown per image, as JSON or as a ZIP.

For dataset builders and evaluators (OmniDocBench style). Every file goes through the service as its own
item: read and decoded in the worker pool (at most a window of files per request at once), generated on
an engine slot, post-processed. A file that fails becomes a `failed` entry with its problem document;
the batch still answers 200. An engine that is not ready is a 503 for the whole batch. The whole batch runs
under BATCH_TIMEOUT_S: past it the answer is 504, the files in flight are aborted, and the finished ones
go to a job (named in the 504) that runs the rest.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, UploadFile
from fastapi.responses import Response

from config import DOCUMENT_PROMPT, FREE_PROMPT, MODES, NGRAM_BATCH, Settings
from errors import PayloadTooLarge
from service.ocr import OcrService
from service.options import BatchOptions, BatchSimpleOptions
from service.postprocess import PostOptions
from service.run import Deadline
from web.answers import BatchRun, attachment, batch_response, batch_simple_response, batch_zip, member_stems
from web.deps import KnownFieldsOnly, OwnerDep, ServiceDep, files_field, upload_reader
from web.forms import form_of
from web.schemas.batch import BatchResponse, BatchSimpleResponse
from web.status import add_status_routes
from web.timing import stamped

router = APIRouter(prefix="/batch", tags=["batch OCR"], dependencies=[KnownFieldsOnly])

ZIP_FILENAME = "batch_results.zip"
_ZIP_DESCRIPTION = (
    "ZIP `batch_results.zip`: per file `{stem}.md` (markdown), `{stem}_det.md` (raw output), "
    "`{stem}_searchable.pdf` (the image with its text, searchable), figure crops `images/{stem}_{n}.jpg`, "
    "`{stem}.error.json` for a failed file, and `summary.json`"
)

FilesField = Annotated[
    list[UploadFile],
    files_field("Images (repeat the field): PNG, JPEG, WebP, TIFF, BMP, GIF. PDFs go to `/pdf/ocr` or `/jobs`"),
]
FullOptions = Annotated[BatchOptions, Depends(form_of(BatchOptions))]


async def run_batch(
    service: OcrService, files: list[UploadFile], options: BatchSimpleOptions, post: PostOptions, owner: str
) -> BatchRun:
    """Refuse a bad batch as a whole, then every file through the service; results in input order."""
    settings = service.settings
    if len(files) > settings.max_batch_files:
        raise PayloadTooLarge(
            f"the batch has {len(files)} files; at most {settings.max_batch_files} are accepted per request "
            "(MAX_BATCH_FILES). Split it into smaller batches",
            files=len(files),
            max_batch_files=settings.max_batch_files,
        )
    req = service.admit(options.request(settings))
    names = [f.filename or "" for f in files]
    stems = member_stems(names)

    start = time.perf_counter()
    # Under BATCH_TIMEOUT_S; past it the finished files go to a job (`owner`'s) that the 504 names.
    results = await service.batch(req, [upload_reader(f, settings) for f in files], post, labels=stems,
                                  filenames=names, owner=owner,
                                  deadline=Deadline(settings.batch_timeout_s, "BATCH_TIMEOUT_S"), form=options)
    elapsed = round(time.perf_counter() - start, 3)
    return BatchRun(names, results, req.prompt, req.mode.name, post.clean_formulas, elapsed)


@router.post("/ocr", response_model=BatchResponse, summary="OCR many images to markdown (JSON, one entry per file)")
async def batch_ocr(service: ServiceDep, files: FilesField, options: FullOptions, owner: OwnerDep) -> BatchResponse:
    run = await run_batch(service, files, options, PostOptions(clean_formulas=options.clean_formulas), owner)
    return stamped(batch_response(run))


@router.post(
    "/ocr/download",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": _ZIP_DESCRIPTION}},
    summary="OCR many images and download the markdown, raw output, figure crops and summary as a ZIP",
)
async def batch_ocr_download(service: ServiceDep, files: FilesField, options: FullOptions, owner: OwnerDep) -> Response:
    post = PostOptions(crop=True, clean_formulas=options.clean_formulas, searchable=True)
    run = await run_batch(service, files, options, post, owner)
    archive = await service.blocking(batch_zip, run)
    return Response(archive, media_type="application/zip", headers={"Content-Disposition": attachment(ZIP_FILENAME)})


@router.post("/ocr/simple", response_model=BatchSimpleResponse, summary="Plain text of many images (JSON)")
async def batch_ocr_simple(
    service: ServiceDep,
    files: FilesField,
    options: Annotated[BatchSimpleOptions, Depends(form_of(BatchSimpleOptions))],
    owner: OwnerDep,
) -> BatchSimpleResponse:
    return stamped(batch_simple_response(await run_batch(service, files, options, PostOptions(), owner)))


def _parameters(s: Settings) -> dict[str, str]:
    return {
        "files": f"The images, field repeated; at most {s.max_batch_files} files (MAX_BATCH_FILES), "
        f"{s.max_upload_mb:g} MB each (MAX_UPLOAD_MB), {s.max_batch_mb:g} MB in all (MAX_BATCH_MB)",
        "prompt": f"Default {DOCUMENT_PROMPT!r} (ocr, download), {FREE_PROMPT!r} (simple)",
        "mode": f"One of {', '.join(MODES)}; default {s.default_mode.name}",
        "clean_formulas": "true/false, default true: drop `\\quad (n)` tags inside `\\[...\\]` (ocr, download)",
        "max_tokens": f"1..{s.max_model_len} per file; default {min(s.default_max_tokens, s.max_model_len)}",
        "ngram_size / ngram_window": f"No-repeat guard, default {NGRAM_BATCH[0]}/{NGRAM_BATCH[1]} "
        "(the reference batch-eval settings); 0 = off",
        "timeout": f"The whole batch must finish within {s.batch_timeout_s:g} s (BATCH_TIMEOUT_S), else 504",
    }


add_status_routes(
    router,
    "batch",
    title="batch OCR",
    features={"zip_download": True, "clean_formulas": True, "crops": True},
    description="OCR of many images in one request: one markdown per image in input order, formulas "
    "cleaned, as JSON or as a ZIP. A file that fails gets its own `failed` entry; the batch still answers.",
    endpoints={
        "POST /batch/ocr": "Markdown and raw output per file (JSON)",
        "POST /batch/ocr/download": f"The same as a ZIP ({ZIP_FILENAME}) with figure crops and summary.json",
        "POST /batch/ocr/simple": "Plain text per file (JSON)",
        "GET /batch/status": "Readiness, engine, modes, limits",
        "GET /batch/info": "This page",
    },
    parameters=_parameters,
    examples=[
        'curl -X POST "http://localhost:8000/batch/ocr" -F "files=@img1.jpg" -F "files=@img2.jpg"',
        'curl -X POST "http://localhost:8000/batch/ocr/download" -F "files=@img1.jpg" -F "files=@img2.jpg" '
        "-o results.zip",
        'curl -X POST "http://localhost:8000/batch/ocr/simple" -F "files=@img1.jpg" -F "files=@img2.jpg"',
    ],
)
