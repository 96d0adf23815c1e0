"""Batch OCR routes: many images in one request, one markdown per image, as JSON or as a ZIP.

For dataset builders and evaluators (OmniDocBench style). Every file runs as its own task: it waits for an
engine slot (`engine.reserve()`), so at most MAX_CONCURRENCY files are read and decoded at a time, is decoded
in the worker pool, generated (the engine batches concurrent sequences), and post-processed in the pool. A file
that fails becomes an `error` entry with its problem document; the batch answers 200 all the same. The whole
batch runs under BATCH_TIMEOUT_S: past it the answer is 504 and every file's engine work is aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from PIL import Image

import inputs
import ocr_utils
from batch_schemas import (
    BatchFileResult,
    BatchResponse,
    BatchSimpleResponse,
    BatchSimpleResult,
    BatchSummary,
    BatchSummaryFile,
    BatchTotals,
    ZipMembers,
)
from config import DOCUMENT_PROMPT, FREE_PROMPT, MODES, NGRAM_BATCH, ModeSpec, Settings
from deps import (
    PROMPT_MAX_CHARS,
    EngineDep,
    MaxTokensForm,
    ModeForm,
    NgramSizeForm,
    NgramWindowForm,
    SettingsDep,
    deadline,
    make_request,
    normalize_prompt,
    read_upload,
    resolve_mode,
    run_blocking,
)
from engine import BaseEngine, Usage
from errors import OcrError, PayloadTooLarge
from pipeline import PagePost, page_status, postprocess
from router_status import route_info, route_status
from schemas import RouteInfo, RouteStatus, UsageModel

log = logging.getLogger("deepseek_ocr.batch")
router = APIRouter(prefix="/batch", tags=["batch OCR"])

ZIP_FILENAME = "batch_results.zip"
SUMMARY_MEMBER = "summary.json"
MAX_STEM = 80  # leaves room for "_det.md" / ".error.json" under ocr_utils' 100-character part cap
_ZIP_DESCRIPTION = (
    "ZIP `batch_results.zip`: per file `{stem}.md` (markdown), `{stem}_det.md` (raw output), figure crops "
    "`images/{stem}_{n}.jpg`, `{stem}.error.json` for a failed file, and `summary.json`"
)

FilesField = Annotated[list[UploadFile], File(description="Images (repeat the field): PNG, JPEG, WebP, TIFF, BMP, GIF")]
CleanField = Annotated[bool, Form(description="Clean formulas: drop `\\quad (n)` tags inside `\\[...\\]`")]


@dataclass(frozen=True)
class BatchOptions:
    """The form fields every batch route takes besides the files."""

    prompt: str
    mode: str | None
    max_tokens: int | None
    ngram: tuple[int, int]


def batch_options(
    prompt: Annotated[
        str,
        Form(
            max_length=PROMPT_MAX_CHARS, description="Default: the document-to-markdown prompt; `Free OCR.` for /simple"
        ),
    ] = "",
    mode: ModeForm = None,
    max_tokens: MaxTokensForm = None,
    ngram_size: NgramSizeForm = NGRAM_BATCH[0],
    ngram_window: NgramWindowForm = NGRAM_BATCH[1],
) -> BatchOptions:
    return BatchOptions(prompt, mode, max_tokens, (ngram_size, ngram_window))


OptionsDep = Annotated[BatchOptions, Depends(batch_options)]


@dataclass(frozen=True)
class Output:
    """What a route makes of each file."""

    default_prompt: str
    plain: bool = False  # plain text instead of markdown
    crops: bool = False  # figure crops for the ZIP


MARKDOWN = Output(DOCUMENT_PROMPT)
ZIPPED = Output(DOCUMENT_PROMPT, crops=True)
PLAIN = Output(FREE_PROMPT, plain=True)


@dataclass(frozen=True)
class BatchPlan:
    """What every file of one batch gets, validated once before any file is touched."""

    prompt: str
    mode: ModeSpec
    max_tokens: int | None
    ngram: tuple[int, int]
    stems: list[str]
    output: Output
    clean_formulas: bool


@dataclass
class FileOutcome:
    index: int
    filename: str
    stem: str
    status: str = "error"  # until the file has gone through; a failure leaves it so
    error: dict[str, Any] | None = None
    raw: str = ""
    markdown: str = ""
    plain: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    width: int | None = None
    height: int | None = None
    crops: list[ocr_utils.Crop] = field(default_factory=list)


@dataclass
class BatchRun:
    plan: BatchPlan
    outcomes: list[FileOutcome]
    elapsed_s: float


# --------------------------------------------------------------------------- planning and names


def make_plan(
    files: list[UploadFile],
    options: BatchOptions,
    settings: Settings,
    engine: BaseEngine,
    output: Output,
    clean_formulas: bool = True,
) -> BatchPlan:
    """Refuse a bad batch as a whole (too many files, bad parameters) before any file is read."""
    if len(files) > settings.max_batch_files:
        raise PayloadTooLarge(
            f"the batch has {len(files)} files; at most {settings.max_batch_files} are accepted per request "
            "(MAX_BATCH_FILES). Split it into smaller batches",
            files=len(files),
            max_batch_files=settings.max_batch_files,
        )
    spec = resolve_mode(options.mode, settings)
    engine.check_mode(spec)
    prompt = normalize_prompt(options.prompt, output.default_prompt, has_image=True)
    # Validates max_tokens and the n-gram pair now, so a bad value is one 422, not N per-file errors.
    make_request(settings, prompt=prompt, image=None, mode=spec, max_tokens=options.max_tokens, ngram=options.ngram)
    stems = member_stems([f.filename or "" for f in files])
    return BatchPlan(prompt, spec, options.max_tokens, options.ngram, stems, output, clean_formulas)


def stem_members(stem: str) -> tuple[str, str, str]:
    return f"{stem}.md", f"{stem}_det.md", f"{stem}.error.json"


def member_stems(filenames: list[str]) -> list[str]:
    """One stem per file, distinct (case-insensitively) and safe, at the ZIP's root.

    Each name goes through `ocr_utils.safe_member_name` (no absolute paths, `..`, backslashes or control
    characters), is flattened (folders become `_`, so `{stem}.md` sits beside `images/` and its links resolve)
    and loses its extension. A stem is taken only when all of its members are free: `x_det.png` must not
    overwrite the `x_det.md` of `x.png`. Crops `images/{stem}_{n}.jpg` of distinct stems never collide.
    """
    used: set[str] = {SUMMARY_MEMBER}
    stems: list[str] = []
    for index, name in enumerate(filenames):
        flat = ocr_utils.safe_member_name(name or f"file_{index}", set()).replace("/", "_")
        candidate = (flat.rpartition(".")[0] or flat)[:MAX_STEM].rstrip(". ") or f"file_{index}"
        while True:
            stem = ocr_utils.safe_member_name(f"{candidate}.md", used).removesuffix(".md")
            others = [m.casefold() for m in stem_members(stem)[1:]]
            if not used.intersection(others):
                used.update(others)
                stems.append(stem)
                break
    return stems


def render_markdown(text: str, image: Image.Image, stem: str, *, clean_formulas: bool, crops: bool) -> PagePost:
    """Markdown of one file as the reference batch-eval writes it; figure links and crops named by `stem`.

    `page=stem` makes `ocr_utils.image_name` give `images/{stem}_{n}.jpg` to both links and crops.
    """
    post = postprocess(text, image, page=stem, crop=crops)
    if clean_formulas:
        post.markdown = ocr_utils.clean_formula(post.markdown)
    return post


# --------------------------------------------------------------------------- running


async def run_batch(
    request: Request, engine: BaseEngine, settings: Settings, files: list[UploadFile], plan: BatchPlan
) -> BatchRun:
    """All files concurrently, results in input order; 504 with every task cancelled past BATCH_TIMEOUT_S."""
    start = time.perf_counter()
    async with deadline(settings.batch_timeout_s, "BATCH_TIMEOUT_S"), asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(process_file(request, engine, settings, plan, index, upload))
            for index, upload in enumerate(files)
        ]
    return BatchRun(plan, [t.result() for t in tasks], round(time.perf_counter() - start, 3))


async def process_file(
    request: Request, engine: BaseEngine, settings: Settings, plan: BatchPlan, index: int, upload: UploadFile
) -> FileOutcome:
    """One file from bytes to output. Its own failure is recorded in the outcome, never raised."""
    outcome = FileOutcome(index, upload.filename or "", plan.stems[index])
    try:
        # The slot comes first so that no more than MAX_CONCURRENCY files sit in memory as bytes or pixels.
        async with engine.reserve():
            data = await read_upload(upload, settings)
            image = await run_blocking(request, inputs.decode_image, data, max_pixels=settings.max_image_pixels)
            del data
            outcome.width, outcome.height = image.size
            req = make_request(
                settings, prompt=plan.prompt, image=image, mode=plan.mode, max_tokens=plan.max_tokens, ngram=plan.ngram
            )
            result = await engine.generate(req)
            outcome.raw, outcome.finish_reason, outcome.usage = result.text, result.finish_reason, result.usage
            await finish_file(request, plan, outcome, image)
        outcome.status = page_status(result.finish_reason)
    except OcrError as exc:
        log.info("batch file %d (%s) failed: %s", index, outcome.filename, exc.detail)
        outcome.error = exc.to_problem()
    except Exception as exc:  # a bug on one file's data must not sink the other files of the batch
        log.exception("batch file %d (%s) hit a bug", index, outcome.filename)
        outcome.error = OcrError(f"internal error ({type(exc).__name__}) on this file; this is a bug").to_problem()
    return outcome


async def finish_file(request: Request, plan: BatchPlan, outcome: FileOutcome, image: Image.Image) -> None:
    if plan.output.plain:
        outcome.plain = await run_blocking(request, ocr_utils.plain_text, outcome.raw)
        return
    post = await run_blocking(
        request,
        render_markdown,
        outcome.raw,
        image,
        outcome.stem,
        clean_formulas=plan.clean_formulas,
        crops=plan.output.crops,
    )
    outcome.markdown, outcome.crops = post.markdown, post.crops


# --------------------------------------------------------------------------- answers


def totals(outcomes: list[FileOutcome]) -> dict[str, Any]:
    used = [o.usage for o in outcomes if o.usage is not None]
    return BatchTotals(
        files=len(outcomes),
        ok=sum(o.status == "ok" for o in outcomes),
        truncated=sum(o.status == "truncated" for o in outcomes),
        failed=sum(o.status == "error" for o in outcomes),
        usage=UsageModel(
            prompt_tokens=sum(u.prompt_tokens for u in used),
            image_tokens=sum(u.image_tokens for u in used),
            completion_tokens=sum(u.completion_tokens for u in used),
        ),
    ).model_dump()


def usage_of(outcome: FileOutcome) -> UsageModel | None:
    return UsageModel(**vars(outcome.usage)) if outcome.usage is not None else None


def file_fields(o: FileOutcome) -> dict[str, Any]:
    return {
        "index": o.index,
        "filename": o.filename,
        "status": o.status,
        "error": o.error,
        "finish_reason": o.finish_reason,
        "usage": usage_of(o),
        "width": o.width,
        "height": o.height,
    }


def batch_response(run: BatchRun) -> BatchResponse:
    results = [BatchFileResult(markdown=o.markdown, text=o.raw, **file_fields(o)) for o in run.outcomes]
    return BatchResponse(results=results, elapsed_s=run.elapsed_s, **totals(run.outcomes))


def simple_response(run: BatchRun) -> BatchSimpleResponse:
    results = [
        BatchSimpleResult(index=o.index, filename=o.filename, text=o.plain, status=o.status, error=o.error)
        for o in run.outcomes
    ]
    return BatchSimpleResponse(results=results, elapsed_s=run.elapsed_s, **totals(run.outcomes))


def zip_members(run: BatchRun) -> list[tuple[str, bytes]]:
    """`summary.json` first, then each file's members in input order. Names are final (see `member_stems`)."""
    members: list[tuple[str, bytes]] = []
    entries: list[BatchSummaryFile] = []
    for o in run.outcomes:
        markdown, raw, error = stem_members(o.stem)
        if o.status == "error":
            names = ZipMembers(error=error)
            members.append((error, json.dumps(o.error, indent=2, ensure_ascii=False).encode()))
        else:
            names = ZipMembers(markdown=markdown, raw=raw, images=[c.name for c in o.crops])
            members += [(markdown, o.markdown.encode()), (raw, o.raw.encode())]
            members += [(c.name, c.jpeg) for c in o.crops]
        entries.append(BatchSummaryFile(members=names, **file_fields(o)))
    summary = BatchSummary(
        results=entries,
        elapsed_s=run.elapsed_s,
        prompt=run.plan.prompt,
        mode=run.plan.mode.name,
        clean_formulas=run.plan.clean_formulas,
        **totals(run.outcomes),
    )
    return [(SUMMARY_MEMBER, summary.model_dump_json(indent=2).encode()), *members]


# --------------------------------------------------------------------------- routes


@router.post("/ocr", response_model=BatchResponse, summary="OCR many images to markdown (JSON, one entry per file)")
async def batch_ocr(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    files: FilesField,
    options: OptionsDep,
    clean_formulas: CleanField = True,
) -> BatchResponse:
    plan = make_plan(files, options, settings, engine, MARKDOWN, clean_formulas)
    return batch_response(await run_batch(request, engine, settings, files, plan))


@router.post(
    "/ocr/download",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": _ZIP_DESCRIPTION}},
    summary="OCR many images and download the markdown, raw output, figure crops and summary as a ZIP",
)
async def batch_ocr_download(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    files: FilesField,
    options: OptionsDep,
    clean_formulas: CleanField = True,
) -> Response:
    plan = make_plan(files, options, settings, engine, ZIPPED, clean_formulas)
    run = await run_batch(request, engine, settings, files, plan)
    archive = await run_blocking(request, ocr_utils.build_zip, zip_members(run))
    return Response(
        archive,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{ZIP_FILENAME}"'},
    )


@router.post("/ocr/simple", response_model=BatchSimpleResponse, summary="Plain text of many images (JSON)")
async def batch_ocr_simple(
    request: Request, engine: EngineDep, settings: SettingsDep, files: FilesField, options: OptionsDep
) -> BatchSimpleResponse:
    plan = make_plan(files, options, settings, engine, PLAIN, clean_formulas=False)
    return simple_response(await run_batch(request, engine, settings, files, plan))


@router.get("/status", response_model=RouteStatus, summary="Batch OCR readiness, engine, modes and limits")
async def status(request: Request) -> RouteStatus:
    return route_status(request, "batch", features={"zip_download": True, "clean_formulas": True, "crops": True})


@router.get("/info", response_model=RouteInfo, summary="How to use the batch OCR routes")
async def info(request: Request) -> RouteInfo:
    s: Settings = request.app.state.settings
    return route_info(
        request,
        "batch",
        description="OCR of many images in one request: one markdown per image in input order, formulas "
        "cleaned, as JSON or as a ZIP. A file that fails gets its own error entry; the batch still answers.",
        endpoints={
            "POST /batch/ocr": "Markdown and raw output per file (JSON)",
            "POST /batch/ocr/download": f"The same as a ZIP ({ZIP_FILENAME}) with figure crops and summary.json",
            "POST /batch/ocr/simple": "Plain text per file (JSON)",
            "GET /batch/status": "Readiness, engine, modes, limits",
            "GET /batch/info": "This page",
        },
        parameters={
            "files": f"The images, field repeated; at most {s.max_batch_files} files (MAX_BATCH_FILES), "
            f"{s.max_upload_mb:g} MB each (MAX_UPLOAD_MB), {s.max_batch_mb:g} MB in all (MAX_BATCH_MB)",
            "prompt": f"Default {DOCUMENT_PROMPT!r} (ocr, download), {FREE_PROMPT!r} (simple)",
            "mode": f"One of {', '.join(MODES)}; default {s.default_mode.name}",
            "clean_formulas": "true/false, default true: drop `\\quad (n)` tags inside `\\[...\\]` (ocr, download)",
            "max_tokens": f"1..{s.max_model_len} per file; default {min(s.default_max_tokens, s.max_model_len)}",
            "ngram_size / ngram_window": f"No-repeat guard, default {NGRAM_BATCH[0]}/{NGRAM_BATCH[1]} "
            "(the reference batch-eval settings); 0 = off",
            "timeout": f"The whole batch must finish within {s.batch_timeout_s:g} s (BATCH_TIMEOUT_S), else 504",
        },
        examples=[
            'curl -X POST "http://localhost:8000/batch/ocr" -F "files=@img1.jpg" -F "files=@img2.jpg"',
            'curl -X POST "http://localhost:8000/batch/ocr/download" -F "files=@img1.jpg" -F "files=@img2.jpg" '
            "-o results.zip",
            'curl -X POST "http://localhost:8000/batch/ocr/simple" -F "files=@img1.jpg" -F "files=@img2.jpg"',
        ],
    )
