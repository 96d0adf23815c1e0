"""Tune vLLM's fused-MoE Triton kernel for DeepSeek-OCR's expert shape on the GPU this runs on.

vLLM logs "Using default MoE config ... E=64,N=896,device_name=NVIDIA_H200.json not found" for this model's
decoder (64 routed experts, hidden 1280, 896 per expert, 6 experts a token): vllm 0.26 ships no table for
that shape, so every step runs with its generic tile sizes. For each batch size (tokens in one step), this
times vLLM's own `fused_experts` under each candidate tile configuration (vLLM's `override_config`), ten
calls captured in one CUDA graph, and keeps the fastest; a configuration that does not fit the GPU (Triton's
OutOfResources) is skipped. The table goes where `VLLM_TUNED_CONFIG_FOLDER` points vLLM, under the file
name vLLM looks for (`get_config_file_name`), in vLLM's format: {"<tokens>": {"BLOCK_SIZE_M": ..., ...}}.
It also prints each batch size's time with vLLM's default configuration beside the tuned one.

    python benchmarks/tune_moe.py --model /tmp/dsocr-ckpt/real --out /tmp/moe-configs [--budget-s 480]

The service points vLLM at `engines/moe_configs/` (`engines.vllm.args.prepare_environment`) when a table
for the GPU is there; docs/BENCHMARKS.md says whether one is shipped and what it changed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

# Tokens in one step: decode batches (up to max_num_seqs 256, and 512 for two-token steps), chunked prefill
# up to max_num_batched_tokens (16,384 on an H100/H200). Tuned in this order, the sizes the service's steps
# have most first (decode near 256 sequences, full prefill chunks), so that a budget cut leaves the small
# ones: vLLM takes the nearest size in the table, and tiny batches are rare (warm-up, the tail of a wave).
BATCH_SIZES = (256, 16384, 512, 128, 192, 384, 64, 1024, 2048, 4096, 8192, 96, 48, 32, 24, 16, 8, 4, 2, 1)


def search_space() -> list[dict[str, int]]:
    """Tile shapes, grouping, warps and pipeline depth to try: 96 for bf16 on a Hopper GPU. Each is one
    Triton compile (about a second), so the space is kept to what vLLM's own H100/H200 tables pick from."""
    space = []
    for block_m, block_n, block_k, group_m, (warps, stages) in itertools.product(
        (16, 32, 64, 128), (64, 128), (64, 128), (1, 16), ((4, 3), (4, 4), (8, 3))
    ):
        space.append({"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n, "BLOCK_SIZE_K": block_k,
                      "GROUP_SIZE_M": group_m, "num_warps": warps, "num_stages": stages})
    return space


def moe_shape(model: str) -> dict[str, int]:
    """Experts, hidden size, per-expert intermediate size and experts a token, from the checkpoint."""
    config = json.loads((Path(model) / "config.json").read_text())
    lang = config.get("language_config") or config
    return {"experts": int(lang["n_routed_experts"]), "hidden": int(lang["hidden_size"]),
            "intermediate": int(lang["moe_intermediate_size"]), "topk": int(lang["num_experts_per_tok"])}


class Bench:
    """Inputs for one batch size, and the time of ten `fused_experts` calls under a configuration."""

    def __init__(self, shape: dict[str, int], tokens: int, seed: int = 0) -> None:
        import torch

        gen = torch.Generator(device="cuda").manual_seed(seed)
        e, k, n, topk = shape["experts"], shape["hidden"], shape["intermediate"], shape["topk"]
        self.x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        self.w1 = torch.randn(e, 2 * n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k**0.5
        self.w2 = torch.randn(e, k, n, device="cuda", dtype=torch.bfloat16, generator=gen) / n**0.5
        logits = torch.randn(tokens, e, device="cuda", dtype=torch.float32, generator=gen)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), topk, dim=-1)
        self.topk_weights, self.topk_ids = weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)

    def call(self) -> Any:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

        return fused_experts(self.x, self.w1, self.w2, self.topk_weights, self.topk_ids)

    def time_us(self, config: dict[str, int] | None) -> float:
        """Microseconds a call, under `config` (None: vLLM's own choice), from CUDA-graph replays: as many as
        take about 20 ms (3 to 50), so that the largest batches do not eat the budget."""
        import torch
        from vllm.model_executor.layers.fused_moe import override_config

        with override_config(config):
            self.call()  # compiles this configuration
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(10):
                    self.call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replays = max(3, min(50, int(20.0 / max(start.elapsed_time(end), 1e-3))))
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        del graph
        return start.elapsed_time(end) * 1000 / (replays * 10)


def worth_trying(config: dict[str, int], tokens: int, shape: dict[str, int]) -> bool:
    """Whether a configuration can win at `tokens` a step. Each one tried costs Triton compiles (about a
    second each), so two kinds are left out: an M tile over four times the tokens an expert gets on average
    (padding only), and grouping (GROUP_SIZE_M > 1), which lets M-blocks of one expert share weight tiles in
    L2, where an expert gets under two M-blocks of tokens."""
    per_expert = -(-tokens * shape["topk"] // shape["experts"])  # ceil
    block_m = config["BLOCK_SIZE_M"]
    if block_m > 16 and block_m > 4 * per_expert:
        return False
    return config["GROUP_SIZE_M"] == 1 or per_expert >= 2 * block_m


def default_config(shape: dict[str, int], tokens: int) -> dict[str, int]:
    """vLLM's own tile configuration for `tokens` in a step (what it runs without a table)."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config

    return dict(get_default_config(tokens, shape["experts"], shape["intermediate"], shape["hidden"],
                                   shape["topk"], None))


def tune(shape: dict[str, int], sizes: list[int], budget_s: float,
         save: Any = None) -> tuple[dict[str, dict[str, int]], list[dict]]:
    """The fastest configuration for each batch size, and a row of figures for each; stops early (keeping
    the sizes done) when the time budget runs out. `save(table, rows)` after each size: a call cut off
    from outside keeps the sizes it finished."""
    import triton

    started = time.monotonic()
    table: dict[str, dict[str, int]] = {}
    rows = []
    space = search_space()
    for tokens in sizes:
        bench = Bench(shape, tokens)
        default_us = bench.time_us(None)
        best, best_us, tried = None, float("inf"), 0
        for config in space:
            if not worth_trying(config, tokens, shape):
                continue
            if time.monotonic() - started > budget_s:
                break
            try:
                us = bench.time_us(config)
            except (triton.runtime.errors.OutOfResources, RuntimeError):
                continue  # does not fit this GPU's shared memory or registers
            tried += 1
            if us < best_us:
                best, best_us = config, us
        if best is None:
            print(f"tokens {tokens}: out of time before any configuration ran", flush=True)
            break
        kept = "tuned"
        if default_us <= best_us:  # none tried beat vLLM's own choice (or the budget cut the search short)
            best, best_us, kept = default_config(shape, tokens), default_us, "default"
        table[str(tokens)] = best
        rows.append({"tokens": tokens, "default_us": round(default_us, 2), "tuned_us": round(best_us, 2),
                     "speedup": round(default_us / best_us, 3), "configs_tried": tried, "kept": kept,
                     "config": best})
        print(json.dumps(rows[-1]), flush=True)
        if save is not None:
            save(table, rows)
        if time.monotonic() - started > budget_s:
            print(f"time budget of {budget_s:g} s spent after {tokens} tokens", flush=True)
            break
    return table, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a DeepSeek-OCR checkpoint folder (config.json is read)")
    parser.add_argument("--out", required=True, help="folder for the table (VLLM_TUNED_CONFIG_FOLDER)")
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=list(BATCH_SIZES))
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop tuning after this long")
    args = parser.parse_args()

    import torch
    import triton
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    shape = moe_shape(args.model)
    name = get_config_file_name(shape["experts"], shape["intermediate"], None)
    print(f"{torch.cuda.get_device_name()}: {shape}; {len(search_space())} configurations; -> {name}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(table: dict[str, dict[str, int]], rows: list[dict]) -> None:
        by_size = dict(sorted(table.items(), key=lambda item: int(item[0])))
        (out / name).write_text(json.dumps({**by_size, "triton_version": triton.__version__}, indent=1) + "\n")
        (out / "tune_moe_rows.json").write_text(json.dumps({"shape": shape, "rows": rows}, indent=1) + "\n")

    table, rows = tune(shape, args.sizes, args.budget_s, save)
    if not table:
        return 1
    print(f"wrote {out / name}: {len(table)} batch sizes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
