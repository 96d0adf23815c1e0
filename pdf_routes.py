"""PDF OCR routes: `/pdf/ocr` (JSON), `/pdf/ocr/download` (ZIP), `/pdf/ocr/simple` (plain text), status and info.

The PDF is opened and rendered in render processes, one page at a time, and its pages go through the
service like any item: at most a window of pages per request is in flight, each page takes an engine slot
only for its generation, and results come back in page order. A page that fails is kept with status
`failed` and its reason; one that stops at max_tokens is kept as `truncated`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, UploadFile

from config import DOCUMENT_PROMPT, FREE_PROMPT, MODES, NGRAM_PDF, Settings
from pdf.office import OfficeConverter
from pdf.render_pool import mupdf_missing
from service.ocr import OcrService
from service.options import PdfOptions, PdfSimpleOptions
from service.postprocess import PostOptions
from service.results import DocumentRun
from service.run import Deadline
from service.timing import measure
from web.answers import attachment, download_stem, pdf_response, pdf_simple_response, pdf_zip, searchable_document
from web.deps import KnownFieldsOnly, OfficeDep, OwnerDep, ServiceDep, file_field, read_upload
from web.forms import form_of
from web.schemas.pdf import PdfOcrResponse, PdfSimpleResponse
from web.status import add_status_routes
from web.timing import stamped

# PyMuPDF is this router's own dependency, imported only by render processes: the app leaves the router out,
# saying why, when they cannot import it.
if (_missing := mupdf_missing()) is not None:
    raise ImportError(_missing)

router = APIRouter(prefix="/pdf", tags=["PDF OCR"], dependencies=[KnownFieldsOnly])

PdfFile = Annotated[
    UploadFile,
    file_field("The PDF, or an office file (DOCX, PPTX, XLSX, ODT, ODP, ODS, RTF: converted to PDF first); at most "
               "MAX_UPLOAD_MB and MAX_PDF_PAGES pages (long documents: `/jobs`)"),
]
ZIP_RESPONSE = {200: {"content": {"application/zip": {}}, "description": "ZIP: markdown, raw text, layouts, images"}}
FullOptions = Annotated[PdfOptions, Depends(form_of(PdfOptions))]


async def ocr_pdf(
    service: OcrService, file: UploadFile, options: PdfSimpleOptions, owner: str, office: OfficeConverter
) -> tuple[DocumentRun, bytes]:
    """Validate the options, read the upload (an office file: as its PDF) and OCR the pages under PDF_TIMEOUT_S."""
    settings = service.settings
    req = service.admit(options.request(settings))
    with measure("read"):
        data = await read_upload(file, settings)
    with measure("decode"):  # turning an office file into pages, like rendering one
        data = await office.as_pdf(data, file.filename)
    full = isinstance(options, PdfOptions)  # /pdf/ocr/simple draws nothing and crops nothing
    draw, crop = full and options.draw_layouts, full and options.extract_images
    post = PostOptions(draw=draw, annotated_format="jpeg", crop=crop)
    # Under PDF_TIMEOUT_S; past it the finished pages go to a job (`owner`'s) that the 504 names.
    run = await service.document(req, data, password=options.password, pages=options.pages, dpi=options.dpi,
                                 options=post, deadline=Deadline(settings.pdf_timeout_s, "PDF_TIMEOUT_S"),
                                 owner=owner, filename=file.filename, form=options)
    return run, data


@router.post("/ocr", response_model=PdfOcrResponse, summary="OCR a PDF: per-page text, markdown, boxes, figures")
async def pdf_ocr(
    service: ServiceDep, file: PdfFile, options: FullOptions, owner: OwnerDep, office: OfficeDep
) -> PdfOcrResponse:
    run, data = await ocr_pdf(service, file, options, owner, office)
    searchable = None
    if options.searchable_pdf:
        searchable = await searchable_document(service.render_pool, run, data, options.password)
    return stamped(await service.blocking(pdf_response, run, searchable))


@router.post(
    "/ocr/download",
    response_class=Response,
    responses=ZIP_RESPONSE,
    summary="OCR a PDF and download a ZIP: {name}.md, {name}_det.mmd, {name}_layouts.pdf, {name}_searchable.pdf, "
    "images/, pages.json",
)
async def pdf_download(
    service: ServiceDep, file: PdfFile, options: FullOptions, owner: OwnerDep, office: OfficeDep
) -> Response:
    run, data = await ocr_pdf(service, file, options, owner, office)
    stem = download_stem(file.filename)
    searchable = await searchable_document(service.render_pool, run, data, options.password)
    archive = await service.blocking(pdf_zip, run, stem, searchable)
    return Response(archive, media_type="application/zip", headers={"Content-Disposition": attachment(f"{stem}.zip")})


@router.post("/ocr/simple", response_model=PdfSimpleResponse, summary="Plain text of a PDF's pages, no tags")
async def pdf_simple(
    service: ServiceDep,
    file: PdfFile,
    options: Annotated[PdfSimpleOptions, Depends(form_of(PdfSimpleOptions))],
    owner: OwnerDep,
    office: OfficeDep,
) -> PdfSimpleResponse:
    run, _ = await ocr_pdf(service, file, options, owner, office)
    return stamped(pdf_simple_response(run))


def _parameters(s: Settings) -> dict[str, str]:
    return {
        "file": f"The PDF (required); at most {s.max_upload_mb:g} MB and {s.max_pdf_pages} pages (MAX_PDF_PAGES). "
        "DOCX, PPTX, XLSX, ODT, ODP, ODS and RTF are converted to PDF by LibreOffice first "
        f"({s.office_timeout_s:g} s, OFFICE_TIMEOUT_S)",
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
