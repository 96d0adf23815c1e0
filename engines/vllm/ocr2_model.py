"""vLLM 0.26's DeepSeek-OCR-2 model with its encoder over the whole batch and without pixel-sum checks.

Imported only inside vLLM processes (`engines.vllm.modes.register` names it for `DeepseekOCR2ForCausalLM`): it
imports vLLM at the top.

vLLM's `DeepseekOCR2ForCausalLM` decides "no image" and "no tiles" by `torch.sum(pixels).item() == 0`: a GPU
wait for each image of a batch, and a view whose normalised pixels sum to exactly 0 (half black, half white)
is taken for no image, so `embed_multimodal` returns nothing and the engine core dies (the v1 model had the
same, fixed in `engines.vllm.modes_model`). It also runs SAM and its Qwen2 stage image after image. Here the
decisions come from the tensors' sizes, and `engines.vllm.encoder_batch.image_embeddings` encodes the batch's
global views together and its tiles together, laid out as vLLM does (each view's query outputs in order,
tile after tile, then the global view and the separator). The tile grids (`images_spatial_crop`) stay on the
host (`Ocr2MultiModalProcessor`), as for v1, so reading them waits for no GPU work. `DEEPSEEK_OCR_ENCODER=vllm`
keeps vLLM's loop and its fields (the size checks stay).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.deepseek_ocr import DeepseekOCRImagePixelInputs
from vllm.model_executor.models.deepseek_ocr2 import (
    DeepseekOCR2DummyInputsBuilder,
    DeepseekOCR2ForCausalLM,
    DeepseekOCR2MultiModalProcessor,
    DeepseekOCR2ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from engines.vllm import encoder_batch, pixels


class Ocr2ProcessingInfo(DeepseekOCR2ProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> Any:
        processor = super().get_hf_processor(**kwargs)
        pixels.install(processor)
        return processor


class Ocr2MultiModalProcessor(DeepseekOCR2MultiModalProcessor):
    def _call_hf_processor(self, prompt: str, mm_data: Any, mm_kwargs: Any, tok_kwargs: Any) -> Any:
        out = super()._call_hf_processor(prompt, mm_data, mm_kwargs, tok_kwargs)
        pixels.uint8_outputs(out)
        return out

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Any) -> dict[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if encoder_batch.enabled():  # the tile grids are read on the host: no GPU wait for them in the step
            fields["images_spatial_crop"] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


@MULTIMODAL_REGISTRY.register_processor(Ocr2MultiModalProcessor, info=Ocr2ProcessingInfo,
                                        dummy_inputs=DeepseekOCR2DummyInputsBuilder)
class DeepseekOCR2BatchedForCausalLM(DeepseekOCR2ForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        # vLLM passes these two by name only where the signature names them (model_loader's initialize_model)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.view_dtype = vllm_config.model_config.dtype  # 8-bit views are normalised into this (pixels)
        encoder_batch.announce("DeepSeek-OCR-2")

    def _parse_and_validate_image_input(self, **kwargs: object) -> DeepseekOCRImagePixelInputs | None:
        images = encoder_batch.image_tensors(kwargs, "DeepSeek-OCR-2", self.view_dtype)
        if images is None:
            return None
        pixel_values, images_crop, images_spatial_crop = images
        return DeepseekOCRImagePixelInputs(type="pixel_values", data=pixel_values, images_crop=images_crop,
                                           images_spatial_crop=images_spatial_crop,
                                           resolve_bindings={"base_size": self.vision_config.image_size})

    def _encode_local_features(self, patches: torch.Tensor) -> torch.Tensor | None:
        if patches.numel() == 0:  # an image that was not tiled
            return None
        return self._project_views(patches).flatten(0, 1)

    def _project_views(self, views: torch.Tensor) -> torch.Tensor:
        """Square views (N, 3, S, S) -> projected query features (N, queries, C), as vLLM's model computes them."""
        return self.projector(self.qwen2_model(self.sam_model(views)))

    def _pixel_values_to_embedding(self, pixel_values: torch.Tensor, images_crop: torch.Tensor,
                                   images_spatial_crop: torch.Tensor) -> list[torch.Tensor]:
        if not encoder_batch.enabled():
            return super()._pixel_values_to_embedding(pixel_values, images_crop, images_spatial_crop)
        grids = [(int(w), int(h)) for w, h in images_spatial_crop.tolist()]  # on the host (fields config)
        return encoder_batch.image_embeddings(self._project_views, pixel_values, images_crop, grids, None,
                                              self.view_seperator)
