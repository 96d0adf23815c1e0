"""vLLM's SAM-B on one engine step's worth of A4 pages, three ways (issue 30; no engine).

An engine step that prefills --pages A4 pages in Gundam hands the encoder, per page, one 1024 px global view
and six 640 px tiles. This times vLLM 0.26's own SAM-B (`deepencoder.build_sam_vit_b`, random weights, real
sizes) on them:

- `vllm`: as vLLM's DeepSeek-OCR runs it, image after image (the global view, then the page's tiles), with
  vLLM's `RelPosAttention` (an explicit (tokens x tokens) bias);
- `batched`: all global views in one call and all tiles in another (`engines.vllm.encoder_batch`'s calls,
  at most `views_per_call` views each), vLLM's attention;
- `fused`: the same batches with `engines.vllm.sam_attention`'s attention (no bias tensor).

It prints the milliseconds for the step's pages (median of --repeat) and the largest difference of each way's
features from `vllm`'s. SAM is where both changes act; CLIP and the projector only gain the batching.

    python benchmarks/bench_sam.py --pages 17 --repeat 5 --out sam.json

Needs vLLM importable (the GPU kit).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=17, help="A4 pages in the step (16,384 tokens: ~17)")
    parser.add_argument("--base", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=640)
    parser.add_argument("--tiles", type=int, default=6, help="tiles a page (A4 in Gundam: 2 x 3)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    import torch
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.models import deepencoder

    from engines.vllm import encoder_batch, sam_attention

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    op_registry_oot.pop(sam_attention.LAYER_NAME, None)
    torch.manual_seed(0)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device=device.type))):
        stock = deepencoder.build_sam_vit_b().to(device, dtype).eval()
        op_registry_oot[sam_attention.LAYER_NAME] = sam_attention.fused_class()
        fused = deepencoder.build_sam_vit_b().to(device, dtype).eval()
        op_registry_oot.pop(sam_attention.LAYER_NAME)
    with torch.no_grad():  # vLLM builds its layers with uninitialised memory: random weights, norms at 1
        for name, param in stock.named_parameters():
            param.copy_(torch.ones_like(param) if "norm" in name and name.endswith("weight")
                        else torch.randn_like(param) * 0.02)
    fused.load_state_dict(stock.state_dict())
    globals_ = torch.randn(args.pages, 3, args.base, args.base, device=device, dtype=dtype)
    tiles = torch.randn(args.pages * args.tiles, 3, args.tile, args.tile, device=device, dtype=dtype)

    def per_image() -> list[torch.Tensor]:
        out = []
        for i in range(args.pages):
            out.append(stock(globals_[i:i + 1]))
            out.append(stock(tiles[i * args.tiles:(i + 1) * args.tiles]))
        return [torch.cat(out[0::2]), torch.cat(out[1::2])]

    def batched(model: Any) -> list[torch.Tensor]:
        return [encoder_batch.project_views(model, globals_), encoder_batch.project_views(model, tiles)]

    ways = {"vllm": per_image, "batched": lambda: batched(stock), "fused": lambda: batched(fused)}
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "dtype": args.dtype, "pages": args.pages, "views": [args.base, args.tile, args.tiles],
                              "repeat": args.repeat, "ms": {}, "max_abs_diff_vs_vllm": {}}
    with torch.no_grad():
        reference = per_image()  # also the warm-up of the loop
        for name, fn in ways.items():
            features = fn()  # warm-up (kernel selection) and the features to compare
            result["max_abs_diff_vs_vllm"][name] = max(float((a.float() - b.float()).abs().max())
                                                       for a, b in zip(features, reference, strict=True))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(args.repeat):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times.append((time.perf_counter() - t) * 1e3)
            result["ms"][name] = round(statistics.median(times), 2)
            if device.type == "cuda":
                result.setdefault("peak_gib", {})[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            print(json.dumps({"way": name, "ms_for_the_pages": result["ms"][name],
                              "ms_a_page": round(result["ms"][name] / args.pages, 2),
                              "max_abs_diff_vs_vllm": result["max_abs_diff_vs_vllm"][name],
                              "peak_gib": result.get("peak_gib", {}).get(name)}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
