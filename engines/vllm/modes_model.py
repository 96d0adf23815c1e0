"""vLLM 0.26's DeepSeek-OCR classes with the view sizes taken per request (see `engines.vllm.modes`).

Imported only inside vLLM processes (through `engines.vllm.modes.register`): it imports vLLM at the top.

- `ModesProcessingInfo`: the processor has the request's `image_size` / `base_size` (a copy of vLLM's
  Gundam processor with the two sides set, `resized_processor`), and the placeholder count follows the
  request's sizes instead of the module constants. A processor without the sizes is refused rather than used.
- `ModesMultiModalProcessor`: the request's kwargs drive the processor and the prompt update, and every
  image item carries a `view_sizes` *shared* field. vLLM's encoder batching
  (`vllm.multimodal.utils.group_and_batch_mm_items`) starts a new group wherever two consecutive items differ
  in a shared field's value, so images of different modes are never encoded in one batch: there
  `MultiModalFlatField` would zero-pad 640 px tiles to 1024 px ones and `MultiModalBatchedField` would hand
  the model a list instead of a tensor.
- `DeepseekOCRModesForCausalLM`: takes the extra field, and decides "no image" / "no tiles" by tensor sizes
  instead of vLLM's pixel sum (a view whose normalised pixels sum to exactly 0 made `embed_multimodal`
  return nothing and killed the engine core). Its encoder CUDA-graph path is Gundam-only in vLLM and is
  refused (`compilation_config.cudagraph_mm_encoder` is off by default and in `engine_kwargs`). It encodes
  all global views of an encoder batch in one pass and all tiles in another (`engines.vllm.encoder_batch`),
  where vLLM's eager path runs the encoder image after image; the tile grids stay on the host.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers import BatchFeature
from vllm.model_executor.models.deepseek_ocr import (
    DeepseekOCRDummyInputsBuilder,
    DeepseekOCRForCausalLM,
    DeepseekOCRImagePixelInputs,
    DeepseekOCRMultiModalProcessor,
    DeepseekOCRProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.transformers_utils.processors.deepseek_ocr import MAX_CROPS, MIN_CROPS, count_tiles

from engines.vllm import encoder_batch, pixels
from engines.vllm.modes import GUNDAM, ViewSizes, count_placeholders

VIEW_SIZES = "view_sizes"


def _vllm_grid(width: int, height: int, image_size: int) -> tuple[int, int]:
    """vLLM's own tiling choice: the one its processor cuts the tiles with (same bounds as its defaults)."""
    tiles_wide, tiles_high = count_tiles(width, height, min_num=MIN_CROPS, max_num=MAX_CROPS, image_size=image_size)
    return int(tiles_wide), int(tiles_high)


def _check_processed(out: BatchFeature, mm_data: Mapping[str, object], sizes: ViewSizes) -> None:
    """The processor's views and its own token count per image agree with the request and our count.

    A disagreement would put a wrong number of placeholders in the prompt (or views of the wrong size in
    the encoder); refusing the request is better than answering from corrupted inputs.
    """
    views = out.get("pixel_values")
    if views is not None and views.shape[-1] != sizes.base_size:
        raise ValueError(f"DeepSeek-OCR processor made {views.shape[-1]} px global views for a request "
                         f"asking {sizes.base_size}")
    images = mm_data.get("images")
    counted = out.get("num_image_tokens")
    if not isinstance(images, list | tuple) or counted is None or not all(hasattr(im, "width") for im in images):
        return  # only PIL images (what the service sends) are counted here
    ours = [count_placeholders(im.width, im.height, sizes, _vllm_grid) for im in images]
    theirs = [int(n) for n in torch.as_tensor(counted).flatten()]
    if ours != theirs:
        raise ValueError(f"DeepSeek-OCR placeholder count {ours} differs from the processor's {theirs} "
                         f"for images {[im.size for im in images]} in {sizes}")


_RESIZED: dict[tuple[int, int, int], tuple[object, object]] = {}  # (id(default), base, image) -> (default, copy)
_RESIZED_LOCK = threading.Lock()
_RESIZED_MAX = 64  # sizes come from the five modes; anything past this is not kept


def resized_processor(default: Any, sizes: ViewSizes) -> Any:
    """vLLM's processor for Gundam, with `sizes`'s global-view and tile sides: a shallow copy sharing its
    tokenizer. The processor's constructor only stores the two sides (vllm 0.26,
    `transformers_utils/processors/deepseek_ocr.py`), so the copy cuts the same views and counts the same
    tokens as one built with them. Building one went through `ProcessorMixin.from_pretrained`, which
    deep-copied vLLM's tokenizer: 7-13 s for each mode's first request on an H200, and 110-134 s with
    the five built side by side at warm-up (docs/BENCHMARKS.md section 15)."""
    if (default.base_size, default.image_size) == (sizes.base_size, sizes.image_size):
        return default
    key = (id(default), sizes.base_size, sizes.image_size)
    with _RESIZED_LOCK:
        hit = _RESIZED.get(key)
        if hit is None or hit[0] is not default:
            if len(_RESIZED) >= _RESIZED_MAX:
                _RESIZED.clear()
            clone = copy.copy(default)
            clone.base_size, clone.image_size = sizes.base_size, sizes.image_size
            hit = _RESIZED[key] = (default, clone)
    return hit[1]


class ModesProcessingInfo(DeepseekOCRProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        sizes = ViewSizes.from_kwargs(kwargs)
        # vLLM builds and caches this one (Gundam, its module defaults) once, at start-up.
        default = super().get_hf_processor(**{**kwargs, **GUNDAM.as_kwargs()})
        pixels.install(default)  # before any copy is made: the copies share its view transform
        processor = resized_processor(default, sizes)
        got = (getattr(processor, "base_size", None), getattr(processor, "image_size", None))
        if got != (sizes.base_size, sizes.image_size):
            # A transformers version that dropped the constructor arguments would cut the wrong views.
            raise ValueError(f"vLLM built a DeepSeek-OCR processor with base_size/image_size {got} for a request "
                             f"asking {sizes.base_size}/{sizes.image_size}")
        return processor

    def get_num_image_tokens(self, *, image_width: int, image_height: int, cropping: bool = True,
                             sizes: ViewSizes | None = None) -> int:
        if sizes is None:  # vLLM's own callers: the module's sizes (Gundam) with the crop flag they give
            sizes = replace(GUNDAM, crop=cropping)
        return count_placeholders(image_width, image_height, sizes, _vllm_grid)


class ModesMultiModalProcessor(DeepseekOCRMultiModalProcessor):
    def _call_hf_processor(self, prompt: str, mm_data: Mapping[str, object], mm_kwargs: Mapping[str, object],
                           tok_kwargs: Mapping[str, object]) -> BatchFeature:
        if not mm_data:
            return super()._call_hf_processor(prompt, mm_data, mm_kwargs, tok_kwargs)
        sizes = ViewSizes.from_kwargs(mm_kwargs)
        # Explicit sizes and crop flag: the processor's `__call__` default for crop_mode is bound at import.
        out = super()._call_hf_processor(prompt, mm_data, {**mm_kwargs, **sizes.as_kwargs()}, tok_kwargs)
        _check_processed(out, mm_data, sizes)
        pixels.uint8_outputs(out)
        out[VIEW_SIZES] = torch.tensor(sizes.as_list(), dtype=torch.int64)
        return out

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        views = hf_inputs.get("pixel_values")
        images = 0 if views is None else len(views)
        # All images of one prompt share the prompt's kwargs, hence one value for them all.
        fields[VIEW_SIZES] = MultiModalFieldConfig.shared("image", batch_size=images, keep_on_cpu=True)
        if encoder_batch.enabled():  # the tile grids are read on the host: no GPU wait for them in the step
            fields["images_spatial_crop"] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        sizes = ViewSizes.from_kwargs(hf_processor_mm_kwargs)
        image_token_id = self.info.get_hf_processor(**hf_processor_mm_kwargs).image_token_id
        if not isinstance(image_token_id, int):
            raise ValueError(f"the tokenizer has no <image> token (got {image_token_id!r})")

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                return [image_token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            count = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height, sizes=sizes)
            return [image_token_id] * count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    ModesMultiModalProcessor,
    info=ModesProcessingInfo,
    dummy_inputs=DeepseekOCRDummyInputsBuilder,  # profiles with Gundam's largest image, as vLLM does
)
class DeepseekOCRModesForCausalLM(DeepseekOCRForCausalLM):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        # vLLM passes these two by name only where the signature names them (model_loader's initialize_model)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.view_dtype = vllm_config.model_config.dtype  # 8-bit views are normalised into this (pixels)
        encoder_batch.announce("DeepSeek-OCR")

    def _parse_and_validate_image_input(self, **kwargs: object) -> DeepseekOCRImagePixelInputs | None:
        view_sizes = kwargs.pop(VIEW_SIZES, None)
        images = encoder_batch.image_tensors(kwargs, "DeepSeek-OCR", self.view_dtype)
        if images is None:
            return None
        pixel_values, images_crop, images_spatial_crop = images
        if view_sizes is not None and int(view_sizes[0]) != pixel_values.shape[-1]:
            raise ValueError(f"global views of {pixel_values.shape[-1]} px, expected {int(view_sizes[0])}")
        return DeepseekOCRImagePixelInputs(
            type="pixel_values",
            data=pixel_values,
            images_crop=images_crop,
            images_spatial_crop=images_spatial_crop,
            # From the tensors, as vLLM does: an untiled batch still has (0, 3, image_size, image_size) crops.
            resolve_bindings={"base_size": pixel_values.shape[-1], "image_size": images_crop.shape[-1]},
        )

    def _project_views(self, views: torch.Tensor) -> torch.Tensor:
        """Square views (N, 3, S, S) -> projected features (N, (S/64)^2, C), as vLLM's model computes them."""
        sam = self.sam_model(views)
        clip = self.vision_model(views, sam)
        return self.projector(torch.cat((clip[:, 1:], sam.flatten(2).permute(0, 2, 1)), dim=-1))

    def _pixel_values_to_embedding(self, pixel_values: torch.Tensor, images_crop: torch.Tensor,
                                   images_spatial_crop: torch.Tensor) -> list[torch.Tensor]:
        if not encoder_batch.enabled():
            return super()._pixel_values_to_embedding(pixel_values, images_crop, images_spatial_crop)
        grids = [(int(w), int(h)) for w, h in images_spatial_crop.tolist()]  # on the host (fields config)
        return encoder_batch.image_embeddings(self._project_views, pixel_values, images_crop, grids,
                                              self.image_newline, self.view_seperator)

    def _encode_local_features(self, patches: torch.Tensor, crop_shape: torch.Tensor) -> torch.Tensor | None:
        if patches.numel() == 0:  # an image that was not tiled
            return None
        return self._assemble_patch_grid(self._project_views(patches), crop_shape)

    def get_encoder_cudagraph_config(self):
        raise NotImplementedError(
            "the per-request DeepSeek-OCR modes do not support vLLM's encoder CUDA graphs (its capture sizes "
            "are Gundam's); leave compilation_config.cudagraph_mm_encoder off"
        )
