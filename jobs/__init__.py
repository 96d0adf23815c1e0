"""Durable jobs: a PDF or a batch submitted once, run page by page in the server, followed, cancelled,
resumed after a crash. `store` (SQL tables), `results` (page files), `runner` (the asyncio task),
`submit` (creating jobs), `views` (answers from stored pages), `events` (SSE), `webhooks`, `handoff`
(a sync request past its deadline becomes a job).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from config import Settings

# The runner serving each service, for the sync routes' deadline handoff. Kept here, not in jobs.runner,
# so the PDF and batch routers do not need SQLAlchemy to import.
RUNNERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def runner_of(service: Any) -> Any:
    """The job runner serving `service`, or None when jobs are off."""
    return RUNNERS.get(service)


def store_url(settings: Settings) -> str:
    from jobs.store import default_url

    return settings.job_store_url or default_url(Path(settings.data_dir))
