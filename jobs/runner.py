"""The job runner: an asyncio task in the server process that runs queued jobs page by page.

Each page goes through the service like a sync request's (`service.page` for PDF pages, `service.file`
for images), in the service's one item loop (`service.run.run_items`), is written to disk as soon as it
finishes, and is recorded in the store with its events in one transaction. Nothing of a page stays in
memory afterwards, so memory does not grow with page count.

Fairness (`service.fairness`): a job's pages are its own background flow, so at every queue (engine slots,
the pixel budget, render processes) a sync request goes first and jobs share evenly. Pages of all jobs
together are at most the jobs' engine slots (JOB_ENGINE_SLOTS) plus the render processes in
flight: the rest of the engine stays free for sync requests, and pages that could not get a slot do not sit
holding decoded pixels. JOB_MAX_INFLIGHT caps one job's share. JOBS_RUNNING jobs run at once, oldest first.
Replicas: several server processes may share one store. A replica runs a job only while it holds the job's
lease (`Store.claim`, one atomic UPDATE); its heartbeat renews the leases it holds every third of
JOB_LEASE_S (at most every HEARTBEAT_MAX_S) and there notices a cancel made through another replica; a
job whose replica died is claimed by another once the lease expired, which queues the pages left
`running` again (their attempt stays counted) and runs the rest: finished pages are never run again. The
replica that ends a job (or that holds it when a cancel ends it) sends its webhook, once; a webhook that no
replica holds (its sender died) is taken over the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from config import Settings
from errors import ServiceUnavailable
from jobs import quota, results, views, webhooks
from jobs.spec import JobSpec, JobSpecUnreadable
from jobs.store import TERMINAL, LeaseLost, Store, now
from jobs.submit import page_event, page_fields, progress_event
from service.fairness import job_flow
from service.ocr import OcrService
from service.results import ItemResult
from service.run import run_items

log = logging.getLogger("deepseek_ocr.jobs")
_RETRY_S = 2.0  # after the engine went away, how soon a job tries again
HEARTBEAT_MAX_S = 2.0  # the heartbeat also carries cancels made through other replicas: never rarer than this
PAGE_ATTEMPTS = 3  # a page whose engine worker died under it this many times is `failed` (a page that kills workers)


def replica_id() -> str:
    """This server process among the replicas: host, pid and a random part (a restart is a new replica)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Runner:
    def __init__(self, service: OcrService, store: Store, settings: Settings, data_dir: Path) -> None:
        self.service, self.store, self.settings, self.data_dir = service, store, settings, data_dir
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._changed: dict[str, asyncio.Event] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._window = asyncio.Semaphore(max(1, service.admission.job_slots + settings.render_processes))
        self._next_cleanup = 0.0
        self.replica_id = replica_id()
        self.lease_s = settings.job_lease_s
        self.held: set[str] = set()  # jobs whose lease this replica holds: running, or sending their webhook
        self._stopping = False
        self._heartbeat_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Jobs left by a crashed process (this one before a restart, or another replica) are claimed by the
        loop once their lease expired; their pages left `running` run again then."""
        log.info("jobs: replica %s (lease %g s)", self.replica_id, self.lease_s)
        await asyncio.to_thread(quota.sweep, self.store, self.data_dir)
        self._loop_task = asyncio.create_task(self._loop(), name="jobs-runner")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="jobs-heartbeat")

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._loop_task, self._heartbeat_task, *self.tasks.values(), *self.background)
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The leases go back at once (no waiting for them to expire): another replica, or this server's next
        # start, runs the pages cut off by the shutdown (their attempt stays counted).
        with contextlib.suppress(Exception):
            await self.store.call(self.store.release, list(self.held), self.replica_id, requeue=True)
        self.held.clear()
        self.store.close()

    def page_worker(self, result: Any = None) -> str:
        """Who runs a page, for its `worker` field: a Ray worker's cluster-wide name (`ray/...`), else this
        replica and its engine worker (`host:pid:random/w0 (gpu 0)`) or inline engine (`.../vllm`). The one
        place the field is filled from."""
        named = getattr(result, "worker", None)
        if named and str(named).startswith("ray/"):
            return str(named)
        return f"{self.replica_id}/{named or self.service.admission.primary.name}"

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
        if task is not None:  # running here; on another replica, its heartbeat sees the cancel and stops it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if ok:
            await self._write_searchable(job)
            await self._ended(job["id"])
        self.kick()  # a webhook of a job no replica holds goes out from this replica's loop
        return ok

    # --- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        # Often enough to take over, soon after their leases expired, the jobs of a replica that died.
        tick = max(0.1, min(30.0, self.settings.job_ttl_s / 4, self.lease_s / 3))
        while True:
            try:
                await self._schedule()
                await self._orphan_webhooks()
                if time.monotonic() >= self._next_cleanup:
                    self._next_cleanup = time.monotonic() + tick
                    await self._cleanup()
            except Exception:
                log.exception("jobs: the runner loop hit an error; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
            self._wake.clear()

    async def _schedule(self) -> None:
        if len(self.tasks) >= self.settings.jobs_running:
            return
        for job in await self.store.call(self.store.claimable):
            if len(self.tasks) >= self.settings.jobs_running:
                break
            if job["id"] in self.tasks or job["id"] in self.held:
                continue
            claimed = await self.store.call(self.store.claim, job["id"], self.replica_id, self.lease_s)
            if claimed is None:
                continue  # another replica took it first
            self.held.add(job["id"])
            if claimed["status"] in TERMINAL:  # cancelled meanwhile: only its webhook is left to do
                self._spawn(self._after(job["id"]))
                continue
            task = asyncio.create_task(self._run(claimed), name=f"job-{job['id']}")
            self.tasks[job["id"]] = task
            task.add_done_callback(lambda _t, job_id=job["id"]: self._job_done(job_id))

    def _job_done(self, job_id: str) -> None:
        self.tasks.pop(job_id, None)
        if not self._stopping:
            self._spawn(self._after(job_id))
        self.kick()

    async def _after(self, job_id: str) -> None:
        """A job's run here is over: if it ended, its webhook goes out (still under this replica's lease,
        so no other replica sends it too); then the lease goes back."""
        if job_id in self.held:
            job = await self.store.call(self.store.get, job_id)
            if (job is not None and job["status"] in TERMINAL and job["webhook_status"] == "pending"
                    and job["lease_owner"] == self.replica_id):
                await self._webhook(job)
        if job_id in self.held and job_id not in self.tasks:
            self.held.discard(job_id)
            await self.store.call(self.store.release, [job_id], self.replica_id)

    async def _orphan_webhooks(self) -> None:
        """Webhooks due that no replica holds: the job was cancelled before anyone ran it, or the replica
        sending it died (the lease expired)."""
        for job in await self.store.call(self.store.pending_webhooks):
            if job["id"] in self.held:
                continue
            if await self.store.call(self.store.claim, job["id"], self.replica_id, self.lease_s) is not None:
                self.held.add(job["id"])
                self._spawn(self._after(job["id"]))

    async def _heartbeat(self) -> None:
        """Renew the leases held here; stop a job that another replica took over (this one stalled past its
        lease) or that was cancelled through another replica."""
        period = min(self.lease_s / 3, HEARTBEAT_MAX_S)
        while True:
            await asyncio.sleep(period)
            ids = list(self.held)
            if not ids:
                continue
            try:
                mine = await self.store.call(self.store.renew, ids, self.replica_id, self.lease_s)
            except Exception:
                log.exception("jobs: the lease heartbeat failed; retrying")
                continue
            for job_id in ids:
                task = self.tasks.get(job_id)
                if job_id not in mine and job_id in self.held:
                    log.warning("jobs: %s was taken over by another replica; stopping it here", job_id)
                    self.held.discard(job_id)
                    if task is not None:
                        task.cancel()
                elif mine.get(job_id) == "cancelled" and task is not None:
                    task.cancel()  # its webhook follows from _after, under this lease

    async def _cleanup(self) -> None:
        for job_id in await self.store.call(self.store.expired, now() - self.settings.job_ttl_s):
            await asyncio.to_thread(results.remove_job, self.data_dir, job_id)
            await self.store.call(self.store.delete, job_id)
            log.info("jobs: %s removed after JOB_TTL_S", job_id)

    # --- one job --------------------------------------------------------------------------------
    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        try:
            spec = JobSpec.load(job["spec"], job_id)
            if job["status"] == "queued":
                await self.store.call(self.store.set_status, job_id, "running", started_at=now(),
                                      owner=self.replica_id)
            pending = await self.store.call(self.store.pages, job_id, ("queued", "running"))
            request = dataclasses.replace(spec.request(self.settings), flow=job_flow(job_id))
            options = spec.post()
            if spec.kind == "pdf":
                data = await asyncio.to_thread(results.read_input, self.data_dir, job_id, 0)
                pool = self.service.render_pool
                async with pool.document(data, password=spec.options.password, max_pages=10**9,
                                         flow=job_flow(job_id)) as doc:
                    del data
                    await self._pages(job_id, pending, request, options, spec, doc)
            else:
                await self._pages(job_id, pending, request, options, spec, None)
        except ServiceUnavailable as exc:
            log.warning("jobs: %s paused, the engine is unavailable: %s", job_id, exc.detail)
            self.held.discard(job_id)  # given back: a replica whose engine works may take it meanwhile
            await self.store.call(self.store.release, [job_id], self.replica_id, requeue=True)
            await asyncio.sleep(_RETRY_S)
            return
        except LeaseLost:  # the heartbeat drops a lost lease; a cancelled job's webhook follows from _after
            log.info("jobs: %s stopped here: it was cancelled or taken over through another replica", job_id)
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

    async def _pages(self, job_id: str, pending: list[dict], request: Any, options: Any, spec: JobSpec, doc: Any
                     ) -> None:
        """The pages left, through the service's item loop: each once a slot of this job (JOB_MAX_INFLIGHT) and
        of the runner's window are free (FIFO), written as soon as it finishes. ServiceUnavailable pauses the
        job; anything else fails it."""
        cap = self.settings.job_max_inflight or self.service.window
        mine = asyncio.Semaphore(max(1, cap))

        async def page(row: dict) -> ItemResult:
            return await self._page(job_id, row, request, options, spec, doc)

        async def save(index: int, result: ItemResult) -> None:
            await self._save(job_id, pending[index], result)

        await run_items(pending, page, window=(mine, self._window), on_item=save)

    async def _page(self, job_id: str, row: dict, request: Any, options: Any, spec: JobSpec, doc: Any
                    ) -> ItemResult:
        """One page, re-run at once on another engine worker when its worker dies under it (each start is an
        attempt); `failed` after PAGE_ATTEMPTS; with no engine left the whole job pauses (ServiceUnavailable)."""
        idx, attempts = row["idx"], row["attempts"]
        while True:
            if not await self.store.call(self.store.claim_page, job_id, idx, self.replica_id, self.page_worker()):
                raise LeaseLost(job_id)
            attempts += 1
            try:
                return await self._attempt(job_id, row, request, options, spec, doc)
            except ServiceUnavailable as exc:
                if not self.service.admission.ready:
                    raise  # no engine left: the job pauses until one is back
                if attempts >= PAGE_ATTEMPTS:
                    label = row["page"] if doc is not None else spec.stems[idx]
                    log.error("jobs: %s page %s failed after %d attempts: %s", job_id, label, attempts, exc.detail)
                    return ItemResult(label, dpi=spec.options.dpi if doc is not None else None).fail(
                        ServiceUnavailable(f"the engine worker died under this page on {attempts} attempts; "
                                           f"last: {exc.detail}", retry_after=None))
                log.warning("jobs: %s page index %d: %s; re-running it on another worker", job_id, idx, exc.detail)

    async def _save(self, job_id: str, row: dict, result: ItemResult) -> None:
        """A finished page: its files on disk, then its row and events in one transaction."""
        idx = row["idx"]
        path = await asyncio.to_thread(results.save_result, self.data_dir, job_id, idx, result)
        over = await asyncio.to_thread(quota.count_page, self.settings, self.store, self.data_dir, job_id, path)
        event = page_event(row, result)
        result.post = result.preview = None  # the files hold them now
        fields = {**page_fields(result, path), "worker": self.page_worker(result)}
        if await self.store.call(self.store.finish_page, job_id, idx, fields,
                                 [("page", lambda _job: event), ("progress", progress_event)],
                                 self.replica_id) is None:
            raise LeaseLost(job_id)
        self.notify(job_id)
        if over:
            raise quota.QuotaExceeded(over)

    async def _attempt(self, job_id: str, row: dict, request: Any, options: Any, spec: JobSpec, doc: Any
                       ) -> ItemResult:
        if doc is not None:
            return await self.service.page(request, doc, row["page"], dpi=spec.options.dpi, options=options,
                                           preview=True)

        async def read() -> bytes:
            return await asyncio.to_thread(results.read_input, self.data_dir, job_id, row["idx"])

        return await self.service.file(request, read, options, label=spec.stems[row["idx"]])

    async def _finish(self, job_id: str, status: str, *, error: str | None = None) -> None:
        job = await self.store.call(self.store.get, job_id)
        if job is None:
            return
        # The searchable PDFs come from the upload: made before the end is stored, so that a client that reads
        # the download at the terminal event finds them.
        if (unwritten := await self._write_searchable(job)) and status == "done":
            status, error = "failed", unwritten  # never `done` without its files
        fresh = {**job, "status": status, "finished_at": now(), "error": error}
        if await self.store.call(
            self.store.set_status, job_id, status, [(status, views.summary(fresh))], finished_at=fresh["finished_at"],
            error=error, webhook_status="pending" if job["webhook_url"] else None, owner=self.replica_id,
        ):
            log.info("jobs: %s %s (%d pages, %d failed)", job_id, status, job["pages_done"], job["pages_failed"])
            for observe in self.service.job_observers:
                observe(job["kind"], status, fresh["finished_at"] - job["created_at"])
            await self._ended(job_id)

    async def _write_searchable(self, job: dict[str, Any]) -> str | None:
        """None, or why the searchable PDF could not be stored (a full disk: the job must not end `done`)."""
        pages = await self.store.call(self.store.pages, job["id"])
        try:  # in render processes: an image PDF cannot embed as it is is decoded there, under their memory limit
            await views.write_searchable(self.service.render_pool, self.data_dir, job, pages)
        except OSError as exc:
            log.error("jobs: %s: the searchable PDF could not be written: %s", job["id"], exc)
            return f"the searchable PDF could not be written under DATA_DIR: {exc}"
        except Exception:  # the text results stand without it; the download then has no searchable PDF
            log.exception("jobs: %s: the searchable PDF could not be made", job["id"])

    async def _ended(self, job_id: str) -> None:
        """A job ended: its upload and a PDF password are no longer needed. Its webhook is due: sent by the
        replica holding the job (`_after`), or by any replica's loop when none does."""
        self.notify(job_id)
        await asyncio.to_thread(results.drop_inputs, self.data_dir, job_id)
        await asyncio.to_thread(quota.recount, self.store, self.data_dir, job_id)
        job = await self.store.call(self.store.get, job_id)
        if job is None:
            return
        with contextlib.suppress(JobSpecUnreadable):  # such a job failed on it: nothing to clear
            spec = JobSpec.load(job["spec"], job_id)
            if spec.options.password:
                await self.store.call(self.store.update_job, job_id, spec=spec.without_password().dump())

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
