"""The sync routes' deadline handoff, jobs' side: a request cut off at PDF_TIMEOUT_S / BATCH_TIMEOUT_S becomes a job.

The service runs the items (`service.run`); at the deadline it cancels the unfinished ones and gives a
`Leftover` (the request as admitted, its input, the items already finished) to its `handoff` callback, which
the app's lifespan sets to `take_over` bound to the runner. The job starts with the finished items stored as
done (never redone) and runs the rest; the service's 504 names it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from errors import OcrError
from jobs.spec import JobSpec
from jobs.submit import create_job
from outputs.archive import download_stem, member_stems
from service.run import Leftover

log = logging.getLogger("deepseek_ocr.jobs")


async def take_over(runner: Any, leftover: Leftover) -> str | None:
    """The id of the job that runs the rest of `leftover`, or None when the job limits refuse one (the
    answer is then the plain 504)."""
    pdf = leftover.kind == "pdf"
    items = [{"page": n} for n in leftover.pages] if pdf else [{"file": n} for n in leftover.filenames]
    try:
        job = await create_job(
            runner, owner=leftover.owner, kind=leftover.kind, spec=spec_of(leftover), inputs=leftover.inputs,
            items=items, filename=leftover.filenames[0] if pdf else None, page_count=leftover.page_count,
            webhook_url=None, done=leftover.done, started_at=time.time(),
        )
    except OcrError as exc:
        log.warning("deadline handoff: no job (%s)", exc.detail)
        return None
    return job["id"]


def spec_of(leftover: Leftover) -> JobSpec:
    """The job spec: the route's options (its post-processing included) and the request as it was admitted
    (its model, mode and n-gram guard bound then)."""
    names = leftover.filenames
    pdf = leftover.kind == "pdf"
    return JobSpec.of_request(leftover.kind, leftover.form, leftover.request, leftover.post, filenames=names,
                              stems=member_stems(names), stem=download_stem(names[0]) if pdf else "document",
                              warnings=leftover.warnings if pdf else None)
