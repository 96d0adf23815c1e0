"""Pydantic models of the PDF routes' answers (`/pdf/ocr`, `/pdf/ocr/simple`); part of the `/docs` contract."""

from __future__ import annotations

from pydantic import BaseModel, Field

from web.schemas.common import (
    CONFIDENCE,
    STATUS_TEXT,
    TIMING,
    BlockModel,
    ConfidenceModel,
    CropModel,
    FinishReason,
    ItemStatus,
    ModeName,
    RetryModel,
    StageTimes,
    UsageModel,
)

PageStatus = ItemStatus


class PdfPageModel(BaseModel):
    """One processed page of `/pdf/ocr`."""

    page: int = Field(description="1-based page number in the document", examples=[1])
    status: PageStatus = Field(description=STATUS_TEXT)
    error: str | None = Field(None, description="Why the page failed (status `failed`); null otherwise")
    text: str = Field(description="Raw model output, grounding tags kept")
    markdown: str = Field(description="Cleaned markdown; figures linked as `images/{page}_{n}.jpg`")
    blocks: list[BlockModel] = Field(description="One per ref/det pair, boxes in pixels of the rendered page")
    warnings: list[str] = Field(description="Repairs made to malformed model output and MuPDF rendering warnings")
    width: int | None = Field(None, description="Rendered page width in pixels; null when it could not be rendered")
    height: int | None = Field(None, description="Rendered page height in pixels; null when it could not be rendered")
    dpi: int | None = Field(None, description="Resolution the page was rendered at", examples=[144])
    note: str | None = Field(
        None, description="Why the page was rendered at a lower dpi than asked (to stay under MAX_IMAGE_PIXELS)"
    )
    finish_reason: FinishReason | None = Field(
        None, description="`stop` at end of text, `length` at max_tokens; null when generation did not run"
    )
    usage: UsageModel = Field(description="Tokens of this page (zeros when it failed before generation)")
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)
    attempts: int = Field(1, description="Generations run for it (more than 1 when the retry ladder ran)")
    retries: list[RetryModel] = Field(default_factory=list, description="The retry ladder's attempts, if any")


class PdfOcrResponse(BaseModel):
    """Answer of `POST /pdf/ocr`."""

    pages: list[PdfPageModel] = Field(description="The selected pages, in page order, failed ones included")
    markdown: str = Field(
        description="The pages' markdown joined with `\\n<--- Page Split --->\\n`; a failed page is an HTML "
        "comment saying why, so page positions stay aligned"
    )
    images: list[CropModel] = Field(
        description="Regions labelled `image`, as linked from the markdown (empty unless extract_images)"
    )
    layout_pdf: str | None = Field(
        None,
        description="Base64 PDF, one page per processed page with its layout boxes drawn (JPEG quality 95); "
        "pages that failed are left out. Null unless draw_layouts",
    )
    searchable_pdf: str | None = Field(
        None,
        description="Base64 PDF: the original pages unchanged with the recognised text laid invisibly over each "
        "block (searchable, copyable). Null unless searchable_pdf",
    )
    page_count: int = Field(description="Pages in the document", examples=[12])
    pages_processed: int = Field(description="Pages selected and processed", examples=[12])
    pages_ok: int = Field(description="Pages with status `ok`", examples=[11])
    pages_truncated: int = Field(description="Pages with status `truncated`", examples=[1])
    pages_failed: int = Field(description="Pages with status `failed`", examples=[0])
    pages_aborted: int = Field(0, description="Pages with status `aborted`", examples=[0])
    pages_retried: int = Field(0, description="Pages with status `retried` or `degraded`", examples=[0])
    usage: UsageModel = Field(description="Tokens summed over the processed pages")
    dpi: int = Field(description="Resolution asked for (see each page's `dpi` for the one used)", examples=[144])
    mode: ModeName = Field(description="Resolution mode used")
    warnings: list[str] = Field(description="Document-level notes (a damaged PDF that MuPDF repaired, ...)")
    elapsed_s: float = Field(description="Server time spent on this request, seconds", examples=[8.4])
    timing: StageTimes | None = Field(None, description=TIMING)


class PdfSimplePage(BaseModel):
    page: int = Field(description="1-based page number", examples=[1])
    text: str = Field(description="Plain text of the page, no tags")
    status: PageStatus = Field(description=STATUS_TEXT)
    finish_reason: FinishReason | None = Field(None, description="`stop`, `length`; null when it failed")
    error: str | None = Field(None, description="Why the page failed (status `failed`)")
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)


class PdfSimpleResponse(BaseModel):
    """Answer of `POST /pdf/ocr/simple`: plain text."""

    text: str = Field(
        description="Plain text of the processed pages joined with `\\n<--- Page Split --->\\n`",
        examples=["Annual report\n<--- Page Split --->\nContents"],
    )
    pages: list[PdfSimplePage] = Field(description="Per page text and status, in page order")
    page_count: int = Field(description="Pages in the document")
    pages_failed: int = Field(description="Pages with status `failed`")
    mode: ModeName = Field(description="Resolution mode used")
    elapsed_s: float = Field(description="Server time spent on this request, seconds")
    timing: StageTimes | None = Field(None, description=TIMING)
