"""PDF OCR routes: `/pdf/ocr` (JSON), `/pdf/ocr/download` (ZIP), `/pdf/ocr/simple` (plain text), status and info.

Pages are rendered lazily with PyMuPDF in the worker pool and sent to the engine concurrently, at most
MAX_CONCURRENCY page tasks per request. Each task holds an engine slot from before its page is rendered
until it is post-processed, then drops the image, so a long PDF never sits in memory as images. A page
that fails is kept with status `error` and its reason; one that stops at max_tokens is kept as `truncated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any, TypeVar

import pymupdf  # noqa: F401  # this router's own dependency: the app leaves the router out when it is missing
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from PIL import Image

import inputs
from config import DOCUMENT_PROMPT, FREE_PROMPT, MODES, NGRAM_PDF, ModeSpec, Settings
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
from engine import BaseEngine, EngineRequest, Usage
from errors import OcrError, ServiceUnavailable
from ocr_utils import Crop, build_zip, join_pages, layout_pdf, safe_member_name
from pdf_render import PdfDocument
from pdf_schemas import PdfOcrResponse, PdfPageModel, PdfSimplePage, PdfSimpleResponse
from pipeline import PagePost, b64, crop_models, page_status, postprocess
from router_status import route_info, route_status
from schemas import RouteInfo, RouteStatus, UsageModel

log = logging.getLogger("deepseek_ocr.pdf")
router = APIRouter(prefix="/pdf", tags=["PDF OCR"])
T = TypeVar("T")

PdfFile = Annotated[UploadFile, File(description="The PDF; at most MAX_UPLOAD_MB and MAX_PDF_PAGES pages")]
Pages = Annotated[
    str | None, Form(max_length=4096, description="Pages to process, 1-based: `1-3,7`, `5-`, `-2`; default all")
]
Dpi = Annotated[int, Form(ge=72, le=300, description="Render resolution, 72..300 (lowered per page to fit)")]
Password = Annotated[str | None, Form(max_length=1024, description="Password of an encrypted PDF")]
ZIP_RESPONSE = {200: {"content": {"application/zip": {}}, "description": "ZIP: markdown, raw text, layouts, images"}}


@dataclass(frozen=True)
class PdfOptions:
    """What to do with a PDF, from the form fields."""

    prompt: str = ""
    dpi: int = 144
    pages: str | None = None
    password: str | None = None
    mode: str | None = None
    draw_layouts: bool = False
    extract_images: bool = False
    max_tokens: int | None = None
    ngram: tuple[int, int] = NGRAM_PDF


def full_options(
    prompt: Annotated[
        str, Form(max_length=PROMPT_MAX_CHARS, description=f"Default {DOCUMENT_PROMPT!r}; a typed `\\n` is a newline")
    ] = "",
    dpi: Dpi = 144,
    pages: Pages = None,
    password: Password = None,
    mode: ModeForm = None,
    draw_layouts: Annotated[bool, Form(description="Return a PDF of the pages with boxes drawn")] = True,
    extract_images: Annotated[bool, Form(description="Return regions labelled `image` as JPEG")] = True,
    max_tokens: MaxTokensForm = None,
    ngram_size: NgramSizeForm = NGRAM_PDF[0],
    ngram_window: NgramWindowForm = NGRAM_PDF[1],
) -> PdfOptions:
    return PdfOptions(
        prompt, dpi, pages, password, mode, draw_layouts, extract_images, max_tokens, (ngram_size, ngram_window)
    )


FullOptions = Annotated[PdfOptions, Depends(full_options)]


@router.post("/ocr", response_model=PdfOcrResponse, summary="OCR a PDF: per-page text, markdown, boxes, figures")
async def pdf_ocr(
    request: Request, engine: EngineDep, settings: SettingsDep, file: PdfFile, options: FullOptions
) -> PdfOcrResponse:
    data = await read_upload(file, settings)
    run = await ocr_pdf(request, engine, settings, data, options)
    return await run_blocking(request, ocr_response, run)


@router.post(
    "/ocr/download",
    response_class=Response,
    responses=ZIP_RESPONSE,
    summary="OCR a PDF and download a ZIP: {name}.md, {name}_det.mmd, {name}_layouts.pdf, images/, pages.json",
)
async def pdf_download(
    request: Request, engine: EngineDep, settings: SettingsDep, file: PdfFile, options: FullOptions
) -> Response:
    data = await read_upload(file, settings)
    run = await ocr_pdf(request, engine, settings, data, options)
    stem = download_stem(file.filename)
    archive = await run_blocking(request, zip_archive, run, stem)
    return Response(archive, media_type="application/zip", headers={"Content-Disposition": attachment(stem)})


@router.post("/ocr/simple", response_model=PdfSimpleResponse, summary="Plain text of a PDF's pages, no tags")
async def pdf_simple(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    file: PdfFile,
    pages: Pages = None,
    dpi: Dpi = 144,
    mode: ModeForm = None,
    password: Password = None,
    max_tokens: MaxTokensForm = None,
) -> PdfSimpleResponse:
    data = await read_upload(file, settings)
    options = PdfOptions(FREE_PROMPT, dpi, pages, password, mode, max_tokens=max_tokens)
    return simple_response(await ocr_pdf(request, engine, settings, data, options))


@router.get("/status", response_model=RouteStatus, summary="PDF OCR readiness, engine, modes and limits")
async def status(request: Request) -> RouteStatus:
    features = {"draw_layouts": True, "extract_images": True, "page_ranges": True, "encrypted": True, "zip": True}
    return route_status(request, "pdf", features=features)


@router.get("/info", response_model=RouteInfo, summary="How to use the PDF OCR routes")
async def info(request: Request) -> RouteInfo:
    s: Settings = request.app.state.settings
    return route_info(
        request,
        "pdf",
        description="OCR of a PDF, page by page: raw grounded text, markdown joined with the page-split "
        "marker, layout blocks, figure crops and a PDF with the layout drawn. Failed and truncated pages are "
        "kept and marked.",
        endpoints={
            "POST /pdf/ocr": "Full PDF OCR (multipart), JSON answer",
            "POST /pdf/ocr/download": "The same work as a ZIP download",
            "POST /pdf/ocr/simple": "Plain text per page (multipart)",
            "GET /pdf/status": "Readiness, engine, modes, limits",
            "GET /pdf/info": "This page",
        },
        parameters={
            "file": f"The PDF (required); at most {s.max_upload_mb:g} MB and {s.max_pdf_pages} pages (MAX_PDF_PAGES)",
            "prompt": f"Default {DOCUMENT_PROMPT!r} (ocr, download), {FREE_PROMPT!r} (simple)",
            "dpi": f"72..300, default 144; lowered per page to stay under {s.max_image_pixels:,} pixels",
            "pages": "1-based selection such as 1-3,7 or 5- ; default all pages",
            "password": "Password of an encrypted PDF",
            "mode": f"One of {', '.join(MODES)}; default {s.default_mode.name}",
            "draw_layouts / extract_images": "true/false, default true (ocr, download)",
            "max_tokens": f"Per page, 1..{s.max_model_len}; default {min(s.default_max_tokens, s.max_model_len)}",
            "ngram_size / ngram_window": f"No-repeat guard, default {NGRAM_PDF[0]}/{NGRAM_PDF[1]}; 0 = off",
            "limits": f"{s.max_concurrency} pages in flight (MAX_CONCURRENCY); {s.pdf_timeout_s:g} s per "
            f"request (PDF_TIMEOUT_S); {s.pdf_render_timeout_s:g} s to render one page (PDF_RENDER_TIMEOUT_S)",
        },
        examples=[
            'curl -X POST "http://localhost:8000/pdf/ocr" -F "file=@report.pdf" '
            '--form-string "prompt=<image>\\n<|grounding|>Convert to markdown" -F "draw_layouts=true" '
            '-F "extract_images=true" -F "dpi=144"',
            'curl -X POST "http://localhost:8000/pdf/ocr/download" -F "file=@report.pdf" -F "pages=1-3" -o report.zip',
            'curl -X POST "http://localhost:8000/pdf/ocr/simple" -F "file=@test.pdf" -F "dpi=96"',
        ],
    )


# --------------------------------------------------------------------------------------- page pipeline


@dataclass
class PageResult:
    """What is kept of one page: text and parsed output, never the rendered image."""

    page: int
    status: str = "error"
    error: str | None = None
    text: str = ""
    post: PagePost | None = None
    width: int | None = None
    height: int | None = None
    dpi: int | None = None
    note: str | None = None
    render_warnings: tuple[str, ...] = ()
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)

    @property
    def markdown(self) -> str:
        if self.post is not None:
            return self.post.markdown
        # A comment keeps the failed page's slot between the split markers without showing in the render.
        return f"<!-- page {self.page} failed: {(self.error or '').replace('--', '- -')} -->"


@dataclass
class PdfRun:
    options: PdfOptions
    mode: str
    page_count: int
    pages: list[PageResult]
    warnings: list[str]
    started: float

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.pages)

    def usage(self) -> UsageModel:
        return UsageModel(**{k: sum(getattr(p.usage, k) for p in self.pages) for k in vars(Usage())})

    def take_layout_pdf(self) -> bytes | None:
        """The pages' drawings as one PDF; the per-page JPEGs are dropped as it is made (a 300-page PDF's
        drawings are ~130 MB, and the PDF and its base64 copy come on top)."""
        jpegs = [p.post.annotated_jpeg for p in self.pages if p.post is not None and p.post.annotated_jpeg]
        for p in self.pages:
            if p.post is not None:
                p.post.annotated_jpeg = None
        return layout_pdf(jpegs) if jpegs else None

    def crops(self) -> list[Crop]:
        return [c for p in self.pages if p.post is not None for c in p.post.crops]


@dataclass(frozen=True)
class PageJob:
    """What every page of one request shares: settings, prompt, mode and options."""

    settings: Settings
    prompt: str
    mode: ModeSpec
    options: PdfOptions

    def request(self, image: Image.Image | None) -> EngineRequest:
        o = self.options
        return make_request(
            self.settings, prompt=self.prompt, image=image, mode=self.mode, max_tokens=o.max_tokens, ngram=o.ngram
        )


async def ocr_pdf(request: Request, engine: BaseEngine, settings: Settings, data: bytes, options: PdfOptions) -> PdfRun:
    """Open the PDF, check the selection and OCR the selected pages in order, under PDF_TIMEOUT_S."""
    started = time.perf_counter()
    spec = resolve_mode(options.mode, settings)
    engine.check_mode(spec)
    prompt = normalize_prompt(options.prompt, DOCUMENT_PROMPT, has_image=True)
    job = PageJob(settings, prompt, spec, options)
    job.request(None)  # bad max_tokens / n-gram settings answer 422 before any page work
    async with deadline(settings.pdf_timeout_s, "PDF_TIMEOUT_S"), opened_pdf(request, data, options) as source:
        selected = inputs.parse_page_ranges(options.pages, source.page_count)
        work = functools.partial(ocr_page, request, engine, job, source)
        pages = await in_window(selected, settings.max_concurrency, work)
    run = PdfRun(options, spec.name, source.page_count, pages, document_warnings(source), started)
    log.info(
        "PDF: %d of %d pages, %d truncated, %d failed, %.1f s",
        len(pages),
        run.page_count,
        run.count("truncated"),
        run.count("error"),
        time.perf_counter() - started,
    )
    return run


@contextlib.asynccontextmanager
async def opened_pdf(request: Request, data: bytes, options: PdfOptions) -> AsyncIterator[PdfDocument]:
    settings: Settings = request.app.state.settings
    # Opened and validated in a render worker, never here (a hostile PDF can hold the GIL for 36 s).
    async with request.app.state.render_pool.document(
        data, password=options.password, max_pages=settings.max_pdf_pages
    ) as source:
        yield source


async def in_window(items: Iterable[int], limit: int, fn: Callable[[int], Awaitable[T]]) -> list[T]:
    """`fn` over `items` with at most `limit` tasks alive at once; results in item order.

    A TaskGroup, so that a cancellation (deadline, client gone) or an error in one task cancels and
    awaits all the others: no page keeps running once the request is over.
    """
    slots = asyncio.Semaphore(limit)
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            for item in items:
                await slots.acquire()
                task = group.create_task(fn(item))
                task.add_done_callback(lambda _: slots.release())
                tasks.append(task)
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None  # the request's error handler knows single errors, not groups
    return [task.result() for task in tasks]


async def ocr_page(request: Request, engine: BaseEngine, job: PageJob, source: PdfDocument, page: int) -> PageResult:
    """Render, generate and post-process one page inside one engine slot; failures become an `error` page."""
    result = PageResult(page)
    # The slot is taken before rendering, so pages waiting for the engine are not held as images.
    async with engine.reserve():
        try:
            # In a worker process: MuPDF holds the GIL for a whole render, which would stall the event loop.
            rendered = await source.render(page, dpi=job.options.dpi, max_pixels=job.settings.max_image_pixels)
            result.dpi, result.note, result.render_warnings = rendered.dpi, rendered.note, rendered.warnings
            result.width, result.height = rendered.image.size
            out = await engine.generate(job.request(rendered.image))
            result.text, result.finish_reason, result.usage = out.text, out.finish_reason, out.usage
            result.post = await run_blocking(
                request,
                postprocess,
                out.text,
                rendered.image,
                page=page,
                draw=job.options.draw_layouts,
                crop=job.options.extract_images,
                annotated_format="jpeg",
                dpi=rendered.dpi,
            )
        except ServiceUnavailable:
            raise  # the engine went away: the request is a 503, not N failed pages
        except OcrError as exc:
            result.error = exc.detail
            return result
        except Exception as exc:  # a bug on one page must not lose the other pages; it is logged as one
            log.exception("PDF page %d failed", page)
            result.error = f"internal error ({type(exc).__name__}) on this page; this is a bug, see the server log"
            return result
    if result.finish_reason == "abort":
        result.error = "the engine aborted this page's generation"
    else:
        result.status = page_status(result.finish_reason or "")
    return result


def document_warnings(source: PdfDocument) -> list[str]:
    notes = list(source.warnings[:20])
    if source.repaired:
        notes.insert(0, "The PDF was damaged: MuPDF repaired its cross-reference table; check the pages' content")
    return notes


# --------------------------------------------------------------------------------------- answers


def page_model(p: PageResult) -> PdfPageModel:
    post = p.post
    return PdfPageModel(
        page=p.page,
        status=p.status,  # type: ignore[arg-type]
        error=p.error,
        text=p.text,
        markdown=post.markdown if post else "",
        blocks=post.blocks if post else [],
        warnings=[*(post.warnings if post else []), *p.render_warnings],
        width=p.width,
        height=p.height,
        dpi=p.dpi,
        note=p.note,
        finish_reason=p.finish_reason,  # type: ignore[arg-type]
        usage=UsageModel(**vars(p.usage)),
    )


def totals(run: PdfRun) -> dict[str, Any]:
    return {
        "page_count": run.page_count,
        "pages_processed": len(run.pages),
        "pages_ok": run.count("ok"),
        "pages_truncated": run.count("truncated"),
        "pages_failed": run.count("error"),
        "usage": run.usage(),
        "dpi": run.options.dpi,
        "mode": run.mode,
        "warnings": run.warnings,
        "elapsed_s": round(time.perf_counter() - run.started, 4),
    }


def ocr_response(run: PdfRun) -> PdfOcrResponse:
    """The JSON answer; runs in the worker pool since assembling the layout PDF and base64 are CPU work."""
    layout = run.take_layout_pdf()
    return PdfOcrResponse(
        pages=[page_model(p) for p in run.pages],
        markdown=join_pages(p.markdown for p in run.pages),
        images=crop_models(run.crops()),
        layout_pdf=b64(layout) if layout else None,
        **totals(run),
    )


def simple_response(run: PdfRun) -> PdfSimpleResponse:
    pages = [
        PdfSimplePage(
            page=p.page,
            text=p.post.plain if p.post else "",
            status=p.status,  # type: ignore[arg-type]
            finish_reason=p.finish_reason,  # type: ignore[arg-type]
            error=p.error,
        )
        for p in run.pages
    ]
    return PdfSimpleResponse(
        text=join_pages(p.text for p in pages),
        pages=pages,
        page_count=run.page_count,
        pages_failed=run.count("error"),
        mode=run.mode,  # type: ignore[arg-type]
        elapsed_s=round(time.perf_counter() - run.started, 4),
    )


def zip_archive(run: PdfRun, stem: str) -> bytes:
    """`{stem}.md`, `{stem}_det.mmd` (raw tagged text), `{stem}_layouts.pdf`, `images/...`, `pages.json`."""
    members = [
        (f"{stem}.md", join_pages(p.markdown for p in run.pages).encode()),
        (f"{stem}_det.mmd", join_pages(p.text for p in run.pages).encode()),
    ]
    if layout := run.take_layout_pdf():
        members.append((f"{stem}_layouts.pdf", layout))
    members += [(crop.name, crop.jpeg) for crop in run.crops()]
    manifest = {
        **totals(run),
        "usage": run.usage().model_dump(),
        "pages": [page_model(p).model_dump(exclude={"text", "markdown"}) for p in run.pages],
    }
    members.append(("pages.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode()))
    return build_zip(members)


def download_stem(filename: str | None) -> str:
    """The upload's name without folder or extension, safe as a ZIP member and file name."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return safe_member_name(PurePosixPath(base).stem or "document", set()).replace("/", "_")


def attachment(stem: str) -> str:
    """Content-Disposition for `{stem}.zip`; a non-ASCII name also goes in `filename*` (RFC 6266)."""
    name = f"{stem}.zip"
    ascii_name = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    header = f'attachment; filename="{ascii_name}"'
    if ascii_name != name:
        header += f"; filename*=UTF-8''{urllib.parse.quote(name)}"
    return header
