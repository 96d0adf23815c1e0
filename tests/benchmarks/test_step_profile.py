"""benchmarks/step_profile.py's trace summary (the GPU run itself is on the GPU machine: `gpu_run.sh steps`).

The trace is Chrome JSON as PyTorch's profiler writes it for a vLLM worker: step annotations
(`execute_context_C(T)_generation_G(T)`), vLLM's `gpu_model_runner: *` ranges, kernel launches with their
correlation ids, and the kernels (a CUDA graph's kernels share their graph launch's id). Built by hand here so
that every figure the summary prints has a known answer.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import step_profile  # noqa: E402


def x(cat: str, name: str, ts: float, dur: float, **args: object) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1, "args": args}


def trace() -> dict:
    """Three steps at t = 1,000 / 2,000 / 3,500 us (the third only closes the second): a prefill step, then a
    decode step whose four kernels come from one graph launch and one plain launch."""
    events = [
        x("user_annotation", "execute_context_2(1806)_generation_254(254)", 1000, 600),
        x("user_annotation", "gpu_model_runner: preprocess", 1010, 200),
        x("cuda_runtime", "cudaLaunchKernel", 1020, 5, correlation=1),  # the vision encoder's GEMM
        x("user_annotation", "gpu_model_runner: forward", 1300, 200),
        x("cuda_driver", "cuLaunchKernel", 1310, 5, correlation=2),
        x("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32", 1100, 300, correlation=1),
        x("kernel", "fused_moe_kernel", 1450, 400, correlation=2),
        x("user_annotation", "execute_context_0(0)_generation_256(256)", 2000, 300),
        x("user_annotation", "gpu_model_runner: forward", 2010, 100),
        x("cuda_runtime", "cudaGraphLaunch", 2020, 10, correlation=3),
        x("user_annotation", "gpu_model_runner: sample", 2200, 50),
        x("cuda_runtime", "cudaLaunchKernel", 2210, 5, correlation=4),
        # The graph's kernels: attention and MoE overlap by 100 us (two streams), then an RMS norm.
        x("kernel", "flash_fwd_splitkv_kernel", 2100, 300, correlation=3),
        x("kernel", "fused_moe_kernel", 2300, 500, correlation=3),
        x("kernel", "rms_norm_kernel", 2800, 100, correlation=3),
        x("kernel", "scatter_reduce_kernel", 2950, 50, correlation=4),  # the n-gram guard's bans: copy class
        x("user_annotation", "execute_context_0(0)_generation_256(256)", 3500, 300),
        x("kernel", "orphan_kernel", 3000, 10, correlation=99),  # no launch in the trace
        x("cuda_runtime", "cudaLaunchKernel", 500, 5, correlation=5),  # before the first step: left out
        x("kernel", "early_kernel", 600, 10, correlation=5),
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 2500},  # not a span
    ]
    return {"traceEvents": events}


def test_steps_are_split_by_kind_with_wall_cpu_and_gpu_busy() -> None:
    out = step_profile.summarize(trace())
    assert (out["steps"], out["kernels_unattributed"]) == (2, 1), out
    prefill, decode = out["prefill"], out["decode"]
    assert (prefill["steps"], prefill["sequences_median"], prefill["context_tokens_median"]) == (1, 254, 1806)
    assert (prefill["wall_ms_median"], prefill["cpu_span_ms_median"]) == (1.0, 0.6)
    assert prefill["gpu_busy_ms_median"] == 0.7  # 1,100-1,400 and 1,450-1,850
    assert decode["steps"] == 1 and decode["sequences_median"] == 256
    assert (decode["wall_ms_median"], decode["cpu_span_ms_median"]) == (1.5, 0.3)
    assert decode["gpu_busy_ms_median"] == 0.85  # 2,100-2,900 (overlaps counted once) and 2,950-3,000
    assert decode["gpu_busy_fraction"] == 0.567


def test_kernel_time_by_class_and_by_vllm_range() -> None:
    out = step_profile.summarize(trace())
    assert out["prefill"]["kernel_ms_by_class_median"] == {"gemm": 0.3, "moe": 0.4}
    assert out["prefill"]["kernel_ms_by_range_median"] == {"preprocess": 0.3, "forward": 0.4}
    assert out["decode"]["kernel_ms_by_class_median"] == {"attention": 0.3, "moe": 0.5, "norm_act_rope": 0.1,
                                                          "copy": 0.05}
    assert out["decode"]["kernel_ms_by_range_median"] == {"forward": 0.9, "sample": 0.05}


def test_host_time_by_range_on_the_steps_thread() -> None:
    """The prefill step's 1,000 us: preprocess 200 and forward 200 (inside the step annotation), the rest no
    range. The decode step's 1,500 us: forward 100, sample 50, then the scheduler's `allocate_slots` twice (300
    in all; the nested `allocate` inside it not counted again), a range on another thread ignored, and one that
    runs past the next step's start cut there."""
    events = trace()["traceEvents"] + [
        x("user_annotation", "schedule: allocate_slots", 2400, 200),
        x("user_annotation", "schedule: allocate", 2450, 50),  # nested: part of the one above
        x("user_annotation", "schedule: allocate_slots", 2700, 100),
        {**x("user_annotation", "gpu_model_runner: preprocess", 2900, 100), "tid": 2},  # another thread
        x("user_annotation", "schedule: update_from_output", 3400, 300),  # 100 us before the next step
    ]
    out = step_profile.summarize({"traceEvents": events})
    assert out["prefill"]["host_ms_by_range_median"] == {"(no range)": 0.6, "gpu_model_runner: forward": 0.2,
                                                         "gpu_model_runner: preprocess": 0.2}
    assert out["decode"]["host_ms_by_range_median"] == {
        "(no range)": 0.95, "gpu_model_runner: forward": 0.1, "gpu_model_runner: sample": 0.05,
        "schedule: allocate_slots": 0.3, "schedule: update_from_output": 0.1}


def test_the_command_summarizes_a_trace_file_without_a_model(tmp_path: Path) -> None:
    """`step_profile.py --summarize TRACE` reads a gzipped trace on a machine without the checkpoint and prints
    the host rows too; with neither --model nor --summarize it is a usage error."""
    import gzip
    import json
    import subprocess

    path = tmp_path / "rank0.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace(), f)
    script = str(BENCHMARKS / "step_profile.py")
    done = subprocess.run([sys.executable, script, "--summarize", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "decode: 1 steps, median 256 sequences, wall 1.5 ms" in done.stdout, done.stdout
    assert "host  gpu_model_runner: forward" in done.stdout, done.stdout
    bare = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "--model is required" in bare.stderr, bare.stderr


def test_a_trace_without_steps_says_so() -> None:
    assert "error" in step_profile.summarize({"traceEvents": [x("kernel", "k", 0, 1, correlation=1)]})


def test_union_counts_overlaps_once() -> None:
    assert step_profile.union_us([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert step_profile.union_us([]) == 0


def test_a_window_reads_only_the_traces_written_since_its_start(tmp_path: Path) -> None:
    import os
    import time

    old = tmp_path / "old.pt.trace.json.gz"
    old.write_bytes(b"x")
    known = {old}
    new = tmp_path / "sub" / "new.pt.trace.json.gz"
    new.parent.mkdir()
    new.write_bytes(b"yy")
    stale = time.time() - 10  # written 10 s ago: no longer growing
    os.utime(new, (stale, stale))
    assert step_profile._window_traces(tmp_path, known, timeout_s=5) == [new]
    assert step_profile._window_traces(tmp_path, known | {new}, timeout_s=0) == []
