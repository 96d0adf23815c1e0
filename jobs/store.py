"""The job store: jobs, their pages and their events in SQL tables (SQLAlchemy Core, SQLite or PostgreSQL).

One sync SQLAlchemy engine; the event loop never waits on it: every call goes through `Store.call`, which
runs it in a thread. Several server processes (API replicas) may share one store: a write to a job first
locks that job's row (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite a no-op UPDATE, which takes the
database's write lock), so an event's `seq` (max + 1 within its job, in the same transaction as the change
it reports) increases without gaps or collisions whichever replica writes it; SSE clients resume from it.
Locking the job first in every write also gives every transaction the same lock order (no deadlocks).

Leases: a replica runs a job only while it holds the job's lease (`lease_owner`, `lease_expires`), taken by
one conditional UPDATE (atomic on both databases) and renewed by its heartbeat; page writes are fenced by
it, so a replica that lost its lease (it stalled past the expiry and another took the job) writes nothing.
Lease times come from the database's clock (replicas' clocks may disagree); other times are the writer's.
Page results live on disk (`jobs.results`); the tables hold what lists and progress need. Times are UNIX
seconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from service.results import ITEM_STATUSES

T = TypeVar("T")
ACTIVE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")
# A job whose upload is being written (N9: the row comes first, so every file under DATA_DIR/jobs has a row and
# a start-up sweep may remove folders without one). Neither listed nor run; `Store.admit` makes it `queued`.
UPLOADING = "uploading"
PAGE_FINISHED = ITEM_STATUSES
# A page with text: kept even when a cancel came first.
RESULTS = tuple(s for s in ITEM_STATUSES if s not in ("failed", "aborted"))

meta = sa.MetaData()
jobs_t = sa.Table(
    "jobs", meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(8), nullable=False),  # pdf | batch
    sa.Column("status", sa.String(12), nullable=False, index=True),
    sa.Column("spec", sa.Text, nullable=False),  # the options, JSON
    sa.Column("filename", sa.String(512)),
    sa.Column("page_count", sa.Integer),  # pages in the PDF (pdf jobs)
    sa.Column("pages_total", sa.Integer, nullable=False),
    sa.Column("pages_done", sa.Integer, nullable=False, default=0),
    sa.Column("pages_failed", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("webhook_url", sa.Text),
    sa.Column("webhook_status", sa.String(16)),  # pending | delivered | failed
    sa.Column("webhook_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("lease_owner", sa.String(128)),  # the replica running the job (or sending its webhook)
    sa.Column("lease_expires", sa.Float),  # its heartbeat pushes this on; past it, another replica may claim
    sa.Column("bytes", sa.BigInteger),  # its uploads and results on disk (the quotas of jobs/quota.py)
)
pages_t = sa.Table(
    "pages", meta,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("page", sa.Integer),  # 1-based PDF page
    sa.Column("file", sa.String(512)),  # batch: the file's name
    sa.Column("status", sa.String(12), nullable=False),  # queued running ok truncated failed aborted cancelled
    sa.Column("finish_reason", sa.String(16)),
    sa.Column("tokens", sa.Integer),
    sa.Column("elapsed", sa.Float),
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("result_path", sa.String(512)),
    sa.Column("worker", sa.String(256)),  # who ran the page's last attempt (replica and engine)
    sa.Column("confidence", sa.JSON),  # the page's `confidence` summary (mean/min log-probability, low share)
)
events_t = sa.Table(
    "events", meta,
    sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)


_SCHEMA_LOCK = 0x6A6F6273  # PostgreSQL advisory lock key for creating the tables ("jobs")


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'jobs.sqlite').resolve()}"


class LeaseLost(Exception):
    """Stop running the job here: this replica no longer holds its lease (another replica took it over), or
    the job ended meanwhile (a cancel through another replica, before this one's heartbeat saw it)."""


class Store:
    def __init__(self, url: str) -> None:
        if url.startswith("sqlite"):
            path = sa.engine.make_url(url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self.sqlite = self.engine.dialect.name == "sqlite"
        # Leases are timed by the database's clock, not each replica's: replicas' clocks may disagree.
        self.clock = ((sa.func.julianday("now") - 2440587.5) * 86400.0 if self.sqlite
                      else sa.cast(sa.func.extract("epoch", sa.func.now()), sa.Float))
        self._create_tables()
        self.lock = threading.Lock()

    def _create_tables(self) -> None:
        """The tables, and the columns a store made by an older version lacks (added, all nullable).
        Replicas starting together take turns: an advisory lock on PostgreSQL, the write lock on SQLite."""
        with self.engine.begin() as conn:
            if self.sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            meta.create_all(conn)
            inspector = sa.inspect(conn)
            quote = conn.dialect.identifier_preparer.quote
            for table in meta.sorted_tables:
                present = {c["name"] for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name not in present:
                        kind = column.type.compile(dialect=conn.dialect)
                        conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def close(self) -> None:
        self.engine.dispose()

    # --- writes (under the lock) ----------------------------------------------------------------
    def _write(self, fn: Callable[[sa.Connection], T]) -> T:
        with self.lock, self.engine.begin() as conn:
            return fn(conn)

    def _lock_jobs(self, conn: sa.Connection, job_ids: list[str]) -> list[Any]:
        """Lock the jobs' rows (in id order) before anything else in this transaction; their (id, status,
        lease_owner)."""
        where = jobs_t.c.id.in_(job_ids)
        query = sa.select(jobs_t.c.id, jobs_t.c.status, jobs_t.c.lease_owner).where(where).order_by(jobs_t.c.id)
        if self.sqlite:  # a write as the first statement takes the database's write lock (waiting its turn)
            conn.execute(jobs_t.update().where(where).values(lease_owner=jobs_t.c.lease_owner))
        else:
            query = query.with_for_update()
        return list(conn.execute(query))

    def _lock_job(self, conn: sa.Connection, job_id: str) -> Any:
        rows = self._lock_jobs(conn, [job_id])
        return rows[0] if rows else None

    def create(self, job: dict[str, Any], pages: list[dict[str, Any]], events: Iterable[tuple[str, dict]] = ()) -> None:
        def go(conn: sa.Connection) -> None:
            conn.execute(jobs_t.insert().values(**job))
            if pages:
                conn.execute(pages_t.insert(), [{"job_id": job["id"], **p} for p in pages])
            _add_events(conn, job["id"], events)

        self._write(go)

    def admit(self, job_id: str, status: str, pages: list[dict[str, Any]], events: Iterable[tuple[str, dict]],
              size: int, pages_done: int, pages_failed: int) -> None:
        """An `uploading` job whose files are written: its pages and events, and it becomes `status`."""
        def go(conn: sa.Connection) -> None:
            self._lock_job(conn, job_id)
            conn.execute(pages_t.insert(), [{"job_id": job_id, **p} for p in pages])
            conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(
                status=status, bytes=size, pages_done=pages_done, pages_failed=pages_failed))
            _add_events(conn, job_id, events)

        self._write(go)

    def add_bytes(self, job_id: str, size: int) -> None:
        self._write(lambda conn: conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(
            bytes=sa.func.coalesce(jobs_t.c.bytes, 0) + size)))

    def usage(self, owner: str) -> dict[str, int]:
        """Jobs kept (any status), jobs active and bytes on disk: of `owner` (`key_*`) and of everyone."""
        active = sa.func.sum(sa.case((jobs_t.c.status.in_(ACTIVE), 1), else_=0))
        size = sa.func.sum(sa.func.coalesce(jobs_t.c.bytes, 0))
        mine = sa.func.sum(sa.case((jobs_t.c.owner == owner, 1), else_=0))
        mine_active = sa.func.sum(sa.case((sa.and_(jobs_t.c.owner == owner, jobs_t.c.status.in_(ACTIVE)), 1),
                                          else_=0))
        mine_size = sa.func.sum(sa.case((jobs_t.c.owner == owner, sa.func.coalesce(jobs_t.c.bytes, 0)), else_=0))
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sa.func.count(), active, size, mine, mine_active, mine_size)).one()
        names = ("jobs", "active", "bytes", "key_jobs", "key_active", "key_bytes")
        return {name: int(value or 0) for name, value in zip(names, row, strict=True)}

    def uploading_before(self, before: float) -> list[str]:
        """Jobs whose upload never completed (their server died while writing it)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_t.c.id).where(jobs_t.c.status == UPLOADING,
                                                            jobs_t.c.created_at < before))
            return [r[0] for r in rows]

    def known(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(jobs_t.c.id).where(jobs_t.c.id.in_(ids)))} if ids else set()

    def claim_page(self, job_id: str, idx: int, owner: str, worker: str) -> bool:
        """The page starts (again) on `worker`: its attempt is counted before any engine work. False (nothing
        written) when `owner` no longer holds the job's lease or the job ended: no page starts after that."""
        def go(conn: sa.Connection) -> bool:
            held = self._lock_job(conn, job_id)
            if held is None or held.lease_owner != owner or held.status not in ACTIVE:
                return False
            conn.execute(pages_t.update().where(pages_t.c.job_id == job_id, pages_t.c.idx == idx)
                         .values(status="running", attempts=pages_t.c.attempts + 1, worker=worker))
            return True

        return self._write(go)

    def finish_page(self, job_id: str, idx: int, fields: dict[str, Any], events: Iterable[tuple[str, Any]],
                    owner: str) -> dict | None:
        """Record a finished page, count it on the job, and append its events, in one transaction. None (and
        nothing written) when `owner` no longer holds the job's lease: the replica that took it runs the page."""
        def go(conn: sa.Connection) -> dict | None:
            held = self._lock_job(conn, job_id)
            if held is None or held.lease_owner != owner:
                return None
            # Counted once: never a page already finished; a page cut short by a cancel stays `cancelled`.
            where = [pages_t.c.job_id == job_id, pages_t.c.idx == idx, pages_t.c.status.notin_(PAGE_FINISHED)]
            if fields["status"] not in RESULTS:
                where.append(pages_t.c.status != "cancelled")
            counted = conn.execute(pages_t.update().where(*where).values(**fields)).rowcount
            if counted:
                failed = 1 if fields["status"] == "failed" else 0
                conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(
                    pages_done=jobs_t.c.pages_done + 1, pages_failed=jobs_t.c.pages_failed + failed))
            row = dict(conn.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).mappings().one())
            if counted and row["status"] in ACTIVE:  # nothing follows a job's terminal event (a cancel may come first)
                _add_events(conn, job_id, [(kind, build(row)) for kind, build in events])
            return row

        return self._write(go)

    def set_status(self, job_id: str, status: str, events: Iterable[tuple[str, dict]] = (), *,
                   owner: str | None = None, **fields: Any) -> bool:
        """Move a job to `status` unless it already ended; False when it had (a cancel raced the end), or when
        `owner` is given and no longer holds the lease. A cancel (no owner) may come from any replica."""
        def go(conn: sa.Connection) -> bool:
            held = self._lock_job(conn, job_id)
            if held is None or held.status not in ACTIVE or (owner is not None and held.lease_owner != owner):
                return False
            conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(status=status, **fields))
            if status in TERMINAL:
                conn.execute(pages_t.update().where(pages_t.c.job_id == job_id, pages_t.c.status.in_(ACTIVE))
                             .values(status="cancelled" if status == "cancelled" else "failed"))
            _add_events(conn, job_id, events)
            return True

        return self._write(go)

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._write(lambda conn: conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(**fields)))

    # --- leases ---------------------------------------------------------------------------------
    def claim(self, job_id: str, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Take the lease of a job that is due (active, or ended with its webhook pending) and that nobody
        holds (never claimed, released, or expired: its replica died); the job, or None when another
        replica holds it or took it first. A single conditional UPDATE: atomic on SQLite and PostgreSQL.
        The run that held it before is gone, so its pages left `running` are queued again."""
        def go(conn: sa.Connection) -> dict[str, Any] | None:
            due = sa.or_(jobs_t.c.status.in_(ACTIVE), jobs_t.c.webhook_status == "pending")
            taken = conn.execute(jobs_t.update().where(jobs_t.c.id == job_id, self._free(), due)
                                 .values(lease_owner=owner, lease_expires=self.clock + lease_s)).rowcount
            if not taken:
                return None
            conn.execute(pages_t.update().where(pages_t.c.job_id == job_id, pages_t.c.status == "running")
                         .values(status="queued"))
            return dict(conn.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).mappings().one())

        return self._write(go)

    def renew(self, job_ids: Iterable[str], owner: str, lease_s: float) -> dict[str, str]:
        """The heartbeat: push on the leases `owner` still holds; {job id: status} of those (a job missing
        was taken over by another replica; a `cancelled` one was cancelled through another replica)."""
        ids = list(job_ids)
        if not ids:
            return {}

        def go(conn: sa.Connection) -> dict[str, str]:
            mine = {r.id: r.status for r in self._lock_jobs(conn, ids) if r.lease_owner == owner}
            if mine:
                conn.execute(jobs_t.update().where(jobs_t.c.id.in_(list(mine))).values(
                    lease_expires=self.clock + lease_s))
            return mine

        return self._write(go)

    def release(self, job_ids: Iterable[str], owner: str, *, requeue: bool = False) -> None:
        """Give leases back (the job ended, paused, or this replica stops): another replica may claim at once.
        With `requeue`, the pages this replica left `running` are queued again."""
        ids = list(job_ids)
        if not ids:
            return

        def go(conn: sa.Connection) -> None:
            mine = [r.id for r in self._lock_jobs(conn, ids) if r.lease_owner == owner]
            if not mine:
                return
            if requeue:
                conn.execute(pages_t.update().where(pages_t.c.job_id.in_(mine), pages_t.c.status == "running")
                             .values(status="queued"))
            conn.execute(jobs_t.update().where(jobs_t.c.id.in_(mine)).values(lease_owner=None, lease_expires=None))

        self._write(go)

    def delete(self, job_id: str) -> None:
        def go(conn: sa.Connection) -> None:
            self._lock_job(conn, job_id)
            for table in (events_t, pages_t):
                conn.execute(table.delete().where(table.c.job_id == job_id))
            conn.execute(jobs_t.delete().where(jobs_t.c.id == job_id))

        self._write(go)

    # --- reads ----------------------------------------------------------------------------------
    def get(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        query = sa.select(jobs_t).where(jobs_t.c.id == job_id, jobs_t.c.status != UPLOADING)
        if owner is not None:
            query = query.where(jobs_t.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return dict(row) if row else None

    def pages(self, job_id: str, statuses: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        query = sa.select(pages_t).where(pages_t.c.job_id == job_id).order_by(pages_t.c.idx)
        if statuses:
            query = query.where(pages_t.c.status.in_(statuses))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def page(self, job_id: str, idx: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(pages_t).where(pages_t.c.job_id == job_id, pages_t.c.idx == idx)
                               ).mappings().first()
        return dict(row) if row else None

    def list(self, owner: str | None, status: str | None, limit: int, offset: int) -> tuple[list[dict], int]:
        query = sa.select(jobs_t).where(jobs_t.c.status != UPLOADING)
        if owner is not None:
            query = query.where(jobs_t.c.owner == owner)
        if status:
            query = query.where(jobs_t.c.status == status)
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar_one()
            rows = conn.execute(query.order_by(jobs_t.c.created_at.desc(), jobs_t.c.id.desc())
                                .limit(limit).offset(offset)).mappings()
            return [dict(r) for r in rows], total

    def _free(self) -> Any:
        """No replica holds the job: never claimed, released, or the lease expired (its replica died)."""
        return sa.or_(jobs_t.c.lease_owner.is_(None), jobs_t.c.lease_expires < self.clock)

    def claimable(self) -> list[dict[str, Any]]:
        """Queued and running jobs that no replica holds, oldest first: admission is FIFO."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_t).where(jobs_t.c.status.in_(ACTIVE), self._free())
                                .order_by(jobs_t.c.created_at))
            return [dict(r) for r in rows.mappings()]

    def count_active(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).where(jobs_t.c.status.in_(ACTIVE))).scalar_one()

    def count_by_status(self) -> dict[str, int]:
        """Jobs of every replica by status (the `ocr_jobs` gauge), each status present, 0 when none."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_t.c.status, sa.func.count()).where(jobs_t.c.status != UPLOADING)
                                .group_by(jobs_t.c.status))
            return {**dict.fromkeys((*ACTIVE, *TERMINAL), 0), **{status: n for status, n in rows}}

    def expired(self, before: float) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_t.c.id).where(jobs_t.c.status.in_(TERMINAL),
                                                            jobs_t.c.finished_at < before))
            return [r[0] for r in rows]

    def pending_webhooks(self) -> list[dict[str, Any]]:
        """Ended jobs whose webhook is still due and that no replica holds (it died while sending, or the job
        was cancelled before any replica ran it)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_t).where(jobs_t.c.webhook_status == "pending",
                                                        jobs_t.c.status.in_(TERMINAL), self._free()))
            return [dict(r) for r in rows.mappings()]

    def events_after(self, job_id: str, seq: int, limit: int = 500) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(events_t).where(events_t.c.job_id == job_id, events_t.c.seq > seq)
                                .order_by(events_t.c.seq).limit(limit))
            return [{"seq": r.seq, "type": r.type, "data": r.data} for r in rows]


def _add_events(conn: sa.Connection, job_id: str, events: Iterable[tuple[str, dict]]) -> None:
    events = list(events)
    if not events:
        return
    last = conn.execute(sa.select(sa.func.coalesce(sa.func.max(events_t.c.seq), 0))
                        .where(events_t.c.job_id == job_id)).scalar_one()
    conn.execute(events_t.insert(), [
        {"job_id": job_id, "seq": last + n, "type": kind, "data": json.dumps(data, ensure_ascii=False)}
        for n, (kind, data) in enumerate(events, start=1)
    ])


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def now() -> float:
    return time.time()
