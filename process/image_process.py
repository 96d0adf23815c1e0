"""Image preprocessing for DeepSeek-OCR: resolution modes, tiling grid, views and image-token counts.

One image becomes a padded square *global view* (base_size) and, in crop ("Gundam") mode for images larger
than a tile, a grid of *local tiles* (image_size each). The number of `<image>` placeholder tokens the
prompt needs follows from the sizes and the grid alone, so `count_image_tokens` answers it without touching
pixels and `preprocess` returns the same figure together with the tensors.

The modes (base_size / image_size / crop): tiny 512/512/no, small 640/640/no, base 1024/1024/no,
large 1280/1280/no, gundam 1024/640/yes. Plain functions on PIL images and tensors, no service imports.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PATCH_SIZE = 16
DOWNSAMPLE = 4
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255): the normalisation mean, so padding encodes to ~0

@dataclass(frozen=True)
class ModeSpec:
    """One resolution preset of DeepSeek-OCR (FACTS section 3)."""

    name: str
    base_size: int
    image_size: int
    crop: bool
    description: str


# The one mode table: settings, schemas, engines and the CLI read it from here.
MODES: dict[str, ModeSpec] = {
    m.name: m
    for m in (
        ModeSpec("tiny", 512, 512, False, "512x512 global view only: 73 image tokens"),
        ModeSpec("small", 640, 640, False, "640x640 global view only: 111 image tokens"),
        ModeSpec("base", 1024, 1024, False, "1024x1024 padded global view: 273 image tokens"),
        ModeSpec("large", 1280, 1280, False, "1280x1280 padded global view: 421 image tokens"),
        ModeSpec(
            "gundam",
            1024,
            640,
            True,
            "1024 global view + 2..6 tiles of 640 for images over 640 px: 273 to 933 image tokens",
        ),
    )
}
DEFAULT_MODE = "gundam"

# One query per PATCH_SIZE * DOWNSAMPLE pixels; view sizes must be whole multiples of it.
_SIZE_STEP = PATCH_SIZE * DOWNSAMPLE
# The reference resizes with PIL's default for RGB, which is bicubic; keep it so pixels match.
_RESAMPLE = Image.Resampling.BICUBIC
# Beyond this side length the reference stretches the global view to image_size square in no-crop modes.
_STRETCH_MAX_IMAGE_SIZE = 640


def _check_positive_int(name: str, value: int) -> None:
    # bool is an int subclass; True as a width is a caller bug, not a 1-pixel image.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_view_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value % _SIZE_STEP:
        raise ValueError(f"{name} must be a positive multiple of {_SIZE_STEP}, got {value!r}")


def _check_crops(min_crops: int, max_crops: int) -> None:
    _check_positive_int("min_crops", min_crops)
    if not isinstance(max_crops, int) or isinstance(max_crops, bool) or max_crops < min_crops:
        raise ValueError(f"max_crops must be an integer >= min_crops ({min_crops}), got {max_crops!r}")


def num_queries(size: int) -> int:
    """Queries per side of a `size`-pixel view: ceil((size / PATCH_SIZE) / DOWNSAMPLE)."""
    _check_positive_int("size", size)
    return -(-size // _SIZE_STEP)  # integer ceil; equal to the float formula for every int size


@functools.cache
def _candidate_grids(min_crops: int, max_crops: int) -> tuple[tuple[int, int], ...]:
    # Built exactly like the reference (a set over this loop, then a stable sort by tile count): tuples of
    # small ints hash deterministically, so the order inside one tile count - which decides exact ties in
    # choose_grid - is the reference's order too.
    grids = {
        (i, j)
        for n in range(min_crops, max_crops + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_crops <= i * j <= max_crops
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def candidate_grids(min_crops: int = 2, max_crops: int = 6) -> list[tuple[int, int]]:
    """All tile grids (tw, th) with min_crops <= tw*th <= max_crops, in the reference's order (by tw*th)."""
    _check_crops(min_crops, max_crops)
    return list(_candidate_grids(min_crops, max_crops))


def choose_grid(
    width: int, height: int, image_size: int = 640, min_crops: int = 2, max_crops: int = 6
) -> tuple[int, int]:
    """The grid (tw, th) whose aspect tw/th is closest to width/height.

    On an exact tie with the best so far, a later (larger) grid wins only if the image has more than half
    a tile of pixels per tile of that grid: width*height > 0.5 * image_size**2 * tw*th.
    """
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    _check_view_size("image_size", image_size)
    _check_crops(min_crops, max_crops)
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for tw, th in _candidate_grids(min_crops, max_crops):
        diff = abs(aspect - tw / th)
        if diff < best_diff:
            best, best_diff = (tw, th), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * tw * th:
            best = (tw, th)
    return best


def is_tiled(width: int, height: int, image_size: int, crop: bool) -> bool:
    """Whether the crop path runs: crop mode on and the image wider or taller than one tile."""
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    _check_view_size("image_size", image_size)
    return bool(crop) and (width > image_size or height > image_size)


def _local_grid(
    width: int, height: int, image_size: int, crop: bool, min_crops: int, max_crops: int
) -> tuple[int, int] | None:
    """The grid of local tiles, or None when the image gets only the global view."""
    if not is_tiled(width, height, image_size, crop):
        return None
    grid = choose_grid(width, height, image_size, min_crops, max_crops)
    # A 1x1 grid (reachable only with min_crops=1) adds no local view in the reference: one tile of the
    # whole image says nothing the global view does not, and the model skips it.
    return grid if grid != (1, 1) else None


def _tokens(base_size: int, image_size: int, grid: tuple[int, int] | None) -> int:
    q_b = num_queries(base_size)
    tokens = q_b * (q_b + 1) + 1  # global rows each closed by image_newline, then view_seperator
    if grid is not None:
        tw, th = grid
        q_i = num_queries(image_size)
        tokens += q_i * th * (q_i * tw + 1)
    return tokens


def count_image_tokens(
    width: int,
    height: int,
    base_size: int,
    image_size: int,
    crop: bool,
    min_crops: int = 2,
    max_crops: int = 6,
) -> int:
    """Number of `<image>` placeholders for a width x height image; no pixels are touched."""
    _check_view_size("base_size", base_size)
    _check_crops(min_crops, max_crops)
    grid = _local_grid(width, height, image_size, crop, min_crops, max_crops)
    return _tokens(base_size, image_size, grid)


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


# ------------------------------------------------------------------------------------ DeepSeek-OCR-2
# v2 (FACTS section 8) keeps the v1 views (padded 1024 global view, closest-aspect grid of stretched tiles)
# with 768 px tiles, but each view gives (S/64)^2 tokens from learned queries: no row-end newline tokens.

# The one mode of DeepSeek-OCR-2; its name is the v1 mode it resembles (global view + tiles).
MODES_V2: dict[str, ModeSpec] = {
    "gundam": ModeSpec(
        "gundam",
        1024,
        768,
        True,
        "1024 global view + 2..6 tiles of 768 for images over 768 px: 257 to 1121 image tokens",
    ),
}
_MODES_BY_ARCH: dict[str, dict[str, ModeSpec]] = {"ocr": MODES, "ocr2": MODES_V2}


def modes_for(arch: str) -> dict[str, ModeSpec]:
    """The modes a model architecture serves: "ocr" (DeepSeek-OCR) or "ocr2" (DeepSeek-OCR-2)."""
    if arch not in _MODES_BY_ARCH:
        raise ValueError(f"arch must be one of {sorted(_MODES_BY_ARCH)}, got {arch!r}")
    return _MODES_BY_ARCH[arch]


def _tokens_v2(base_size: int, image_size: int, grid: tuple[int, int] | None) -> int:
    q_b = num_queries(base_size)
    tokens = q_b * q_b + 1  # global view's queries, then view_seperator
    if grid is not None:
        q_i = num_queries(image_size)
        tokens += q_i * q_i * grid[0] * grid[1]
    return tokens


def count_image_tokens_v2(
    width: int,
    height: int,
    base_size: int = 1024,
    image_size: int = 768,
    crop: bool = True,
    min_crops: int = 2,
    max_crops: int = 6,
) -> int:
    """DeepSeek-OCR-2 `<image>` placeholders for a width x height image (256 + 144 x tiles + 1); no pixels."""
    _check_view_size("base_size", base_size)
    _check_crops(min_crops, max_crops)
    return _tokens_v2(base_size, image_size, _local_grid(width, height, image_size, crop, min_crops, max_crops))


def count_image_tokens_for(
    arch: str, width: int, height: int, mode: str, min_crops: int = 2, max_crops: int = 6
) -> int:
    """Image tokens of a width x height image in `mode` of the model architecture `arch`."""
    modes = modes_for(arch)
    if mode not in modes:
        raise ValueError(f"mode {mode!r} is not served by {arch}; its modes: {', '.join(modes)}")
    spec = modes[mode]
    count = count_image_tokens_v2 if arch == "ocr2" else count_image_tokens
    return count(width, height, spec.base_size, spec.image_size, spec.crop, min_crops, max_crops)


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
