"""Benchmark of the PDF route: PyMuPDF rendering speed, and the server's peak memory on long PDFs.

(a) pages/s of `render_process.render_page` at 144 dpi on A4 text pages, one thread.
(b) peak RSS of `uvicorn serve_ocr:app` (a fresh process per run, on a tiny random checkpoint written with
    `python deepseek_ocr.py make-tiny DIR`; the server process and its page-rendering child processes apart)
    while it answers `POST /pdf/ocr` for PDFs of 30, 100 and 300 pages, sampled with psutil every 0.2 s;
    with draw_layouts=false (and extract_images=false), then 300 pages with draw_layouts=true to show what
    the layout PDF costs, and the same through `/pdf/ocr/download` (the layout PDF as a ZIP member instead
    of base64 in JSON).

Prints figures; it is not a test. Run from the repository root:

    python benchmarks/bench_pdf.py                      # everything, the service's default MAX_CONCURRENCY
    python benchmarks/bench_pdf.py --pages 30,100 --concurrency 8 --skip-render
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pymupdf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pdf import render_process  # noqa: E402  (the repository root is on sys.path only from here)

PARAGRAPH = (
    "The quarterly results show revenue growth across all regions, driven by new contracts and a steady "
    "renewal rate. Operating costs rose less than sales, and the margin improved by two points. "
)


def text_pdf(pages: int) -> bytes:
    """A4 pages of dense text: a heading and a page of paragraphs, like a report."""
    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=595, height=842)
        page.insert_text((56, 70), f"Section {n + 1}: results", fontsize=18)
        page.insert_textbox(pymupdf.Rect(56, 90, 539, 790), PARAGRAPH * 14, fontsize=10)
    data = doc.tobytes(garbage=3, deflate=True)
    doc.close()
    return data


def bench_render(pages: int, dpi: int) -> tuple[float, int]:
    """Pages per second of `render_process.render_page`, one thread, after one warm-up page; and the image size."""
    source = render_process.open_pdf(text_pdf(pages), max_pages=pages)
    with source:
        size = render_process.render_page(source, 1, dpi=dpi, max_pixels=10**9).image.size
        start = time.perf_counter()
        for page in range(1, pages + 1):
            render_process.render_page(source, page, dpi=dpi, max_pixels=10**9)
        elapsed = time.perf_counter() - start
    return pages / elapsed, size[0] * size[1]


@dataclass
class Mem:
    """RSS in MB of the server process, of its children (the PDF render processes), and of both together."""

    server: float = 0.0
    children: float = 0.0
    total: float = 0.0

    def __str__(self) -> str:
        return f"{self.total:5.0f} = {self.server:4.0f} + {self.children:3.0f}"


@dataclass
class Run:
    pages: int
    draw: bool
    path: str
    status: int
    elapsed_s: float
    idle: Mem
    peak: Mem
    body_mb: float
    truncated: int
    failed: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(env: dict[str, str]) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            time.sleep(0.2)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss(process: psutil.Process) -> Mem:
    sizes = []
    for p in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            sizes.append(p.memory_info().rss / 2**20)
    return Mem(sizes[0] if sizes else 0.0, sum(sizes[1:]), sum(sizes))


def peak_of(a: Mem, b: Mem) -> Mem:
    """Per column maximum; `total` is the largest sum seen at one sample."""
    return Mem(max(a.server, b.server), max(a.children, b.children), max(a.total, b.total))


def measure(
    url: str, process: psutil.Process, data: bytes, fields: dict[str, str], path: str = "/pdf/ocr"
) -> tuple[httpx.Response, Mem]:
    """POST the PDF while a thread samples the server's RSS every 0.2 s; returns the answer and the peak."""
    peak, done = [rss(process)], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = peak_of(peak[0], rss(process))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        files = {"file": ("bench.pdf", data, "application/pdf")}
        answer = httpx.post(url + path, files=files, data=fields, timeout=None)
    finally:
        done.set()
        sampler.join()
    return answer, peak_of(peak[0], rss(process))


def bench_server(model: Path, pages: int, draw: bool, path: str, args: argparse.Namespace) -> Run:
    env = {
        "MODEL_PATH": str(model),
        "ENGINE": "torch",
        "DEVICE": "cpu",
        "MAX_PDF_PAGES": str(max(pages, 300) + 1),
        "PDF_TIMEOUT_S": "86400",
        "LOG_LEVEL": "WARNING",
    }
    if args.concurrency:
        env["MAX_CONCURRENCY"] = str(args.concurrency)
    fields = {
        "dpi": "144",
        "max_tokens": str(args.max_tokens),
        "draw_layouts": str(draw).lower(),
        "extract_images": "false",
    }
    data = text_pdf(pages)
    with server(env) as (url, process):
        # One page first, so the idle figure includes the loaded model, torch's first-run buffers and a render.
        measure(url, process, text_pdf(1), fields)
        idle = rss(process)
        start = time.perf_counter()
        answer, peak = measure(url, process, data, fields, path)
        elapsed = time.perf_counter() - start
    body = answer.json() if answer.status_code == 200 and path == "/pdf/ocr" else {}
    return Run(
        pages,
        draw,
        path,
        answer.status_code,
        elapsed,
        idle,
        peak,
        len(answer.content) / 2**20,
        body.get("pages_truncated", -1),
        body.get("pages_failed", -1),
    )


def make_checkpoint(directory: Path) -> Path:
    if not (directory / "config.json").is_file():
        cmd = [sys.executable, "deepseek_ocr.py", "make-tiny", str(directory), "--seed", "0"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", default="30,100,300", help="PDF lengths for the memory runs")
    parser.add_argument("--draw-pages", type=int, default=300, help="length of the draw_layouts=true runs; 0 = none")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=0, help="MAX_CONCURRENCY; 0 = the service's default")
    parser.add_argument("--render-pages", type=int, default=100)
    parser.add_argument("--skip-render", action="store_true")
    parser.add_argument("--model", type=Path, help="tiny checkpoint directory (written there when missing)")
    args = parser.parse_args()
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"PyMuPDF {pymupdf.VersionBind}"
    )
    if not args.skip_render:
        rate, pixels = bench_render(args.render_pages, 144)
        print(
            f"(a) render_page, A4 text, 144 dpi ({pixels / 1e6:.2f} MP), 1 thread: {rate:.1f} pages/s "
            f"({1000 / rate:.1f} ms/page, {args.render_pages} pages)"
        )
    runs = [(int(n), False, "/pdf/ocr") for n in args.pages.split(",") if n]
    if args.draw_pages:
        runs += [(args.draw_pages, True, "/pdf/ocr"), (args.draw_pages, True, "/pdf/ocr/download")]
    if not runs:
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(args.model or Path(tmp) / "tiny")
        print(
            f"(b) tiny random checkpoint, dpi 144, max_tokens {args.max_tokens}, extract_images false, "
            f"MAX_CONCURRENCY {args.concurrency or 'default'}; server RSS sampled every 0.2 s"
        )
        print(
            "route | pages | draw_layouts | HTTP | elapsed s | pages/s | idle RSS MB (all = server + render) | "
            "peak RSS MB (all = server + render) | peak-idle MB (all) | answer MB | truncated | failed"
        )
        for pages, draw, path in runs:
            r = bench_server(model, pages, draw, path, args)
            print(
                f"{r.path} | {r.pages:5d} | {str(r.draw).lower():5s} | {r.status} | {r.elapsed_s:7.1f} | "
                f"{r.pages / r.elapsed_s:5.2f} | {r.idle} | {r.peak} | "
                f"{r.peak.total - r.idle.total:5.0f} | {r.body_mb:6.1f} | {r.truncated:4d} | {r.failed:4d}",
                flush=True,
            )


if __name__ == "__main__":
    main()
