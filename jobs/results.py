"""Job files on disk: the input, and each finished page's result, written atomically under DATA_DIR/jobs/<id>/.

A page result is everything `web/answers.py` needs to rebuild the sync routes' answers (text, markdown, plain
text, blocks on the 0..999 grid with the image size, crops, the drawn page for the layout PDF) and nothing
else: a 2,000-page job holds no page in memory, and `/jobs/{id}/result` reads them back one by one.
Every file is written to a temporary name and `os.replace`d, so a crash never leaves half a result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ocr_utils
from engines.base import Confidence, Usage
from service.results import ItemResult, PagePost

PREVIEW = "preview.jpg"  # a PDF page as rendered, long side <= pdf.render_process.PREVIEW_SIDE


def job_dir(data_dir: Path, job_id: str) -> Path:
    return data_dir / "jobs" / job_id


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, all or nothing: a temporary file in the same folder, fsynced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with_suppress_unlink(tmp)
        raise


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def input_path(data_dir: Path, job_id: str, index: int) -> Path:
    return job_dir(data_dir, job_id) / "input" / f"{index}.bin"


def save_input(data_dir: Path, job_id: str, index: int, data: bytes) -> None:
    write_atomic(input_path(data_dir, job_id, index), data)


def read_input(data_dir: Path, job_id: str, index: int) -> bytes:
    return input_path(data_dir, job_id, index).read_bytes()


def drop_inputs(data_dir: Path, job_id: str) -> None:
    """The uploads are needed only while the job can still run pages."""
    shutil.rmtree(job_dir(data_dir, job_id) / "input", ignore_errors=True)


def remove_job(data_dir: Path, job_id: str) -> None:
    shutil.rmtree(job_dir(data_dir, job_id), ignore_errors=True)


def save_result(data_dir: Path, job_id: str, index: int, result: ItemResult) -> str:
    """Write one item's result (JSON + crops + drawn page); returns its path relative to DATA_DIR."""
    folder = job_dir(data_dir, job_id) / "pages" / str(index)
    post = result.post
    record: dict[str, Any] = {
        "label": result.label,
        "status": result.status,
        "error": result.error,
        "problem": result.problem,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": vars(result.usage),
        "confidence": vars(result.confidence) if result.confidence is not None else None,
        "width": result.width,
        "height": result.height,
        "dpi": result.dpi,
        "note": result.note,
        "render_warnings": list(result.render_warnings),
        "elapsed_s": result.elapsed_s,
        "mode": result.mode,
        "attempts": result.attempts,
        "retries": result.retries,
        "worker": result.worker,
        "post": None,
        "preview": bool(result.preview),
    }
    if result.preview:
        write_atomic(folder / PREVIEW, result.preview)
    if post is not None:
        for n, crop in enumerate(post.crops):
            write_atomic(folder / f"crop{n}.jpg", crop.jpeg)
        if post.annotated_jpeg:
            write_atomic(folder / "annotated.jpg", post.annotated_jpeg)
        if post.annotated_png:
            write_atomic(folder / "annotated.png", post.annotated_png)
        record["post"] = {
            "markdown": post.markdown,
            "plain": post.plain,
            "blocks": [{"index": b.index, "label": b.label, "text": b.text, "boxes": b.boxes} for b in post.blocks],
            "warnings": post.warnings,
            "width": post.width,
            "height": post.height,
            "annotated_jpeg": bool(post.annotated_jpeg),
            "annotated_png": bool(post.annotated_png),
            "crops": [
                {"name": c.name, "label": c.label, "box": c.box, "width": c.width, "height": c.height}
                for c in post.crops
            ],
        }
    # The JSON last: its presence says the page's files are complete.
    write_atomic(folder / "result.json", json.dumps(record, ensure_ascii=False).encode())
    return str((folder / "result.json").relative_to(data_dir))


def preview_path(data_dir: Path, relative: str) -> Path | None:
    """A stored page's preview JPEG (the page image /ui shows), or None: an image job's file, a page stored
    before previews were kept, or one that failed before it was rendered."""
    path = (data_dir / relative).parent / PREVIEW
    return path if path.is_file() else None


def load_result(data_dir: Path, relative: str, *, images: bool = True, files: bool = False) -> ItemResult:
    """One stored result back as an `ItemResult` (crops and drawing read only with `images`). With `files`,
    the drawing and crops are their paths instead of their bytes: a download streams them from disk."""
    path = data_dir / relative
    record = json.loads(path.read_text(encoding="utf-8"))
    result = ItemResult(
        record["label"],
        status=record["status"],
        error=record["error"],
        problem=record["problem"],
        text=record["text"],
        finish_reason=record["finish_reason"],
        usage=Usage(**record["usage"]),
        width=record["width"],
        height=record["height"],
        dpi=record["dpi"],
        note=record["note"],
        render_warnings=tuple(record["render_warnings"]),
        elapsed_s=record["elapsed_s"],
        # Results stored before these were kept read as one attempt of an unknown mode and worker.
        mode=record.get("mode"),
        attempts=record.get("attempts", 1),
        retries=record.get("retries", []),
        worker=record.get("worker"),
        # Results stored before confidence was kept have none.
        confidence=Confidence(**record["confidence"]) if record.get("confidence") else None,
    )
    post = record["post"]
    if post is not None:
        folder = path.parent
        result.post = PagePost(
            markdown=post["markdown"],
            plain=post["plain"],
            blocks=[ocr_utils.Block(b["index"], b["label"], b["text"], [tuple(x) for x in b["boxes"]])
                    for b in post["blocks"]],
            warnings=post["warnings"],
            width=post["width"],
            height=post["height"],
        )
        if images:
            read = (lambda p: p) if files else (lambda p: p.read_bytes())
            if post["annotated_jpeg"]:
                result.post.annotated_jpeg = read(folder / "annotated.jpg")
            if post["annotated_png"] and not files:  # a download has no use for the PNG
                result.post.annotated_png = (folder / "annotated.png").read_bytes()
            result.post.crops = [
                ocr_utils.Crop(c["name"], c["label"], tuple(c["box"]), c["width"], c["height"],
                               read(folder / f"crop{n}.jpg"))
                for n, c in enumerate(post["crops"])
            ]
    return result
