"""The service's own time per page under N clients, the model replaced by a fixed wait (issue 29).

On the GPU, 64 clients of one A4 page each saw ~0.45 s a page inside the server's `Server-Timing: total` that
no stage accounts for, and ~0.6 s more between the client and the server (docs/BENCHMARKS.md section 22), of
~6.2 s a page. This measures those parts without a GPU: the real app (`create_app`: middleware, routes,
decode, pixel budget, admission, post-processing, JSON), its engine replaced by the tests' replay engine
(tests/helpers/replay.py), which waits --engine-s seconds a request without using the CPU and then answers a
page of grounded markdown (256 tokens' worth), in the server process (ENGINE_WORKERS=inline: no transfer;
`benchmarks/bench_transfer.py` measures that stage).

    python benchmarks/bench_overhead.py [--clients 64] [--pages 256] [--engine-s 4.8] [--rounds 2]

The server runs in a child process (uvicorn, one event loop, as `make serve`); the clients are threads of
this process, each on its own keep-alive connection, in a closed loop over the same A4 PNG of the benchmark
PDF (144 dpi, ~440 KB), as `bench_vllm.py interactive` sends it. Beside them a thread asks `/health` every
100 ms: its answer time is how long a request waits for the event loop. Per round it prints one JSON line:
pages/s against the ideal (clients / engine-s), the client's latency, the server's `total` and its stages
(medians), what `total` holds beyond its stages (`unattributed`), what the client saw beyond `total`
(`outside`), `/health`'s p50/p95/max, and the server process's CPU milliseconds a page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# A page of grounded markdown, as DeepSeek-OCR answers a document page: ~256 tokens, 12 boxed blocks.
PAGE = "".join(
    f"<|ref|>{kind}<|/ref|><|det|>[[{60 + i}, {80 * i + 40}, {900 - i}, {80 * i + 100}]]<|/det|>\n"
    f"{'## ' if kind == 'title' else ''}Line {i} of the page: the quarterly figures rose by {i * 3}% against "
    f"the same quarter last year.\n\n"
    for i, kind in enumerate(["title"] + ["text"] * 11)
)


def serve(port: int, engine_s: float, concurrency: int) -> None:
    """The child: the app with the replay engine, on uvicorn."""
    import uvicorn

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.replay import ReplayEngine

    from config import Settings
    from engines.base import Usage
    from serve_ocr import create_app

    data = tempfile.mkdtemp(prefix="bench-overhead-")
    settings = Settings(model_path=None, engine="torch", device="cpu", engine_workers="inline",
                        max_concurrency=concurrency, max_queue=max(512, 4 * concurrency), data_dir=data,
                        log_level="WARNING")
    engine = ReplayEngine(PAGE, max_concurrency=concurrency, usage=Usage(1000, 903, 256), delay_s=engine_s)
    app = create_app(settings, engine_factory=lambda _settings: [engine])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """This script's `--serve` in a child process (the tests' `child_server`: its log in a file, up once
    /health answers, stopped after); yields its URL and pid."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.server import child_server, free_port

    port = free_port()
    argv = [sys.executable, __file__, "--serve", str(port), "--engine-s", str(args.engine_s),
            "--concurrency", str(args.concurrency)]
    with child_server(argv, port, {}) as (url, proc):
        yield url, proc.pid


def _ms(values: list[float], q: float = 0.5) -> float:
    """The q-quantile of seconds, in ms (NaN for none)."""
    from bench_transfer import percentile

    return round(1000 * percentile(values, q), 1) if values else float("nan")


def run(args: argparse.Namespace) -> None:
    import http.client

    import psutil
    from bench_interactive import Client, page_png, post_page
    from bench_vllm import text_pdf

    pdf = Path(tempfile.mkdtemp(prefix="bench-overhead-")) / "page.pdf"
    pdf.write_bytes(text_pdf(1))
    png = page_png(argparse.Namespace(pdf=str(pdf), dpi=144))
    fields = {"max_tokens": "256", "ngram_size": "30", "ngram_window": "90", "mode": "gundam",
              "draw_boxes": "false", "crop_regions": "false"}

    def page(client: Client) -> tuple[float, dict[str, float]]:
        elapsed, _usage, stages = post_page(client, fields, png)
        return elapsed, stages

    with server(args) as (url, pid):
        port = int(url.rsplit(":", 1)[1])
        proc = psutil.Process(pid)
        clients = [Client(url) for _ in range(args.clients)]
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(page, clients[: min(4, args.clients)]))  # warm-up
            for n in range(args.rounds):
                left = list(range(args.pages))
                done: list[tuple[float, dict[str, float]]] = []
                health: list[float] = []
                stop = threading.Event()

                def probe(health: list[float] = health, stop: threading.Event = stop) -> None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    while not stop.wait(0.1):
                        t = time.perf_counter()
                        conn.request("GET", "/health")
                        conn.getresponse().read()
                        health.append(time.perf_counter() - t)

                def closed_loop(client: Client, left: list[int] = left,
                                done: list[tuple[float, dict[str, float]]] = done) -> None:
                    while True:
                        try:
                            left.pop()
                        except IndexError:
                            return
                        done.append(page(client))

                prober = threading.Thread(target=probe, daemon=True)
                prober.start()
                cpu = proc.cpu_times()
                t = time.perf_counter()
                for f in [pool.submit(closed_loop, c) for c in clients]:
                    f.result()
                wall = time.perf_counter() - t
                used = proc.cpu_times()
                stop.set()
                prober.join()
                stages = sorted({name for _, st in done for name in st} - {"total"})
                totals = [st.get("total", 0.0) / 1000 for _, st in done]
                row = {
                    "round": n + 1, "clients": args.clients, "pages": len(done), "engine_s": args.engine_s,
                    "pages_per_s": round(len(done) / wall, 3),
                    "ideal_pages_per_s": round(args.clients / args.engine_s, 3),
                    "client_ms": {"p50": _ms([c for c, _ in done]), "p95": _ms([c for c, _ in done], 0.95)},
                    "total_ms": {"p50": _ms(totals), "p95": _ms(totals, 0.95)},
                    "stages_p50_ms": {s: _ms([st.get(s, 0.0) / 1000 for _, st in done]) for s in stages},
                    "unattributed_ms": {
                        q: _ms([st.get("total", 0.0) / 1000 - sum(st.get(s, 0.0) for s in stages) / 1000
                                for _, st in done], v) for q, v in (("p50", 0.5), ("p95", 0.95))},
                    "outside_ms": {
                        q: _ms([c - st.get("total", 0.0) / 1000 for c, st in done], v)
                        for q, v in (("p50", 0.5), ("p95", 0.95))},
                    "health_ms": {"p50": _ms(health), "p95": _ms(health, 0.95), "max": _ms(health, 1.0),
                                  "probes": len(health)},
                    "server_cpu_ms_per_page": round(
                        1000 * (used.user + used.system - cpu.user - cpu.system) / max(1, len(done)), 1),
                    "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--pages", type=int, default=256, help="pages a round")
    parser.add_argument("--engine-s", type=float, default=4.8, help="the replay engine's wait a request")
    parser.add_argument("--concurrency", type=int, default=256, help="MAX_CONCURRENCY of the replay engine")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child: serve on this port
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.engine_s, args.concurrency)
    else:
        run(args)


if __name__ == "__main__":
    main()
