"""Compare our DeepSeek-OCR-2 encoder (SAM with 896-channel net_3 + Qwen2 query encoder) with vLLM 0.26.0's.

Not a test: it needs the vllm 0.26.0 wheel unpacked on PYTHONPATH (CPU is enough; see
make_deepseek_ocr2_tensors.py). vLLM's own modules (deepencoder.ImageEncoderViT with last_conv_output=896 and
deepencoder2's transformers-backed Qwen2 encoder) are built small (2 SAM blocks of width 64, 3 encoder layers),
given random weights, and the same weights are loaded into deepseek_ocr's modules by name; both encode a
768 px tile batch and a 1024 px view batch in float32. `--causal` swaps our encoder mask for a plain causal
one, to show the comparison notices a wrong attention pattern.

Seen 2026-11-30 (torch 2.13 CPU, transformers 5.24): max |difference| 7.6e-6 (768) and 7.8e-6 (1024) on
outputs of mean |x| 0.80; with --causal 0.81 and 0.86.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepseek_ocr as dso  # noqa: E402


def main(argv: list[str]) -> int:
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.deepencoder import ImageEncoderViT
    from vllm.model_executor.models.deepencoder2 import build_qwen2_decoder_as_encoder

    torch.manual_seed(0)
    sam_kw = {"layers": 2, "width": 64, "heads": 2, "global_attn_indexes": [1]}
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        sam = ImageEncoderViT(
            depth=sam_kw["layers"],
            embed_dim=sam_kw["width"],
            img_size=1024,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=sam_kw["heads"],
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=sam_kw["global_attn_indexes"],
            window_size=14,
            out_chans=256,
            last_conv_output=896,
        ).eval()
        qwen2 = build_qwen2_decoder_as_encoder(decoder_layer=3).eval()
    raw = dso.tiny_config("real", "tiny", "ocr2")
    raw["vision_config"]["width"]["sam_vit_b"].update(sam_kw)
    raw["vision_config"]["width"]["qwen2-0-5b"]["layers"] = 3
    ours = dso.DeepseekOCRModel(dso.DeepseekOCRConfig.from_dict(raw)).eval()

    theirs = {f"sam_model.{k}": v for k, v in sam.state_dict().items()}
    theirs |= {f"qwen2_model.{k}": v for k, v in qwen2.state_dict().items() if "rotary_emb" not in k}
    with torch.no_grad():
        for name, tensor in theirs.items():
            if not name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "norm.weight")):
                tensor.normal_(0.0, 0.05)
    missing, unexpected = ours.load_state_dict(theirs, strict=False)
    if unexpected or any(k.startswith(("sam_model.", "qwen2_model.")) for k in missing):
        raise SystemExit(f"names differ: missing {missing}, unexpected {unexpected}")

    if "--causal" in argv:
        plain = F.scaled_dot_product_attention

        def causal(q, k, v, attn_mask=None, **kw):  # noqa: ANN001, ANN202 - a drop-in for F's function
            if attn_mask is not None and attn_mask.dim() == 2:
                return plain(q, k, v, is_causal=True)
            return plain(q, k, v, attn_mask=attn_mask, **kw)

        dso.F.scaled_dot_product_attention = causal
    for size in (768, 1024):
        pixels = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = qwen2(sam(pixels))
            got = ours.qwen2_model(ours.sam_model(pixels))
        diff = float((want - got).abs().max())
        print(
            f"{size} px: shapes {tuple(want.shape)} / {tuple(got.shape)}, max |diff| {diff:.3g}, "
            f"mean |x| {float(want.abs().mean()):.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
