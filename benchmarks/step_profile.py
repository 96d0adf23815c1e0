"""Where a vLLM engine step's time goes (issue 30): two windows of steps under vLLM's torch profiler, summarised.

Raw vLLM `AsyncLLM` with the service's engine settings (`engines.vllm.args.engine_kwargs`, as bench_vllm's raw
paths), the A4 workload of the throughput benchmark (Gundam, --max-tokens a page, n-gram guard on), every page
sent at once with its views and vLLM's processor in threads, as the service does, so that the engine holds the
whole batch within seconds (the offline `LLM` preprocesses serially inside `generate`: its batch was still
52 sequences 300 steps in, docs/BENCHMARKS.md section 26). First --unprofiled passes (2: the first also
compiles the large shapes on first use; each pass's pages/s, and the engine core's CPU seconds per wall
second); then the same pages again twice, with vLLM's profiler on for one
window by time after the send each pass (`--decode-window`: the full batch decoding, first; `--fill-window`: the
prefills while the batch fills). vLLM's `gpu_model_runner: *` ranges are recorded
(VLLM_CUSTOM_SCOPES_FOR_PROFILING=1). Each window's worker trace (Chrome JSON, written by vLLM under
--trace-dir) is read back and summarised by `summarize`:

- steps: vLLM's step annotation (`execute_context_C(T)_generation_G(T)`, one per `execute_model`): its CPU span,
  and its wall time (to the next step's start); steps with prefill (C > 0) apart from decode-only ones;
- GPU busy: the union of the kernels each step launched (a kernel belongs to the step whose span holds its
  launch, found by the kernel's correlation id: a CUDA graph's kernels share their graph launch's), over the
  step's wall time;
- host time per step by vLLM's range on the engine core's thread (`schedule: allocate_slots`, `gpu_model_runner:
  preprocess`, ... and what no range holds: the scheduler's and the outputs' own Python);
- kernel time per step by class (fused MoE, attention, GEMM, norms/activations/rotary, copies, other) and by
  vLLM's range at the launch (`preprocess` holds the vision encoder, `forward` the decoder, `sample` the sampler
  with the logits processors (the n-gram guard) and the log-probabilities);
- the memory-traffic bound of a decode step: every expert's weights (all are touched at these batches) plus the
  KV cache the step reads, over --bandwidth-tbs (H100 SXM 3.35, H200 4.8): the fraction of it reached.

The profiler slows the CPU side; the last unprofiled pass's pages/s is the figure to quote, the profile says where
the time goes. Usage (GPU machine, kit installed; real-size config, random weights):
    python benchmarks/step_profile.py --model /tmp/dsocr-ckpt/real --pages 256 --max-tokens 1000 \\
        --fill-window 0 3 --decode-window 12 13.5 --trace-dir /tmp/step-trace --out step-profile.json
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEP_RE = re.compile(r"^execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
RANGE_PREFIX = "gpu_model_runner: "
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
# Kernel classes by name, first match wins; the rest is "other".
CLASSES = (
    ("moe", re.compile(r"fused_moe|moe_align|moe_sum|topk_softmax|grouped_topk|count_and_sort|_moe_|moe_", re.I)),
    ("attention", re.compile(r"flash|fmha|attn|attention|paged|reshape_and_cache|merge_attn", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|gemv|splitk|sm90_|sm80_|ampere_|wgmma", re.I)),
    ("norm_act_rope", re.compile(r"rms_norm|layer_?norm|silu|gelu|act_and_mul|rotary|rope", re.I)),
    ("copy", re.compile(r"^memcpy|^memset|copy|catarray|gather|scatter|index", re.I)),
)


def kernel_class(name: str) -> str:
    return next((label for label, pattern in CLASSES if pattern.search(name)), "other")


def load_trace(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(trace: dict[str, Any]) -> dict[str, Any]:
    """The per-step figures of one worker trace (see the module's docstring); times in ms."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and STEP_RE.match(e.get("name", ""))),
                   key=lambda e: e["ts"])
    if len(steps) < 2:
        return {"error": f"{len(steps)} step annotations in the trace: need 2 or more"}
    starts = [float(s["ts"]) for s in steps]
    ranges = sorted(((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"][len(RANGE_PREFIX):])
                     for e in events if e.get("name", "").startswith(RANGE_PREFIX)), key=lambda r: r[0])
    range_starts = [r[0] for r in ranges]
    launches = {e["args"]["correlation"]: float(e["ts"]) for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]

    # The last step has no next start: it is only the end of the others' window.
    per_step: list[dict[str, Any]] = []
    for i, s in enumerate(steps[:-1]):
        context, tokens, sequences = (int(g) for g in STEP_RE.match(s["name"]).groups()[:3])  # type: ignore[union-attr]
        per_step.append({"kind": "prefill" if context else "decode", "context_requests": context,
                         "context_tokens": tokens, "sequences": sequences, "cpu_ms": float(s["dur"]) / 1000,
                         "wall_ms": (starts[i + 1] - starts[i]) / 1000, "intervals": [],
                         "by_class": defaultdict(float), "by_range": defaultdict(float)})
    unattributed = 0
    for k in kernels:
        launch = launches.get(k.get("args", {}).get("correlation"))
        if launch is None:
            unattributed += 1
            continue
        i = bisect.bisect_right(starts, launch) - 1
        if not 0 <= i < len(per_step):
            continue  # launched before the first step or in the last (unbounded) one
        start, dur = float(k["ts"]), float(k.get("dur", 0))
        step = per_step[i]
        step["intervals"].append((start, start + dur))
        step["by_class"][kernel_class(k.get("name", ""))] += dur / 1000
        j = bisect.bisect_right(range_starts, launch) - 1
        label = ranges[j][2] if j >= 0 and launch < ranges[j][1] else "outside vLLM's ranges"
        step["by_range"][label] += dur / 1000
    for step in per_step:
        step["gpu_busy_ms"] = union_us(step.pop("intervals")) / 1000
    _host_by_range(events, steps, per_step)

    def med(rows: list[dict[str, Any]], key: str) -> float | None:
        return round(statistics.median(r[key] for r in rows), 3) if rows else None

    def table(rows: list[dict[str, Any]], field: str) -> dict[str, float]:
        names = sorted({n for r in rows for n in r[field]})
        return {n: round(statistics.median(r[field].get(n, 0.0) for r in rows), 3) for n in names}

    out: dict[str, Any] = {"steps": len(per_step), "kernels": len(kernels), "kernels_unattributed": unattributed}
    for kind in ("decode", "prefill"):
        rows = [s for s in per_step if s["kind"] == kind]
        wall, busy = sum(r["wall_ms"] for r in rows), sum(r["gpu_busy_ms"] for r in rows)
        out[kind] = {
            "steps": len(rows),
            "sequences_median": med(rows, "sequences"),
            "context_tokens_median": med(rows, "context_tokens"),
            "wall_ms_median": med(rows, "wall_ms"),
            "cpu_span_ms_median": med(rows, "cpu_ms"),
            "gpu_busy_ms_median": med(rows, "gpu_busy_ms"),
            "gpu_busy_fraction": round(busy / wall, 3) if wall else None,
            "kernel_ms_by_class_median": table(rows, "by_class"),
            "kernel_ms_by_range_median": table(rows, "by_range"),
            "host_ms_by_range_median": table(rows, "host"),
        }
    return out


def _host_by_range(events: list[dict[str, Any]], steps: list[dict[str, Any]], per_step: list[dict[str, Any]]) -> None:
    """Each step's wall time on the steps' own thread (the engine core's, which runs the scheduler as well as the
    model runner), by the outermost annotation holding it: vLLM's `gpu_model_runner: *` and `schedule: *` ranges
    and any other, their "(...)" suffix dropped; the step annotation itself is not one (its ranges are inside
    it, and with async scheduling the sampler runs after it). What no annotation holds is "(no range)": the
    scheduler's and the outputs' own Python."""
    thread = (steps[0].get("pid"), steps[0].get("tid"))
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"].split("(")[0].strip())
                   for e in events if e.get("cat") == "user_annotation" and (e.get("pid"), e.get("tid")) == thread
                   and not STEP_RE.match(e.get("name", "")))
    starts = [float(s["ts"]) for s in steps]
    for i, step in enumerate(per_step):
        begin, end = starts[i], starts[i + 1]
        host: dict[str, float] = defaultdict(float)
        reach = begin
        for a, b, name in spans[bisect.bisect_left(spans, (begin,)):]:
            if a >= end:
                break
            if a < reach:  # inside an annotation already counted
                continue
            host[name] += (min(b, end) - a) / 1000
            reach = b
        host["(no range)"] = step["wall_ms"] - sum(host.values())
        step["host"] = host


def memory_bound_ms(model: str, sequences: float, context_tokens: float, bandwidth_tbs: float,
                    kv_bytes_token: int) -> dict[str, float]:
    """The least time a decode step can take moving its bytes: every weight (all experts are touched at large
    batches) and the KV cache of `sequences` sequences of `context_tokens` on average, at `bandwidth_tbs`."""
    from deepseek_ocr import DeepseekOCRConfig

    cfg = DeepseekOCRConfig.from_pretrained(model)
    h, moe, dense = cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    expert = 3 * h * moe  # gate, up, down
    attention = 4 * h * h  # q, k, v, o (no MLA; 10 heads of 128 = the hidden size)
    params = (moe_layers * (cfg.n_routed_experts + cfg.n_shared_experts) * expert
              + cfg.first_k_dense_replace * 3 * h * dense + cfg.num_hidden_layers * attention
              + cfg.vocab_size * h)  # lm_head (the embedding table is only gathered from)
    weights = 2 * params  # bfloat16
    kv = kv_bytes_token * sequences * context_tokens
    seconds = (weights + kv) / (bandwidth_tbs * 1e12)
    return {"weights_gb": round(weights / 1e9, 2), "kv_gb": round(kv / 1e9, 2), "bound_ms": round(seconds * 1e3, 3)}


# ------------------------------------------------------------------------------------------ the GPU run


PYSPY_RATE = 250  # samples a second: ~6 a 24 ms decode step


def engine_core_pid() -> int:
    """The pid of this process's vLLM engine core child (its title is VLLM::EngineCore)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCor" in child.name() + " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise RuntimeError("no vLLM engine core among this process's children")


def engine_core_cpu() -> float:
    """CPU seconds so far of this process's vLLM engine core child (its title is VLLM::EngineCore)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "EngineCor" in child.name() + " ".join(child.cmdline()):
                total += sum(child.cpu_times()[:2])
        except psutil.Error:
            continue
    return total


def _window_traces(trace_dir: Path, known: set[Path], timeout_s: float = 180) -> list[Path]:
    """The trace files written under `trace_dir` since `known`, once none has changed for 3 s."""
    deadline = time.monotonic() + timeout_s
    fresh: list[Path] = []
    while time.monotonic() < deadline:
        fresh = sorted((p for p in trace_dir.rglob("*.json*") if p not in known), key=lambda p: p.stat().st_size)
        if fresh and all(time.time() - p.stat().st_mtime > 3 for p in fresh):
            break
        time.sleep(1)
    return fresh


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Raw vLLM `AsyncLLM` with the service's engine settings, every page sent at once (each page's views and
    vLLM's processor in a thread, as the service's renderer does), so the engine holds the full batch within
    seconds. --unprofiled passes (pages/s, the engine core's CPU; the last is the figure), then one profiled
    pass a window (start and end in seconds after the send), each window's trace (the worker's) read back before
    the next pass."""
    import asyncio
    import os
    import shutil

    os.environ.setdefault("VLLM_CUSTOM_SCOPES_FOR_PROFILING", "1")  # vLLM's gpu_model_runner ranges
    import bench_vllm

    from config import Settings
    from engines.vllm.args import kv_bytes_per_token
    from engines.vllm.engine import PromptBuilder

    args.pdf = args.pdf or f"/tmp/bench-{args.pages}.pdf"
    if not Path(args.pdf).is_file():
        Path(args.pdf).write_bytes(bench_vllm.text_pdf(args.pages))
    trace_dir = Path(args.trace_dir).resolve()
    trace_dir.mkdir(parents=True, exist_ok=True)
    images = bench_vllm.rendered_pages(args)
    builder = PromptBuilder.from_checkpoint(args.model)
    params = bench_vllm.page_params(args, builder)
    settings = bench_vllm.settings_for(args)
    profiler = {"profiler": "torch", "torch_profiler_dir": str(trace_dir), "torch_profiler_with_stack": False,
                "torch_profiler_dump_cuda_time_total": False, "ignore_frontend": True}
    from vllm.config import ProfilerConfig

    extra: dict[str, Any] = {"profiler_config": ProfilerConfig(**profiler)}  # the engine args want the class
    if args.async_scheduling == "off":
        extra["async_scheduling"] = False
    # the decode window first: a second start of vLLM's torch profiler in one engine is not something it
    # promises, and the full batch's steps are what the issue asks about
    windows = [(args.decode_window[0], args.decode_window[1], "decode"),
               (args.fill_window[0], args.fill_window[1], "fill")]
    kv_bytes = kv_bytes_per_token(Settings(model_path=args.model, kv_cache_dtype=settings.kv_cache_dtype))

    def window_row(mark: dict[str, Any], trace: Path) -> dict[str, Any]:
        summary = summarize(load_trace(trace))
        row = {**mark, "trace": {"file": trace.name, "mb": round(trace.stat().st_size / 1e6, 1)}, "profile": summary}
        decode = summary.get("decode") or {}
        if mark["window"] == "decode" and decode.get("sequences_median") and decode.get("wall_ms_median"):
            # a page's context over its decoding, averaged: image tokens + half the completion (the window sits
            # mid-run, where a page has written about half of its tokens)
            context = args.image_tokens + args.max_tokens / 2
            bound = memory_bound_ms(args.model, decode["sequences_median"], context, args.bandwidth_tbs, kv_bytes)
            bound["fraction_of_bound_reached"] = round(bound["bound_ms"] / decode["wall_ms_median"], 3)
            row["memory_bound"] = bound
        return row

    async def main() -> dict[str, Any]:
        engine, start_s = bench_vllm.async_engine(args, **extra)
        config = engine.vllm_config
        result: dict[str, Any] = {"engine_start_s": round(start_s, 1), "pages": len(images),
                                  "max_tokens": args.max_tokens, "ngram": list(args.ngram),
                                  "max_num_seqs": config.scheduler_config.max_num_seqs,
                                  "kv_cache_dtype": settings.kv_cache_dtype,
                                  "async_scheduling": config.scheduler_config.async_scheduling,
                                  "encoder": os.environ.get("DEEPSEEK_OCR_ENCODER", "") or "batched+fused",
                                  "windows": []}

        async def one(image: Any, page_params: Any = params) -> int:
            return await bench_vllm.generate_page(engine, builder, image, page_params)

        async def timed_pass() -> tuple[list[int], float]:
            tokens = await asyncio.gather(*(one(image) for image in images))
            return tokens, time.perf_counter()

        async def profile_window(t0: float, begin: float, end: float, name: str) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, t0 + begin - time.perf_counter()))
            began = time.perf_counter() - t0
            await engine.start_profile()
            await asyncio.sleep(max(0.0, t0 + end - time.perf_counter()))
            await engine.stop_profile()
            return {"window": name, "asked_s": [begin, end], "started_s": round(began, 2),
                    "stopped_s": round(time.perf_counter() - t0, 2)}

        async def pyspy_window(t0: float, begin: float, end: float, name: str) -> dict[str, Any]:
            """py-spy on the engine core from `begin` to `end` s after the send, GIL-holding samples only (its
            Python's time, not its waits): where the host time of an unprofiled step goes. A first pass's fill
            window also holds the first-use compilations."""
            await asyncio.sleep(max(0.0, t0 + begin - time.perf_counter()))
            out = f"{args.pyspy}.{name}.txt"
            if shutil.which("py-spy") is None:  # a profile is a bonus: the pass and its figures go on
                return {"window": name, "error": "py-spy is not on PATH"}
            cmd = ["py-spy", "record", "--pid", str(engine_core_pid()), "--gil", "--nonblocking", "--rate",
                   str(PYSPY_RATE), "--duration", str(max(1, round(end - begin))), "--format", "raw", "--output", out]
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.STDOUT)
            code = await proc.wait()
            return {"window": name, "asked_s": [begin, end], "file": out, "rate": PYSPY_RATE, "exit": code}

        try:
            short = bench_vllm.page_params(argparse.Namespace(**{**vars(args), "max_tokens": 16}), builder)
            await asyncio.gather(*(one(image, short) for image in images[:4]))  # warm-up
            # --unprofiled passes; the last is the figure (the first full pass also compiles the large shapes'
            # kernels on first use: 39.1 s against 33.2 for a later pass, docs/BENCHMARKS.md section 27)
            result["unprofiled_passes"] = []
            for n in range(args.unprofiled):
                cpu0, t = engine_core_cpu(), time.perf_counter()
                # py-spy on the first pass, so that the figure's (the last) runs without it
                spy = args.pyspy and n == 0
                spies = [pyspy_window(t, begin, end, name) for begin, end, name in windows] if spy else []
                (tokens, done), *recorded = await asyncio.gather(timed_pass(), *spies)
                elapsed = done - t
                if recorded:
                    result["pyspy"] = recorded
                cpu = engine_core_cpu() - cpu0
                result["unprofiled"] = {"elapsed_s": round(elapsed, 2),
                                        "pages_per_s": round(len(images) / elapsed, 3),
                                        "output_tokens_per_s": round(sum(tokens) / elapsed, 1),
                                        "mean_completion_tokens": round(sum(tokens) / len(tokens), 1),
                                        "engine_core_cpu_per_wall_s": round(cpu / elapsed, 3)}
                result["unprofiled_passes"].append(result["unprofiled"])
                print(json.dumps({"unprofiled": result["unprofiled"]}), flush=True)
            for begin, end, name in windows:  # one profiled pass a window, its trace read before the next
                known = set(trace_dir.rglob("*.json*"))
                t = time.perf_counter()
                _, mark = await asyncio.gather(asyncio.gather(*(one(image) for image in images)),
                                               profile_window(t, begin, end, name))
                mark["pass_elapsed_s"] = round(time.perf_counter() - t, 2)
                traces = await asyncio.to_thread(_window_traces, trace_dir, known)  # the engine core writes it
                if not traces:
                    result["windows"].append({**mark, "error": f"no new trace under {trace_dir}"})
                    continue
                result["windows"].append(window_row(mark, traces[-1]))  # the worker's: the largest
                print(json.dumps({k: v for k, v in result["windows"][-1].items() if k != "profile"}), flush=True)
        finally:
            engine.shutdown()
        return result

    return asyncio.run(main())


def _print_profile(profile: dict[str, Any]) -> None:
    for kind in ("decode", "prefill"):
        row = profile.get(kind)
        if not row or not row["steps"]:
            continue
        print(f"\n{kind}: {row['steps']} steps, median {row['sequences_median']} sequences, wall "
              f"{row['wall_ms_median']} ms, CPU span {row['cpu_span_ms_median']} ms, GPU busy "
              f"{row['gpu_busy_ms_median']} ms ({row['gpu_busy_fraction']} of the steps' wall time)")
        for name, ms in sorted(row["kernel_ms_by_class_median"].items(), key=lambda kv: -kv[1]):
            print(f"  class {name:24} {ms:9.3f} ms")
        for name, ms in sorted(row["kernel_ms_by_range_median"].items(), key=lambda kv: -kv[1]):
            print(f"  range {name:24} {ms:9.3f} ms")
        for name, ms in sorted((row.get("host_ms_by_range_median") or {}).items(), key=lambda kv: -kv[1]):
            print(f"  host  {name:45} {ms:9.3f} ms")


def print_summary(result: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in result.items() if k not in ("profile", "windows")}), flush=True)
    if "profile" in result:  # --summarize
        _print_profile(result["profile"])
    for window in result.get("windows", []):
        print(f"\n=== window {json.dumps({k: v for k, v in window.items() if k != 'profile'})}")
        _print_profile(window.get("profile") or {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the checkpoint's directory (needed unless --summarize)")
    parser.add_argument("--pages", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=256, help="MAX_CONCURRENCY = vLLM max_num_seqs")
    parser.add_argument("--ngram", type=int, nargs=2, default=(20, 50), metavar=("SIZE", "WINDOW"))
    parser.add_argument("--ngram-impl", default="batched", choices=["batched", "vllm", "off"])
    parser.add_argument("--dpi", type=int, default=144)
    parser.add_argument("--gpu-mem", type=float, default=0.75)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--pdf", help="the PDF; written when missing (default /tmp/bench-N.pdf)")
    parser.add_argument("--fill-window", type=float, nargs=2, default=(0.0, 3.0), metavar=("FROM", "TO"),
                        help="seconds after the send: the first profiled window (the batch filling: prefills)")
    parser.add_argument("--decode-window", type=float, nargs=2, default=(12.0, 13.5), metavar=("FROM", "TO"),
                        help="seconds after the send: the second window (the full batch decoding)")
    parser.add_argument("--image-tokens", type=int, default=903, help="a page's image tokens (A4 in Gundam)")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="GPU memory bandwidth, TB/s")
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "off"],
                        help="auto: vLLM's choice (on in 0.26 for this engine); off: async_scheduling=False")
    parser.add_argument("--trace-dir", default="/tmp/step-trace")
    parser.add_argument("--unprofiled", type=int, default=2, choices=range(1, 6), metavar="N",
                        help="unprofiled passes before the profiled ones; the last one's pages/s is the figure")
    parser.add_argument("--pyspy", metavar="PREFIX", help="py-spy the engine core (GIL samples) in both windows "
                        "of the first unprofiled pass: PREFIX.decode.txt, PREFIX.fill.txt (profile_summary.py)")
    parser.add_argument("--summarize", help="only summarise this trace file (no GPU)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if not args.model and not args.summarize:
        parser.error("--model is required (or --summarize TRACE)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    result = {"profile": summarize(load_trace(Path(args.summarize)))} if args.summarize else run(args)
    print_summary(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    profiles = [result.get("profile") or {}] if args.summarize else result.get("windows") or [{"error": "none"}]
    return 0 if not any("error" in p or "error" in (p.get("profile") or {}) for p in profiles) else 1


if __name__ == "__main__":
    sys.exit(main())
