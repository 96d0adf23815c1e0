"""API replicas sharing one job store: two `uvicorn serve_ocr:app` processes (the README way) on two ports,
one real PostgreSQL and one DATA_DIR, on the tiny checkpoint.

Whichever replica claims a job runs it (its `replica` field names it; the replica id holds its pid); the
tests then act through the other one: follow a job to the end (status, SSE, result, ZIP, one webhook),
cancel it, and SIGKILL the replica running it (the other takes the job over once the lease expired).
The kill test is the last one on that pair: it leaves one replica dead. Then: two replicas on one SQLite
file, and the store alone (six stores racing for claims; a store made before leases).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.jobs import idle, postgres, sse, submit, wait
from helpers.pdfs import make_pdf
from helpers.replicas import TERMINAL, Replica, home_and_other, stop
from helpers.server import ROOT, free_port, show
from helpers.tools import missing_tool

LEASE_S = 2.0
FIELDS = {"mode": "tiny", "dpi": "72", "max_tokens": "8"}


class Hooks(http.server.BaseHTTPRequestHandler):
    """Records every webhook delivery (job id, status) and answers 204."""

    calls: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        Hooks.calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def replicas(env: dict[str, str], root: Path) -> Iterator[list[Replica]]:
    """Two `uvicorn serve_ocr:app` processes started at once on one (empty) store; their logs, checked at the
    end for tracebacks (a lock error or a deadlock would show there)."""
    procs: list[Replica] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            with open(root / f"{name}.log", "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1", "--port", str(port)],
                    cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
            procs.append(Replica(f"http://127.0.0.1:{port}", proc))
        for name, r in zip("ab", procs, strict=True):
            ready(r, root / f"{name}.log")
        yield procs
    finally:
        for r in procs:
            stop(r.proc)
    for name in ("a", "b"):
        text = (root / f"{name}.log").read_text()
        assert "Traceback" not in text, text[-6000:]


def base_env(checkpoint: Path, root: Path) -> dict[str, str]:
    return {"MODEL_PATH": str(checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_DIR": str(root / "data"),
            "JOB_LEASE_S": str(LEASE_S), "MAX_CONCURRENCY": "2", "NUM_WORKERS": "1", "JOB_MAX_INFLIGHT": "2",
            "LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    root = tmp_path_factory.mktemp("replicas")
    try:
        with postgres() as store:
            if store is None:
                missing_tool(f"PostgreSQL tests skipped: {postgres.reason}")
            env = {**base_env(tiny_checkpoint, root), "JOB_STORE_URL": store,
                   "WEBHOOK_ALLOW": f"127.0.0.1:{receiver.server_port}"}
            with replicas(env, root) as pair:
                yield {"replicas": pair, "hook": f"http://127.0.0.1:{receiver.server_port}/hook"}
    finally:
        receiver.shutdown()


def ready(r: Replica, log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert r.proc.poll() is None, log.read_text()[-4000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(r.url + "/health", timeout=2).json().get("ready"):
                return
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def hooks_for(job_id: str, settle_s: float = 2 * LEASE_S) -> list[dict]:
    """The webhook deliveries of a job, after waiting long enough for a second (wrong) one to show up."""
    deadline = time.monotonic() + 20
    while not [c for c in Hooks.calls if c["id"] == job_id]:
        assert time.monotonic() < deadline, Hooks.calls
        time.sleep(0.05)
    time.sleep(settle_s)
    return [c for c in Hooks.calls if c["id"] == job_id]


def without_timing(body: dict) -> dict:
    """An answer without what depends on when it was asked for: time taken, the layout PDF's dates."""
    body = {k: v for k, v in body.items() if "elapsed" not in k and "seconds" not in k and "time" not in k}
    if body.get("layout_pdf"):
        body["layout_pdf"] = undated(base64.b64decode(body["layout_pdf"]))
    return body


def undated(pdf: bytes) -> bytes:
    """img2pdf stamps the layout PDF with the time it was made."""
    return re.sub(rb"/(CreationDate|ModDate) ?\(D:[^)]*\)", rb"/\1 (D:)", pdf)


def test_a_job_submitted_to_one_replica_is_followed_through_the_other(cluster: dict) -> None:
    a, _ = cluster["replicas"]
    pdf = make_pdf(40)
    job = submit(a.url, pdf, webhook_url=cluster["hook"], **FIELDS)
    home, other, _ = home_and_other(cluster, job["id"])
    events: list[dict] = []
    follower = threading.Thread(target=lambda: events.extend(sse(other.url, job["id"])))
    follower.start()  # live, from the first event, on the replica that does not run the job
    seen = []
    while (state := httpx.get(f"{other.url}/jobs/{job['id']}", timeout=30).json())["status"] not in TERMINAL:
        seen.append(state["pages_done"])
        time.sleep(0.2)
    follower.join(60)
    assert seen == sorted(seen) and len(set(seen)) > 3, seen  # progress seen rising through the other replica
    assert state["status"] == "done" and state["pages_done"] == 40 and state["replica"] is None, state
    home_id = p_id(state)
    assert home.pid_of(home_id) and {p["worker"].rsplit("/", 1)[0] for p in state["pages"]} == {home_id}, state
    # Each page names its replica and the replica's engine worker (a process of its own: ENGINE_WORKERS default).
    assert all(p["attempts"] == 1 and p["worker"].endswith("/w0 (cpu)") for p in state["pages"]), state

    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1)), events  # in order, no gap, no repeat
    assert sorted(json.loads(e["data"])["page"] for e in events if e["event"] == "page") == list(range(1, 41))
    assert [e["event"] for e in events if e["event"] in TERMINAL] == ["done"] and events[-1]["event"] == "done"
    assert sse(other.url, job["id"], last_id=17) == events[17:]  # a reconnection on either replica
    assert sse(home.url, job["id"], last_id=17) == events[17:]

    results = [httpx.get(f"{r.url}/jobs/{job['id']}/result", timeout=60) for r in (home, other)]
    assert all(r.status_code == 200 for r in results), show(results[1])
    assert without_timing(results[0].json()) == without_timing(results[1].json())
    assert [p["page"] for p in results[1].json()["pages"]] == list(range(1, 41))
    zips = [httpx.get(f"{r.url}/jobs/{job['id']}/download", timeout=60) for r in (home, other)]
    members = [zipfile.ZipFile(io.BytesIO(z.content)) for z in zips]
    assert members[0].namelist() == members[1].namelist() and "report_searchable.pdf" in members[1].namelist()
    differ = [n for n in members[0].namelist() if undated(members[0].read(n)) != undated(members[1].read(n))]
    assert differ in ([], ["pages.json"]), differ  # the manifest holds the time taken until it was asked for
    manifests = [without_timing(json.loads(m.read("pages.json"))) for m in members]
    assert manifests[0] == manifests[1] and len(manifests[1]["pages"]) == 40, manifests
    assert [h["status"] for h in hooks_for(job["id"])] == ["done"]  # sent once, by the replica that ended it


def p_id(state: dict) -> str:
    """The replica id in the first page's `worker` (replica id / engine)."""
    return state["pages"][0]["worker"].rsplit("/", 1)[0]


def test_a_cancel_through_the_other_replica_stops_the_job_where_it_runs(cluster: dict) -> None:
    a, _ = cluster["replicas"]
    job = submit(a.url, make_pdf(40), webhook_url=cluster["hook"], **FIELDS | {"max_tokens": "60"})
    home, other, running = home_and_other(cluster, job["id"])
    assert running["status"] == "running" and running["pages_done"] < 40, running
    r = httpx.delete(f"{other.url}/jobs/{job['id']}", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", show(r)
    time.sleep(LEASE_S)  # a few heartbeats of the home replica: it has seen the cancel
    health = idle(home.url)  # and stopped the job's engine work
    assert health["in_flight"] == 0 and health["waiting"] == 0, health
    first = httpx.get(f"{home.url}/jobs/{job['id']}").json()
    time.sleep(1.5)
    later = httpx.get(f"{other.url}/jobs/{job['id']}").json()
    assert later["status"] == "cancelled" and later["pages_done"] == first["pages_done"] < 40, (first, later)
    assert idle(home.url)["in_flight"] == 0  # nothing started again
    statuses = {p["status"] for p in later["pages"]}
    assert "cancelled" in statuses and statuses <= {"ok", "truncated", "aborted", "cancelled"}, later
    events = sse(home.url, job["id"])
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1)), events
    assert [e["event"] for e in events if e["event"] in TERMINAL] == ["cancelled"] == [events[-1]["event"]]
    assert [h["status"] for h in hooks_for(job["id"])] == ["cancelled"]


def test_a_replica_killed_mid_job_its_job_completes_on_the_other(cluster: dict) -> None:
    a, _ = cluster["replicas"]
    job = submit(a.url, make_pdf(40), **FIELDS | {"max_tokens": "30"})
    home, other, _ = home_and_other(cluster, job["id"])
    wait(other.url, job["id"], pages_done=4)
    home.proc.send_signal(signal.SIGKILL)
    home.proc.wait(30)
    frozen = httpx.get(f"{other.url}/jobs/{job['id']}").json()  # as the dead replica left it
    assert frozen["status"] == "running" and frozen["pages_done"] < 40, frozen
    in_flight = {p["page"] for p in frozen["pages"] if p["status"] == "running"}
    finished = {p["page"] for p in frozen["pages"] if p["status"] in ("ok", "truncated")}
    assert in_flight and finished, frozen
    killed_id = p_id(frozen)

    final = wait(other.url, job["id"], timeout=180)
    assert final["status"] == "done" and final["pages_done"] == 40 and final["pages_failed"] == 0, final
    attempts = {p["page"]: p["attempts"] for p in final["pages"]}
    assert {n for n, k in attempts.items() if k == 2} == in_flight, (in_flight, final)  # re-run: those only
    assert all(attempts[n] == 1 for n in finished), final  # none finished on the dead replica was redone
    workers = {p["page"]: p["worker"].rsplit("/", 1)[0] for p in final["pages"]}
    assert {workers[n] for n in finished} == {killed_id} and killed_id not in {workers[n] for n in in_flight}, final
    assert len(set(workers.values())) == 2 and all(other.pid_of(w) for w in set(workers.values()) - {killed_id})

    result = httpx.get(f"{other.url}/jobs/{job['id']}/result", timeout=60).json()
    assert [p["page"] for p in result["pages"]] == list(range(1, 41)), result  # each page exactly once
    events = sse(other.url, job["id"])
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1)), events
    assert sorted(json.loads(e["data"])["page"] for e in events if e["event"] == "page") == list(range(1, 41))
    assert [e["event"] for e in events if e["event"] in TERMINAL] == ["done"], events


def test_sqlite_replicas_on_one_host_share_the_work(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The default SQLite store, one file shared by two replicas on one host: each runs one of two jobs
    (JOBS_RUNNING=1), both write to the file at once, and each job is followed through the other replica."""
    env = {**base_env(tiny_checkpoint, tmp_path), "JOBS_RUNNING": "1"}
    with replicas(env, tmp_path) as (a, b):
        jobs = [submit(a.url, make_pdf(10), **FIELDS) for _ in range(2)]
        homes = [home_and_other({"replicas": [a, b]}, job["id"]) for job in jobs]
        assert {home.url for home, _, _ in homes} == {a.url, b.url}, homes  # one job on each replica
        for job, (home, other, _) in zip(jobs, homes, strict=True):
            events = sse(other.url, job["id"])
            assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1)), events
            assert sorted(json.loads(e["data"])["page"] for e in events if e["event"] == "page") == list(range(1, 11))
            final = wait(other.url, job["id"])
            assert final["status"] == "done" and all(p["attempts"] == 1 for p in final["pages"]), final
            assert {p["worker"].rsplit("/", 1)[0] for p in final["pages"]} == {p_id(final)}, final
            assert home.pid_of(p_id(final)), final


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_claims_are_atomic_and_event_ids_gapless_across_stores(kind: str, tmp_path: Path) -> None:
    """Six stores (six connection pools, as six replicas have) race for 20 jobs and write events to each:
    every job is claimed exactly once, and every job's event ids are 1..6."""
    from jobs.store import Store

    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp_path / 'jobs.sqlite'}" if kind == "sqlite" else stack.enter_context(postgres())
        if url is None:
            missing_tool(f"PostgreSQL test skipped: {postgres.reason}")
        stores = [Store(url) for _ in range(6)]  # each creates (or finds) the tables: they start together
        for store in stores:
            stack.callback(store.close)
        for i in range(20):
            job = {"id": f"j{i}", "owner": "", "kind": "pdf", "status": "queued", "spec": "{}", "filename": None,
                   "page_count": 1, "pages_total": 1, "pages_done": 0, "pages_failed": 0, "created_at": float(i),
                   "started_at": None, "finished_at": None, "error": None, "webhook_url": None,
                   "webhook_status": None, "webhook_attempts": 0}
            stores[0].create(job, [{"idx": 0, "page": 1, "status": "queued", "attempts": 0}])
        claims: list[tuple[int, str]] = []
        start = threading.Barrier(len(stores))

        def replica(k: int) -> None:
            start.wait()
            for i in range(20):
                if stores[k].claim(f"j{i}", f"r{k}", 30.0) is not None:
                    claims.append((k, f"j{i}"))
                stores[k].set_status(f"j{i}", "running", [("progress", {"from": k})])

        threads = [threading.Thread(target=replica, args=(k,)) for k in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(job for _, job in claims) == sorted(f"j{i}" for i in range(20)), claims
        for i in range(20):
            assert [e["seq"] for e in stores[0].events_after(f"j{i}", 0)] == [1, 2, 3, 4, 5, 6]
        assert stores[0].claimable() == []  # all held
        holder = {job: k for k, job in claims}["j0"]
        assert not stores[holder - 1].claim_page("j0", 0, f"r{holder - 1}", "w")  # fenced: not its lease
        assert stores[holder].claim_page("j0", 0, f"r{holder}", "w")


def test_a_store_made_before_leases_gains_their_columns(tmp_path: Path) -> None:
    """A SQLite file of the version before leases (no lease or worker columns, a job left running by a
    crash): the store adds the columns at start, and the job is claimable, its running page queued again."""
    import sqlalchemy as sa

    from jobs.store import Store

    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    Store(url).close()
    with sa.create_engine(url).begin() as conn:
        for table, column in (("jobs", "lease_owner"), ("jobs", "lease_expires"), ("pages", "worker")):
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.exec_driver_sql("INSERT INTO jobs (id, owner, kind, status, spec, pages_total, pages_done, pages_failed,"
                             " created_at, webhook_attempts) VALUES ('old', '', 'pdf', 'running', '{}', 1, 0, 0, 1, 0)")
        conn.exec_driver_sql("INSERT INTO pages (job_id, idx, page, status, attempts)"
                             " VALUES ('old', 0, 1, 'running', 1)")
    store = Store(url)
    try:
        assert [j["id"] for j in store.claimable()] == ["old"]
        assert store.claim("old", "r1", 30.0)["lease_owner"] == "r1"
        assert store.page("old", 0)["status"] == "queued" and store.page("old", 0)["worker"] is None
    finally:
        store.close()
