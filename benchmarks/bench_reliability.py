"""Issue 26's acceptance figures, measured: one scenario per finding against `uvicorn serve_ocr:app`.

    python benchmarks/bench_reliability.py [h4 n1 n3 n4 n6] [--quick]

The tests of issue 26 (tests/web/test_hostile_server.py, tests/jobs/test_jobs_*.py, tests/service/test_fairness.py)
check what the service answers, under bounds generous enough for a loaded machine; the issue's exact figures
(RSS growth, `/health` latency, seconds to an answer) depend on the machine and are measured here instead.

Each scenario starts a fresh server the `make serve` way on the tiny random checkpoint: the Makefile's uvicorn
options, MALLOC_ARENA_MAX=2, DEFAULT_MAX_TOKENS=64, every other setting its default (N3 shortens
SSE_IDLE_TIMEOUT_S; N4 sets two API keys). Around each scenario a thread asks `/health` every ~0.25 s (max,
p50, p95 of the answered probes; those that got no 200 are counted in `health_failed`) and another samples
the RSS of the server and its children (render and engine processes) every 50 ms (growth = peak - before).
Each scenario prints one JSON line, flushed when it ends, with the measured figures, the issue's target
beside each (`target_*`), the CPU count and the load
average. `--quick` runs each at a small scale (a smoke run while developing; its figures mean nothing).

- h4: six, then sixteen PNG strips of 1 x 40,000,000 at once, with an ordinary 640x480 JPEG beside them.
- n1: a 150-page job at dpi 200 (pages that render to incompressible PNGs, as a scan does), then four parallel
  downloads of its ZIP.
- n3: 1,000 event streams asked for at once (20 keys x 50) on queued jobs, SSE_IDLE_TIMEOUT_S=20, then again
  asked key by key (the next key's once the last key's were answered): opened, refused with
  429, `/health`, and when the idle streams end against the setting. Four fill-bomb jobs of another key hold the
  job runner's JOBS_RUNNING=4 slots so the listened jobs stay queued (no event: idle streams); they load the CPU.
- n4: a 300-page job and a 20-page fill-bomb job of key A; meanwhile three rounds of an image, a 1-page PDF and
  key B's `POST /jobs`. The engine batch is the longest gap between two counts of `/health`'s `batches`.
- n6: the indirect-filter, the two filter-array and the A85-behind-a-reference bombs (2 GB of zeros each), each
  alone (`alone_s`), then all four and a normal 1-page PDF at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import hostile as h  # noqa: E402
from helpers.health_clock import HealthClock  # noqa: E402
from helpers.hostile_server import Server, deflated_zeros_pdf, start, stop  # noqa: E402
from helpers.images import png_image  # noqa: E402
from helpers.pdfs import make_pdf, picture_png  # noqa: E402
from helpers.server import data_dir  # noqa: E402
from PIL import Image  # noqa: E402

MB = 2**20
PROBE_S = 120.0  # a probe's client gives up here: far past every target, so a miss is measured, not hidden


def emit(row: dict[str, Any]) -> None:
    row.update(cpus=os.cpu_count(), loadavg_end=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(row), flush=True)


def checkpoint() -> Path:
    """The tiny random checkpoint (`make demo-model`'s), written once per machine."""
    from deepseek_ocr import make_tiny

    folder = Path(tempfile.gettempdir()) / "bench-reliability-tiny"
    if not (folder / "config.json").exists():
        make_tiny(folder, seed=0)
    return folder


@contextlib.contextmanager
def serving(**env: str) -> Iterator[Server]:
    base = {"MODEL_PATH": str(checkpoint()), "DATA_DIR": data_dir(), "DEFAULT_MAX_TOKENS": "64",
            "MALLOC_ARENA_MAX": "2", "LOG_LEVEL": "WARNING"}
    proc, server = start({**base, **env})
    try:
        yield server
    finally:
        stop(proc, server)
        server.log.unlink(missing_ok=True)


def rss_mb(proc: psutil.Process, children: bool = True) -> float:
    procs = [proc, *proc.children(recursive=True)] if children else [proc]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / MB


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


class Monitor:
    """`/health` every ~0.25 s (`HealthClock`: its latency and the engine's longest batch) and RSS every 50 ms,
    server alone and with children."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.clock = HealthClock(server.url, timeout_s=PROBE_S)
        self.before = rss_mb(server.proc)
        self.before_server = rss_mb(server.proc, children=False)
        self.peak, self.peak_server = self.before, self.before_server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._rss, daemon=True)

    @property
    def longest_batch(self) -> float:
        return self.clock.longest

    @property
    def batches(self) -> int:
        return self.clock.batches

    def _rss(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, rss_mb(self.server.proc))
                self.peak_server = max(self.peak_server, rss_mb(self.server.proc, children=False))
            self._stop.wait(0.05)

    def __enter__(self) -> Monitor:
        self.clock.__enter__()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.clock.__exit__(*exc)
        self._thread.join(5)

    def figures(self) -> dict[str, Any]:
        health = self.clock.latencies
        finite = [x for x in health if x != float("inf")]
        return {"health_samples": len(health), "health_failed": len(health) - len(finite),
                "health_max_s": round(max(finite), 3) if finite else None,  # failed probes: health_failed
                "health_p50_s": pct(finite, 0.5), "health_p95_s": pct(finite, 0.95),
                "rss_before_mb": round(self.before), "rss_peak_mb": round(self.peak),
                "rss_growth_mb": round(self.peak - self.before),
                "server_rss_growth_mb": round(self.peak_server - self.before_server)}


def timed(fn: Callable[[], httpx.Response]) -> tuple[int | str, float, str]:
    """(status or why no answer came, seconds, a short detail)."""
    started = time.monotonic()
    try:
        r = fn()
        detail = ""
        if r.headers.get("content-type", "").startswith("application/problem+json"):
            detail = r.json().get("detail", "")[:120]
        return r.status_code, round(time.monotonic() - started, 2), detail
    except httpx.HTTPError as exc:
        return type(exc).__name__, round(time.monotonic() - started, 2), str(exc)[:120]


def post_file(url: str, path: str, name: str, data: bytes, headers: dict | None = None,
              **form: str) -> httpx.Response:
    return httpx.post(url + path, files={"file": (name, data)}, data=form, headers=headers, timeout=PROBE_S)


def at_once(fns: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(lambda fn: fn(), fns))


def jpeg(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "white").save(out, "JPEG")
    return out.getvalue()


def submit(url: str, data: bytes, name: str, headers: dict | None = None, **form: str) -> str:
    r = post_file(url, "/jobs", name, data, headers, **form)
    assert r.status_code == 202, (r.status_code, r.text[:500])
    return r.json()["id"]


def job_state(url: str, job_id: str, headers: dict | None = None) -> dict:
    return httpx.get(f"{url}/jobs/{job_id}", headers=headers, timeout=PROBE_S).json()


def wait_job(url: str, job_id: str, timeout: float, headers: dict | None = None, pages_done: int | None = None,
             ) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(url, job_id, headers)
        if state["status"] in ("done", "failed", "cancelled") or (
                pages_done is not None and state["pages_done"] >= pages_done):
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ scenarios


def h4(quick: bool) -> None:
    width = 4_000_000 if quick else 40_000_000
    strip, beside = png_image(width, 1), jpeg((640, 480))
    for copies in ((2,) if quick else (6, 16)):
        started = time.monotonic()
        with serving() as server:
            with Monitor(server) as mon:
                time.sleep(1.0)  # a baseline of /health and RSS before the strips
                send = lambda: timed(lambda: post_file(server.url, "/ocr/image/simple", "h.png", strip))  # noqa: E731
                answers = at_once([*[send] * copies, lambda: (time.sleep(0.3), timed(
                    lambda: post_file(server.url, "/ocr/image/simple", "p.jpg", beside)))[1]])
        statuses = [a[0] for a in answers[:copies]]
        emit({"scenario": "h4", "quick": quick, "strips": copies, "strip": f"1x{width}",
              "strip_statuses": {str(s): statuses.count(s) for s in set(statuses)},
              "strip_detail": answers[0][2], **mon.figures(), "target_rss_growth_mb": 1500,
              "target_health_s": 1.0, "ordinary_status": answers[-1][0], "ordinary_s": answers[-1][1],
              "target_ordinary_s": 10.0, "wall_s": round(time.monotonic() - started, 1)})


def scan_pdf(pages: int) -> bytes:
    """`pages` A4 pages each showing one grey-noise picture (stored once, shown on every page) under a line of
    text: a small file whose pages render, as scans do, to PNGs that barely compress."""
    import numpy as np
    import pymupdf

    noise = np.random.default_rng(0).integers(0, 256, (1170, 827), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise, "L").save(buf, "JPEG", quality=40)
    doc = pymupdf.open()
    xref = 0
    for n in range(pages):
        page = doc.new_page(width=595, height=842)
        xref = page.insert_image(page.rect, stream=buf.getvalue()) if n == 0 else \
            page.insert_image(page.rect, xref=xref)
        page.insert_text((56, 72), f"Page {n + 1}", fontsize=22)
    data = doc.tobytes(garbage=3, deflate=True)
    doc.close()
    return data


def n1(quick: bool) -> None:
    pages = 10 if quick else 150
    pdf = scan_pdf(pages)
    started = time.monotonic()
    with serving() as server:
        job_started = time.monotonic()
        job_id = submit(server.url, pdf, "scan.pdf", dpi="200")
        state = wait_job(server.url, job_id, timeout=3600)
        job_s = time.monotonic() - job_started
        folder = Path(server_data_dir(server)) / "jobs" / job_id
        on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else None
        time.sleep(2.0)  # let the job's memory settle before the baseline

        def download() -> tuple[int, int, float]:
            got, t0 = 0, time.monotonic()
            with httpx.stream("GET", f"{server.url}/jobs/{job_id}/download", timeout=PROBE_S * 5) as r:
                for chunk in r.iter_bytes():
                    got += len(chunk)
            return r.status_code, got, time.monotonic() - t0

        with Monitor(server) as mon:
            downloads = at_once([download] * 4)
    emit({"scenario": "n1", "quick": quick, "pages": pages, "pdf_mb": round(len(pdf) / MB, 2), "dpi": 200,
          "job_status": state["status"], "job_s": round(job_s, 1),
          "results_on_disk_mb": round(on_disk / MB) if on_disk is not None else None,
          "download_statuses": [d[0] for d in downloads], "zip_mb": [round(d[1] / MB) for d in downloads],
          "download_s_max": round(max(d[2] for d in downloads), 1), **mon.figures(),
          "target_server_rss_growth_mb": 300, "wall_s": round(time.monotonic() - started, 1)})


def server_data_dir(server: Server) -> str:
    return server.proc.environ()["DATA_DIR"]


def n3(quick: bool) -> None:
    for asking in ("at once", "by key"):
        n3_streams(quick, asking)


def n3_streams(quick: bool, asking: str) -> None:
    """`asking`: "at once" (every stream asked for together) or "by key" (a key's streams together, the next key
    once they have all been answered; the open ones stay open), as tests/jobs/test_jobs_events.py does."""
    keys = [f"k{i}" for i in range(5 if quick else 20)]
    per_key, idle_s = (40, 5.0) if quick else (50, 20.0)
    started = time.monotonic()
    with serving(API_KEY=",".join([*keys, "blocker"]), SSE_IDLE_TIMEOUT_S=str(idle_s)) as server:
        url, blocker = server.url, {"X-API-Key": "blocker"}
        bomb = h.heavy_pdf(repeats=100, pages=20)
        blockers = [submit(url, bomb, "bomb.pdf", blocker) for _ in range(4)]
        deadline = time.monotonic() + 120  # the four hold the runner's slots before the listened jobs come
        while any(job_state(url, j, blocker)["status"] == "queued" for j in blockers) and time.monotonic() < deadline:
            time.sleep(0.5)
        jobs = {k: submit(url, make_pdf(1), "one.pdf", {"X-API-Key": k}) for k in keys}
        queued = sum(job_state(url, j, {"X-API-Key": k})["status"] == "queued" for k, j in jobs.items())

        async def scenario() -> list[dict]:
            limits = httpx.Limits(max_connections=len(keys) * per_key + 10, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, read=None)) as client:
                async def one(key: str, answered: asyncio.Event) -> dict:
                    asked = time.monotonic()
                    try:
                        async with client.stream("GET", f"{url}/jobs/{jobs[key]}/events",
                                                 headers={"X-API-Key": key}) as r:
                            out = {"status": r.status_code, "answered": time.monotonic() - asked}
                            answered.set()
                            if r.status_code != 200:
                                body = await r.aread()
                                out["problem_json"] = r.headers.get("content-type", "").startswith(
                                    "application/problem+json")
                                out["setting"] = json.loads(body).get("setting") if out["problem_json"] else None
                                return out
                            opened, events, pings = time.monotonic(), 0, 0
                            async for line in r.aiter_lines():
                                events += line.startswith("data:")
                                pings += line.startswith(": ping")
                            out.update(lasted=time.monotonic() - opened, events=events, pings=pings)
                            return out
                    finally:
                        answered.set()

                tasks = []
                for key in keys:
                    flags = [asyncio.Event() for _ in range(per_key)]
                    tasks += [asyncio.create_task(one(key, flag)) for flag in flags]
                    if asking == "by key":
                        await asyncio.gather(*(flag.wait() for flag in flags))
                return await asyncio.gather(*tasks)

        with Monitor(server) as mon:
            streams = asyncio.run(scenario())
        for job in blockers:
            httpx.delete(f"{url}/jobs/{job}", headers=blocker, timeout=PROBE_S)
    opened = [s for s in streams if s["status"] == 200]
    refused = [s for s in streams if s["status"] == 429]
    idle = [s["lasted"] for s in opened if s["events"] == 0]
    emit({"scenario": "n3", "quick": quick, "asked": asking, "keys": len(keys), "streams_asked": len(streams),
          "opened": len(opened), "refused_429": len(refused),
          "refused_problem_json": sum(bool(s.get("problem_json")) for s in refused),
          "refused_settings": sorted({s.get("setting") or "" for s in refused}),
          "uvicorn_503": sum(s["status"] == 503 for s in streams),
          "other_statuses": sorted({s["status"] for s in streams} - {200, 429, 503}),
          "listened_jobs_queued": f"{queued}/{len(keys)}", "streams_with_events": len(opened) - len(idle),
          "sse_idle_timeout_s": idle_s, "idle_closed_min_s": round(min(idle), 2) if idle else None,
          "idle_closed_p50_s": pct(idle, 0.5), "idle_closed_max_s": round(max(idle), 2) if idle else None,
          "target_idle_close_s": idle_s, **mon.figures(), "target_health_s": 1.0,
          "wall_s": round(time.monotonic() - started, 1)})


def n4(quick: bool) -> None:
    pages, rounds = (20, 1) if quick else (300, 3)
    a, b = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
    png, one_page = picture_png(), make_pdf(1)
    started = time.monotonic()
    with serving(API_KEY="key-a,key-b") as server:
        url = server.url
        image = lambda: post_file(url, "/ocr/image/simple", "a.png", png, a)  # noqa: E731
        pdf = lambda: post_file(url, "/pdf/ocr", "one.pdf", one_page, a)  # noqa: E731
        idle_image, idle_pdf = timed(image), timed(pdf)  # warm: the engine's first batch, a render process
        long_job = submit(url, make_pdf(pages), "long.pdf", a)
        bomb_job = submit(url, h.heavy_pdf(repeats=100, pages=20), "bomb.pdf", a)
        probes: dict[str, list] = {"image": [], "pdf": [], "post_jobs_b": []}
        with Monitor(server) as mon:
            wait_job(url, long_job, 120, a, pages_done=1)  # the job feeds the engine now
            for _ in range(rounds):
                probes["image"].append(timed(image))
                probes["pdf"].append(timed(pdf))
                probes["post_jobs_b"].append(timed(lambda: post_file(url, "/jobs", "b.pdf", one_page, b)))
        long_state, bomb_state = job_state(url, long_job, a), job_state(url, bomb_job, a)
        for job in (long_job, bomb_job):
            httpx.delete(f"{url}/jobs/{job}", headers=a, timeout=PROBE_S)
    figures = mon.figures()
    emit({"scenario": "n4", "quick": quick, "long_pages": pages, "bomb_pages": 20,
          "idle_image_s": idle_image[1], "idle_pdf_s": idle_pdf[1],
          "long_job_after": f"{long_state['status']} {long_state['pages_done']}/{pages}",
          "bomb_job_after": f"{bomb_state['status']} {bomb_state['pages_done']}/20",
          "engine_batch_longest_s": round(mon.longest_batch, 2), "engine_batches": mon.batches,
          **{f"{k}_statuses": [p[0] for p in v] for k, v in probes.items()},
          **{f"{k}_s": [p[1] for p in v] for k, v in probes.items()},
          **{f"{k}_max_s": max(p[1] for p in v) for k, v in probes.items()},
          "target_image_s": round(mon.longest_batch + 10, 2), "target_pdf_s": 30.0,
          "health_max_s": figures["health_max_s"], "health_p50_s": figures["health_p50_s"],
          "health_p95_s": figures["health_p95_s"], "health_failed": figures["health_failed"],
          "wall_s": round(time.monotonic() - started, 1)})


def n6(quick: bool) -> None:
    zeros = (512 << 20) if quick else (2 << 30)
    kinds = ["indirect", "ahx-fl", "long-array", "a85-indirect"]
    bombs = {k: deflated_zeros_pdf(zeros, k) for k in kinds}
    normal = h.text_pdf()
    started = time.monotonic()
    with serving() as server:
        send = lambda data: lambda: post_file(server.url, "/pdf/ocr", "h.pdf", data, dpi="72")  # noqa: E731
        alone = {k: timed(send(d)) for k, d in bombs.items()}  # one at a time first: no queue for a process
        with Monitor(server) as mon:
            time.sleep(1.0)
            answers = at_once([*(lambda d=d: timed(send(d)) for d in bombs.values()),
                               lambda: (time.sleep(0.3), timed(send(normal)))[1]])
    bomb_rows = dict(zip(kinds, answers[:-1], strict=True))
    emit({"scenario": "n6", "quick": quick, "zeros_gb": round(zeros / 2**30, 2),
          "bomb_mb": {k: round(len(v) / MB, 1) for k, v in bombs.items()},
          "bomb_statuses": {k: v[0] for k, v in bomb_rows.items()},
          "bomb_s": {k: v[1] for k, v in bomb_rows.items()}, "bomb_max_s": max(v[1] for v in bomb_rows.values()),
          "alone_statuses": {k: v[0] for k, v in alone.items()}, "alone_s": {k: v[1] for k, v in alone.items()},
          "bomb_detail": answers[0][2], "target_bomb_s": 5.0, "normal_status": answers[-1][0],
          "normal_s": answers[-1][1], "target_normal_s": 10.0, **mon.figures(),
          "wall_s": round(time.monotonic() - started, 1)})


SCENARIOS = {"h4": h4, "n1": n1, "n3": n3, "n4": n4, "n6": n6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", help=f"any of {' '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a small-scale smoke run; its figures mean nothing")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {' '.join(SCENARIOS)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(json.dumps({"commit": commit.stdout.strip(), "cpus": os.cpu_count(),
                      "loadavg_start": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    for name in args.scenarios or SCENARIOS:
        SCENARIOS[name](args.quick)


if __name__ == "__main__":
    main()
