"""DeepSeek-OCR's and DeepSeek-OCR-2's vision encoders over a whole encoder batch, not image after image.

vLLM 0.26's DeepSeek-OCR (`DeepseekOCRForCausalLM._pixel_values_to_embedding`, its eager path: the encoder
CUDA graphs are Gundam-only and off here) runs SAM, CLIP and the projector once for each image's global view
and once for its tiles, and reads each image's tile grid with two `.item()` calls; its DeepSeek-OCR-2 does the
same with SAM and its Qwen2 stage, after a `.item()` pixel sum for each image. An engine step that prefills
17 A4 pages so runs the encoder 34 times, each run a long series of small kernels launched from Python, with
host waits for the GPU in between; decoding sequences wait behind all of it. On an H100 a step that prefilled
one page took ~105 ms of wall time with the GPU busy 31 ms of it, and vLLM's SAM alone took 29.5 ms a page
image after image against 20.4 ms batched (docs/BENCHMARKS.md section 26).

`image_embeddings` runs the encoder on all the batch's global views together and on all its tiles together
(in calls of at most `VIEW_BUDGET` attention cells, see `views_per_call`), then lays each image's features out
exactly as vLLM does. DeepSeek-OCR: the tile grid row by row with a newline column, the global view with its
newline column, the view separator. DeepSeek-OCR-2: each tile's query outputs in order, tile after tile, the
global view's, the separator. The tile grids are read on the host: DeepSeek-OCR keeps its `images_spatial_crop`
field on the CPU (`engines.vllm.modes_model`), so nothing waits; DeepSeek-OCR-2 reads it once a batch.

This module imports no vLLM: `engines.vllm.modes_model.DeepseekOCRModesForCausalLM` and
`engines.vllm.ocr2_model.DeepseekOCR2BatchedForCausalLM` call it with vLLM's modules; the CPU tests call it with
ours (`deepseek_ocr.DeepseekOCRModel.view_features` / `query_features`) against our per-image `encode_image`.
`DEEPSEEK_OCR_ENCODER=vllm` (a benchmark switch) keeps vLLM's per-image loop.

With `engines.vllm.sam_attention` (no bias tensor) the peak of SAM over a step's 17 pages was about half of
that with vLLM's attention (2.77 against 5.12 GiB, section 26); the budget stays, as the bound for
`DEEPSEEK_OCR_ENCODER=batched` (the batch with vLLM's attention).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import torch

from engines.vllm import pixels

# Benchmark switch: "vllm" keeps vLLM's encoder as it is (image after image, its SAM attention); "batched" the
# batch only, with vLLM's SAM attention (engines.vllm.sam_attention off); anything else: both changes.
SWITCH = "DEEPSEEK_OCR_ENCODER"
# SAM's global-attention layers build a (views, heads, T, T) bias, T = (side / 16)^2 patch tokens a view. A
# call holds at most this many T*T cells: eight 1024 px views (T = 4,096; ~3.2 GB of bias in bfloat16), 52
# 640 px tiles, three 1280 px views. vLLM's start-up profile runs the largest batch, so the KV cache is sized
# with this peak in it.
VIEW_BUDGET = 8 * 4096 * 4096
log = logging.getLogger("vllm.deepseek_ocr_service.encoder_batch")


def _switch() -> str:
    return os.environ.get(SWITCH, "").strip().lower()


def enabled() -> bool:
    """The encoder runs over the whole batch (not `DEEPSEEK_OCR_ENCODER=vllm`)."""
    return _switch() != "vllm"


def fused_attention() -> bool:
    """SAM's relative-position attention without its bias tensor (`engines.vllm.sam_attention`)."""
    return _switch() not in ("vllm", "batched")


def announce(model: str) -> None:
    """Log which of the plugin's encoder-side changes this engine runs (the benchmarks grep for these lines)."""
    if enabled():
        log.info("%s encoder: the views of a batch encoded together (engines.vllm.encoder_batch)", model)
    if pixels.uint8_enabled():
        pixels.log.info("%s views: 8-bit from the front end, normalised on the GPU (engines.vllm.pixels)", model)


def image_tensors(kwargs: dict[str, object], model: str,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, object] | None:
    """(pixel_values, images_crop, images_spatial_crop) popped from a model's image kwargs, 8-bit views
    normalised into `dtype` (`engines.vllm.pixels`); None where the batch has no image. Decided by the tensors'
    sizes: vLLM's classes test `torch.sum(pixels).item() == 0`, a GPU wait, and a view whose normalised pixels
    sum to exactly 0 (half black, half white) read as no image, so the engine core died on the missing
    embeddings."""
    pixel_values = kwargs.pop("pixel_values", None)
    images_spatial_crop = kwargs.pop("images_spatial_crop", None)
    images_crop = kwargs.pop("images_crop", None)
    if pixel_values is None:
        return None
    if not isinstance(pixel_values, torch.Tensor) or not isinstance(images_crop, torch.Tensor):
        # A list here means views of different sizes reached one batch (the modes' shared field prevents it).
        raise ValueError(f"{model} image inputs are not one tensor each: pixel_values "
                         f"{type(pixel_values).__name__}, images_crop {type(images_crop).__name__}")
    if pixel_values.numel() == 0:
        return None
    return pixels.normalized(pixel_values, dtype), pixels.normalized(images_crop, dtype), images_spatial_crop


def views_per_call(side: int, patch: int = 16) -> int:
    """How many square views of `side` pixels one encoder call takes under VIEW_BUDGET (at least one)."""
    tokens = math.ceil(side / patch) ** 2
    return max(1, VIEW_BUDGET // (tokens * tokens))


def project_views(project: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor) -> torch.Tensor:
    """`project` (views (N, 3, S, S) -> features (N, q*q, C)) over `views` in calls of `views_per_call`."""
    step = views_per_call(views.shape[-1])
    if views.shape[0] <= step:
        return project(views)
    return torch.cat([project(views[i:i + step]) for i in range(0, views.shape[0], step)])


def _with_newline(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(rows, cols, C) -> (rows * (cols + 1), C): a newline embedding closes every row."""
    rows, _, dim = grid.shape
    return torch.cat([grid, newline[None, None, :].expand(rows, 1, dim)], dim=1).view(-1, dim)


def _square(features: torch.Tensor) -> int:
    side = math.isqrt(features.shape[1])
    if side * side != features.shape[1]:
        raise ValueError(f"encoder features of {features.shape[1]} tokens a view are not a square grid")
    return side


def image_embeddings(project: Callable[[torch.Tensor], torch.Tensor], global_views: torch.Tensor,
                     tiles: torch.Tensor, grids: Sequence[tuple[int, int]], newline: torch.Tensor | None,
                     separator: torch.Tensor) -> list[torch.Tensor]:
    """Each image's `<image>` embeddings, (tokens, C), as vLLM's per-image loop lays them out.

    global_views: (N, 3, B, B), one per image; tiles: (P, 3, I, I), the tiled images' tiles in image order,
    row by row; grids: each image's (tiles wide, tiles high), (1, 1) or less for an untiled image.
    newline: DeepSeek-OCR's row-end embedding (features laid out as 2D grids, a newline closing each row);
    None for DeepSeek-OCR-2 (each view's query outputs in their own order, tile after tile, no newlines).
    """
    if len(grids) != global_views.shape[0]:
        raise ValueError(f"{global_views.shape[0]} global views for {len(grids)} tile grids")
    counts = [w * h if w > 1 or h > 1 else 0 for w, h in grids]
    if sum(counts) != tiles.shape[0]:
        raise ValueError(f"{tiles.shape[0]} tiles for grids {list(grids)} (expected {sum(counts)})")
    glob = project_views(project, global_views)
    local = project_views(project, tiles) if sum(counts) else None
    if newline is None:  # DeepSeek-OCR-2
        out, start = [], 0
        for count, features in zip(counts, glob, strict=True):
            own = [local[start:start + count].flatten(0, 1)] if count else []  # type: ignore[index]
            start += count
            out.append(torch.cat([*own, features, separator[None, :]]))
        return out
    side = _square(glob)
    q = _square(local) if local is not None else 0
    out, start = [], 0
    for (w, h), count, features in zip(grids, counts, glob, strict=True):
        parts = []
        if count:
            grid = local[start:start + count].view(h, w, q, q, -1)  # type: ignore[index]
            start += count
            parts.append(_with_newline(grid.permute(0, 2, 1, 3, 4).reshape(h * q, w * q, -1), newline))
        parts.append(_with_newline(features.view(side, side, -1), newline))
        parts.append(separator[None, :])
        out.append(torch.cat(parts))
    return out
