"""DeepSeek-OCR-2's vision encoder a page, with vLLM's own attention-mask loop against ours (issue 30).

vLLM 0.26's DeepEncoder V2 stage (`CustomQwen2Decoder`, 24 Qwen2 layers over [SAM tokens, queries]) builds its
mask with a Python loop over the queries; `engines/vllm/ocr2_encoder.py` builds it in tensor ops. This times,
for the views of one A4 page in Gundam (six 768 px tiles: 144 queries each; the 1024 px global view: 256),
the mask alone and the whole Qwen2 stage, both ways, on the real sizes with random weights, and checks that
both give the same features. No engine: vLLM's layer class is built directly.

    python benchmarks/bench_ocr2_mask.py --device cuda --dtype bfloat16 --repeat 10 --out ocr2-mask.json

Needs vLLM importable (the GPU kit); on a CPU the loop has no GPU waits, so only the GPU figures matter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# An A4 page in Gundam for OCR-2: (views, SAM tokens a view) for the tiles and the global view.
PAGE = ((6, 144), (1, 256))


def timed(fn: Any, sync: Any, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    import torch
    from vllm.model_executor.models import deepencoder2

    from engines.vllm import ocr2_encoder

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    stock = deepencoder2.build_qwen2_decoder_as_encoder().to(device, dtype).eval()
    fast_cls = ocr2_encoder.register()
    if fast_cls is None:
        raise SystemExit("engines.vllm.ocr2_encoder.register() replaced nothing (DEEPSEEK_OCR_OCR2_MASK=vllm?)")
    ours = deepencoder2.build_qwen2_decoder_as_encoder().to(device, dtype).eval()
    ours.load_state_dict(stock.state_dict())
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "dtype": args.dtype, "repeat": args.repeat, "views": {}}
    page_ms = {"vllm_loop": 0.0, "tensor_ops": 0.0}
    for count, tokens in PAGE:
        side = int(tokens ** 0.5)
        x = torch.randn(count, 896, side, side, device=device, dtype=dtype)
        types = torch.cat([torch.zeros(count, tokens, dtype=torch.long),
                           torch.ones(count, tokens, dtype=torch.long)], 1)
        inner_stock, inner_ours = stock.model.model, ours.model.model
        mask_kw = {"sequence_length": 2 * tokens, "dtype": dtype, "device": device, "batch_size": count,
                   "token_type_ids": types}
        with torch.no_grad():
            same_mask = torch.equal(inner_stock._create_custom_4d_mask(**mask_kw),
                                    inner_ours._create_custom_4d_mask(**mask_kw))
            a, b = stock(x), ours(x)  # also the warm-up
            diff = (a.float() - b.float()).abs().max().item()
            row: dict[str, Any] = {"views": count, "queries": tokens, "masks_equal": same_mask,
                                   "features_max_abs_diff": diff}
            for name, model, inner in (("vllm_loop", stock, inner_stock), ("tensor_ops", ours, inner_ours)):
                mask = timed(lambda inner=inner, kw=mask_kw: inner._create_custom_4d_mask(**kw), sync, args.repeat)
                stage = timed(lambda model=model, x=x: model(x), sync, args.repeat)
                row[name] = {"mask_ms": round(statistics.median(mask), 3),
                             "stage_ms": round(statistics.median(stage), 3)}
                page_ms[name] += row[name]["stage_ms"]
        result["views"][f"{count}x{tokens}"] = row
        print(json.dumps(row), flush=True)
    result["page_stage_ms"] = {k: round(v, 3) for k, v in page_ms.items()}
    print(json.dumps({"page_stage_ms": result["page_stage_ms"]}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
