"""Where API replicas run: a `uvicorn serve_ocr:app` process per replica sharing one job store
(tests/jobs/test_jobs_replicas.py, tests/workers/test_cluster.py)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import httpx

TERMINAL = ("done", "failed", "cancelled")


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen

    def pid_of(self, replica_id: str | None) -> bool:
        return replica_id is not None and replica_id.split(":")[-2] == str(self.proc.pid)



def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def home_and_other(cluster: dict, job_id: str) -> tuple[Replica, Replica, dict]:
    """The replica running the job (its lease holder) and the other one."""
    a, b = cluster["replicas"]
    deadline = time.monotonic() + 30
    while True:
        state = httpx.get(f"{a.url}/jobs/{job_id}", timeout=30).json()
        for home, other in ((a, b), (b, a)):
            if home.pid_of(state["replica"]) and state["pages_done"] >= 1:
                return home, other, state
        assert time.monotonic() < deadline and state["status"] not in TERMINAL, state
        time.sleep(0.05)


