"""GPU helper for tests/engines/test_gpu_ngram.py: one vLLM engine, greedy requests with mixed n-gram settings.

    python tests/data/vllm_ngram_audit.py --model DIR --impl audit|vllm|batched --out FILE.json

--impl audit registers `AuditNGram`: our batched processor, whose bans are the ones applied, checked at every
step against vLLM's own `NGramPerReqLogitsProcessor` run on a copy of the same logits (same batch updates,
same live output lists); its counts go to $NGRAM_AUDIT_OUT after every step. --impl vllm / batched register
that processor alone (engine_kwargs ngram_impl). FILE gets the requests' settings and output token ids.
The engine core is a spawned process: it imports this module by the name `vllm_ngram_audit`, so its folder
must be on PYTHONPATH (the test sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engines.vllm.ngram import NGramBatchProcessor  # noqa: E402

# (ngram_size, window_size or None = vLLM's default 100, whitelist?, max_tokens); None settings = guard off.
REQUESTS: list[tuple[int, int | None, bool, int] | None] = [
    (20, 50, True, 300), (2, 10, True, 200), (3, 30, False, 250), (2, None, False, 120), None,
    (5, 100, True, 400), (4, 4, False, 90), (2, 1000, True, 350), (1, 50, False, 60), (6, 12, True, 220),
    None, (3, 8, True, 150), (2, 3, False, 300), (20, 50, True, 180), (7, 200, False, 260), (2, 40, True, 330),
]


class AuditNGram(NGramBatchProcessor):
    """Applies the batched bans and counts every step where vLLM's per-request processor would differ."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor

        super().__init__(vllm_config, device, is_pin_memory)
        # Up to 4 guarded rows on the host, 5 to 8 (max_num_seqs) on the device: both paths, and the device
        # history's catch-up each time the batch grows past 4, are audited on the GPU.
        self.host_rows = 4
        self.reference = NGramPerReqLogitsProcessor(vllm_config, device, is_pin_memory)
        self.path = os.environ.get("NGRAM_AUDIT_OUT")
        self.stats: dict[str, Any] = {"steps": 0, "host_steps": 0, "row_checks": 0, "bans": 0,
                                      "mismatched_rows": 0, "first_mismatches": []}

    def _apply_on_host(self, *args: Any) -> torch.Tensor:
        self.stats["host_steps"] += 1
        return super()._apply_on_host(*args)

    def update_state(self, batch_update: Any) -> None:
        super().update_state(batch_update)
        self.reference.update_state(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        before = torch.isinf(logits)
        want = torch.isinf(self.reference.apply(logits.clone())) & ~before
        logits = super().apply(logits)
        got = torch.isinf(logits) & ~before
        differ = (got != want).any(dim=1).nonzero().flatten().tolist()
        s = self.stats
        s["steps"] += 1
        s["row_checks"] += len(self.reference.req_info)
        s["bans"] += int(want.sum())
        s["mismatched_rows"] += len(differ)
        for row in differ[: max(0, 5 - len(s["first_mismatches"]))]:
            s["first_mismatches"].append({
                "step": s["steps"], "row": row,
                "ours": got[row].nonzero().flatten().tolist(), "vllm": want[row].nonzero().flatten().tolist(),
            })
        if self.path:
            Path(self.path).write_text(json.dumps(s))
        return logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--impl", choices=["audit", "vllm", "batched"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from config import Settings
    from engines.vllm.args import engine_kwargs, prepare_environment
    from engines.vllm.engine import PromptBuilder, vllm_image

    prepare_environment()
    from PIL import Image
    from vllm import LLM, SamplingParams

    settings = Settings(model_path=args.model, engine="vllm", load_format="dummy", max_concurrency=8,
                        gpu_mem_utilization=0.5, max_model_len=4096)
    extra: dict[str, Any] = {}
    if args.impl == "audit":
        extra["logits_processors"] = ["vllm_ngram_audit:AuditNGram"]
    started = time.time()
    llm = LLM(**engine_kwargs(settings, ngram_impl="vllm" if args.impl == "vllm" else "batched", **extra))
    print(f"vLLM ({args.impl}) ready in {time.time() - started:.0f}s", flush=True)
    builder = PromptBuilder.from_checkpoint(args.model)
    from config import MODES

    gundam = MODES["gundam"]
    prompts, params = [], []
    for i, spec in enumerate(REQUESTS):
        image = Image.new("RGB", (640 + 37 * i, 480 + 53 * i), (255 - 9 * i, 250, 240)) if i % 3 else None
        image = vllm_image(image, gundam) if image is not None else None
        prompts.append(builder.prompt("<image>\nFree OCR." if image else f"Write line {i} of a report.",
                                      image, gundam))
        extra_args = None
        max_tokens = 200
        if spec is not None:
            size, window, whitelist, max_tokens = spec
            extra_args = {"ngram_size": size}
            if window is not None:
                extra_args["window_size"] = window
            if whitelist:
                extra_args["whitelist_token_ids"] = list(builder.whitelist)
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra_args,
                                     skip_special_tokens=False))
    # More requests than max_num_seqs (8): rows are refilled, condensed and moved as requests finish.
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {"impl": args.impl, "whitelist": list(builder.whitelist),
              "requests": [p.extra_args for p in params],
              "outputs": [list(o.outputs[0].token_ids) for o in outs]}
    Path(args.out).write_text(json.dumps(result))
    print(f"{len(outs)} requests, {sum(map(len, result['outputs']))} tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
