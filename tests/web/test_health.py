"""`/health` says `degraded` when a router or subsystem failed to load; `/ready` stays about the engines.

The failure is real: the server runs as a process whose `PYTHONPATH` puts a module named `httpx` first, one that
raises ImportError, as a fresh install without httpx did (the jobs router, the job runner and MCP import it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from helpers.server import data_dir, serve_process, show

READY_S = 120.0  # the engine worker loads the tiny checkpoint


def hide_httpx(folder: Path) -> str:
    """A PYTHONPATH on which `import httpx` raises ImportError (the server's children inherit it)."""
    folder.mkdir()
    (folder / "httpx.py").write_text('raise ImportError("httpx is hidden by tests/web/test_health.py")\n')
    return os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)


def wait_ready(url: str) -> httpx.Response:
    deadline = time.monotonic() + READY_S
    while (r := httpx.get(url + "/ready", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, show(r)
        time.sleep(0.3)
    return r


def test_health_is_ok_when_everything_loaded(base_url: str) -> None:
    r = httpx.get(base_url + "/health")
    assert r.status_code == 200, show(r)
    assert r.json()["status"] == "ok" and r.json()["unavailable"] == {} and r.json()["reason"] is None, show(r)


def test_a_router_that_cannot_import_makes_health_degraded(tiny_checkpoint: Path, tmp_path: Path) -> None:
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_DIR": data_dir(),
           "PYTHONPATH": hide_httpx(tmp_path / "shadow")}
    with serve_process(env) as url:
        ready = wait_ready(url)  # /ready is about the engines: 200 although jobs and MCP are missing
        assert ready.json()["ready"] is True, show(ready)

        r = httpx.get(url + "/health")
        assert r.status_code == 200, show(r)
        body = r.json()
        assert body["status"] == "degraded" and body["ready"] is True, show(r)
        assert set(body["unavailable"]) == {"jobs", "mcp", "job_runner"}, show(r)
        assert all("httpx" in why for why in body["unavailable"].values()), show(r)
        assert "jobs (jobs_routes failed to import" in body["reason"] and "mcp (" in body["reason"], show(r)

        routers = httpx.get(url + "/").json()["routers"]
        assert not routers["jobs"]["available"] and routers["ocr"]["available"], routers
        # The rest of the service works: an OCR route answers, /jobs is simply not there.
        ocr = httpx.get(url + "/ocr/status")
        assert ocr.status_code == 200 and ocr.json()["ready"] is True, show(ocr)
        jobs = httpx.get(url + "/jobs/status")
        assert jobs.status_code == 200 and jobs.json()["available"] is False, show(jobs)
