"""Shared by the job tests: submitting, waiting, reading SSE, and a PostgreSQL server started for the tests."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from helpers.server import free_port, show

PROBLEM = "application/problem+json"


def submit(url: str, data: bytes, name: str = "report.pdf", headers: dict | None = None, **fields: str) -> dict:
    r = httpx.post(f"{url}/jobs", files={"file": (name, data)}, data=fields, headers=headers, timeout=60)
    assert r.status_code == 202, show(r)
    assert r.headers["location"] == f"/jobs/{r.json()['id']}", show(r)
    return r.json()


def wait(url: str, job_id: str, until: tuple[str, ...] = ("done", "failed", "cancelled"), timeout: float = 120,
         headers: dict | None = None, pages_done: int | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=30)
        assert r.status_code == 200, show(r)
        job = r.json()
        if job["status"] in until or (pages_done is not None and job["pages_done"] >= pages_done):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def sse(url: str, job_id: str, last_id: int | None = None, headers: dict | None = None) -> list[dict]:
    """Every event of the stream until it ends: [{id, event, data}]."""
    headers = {**(headers or {}), **({"Last-Event-ID": str(last_id)} if last_id is not None else {})}
    events, current = [], {}
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.status_code
        for line in r.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
                continue
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                current[key] = value
    return events


def problem(r: httpx.Response, status: int, needle: str = "") -> dict:
    assert r.status_code == status and r.headers["content-type"].startswith(PROBLEM), show(r)
    assert needle.lower() in r.json()["detail"].lower(), show(r)
    return r.json()


def idle(url: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    health: dict = {}
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["in_flight"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.05)
    return health


# ------------------------------------------------------------------------------------------ PostgreSQL


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL (initdb + pg_ctl in a temp dir, random port); yields its URL, or None with
    the reason in `postgres.reason` when Debian's postgresql package is absent."""
    bindir = pg_bin()
    if bindir is None:
        postgres.reason = "Debian's postgresql package is not installed (no /usr/lib/postgresql/*/bin/initdb)"
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="jobs-pg-"))
    data, port = root / "data", free_port()
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = "postgres"
        if shutil.which("runuser") is None:
            postgres.reason = "running as root without runuser to drop to the postgres user"
            yield None
            return
        shutil.chown(root, user)
        run_as = ["runuser", "-u", user, "--"]
    sh = lambda *cmd: subprocess.run([*run_as, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    sh(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "jobs", "--no-sync")
    sh(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
       f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql+psycopg://jobs@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


postgres.reason = ""  # type: ignore[attr-defined]
