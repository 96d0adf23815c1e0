"""Durable jobs: a PDF or a batch submitted once, run page by page in the server, followed, cancelled,
resumed after a crash. `store` (SQL tables), `results` (page files), `runner` (the asyncio task),
`submit` (creating jobs), `views` (answers from stored pages), `events` (SSE), `webhooks`, `handoff`
(a sync request past its deadline becomes a job, through the callback the lifespan gives the service).
"""

from __future__ import annotations

from pathlib import Path

from config import Settings


def store_url(settings: Settings) -> str:
    from jobs.store import default_url

    return settings.job_store_url or default_url(Path(settings.data_dir))
