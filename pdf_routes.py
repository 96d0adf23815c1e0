"""PDF OCR routes: `/pdf/ocr` (JSON), `/pdf/ocr/download` (ZIP), `/pdf/ocr/simple` (plain text), status and info.

The PDF is opened and rendered in render processes, one page at a time, and its pages go through the
service like any item: at most a window of pages per request is in flight, each page takes an engine slot
only for its generation, and results come back in page order. A page that fails is kept with status
`failed` and its reason; one that stops at max_tokens is kept as `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pymupdf  # noqa: F401  # this router's own dependency: the app leaves the router out when it is missing
from fastapi import APIRouter, Depends, File, Form, Response, UploadFile

from answers import attachment, download_stem, pdf_response, pdf_simple_response, pdf_zip
from config import DOCUMENT_PROMPT, FREE_PROMPT, MODES, NGRAM_PDF, Settings
from deps import (
    MaxTokensForm,
    ModeForm,
    NgramSizeForm,
    NgramWindowForm,
    ServiceDep,
    prompt_form,
    read_upload,
)
from jobs import handoff
from pdf_schemas import PdfOcrResponse, PdfSimpleResponse
from pipeline import DocumentRun, OcrRequest, OcrService, PostOptions
from router_status import add_status_routes

router = APIRouter(prefix="/pdf", tags=["PDF OCR"])

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
    default_prompt: str = DOCUMENT_PROMPT


def full_options(
    prompt: Annotated[str, prompt_form(f"Default {DOCUMENT_PROMPT!r}; a typed `\\n` is a newline")] = "",
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


async def ocr_pdf(service: OcrService, file: UploadFile, options: PdfOptions) -> DocumentRun:
    """Validate the options, read the upload and OCR the selected pages under PDF_TIMEOUT_S."""
    settings = service.settings
    req = OcrRequest.build(
        settings,
        prompt=options.prompt,
        default_prompt=options.default_prompt,
        mode=options.mode,
        max_tokens=options.max_tokens,
        ngram=options.ngram,
    )
    service.admit(req)
    data = await read_upload(file, settings)
    post = PostOptions(draw=options.draw_layouts, annotated_format="jpeg", crop=options.extract_images)
    # Under PDF_TIMEOUT_S; past it the finished pages go to a job that the 504 names (jobs/handoff.py).
    return await handoff.document(service, req, data, options, post, filename=file.filename)


@router.post("/ocr", response_model=PdfOcrResponse, summary="OCR a PDF: per-page text, markdown, boxes, figures")
async def pdf_ocr(service: ServiceDep, file: PdfFile, options: FullOptions) -> PdfOcrResponse:
    run = await ocr_pdf(service, file, options)
    return await service.blocking(pdf_response, run)


@router.post(
    "/ocr/download",
    response_class=Response,
    responses=ZIP_RESPONSE,
    summary="OCR a PDF and download a ZIP: {name}.md, {name}_det.mmd, {name}_layouts.pdf, images/, pages.json",
)
async def pdf_download(service: ServiceDep, file: PdfFile, options: FullOptions) -> Response:
    run = await ocr_pdf(service, file, options)
    stem = download_stem(file.filename)
    archive = await service.blocking(pdf_zip, run, stem)
    return Response(archive, media_type="application/zip", headers={"Content-Disposition": attachment(f"{stem}.zip")})


@router.post("/ocr/simple", response_model=PdfSimpleResponse, summary="Plain text of a PDF's pages, no tags")
async def pdf_simple(
    service: ServiceDep,
    file: PdfFile,
    pages: Pages = None,
    dpi: Dpi = 144,
    mode: ModeForm = None,
    password: Password = None,
    max_tokens: MaxTokensForm = None,
) -> PdfSimpleResponse:
    options = PdfOptions(FREE_PROMPT, dpi, pages, password, mode, max_tokens=max_tokens, default_prompt=FREE_PROMPT)
    return pdf_simple_response(await ocr_pdf(service, file, options))


def _parameters(s: Settings) -> dict[str, str]:
    return {
        "file": f"The PDF (required); at most {s.max_upload_mb:g} MB and {s.max_pdf_pages} pages (MAX_PDF_PAGES)",
        "prompt": f"Default {DOCUMENT_PROMPT!r} (ocr, download), {FREE_PROMPT!r} (simple)",
        "dpi": f"72..300, default 144; lowered per page to stay under {s.max_image_pixels:,} pixels",
        "pages": "1-based selection such as 1-3,7 or 5- ; default all pages",
        "password": "Password of an encrypted PDF",
        "mode": f"One of {', '.join(MODES)}; default {s.default_mode.name}",
        "draw_layouts / extract_images": "true/false, default true (ocr, download)",
        "max_tokens": f"Per page, 1..{s.max_model_len}; default {min(s.default_max_tokens, s.max_model_len)}",
        "ngram_size / ngram_window": f"No-repeat guard, default {NGRAM_PDF[0]}/{NGRAM_PDF[1]}; 0 = off",
        "limits": f"pages in flight up to the engines' capacity (MAX_CONCURRENCY each); {s.pdf_timeout_s:g} s per "
        f"request (PDF_TIMEOUT_S); {s.pdf_render_timeout_s:g} s to render one page (PDF_RENDER_TIMEOUT_S)",
    }


add_status_routes(
    router,
    "pdf",
    title="PDF OCR",
    features={"draw_layouts": True, "extract_images": True, "page_ranges": True, "encrypted": True, "zip": True},
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
    parameters=_parameters,
    examples=[
        'curl -X POST "http://localhost:8000/pdf/ocr" -F "file=@report.pdf" '
        '--form-string "prompt=<image>\\n<|grounding|>Convert to markdown" -F "draw_layouts=true" '
        '-F "extract_images=true" -F "dpi=144"',
        'curl -X POST "http://localhost:8000/pdf/ocr/download" -F "file=@report.pdf" -F "pages=1-3" -o report.zip',
        'curl -X POST "http://localhost:8000/pdf/ocr/simple" -F "file=@test.pdf" -F "dpi=96"',
    ],
)
