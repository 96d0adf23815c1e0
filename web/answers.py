"""Route answers from the service's results: JSON models, ZIP archives and the layout PDF.

Plain functions from `service.ocr.ItemResult` / `service.ocr.DocumentRun` to the models of `web/schemas/`,
`web.schemas.pdf.py` and `web.schemas.batch.py`. The sync routes and the jobs API build the same answers here.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ocr_utils
from engines.base import Confidence, Usage
from outputs.archive import SUMMARY_MEMBER, MemberData, stem_members, stream_layout_pdf
from outputs.archive import download_stem as download_stem  # the routes name their downloads through here
from outputs.archive import member_stems as member_stems
from service.results import BatchRun, DocumentRun, ItemResult, PagePost
from web.schemas.batch import (
    BatchFileResult,
    BatchResponse,
    BatchSimpleResponse,
    BatchSimpleResult,
    BatchSummary,
    BatchSummaryFile,
    BatchTotals,
    ZipMembers,
)
from web.schemas.common import BlockModel, BoxModel, ConfidenceModel, CropModel, ImageOcrResponse, UsageModel
from web.schemas.pdf import PdfOcrResponse, PdfPageModel, PdfSimplePage, PdfSimpleResponse

# MAX_ANSWER_MB's default, for callers that pass no cap (the PDF run carries the setting's value).
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024 * 1024


def b64_size(size: int) -> int:
    return -(-size // 3) * 4


class AnswerBudget:
    """Bytes of base64 images (annotated pages, crops) one JSON answer may still carry (MAX_ANSWER_MB).

    A 14 MB six-page PDF made a 286 MB JSON answer (+1.8 GB RSS while it was built): past the cap further
    images are left out of the JSON, in order, and the answer says so. ZIP downloads keep every image.
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = DEFAULT_MAX_ANSWER_BYTES if max_bytes is None else max_bytes
        self.used = 0
        self.dropped = 0

    def take(self, data: bytes) -> bool:
        size = b64_size(len(data))
        if self.dropped or self.used + size > self.max_bytes:
            self.dropped += 1
            return False
        self.used += size
        return True

    def warning(self) -> str | None:
        if not self.dropped:
            return None
        return (
            f"{self.dropped} annotated image(s) or crop(s) were left out of this JSON answer: it would have grown "
            f"past {self.max_bytes / 1024 / 1024:g} MB of images (MAX_ANSWER_MB); the ZIP download has them all"
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def usage_model(usage: Usage) -> UsageModel:
    return UsageModel(**vars(usage))


def confidence_model(confidence: Confidence | None) -> ConfidenceModel | None:
    summary = confidence.summary() if confidence is not None else None
    return ConfidenceModel(**summary) if summary is not None else None


def total_usage(items: Iterable[ItemResult]) -> UsageModel:
    total = Usage()
    for item in items:
        total.prompt_tokens += item.usage.prompt_tokens
        total.image_tokens += item.usage.image_tokens
        total.completion_tokens += item.usage.completion_tokens
    return usage_model(total)  # no per-image list: one entry per page of a long document says nothing new


def block_models(post: PagePost | None) -> list[BlockModel]:
    if post is None:
        return []
    return [
        BlockModel(
            index=b.index,
            label=b.label,
            text=b.text,
            boxes=[
                BoxModel(grid=list(box), pixels=list(ocr_utils.box_to_pixels(box, post.width, post.height)))
                for box in b.boxes
            ],
        )
        for b in post.blocks
    ]


def crop_models(crops: Iterable[ocr_utils.Crop]) -> list[CropModel]:
    return [
        CropModel(name=c.name, label=c.label, box=list(c.box), width=c.width, height=c.height, image_base64=b64(c.jpeg))
        for c in crops
    ]


def image_response(result: ItemResult, mode: str, max_bytes: int | None = None) -> ImageOcrResponse:
    post = result.post
    assert post is not None  # a single image that fails raises instead of returning a result
    budget = AnswerBudget(max_bytes)
    annotated = b64(post.annotated_png) if post.annotated_png and budget.take(post.annotated_png) else None
    crops = crop_models([c for c in post.crops if budget.take(c.jpeg)])
    note = budget.warning()
    return ImageOcrResponse(
        text=result.text,
        markdown=post.markdown,
        blocks=block_models(post),
        warnings=[*post.warnings, note] if note else post.warnings,
        annotated_image=annotated,
        crops=crops,
        width=post.width,
        height=post.height,
        note=result.note,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        mode=result.mode or mode,  # type: ignore[arg-type]
        usage=usage_model(result.usage),
        confidence=confidence_model(result.confidence),
        elapsed_s=result.elapsed_s,
        attempts=result.attempts,
        retries=result.retries,
    )


# --------------------------------------------------------------------------------------- PDFs


def page_markdown(p: ItemResult) -> str:
    if p.post is not None:
        return p.post.markdown
    # A comment keeps the failed page's slot between the split markers without showing in the render.
    return f"<!-- page {p.label} failed: {(p.error or '').replace('--', '- -')} -->"


def page_model(p: ItemResult) -> PdfPageModel:
    post = p.post
    return PdfPageModel(
        page=int(p.label or 0),
        status=p.status,
        error=p.error,
        text=p.text,
        markdown=post.markdown if post else "",
        blocks=block_models(post),
        warnings=[*(post.warnings if post else []), *p.render_warnings],
        width=p.width,
        height=p.height,
        dpi=p.dpi,
        note=p.note,
        finish_reason=p.finish_reason,  # type: ignore[arg-type]
        usage=usage_model(p.usage),
        confidence=confidence_model(p.confidence),
        attempts=p.attempts,
        retries=p.retries,
    )


def pdf_totals(run: DocumentRun) -> dict[str, Any]:
    counts = run.counts()
    return {
        "page_count": run.page_count,
        "pages_processed": len(run.pages),
        "pages_ok": counts["ok"],
        "pages_truncated": counts["truncated"],
        "pages_failed": counts["failed"],
        "pages_aborted": counts["aborted"],
        "pages_retried": counts["retried"] + counts["degraded"],
        "usage": total_usage(run.pages),
        "dpi": run.dpi,
        "mode": run.mode,
        "warnings": run.warnings,
        "elapsed_s": run.elapsed_s,
    }


def take_layout_pdf(run: DocumentRun, budget: AnswerBudget | None = None) -> MemberData | None:
    """The pages' drawings as one PDF; the per-page JPEGs are dropped as it is made (a 300-page PDF's
    drawings are ~130 MB, and the PDF and its base64 copy come on top). With a `budget`, only the pages
    that fit in it (the layout PDF embeds each JPEG as is). Drawings that are files (a job's, read for its
    download) give a PDF written as the ZIP is sent."""
    jpegs = [p.post.annotated_jpeg for p in run.pages if p.post is not None and p.post.annotated_jpeg]
    if jpegs and all(isinstance(j, Path) for j in jpegs):
        return stream_layout_pdf(jpegs)  # type: ignore[arg-type]
    if budget is not None:
        jpegs = [j for j in jpegs if budget.take(j)]
    for p in run.pages:
        if p.post is not None:
            p.post.annotated_jpeg = None
    return ocr_utils.layout_pdf(jpegs) if jpegs else None


def document_crops(run: DocumentRun) -> list[ocr_utils.Crop]:
    return [c for p in run.pages if p.post is not None for c in p.post.crops]


async def searchable_document(render_pool: Any, run: DocumentRun, source: bytes, password: str | None) -> bytes:
    """The original PDF's processed pages with the text laid under them (a failed page stays as it was), written
    in a render process (`pdf.render_pool.RenderPool.searchable_pdf`): MuPDF never opens an upload here."""
    return await render_pool.searchable_pdf(source, [(int(p.label or 0), p.text) for p in run.pages],
                                            password=password)


def pdf_response(run: DocumentRun, searchable: bytes | None = None) -> PdfOcrResponse:
    """The JSON answer of `/pdf/ocr`; CPU work (layout PDF, base64): call it in the worker pool.

    Page drawings, then crops, count against MAX_ANSWER_MB (`run.max_answer_bytes`); past it they are
    left out with a warning. The searchable PDF is not counted: it is about the upload's size.
    """
    budget = AnswerBudget(getattr(run, "max_answer_bytes", None))
    layout = take_layout_pdf(run, budget)
    crops = [c for c in document_crops(run) if budget.take(c.jpeg)]
    totals = pdf_totals(run)
    if note := budget.warning():
        totals["warnings"] = [*totals["warnings"], note]
    return PdfOcrResponse(
        searchable_pdf=b64(searchable) if searchable else None,
        pages=[page_model(p) for p in run.pages],
        markdown=ocr_utils.join_pages(page_markdown(p) for p in run.pages),
        images=crop_models(crops),
        layout_pdf=b64(layout) if layout else None,
        **totals,
    )


def pdf_simple_response(run: DocumentRun) -> PdfSimpleResponse:
    pages = [
        PdfSimplePage(
            page=int(p.label or 0),
            text=p.post.plain if p.post else "",
            status=p.status,
            finish_reason=p.finish_reason,  # type: ignore[arg-type]
            error=p.error,
            confidence=confidence_model(p.confidence),
        )
        for p in run.pages
    ]
    return PdfSimpleResponse(
        text=ocr_utils.join_pages(p.text for p in pages),
        pages=pages,
        page_count=run.page_count,
        pages_failed=run.counts()["failed"],
        mode=run.mode,  # type: ignore[arg-type]
        elapsed_s=run.elapsed_s,
    )


def pdf_members(run: DocumentRun, stem: str, searchable: bytes | Path | None = None) -> list[tuple[str, Any]]:
    """`{stem}.md`, `{stem}_det.mmd` (raw tagged text), `{stem}_layouts.pdf`, `{stem}_searchable.pdf`,
    `images/...`, `pages.json`: bytes, or files read as the ZIP is written (a job's, `stream_zip`)."""
    members: list[tuple[str, Any]] = [
        (f"{stem}.md", ocr_utils.join_pages(page_markdown(p) for p in run.pages).encode()),
        (f"{stem}_det.mmd", ocr_utils.join_pages(p.text for p in run.pages).encode()),
    ]
    if searchable:
        members.append((f"{stem}_searchable.pdf", searchable))
    if layout := take_layout_pdf(run):
        members.append((f"{stem}_layouts.pdf", layout))
    members += [(crop.name, crop.jpeg) for crop in document_crops(run)]
    manifest = {
        **pdf_totals(run),
        "usage": total_usage(run.pages).model_dump(),
        "pages": [page_model(p).model_dump(exclude={"text", "markdown"}) for p in run.pages],
    }
    members.append(("pages.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode()))
    return members


def pdf_zip(run: DocumentRun, stem: str, searchable: bytes | None = None) -> bytes:
    return ocr_utils.build_zip(pdf_members(run, stem, searchable))


def attachment(filename: str) -> str:
    """Content-Disposition for `filename`; a non-ASCII name also goes in `filename*` (RFC 6266)."""
    ascii_name = filename.encode("ascii", "replace").decode("ascii").replace("?", "_")
    header = f'attachment; filename="{ascii_name}"'
    if ascii_name != filename:
        header += f"; filename*=UTF-8''{urllib.parse.quote(filename)}"
    return header


# --------------------------------------------------------------------------------------- batches

def batch_totals(results: list[ItemResult]) -> dict[str, Any]:
    return BatchTotals(
        files=len(results),
        ok=sum(r.status == "ok" for r in results),
        truncated=sum(r.status == "truncated" for r in results),
        failed=sum(r.status == "failed" for r in results),
        aborted=sum(r.status == "aborted" for r in results),
        retried=sum(r.status in ("retried", "degraded") for r in results),
        usage=total_usage(results),
    ).model_dump()


def file_fields(index: int, filename: str, r: ItemResult) -> dict[str, Any]:
    return {
        "index": index,
        "filename": filename,
        "status": r.status,
        "error": r.problem,
        "finish_reason": r.finish_reason,
        "usage": usage_model(r.usage) if r.finish_reason is not None else None,
        "confidence": confidence_model(r.confidence),
        "width": r.width,
        "height": r.height,
        "attempts": r.attempts,
        "retries": r.retries,
    }


def batch_response(run: BatchRun) -> BatchResponse:
    results = [
        BatchFileResult(markdown=r.post.markdown if r.post else "", text=r.text, **file_fields(i, name, r))
        for i, (name, r) in enumerate(zip(run.filenames, run.results, strict=True))
    ]
    return BatchResponse(results=results, elapsed_s=run.elapsed_s, **batch_totals(run.results))


def batch_simple_response(run: BatchRun) -> BatchSimpleResponse:
    results = [
        BatchSimpleResult(index=i, filename=name, text=r.post.plain if r.post else "", status=r.status, error=r.problem,
                          confidence=confidence_model(r.confidence))
        for i, (name, r) in enumerate(zip(run.filenames, run.results, strict=True))
    ]
    return BatchSimpleResponse(results=results, elapsed_s=run.elapsed_s, **batch_totals(run.results))


def batch_zip(run: BatchRun) -> bytes:
    return ocr_utils.build_zip(batch_members(run))


def batch_members(run: BatchRun) -> list[tuple[str, Any]]:
    """`summary.json` first, then each file's members in input order. Names are final (see `member_stems`).
    Crops and searchable PDFs are bytes, or files read as the ZIP is written (a job's, `stream_zip`)."""
    members: list[tuple[str, Any]] = []
    entries: list[BatchSummaryFile] = []
    for i, (name, r) in enumerate(zip(run.filenames, run.results, strict=True)):
        markdown, raw, error, searchable = stem_members(str(r.label))
        if r.post is None:
            names = ZipMembers(error=error)
            members.append((error, json.dumps(r.problem, indent=2, ensure_ascii=False).encode()))
        else:
            names = ZipMembers(markdown=markdown, raw=raw, images=[c.name for c in r.post.crops])
            members += [(markdown, r.post.markdown.encode()), (raw, r.text.encode())]
            members += [(c.name, c.jpeg) for c in r.post.crops]
            if r.post.searchable_pdf:
                names.searchable = searchable
                members.append((searchable, r.post.searchable_pdf))
        entries.append(BatchSummaryFile(members=names, **file_fields(i, name, r)))
    summary = BatchSummary(
        results=entries,
        elapsed_s=run.elapsed_s,
        prompt=run.prompt,
        mode=run.mode,
        clean_formulas=run.clean_formulas,
        **batch_totals(run.results),
    )
    return [(SUMMARY_MEMBER, summary.model_dump_json(indent=2).encode()), *members]
