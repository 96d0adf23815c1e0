"""The interactive path on the GPU (issue 29): one A4 page a request, raw vLLM AsyncLLM against the service.

Per path, on one engine start, --rounds rounds of:
  load      64 clients in a closed loop (each sends its next page when its last is answered), --requests pages;
  one       one client alone, --latency-runs pages: the client's end-to-end seconds; for raw also its time to
            the first token, for the service the `Server-Timing` stages of every answer;
  v1        (service only) one client streaming `/v1/chat/completions`: the time to the first SSE chunk and to
            the first chunk that carries text, against raw's time to first token.
Raw runs in a child process first (its GPU memory goes with it), then the service. Each round is printed and
appended to --rounds-out (JSON lines) the moment it ends, so a call cut by its limit keeps what it measured;
the summary (medians over rounds, and the comparison) comes last. With --profile, the service's second round
under load runs under py-spy (the server and its children, the first --profile-s seconds).

    python benchmarks/bench_vllm.py interactive --model DIR --pages 256 --max-tokens 256 --ngram 30 90 \
        --requests 192 --latency-runs 12 --rounds 3 --rounds-out rounds.jsonl --out interactive.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CLIENTS = 64


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4) if values else float("nan")


def cpu_times(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system, all threads) so far of `root` and each of its descendants, by pid, with the
    process's part: what the one-client runs cost each process, to tell a slow engine core from a busy
    neighbour (section 22 of docs/BENCHMARKS.md: the service's engine core used ~1.6x raw's Python time per
    page)."""
    import psutil

    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return {}
    out: dict[int, tuple[str, float]] = {}
    for proc in procs:
        try:
            cmd, times = " ".join(proc.cmdline()), proc.cpu_times()
        except psutil.Error:
            continue
        part = ("engine core" if "EngineCore" in cmd or "EngineCore" in proc.name() else
                "main" if proc.pid == root else "engine worker" if "workers.main" in cmd else
                "pool processes" if "spawn_main" in cmd else "other")
        out[proc.pid] = (part, times.user + times.system)
    return out


def cpu_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                    requests: int) -> dict[str, float]:
    """Milliseconds of CPU a request, by process part, between two `cpu_times` (processes in both)."""
    parts: dict[str, float] = {}
    for pid, (part, seconds) in after.items():
        if pid in before:
            parts[part] = parts.get(part, 0.0) + seconds - before[pid][1]
    return {part: round(1000 * seconds / max(1, requests), 1) for part, seconds in sorted(parts.items())}


def emit(args: argparse.Namespace, row: dict[str, Any]) -> None:
    """One finished round: printed and appended at once (a cut call keeps it)."""
    line = json.dumps(row)
    print(line, flush=True)
    if args.rounds_out:
        with open(args.rounds_out, "a") as f:
            f.write(line + "\n")


def page_png(args: argparse.Namespace) -> bytes:
    """The first page of the benchmark PDF as the PNG a client would upload (A4 at --dpi)."""
    from pdf import render_process

    with render_process.open_pdf(Path(args.pdf).read_bytes(), max_pages=100_000) as source:
        image = render_process.render_page(source, 1, dpi=args.dpi, max_pixels=40_000_000).image
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------- raw AsyncLLM


def run_raw(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's AsyncLLM with the service's engine settings, the image prompt in Gundam, as the image routes."""
    import asyncio

    from bench_vllm import async_engine, page_params, start_profile, stop_profile
    from PIL import Image

    from config import IMAGE_PROMPT, MODES
    from engines.vllm.engine import PromptBuilder, vllm_image

    png = page_png(args)
    gundam = MODES["gundam"]
    builder = PromptBuilder.from_checkpoint(args.model)
    params = page_params(args, builder)  # FINAL_ONLY, as the image routes ask
    streamed = page_params(args, builder, delta=True)  # per-step deltas, as /v1 streaming asks: its first token

    async def main() -> dict[str, Any]:
        engine, start_s = async_engine(args)

        def view() -> Image.Image:
            return vllm_image(Image.open(io.BytesIO(png)).convert("RGB"), gundam)

        first_texts: list[float] = []  # streamed runs: seconds to the first non-empty text (as /v1's first text)
        prompt_lengths: set[int] = set()  # prompt tokens of every request: the same page as the service's?

        async def one(stream: bool = False) -> tuple[float, float, int]:
            """(seconds, seconds to the first token (streamed only), tokens); decoding the upload and preparing
            the views are counted, as the service counts them, off the event loop like the service's."""
            t = time.perf_counter()
            prompt = builder.prompt(IMAGE_PROMPT, await asyncio.to_thread(view), gundam)
            (engine_input,) = await engine.renderer.render_cmpl_async([prompt])
            tokens, first, text = 0, 0.0, 0.0
            async for out in engine.generate(engine_input, streamed if stream else params, uuid.uuid4().hex):
                if out.prompt_token_ids:
                    prompt_lengths.add(len(out.prompt_token_ids))
                tokens += len(out.outputs[0].token_ids)
                if tokens and not first:
                    first = time.perf_counter() - t
                if out.outputs[0].text and not text:
                    text = time.perf_counter() - t
            if stream:
                first_texts.append(text)
            return time.perf_counter() - t, first, tokens

        async def load() -> tuple[list[tuple[float, float, int]], float]:
            left = list(range(args.requests))
            results: list[tuple[float, float, int]] = []

            async def client() -> None:
                while left:
                    left.pop()
                    results.append(await one())

            t = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(CLIENTS)))
            return results, time.perf_counter() - t

        rows = []
        try:
            await asyncio.gather(*(one() for _ in range(4)))  # warm-up
            for n in range(args.rounds):
                loaded, wall = await load() if args.requests else ([], 0.0)
                before = cpu_times(os.getpid())
                single = [await one() for _ in range(args.latency_runs)]
                cpu = cpu_per_request(before, cpu_times(os.getpid()), len(single))
                streams = [await one(stream=True) for _ in range(args.latency_runs)]
                if args.profile and args.profile_single and n == 0:  # extra runs: the timed ones above are not profiled
                    profilers = start_profile(args, pid=os.getpid())
                    for _ in range(args.latency_runs):
                        await one()
                    stop_profile(profilers)
                rows.append({"path": "raw", "round": n + 1, "pages": len(loaded), "elapsed_s": round(wall, 2),
                             "pages_per_s": round(len(loaded) / wall, 3) if wall else None,
                             "mean_completion_tokens": round(sum(r[2] for r in loaded) / max(1, len(loaded)), 1),
                             "one_client_median_s": _median([r[0] for r in single]),
                             "ttft_median_s": _median([r[1] for r in streams]),
                             "first_text_median_s": _median(first_texts[-len(streams):]),
                             "streamed_total_median_s": _median([r[0] for r in streams]),
                             "one_client_cpu_ms_per_request": cpu,
                             "prompt_tokens": sorted(prompt_lengths),
                             "one_client_tokens": sorted({r[2] for r in single})})
                emit(args, rows[-1])
        finally:
            engine.shutdown()
        return summary("raw AsyncLLM", rows) | {"engine_start_s": round(start_s, 1)}

    return asyncio.run(main())


# --------------------------------------------------------------------------------------- the service


def server_timing(header: str | None) -> dict[str, float]:
    """`name;dur=ms, ...` -> {name: ms}."""
    stages: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            stages[name] = float(rest[4:])
    return stages


def post_page(client: Client, fields: dict[str, str], png: bytes) -> tuple[float, dict[str, Any], dict[str, float]]:
    """One page to `/ocr/image/advanced`: (the client's seconds, the answer's `usage`, its `Server-Timing`)."""
    from bench_vllm import multipart

    body, ctype = multipart(fields, "file", "page.png", png, "image/png")
    t = time.perf_counter()
    resp = client.post("/ocr/image/advanced", body, ctype)
    raw = resp.read()
    elapsed = time.perf_counter() - t
    if resp.status != 200:
        raise RuntimeError(f"/ocr/image/advanced answered {resp.status}: {raw[:2000]!r}")
    return elapsed, json.loads(raw)["usage"], server_timing(resp.getheader("server-timing"))


class Client:
    """One keep-alive HTTP connection, as `requests.Session` or an SDK keeps one."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)

    def post(self, path: str, body: bytes, ctype: str) -> http.client.HTTPResponse:
        """Sent again once on a new connection when the kept one was closed by the server while idle
        (uvicorn's keep-alive timeout is 5 s), as urllib3's pool does."""
        for attempt in (1, 2):
            try:
                self.conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                return self.conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def run_service(args: argparse.Namespace) -> dict[str, Any]:
    from bench_vllm import jit_after_ready, service, start_profile, stop_profile

    from config import IMAGE_PROMPT

    png = page_png(args)
    fields = {"max_tokens": str(args.max_tokens), "ngram_size": str(args.ngram[0]),
              "ngram_window": str(args.ngram[1]), "mode": "gundam", "draw_boxes": "false",
              "crop_regions": "false"}
    chat = json.dumps({
        "model": "deepseek-ocr", "stream": True, "max_tokens": args.max_tokens, "mode": "gundam",
        "ngram_size": args.ngram[0], "ngram_window": args.ngram[1],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": IMAGE_PROMPT.replace("<image>", "").strip()},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
        ]}]}).encode()

    prompt_lengths: set[int] = set()  # prompt tokens of every page: the same prompt as raw's?

    def page(client: Client) -> tuple[float, int, dict[str, float]]:
        elapsed, usage, stages = post_page(client, fields, png)
        prompt_lengths.add(int(usage["prompt_tokens"]))
        return elapsed, int(usage["completion_tokens"]), stages

    def stream(client: Client) -> tuple[float, float, float]:
        """(seconds to the first chunk, to the first chunk with text, to [DONE])."""
        t = time.perf_counter()
        resp = client.post("/v1/chat/completions", chat, "application/json")
        if resp.status != 200:
            raise RuntimeError(f"/v1/chat/completions answered {resp.status}: {resp.read()[:2000]!r}")
        first = text = 0.0
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter() - t
            first = first or now
            if line.strip() == b"data: [DONE]":
                break
            delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
            if delta.get("content") and not text:
                text = now
        resp.read()
        return first, text, time.perf_counter() - t

    t = time.perf_counter()
    with service(args, Path(args.log)) as url:
        start_s = time.perf_counter() - t
        clients = [Client(url) for _ in range(CLIENTS)]
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(page, clients[:4]))  # warm-up
            stream(clients[0])
            rows = []
            for n in range(args.rounds):
                left = list(range(args.requests))
                loaded: list[tuple[float, int, dict[str, float]]] = []

                def closed_loop(client: Client, left: list[int] = left, loaded: list = loaded) -> None:
                    while True:
                        try:
                            left.pop()
                        except IndexError:
                            return
                        loaded.append(page(client))

                loaded_profile = args.profile and not args.profile_single and n == min(1, args.rounds - 1)
                profilers = start_profile(args, url) if loaded_profile else []
                t = time.perf_counter()
                for f in [pool.submit(closed_loop, c) for c in clients]:
                    f.result()
                wall = time.perf_counter() - t
                stop_profile(profilers)
                before = cpu_times(args.server_pid)
                single = [page(clients[0]) for _ in range(args.latency_runs)]
                # The service's side only: the client's HTTP and threads are this process's.
                cpu = cpu_per_request(before, cpu_times(args.server_pid), len(single))
                streams = [stream(clients[0]) for _ in range(args.latency_runs)]
                if args.profile and args.profile_single and n == 0:  # extra runs: the timed ones above are not profiled
                    profilers = start_profile(args, url)
                    for _ in range(args.latency_runs):
                        page(clients[0])
                    stop_profile(profilers)
                stages = sorted({name for _, _, st in single for name in st})
                rows.append({
                    "path": f"service ({args.workers}" + (f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
                                                          if "OMP_NUM_THREADS" in os.environ else ")"),
                    "round": n + 1,
                    "pages": len(loaded), "elapsed_s": round(wall, 2),
                    "pages_per_s": round(len(loaded) / wall, 3) if loaded else None,
                    "mean_completion_tokens": round(sum(r[1] for r in loaded) / max(1, len(loaded)), 1),
                    "one_client_median_s": _median([r[0] for r in single]),
                    "one_client_tokens": sorted({r[1] for r in single}),
                    "one_client_cpu_ms_per_request": cpu,
                    "prompt_tokens": sorted(prompt_lengths),
                    "server_timing_median_ms": {s: _median([st.get(s, 0.0) for _, _, st in single]) for s in stages},
                    "server_timing_under_load_median_ms": {
                        s: _median([st.get(s, 0.0) for _, _, st in loaded]) for s in stages} if loaded else {},
                    # What the client waited beyond the server's `total` (connection, headers, the answer's
                    # way back), and what `total` holds beyond its stages (the event loop between them).
                    "outside_total_ms": {
                        "one_client": _median([1000 * e - st.get("total", 0.0) for e, _, st in single]),
                        "under_load": _median([1000 * e - st.get("total", 0.0) for e, _, st in loaded])},
                    "total_beyond_stages_ms": {
                        "one_client": _median([st.get("total", 0.0) - sum(v for k, v in st.items() if k != "total")
                                               for _, _, st in single]),
                        "under_load": _median([st.get("total", 0.0) - sum(v for k, v in st.items() if k != "total")
                                               for _, _, st in loaded])},
                    "v1_first_chunk_median_s": _median([r[0] for r in streams]),
                    "v1_first_text_median_s": _median([r[1] for r in streams]),
                    "v1_total_median_s": _median([r[2] for r in streams])})
                emit(args, rows[-1])
    return summary("service /ocr/image/advanced", rows) | {
        "engine_start_s": round(start_s, 1), "jit_lines_after_ready": jit_after_ready(Path(args.log))}


# --------------------------------------------------------------------------------------- both


def summary(path: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of every numeric figure; the rounds beside them."""
    out: dict[str, Any] = {"path": path, "clients": CLIENTS, "rounds": rows}
    for key in ("pages_per_s", "one_client_median_s", "ttft_median_s", "v1_first_chunk_median_s",
                "v1_first_text_median_s", "mean_completion_tokens"):
        values = [r[key] for r in rows if r.get(key) is not None]  # None: no loaded phase (--requests 0)
        if values:
            out[key] = _median(values)
    return out


def interactive(args: argparse.Namespace, script: str) -> list[dict[str, Any]]:
    results = []
    if args.only in (None, "raw"):
        raw_json = Path(args.pdf).with_suffix(".interactive-raw.json")
        cmd = [sys.executable, script, "interactive", *sys.argv[2:], "--only", "raw-child", "--out", str(raw_json)]
        if subprocess.run(cmd).returncode == 0:
            results.append(json.loads(raw_json.read_text())[0])
    if args.only in (None, "service"):
        results.append(run_service(args))
    if len(results) == 2 and args.requests:
        raw, svc = results
        cmp = {"ratio_pages_per_s": round(svc["pages_per_s"] / raw["pages_per_s"], 3),
               "one_client_over_raw_ms": round(1000 * (svc["one_client_median_s"] - raw["one_client_median_s"]), 1),
               "v1_first_chunk_over_raw_ttft_ms": round(
                   1000 * (svc["v1_first_chunk_median_s"] - raw["ttft_median_s"]), 1),
               "v1_first_text_over_raw_ttft_ms": round(
                   1000 * (svc["v1_first_text_median_s"] - raw["ttft_median_s"]), 1)}
        results.append(cmp)
        print(f"\ninteractive: one A4 page a request, max_tokens {args.max_tokens}, n-gram {args.ngram[0]}/"
              f"{args.ngram[1]}, {CLIENTS} clients x {args.requests} pages, then one client x {args.latency_runs}; "
              f"medians of {args.rounds} rounds")
        for r in (raw, svc):
            print(f"  {r['path']:28} {r['pages_per_s']:7.3f} pages/s  one client {r['one_client_median_s']:.4f} s")
        print(f"  service/raw pages/s {cmp['ratio_pages_per_s']}; one client over raw {cmp['one_client_over_raw_ms']} "
              f"ms; /v1 first chunk over raw TTFT {cmp['v1_first_chunk_over_raw_ttft_ms']} ms (first text "
              f"{cmp['v1_first_text_over_raw_ttft_ms']} ms)")
    return results
