"""Image preprocessing for DeepSeek-OCR: resolution modes, tiling grid, views and image-token counts.

One image becomes a padded square *global view* (base_size) and, in crop ("Gundam") mode for images larger
than a tile, a grid of *local tiles* (image_size each). The number of `<image>` placeholder tokens the
prompt needs follows from the sizes and the grid alone, so `count_image_tokens` answers it without touching
pixels and `preprocess` returns the same figure together with the tensors.

The modes (base_size / image_size / crop): tiny 512/512/no, small 640/640/no, base 1024/1024/no,
large 1280/1280/no, gundam 1024/640/yes. Plain functions on PIL images and tensors, no service imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from process.modes import (  # noqa: F401  (re-exported: the model code reads the mode table from here)
    _SIZE_STEP,
    DEFAULT_MODE,
    DOWNSAMPLE,
    MODES,
    MODES_V2,
    PAD_COLOR,
    PATCH_SIZE,
    ModeSpec,
    _check_crops,
    _check_positive_int,
    _check_view_size,
    _local_grid,
    _tokens,
    _tokens_v2,
    candidate_grids,
    choose_grid,
    count_image_tokens,
    count_image_tokens_for,
    count_image_tokens_v2,
    is_tiled,
    modes_for,
    num_queries,
)

# The reference resizes with PIL's default for RGB, which is bicubic; keep it so pixels match.
_RESAMPLE = Image.Resampling.BICUBIC
# Beyond this side length the reference stretches the global view to image_size square in no-crop modes.
_STRETCH_MAX_IMAGE_SIZE = 640

@dataclass
class ImageInputs:
    """Model-ready views of one image."""

    global_view: torch.Tensor  # (3, base_size, base_size) float32 in [-1, 1]
    tiles: torch.Tensor | None  # (th*tw, 3, image_size, image_size), row by row; None when not tiled
    grid: tuple[int, int]  # (tw, th); (1, 1) when not tiled
    base_size: int
    image_size: int
    image_tokens: int  # == count_image_tokens(...) for this image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # PIL's own conversion clips 16-bit samples at 255 (a white page); scale to 8 bits instead.
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # Dropping alpha leaves whatever colour sits under transparent pixels (often black, hiding black
        # text); documents are read on white, so flatten onto white.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    # Same operations, in the same order, as ToTensor + Normalize(0.5, 0.5): bit-identical values.
    return torch.from_numpy(pixels).to(torch.float32).div_(255.0).sub_(0.5).div_(0.5)


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL's bicubic resize, the reference's. Past an 8x reduction Pillow is told to reduce first: a 1 x 40 M
    pixel strip otherwise builds a ~1.2 GB coefficient table and holds the GIL for seconds (issue 18); the
    pixels of ordinary images are unchanged."""
    factor = max(image.width / size[0], image.height / size[1])
    return image.resize(size, _RESAMPLE, reducing_gap=3.0 if factor > 8 else None)


def _pad_square(image: Image.Image, size: int) -> Image.Image:
    """Fit `image` in a size x size square, aspect kept, centred on PAD_COLOR.

    The arithmetic is PIL.ImageOps.pad's (the reference's), so pixels match it, except that the short
    side never rounds down to 0 pixels: ImageOps.pad turns a 1x5000 strip into pure padding.
    """
    width, height = image.size
    if width >= height:
        fitted = (size, max(1, round(height / width * size)))
    else:
        fitted = (max(1, round(width / height * size)), size)
    resized = _resize(image, fitted)
    if fitted == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), PAD_COLOR)
    canvas.paste(resized, (round((size - fitted[0]) * 0.5), round((size - fitted[1]) * 0.5)))
    return canvas


def _cut_tiles(image: Image.Image, grid: tuple[int, int], image_size: int) -> torch.Tensor:
    tw, th = grid
    stretched = _resize(image, (image_size * tw, image_size * th))
    hwc = np.asarray(stretched)  # (th*s, tw*s, 3)
    # Split both axes into tiles with a reshape instead of th*tw PIL crops: one copy, row-major tile order.
    tiles = hwc.reshape(th, image_size, tw, image_size, 3).transpose(0, 2, 4, 1, 3)
    return _normalise(np.ascontiguousarray(tiles).reshape(th * tw, 3, image_size, image_size))


def preprocess(
    image: Image.Image,
    base_size: int,
    image_size: int,
    crop: bool,
    min_crops: int = 2,
    max_crops: int = 6,
) -> ImageInputs:
    """Global view (+ local tiles in crop mode) of `image`, normalised, with its image-token count."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    _check_view_size("base_size", base_size)
    _check_crops(min_crops, max_crops)
    grid = _local_grid(width, height, image_size, crop, min_crops, max_crops)  # validates the rest
    rgb = _to_rgb(image)

    tiles = _cut_tiles(rgb, grid, image_size) if grid is not None else None

    if not crop and image_size <= _STRETCH_MAX_IMAGE_SIZE:
        # Tiny and small modes see the page squashed to a square (the reference's behaviour), not padded.
        rgb = _resize(rgb, (image_size, image_size))  # a strip: reduced first, see _resize
    padded = _pad_square(rgb, base_size)
    global_view = _normalise(np.asarray(padded).transpose(2, 0, 1).copy())

    return ImageInputs(
        global_view=global_view,
        tiles=tiles,
        grid=grid if grid is not None else (1, 1),
        base_size=base_size,
        image_size=image_size,
        image_tokens=_tokens(base_size, image_size, grid),
    )


# DeepSeek-OCR-2 (FACTS section 8): v1's views at v2's sizes, with v2's token count (process/modes.py).
def preprocess_v2(
    image: Image.Image,
    base_size: int = 1024,
    image_size: int = 768,
    crop: bool = True,
    min_crops: int = 2,
    max_crops: int = 6,
) -> ImageInputs:
    """DeepSeek-OCR-2 views of `image`: v1's views at v2's sizes, with the v2 token count."""
    inputs = preprocess(image, base_size, image_size, crop, min_crops, max_crops)
    grid = inputs.grid if inputs.tiles is not None else None
    inputs.image_tokens = _tokens_v2(base_size, image_size, grid)
    return inputs
