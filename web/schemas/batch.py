"""Response models of the batch router (`/batch/...`): per-file results, batch totals, the ZIP's summary.json.

Totals sit at the top level of each answer beside `results` and `elapsed_s`, so a script reads
`answer["failed"]` directly. A file that failed has `status="failed"` and its problem document in `error`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from web.schemas.common import (
    CONFIDENCE,
    STATUS_TEXT,
    TIMING,
    ConfidenceModel,
    FinishReason,
    ItemStatus,
    RetryModel,
    StageTimes,
    UsageModel,
)

FileStatus = ItemStatus
_STATUS = STATUS_TEXT
_ERROR = "The problem document (type, title, status, detail) of why this file failed; null when it did not"
_PROBLEM_EXAMPLE = {
    "type": "https://deepseek-ocr.local/problems/invalid-image",
    "title": "The image could not be decoded",
    "status": 400,
    "detail": "The PNG image is truncated or corrupt and could not be decoded (...). Send the complete file.",
}


class BatchTotals(BaseModel):
    files: int = Field(description="Files in the batch", examples=[5])
    ok: int = Field(description="Files that finished (`status=ok`)", examples=[3])
    truncated: int = Field(description="Files that stopped at max_tokens (`status=truncated`)", examples=[1])
    failed: int = Field(description="Files that failed (`status=failed`)", examples=[1])
    aborted: int = Field(0, description="Files the engine aborted (`status=aborted`)", examples=[0])
    retried: int = Field(0, description="Files that needed the retry ladder (`retried`, `degraded`)", examples=[0])
    usage: UsageModel = Field(description="Token usage summed over the files")


class BatchFileResult(BaseModel):
    """One file of `/batch/ocr`, in the order the files were sent."""

    index: int = Field(description="Position of the file in the request, from 0", examples=[0])
    filename: str = Field(description="The file name as sent", examples=["img1.jpg"])
    markdown: str = Field(
        description="Markdown: tags removed, figure regions linked as `images/{stem}_{n}.jpg` (the names "
        "`/batch/ocr/download` gives the crops), formulas cleaned when clean_formulas is true",
        examples=["# Title\n\n![](images/img1_0.jpg)\n\n\\[E = mc^2\\]"],
    )
    text: str = Field(description="Raw model output, grounding tags kept", examples=["<|ref|>title<|/ref|>..."])
    status: FileStatus = Field(description=_STATUS)
    error: dict[str, Any] | None = Field(None, description=_ERROR, examples=[_PROBLEM_EXAMPLE])
    finish_reason: FinishReason | None = Field(None, description="`stop` at end of text, `length` at max_tokens")
    usage: UsageModel | None = Field(None, description="Tokens of this file; null when it never reached the model")
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)
    attempts: int = Field(1, description="Generations run for it (more than 1 when the retry ladder ran)")
    retries: list[RetryModel] = Field(default_factory=list, description="The retry ladder's attempts, if any")
    width: int | None = Field(None, description="Image width in pixels (EXIF applied); null if undecodable")
    height: int | None = Field(None, description="Image height in pixels (EXIF applied); null if undecodable")


class BatchResponse(BatchTotals):
    """Answer of `POST /batch/ocr`."""

    results: list[BatchFileResult] = Field(description="One entry per file, in the order sent")
    elapsed_s: float = Field(description="Server time spent on the batch, seconds", examples=[12.5])
    timing: StageTimes | None = Field(None, description=TIMING)


class BatchSimpleResult(BaseModel):
    """One file of `/batch/ocr/simple`."""

    index: int = Field(description="Position of the file in the request, from 0", examples=[0])
    filename: str = Field(description="The file name as sent", examples=["img1.jpg"])
    text: str = Field(description="Plain text: no grounding tags, figure regions dropped", examples=["Invoice 7"])
    status: FileStatus = Field(description=_STATUS)
    error: dict[str, Any] | None = Field(None, description=_ERROR, examples=[_PROBLEM_EXAMPLE])
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)


class BatchSimpleResponse(BatchTotals):
    """Answer of `POST /batch/ocr/simple`."""

    results: list[BatchSimpleResult] = Field(description="One entry per file, in the order sent")
    elapsed_s: float = Field(description="Server time spent on the batch, seconds", examples=[12.5])
    timing: StageTimes | None = Field(None, description=TIMING)


class ZipMembers(BaseModel):
    markdown: str | None = Field(None, description="`{stem}.md`: cleaned markdown", examples=["img1.md"])
    raw: str | None = Field(None, description="`{stem}_det.md`: raw model output", examples=["img1_det.md"])
    images: list[str] = Field(default_factory=list, description="Figure crops the markdown links to")
    error: str | None = Field(None, description="`{stem}.error.json`: the problem document of a failed file")
    searchable: str | None = Field(
        None, description="`{stem}_searchable.pdf`: the image as a PDF page with its text laid invisibly over it"
    )


class BatchSummaryFile(BaseModel):
    index: int = Field(description="Position of the file in the request, from 0")
    filename: str = Field(description="The file name as sent")
    status: FileStatus = Field(description=_STATUS)
    error: dict[str, Any] | None = Field(None, description=_ERROR)
    finish_reason: FinishReason | None = None
    usage: UsageModel | None = None
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)
    width: int | None = None
    height: int | None = None
    members: ZipMembers = Field(description="This file's members of the ZIP")


class BatchSummary(BatchTotals):
    """`summary.json` inside the ZIP of `/batch/ocr/download`."""

    results: list[BatchSummaryFile] = Field(description="One entry per file, in the order sent")
    elapsed_s: float = Field(description="Server time spent on the batch, seconds")
    prompt: str = Field(description="The prompt the model saw")
    mode: str = Field(description="Resolution mode used")
    clean_formulas: bool = Field(description="Whether clean_formula was applied to the markdown")
