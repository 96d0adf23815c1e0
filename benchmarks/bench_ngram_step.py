"""The n-gram guard's cost a decoding step, by batch size: bans found on the device against on the host.

`engines.vllm.ngram.NGramBatchProcessor` as vLLM drives it, without vLLM: G guarded rows (n-gram 30/90 as the
image routes, or --ngram), each output list growing by one token a step (repetitive text, so bans happen),
`apply` on a logits tensor of the model's vocabulary. Each batch size runs `--steps` steps with the host path
off (`host_rows` 0: every step on the device) and on (the default `HOST_ROWS`); the time a step is the wall time
of the `apply` calls (on a GPU, with one synchronize at the end of the steps, so that queued kernels count).

    python benchmarks/bench_ngram_step.py                  # cuda when there is one, else cpu
    python benchmarks/bench_ngram_step.py --device cpu --rows 1 2 4 8 16 64 --steps 400
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "tests"):  # the repository's modules; the tests' token streams
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from helpers import tokens  # noqa: E402


def repetitive(rng: random.Random, length: int) -> list[int]:
    """Tokens with copied stretches of up to 40, as a looping decoder writes them (400 token ids)."""
    return tokens.repetitive(rng, length, 400, longest_copy=40)


def step_us(device: str, rows: int, steps: int, host_rows: int, ngram: tuple[int, int], vocab: int,
            seed: int = 0) -> float:
    """Microseconds an `apply` takes, the mean over `steps`."""
    import torch

    from engines.vllm.ngram import NGramBatchProcessor

    rng = random.Random(seed)
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max(rows, 1)),
                             model_config=SimpleNamespace(max_model_len=steps + 2048))
    proc = NGramBatchProcessor(config, torch.device(device), device.startswith("cuda"))
    proc.host_rows = host_rows
    streams = [repetitive(rng, steps + 1200) for _ in range(rows)]
    outputs = [s[:200] for s in streams]  # a page some way into its answer
    args = SimpleNamespace(extra_args={"ngram_size": ngram[0], "window_size": ngram[1],
                                       "whitelist_token_ids": [128821, 128822]})
    proc.update_state(SimpleNamespace(removed=[], moved=[], added=[(r, args, [0], outputs[r]) for r in range(rows)]))
    logits = torch.zeros(rows, vocab, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for r in range(rows):  # warm the path (first CUDA launches, allocator)
        outputs[r].append(streams[r][len(outputs[r])])
    proc.apply(logits)
    sync()
    total = 0.0
    for _ in range(steps):
        for r in range(rows):
            outputs[r].append(streams[r][len(outputs[r])])
        logits.zero_()
        t = time.perf_counter()
        proc.apply(logits)
        total += time.perf_counter() - t
    t = time.perf_counter()
    sync()
    total += time.perf_counter() - t
    return total / steps * 1e6


def main() -> int:
    import torch

    from engines.vllm.ngram import HOST_ROWS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 32, 64, 256])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--ngram", type=int, nargs=2, default=(30, 90), metavar=("SIZE", "WINDOW"))
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    results = []
    print(f"device {args.device}, n-gram {args.ngram[0]}/{args.ngram[1]}, {args.steps} steps, HOST_ROWS {HOST_ROWS}")
    print(f"{'rows':>5} {'device path us/step':>20} {'default us/step':>16}")
    for rows in args.rows:
        device_us = step_us(args.device, rows, args.steps, 0, tuple(args.ngram), args.vocab)
        default_us = step_us(args.device, rows, args.steps, HOST_ROWS, tuple(args.ngram), args.vocab)
        results.append({"rows": rows, "device_path_us": round(device_us, 1), "default_us": round(default_us, 1)})
        print(f"{rows:>5} {device_us:>20.1f} {default_us:>16.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "ngram": args.ngram, "steps": args.steps,
                                              "host_rows": HOST_ROWS, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
