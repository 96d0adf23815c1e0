"""One input, start to end: find or submit its job, follow it with a progress bar, write its outputs.

The state file is written as soon as the job exists and removed only after the outputs are on disk, so any
interruption in between (Ctrl-C, SIGKILL, a server restart) is resumed by the next run with no new job.
"""

from __future__ import annotations

import io
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ocr_client import state
from ocr_client.api import TERMINAL, ApiError, Client, follow
from ocr_client.files import Target

BAD_PAGE = frozenset({"failed", "aborted"})  # pages with no text: the run did not do what was asked


@dataclass
class Outcome:
    target: Target
    job_id: str | None = None
    status: str = "error"  # the job's end (done, failed, cancelled) or `error` when it never got there
    statuses: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped") and not any(s in BAD_PAGE for s in self.statuses)

    def line(self) -> str:
        """The summary line: what ended how, page counts by status, and where the outputs went."""
        counts: dict[str, int] = {}
        for s in self.statuses:
            counts[s] = counts.get(s, 0) + 1
        pages = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no pages"
        mark = "SKIP" if self.status == "skipped" else "OK  " if self.ok else "FAIL"
        parts = [f"{mark} {self.target.source}: {self.status}"]
        if self.status not in ("error", "skipped"):
            parts.append(f"{len(self.statuses)} page(s): {pages}")
        if self.job_id:
            parts.append(f"job {self.job_id}" + (" (resumed)" if self.resumed else ""))
        parts += self.notes
        if self.written:
            parts.append("-> " + ", ".join(str(p) for p in self.written))
        return "; ".join(parts)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def find_or_submit(client: Client, target: Target, options: dict[str, Any], out: Outcome) -> dict[str, Any]:
    """The job this input's state file names if the server still has it, else a new one (state file saved)."""
    expected = state.fingerprint(target.source, client.url, options)
    state_path = state.path_for(target.out_dir, target.stem)
    job_id = state.load(state_path, expected)
    if job_id:
        try:
            job = client.job(job_id)
            out.job_id, out.resumed = job_id, True
            return job
        except ApiError as e:
            if e.status != 404:
                raise
            out.notes.append(f"job {job_id} of the state file is gone from the server; submitted anew")
    job = client.submit(target.source, options)
    out.job_id = job["id"]
    state.save(state_path, job["id"], expected)
    return job


def outputs_exist(target: Target, want_zip: bool, want_searchable: bool) -> bool:
    """Every output the run would write is there (`--skip-existing`); a failed document has none."""
    wanted = [".md"] + [".zip"] * want_zip + ["_searchable.pdf"] * want_searchable
    return all(target.output(suffix).is_file() for suffix in wanted)


def write_outputs(client: Client, target: Target, job_id: str, want_zip: bool, want_searchable: bool,
                  out: Outcome) -> None:
    result = client.result(job_id)
    if "pages" in result:  # a PDF job: shaped like /pdf/ocr
        markdown, out.statuses = result["markdown"], [p["status"] for p in result["pages"]]
    else:  # an image job: shaped like /batch/ocr with one file
        entries = result.get("results", [])
        markdown = "\n".join(r["markdown"] for r in entries)
        out.statuses = [r["status"] for r in entries]
    if out.status != "done" or all(s in BAD_PAGE for s in out.statuses):
        # Nothing was read: an empty file would pass for a result (and `--skip-existing` would keep it).
        out.notes.append("no output written")
        return
    md = target.output(".md")
    write_atomic(md, markdown.encode())
    out.written.append(md)
    if not (want_zip or want_searchable):
        return
    archive = client.download(job_id)
    if want_searchable and any(s not in BAD_PAGE for s in out.statuses):
        archive = await_searchable(client, job_id, archive)
    if want_zip:
        write_atomic(target.output(".zip"), archive)
        out.written.append(target.output(".zip"))
    if want_searchable:
        member = searchable_member(archive)
        if member is None:
            out.notes.append("no searchable PDF in the job's ZIP")
            return
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            write_atomic(target.output("_searchable.pdf"), z.read(member))
        out.written.append(target.output("_searchable.pdf"))


def searchable_member(archive: bytes) -> str | None:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return next((n for n in z.namelist() if n.endswith("_searchable.pdf")), None)


def await_searchable(client: Client, job_id: str, archive: bytes, wait_s: float = 10.0) -> bytes:
    """The server makes a job's searchable PDF just after it reports the end, so a download right after `done`
    can come without it: ask again for a few seconds while a page with text says there will be one."""
    deadline = time.monotonic() + wait_s
    while searchable_member(archive) is None and time.monotonic() < deadline:
        time.sleep(0.25)
        archive = client.download(job_id)
    return archive


def run(client: Client, target: Target, options: dict[str, Any], *, want_zip: bool = False,
        want_searchable: bool = False, retries: int = 8, poll: bool = False, quiet: bool = False,
        position: int | None = None) -> Outcome:
    """Process one input; `Outcome.line()` says how it went. KeyboardInterrupt passes through (state kept)."""
    out = Outcome(target)
    job = find_or_submit(client, target, options, out)
    bar = tqdm(total=job.get("pages_total") or None, initial=job.get("pages_done") or 0, desc=target.source.name,
               unit="page", file=sys.stderr, disable=quiet, leave=True, dynamic_ncols=True, position=position)

    def on_event(kind: str, data: Any) -> None:
        if isinstance(data, dict) and "pages_done" in data:
            bar.total = data.get("pages_total") or bar.total
            bar.n = data["pages_done"]
            bar.refresh()

    try:
        if job["status"] not in TERMINAL:
            job = follow(client, job["id"], on_event, retries=retries, poll=poll)
        on_event("progress", job)
    finally:
        bar.close()
    out.status = job["status"]
    if job.get("error"):
        out.notes.append(f"error: {job['error']}")
    write_outputs(client, target, job["id"], want_zip, want_searchable, out)
    state.remove(state.path_for(target.out_dir, target.stem))  # the job ended and its outputs are written
    return out
