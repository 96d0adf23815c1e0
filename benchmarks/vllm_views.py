"""Pre-flight for per-request modes on vLLM: its DeepSeek-OCR processor vs our preprocessing, every mode.

No engine and no GPU: for each mode and image size, vLLM's `DeepseekOCRProcessor` is built the way vLLM
builds it for a request (`cached_get_processor_without_dynamic_kwargs` with the request's
`mm_processor_kwargs`, the kwargs filtered as `call_hf_processor` filters them) and run on `vllm_image(image)`.
Checked: the processor got the mode's sizes (a transformers version could drop them), its token count equals
the plugin's (`engines.vllm.modes.count_placeholders` with vLLM's grid), ours and DEEPSEEK_OCR_FACTS; its
global view and tiles equal `process.image_process.preprocess` bit for bit. Needs vllm importable (and
torchvision, which vLLM's processor imports). Exit status 1 on any mismatch.

    python benchmarks/vllm_views.py --ckpt DIR     # DIR: any checkpoint with our tokenizer files
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = [(600, 500), (640, 640), (641, 640), (1190, 1684), (1684, 1190), (8000, 300), (300, 2000),
         (1024, 1024), (1200, 800), (100, 3000), (2000, 2000)]


def page(size: tuple[int, int], seed: int):  # noqa: ANN201 - PIL image
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for y in range(5, size[1], 13):
        draw.text((rng.randrange(0, 30), y), "total 12.50 EUR table figure " * 4, fill=(rng.randrange(0, 90),) * 3)
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint dir with tokenizer files")
    args = parser.parse_args()

    import torch
    from vllm.transformers_utils.processor import cached_get_processor_without_dynamic_kwargs
    from vllm.transformers_utils.processors.deepseek_ocr import (
        MAX_CROPS,
        MIN_CROPS,
        DeepseekOCRProcessor,
        count_tiles,
    )
    from vllm.utils.func_utils import get_allowed_kwarg_only_overrides

    from engines.vllm.engine import vllm_image
    from engines.vllm.modes import ViewSizes, count_placeholders, mode_kwargs
    from process.image_process import MODES, count_image_tokens, preprocess

    def grid(w: int, h: int, s: int) -> tuple[int, int]:
        tw, th = count_tiles(w, h, min_num=MIN_CROPS, max_num=MAX_CROPS, image_size=s)
        return int(tw), int(th)

    bad = 0
    for name, mode in MODES.items():
        kwargs = mode_kwargs(mode)
        proc = cached_get_processor_without_dynamic_kwargs(args.ckpt, processor_cls=DeepseekOCRProcessor,
                                                          **kwargs, strategy="v1")
        if (proc.base_size, proc.image_size) != (mode.base_size, mode.image_size):
            print(f"{name}: processor built with {proc.base_size}/{proc.image_size}: kwargs were dropped")
            bad += 1
            continue
        call = get_allowed_kwarg_only_overrides(proc, {**kwargs, "return_tensors": "pt"}, requires_kw_only=False,
                                                allow_var_kwargs=True)
        for i, size in enumerate(SIZES):
            raw = page(size, i)
            image = vllm_image(raw, mode)
            out = proc(prompt="<image>", images=[image], **call)
            ours = preprocess(raw, mode.base_size, mode.image_size, mode.crop)
            counts = (int(out["num_image_tokens"][0]),
                      count_placeholders(image.width, image.height, ViewSizes.from_kwargs(kwargs), grid),
                      ours.image_tokens, count_image_tokens(*size, mode.base_size, mode.image_size, mode.crop))
            same_global = torch.equal(out["pixel_values"][0].float(), ours.global_view)
            crops = out["images_crop"].float()
            same_tiles = crops.shape[0] == 0 if ours.tiles is None else torch.equal(crops, ours.tiles)
            ok = len(set(counts)) == 1 and same_global and same_tiles
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:6} {size!s:13} tokens vllm/plugin/ours/count {counts} "
                  f"global {'=' if same_global else 'DIFF'} tiles {'=' if same_tiles else 'DIFF'}")
    print(f"mismatches: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
