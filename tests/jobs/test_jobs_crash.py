"""Crash safety: `kill -9` of the server mid-job, a restart on the same DATA_DIR, and the job completes from
its unfinished pages: none lost, no finished page computed again, the result equal to an uninterrupted run's.

The server runs the README way (`uvicorn serve_ocr:app` as a child process) on the tiny checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.jobs import postgres, sse, submit, wait
from helpers.pdfs import make_pdf
from helpers.server import ROOT, free_port
from helpers.tools import missing_tool

FIELDS = {"mode": "tiny", "dpi": "72", "max_tokens": "40"}


@contextlib.contextmanager
def server(env: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    with open(log, "a") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).json().get("ready"):
                    break
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_sigkill_mid_job_then_restart_finishes_without_redoing_pages(
    tiny_checkpoint: Path, tmp_path: Path, store: str
) -> None:
    with contextlib.ExitStack() as stack:
        env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_DIR": str(tmp_path),
               "MAX_CONCURRENCY": "2", "NUM_WORKERS": "2", "JOB_MAX_INFLIGHT": "1", "LOG_LEVEL": "WARNING",
               "JOB_LEASE_S": "2"}  # the killed server's lease: the restart resumes the job once it expired
        if store == "postgresql":
            url = stack.enter_context(postgres())
            if url is None:
                missing_tool(f"PostgreSQL test skipped: {postgres.reason}")
            env["JOB_STORE_URL"] = url
        log, pdf = tmp_path / "server.log", make_pdf(10)
        with server(env, log) as (base, proc):
            job = submit(base, pdf, **FIELDS)
            before = wait(base, job["id"], pages_done=3)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        assert before["status"] == "running" and before["pages_done"] < 10, before
        finished_before = {p["page"] for p in before["pages"] if p["status"] in ("ok", "truncated")}

        with server(env, log) as (base, _):
            final = wait(base, job["id"])
            assert final["status"] == "done" and final["pages_done"] == 10, final
            attempts = {p["page"]: p["attempts"] for p in final["pages"]}
            assert all(attempts[p] == 1 for p in finished_before), (finished_before, final)  # none redone
            assert all(1 <= a <= 2 for a in attempts.values()), attempts
            assert sum(a == 2 for a in attempts.values()) <= 1, attempts  # only the page cut off by the kill
            events = sse(base, job["id"])  # stored across the crash: one per page, ids without gaps or repeats
            assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1)), events
            assert sorted(json.loads(e["data"])["page"] for e in events if e["event"] == "page") == list(range(1, 11))
            assert [e["event"] for e in events if e["event"] in ("done", "failed", "cancelled")] == ["done"]
            result = httpx.get(f"{base}/jobs/{job['id']}/result", timeout=60).json()
            ref = httpx.post(f"{base}/pdf/ocr", files={"file": ("report.pdf", pdf)}, data=FIELDS, timeout=300).json()
        assert result["markdown"] == ref["markdown"]
        assert [p["text"] for p in result["pages"]] == [p["text"] for p in ref["pages"]]
