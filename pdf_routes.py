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
from fastapi import APIRouter, Depends, Form, Response, UploadFile

from config import DOCUMENT_PROMPT, FREE_PROMPT, MODES, NGRAM_PDF, Settings
from service.ocr import OcrService
from service.postprocess import PostOptions
from service.request import OcrRequest
from service.results import DocumentRun
from service.run import Deadline
from web.answers import attachment, download_stem, pdf_response, pdf_simple_response, pdf_zip, searchable_document
from web.deps import (
    KnownFieldsOnly,
    MaxTokensForm,
    ModeForm,
    ModelForm,
    NgramSizeForm,
    NgramWindowForm,
    OwnerDep,
    ServiceDep,
    file_field,
    optional_form,
    prompt_form,
    read_upload,
    shown,
)
from web.schemas.pdf import PdfOcrResponse, PdfSimpleResponse
from web.status import add_status_routes

router = APIRouter(prefix="/pdf", tags=["PDF OCR"], dependencies=[KnownFieldsOnly])

PdfFile = Annotated[
    UploadFile, file_field("The PDF; at most MAX_UPLOAD_MB and MAX_PDF_PAGES pages (long documents: `/jobs`)")
]
Pages = Annotated[
    str | None,
    optional_form("Pages to process, 1-based: `1-3,7`, `5-`, `-2`. Empty: all pages", max_length=4096),
]
Dpi = Annotated[int, Form(ge=72, le=300, description="Render resolution, 72..300 (lowered per page to fit)")]
Password = Annotated[
    str | None, optional_form("Password of an encrypted PDF. Empty: the PDF is not encrypted", max_length=1024)
]
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
    ngram: tuple[int | None, int | None] = (None, None)  # None: the model's default
    default_prompt: str = DOCUMENT_PROMPT
    searchable_pdf: bool = False
    model: str | None = None


def full_options(
    prompt: Annotated[str, prompt_form(f"Empty: {shown(DOCUMENT_PROMPT)}; a typed `\\n` is a newline")] = "",
    dpi: Dpi = 144,
    pages: Pages = None,
    password: Password = None,
    mode: ModeForm = None,
    draw_layouts: Annotated[bool, Form(description="Return a PDF of the pages with boxes drawn")] = True,
    extract_images: Annotated[bool, Form(description="Return regions labelled `image` as JPEG")] = True,
    max_tokens: MaxTokensForm = None,
    ngram_size: NgramSizeForm = None,
    ngram_window: NgramWindowForm = None,
    model: ModelForm = None,
    searchable_pdf: Annotated[
        bool, Form(description="Return the PDF with the recognised text laid under each page (always in the ZIP)")
    ] = False,
) -> PdfOptions:
    return PdfOptions(
        prompt, dpi, pages, password, mode, draw_layouts, extract_images, max_tokens, (ngram_size, ngram_window),
        searchable_pdf=searchable_pdf,
        model=model,
    )


FullOptions = Annotated[PdfOptions, Depends(full_options)]


async def ocr_pdf(
    service: OcrService, file: UploadFile, options: PdfOptions, owner: str
) -> tuple[DocumentRun, bytes]:
    """Validate the options, read the upload and OCR the selected pages under PDF_TIMEOUT_S."""
    settings = service.settings
    req = OcrRequest.build(
        settings,
        prompt=options.prompt,
        default_prompt=options.default_prompt,
        mode=options.mode,
        max_tokens=options.max_tokens,
        ngram=options.ngram,
        model=options.model,
        kind="pdf",
    )
    req = service.admit(req)
    data = await read_upload(file, settings)
    post = PostOptions(draw=options.draw_layouts, annotated_format="jpeg", crop=options.extract_images)
    # Under PDF_TIMEOUT_S; past it the finished pages go to a job (`owner`'s) that the 504 names.
    run = await service.document(req, data, password=options.password, pages=options.pages, dpi=options.dpi,
                                 options=post, deadline=Deadline(settings.pdf_timeout_s, "PDF_TIMEOUT_S"),
                                 owner=owner, filename=file.filename)
    return run, data


@router.post("/ocr", response_model=PdfOcrResponse, summary="OCR a PDF: per-page text, markdown, boxes, figures")
async def pdf_ocr(service: ServiceDep, file: PdfFile, options: FullOptions, owner: OwnerDep) -> PdfOcrResponse:
    run, data = await ocr_pdf(service, file, options, owner)
    searchable = None
    if options.searchable_pdf:
        searchable = await service.blocking(searchable_document, run, data, options.password)
    return await service.blocking(pdf_response, run, searchable)


@router.post(
    "/ocr/download",
    response_class=Response,
    responses=ZIP_RESPONSE,
    summary="OCR a PDF and download a ZIP: {name}.md, {name}_det.mmd, {name}_layouts.pdf, {name}_searchable.pdf, "
    "images/, pages.json",
)
async def pdf_download(service: ServiceDep, file: PdfFile, options: FullOptions, owner: OwnerDep) -> Response:
    run, data = await ocr_pdf(service, file, options, owner)
    stem = download_stem(file.filename)
    searchable = await service.blocking(searchable_document, run, data, options.password)
    archive = await service.blocking(pdf_zip, run, stem, searchable)
    return Response(archive, media_type="application/zip", headers={"Content-Disposition": attachment(f"{stem}.zip")})


@router.post("/ocr/simple", response_model=PdfSimpleResponse, summary="Plain text of a PDF's pages, no tags")
async def pdf_simple(
    service: ServiceDep,
    file: PdfFile,
    owner: OwnerDep,
    pages: Pages = None,
    dpi: Dpi = 144,
    mode: ModeForm = None,
    password: Password = None,
    max_tokens: MaxTokensForm = None,
    model: ModelForm = None,
) -> PdfSimpleResponse:
    options = PdfOptions(
        FREE_PROMPT, dpi, pages, password, mode, max_tokens=max_tokens, default_prompt=FREE_PROMPT, model=model
    )
    run, _ = await ocr_pdf(service, file, options, owner)
    return pdf_simple_response(run)


def _parameters(s: Settings) -> dict[str, str]:
    return {
        "file": f"The PDF (required); at most {s.max_upload_mb:g} MB and {s.max_pdf_pages} pages (MAX_PDF_PAGES)",
        "prompt": f"Default {DOCUMENT_PROMPT!r} (ocr, download), {FREE_PROMPT!r} (simple)",
        "dpi": f"72..300, default 144; lowered per page to stay under {s.max_image_pixels:,} pixels",
        "pages": "1-based selection such as 1-3,7 or 5- ; default all pages",
        "password": "Password of an encrypted PDF",
        "mode": f"One of {', '.join(MODES)}; default {s.default_mode.name}",
        "draw_layouts / extract_images": "true/false, default true (ocr, download)",
        "searchable_pdf": "true/false, default false (ocr): the original pages with the text laid under them; "
        "always `{name}_searchable.pdf` in the download",
        "max_tokens": f"Per page, 1..{s.max_model_len}; default {min(s.default_max_tokens, s.max_model_len)}",
        "ngram_size / ngram_window": f"No-repeat guard, default {NGRAM_PDF[0]}/{NGRAM_PDF[1]} "
        "(DeepSeek-OCR-2: 20/90); 0 = off",
        "model": "A model name from `GET /` (MODELS); default the first",
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
