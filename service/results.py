"""What an item becomes: `ItemResult` with the one status vocabulary; `DocumentRun` for a PDF's pages and
`BatchRun` for a batch's files."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import ocr_utils
from engines.base import Confidence, Usage
from errors import Aborted, OcrError
from service.timing import Timing

# The one item status vocabulary of every route, job page, metric label and MCP answer.
ItemStatus = Literal["ok", "truncated", "failed", "aborted", "retried", "degraded"]
ITEM_STATUSES: tuple[str, ...] = get_args(ItemStatus)
ABORTED = "the engine aborted this generation (it was stopped or preempted); retry the request"


@dataclass
class PagePost:
    """Post-processed output of one image or page."""

    markdown: str
    plain: str
    blocks: list[ocr_utils.Block]
    warnings: list[str]
    width: int
    height: int
    annotated_png: bytes | None = None
    annotated_jpeg: bytes | None = None
    crops: list[ocr_utils.Crop] = field(default_factory=list)
    searchable_pdf: bytes | None = None


@dataclass
class ItemResult:
    """One item's outcome; never the image itself, so a long document is not held as pixels."""

    label: int | str | None = None  # page number, or the file's ZIP stem
    status: ItemStatus = "failed"
    error: str | None = None
    problem: dict[str, Any] | None = None  # the failure as problem+json (batch entries carry it)
    text: str = ""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    confidence: Confidence | None = None  # the kept attempt's token log-probabilities, where the engine scores them
    post: PagePost | None = None
    width: int | None = None
    height: int | None = None
    dpi: int | None = None
    note: str | None = None
    render_warnings: tuple[str, ...] = ()
    elapsed_s: float = 0.0
    mode: str | None = None  # the mode of the attempt kept (the retry ladder may have changed it)
    attempts: int = 1
    retries: list[dict[str, Any]] = field(default_factory=list)  # one entry per attempt after the first
    worker: str | None = None  # the engine worker that ran the kept attempt (jobs' per-page `worker`)
    timing: Timing = field(default_factory=Timing)  # its stages, every attempt's included
    preview: bytes | None = None  # a PDF page's small JPEG, rendered for a job (never for a sync answer)

    def fail(self, exc: OcrError) -> ItemResult:
        self.status, self.error, self.problem = "failed", exc.detail, exc.to_problem()
        return self


def item_status(finish_reason: str) -> ItemStatus:
    """The one status policy: `truncated` at max_tokens (kept, never dropped), `aborted` when aborted."""
    return {"length": "truncated", "abort": "aborted"}.get(finish_reason, "ok")  # type: ignore[return-value]


def only(result: ItemResult) -> ItemResult:
    """The result of a request of one item (the image routes): an item the engine aborted is the request's
    503 `aborted` problem with Retry-After, as on `/generate` and `/v1`, since retrying is the remedy."""
    if result.status == "aborted":
        raise Aborted(result.error or ABORTED)
    return result


@dataclass
class DocumentRun:
    """The pages of one PDF request, in page order."""

    mode: str
    page_count: int
    dpi: int
    pages: list[ItemResult]
    warnings: list[str]
    started: float
    max_answer_bytes: int | None = None  # MAX_ANSWER_MB: images past it are left out of the JSON answer

    @property
    def elapsed_s(self) -> float:
        return round(time.perf_counter() - self.started, 4)

    def counts(self) -> dict[str, int]:
        return {s: sum(p.status == s for p in self.pages) for s in ITEM_STATUSES}


@dataclass
class BatchRun:
    """The files of one batch request, in the order sent (`results[i].label` is file i's stem)."""

    filenames: list[str]
    results: list[ItemResult]
    prompt: str
    mode: str
    clean_formulas: bool
    elapsed_s: float


def bug(exc: Exception) -> OcrError:
    return OcrError(f"internal error ({type(exc).__name__}) on this item; this is a bug, see the server log")
