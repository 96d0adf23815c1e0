"""What jobs may keep under DATA_DIR: quotas per key and in total (jobs and bytes), a free-space floor, and
the sweep of files no job row owns.

Bytes are counted on the job's row (`bytes`: its uploads when admitted, each page's files as they are
written), so a check is one SQL query, never a walk of DATA_DIR. A new job is checked before any of its files
is written (the upload counts); a running job is checked after each page, and one past a quota ends `failed`
naming the setting. A key's own quotas answer 429 (ended jobs go after JOB_TTL_S, or at once with DELETE); the
server's (DATA_QUOTA_*, DATA_MIN_FREE_GB) answer 507 Insufficient Storage.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from errors import OcrError
from jobs import results
from jobs.store import Store, now

log = logging.getLogger("deepseek_ocr.jobs")
GB = 1024**3
UPLOAD_STALE_S = 900.0  # an `uploading` row this old lost its server mid-upload (an upload takes seconds)


class QuotaExceeded(OcrError):
    status, slug, title = 429, "quota-exceeded", "This key's job quota is used up"


class InsufficientStorage(OcrError):
    status, slug, title = 507, "insufficient-storage", "The server has no room for this job"


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:  # removed meanwhile (a temporary file renamed)
                pass
    return total


def free_bytes(data_dir: Path) -> int:
    """Free bytes of the disk DATA_DIR is (or will be) on: its nearest existing folder, since DATA_DIR itself is
    made with the first job's files when the job store is elsewhere (PostgreSQL)."""
    path = data_dir.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_new_job(settings: Any, store: Store, data_dir: Path, owner: str, incoming: int) -> None:
    """Refuse a job that would pass a quota or the free-space floor; `incoming` is its upload's size.
    Blocking (SQL, statvfs): call it in a thread."""
    s, use = settings, store.usage(owner)
    if use["key_active"] >= s.max_jobs_queued_per_key:
        raise QuotaExceeded(
            f"this key has {use['key_active']} jobs queued or running (MAX_JOBS_QUEUED_PER_KEY="
            f"{s.max_jobs_queued_per_key}); retry when one ended", setting="MAX_JOBS_QUEUED_PER_KEY",
            headers={"Retry-After": "30"})
    if use["key_jobs"] >= s.job_quota_jobs_per_key:
        raise QuotaExceeded(
            f"this key keeps {use['key_jobs']} jobs (JOB_QUOTA_JOBS_PER_KEY={s.job_quota_jobs_per_key}); DELETE "
            "ended jobs or wait for JOB_TTL_S", setting="JOB_QUOTA_JOBS_PER_KEY")
    if use["key_bytes"] + incoming > s.job_quota_bytes_per_key:
        raise QuotaExceeded(
            f"this key's jobs hold {use['key_bytes']} bytes and this upload has {incoming} "
            f"(JOB_QUOTA_BYTES_PER_KEY={s.job_quota_bytes_per_key}); DELETE ended jobs or wait for JOB_TTL_S",
            setting="JOB_QUOTA_BYTES_PER_KEY")
    if use["jobs"] >= s.data_quota_jobs:
        raise InsufficientStorage(f"the server keeps {use['jobs']} jobs (DATA_QUOTA_JOBS={s.data_quota_jobs})",
                                  setting="DATA_QUOTA_JOBS")
    if use["bytes"] + incoming > s.data_quota_bytes:
        raise InsufficientStorage(
            f"jobs hold {use['bytes']} bytes and this upload has {incoming} (DATA_QUOTA_BYTES={s.data_quota_bytes})",
            setting="DATA_QUOTA_BYTES")
    floor = s.data_min_free_gb * GB
    if (free := free_bytes(data_dir)) - incoming < floor:
        raise InsufficientStorage(
            f"DATA_DIR's disk has {free / GB:.2f} GB free, this upload needs {incoming / GB:.3f} GB and "
            f"{s.data_min_free_gb:g} GB must stay free (DATA_MIN_FREE_GB)", setting="DATA_MIN_FREE_GB")


def grown_past(settings: Any, store: Store, owner: str) -> str | None:
    """After a page's files were counted: why the job must stop (a quota its results passed), or None."""
    s, use = settings, store.usage(owner)
    if use["key_bytes"] > s.job_quota_bytes_per_key:
        return (f"this key's jobs grew to {use['key_bytes']} bytes, past JOB_QUOTA_BYTES_PER_KEY="
                f"{s.job_quota_bytes_per_key}")
    if use["bytes"] > s.data_quota_bytes:
        return f"jobs grew to {use['bytes']} bytes, past DATA_QUOTA_BYTES={s.data_quota_bytes}"
    return None


def count_page(settings: Any, store: Store, data_dir: Path, job_id: str, result_path: str) -> str | None:
    """A page's files are written: count them on its job; why the job must stop (a quota passed), or None."""
    store.add_bytes(job_id, folder_bytes((data_dir / result_path).parent))
    job = store.get(job_id)
    return grown_past(settings, store, job["owner"]) if job else None


def recount(store: Store, data_dir: Path, job_id: str) -> None:
    """An ended job's bytes: its uploads went, its searchable PDFs came."""
    store.update_job(job_id, bytes=folder_bytes(results.job_dir(data_dir, job_id)))


def purge(store: Store, data_dir: Path, job_id: str) -> None:
    """DELETE on an ended job: its row (pages, events) and then its files. A folder left by a crash between the
    two has no row, and the start-up sweep removes it."""
    store.delete(job_id)
    results.remove_job(data_dir, job_id)


def sweep(store: Store, data_dir: Path) -> int:
    """At start-up: remove what no job row owns (folders under DATA_DIR/jobs without a row) and uploads their
    server never finished (`uploading` rows older than UPLOAD_STALE_S). Rows come first (`jobs.submit`), so a
    folder without a row is never one being written. Returns how many jobs' files went."""
    removed = 0
    for job_id in store.uploading_before(now() - UPLOAD_STALE_S):
        results.remove_job(data_dir, job_id)
        store.delete(job_id)
        removed += 1
    root = data_dir / "jobs"
    names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    known = store.known(names)
    for name in names:
        if name not in known:
            shutil.rmtree(root / name, ignore_errors=True)
            removed += 1
    if removed:
        log.info("jobs: removed the files of %d uploads that have no job", removed)
    return removed
