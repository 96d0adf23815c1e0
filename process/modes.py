"""DeepSeek-OCR's resolution modes and image-token arithmetic: plain data and integer maths, no torch.

The modes (base_size / image_size / crop): tiny 512/512/no, small 640/640/no, base 1024/1024/no,
large 1280/1280/no, gundam 1024/640/yes; DeepSeek-OCR-2 serves one gundam-like mode of 1024/768. The
number of `<image>` placeholder tokens follows from the sizes and the tiling grid alone, so the HTTP process
counts tokens and checks modes without the model code (`process/image_process.py` makes the tensors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# The architectures a checkpoint's config.json names, by our short name.
ARCHITECTURES = {"ocr": "DeepseekOCRForCausalLM", "ocr2": "DeepseekOCR2ForCausalLM"}

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
