"""GPU check (not a test): vLLM 0.26.0 serving a DeepSeek-OCR-2 checkpoint written by `make-tiny --arch ocr2`
(real vision sizes, 2-layer real-width decoder, real random weights) against our PyTorch model.

For each image: vLLM generates 64 greedy tokens; our model is teacher-forced on the same prompt and tokens and
its top-1 at every step is compared; prompt ids (vLLM's expanded prompt vs ours) must be identical.
Run on the GPU machine with the kit installed: python3 tests/data/vllm_ocr2_agreement.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepseek_ocr as dso  # noqa: E402

SIZES = [(1190, 1684), (600, 400), (768, 768), (769, 768), (2000, 700), (300, 3000)]
PROMPT = "<image>\nFree OCR."
STEPS = 64


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


@torch.inference_mode()
def _teacher_forced_top1(ocr: dso.DeepseekOCR, req: dso.GenerationRequest, tokens: list[int]) -> list[int]:
    model, cfg = ocr.model, ocr.model.config
    x = ocr._prompt_embeddings(req)[None]  # (1, P, H)
    n = x.shape[1]
    cache = dso.KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, n + 8, ocr.dtype, ocr.device)
    logits = model.decode(x, torch.arange(n, device=ocr.device)[None], cache, None)
    top = [int(logits.argmax(-1))]
    for i, t in enumerate(tokens[:-1]):
        emb = model.model.embed_tokens(torch.tensor([[t]], device=ocr.device))
        mask = torch.ones(1, 1, 1, cache.length + 1, dtype=torch.bool, device=ocr.device)
        logits = model.decode(emb, torch.tensor([[n + i]], device=ocr.device), cache, mask)
        top.append(int(logits.argmax(-1)))
    return top


def main(out_dir: str) -> int:
    out = Path(out_dir)
    ckpt = dso.make_tiny(Path("/tmp/ocr2-small"), seed=0, vision="real", decoder="small", arch="ocr2")
    from engines.vllm.args import prepare_environment

    prepare_environment()  # the service's plugin: vLLM's OCR-2 with our encoder mask (engines/vllm/ocr2_encoder.py)
    from vllm import LLM, SamplingParams

    started = time.time()
    llm = LLM(
        model=str(ckpt),
        dtype="float32",
        enforce_eager=True,
        max_model_len=8192,
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        limit_mm_per_prompt={"image": 1},
        gpu_memory_utilization=0.5,
    )
    print(f"vLLM ready in {time.time() - started:.0f}s", flush=True)
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, skip_special_tokens=False)
    outs = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images], params)
    del llm
    torch.cuda.empty_cache()
    ocr = dso.DeepseekOCR.from_pretrained(ckpt, device="cuda", dtype="float32")
    report, agree, total = [], 0, 0
    for (w, h), im, o in zip(SIZES, images, outs, strict=True):
        req = ocr.prepare(PROMPT, im)
        tokens = list(o.outputs[0].token_ids)
        top = _teacher_forced_top1(ocr, req, tokens)
        same = sum(a == b for a, b in zip(top, tokens, strict=True))
        agree, total = agree + same, total + len(tokens)
        row = {
            "size": [w, h],
            "image_tokens": req.image_tokens,
            "prompt_ids_identical": list(o.prompt_token_ids) == req.input_ids,
            "vllm_prompt_len": len(o.prompt_token_ids),
            "our_prompt_len": len(req.input_ids),
            "top1_agree": f"{same}/{len(tokens)}",
        }
        report.append(row)
        print(json.dumps(row), flush=True)
    summary = {"agreement": agree / total, "rows": report}
    (out / "ocr2_agreement.json").write_text(json.dumps(summary, indent=2))
    print(f"top-1 agreement {agree}/{total} = {agree / total:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp"))
