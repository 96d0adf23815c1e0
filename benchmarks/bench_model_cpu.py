"""CPU figures for deepseek_ocr.py.

(a) The tiny random checkpoint end to end: `make-tiny` and a one-shot `deepseek_ocr.py run` (Gundam mode,
    an A4 page at 144 dpi = 1190x1684 px), each as its own process, wall time.
(b) The real-size DeepSeek-V2 decoder (hidden 1280, 12 layers, 64 experts top-6, vocab 129280) with random
    weights: prefill a short text prompt, then time N decode steps for batch 1 and batch 8 through the
    same DeepseekOCR.stream() the service uses. Only the decoder is real-size (the encoders are the tiny
    ones; text prompts never run them).

    python benchmarks/bench_model_cpu.py [--steps 16] [--prompt-len 32] [--dtype bfloat16|float32] [--threads N]

On a shared machine pass --threads 1: when other processes hold the cores, every multi-threaded op waits
for a descheduled worker thread (about one scheduler slice each), which inflates small decode matmuls
tenfold and says nothing about the model.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import deepseek_ocr as dso  # noqa: E402 - needs the repo root on sys.path


def _timed(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def bench_tiny(work: Path, max_tokens: int) -> list[tuple[str, str]]:
    from PIL import Image

    script = str(ROOT / "deepseek_ocr.py")
    ckpt = work / "tiny"
    image = work / "a4.png"
    Image.effect_noise((1190, 1684), 64).convert("RGB").save(image)
    make = _timed([sys.executable, script, "make-tiny", str(ckpt)])
    run = _timed(
        [
            sys.executable,
            script,
            "run",
            "--model",
            str(ckpt),
            "--image",
            str(image),
            "--mode",
            "gundam",
            "--max-tokens",
            str(max_tokens),
            "--json",
        ]
    )
    # In process (after one warm-up run), to split the one-shot time into load, image + prefill and decode.
    started = time.perf_counter()
    ocr = dso.DeepseekOCR.from_pretrained(ckpt)
    load = time.perf_counter() - started
    with Image.open(image) as img:
        sampling = dso.SamplingParams(max_tokens=max_tokens)
        req = ocr.prepare(dso.DEFAULT_PROMPT, img.convert("RGB"), sampling=sampling)
    _stream_times(ocr, [req])
    first, total = _stream_times(ocr, [req])
    return [
        ("make-tiny (process)", f"{make:.2f} s"),
        (f"run gundam A4, {max_tokens} tokens (process)", f"{run:.2f} s"),
        ("  load checkpoint + tokenizer (in process)", f"{load:.2f} s"),
        (f"  warm: vision + prefill of {len(req.input_ids)} tokens + 1st token", f"{first:.2f} s"),
        (f"  warm: {max_tokens - 1} more decode steps", f"{total - first:.2f} s"),
    ]


def _stream_times(ocr: dso.DeepseekOCR, requests: list[dso.GenerationRequest]) -> tuple[float, float]:
    """Seconds to the first event (prefill + first token) and to the end."""
    started = time.perf_counter()
    first = None
    for _ in ocr.stream(requests):
        if first is None:
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


def real_decoder(dtype: torch.dtype, work: Path) -> dso.DeepseekOCR:
    cfg = dso.DeepseekOCRConfig.from_dict(dso.tiny_config(vision="tiny", decoder="real"))
    with torch.device("meta"):
        model = dso.DeepseekOCRForCausalLM(cfg)
    # to_empty + one in-place normal_ per tensor: no default init pass over 2.9 B weights.
    model = dso.random_init_(model.to(dtype).to_empty(device="cpu"), seed=0).requires_grad_(False).eval()
    tok_dir = dso.make_tiny(work / "tok", weights=False)  # tokenizer files only are used
    return dso.DeepseekOCR(cfg, model, dso.load_tokenizer(tok_dir), torch.device("cpu"), dtype)


def bench_decoder(ocr: dso.DeepseekOCR, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    rng = random.Random(batch)
    requests = []
    for _ in range(batch):
        ids = [ocr.bos_token_id] + [rng.randrange(3, 128000) for _ in range(prompt_len - 1)]
        requests.append(dso.GenerationRequest(ids, None, 0, dso.SamplingParams(max_tokens=steps + 1)))
    _stream_times(
        ocr, [dso.GenerationRequest(r.input_ids, None, 0, dso.SamplingParams(max_tokens=2)) for r in requests]
    )  # warm-up: first use of each kernel shape
    first, total = _stream_times(ocr, requests)
    return first, batch * steps / (total - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tiny-tokens", type=int, default=16)
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="real decoder weights: bf16 = 5.9 GB, fp32 = 11.7 GB",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dso._DTYPES[args.dtype]
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += bench_tiny(work, args.tiny_tokens)
        started = time.perf_counter()
        ocr = real_decoder(dtype, work)
        params = sum(p.numel() for p in ocr.model.parameters() if p.device.type == "cpu")
        rows.append(
            (
                f"real decoder build + random init ({params / 1e9:.2f} B params, {args.dtype})",
                f"{time.perf_counter() - started:.1f} s",
            )
        )
        for batch in (1, 8):
            prefill, tps = bench_decoder(ocr, batch, args.prompt_len, args.steps)
            rows.append((f"real decoder batch {batch}: prefill {args.prompt_len} tok + 1st token", f"{prefill:.2f} s"))
            rows.append((f"real decoder batch {batch}: decode ({args.steps} steps)", f"{tps:.2f} tokens/s"))
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 14}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
