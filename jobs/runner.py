"""The job runner: an asyncio task in the server process that runs queued jobs page by page.

Each page goes through the service like a sync request's (`service.page` for PDF pages, `service.file`
for images), is written to disk as soon as it finishes, and is recorded in the store with its events in
one transaction. Nothing of a page stays in memory afterwards, so memory does not grow with page count.

Fairness: pages of all jobs together are at most the service's window in flight (engine capacity plus the
pages being rendered), taken in FIFO order, so several jobs interleave and a sync request waits for at most
one engine step; JOB_MAX_INFLIGHT caps one job's share. JOBS_RUNNING jobs run at once, oldest first.
Crash safety: on start, pages left `running` are queued again; finished pages are never run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from config import Settings
from errors import ServiceUnavailable
from jobs import RUNNERS, results, views, webhooks
from jobs.store import Store, now
from jobs.submit import page_event, page_fields, progress_event
from pipeline import OcrService

log = logging.getLogger("deepseek_ocr.jobs")
_RETRY_S = 2.0  # after the engine went away, how soon a job tries again


class Runner:
    def __init__(self, service: OcrService, store: Store, settings: Settings, data_dir: Path) -> None:
        self.service, self.store, self.settings, self.data_dir = service, store, settings, data_dir
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._changed: dict[str, asyncio.Event] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._window = asyncio.Semaphore(max(1, service.window))
        self._next_cleanup = 0.0
        RUNNERS[service] = self

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        requeued = await self.store.call(self.store.requeue_running)
        if requeued:
            log.info("jobs: %d pages left running by the last process will run again", requeued)
        for job in await self.store.call(self.store.pending_webhooks):
            self._spawn(self._webhook(job))
        self._loop_task = asyncio.create_task(self._loop(), name="jobs-runner")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self.tasks.values(), *self.background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Pages cut off by the shutdown run again at the next start (their attempt stays counted).
        with contextlib.suppress(Exception):
            await self.store.call(self.store.requeue_running)
        self.store.close()

    def kick(self) -> None:
        self._wake.set()

    # --- change notification (SSE) --------------------------------------------------------------
    def notify(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    async def wait_change(self, job_id: str, seconds: float) -> None:
        event = self._changed.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    # --- cancel ---------------------------------------------------------------------------------
    async def cancel(self, job: dict[str, Any]) -> bool:
        """Cancel a job: it ends now (one `cancelled` event), its engine work is aborted, finished pages stay."""
        fresh = {**job, "status": "cancelled", "finished_at": now()}
        ok = await self.store.call(
            self.store.set_status, job["id"], "cancelled", [("cancelled", views.summary(fresh))],
            finished_at=fresh["finished_at"], webhook_status="pending" if job["webhook_url"] else None,
        )
        task = self.tasks.get(job["id"])
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if ok:
            await self._write_searchable(job)
            await self._ended(job["id"])
        return ok

    # --- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        tick = max(0.1, min(30.0, self.settings.job_ttl_s / 4))
        while True:
            try:
                await self._schedule()
                if time.monotonic() >= self._next_cleanup:
                    self._next_cleanup = time.monotonic() + tick
                    await self._cleanup()
            except Exception:
                log.exception("jobs: the runner loop hit an error; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
            self._wake.clear()

    async def _schedule(self) -> None:
        for job in await self.store.call(self.store.active):
            if len(self.tasks) >= self.settings.jobs_running:
                break
            if job["id"] not in self.tasks:
                task = asyncio.create_task(self._run(job), name=f"job-{job['id']}")
                self.tasks[job["id"]] = task
                task.add_done_callback(lambda _t, job_id=job["id"]: self._job_done(job_id))

    def _job_done(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)
        self.kick()

    async def _cleanup(self) -> None:
        for job_id in await self.store.call(self.store.expired, now() - self.settings.job_ttl_s):
            await asyncio.to_thread(results.remove_job, self.data_dir, job_id)
            await self.store.call(self.store.delete, job_id)
            log.info("jobs: %s removed after JOB_TTL_S", job_id)

    # --- one job --------------------------------------------------------------------------------
    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        spec = json.loads(job["spec"])
        try:
            if job["status"] == "queued":
                await self.store.call(self.store.set_status, job_id, "running", started_at=now())
            pending = await self.store.call(self.store.pages, job_id, ("queued", "running"))
            request = views.request_of(self.settings, spec)
            options = views.post_options(spec)
            if spec["kind"] == "pdf":
                data = await asyncio.to_thread(results.read_input, self.data_dir, job_id, 0)
                pool = self.service.render_pool
                async with pool.document(data, password=spec["password"], max_pages=10**9) as doc:
                    del data
                    await self._pages(job_id, pending, request, options, spec, doc)
            else:
                await self._pages(job_id, pending, request, options, spec, None)
        except ServiceUnavailable as exc:
            log.warning("jobs: %s paused, the engine is unavailable: %s", job_id, exc.detail)
            await self.store.call(self.store.requeue_running, job_id)
            await asyncio.sleep(_RETRY_S)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("jobs: %s failed", job_id)
            await self._finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        final = await self.store.call(self.store.get, job_id)
        if final is not None and final["status"] in ("queued", "running"):
            everything_failed = final["pages_failed"] == final["pages_total"] and final["pages_total"] > 0
            await self._finish(job_id, "failed" if everything_failed else "done",
                               error="every page failed" if everything_failed else None)

    async def _pages(self, job_id: str, pending: list[dict], request: Any, options: Any, spec: dict, doc: Any) -> None:
        cap = self.settings.job_max_inflight or self.service.window
        mine = asyncio.Semaphore(max(1, cap))
        try:
            await self._feed(job_id, pending, request, options, spec, doc, mine)
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None  # ServiceUnavailable pauses the job; anything else fails it

    async def _feed(self, job_id: str, pending: list[dict], request: Any, options: Any, spec: dict, doc: Any,
                    mine: asyncio.Semaphore) -> None:
        """Pages in order, each once a slot of this job (JOB_MAX_INFLIGHT) and of the window are free (FIFO)."""
        async with asyncio.TaskGroup() as group:
            for row in pending:
                await mine.acquire()
                try:
                    await self._window.acquire()
                except BaseException:
                    mine.release()
                    raise
                task = group.create_task(self._page(job_id, row, request, options, spec, doc))
                task.add_done_callback(lambda _t: (mine.release(), self._window.release()))

    async def _page(self, job_id: str, row: dict, request: Any, options: Any, spec: dict, doc: Any) -> None:
        idx = row["idx"]
        await self.store.call(self.store.claim_page, job_id, idx)
        if doc is not None:
            result = await self.service.page(request, doc, row["page"], dpi=spec["dpi"], options=options)
        else:
            async def read() -> bytes:
                return await asyncio.to_thread(results.read_input, self.data_dir, job_id, idx)

            result = await self.service.file(request, read, options, label=spec["stems"][idx])
        path = await asyncio.to_thread(results.save_result, self.data_dir, job_id, idx, result)
        event = page_event(row, result)
        result.post = None  # the files hold it now
        await self.store.call(self.store.finish_page, job_id, idx, page_fields(result, path),
                              [("page", lambda _job: event), ("progress", progress_event)])
        self.notify(job_id)

    async def _finish(self, job_id: str, status: str, *, error: str | None = None) -> None:
        job = await self.store.call(self.store.get, job_id)
        if job is None:
            return
        # The searchable PDFs come from the upload: made before the end is stored, so that a client that reads
        # the download at the terminal event finds them.
        await self._write_searchable(job)
        fresh = {**job, "status": status, "finished_at": now(), "error": error}
        if await self.store.call(
            self.store.set_status, job_id, status, [(status, views.summary(fresh))], finished_at=fresh["finished_at"],
            error=error, webhook_status="pending" if job["webhook_url"] else None,
        ):
            log.info("jobs: %s %s (%d pages, %d failed)", job_id, status, job["pages_done"], job["pages_failed"])
            await self._ended(job_id)

    async def _write_searchable(self, job: dict[str, Any]) -> None:
        pages = await self.store.call(self.store.pages, job["id"])
        try:
            await asyncio.to_thread(views.write_searchable, self.data_dir, job, pages)
        except Exception:  # the text results stand without it; the download then has no searchable PDF
            log.exception("jobs: %s: the searchable PDF could not be made", job["id"])

    async def _ended(self, job_id: str) -> None:
        """A job ended: its upload and a PDF password are no longer needed; its webhook is due."""
        self.notify(job_id)
        await asyncio.to_thread(results.drop_inputs, self.data_dir, job_id)
        job = await self.store.call(self.store.get, job_id)
        if job is not None and json.loads(job["spec"]).get("password"):
            spec = {**json.loads(job["spec"]), "password": None}
            await self.store.call(self.store.update_job, job_id, spec=json.dumps(spec, ensure_ascii=False))
        if job is not None and job["webhook_url"]:
            self._spawn(self._webhook(job))

    # --- webhooks -------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _webhook(self, job: dict[str, Any]) -> None:
        s = self.settings
        secret = s.webhook_secret.get_secret_value() if s.webhook_secret else None
        delivered, attempts = await webhooks.deliver(
            job["webhook_url"], views.summary(job), secret=secret, retries=s.webhook_retries,
            backoff_s=s.webhook_backoff_s,
        )
        await self.store.call(self.store.update_job, job["id"], webhook_status="delivered" if delivered else "failed",
                              webhook_attempts=attempts)
