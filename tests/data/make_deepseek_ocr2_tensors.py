"""Write deepseek_ocr2_tensors.tsv: the checkpoint tensor names and shapes vLLM 0.26.0's DeepseekOCR2ForCausalLM loads.

Not a test and not part of the service: it needs the vllm 0.26.0 wheel unpacked on PYTHONPATH (CPU is enough;
`pip download --no-deps vllm==0.26.0`, unzip, plus the few pure-Python packages its imports ask for).

How the list is made:
1. Vision side, from vLLM's own module tree: the same constructors DeepseekOCR2ForCausalLM.__init__ calls
   (deepencoder.ImageEncoderViT with its SAM-B arguments and last_conv_output=896,
   deepencoder2.build_qwen2_decoder_as_encoder(), deepseek_vl2.MlpProjector(linear 896 -> 1280)) are built on
   the meta device; their persistent state_dict names are prefixed with the attribute names vLLM gives them
   (sam_model, qwen2_model, projector), plus `view_seperator` [1280]. Each vLLM name is mapped back to the
   checkpoint name by inverting DeepseekOCR2ForCausalLM.hf_to_vllm_mapper, and the script checks that the
   mapper sends that checkpoint name forward to the same vLLM name.
2. Language side: vLLM builds DeepseekV2ForCausalLM (fused qkv / gate_up / MoE experts) from the same
   language_config as DeepSeek-OCR v1, and the mapper sends model.embed_tokens. / model.layers. /
   model.norm. / lm_head. to language_model.*; its load_weights takes the HF names. So those entries are the
   v1 release's own language-model tensors (deepseek_ocr_tensors.tsv, from the released safetensors file),
   each checked to map under language_model. by the mapper.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LANGUAGE_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def _ocr2_mapper():  # noqa: ANN202 - a vllm WeightsMapper
    """DeepseekOCR2ForCausalLM.hf_to_vllm_mapper, read from vLLM's source: importing that module pulls in its
    image processor, which needs torchvision; the mapper's prefix table is a literal, so it is rebuilt from
    the source text with vLLM's own WeightsMapper class."""
    import ast
    import importlib.util

    from vllm.model_executor.models.utils import WeightsMapper

    source = Path(importlib.util.find_spec("vllm.model_executor.models.deepseek_ocr2").origin).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "DeepseekOCR2ForCausalLM":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "hf_to_vllm_mapper":
                    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in stmt.value.keywords}
                    return WeightsMapper(**kwargs)
    raise SystemExit("DeepseekOCR2ForCausalLM.hf_to_vllm_mapper not found in vLLM's source")


def main() -> int:
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.deepencoder import ImageEncoderViT
    from vllm.model_executor.models.deepencoder2 import build_qwen2_decoder_as_encoder
    from vllm.model_executor.models.deepseek_vl2 import MlpProjector
    from vllm.transformers_utils.configs.deepseek_vl2 import MlpProjectorConfig

    mapper = _ocr2_mapper()
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))), torch.device("meta"):
        towers = {
            "sam_model": ImageEncoderViT(
                depth=12,
                embed_dim=768,
                img_size=1024,
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=12,
                patch_size=16,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=[2, 5, 8, 11],
                window_size=14,
                out_chans=256,
                last_conv_output=896,
            ),
            "qwen2_model": build_qwen2_decoder_as_encoder(),
            "projector": MlpProjector(MlpProjectorConfig(projector_type="linear", input_dim=896, n_embed=1280)),
        }
    rows: dict[str, tuple[int, ...]] = {}
    for attr, module in towers.items():
        for name, tensor in module.state_dict().items():
            vllm_name = f"{attr}.{name}"
            hf_name = f"model.{vllm_name}"  # the mapper's catch-all rule "model." -> ""
            if mapper._map_name(hf_name) != vllm_name:
                raise SystemExit(f"mapper sends {hf_name} to {mapper._map_name(hf_name)}, not {vllm_name}")
            rows[hf_name] = tuple(tensor.shape)
    rows["model.view_seperator"] = (1280,)
    for line in (HERE / "deepseek_ocr_tensors.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            if name.startswith(LANGUAGE_PREFIXES):
                if not (mapper._map_name(name) or "").startswith("language_model."):
                    raise SystemExit(f"mapper does not send {name} to the language model")
                rows[name] = tuple(int(s) for s in shape.split(","))
    total = sum(torch.Size(s).numel() for s in rows.values())
    out = HERE / "deepseek_ocr2_tensors.tsv"
    with out.open("w") as f:
        f.write(
            f"# DeepSeek-OCR-2 tensors vLLM 0.26.0 DeepseekOCR2ForCausalLM loads: {len(rows)} tensors, "
            f"{total:,} parameters\n"
            "# made by tests/data/make_deepseek_ocr2_tensors.py (vision: vLLM's module tree through "
            "hf_to_vllm_mapper; language model: the v1 release's names, same language_config)\n"
            "# name\tshape\n"
        )
        for name in sorted(rows):
            f.write(f"{name}\t{','.join(str(d) for d in rows[name])}\n")
    print(f"{out}: {len(rows)} tensors, {total:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
