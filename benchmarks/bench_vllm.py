"""Throughput of the vLLM path: one N-page A4 PDF through raw vLLM and through the service (GPU).

(a) raw: vLLM's offline `LLM.generate` with the service's engine settings (`engines.vllm.args.engine_kwargs`:
    max_num_seqs = MAX_CONCURRENCY, no prefix cache, the same n-gram logits processor), Gundam, greedy,
    the same prompt ids and images the service would send, every page rendered beforehand (144 dpi).
(b) service: `uvicorn serve_ocr:app` (ENGINE=vllm) in a child process, `POST /pdf/ocr` with the PDF,
    timed end to end over HTTP (rendering, preprocessing, decoding, post-processing included).
Both ask for the same max_tokens per page; with random weights pages rarely end early, and the mean
completion tokens per page is printed for both so the comparison stays honest. (a) runs in a child
process, so its GPU memory is free again when (b) starts.

    python benchmarks/bench_vllm.py all --model DIR --pages 256 --max-tokens 1000 --concurrency 256 \
        --ngram 20 50 --out bench.json
vLLM's own data parallelism (one AsyncLLM, --dp engine cores) on the same pages, against the service's
independent engine workers (`service --gpus 0,1`):

    python benchmarks/bench_vllm.py dp --model DIR --pages 256 --files 4 --dp 2 --max-tokens 1000 --ngram 20 50
The n-gram guard's cost (one engine per logits processor, guard on and off per request, median of 3):

    python benchmarks/bench_vllm.py ngram --model DIR --pages 128 --max-tokens 400 --concurrency 256 \
        --ngram 20 50 --repeat 3 --impls batched,vllm
Adding ",off" starts an engine with no logits processor at all; vLLM 0.26 may then pick its V2 model runner
(any custom logits processor keeps it on V1), so that row measures more than the guard.

DIR: a real-size checkpoint; without weights (`python deepseek_ocr.py make-tiny DIR --vision real
--decoder real --config-only`) LOAD_FORMAT=dummy gives random ones (the default here).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORDS = ("revenue margin contract renewal region quarter growth cost operating result table figure note "
         "the of and to in for with on by total net gross 2023 2024 12.5% 3.1 million EUR USD").split()


def text_pdf(pages: int, seed: int = 0) -> bytes:
    """A4 pages of dense, varied text: a heading and paragraphs of random report words."""
    import pymupdf

    rng = random.Random(seed)
    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=595, height=842)
        page.insert_text((56, 70), f"Section {n + 1}: {rng.choice(WORDS)} {rng.choice(WORDS)}", fontsize=18)
        body = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(90)) for _ in range(8))
        page.insert_textbox(pymupdf.Rect(56, 90, 539, 790), body, fontsize=10)
    data = doc.tobytes(garbage=3, deflate=True)
    doc.close()
    return data


def settings_for(args: argparse.Namespace) -> Any:
    from config import Settings

    return Settings(model_path=args.model, engine="vllm", load_format=args.load_format,
                    max_concurrency=args.concurrency, gpu_mem_utilization=args.gpu_mem)


def rendered_pages(args: argparse.Namespace) -> list[Any]:
    """Every page of --pdf at --dpi, rendered as the service renders them (the raw paths do it untimed)."""
    from pdf import render_process

    with render_process.open_pdf(Path(args.pdf).read_bytes(), max_pages=100_000) as source:
        return [render_process.render_page(source, p, dpi=args.dpi, max_pixels=40_000_000).image
                for p in range(1, source.page_count + 1)]


def page_params(args: argparse.Namespace, builder: Any, delta: bool = False) -> Any:
    """vLLM sampling parameters for --max-tokens and --ngram, as the service builds them (delta: per-step
    pieces, as a streamed request asks; else the final output only)."""
    from engines.base import SamplingParams as Sampling
    from engines.vllm.engine import sampling_params

    return sampling_params(Sampling(max_tokens=args.max_tokens, ngram_size=args.ngram[0],
                                    ngram_window=args.ngram[1]), builder.whitelist, delta=delta)


async def generate_page(engine: Any, builder: Any, image: Any, params: Any) -> int:
    """One page through a raw AsyncLLM as the service sends it: the Gundam views and vLLM's processor off the
    event loop, then the generation; its completion tokens."""
    import asyncio

    from config import DOCUMENT_PROMPT, MODES
    from engines.vllm.engine import vllm_image

    gundam = MODES["gundam"]
    prompt = builder.prompt(DOCUMENT_PROMPT, await asyncio.to_thread(vllm_image, image, gundam), gundam)
    (engine_input,) = await engine.renderer.render_cmpl_async([prompt])
    tokens = 0
    async for out in engine.generate(engine_input, params, uuid.uuid4().hex):
        tokens = len(out.outputs[0].token_ids)
    return tokens


def async_engine(args: argparse.Namespace, **extra: Any) -> tuple[Any, float]:
    """An AsyncLLM with the service's engine settings (and `extra` engine arguments), and its start time."""
    from engines.vllm.args import engine_kwargs, prepare_environment

    prepare_environment()
    import vllm
    from vllm.v1.engine.async_llm import AsyncLLM

    t = time.perf_counter()
    kwargs = engine_kwargs(settings_for(args), ngram_impl=args.ngram_impl) | extra
    return AsyncLLM.from_engine_args(vllm.AsyncEngineArgs(**kwargs)), time.perf_counter() - t


# --------------------------------------------------------------------------------------- (a) raw vLLM


def run_raw(args: argparse.Namespace) -> dict[str, Any]:
    from config import DOCUMENT_PROMPT, MODES
    from engines.base import SamplingParams as Sampling
    from engines.vllm.args import engine_kwargs, prepare_environment
    from engines.vllm.engine import PromptBuilder, sampling_params, vllm_image

    prepare_environment()
    from vllm import LLM

    t = time.perf_counter()
    images = rendered_pages(args)
    render_s = time.perf_counter() - t
    gundam = MODES["gundam"]
    builder = PromptBuilder.from_checkpoint(args.model)
    params = page_params(args, builder)
    t = time.perf_counter()
    llm = LLM(**engine_kwargs(settings_for(args), ngram_impl=args.ngram_impl))
    start_s = time.perf_counter() - t
    warm = sampling_params(Sampling(max_tokens=16, ngram_size=args.ngram[0], ngram_window=args.ngram[1]),
                           builder.whitelist, delta=False)
    llm.generate([builder.prompt(DOCUMENT_PROMPT, vllm_image(images[0], gundam), gundam)] * 2, warm,
                 use_tqdm=False)
    # --also-off: the same engine, the requests without n-gram settings (extra_args None: no guard).
    off = sampling_params(Sampling(max_tokens=args.max_tokens, ngram_size=0), builder.whitelist, delta=False)
    kinds = [("on", params), ("off", off)] if args.also_off else [("on", params)]
    by_files = []
    for files, repeat in zip(args.files, repeats(args), strict=True):
        pages = images * files  # the same pages the service gets from `files` copies of the PDF at once
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind, _ in kinds}
        for _ in range(repeat):
            for kind, sp in kinds:  # interleaved, so drift (clocks, memory) hits both alike
                t = time.perf_counter()
                # Preprocessing counted in (a) as the service counts it: vllm_image + the renderer's processor.
                prompts = [builder.prompt(DOCUMENT_PROMPT, vllm_image(im, gundam), gundam) for im in pages]
                outs = llm.generate(prompts, sp, use_tqdm=False)
                runs[kind].append({**_run_figures(outs, time.perf_counter() - t), "files": files})
                print(json.dumps({"raw run": runs[kind][-1], "guard": kind}), flush=True)
        result = {"path": "raw LLM.generate", "ngram_impl": args.ngram_impl, "engine_start_s": round(start_s, 1),
                  "render_s_not_timed": round(render_s, 2), **_median_run(runs["on"])}
        if args.also_off:
            result["guard_off"] = _median_run(runs["off"])
        by_files.append(result)
    return by_files[0] if len(by_files) == 1 else {**by_files[0], "by_files": by_files}


def repeats(args: argparse.Namespace) -> list[int]:
    """Timed runs for each --files entry: one --repeat for all, or one per entry ("3,1")."""
    if len(args.repeat) == 1:
        return args.repeat * len(args.files)
    if len(args.repeat) != len(args.files):
        raise SystemExit(f"--repeat {args.repeat} must give one count, or one per --files entry {args.files}")
    return args.repeat


def _run_figures(outs: list[Any], elapsed: float) -> dict[str, Any]:
    completion = [len(o.outputs[0].token_ids) for o in outs]
    finish = [o.outputs[0].finish_reason for o in outs]
    digest = hashlib.sha256(json.dumps([list(o.outputs[0].token_ids) for o in outs]).encode()).hexdigest()
    return {
        "pages": len(outs), "elapsed_s": round(elapsed, 2), "pages_per_s": round(len(outs) / elapsed, 3),
        "output_tokens_per_s": round(sum(completion) / elapsed, 1),
        "mean_completion_tokens": round(sum(completion) / len(completion), 1),
        "finish_length": finish.count("length"), "tokens_sha256": digest[:16],
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median pages/s, with every run's figure beside it."""
    ordered = sorted(runs, key=lambda r: r["pages_per_s"])
    return {**ordered[len(ordered) // 2], "runs_pages_per_s": [r["pages_per_s"] for r in runs]}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median elapsed time (its own figures), with every run's time beside it."""
    ordered = sorted(runs, key=lambda r: r["elapsed_s"])
    return {**ordered[len(ordered) // 2], "runs_elapsed_s": [r["elapsed_s"] for r in runs],
            "runs_sha256": [r["tokens_sha256"] for r in runs]}


# --------------------------------------------------------------------------------------- (b) service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def multipart(fields: dict[str, str], file_field: str, filename: str, content: bytes,
              content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(head.encode() + value.encode() + b"\r\n")
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n")
    parts.append(head.encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def service(args: argparse.Namespace, log_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "MODEL_PATH": args.model, "ENGINE": args.engine, "LOAD_FORMAT": args.load_format,
           "MAX_CONCURRENCY": str(args.concurrency), "GPU_MEM_UTILIZATION": str(args.gpu_mem),
           "PDF_TIMEOUT_S": "3600", "GENERATE_TIMEOUT_S": "600", "MAX_PDF_PAGES": str(max(500, args.pages)),
           "MAX_QUEUE": str(max(512, args.pages * max(args.files))),
           "LOG_LEVEL": "INFO",  # start-up phases (workers, warm-up steps), then one line per PDF
           "ENGINE_WORKERS": args.workers, "NGRAM_IMPL": args.ngram_impl,
           # Raw vLLM has no retry ladder: with random weights many pages end in a repeating tail at
           # max_tokens, and the ladder would run them up to three times more (--ladder keeps it on).
           "RETRY_LADDER": "true" if args.ladder else "false"}
    if args.gpus:
        env["GPUS"] = args.gpus
    log_path.write_text("")
    log = open(log_path, "a")  # noqa: SIM115 - closed below; O_APPEND: our mark lands after the child's lines
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    args.server_pid = proc.pid
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited {proc.returncode}: {log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                status, body = http("GET", url + "/ready", timeout=5)
                if status == 200:
                    break
                state = json.loads(body)
                if state.get("engine") == "none":
                    raise RuntimeError(f"engine did not start: {state}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready: {log_path.read_text()[-3000:]}")
            time.sleep(1)
        log.write(f"{READY_MARK} {time.strftime('%H:%M:%S')}\n")  # the child appends to the same file
        log.flush()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class Sampler:
    """Polls the service once a second while a run goes on: items done (`/metrics`) and each engine's items
    in flight (`/health`). The timeline tells a slow start (engines not yet full), a slow middle and a long
    tail apart, which one pages/s figure cannot."""

    def __init__(self, url: str, period_s: float = 1.0) -> None:
        self.url, self.period_s = url, period_s
        self.samples: list[tuple[float, int, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._t0 = time.perf_counter()
        self._base = self._done()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _done(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            status, body = http("GET", self.url + "/metrics", timeout=5)
            if status == 200:
                return int(sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                               if line.startswith("ocr_items_total{")))
        return -1

    def _in_flight(self) -> list[int]:
        with contextlib.suppress(OSError, ValueError):
            status, body = http("GET", self.url + "/health", timeout=5)
            if status == 200:
                return [int(e.get("in_flight", 0)) for e in json.loads(body).get("engines", [])]
        return []

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            done = self._done()
            self.samples.append((round(time.perf_counter() - self._t0, 1), done - self._base if done >= 0 else -1,
                                 self._in_flight()))

    def summary(self, pages: int, capacity: int) -> dict[str, Any]:
        """When the engines first held 95% of their slots, the mean fill, and pages/s over the middle 60%
        of the pages (20% to 80% done: the steady rate, without the start and the tail)."""
        rows = [(t, d, sum(f)) for t, d, f in self.samples if d >= 0]
        if not rows or pages <= 0:
            return {}
        full = next((t for t, _, f in rows if f >= 0.95 * capacity), None)
        at = {q: next((t for t, d, _ in rows if d >= q * pages), None) for q in (0.2, 0.8)}
        steady = (round(0.6 * pages / (at[0.8] - at[0.2]), 3)
                  if at[0.2] is not None and at[0.8] is not None and at[0.8] > at[0.2] else None)
        return {"full_at_s": full, "mean_in_flight": round(sum(f for _, _, f in rows) / len(rows), 1),
                "steady_pages_per_s": steady, "done_20_80_s": [at[0.2], at[0.8]],
                "timeline": [[t, d, f] for t, d, f in self.samples]}


def post_pdf(url: str, pdf: bytes, fields: dict[str, str], timeout: float) -> dict[str, Any]:
    body, ctype = multipart(fields, "file", "bench.pdf", pdf, "application/pdf")
    status, raw = http("POST", url + "/pdf/ocr", body, {"Content-Type": ctype}, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"/pdf/ocr answered {status}: {raw[:2000]!r}")
    return json.loads(raw)


def run_service(args: argparse.Namespace) -> dict[str, Any]:
    pdf = Path(args.pdf).read_bytes()
    fields = {"max_tokens": str(args.max_tokens), "ngram_size": str(args.ngram[0]),
              "ngram_window": str(args.ngram[1]), "draw_layouts": "false", "extract_images": "false",
              "dpi": str(args.dpi)}
    t = time.perf_counter()
    runs = []
    with service(args, Path(args.log)) as url:
        start_s = time.perf_counter() - t
        post_pdf(url, pdf, {**fields, "pages": "1-2", "max_tokens": "16"}, timeout=300)  # warm-up
        plan = [(f, n) for f, repeat in zip(args.files, repeats(args), strict=True) for n in range(repeat)]
        for files, _ in plan:
            runs.append(timed_pdf_run(url, pdf, fields, files, args, start_s))
            if args.out:  # each run as it ends: a call cut off by its time limit keeps the runs it finished
                Path(f"{args.out}.runs").write_text(json.dumps(runs, indent=1))
        if args.profile:  # one more run under py-spy, after the timed ones and not among them
            profiler = start_profile(args, url)
            profiled = timed_pdf_run(url, pdf, fields, args.files[-1], args, start_s)
            stop_profile(profiler)
            print(json.dumps({"profiled_run": {k: profiled[k] for k in ("files", "elapsed_s", "pages_per_s")}}))
    jit = jit_after_ready(Path(args.log))
    by_files = [{**median_run([r for r in runs if r["files"] == f]), "jit_lines_after_ready": jit}
                for f in args.files]
    return by_files[0] if len(by_files) == 1 else {**by_files[0], "by_files": by_files}


def timed_pdf_run(url: str, pdf: bytes, fields: dict[str, str], files: int, args: argparse.Namespace,
                  start_s: float) -> dict[str, Any]:
    """`files` copies of the PDF sent at once, timed; its figures and the fill timeline, printed as one line."""
    t = time.perf_counter()
    with Sampler(url) as sampler, ThreadPoolExecutor(files) as pool:
        answers = list(pool.map(lambda _: post_pdf(url, pdf, fields, timeout=3600), range(files)))
    elapsed = time.perf_counter() - t
    pages = [p for answer in answers for p in answer.get("pages", [])]
    completion = [int((p.get("usage") or {}).get("completion_tokens", 0)) for p in pages]
    run = {
        "path": "service POST /pdf/ocr", "pages": len(pages), "files": files,
        "gpus": args.gpus or "auto", "workers": args.workers, "elapsed_s": round(elapsed, 2),
        "pages_per_s": round(len(pages) / elapsed, 3),
        "output_tokens_per_s": round(sum(completion) / elapsed, 1),
        "mean_completion_tokens": round(sum(completion) / max(1, len(completion)), 1),
        "finish_length": sum(1 for p in pages if p.get("finish_reason") == "length"),
        "pages_failed": sum(int(a.get("pages_failed") or 0) for a in answers),
        "ladder_attempts": sum(len(p.get("retries") or []) for p in pages),
        "engine_start_s": round(start_s, 1),
    }
    engines = engines_of(url)
    run["max_num_batched_tokens"] = [(e.get("detail") or {}).get("max_num_batched_tokens") for e in engines]
    # What each engine settled on: its sequences (MAX_CONCURRENCY=auto measures them), vLLM's max_num_seqs,
    # the KV cache's dtype and tokens, async scheduling, and the fused-MoE table found (or None).
    run["engines"] = [{"max_concurrency": e.get("max_concurrency"),
                       **{k: (e.get("detail") or {}).get(k) for k in ("max_num_seqs", "kv_cache_dtype",
                                                                     "kv_cache_tokens", "async_scheduling")},
                       "moe_table_found": ((e.get("detail") or {}).get("moe_table") or {}).get("found")}
                      for e in engines]
    timeline = sampler.summary(len(pages), sum(int(e.get("max_concurrency", 0)) for e in engines))
    print(json.dumps(run | {k: v for k, v in timeline.items() if k != "timeline"}), flush=True)
    run["fill"] = timeline
    return run


def concurrency_arg(value: str) -> int | str:
    """--concurrency: a number, or auto (MAX_CONCURRENCY=auto)."""
    return "auto" if value.strip().lower() == "auto" else int(value)


def engines_of(url: str) -> list[dict[str, Any]]:
    """The service's engines as /health lists them."""
    with contextlib.suppress(OSError, ValueError):
        status, body = http("GET", url + "/health", timeout=5)
        if status == 200:
            return list(json.loads(body).get("engines", []))
    return []


READY_MARK = "=== bench_vllm: the service answered /ready"


def jit_after_ready(log_path: Path) -> int:
    """Triton JIT compiles that vLLM logged after the service reported ready (the warm-up's own compiles
    come before the mark and are the point of the warm-up). By the lines' own clock: Ray forwards an
    actor's lines to the server's log seconds late, past the mark."""
    import re

    text = log_path.read_text(errors="replace")
    mark = re.search(re.escape(READY_MARK) + r" (\d\d:\d\d:\d\d)", text)
    count = 0
    for line in text.splitlines():
        if "JIT compilation during inference" not in line:
            continue
        stamp = re.search(r"\d\d-\d\d (\d\d:\d\d:\d\d)", line)
        if mark is None or stamp is None or stamp.group(1) >= mark.group(1):
            count += 1
    return count


def start_profile(args: argparse.Namespace, url: str = "", pid: int | None = None) -> list[subprocess.Popen[bytes]]:
    """py-spy on the server and on each of its children (engine workers, vLLM engine cores, render
    processes), one non-blocking recorder per process (`--subprocesses` needs blocking mode), for the
    extra profiled run, or its first --profile-s seconds: `<profile>.<pid>.txt` each."""
    import shutil

    import psutil

    if shutil.which("py-spy") is None:
        print("py-spy is not on PATH: no profile", file=sys.stderr)
        return []
    server = psutil.Process(pid or args.server_pid)  # pid: a process of our own (raw AsyncLLM) and its children
    pids = [server.pid] + [p.pid for p in server.children(recursive=True)
                           if "resource_tracker" not in " ".join(p.cmdline())]
    Path(args.profile).parent.mkdir(parents=True, exist_ok=True)
    names = {pid: " ".join(psutil.Process(pid).cmdline())[:160] for pid in pids}
    Path(f"{args.profile}.pids.json").write_text(json.dumps(names, indent=1))
    limit = ["--duration", str(args.profile_s)] if args.profile_s else []
    return [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--gil", "--nonblocking", "--rate", "40",
                              *limit, "--format", "raw", "--output", f"{args.profile}.{pid}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for pid in pids]


def stop_profile(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(2)  # py-spy writes its file on SIGINT
    for profiler in profilers:
        try:
            profiler.wait(60)
        except subprocess.TimeoutExpired:
            profiler.kill()


def run_dp(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's own data parallelism: one AsyncLLM with `data_parallel_size` = --dp (one engine core per GPU,
    vLLM's internal load balancing; for an MoE model its ranks step in lockstep), fed every page of --files
    copies of the PDF at once, as the service is. Against independent engines (the service with GPUS=0,1),
    this says which way a host's GPUs should be used. Pages are rendered beforehand (not timed); the view
    preparation and vLLM's processor run per page inside the timing, off the event loop."""
    import asyncio

    from engines.vllm.engine import PromptBuilder

    images = rendered_pages(args)
    builder = PromptBuilder.from_checkpoint(args.model)
    params = page_params(args, builder)

    async def main() -> dict[str, Any]:
        engine, start_s = async_engine(args, data_parallel_size=args.dp)

        async def one(image: Any) -> int:
            return await generate_page(engine, builder, image, params)

        runs = []
        try:
            await asyncio.gather(*(one(images[0]) for _ in range(2 * args.dp)))  # warm-up
            for _ in range(repeats(args)[0]):
                pages = images * args.files[0]
                t = time.perf_counter()
                tokens = await asyncio.gather(*(one(image) for image in pages))
                elapsed = time.perf_counter() - t
                runs.append({"path": f"raw AsyncLLM data_parallel_size={args.dp}", "pages": len(pages),
                             "elapsed_s": round(elapsed, 2), "pages_per_s": round(len(pages) / elapsed, 3),
                             "output_tokens_per_s": round(sum(tokens) / elapsed, 1),
                             "mean_completion_tokens": round(sum(tokens) / len(tokens), 1),
                             "engine_start_s": round(start_s, 1)})
                print(json.dumps(runs[-1]), flush=True)
        finally:
            engine.shutdown()
        return median_run(runs)

    return asyncio.run(main())


def run_shared(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Several raw AsyncLLM engines on one GPU (issue 30): for each K of --engines-per-gpu, K engines started
    one after another in this process, each with --gpu-mem / K of the GPU's memory (vLLM's per-instance
    limit) and --concurrency / K sequences, the pages dealt round-robin over them, all sent at once. The
    question it answers: a decode step of 256 sequences is mostly the engine core's host time
    (docs/BENCHMARKS.md section 27), so do two engine cores, each with its own host thread, on one GPU make
    more pages a second than one? K = 1 is the baseline in the same call. --repeat timed passes per K after
    a warm-up; each K's engines are shut down before the next K starts."""
    import asyncio

    from engines.vllm.engine import PromptBuilder

    images = rendered_pages(args) * args.files[0]
    builder = PromptBuilder.from_checkpoint(args.model)
    params = page_params(args, builder)
    results = []
    for k in args.engines_per_gpu:
        share = argparse.Namespace(**{**vars(args), "gpu_mem": args.gpu_mem / k,
                                      "concurrency": max(1, args.concurrency // k)})

        async def main(k: int = k, share: argparse.Namespace = share) -> dict[str, Any]:
            engines, starts = [], []
            try:
                for _ in range(k):  # one after another: each profiles its memory with the others settled
                    engine, start_s = async_engine(share)
                    engines.append(engine)
                    starts.append(round(start_s, 1))

                async def one(i: int, image: Any) -> int:
                    return await generate_page(engines[i % k], builder, image, params)

                await asyncio.gather(*(one(i, images[0]) for i in range(2 * k)))  # warm-up, every engine
                runs = []
                for _ in range(repeats(args)[0]):
                    t = time.perf_counter()
                    tokens = await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))
                    elapsed = time.perf_counter() - t
                    runs.append({"path": f"raw AsyncLLM x{k} on one GPU", "engines": k, "pages": len(images),
                                 "gpu_mem_each": round(share.gpu_mem, 3), "max_num_seqs_each": share.concurrency,
                                 "elapsed_s": round(elapsed, 2), "pages_per_s": round(len(images) / elapsed, 3),
                                 "output_tokens_per_s": round(sum(tokens) / elapsed, 1),
                                 "mean_completion_tokens": round(sum(tokens) / len(tokens), 1),
                                 "engine_start_s": starts})
                    print(json.dumps(runs[-1]), flush=True)
                return median_run(runs)
            finally:
                for engine in engines:
                    engine.shutdown()

        results.append(asyncio.run(main()))
        print(json.dumps({"median": results[-1]}), flush=True)
        _wait_for_gpu_memory()
    return results


def _wait_for_gpu_memory(limit_s: float = 60.0) -> None:
    """Until the GPU holds under 2 GiB (the engine cores just shut down free theirs as their processes exit),
    so the next engines' memory check sees the whole GPU; nvidia-smi, not CUDA: this process stays without a
    CUDA context, as vLLM's front end is."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=False).stdout.split()
        if out and max(int(v) for v in out) < 2048:
            return
        time.sleep(1.0)


# --------------------------------------------------------------------------------------- n-gram guard


def ngram_table(args: argparse.Namespace) -> int:
    """One raw child per processor (each starts its own engine), guard on and off, median of --repeat."""
    rows: list[dict[str, Any]] = []
    for impl in args.impls.split(","):
        out = Path(args.pdf).with_suffix(f".ngram-{impl}.json")
        cmd = [sys.executable, __file__, "raw", "--model", args.model, "--pages", str(args.pages),
               "--max-tokens", str(args.max_tokens), "--concurrency", str(args.concurrency),
               "--ngram", *map(str, args.ngram), "--gpu-mem", str(args.gpu_mem), "--load-format",
               args.load_format, "--pdf", args.pdf, "--ngram-impl", impl, "--repeat", ",".join(map(str, args.repeat)),
               "--also-off", "--out", str(out)]
        if subprocess.run(cmd).returncode != 0:
            print(f"{impl}: the raw run failed", flush=True)
            continue
        result = json.loads(out.read_text())[0]
        rows += [{"impl": impl, "guard": "on", **result}, {"impl": impl, "guard": "off", **result["guard_off"]}]
    print(f"\n{args.pages} A4 pages, max_tokens {args.max_tokens}, max_num_seqs {args.concurrency}, "
          f"n-gram {args.ngram[0]}/{args.ngram[1]}, median of {args.repeat[0]}")
    print(f"  {'processor':9} {'guard':5} {'pages/s':>8} {'tok/s':>9} {'tokens/page':>11} {'runs (s)':24} "
          "tokens (sha256 per run)")
    for r in rows:
        print(f"  {r['impl']:9} {r['guard']:5} {r['pages_per_s']:8.3f} {r['output_tokens_per_s']:9.1f} "
              f"{r['mean_completion_tokens']:11} {str(r['runs_elapsed_s']):24} {' '.join(r['runs_sha256'])}")
    on = {r["impl"]: r for r in rows if r["guard"] == "on"}
    if "batched" in on and "vllm" in on:
        b, v = on["batched"], on["vllm"]
        same = set(b["runs_sha256"]) == set(v["runs_sha256"]) and len(set(b["runs_sha256"])) == 1
        print(f"  guard on, batched / per-request: {b['output_tokens_per_s'] / v['output_tokens_per_s']:.3f} x tok/s; "
              f"greedy outputs of all runs {'identical' if same else 'not all identical (tokens column)'}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if len(rows) == 2 * len(args.impls.split(",")) else 1


# --------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["all", "raw", "service", "ngram", "interactive", "dp", "shared"],
                        help="ngram: raw runs per --impls, guard on and off, median of --repeat (a table); "
                             "interactive: single pages from 64 clients, raw AsyncLLM vs /ocr/image/advanced; "
                             "dp: raw AsyncLLM with vLLM's data_parallel_size=--dp over --files copies")
    parser.add_argument("--model", required=True)
    parser.add_argument("--pages", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=1000)
    parser.add_argument("--concurrency", type=concurrency_arg, default=256,
                        help="MAX_CONCURRENCY = vLLM max_num_seqs; auto: the service measures its KV cache "
                             "(raw vLLM gets the service's ceiling for auto)")
    parser.add_argument("--ngram", type=int, nargs=2, default=(20, 50), metavar=("SIZE", "WINDOW"))
    parser.add_argument("--dpi", type=int, default=144)
    parser.add_argument("--gpu-mem", type=float, default=0.75, help="GPU_MEM_UTILIZATION for both paths")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--engine", default="vllm", help="ENGINE of the service (torch: check on CPU)")
    parser.add_argument("--pdf", help="the PDF; written when missing (default /tmp/bench-N.pdf)")
    parser.add_argument("--log", default="/tmp/bench-service.log", help="the service's log")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--files", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                        help="copies of the PDF sent at once (raw: as many pages); 1,2 = each in turn, one engine")
    parser.add_argument("--gpus", help="GPUS of the service (default: every visible GPU)")
    parser.add_argument("--workers", default="process", choices=["process", "inline"], help="ENGINE_WORKERS")
    parser.add_argument("--profile", help="service: one more run after the timed ones, under py-spy; its raw "
                        "stacks go here (<profile>.<pid>.txt)")
    parser.add_argument("--profile-s", type=int, default=0, help="profile only the profiled run's first seconds")
    parser.add_argument("--profile-single", action="store_true",
                        help="interactive: profile (--profile) --latency-runs extra one-client requests of the first "
                             "round instead of a loaded round, on both paths (the raw side profiles itself)")
    parser.add_argument("--ngram-impl", choices=["batched", "vllm", "off"], default="batched",
                        help="the n-gram logits processor of the raw engine (engine_kwargs ngram_impl)")
    parser.add_argument("--repeat", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                        help="timed runs on one engine, median; one count, or one per --files entry (3,1)")
    parser.add_argument("--also-off", action="store_true", help="raw: also time runs with the guard off")
    parser.add_argument("--impls", default="batched,vllm", help="ngram: the processors compared")
    parser.add_argument("--ladder", action="store_true", help="service: keep the retry ladder on (RETRY_LADDER)")
    parser.add_argument("--requests", type=int, default=256, help="interactive: requests under load")
    parser.add_argument("--latency-runs", type=int, default=10, help="interactive: one-client requests")
    parser.add_argument("--rounds", type=int, default=1, help="interactive: rounds of (64 clients, then one "
                        "client) on one start; the figures are medians over the rounds")
    parser.add_argument("--only", choices=["raw", "service", "raw-child"], help="interactive: one side")
    parser.add_argument("--rounds-out", help="interactive: append each round here (JSON lines) as it ends")
    parser.add_argument("--dp", type=int, default=2, help="dp: vLLM data_parallel_size (GPUs)")
    parser.add_argument("--engines-per-gpu", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                        help="shared: the engine counts on one GPU to compare, in this order (\"1,2\")")
    args = parser.parse_args()
    args.pdf = args.pdf or f"/tmp/bench-{args.pages}.pdf"
    if not Path(args.pdf).is_file():
        Path(args.pdf).write_bytes(text_pdf(args.pages))

    results: list[dict[str, Any]] = []
    if args.what == "ngram":
        return ngram_table(args)
    if args.what == "interactive":
        import bench_interactive

        results = ([bench_interactive.run_raw(args)] if args.only == "raw-child"
                   else bench_interactive.interactive(args, __file__))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        return 0 if args.only or len(results) == 3 else 1
    if args.what == "dp":
        results.append(run_dp(args))
        print(json.dumps(results[-1]), flush=True)
    if args.what == "shared":
        results.extend(run_shared(args))
    if args.what == "raw":
        results.append(run_raw(args))
        print(json.dumps(results[-1]), flush=True)
    if args.what == "all":
        # (a) in a child process (it prints its own line): vLLM's memory and engine core go away with it.
        raw_json = Path(args.pdf).with_suffix(".raw.json")
        cmd = [sys.executable, __file__, "raw", *sys.argv[2:], "--out", str(raw_json)]
        subprocess.run(cmd, check=True)
        results.append(json.loads(raw_json.read_text())[0])
    if args.what in ("all", "service"):
        results.append(run_service(args))
        print(json.dumps(results[-1]), flush=True)
    if len(results) == 2:
        a, b = results
        ratio = b["pages_per_s"] / a["pages_per_s"]
        print(f"\n{args.pages} A4 pages x {args.files[0]}, max_tokens {args.max_tokens}, "
              f"MAX_CONCURRENCY {args.concurrency}, n-gram {args.ngram[0]}/{args.ngram[1]}")
        for r in results:
            print(f"  {r['path']:24} {r['pages_per_s']:7.3f} pages/s  {r['output_tokens_per_s']:9.1f} tok/s  "
                  f"mean {r['mean_completion_tokens']} tokens/page  ({r['elapsed_s']} s)")
        print(f"  ratio service/raw: {ratio:.3f}")
        results.append({"ratio_service_over_raw": round(ratio, 3)})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
