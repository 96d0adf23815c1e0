"""A 300-page job against `/pdf/ocr` on the same PDF (tiny random checkpoint, CPU): wall times, the job
overhead, and the server's RSS after a 30-page and a 300-page job.

    python benchmarks/bench_jobs.py [--pages 300] [--small 30] [--max-tokens 8] [--dpi 72]

Each measurement runs a fresh `uvicorn serve_ocr:app` process (the README way) with its own DATA_DIR:
(1) `/pdf/ocr` on the PDF, then the same PDF as a job (POST /jobs until `done`), on one warm server, three times
each, alternating, best of three (the machine may be shared); (2) the RSS (VmRSS, and the peak VmHWM) of a
fresh server after a job of `--small` pages and of another after `--pages` pages: the job writes every page
to disk as it finishes, so memory should not grow with the page count.

MAX_CONCURRENCY is 16 here (env MAX_CONCURRENCY to change): memory is bounded by the window of pages in
flight (engine capacity + render processes, 18), so both job sizes must exceed it to compare like with like;
at the default of 100 a 30-page job never fills the window and a 300-page one does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def make_pdf(pages: int) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=595, height=842)
        page.insert_text((56, 72), f"Chapter {n + 1}", fontsize=22)
        page.insert_textbox(pymupdf.Rect(56, 100, 539, 786), "Lorem ipsum dolor sit amet. " * 40)
    data = doc.tobytes()
    doc.close()
    return data


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of the process and its children (render processes), in MB."""
    total = [0.0, 0.0]
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
            total[0] += int(fields["VmRSS"].split()[0]) / 1024
            total[1] += int(fields["VmHWM"].split()[0]) / 1024
    return round(total[0], 1), round(total[1], 1)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *children(int(child))]
    return found


@contextlib.contextmanager
def server(checkpoint: Path, data_dir: Path, max_tokens: int) -> Iterator[tuple[str, int]]:
    from helpers.server import free_port

    port = free_port()
    env = {**os.environ, "MODEL_PATH": str(checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_DIR": str(data_dir),
           "DEFAULT_MAX_TOKENS": str(max_tokens), "MAX_PDF_PAGES": "10000", "PDF_TIMEOUT_S": "3600",
           "LOG_LEVEL": "WARNING", "MAX_UPLOAD_MB": "500", "MAX_CONCURRENCY": os.environ.get("MAX_CONCURRENCY", "16"),
    }
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serve_ocr:app", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            assert proc.poll() is None, "the server exited"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).json().get("ready"):
                    break
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def sync_run(url: str, pdf: bytes, fields: dict) -> float:
    started = time.perf_counter()
    r = httpx.post(f"{url}/pdf/ocr", files={"file": ("bench.pdf", pdf)}, data=fields, timeout=3600)
    r.raise_for_status()
    return time.perf_counter() - started


def job_run(url: str, pdf: bytes, fields: dict) -> float:
    """POST /jobs, then follow its SSE stream to the terminal event, as a client would."""
    started = time.perf_counter()
    r = httpx.post(f"{url}/jobs", files={"file": ("bench.pdf", pdf)}, data=fields, timeout=600)
    r.raise_for_status()
    with httpx.stream("GET", f"{url}{r.json()['links']['events']}", timeout=3600) as events:
        for line in events.iter_lines():
            if line in ("event: done", "event: failed", "event: cancelled"):
                assert line == "event: done", line
                break
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--small", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dpi", type=int, default=72)
    args = parser.parse_args()
    from deepseek_ocr import make_tiny

    fields = {"dpi": str(args.dpi), "mode": "tiny", "max_tokens": str(args.max_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = make_tiny(work / "tiny", seed=0)
        big, small = make_pdf(args.pages), make_pdf(args.small)
        print(f"{args.pages}-page PDF, {len(big) / 1e6:.1f} MB; tiny checkpoint, CPU, dpi {args.dpi}, "
              f"max_tokens {args.max_tokens}, mode tiny; {os.cpu_count()} cores")

        with server(checkpoint, work / "d0", args.max_tokens) as (url, _):
            sync_run(url, small, fields)  # warm up: render processes, engine
            syncs, jobs = [], []
            for _ in range(3):
                syncs.append(sync_run(url, big, fields))
                jobs.append(job_run(url, big, fields))
        sync_s, job_s = min(syncs), min(jobs)
        print(f"/pdf/ocr {args.pages} pages: {sync_s:.2f} s (runs {', '.join(f'{s:.2f}' for s in syncs)})")
        print(f"job      {args.pages} pages: {job_s:.2f} s (runs {', '.join(f'{s:.2f}' for s in jobs)}), "
              "POST /jobs to the `done` event")
        mean_sync, mean_job = sum(syncs) / len(syncs), sum(jobs) / len(jobs)
        print(f"job overhead: {100 * (job_s - sync_s) / sync_s:+.1f}% of the /pdf/ocr wall time (best of each), "
              f"{100 * (mean_job - mean_sync) / mean_sync:+.1f}% (means)")

        for n, pdf in ((args.small, small), (args.pages, big)):
            with server(checkpoint, work / f"rss{n}", args.max_tokens) as (url, pid):
                base = rss_mb(pid)
                job_run(url, pdf, fields)
                after = rss_mb(pid)
            print(f"server RSS, {n}-page job: {base[0]:.0f} MB idle -> {after[0]:.0f} MB after, "
                  f"peak {after[1]:.0f} MB (server + render processes)")


if __name__ == "__main__":
    main()
