"""DeepSeek-OCR-2's vision encoder on vLLM without a GPU sync per query: the attention mask built in tensor ops.

vLLM 0.26's DeepEncoder V2 (`vllm.model_executor.models.deepencoder2.CustomQwen2Decoder`, the Qwen2 stage
over [SAM tokens, learned queries]) builds its attention mask with a Python loop over the query positions,
two indexed writes each, whose index tensors live on the CPU: every write copies them to the GPU and waits
for it. An A4 page in Gundam (six 768 px tiles of 144 queries and the 1024 px global view of 256) runs that
loop 1,120 times, inside the engine step, while every running sequence's decoding waits behind it.

The mask itself is fixed by the token types: image tokens (type 0) attend to all image tokens; a query
(type 1) attends to every image token and to the queries up to itself; anything else attends to nothing.
`mask_from_types` builds the same additive mask (0 where allowed, the dtype's lowest value elsewhere) from
comparisons on the whole sequence: a handful of kernels and no sync. `register()` (called by the vLLM plugin,
`engines.vllm.modes.register`) makes vLLM build `FastMaskQwen2Decoder` wherever its model asks for a
`CustomQwen2Decoder` (`PluggableLayer`'s out-of-tree replacement, looked up by class name at instantiation).

Our own model (`deepseek_ocr.Qwen2QueryEncoder`) builds the same rule as a boolean mask; the CPU tests hold
the two equal, and `tests/data/vllm_ocr2_agreement.py` holds vLLM with this encoder against our model.
This module imports no vLLM at import time (`mask_from_types` is plain torch); `register()` does.
`DEEPSEEK_OCR_OCR2_MASK=vllm` (a benchmark switch, `gpu_run.sh ocr2ab`) leaves vLLM's own loop in place.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from engines.vllm.layers import replace_layer

LAYER_NAME = "CustomQwen2Decoder"  # vLLM's class, the key of its out-of-tree registry
SWITCH = "DEEPSEEK_OCR_OCR2_MASK"  # "vllm": keep vLLM's mask loop (to measure against it)
# Under vLLM's logger, so the line shows in the engine core's log (vLLM configures "vllm" there, not ours).
log = logging.getLogger("vllm.deepseek_ocr_service.ocr2_encoder")


def mask_from_types(token_type_ids: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """The encoder's additive attention mask, (batch, 1, seq, seq), from (batch, seq) token types.

    Row q, column k is 0 where q may attend to k, else the dtype's lowest value: image tokens (0) see image
    tokens; queries (1) see image tokens and the queries at or before them in order; other rows see nothing.
    """
    types = token_type_ids.to(device=device, non_blocking=True)
    image, query = types == 0, types == 1
    order = torch.cumsum(query.to(torch.int32), dim=1)  # a query's rank among the queries (1-based)
    sees_images = (image | query)[:, :, None] & image[:, None, :]
    sees_queries = query[:, :, None] & query[:, None, :] & (order[:, None, :] <= order[:, :, None])
    allowed = sees_images | sees_queries
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _fast_mask(*, sequence_length: int, dtype: torch.dtype, device: torch.device, batch_size: int,
               token_type_ids: torch.Tensor) -> torch.Tensor:
    """Stands in for the inner model's `_create_custom_4d_mask` (vLLM calls it with these keywords)."""
    if token_type_ids.shape != (batch_size, sequence_length):
        raise ValueError(f"token types {tuple(token_type_ids.shape)} for a batch of {batch_size} x "
                         f"{sequence_length} tokens")
    return mask_from_types(token_type_ids, dtype, device)


def fast_decoder_class() -> type:
    """vLLM's `CustomQwen2Decoder` with the mask built by `mask_from_types` (imports vLLM)."""
    from vllm.model_executor.models.deepencoder2 import CustomQwen2Decoder

    class FastMaskQwen2Decoder(CustomQwen2Decoder):
        """The same layers and weights; only the mask's construction differs."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # An instance attribute wins over the inner class's method of the same name.
            self.model._create_custom_4d_mask = _fast_mask
            log.info("DeepSeek-OCR-2 encoder: attention mask built in tensor ops (engines.vllm.ocr2_encoder)")

    return FastMaskQwen2Decoder


def register() -> type | None:
    """Make vLLM instantiate `FastMaskQwen2Decoder` for `CustomQwen2Decoder` in this process; idempotent.

    Returns the class registered, or None where this vLLM has no such layer or DEEPSEEK_OCR_OCR2_MASK=vllm
    (then nothing changes)."""
    if os.environ.get(SWITCH, "").strip().lower() == "vllm":
        return None
    return replace_layer("vllm.model_executor.models.deepencoder2", LAYER_NAME, "FastMaskQwen2Decoder",
                         fast_decoder_class)
