"""SAM's attention with relative positions on vLLM without an (tokens x tokens) bias tensor: fused kernels.

vLLM 0.26's SAM (`vllm.model_executor.models.deepencoder.RelPosAttention`, the image encoder of DeepSeek-OCR
and DeepSeek-OCR-2) adds the decomposed relative-position bias as an explicit mask: it builds
`rel_h + rel_w` as a (views, heads, T, T) tensor, T the view's patch tokens, and hands it to
`scaled_dot_product_attention`, which then cannot use the flash kernel. In a 1024 px global view's four
global-attention layers that is 12 x 4,096 x 4,096 values a layer, about 400 MB written and read again in
bfloat16, for every view.

The bias is rel_h[q, row(k)] + rel_w[q, col(k)]: a dot product of [rel_h[q], rel_w[q]] with the key's one-hot
(row, column). `deepseek_ocr.fused_rel_pos_attention`, what our own model's SAM runs, appends those to the
(pre-scaled) queries and the keys, so plain scaled-dot-product attention over the widened head gives exactly the
same scores, and the flash or memory-efficient kernels run with no bias at all.

`register()` (called by the vLLM plugin, `engines.vllm.modes.register`) makes vLLM build `FusedRelPosAttention`
wherever its SAM asks for a `RelPosAttention` (`PluggableLayer`'s out-of-tree replacement, looked up by class
name at instantiation). The weights and vLLM's relative-position tables (`get_rel_pos`) stay vLLM's. This module
imports no vLLM at import time. `DEEPSEEK_OCR_ENCODER=vllm` or `batched` (benchmark switches,
`engines.vllm.encoder_batch`) keep vLLM's attention.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from deepseek_ocr import fused_rel_pos_attention
from engines.vllm import encoder_batch
from engines.vllm.layers import replace_layer

LAYER_NAME = "RelPosAttention"  # vLLM's class, the key of its out-of-tree registry
log = logging.getLogger("vllm.deepseek_ocr_service.sam_attention")
_LOGGED: list[bool] = []


def fused_class() -> type:
    """vLLM's `RelPosAttention` with its forward through `fused_rel_pos_attention` (imports vLLM)."""
    from vllm.model_executor.models.deepencoder import RelPosAttention, get_rel_pos

    class FusedRelPosAttention(RelPosAttention):
        """The same parameters as vLLM's layer; only the attention's evaluation differs."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not _LOGGED:  # once a process: SAM builds twelve of these
                _LOGGED.append(True)
                log.info("DeepSeek-OCR SAM attention: relative positions folded into q and k, no bias tensor "
                         "(engines.vllm.sam_attention)")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.use_rel_pos:
                return super().forward(x)
            batch, height, width, _ = x.shape
            qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, heads, H*W, d)
            grid = q.reshape(batch, self.num_heads, height, width, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, get_rel_pos(height, height, self.rel_pos_h))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, get_rel_pos(width, width, self.rel_pos_w))
            tokens = height * width
            out = fused_rel_pos_attention(q, k, v, rel_h.reshape(batch, self.num_heads, tokens, height),
                                          rel_w.reshape(batch, self.num_heads, tokens, width), self.scale)
            out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
            return self.proj(out.reshape(batch, height, width, -1))

    return FusedRelPosAttention


def register() -> type | None:
    """Make vLLM instantiate `FusedRelPosAttention` for `RelPosAttention` in this process; idempotent.

    Returns the class registered, or None where this vLLM has no such layer or the switch keeps vLLM's."""
    if not encoder_batch.fused_attention():
        return None
    return replace_layer("vllm.model_executor.models.deepencoder", LAYER_NAME, "FusedRelPosAttention", fused_class)
