"""The `transfer` stage alone: an A4 page's pixels (1190 x 1684 RGB, ~6 MB) from the server to a real engine
worker process, 1 and N requests at once (issue 29).

    python benchmarks/bench_transfer.py [--clients 1 64] [--rounds 3] [--each 3] [--max-tokens 2] [--checkpoint DIR]

A `workers.client.WorkerEngine` runs the CPU PyTorch engine on the tiny random checkpoint (written to a temp
dir unless --checkpoint), and this process is the server: each request's `transfer_s` is what the service's
`Server-Timing: transfer` reports (the memfd's fill, the wait for the worker's send lock and the send; on
the socket path the wait and the tiles' copies and writes). The engine's own time does not count here, so a
CPU box shows the queue behind the send lock that a GPU's 64 clients met. Each of N clients sends `--each`
requests one after another (a closed loop); a warm-up round is not counted. Prints p50 / p95 / max
milliseconds per concurrency and the load average (a shared box).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

A4 = (1190, 1684)  # an A4 page at 144 dpi


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(checkpoint: Path, clients: list[int], rounds: int, each: int, max_tokens: int) -> None:
    import numpy as np
    from PIL import Image

    from config import Settings, model_specs
    from engines.base import EngineRequest, SamplingParams
    from process.modes import MODES
    from workers.client import WorkerEngine
    from workers.plan import WorkerSpec

    settings = Settings(model_path=str(checkpoint), engine="torch", device="cpu", engine_workers="process",
                        max_concurrency=max(clients), pdf_render_prestart=False)
    engine = WorkerEngine(settings, "torch", WorkerSpec(0, ()))
    engine.model = model_specs(None, str(checkpoint))[0]
    await engine.start()
    rgb = np.random.default_rng(0).integers(0, 256, (A4[1], A4[0], 3), dtype=np.uint8)
    pages = [Image.fromarray(np.roll(rgb, n, axis=0)) for n in range(max(clients))]

    async def client(image: Image.Image, each: int) -> list[float]:
        seconds = []
        for _ in range(each):
            request = EngineRequest("<image>\nFree OCR.", image, MODES["tiny"], SamplingParams(max_tokens=max_tokens))
            seconds.append((await engine.generate(request)).transfer_s)
        return seconds

    try:
        await asyncio.gather(*(client(p, 1) for p in pages))  # warm-up: the engine's first batches
        for n in clients:
            for r in range(rounds):
                started = time.perf_counter()
                ms = [s * 1000 for c in await asyncio.gather(*(client(p, each) for p in pages[:n])) for s in c]
                wall = time.perf_counter() - started
                load = " ".join(f"{x:.2f}" for x in os.getloadavg())
                print(f"{n:3d} concurrent, round {r + 1}: transfer p50 {statistics.median(ms):7.2f} ms  "
                      f"p95 {percentile(ms, 0.95):7.2f} ms  max {max(ms):7.2f} ms  (round {wall:.2f} s; "
                      f"loadavg {load})", flush=True)
    finally:
        await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--each", type=int, default=3, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="a DeepSeek-OCR checkpoint dir (default: tiny random)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from deepseek_ocr import make_tiny

            checkpoint = make_tiny(Path(tmp) / "tiny", seed=0)
        print(f"code: {ROOT}; loadavg at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        asyncio.run(run(checkpoint, args.clients, args.rounds, args.each, args.max_tokens))


if __name__ == "__main__":
    main()
