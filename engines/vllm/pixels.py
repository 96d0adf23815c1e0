"""The views' pixels from vLLM's front end to the GPU as 8-bit values, normalised on the GPU (`DEEPSEEK_OCR_PIXELS`).

vLLM 0.26's DeepSeek-OCR processor turns every view into float32 (`ToTensor`, `Normalize` to [-1, 1]), and
vLLM casts that to the model's dtype: ~21 MB of bfloat16 for an A4 page in Gundam (a 1,024 px view and six
640 px tiles). Every byte of it is serialised to the engine core, received there, merged with the step's other
pages into one pinned buffer on the engine core's main thread, and copied to the GPU. On an H100 the merge
alone took ~18 ms of that thread a page while every running sequence waited (docs/BENCHMARKS.md section 27).

With `DEEPSEEK_OCR_PIXELS=uint8` the processor's view transform is `Uint8Views`: the view's pixels as they are
(uint8, channels first), half the bytes of bfloat16. vLLM casts only floating tensors, so they stay 8-bit, and
the model subclasses turn them into exactly what the processor would have made (`normalized`): `ToTensor`'s
`u / 255` and `Normalize`'s `(x - mean) / std` in float32, the same IEEE operations on either side, then the
model's dtype. Installed only where the processor's transform normalises with the mean and std the model side
uses (`MEAN`, `STD`: DeepSeek-OCR's 0.5); anything else keeps vLLM's floats. The default is `float` (vLLM's
way) until the GPU measures the change.

This module imports no vLLM: `engines.vllm.modes_model` and `engines.vllm.ocr2_model` use it inside vLLM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

SWITCH = "DEEPSEEK_OCR_PIXELS"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
FIELDS = ("pixel_values", "images_crop")
# float32 views normalised at a time on the GPU: bounds the temporary (a 1,024 px view is 12.6 MB in float32)
CHUNK = 8
log = logging.getLogger("vllm.deepseek_ocr_service.pixels")


def uint8_enabled() -> bool:
    return os.environ.get(SWITCH, "float").strip().lower() == "uint8"


class Uint8Views:
    """Stands in for the processor's `ImageTransform`: a view (PIL) -> uint8 (3, H, W), not normalised. Keeps
    the transform's `mean` (the processor pads views with the mean's colour) and `std`."""

    def __init__(self, transform: Any) -> None:
        self.inner = transform
        self.mean, self.std = transform.mean, transform.std

    def __call__(self, image: Any) -> torch.Tensor:
        array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def install(processor: Any) -> bool:
    """Give `processor` (vLLM's DeepSeek-OCR processor) the 8-bit views when the switch asks and its transform
    normalises with `MEAN` / `STD`; True when its views are 8-bit after the call. Idempotent."""
    transform = getattr(processor, "image_transform", None)
    if isinstance(transform, Uint8Views):
        return True
    if not uint8_enabled() or transform is None:
        return False
    if not getattr(transform, "normalize", False) or tuple(transform.mean) != MEAN or tuple(transform.std) != STD:
        log.warning("DEEPSEEK_OCR_PIXELS=uint8: the processor normalises with mean %s, std %s, not %s, %s: its "
                    "views stay float", getattr(transform, "mean", None), getattr(transform, "std", None), MEAN, STD)
        return False
    processor.image_transform = Uint8Views(transform)
    return True


def uint8_outputs(out: Mapping[str, Any]) -> None:
    """The processor's empty fields (an image without tiles has a float (0, 3, S, S) `images_crop`) as uint8,
    so that one batch's items merge into one dtype. In place; only when the views are 8-bit."""
    pixels = out.get("pixel_values")
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
        return
    for name in FIELDS:
        value = out.get(name)
        if isinstance(value, torch.Tensor) and value.dtype != torch.uint8 and value.numel() == 0:
            out[name] = value.to(torch.uint8)  # type: ignore[index]


def normalized(views: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """8-bit views (N, 3, H, W) -> what the processor makes of them, in `dtype`; other tensors unchanged."""
    if views.dtype != torch.uint8:
        return views
    out = torch.empty(views.shape, dtype=dtype, device=views.device)
    mean = torch.tensor(MEAN, dtype=torch.float32, device=views.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=views.device).view(1, 3, 1, 1)
    for start in range(0, views.shape[0], CHUNK):
        part = views[start:start + CHUNK].to(torch.float32).div_(255)  # ToTensor
        out[start:start + CHUNK] = part.sub_(mean).div_(std)  # Normalize, then the model's dtype
    return out
