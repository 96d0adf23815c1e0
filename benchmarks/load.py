"""Load test: N concurrent clients send M requests in all, a mix of every route (good and bad), to a server.

Prints, per route, the count of each status, latency percentiles, and the server's RSS before, at peak
and after. "Lost" counts requests that got no HTTP response at all (connection errors, client timeouts).

    python benchmarks/load.py --serve-model models/demo-tiny-random --clients 64 --requests 500

With --serve-model it starts `uvicorn serve_ocr:app` itself (MAX_CONCURRENCY 16, MAX_QUEUE 16 unless
given, so backpressure 503s do happen) and samples that process's memory; with --url it loads a server
that is already running and (with --pid) samples that process.

--hostile adds issue 18's hostile inputs to the mix (built here with tests/helpers/hostile.py's builders): a PDF
whose catalog follows 512 MB of deflated zeros, an xref of /Size 8388607, a JPEG 2000 image claiming
24000 x 24000, a page nested 100k deep, a page of 2 M fill operations, a progressive JPEG of 20,000 scans,
a 1 x 40,000,000 PNG strip, a batch of three 40 MP PNGs and a decompression-bomb PNG. Each must answer 4xx,
or 200 with its page marked, never 5xx other than backpressure 503s. The server is started with the
Makefile's uvicorn options.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def png(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    for _ in range(20):
        x, y = rng.randrange(width), rng.randrange(height)
        image.paste((rng.randrange(256), 0, 0), (x, y, min(width, x + 40), min(height, y + 8)))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def pdf(pages: int) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for i in range(pages):
        page = doc.new_page()
        page.insert_text((72, 72), f"Page {i + 1}: load test", fontsize=14)
    return doc.tobytes()


@dataclass
class Call:
    route: str
    method: str
    path: str
    kwargs: dict


def route_mix(max_tokens: int) -> list[Call]:
    small, page = png(320, 240, 1), png(900, 1200, 2)
    doc = pdf(2)
    tokens = {"max_tokens": str(max_tokens)}
    b64 = base64.b64encode(small).decode()
    files3 = [("files", (f"f{i}.png", png(200 + 40 * i, 160, i), "image/png")) for i in range(3)]
    return [
        Call("GET /", "GET", "/", {}),
        Call("GET /health", "GET", "/health", {}),
        Call("GET /ocr/status", "GET", "/ocr/status", {}),
        Call("GET /pdf/info", "GET", "/pdf/info", {}),
        Call("GET /batch/status", "GET", "/batch/status", {}),
        Call("POST /generate text", "POST", "/generate", {"json": {"prompt": "Hello", "max_tokens": max_tokens}}),
        Call(
            "POST /generate image",
            "POST",
            "/generate",
            {"json": {"prompt": "Free OCR.", "image_base64": b64, "max_tokens": max_tokens}},
        ),
        Call(
            "POST /generate_with_file",
            "POST",
            "/generate_with_file",
            {"files": {"file": ("a.png", small)}, "data": tokens},
        ),
        Call(
            "POST /ocr/image/advanced",
            "POST",
            "/ocr/image/advanced",
            {"files": {"file": ("p.png", page)}, "data": tokens},
        ),
        Call(
            "POST /ocr/image/simple", "POST", "/ocr/image/simple", {"files": {"file": ("a.png", small)}, "data": tokens}
        ),
        Call("POST /pdf/ocr", "POST", "/pdf/ocr", {"files": {"file": ("d.pdf", doc)}, "data": {**tokens, "dpi": "72"}}),
        Call(
            "POST /pdf/ocr/simple",
            "POST",
            "/pdf/ocr/simple",
            {"files": {"file": ("d.pdf", doc)}, "data": {**tokens, "dpi": "72"}},
        ),
        Call(
            "POST /pdf/ocr/download",
            "POST",
            "/pdf/ocr/download",
            {"files": {"file": ("d.pdf", doc)}, "data": {**tokens, "dpi": "72"}},
        ),
        Call("POST /batch/ocr", "POST", "/batch/ocr", {"files": files3, "data": tokens}),
        Call("POST /batch/ocr/download", "POST", "/batch/ocr/download", {"files": files3, "data": tokens}),
        Call("POST /batch/ocr/simple", "POST", "/batch/ocr/simple", {"files": files3, "data": tokens}),
        # Bad requests belong to the mix: they must stay 4xx under load too.
        Call("POST bad: truncated png", "POST", "/generate_with_file", {"files": {"file": ("x.png", small[:60])}}),
        Call("POST bad: text as pdf", "POST", "/pdf/ocr", {"files": {"file": ("x.pdf", b"not a pdf")}}),
        Call(
            "POST bad: unknown mode",
            "POST",
            "/ocr/image/simple",
            {"files": {"file": ("a.png", small)}, "data": {"mode": "huge"}},
        ),
    ]


def hostile_mix(max_tokens: int) -> list[Call]:
    """Issue 18's hostile inputs; expected answers in the docstring of the module."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import hostile as h
    from helpers.images import png_image

    def pdf_call(name: str, data: bytes) -> Call:
        form = {"dpi": "72", **tokens}
        return Call(f"hostile: {name}", "POST", "/pdf/ocr", {"files": {"file": ("h.pdf", data)}, "data": form})

    def image_call(name: str, data: bytes, path: str = "/ocr/image/simple") -> Call:
        return Call(f"hostile: {name}", "POST", path, {"files": {"file": ("h.img", data)}, "data": tokens})

    tokens = {"max_tokens": str(max_tokens)}
    catalog = {1: b"<< /Type /Catalog /Pages 2 0 R >>", 2: b"<< /Type /Pages /Kids [] /Count 0 >>"}
    square = png_image(8000, 5000)
    return [
        pdf_call("objstm bomb", h.objstm_bomb(512 << 20)),
        pdf_call("xref 8388607", h.build_pdf(catalog, size=8388607)),
        pdf_call("jpx 24000^2", h.image_page(h.jpx_claiming(24000, 24000), 24000, 24000, b"JPXDecode")),
        pdf_call("nested page", h.nested_page()),
        pdf_call("fill ops", h.heavy_pdf()),
        image_call("jpeg 20000 scans", h.progressive_jpeg(20_000)),
        image_call("png 1x40M strip", png_image(40_000_000, 1)),
        image_call("png bomb 20000^2", png_image(20000, 20000)),
        Call("hostile: batch 3x40MP", "POST", "/batch/ocr",
             {"files": [("files", (f"p{i}.png", square, "image/png")) for i in range(3)], "data": tokens}),
    ]


UVICORN_LIMITS = ["--http", "h11", "--h11-max-incomplete-event-size", "65536", "--limit-concurrency", "2000",
                  "--timeout-keep-alive", "5"]  # as in the Makefile and the Dockerfile


class RssSampler(threading.Thread):
    def __init__(self, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid) if pid else None
        self.peak = 0
        self.stop = threading.Event()

    def rss(self) -> int:
        if self.proc is None:
            return 0
        return self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            time.sleep(0.2)


async def client(url: str, calls: list[Call], budget: list[int], seed: int, request_timeout: float, out: list) -> None:
    """Send requests until the shared budget of requests is spent."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=request_timeout) as http:
        while budget[0] > 0:
            budget[0] -= 1
            call = rng.choice(calls)
            start = time.perf_counter()
            try:
                r = await http.request(call.method, call.path, **call.kwargs)
                out.append((call.route, r.status_code, time.perf_counter() - start))
            except httpx.HTTPError as exc:
                out.append((call.route, f"lost:{type(exc).__name__}", time.perf_counter() - start))


def report(results: list, elapsed: float, rss: tuple[int, int, int], args: argparse.Namespace) -> int:
    by_route: dict[str, list] = defaultdict(list)
    for route, status, latency in results:
        by_route[route].append((status, latency))
    print(
        f"\n{len(results)} requests from {args.clients} clients in {elapsed:.1f} s ({len(results) / elapsed:.1f} req/s)"
    )
    print(f"{'route':28} {'statuses':38} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for route in sorted(by_route):
        rows = by_route[route]
        counts = Counter(str(s) for s, _ in rows)
        lat = sorted(latency * 1000 for _, latency in rows)
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        shown = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
        print(f"{route:28} {shown:38} {q[49]:8.0f} {q[89]:8.0f} {q[98]:8.0f} {lat[-1]:8.0f}")
    statuses = Counter(s for _, s, _ in results)
    server_errors = sum(v for s, v in statuses.items() if isinstance(s, int) and s >= 500 and s != 503)
    lost = sum(v for s, v in statuses.items() if not isinstance(s, int))
    before, peak, after = rss
    print(f"\n5xx other than 503: {server_errors}   503 (backpressure): {statuses.get(503, 0)}   lost: {lost}")
    print(
        f"server RSS MB: before {before / 2**20:.0f}, peak {peak / 2**20:.0f}, after {after / 2**20:.0f}, "
        f"growth {(after - before) / 2**20:+.0f}"
    )
    return 1 if server_errors or lost else 0


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = args.port
    env = {
        **os.environ,
        "MODEL_PATH": args.serve_model,
        "ENGINE": "torch",
        "MAX_CONCURRENCY": str(args.max_concurrency),
        "MAX_QUEUE": str(args.max_queue),
        "LOG_LEVEL": "WARNING",
        "GENERATE_TIMEOUT_S": "600",
        "PDF_TIMEOUT_S": "600",
        "BATCH_TIMEOUT_S": "600",
        **({"MAX_DECODED_MPIX": str(args.max_decoded_mpix)} if args.max_decoded_mpix else {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--port", str(port), "--log-level", "warning",
         *UVICORN_LIMITS],
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--pid", type=int, help="server process to sample RSS from (with --url)")
    parser.add_argument("--serve-model", help="start uvicorn on this checkpoint and load it")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=500, help="requests in all, shared by the clients")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=100, help="requests of the concurrent warm-up burst")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--hostile", action="store_true", help="add issue 18's hostile inputs to the mix")
    parser.add_argument("--max-decoded-mpix", type=float, help="MAX_DECODED_MPIX of the server started")
    args = parser.parse_args()
    proc = None
    if args.serve_model:
        proc, url = start_server(args)
        pid = proc.pid
    elif args.url:
        url, pid = args.url, args.pid
    else:
        parser.error("give --url or --serve-model")
    calls = route_mix(args.max_tokens) + (hostile_mix(args.max_tokens) if args.hostile else [])
    sampler = RssSampler(pid)
    # Warm-up: every route once, then a concurrent burst, so that "before" already holds what any server
    # holds once it has run full batches (allocator high-water mark), and growth means what it says.
    for call in calls:
        asyncio.run(client(url, [call], [1], 0, args.timeout, []))

    async def burst(n: int) -> None:
        budget = [n]
        await asyncio.gather(*(client(url, calls, budget, 1000 + i, args.timeout, []) for i in range(args.clients)))

    asyncio.run(burst(args.warmup))
    time.sleep(1.0)
    before = sampler.rss()
    sampler.start()
    results: list = []
    start = time.perf_counter()

    budget = [args.requests]

    async def run_all() -> None:
        await asyncio.gather(*(client(url, calls, budget, i + 1, args.timeout, results) for i in range(args.clients)))

    asyncio.run(run_all())
    elapsed = time.perf_counter() - start
    time.sleep(1.0)
    after = sampler.rss()
    sampler.stop.set()
    print(f"command: {' '.join(sys.argv)}")
    code = report(results, elapsed, (before, max(sampler.peak, after), after), args)
    if proc is not None:
        proc.terminate()
        proc.wait(30)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
