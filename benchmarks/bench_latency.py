"""One client, one page: the service's added latency over the same engine called in-process.

The service (`uvicorn serve_ocr:app`, engine workers as configured) gets the page as a PNG upload on
`/ocr/image/advanced`; the in-process engine (`engines.registry.build_engine`, the same settings) gets the same
PNG decoded in the timing. Both run the image prompt in Gundam with the same max_tokens and n-gram guard;
medians of --runs after 3 warm-up requests, one request at a time. The difference is what HTTP, the upload,
admission, the worker hop and post-processing cost one request.

    python benchmarks/bench_latency.py --engine torch --model /tmp/tiny --max-tokens 1
    python benchmarks/bench_latency.py --engine vllm --model DIR --max-tokens 256      # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
from pathlib import Path

import bench_vllm
from PIL import Image


def service_times(args: argparse.Namespace, png: bytes) -> tuple[list[float], list[float]]:
    fields = {"max_tokens": str(args.max_tokens), "mode": "gundam", "draw_boxes": "false", "crop_regions": "false",
              "ngram_size": str(args.ngram[0]), "ngram_window": str(args.ngram[1])}
    body, ctype = bench_vllm.multipart(fields, "file", "page.png", png, "image/png")
    wall, server = [], []
    with bench_vllm.service(args, Path(args.log)) as url:
        for n in range(3 + args.runs):
            t = time.perf_counter()
            status, raw = bench_vllm.http("POST", url + "/ocr/image/advanced", body, {"Content-Type": ctype},
                                          timeout=600)
            elapsed = time.perf_counter() - t
            if status != 200:
                raise RuntimeError(f"/ocr/image/advanced answered {status}: {raw[:2000]!r}")
            if n >= 3:
                wall.append(elapsed)
                server.append(float(json.loads(raw)["elapsed_s"]))
    return wall, server


def engine_times(args: argparse.Namespace, png: bytes) -> list[float]:
    from config import IMAGE_PROMPT, MODES, Settings
    from engines.base import EngineRequest, SamplingParams
    from engines.registry import build_engine

    async def main() -> list[float]:
        engine = build_engine(Settings(model_path=args.model, engine=args.engine, load_format=args.load_format,
                                       max_concurrency=args.concurrency, gpu_mem_utilization=args.gpu_mem))
        await engine.start()
        sampling = SamplingParams(max_tokens=args.max_tokens, ngram_size=args.ngram[0], ngram_window=args.ngram[1])

        async def one() -> float:
            t = time.perf_counter()
            image = await asyncio.to_thread(lambda: Image.open(io.BytesIO(png)).convert("RGB"))
            await engine.generate(EngineRequest(IMAGE_PROMPT, image, MODES["gundam"], sampling))
            return time.perf_counter() - t

        try:
            for _ in range(3):
                await one()
            return [await one() for _ in range(args.runs)]
        finally:
            await engine.close()

    return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", default="torch", choices=["torch", "vllm"])
    parser.add_argument("--load-format", default="auto", help="vllm: dummy for a config-only checkpoint")
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--ngram", type=int, nargs=2, default=(30, 90), metavar=("SIZE", "WINDOW"))
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=0.75)
    parser.add_argument("--workers", default="process", choices=["process", "inline"], help="ENGINE_WORKERS")
    parser.add_argument("--dpi", type=int, default=144)
    parser.add_argument("--pdf", default="/tmp/bench-latency.pdf", help="its first page is the image")
    parser.add_argument("--log", default="/tmp/bench-latency.log", help="the service's log")
    args = parser.parse_args()
    # bench_vllm.service reads these too
    args.pages, args.files, args.gpus, args.ladder, args.ngram_impl = 1, [1], None, False, "batched"
    if not Path(args.pdf).is_file():
        Path(args.pdf).write_bytes(bench_vllm.text_pdf(1))
    png = bench_vllm.page_png(args)
    wall, server = service_times(args, png)
    direct = engine_times(args, png)
    s, e = statistics.median(wall), statistics.median(direct)
    print(f"{args.engine} engine, one A4 page ({len(png)} bytes PNG), max_tokens {args.max_tokens}, "
          f"median of {args.runs}, one request at a time")
    inside = statistics.median(server) * 1000
    print(f"  service /ocr/image/advanced  {s * 1000:8.1f} ms  (the server's own elapsed_s: {inside:.1f} ms)")
    print(f"  engine in-process            {e * 1000:8.1f} ms")
    print(f"  service over the engine      {(s - e) * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
