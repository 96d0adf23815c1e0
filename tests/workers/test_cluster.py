"""ORCHESTRATOR=ray across two Ray nodes: a real 2-node Ray cluster on localhost (`ray start --head` and a
second `ray start --address=...`, told apart by the custom resources node_a / node_b), a real PostgreSQL and
two API replicas (`uvicorn serve_ocr:app` on two ports, one DATA_DIR), on the tiny checkpoint on CPU.

Each replica joins the cluster and places one CPU engine worker (a Ray actor) on each node. Then, in order
(the later tests run on what the earlier left): a job followed to the end through the other replica has
pages done on both nodes; the second node's processes killed mid-job (its `ray start --block` process group:
raylet, agents and its actors) and the job still completes, each page once, the pages cut off re-run on the
first node; the replica running a job SIGKILLed and the other completes it; a third node that joins gets a
worker within seconds and takes pages. Every Ray process is killed at
the end by its process group and, for strays, by the cluster's temp dir in its command line.

Worker nodes use the head's temp dir (Ray ignores --temp-dir on a non-head node), so each node is told apart
by its process group, not by a temp dir. The head is 127.0.0.1 and the other nodes take loopback addresses of
their own (127.0.0.2, 127.0.0.3). A driver (an API replica) attaches to the raylet of the node whose IP
the session's node_ip_address.json names, which the last `ray start` on this host wrote: `head_ip()` writes
the head's back, else the replicas would attach to node b, whose loss then takes a replica's whole Ray
session with it (as the loss of an API host would). On real hosts each API runs on its own node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.jobs import postgres, submit, wait
from helpers.pdfs import make_pdf
from helpers.replicas import Replica, home_and_other, stop
from helpers.server import ROOT, free_port, show
from helpers.tools import missing_tool

pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-cluster.txt")

HEAD = "127.0.0.1"
RAY = str(Path(sys.executable).parent / "ray")
LEASE_S = 2.0
FIELDS = {"mode": "tiny", "dpi": "72", "max_tokens": "8"}
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           # a node that stopped answering is declared dead in ~3 s, not ~15 s
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


# Each node's workers and drivers take gRPC ports from a range of their own: the nodes share one host, and with
# Ray's one default range (10002-19999) a port one raylet handed out could be handed out by the other too
# (a replica died at start on "Address already in use" for 10008 under three test processes on two cores).
WORKER_PORTS = {"127.0.0.1": (10002, 11999), "127.0.0.2": (12000, 13999), "127.0.0.3": (14000, 15999)}


def ray_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group: the node's raylet, agents and actors share it."""
    ip = next(a.split("=", 1)[1] for a in args if a.startswith("--node-ip-address="))
    low, high = WORKER_PORTS[ip]
    args = [*args, f"--min-worker-port={low}", f"--max-worker-port={high}"]
    with open(log, "w") as out:
        return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=2",
                                 "--object-store-memory=80000000", *args], env={**os.environ, **RAY_ENV},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def kill_strays(temp_dir: str) -> None:
    """Any process still naming the cluster's temp dir (a worker that left its group): killed by its pid."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)


def head_ip(temp_dir: str) -> None:
    """Drivers started from now on attach to the head's raylet (see the module docstring)."""
    from ray._private.ray_constants import RAY_NODE_IP_FILENAME

    (Path(temp_dir) / "session_latest" / RAY_NODE_IP_FILENAME).write_text(json.dumps({"node_ip_address": HEAD}))


def alive_nodes(address: str, want: int, log: Path) -> None:
    script = ("import ray, time, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); t = time.time()\n"
              "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]) and time.time() - t < 90: "
              "time.sleep(0.5)\nprint('alive nodes:', sum(n['Alive'] for n in ray.nodes()), flush=True)")
    out = subprocess.run([sys.executable, "-c", script, address, str(want)], capture_output=True, text=True,
                         timeout=150, env={**os.environ, **RAY_ENV})
    # Ray's driver may print the autoscaler's events to stdout after our line: read our line, not the last one
    alive = re.findall(r"^alive nodes: (\d+)$", out.stdout, re.MULTILINE)
    assert alive == [str(want)], out.stdout + out.stderr + log.read_text()[-3000:]


def serve(env: dict[str, str], log: Path) -> Replica:
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env={**os.environ, **RAY_ENV, **env}, stdout=out, stderr=subprocess.STDOUT)
    return Replica(f"http://127.0.0.1:{port}", proc)


def log_excerpt(log: Path, tail: int = 3000) -> str:
    """A replica's log for a failure: its first error lines (a Ray crash ends in a long native backtrace that
    buries the cause) and then its end."""
    text = log.read_text(errors="replace")
    causes = [line[:600] for line in text.splitlines()
              if re.search(r"Check failed|Error|error|Traceback|Address already in use", line)][:8]
    return "\n".join(["first error lines:", *causes, "...log end:", text[-tail:]])


def workers_ready(r: Replica, log: Path, count: int = 2) -> dict:
    deadline = time.monotonic() + 180
    while True:
        assert r.proc.poll() is None, log_excerpt(log)
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(r.url + "/health", timeout=5).json()
            if sum(e["ready"] for e in health["engines"]) >= count:
                return health
        assert time.monotonic() < deadline, log_excerpt(log)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint: Path) -> Iterator[dict]:
    root = Path(tempfile.mkdtemp(prefix="ray-t-"))  # short: Ray's socket paths live under it
    temp_dir = str(root / "ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: dict[str, subprocess.Popen] = {}
    pair: list[Replica] = []
    try:
        with postgres() as store:
            if store is None:
                missing_tool(f"PostgreSQL tests skipped: {postgres.reason}")
            nodes["a"] = ray_node(["--head", f"--port={port}", f"--node-ip-address={HEAD}",
                                   '--resources={"node_a": 1}', f"--temp-dir={temp_dir}", "--include-dashboard=false",
                                   f"--ray-client-server-port={free_port()}",
                                   f"--dashboard-port={free_port()}"], root / "node_a.log")
            alive_nodes(address, 1, root / "node_a.log")
            nodes["b"] = ray_node([f"--address={address}", '--resources={"node_b": 1}', "--node-ip-address=127.0.0.2"],
                                  root / "node_b.log")
            alive_nodes(address, 2, root / "node_b.log")
            head_ip(temp_dir)
            env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu",
                   "DATA_DIR": str(root / "data"), "JOB_STORE_URL": store, "JOB_LEASE_S": str(LEASE_S),
                   "MAX_CONCURRENCY": "2", "NUM_WORKERS": "1", "LOG_LEVEL": "WARNING",
                   "ORCHESTRATOR": "ray", "RAY_ADDRESS": address}
            pair += [serve(env, root / "a.log"), serve(env, root / "b.log")]
            try:
                healths = [workers_ready(r, root / f"{n}.log") for r, n in zip(pair, "ab", strict=True)]
                yield {"replicas": pair, "nodes": nodes, "health": healths, "root": root, "port": port,
                       "temp_dir": temp_dir}
            finally:
                for r in pair:  # before their store goes
                    stop(r.proc)
    finally:
        for r in pair:
            stop(r.proc)
        for proc in nodes.values():
            kill_group(proc)
        kill_strays(temp_dir)
    for name in ("a", "b"):  # a graceful shutdown (SIGTERM stays uvicorn's, not Ray's sys.exit), no stray error
        text = (root / f"{name}.log").read_text() if (root / f"{name}.log").exists() else ""
        assert "SystemExit" not in text and "Traceback" not in text, text[-6000:]
    shutil.rmtree(root, ignore_errors=True)


def node_ids(health: dict) -> dict[str, str]:
    """node_a / node_b -> Ray node id, from /health's cluster view."""
    return {name: n["node_id"] for n in health["cluster"]["nodes"] for name in n["resources"]}


def on_node(worker: str | None, node_id: str) -> bool:
    return worker is not None and f"/{node_id[:12]}/" in worker


def test_health_shows_the_cluster(cluster: dict) -> None:
    health = cluster["health"][0]
    assert health["orchestrator"] == "ray" and health["cluster"]["workers_ready"] == 2, health
    ids = node_ids(health)
    assert set(ids) == {"node_a", "node_b"}, health
    for node in health["cluster"]["nodes"]:
        assert len(node["workers"]) == 1 and node["cpus"] == 2, health  # one CPU worker per node
    details = [e["detail"] for e in health["engines"]]
    assert {d["node_id"] for d in details} == set(ids.values()), details
    assert all(d["orchestrator"] == "ray" and d["pid"] and d["worker"].startswith("ray/") for d in details), details
    metrics = httpx.get(cluster["replicas"][0].url + "/metrics", timeout=10).text
    for d in details:  # one gauge per worker, named by its node
        assert f'worker_ready{{worker="{d["worker"]}"}} 1.0' in metrics, metrics[-3000:]


def test_a_job_runs_on_both_nodes_and_is_followed_through_the_other_replica(cluster: dict) -> None:
    a, b = cluster["replicas"]
    ids = node_ids(cluster["health"][0])
    job = submit(a.url, make_pdf(40), **FIELDS)
    final = wait(b.url, job["id"], timeout=180)
    assert final["status"] == "done" and final["pages_done"] == 40 and final["pages_failed"] == 0, final
    workers = [p["worker"] for p in final["pages"]]
    for node in ("node_a", "node_b"):
        assert any(on_node(w, ids[node]) for w in workers), (node, ids, workers)
    result = httpx.get(f"{b.url}/jobs/{job['id']}/result", timeout=60)
    assert result.status_code == 200, show(result)
    assert [p["page"] for p in result.json()["pages"]] == list(range(1, 41)), show(result)


def test_the_second_node_lost_mid_job_its_pages_rerun_on_the_first(cluster: dict) -> None:
    a, b = cluster["replicas"]
    ids = node_ids(cluster["health"][0])
    job = submit(a.url, make_pdf(40), **FIELDS | {"max_tokens": "24"})
    deadline = time.monotonic() + 120
    while True:  # some pages done on node b, most still to do
        state = httpx.get(f"{b.url}/jobs/{job['id']}", timeout=30).json()
        if any(p["status"] in ("ok", "truncated") and on_node(p["worker"], ids["node_b"]) for p in state["pages"]):
            break
        assert time.monotonic() < deadline and state["status"] in ("queued", "running"), state
        time.sleep(0.1)
    kill_group(cluster["nodes"]["b"])
    final = wait(b.url, job["id"], timeout=180)
    assert final["status"] == "done" and final["pages_done"] == 40 and final["pages_failed"] == 0, final
    assert sorted(p["page"] for p in final["pages"]) == list(range(1, 41)), final
    rerun = [p for p in final["pages"] if p["attempts"] >= 2]
    assert rerun and all(on_node(p["worker"], ids["node_a"]) for p in rerun), final  # re-run on node a
    result = httpx.get(f"{a.url}/jobs/{job['id']}/result", timeout=60)
    assert [p["page"] for p in result.json()["pages"]] == list(range(1, 41)), show(result)  # each page once
    time.sleep(6)  # the cluster view is refreshed every few seconds
    health = httpx.get(f"{a.url}/health", timeout=10).json()
    assert set(node_ids(health)) == {"node_a"}, health  # node b is gone from /health too


def test_the_replica_running_a_job_killed_the_other_completes_it(cluster: dict) -> None:
    a, _ = cluster["replicas"]
    job = submit(a.url, make_pdf(40), **FIELDS | {"max_tokens": "24"})
    home, other, _ = home_and_other(cluster, job["id"])
    wait(other.url, job["id"], pages_done=4)
    home.proc.send_signal(signal.SIGKILL)
    home.proc.wait(30)
    frozen = httpx.get(f"{other.url}/jobs/{job['id']}", timeout=30).json()
    assert frozen["status"] == "running" and frozen["pages_done"] < 40, frozen
    seen = []
    while (state := httpx.get(f"{other.url}/jobs/{job['id']}", timeout=30).json())["status"] == "running":
        seen.append(state["pages_done"])
        time.sleep(0.2)
    assert state["status"] == "done" and state["pages_done"] == 40 and state["pages_failed"] == 0, state
    assert len(set(seen)) > 2, seen  # progress reported by the surviving replica
    result = httpx.get(f"{other.url}/jobs/{job['id']}/result", timeout=60)
    assert [p["page"] for p in result.json()["pages"]] == list(range(1, 41)), show(result)


def test_a_node_that_joins_gets_a_worker_and_takes_pages(cluster: dict) -> None:
    survivor = next(r for r in cluster["replicas"] if r.proc.poll() is None)
    survivor_log = cluster["root"] / f"{'ab'[cluster['replicas'].index(survivor)]}.log"
    job = submit(survivor.url, make_pdf(40), **FIELDS | {"max_tokens": "24"})  # running as the node joins
    address = f"127.0.0.1:{cluster['port']}"
    node_log = cluster["root"] / "node_c.log"
    cluster["nodes"]["c"] = ray_node([f"--address={address}", '--resources={"node_c": 1}',
                                      "--node-ip-address=127.0.0.3"], node_log)
    alive_nodes(address, 2, node_log)  # a and c
    head_ip(cluster["temp_dir"])
    # The scaler checks every few seconds and starts a worker there; its actor imports torch and loads the model
    # on a box the other test files load too (25 s alone; one CI run passed 120 s without it).
    deadline = time.monotonic() + 240
    while True:
        health = httpx.get(f"{survivor.url}/health", timeout=10).json()
        ids = node_ids(health)
        if "node_c" in ids and any(e["ready"] and e["detail"].get("node_id") == ids["node_c"]
                                   for e in health["engines"]):
            break
        engines = [(e.get("worker"), e["ready"], e.get("reason"), e["detail"].get("node_id"))
                   for e in health["engines"]]
        assert time.monotonic() < deadline, (ids, engines, survivor_log.read_text()[-3000:],
                                             node_log.read_text()[-2000:])
        time.sleep(0.5)
    final = wait(survivor.url, job["id"], timeout=180)
    assert final["status"] == "done" and final["pages_failed"] == 0, final
    if not any(on_node(p["worker"], ids["node_c"]) for p in final["pages"]):  # it joined late in that job
        job = submit(survivor.url, make_pdf(40), **FIELDS | {"max_tokens": "24"})
        final = wait(survivor.url, job["id"], timeout=180)
    assert any(on_node(p["worker"], ids["node_c"]) for p in final["pages"]), (ids, final["pages"])
