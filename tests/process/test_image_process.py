"""Tests for process/image_process.py: token counts, grid choice, views, normalisation and padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from process.image_process import (
    PAD_COLOR,
    ImageInputs,
    candidate_grids,
    choose_grid,
    count_image_tokens,
    is_tiled,
    num_queries,
    preprocess,
)

# name: (base_size, image_size, crop), from the FACTS mode table.
MODES = {
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}

SIZES = [
    (1, 1),
    (1, 5000),
    (5000, 1),
    (300, 200),
    (200, 300),
    (640, 640),
    (641, 640),
    (640, 641),
    (1190, 1684),  # A4 portrait at 144 dpi
    (1684, 1190),  # A4 landscape at 144 dpi
    (1000, 800),
    (1250, 1000),
    (2500, 1000),
    (1920, 1080),
    (3000, 3000),
    (8000, 300),
    (300, 8000),
]


def norm(values: object) -> torch.Tensor:
    """Pixel values normalised as the reference does, in float32: to [0,1], then (x - 0.5) / 0.5."""
    return (torch.tensor(np.array(values), dtype=torch.float32) / 255 - 0.5) / 0.5


PAD_VALUE = norm(127)


def expected_grid(
    width: int, height: int, image_size: int, min_crops: int, max_crops: int
) -> tuple[int, int]:
    """The FACTS grid rule written out plainly, independently of the module."""
    grids = sorted(
        {
            (i, j)
            for n in range(min_crops, max_crops + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_crops <= i * j <= max_crops
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), math.inf
    for tw, th in grids:
        diff = abs(width / height - tw / th)
        if diff < best_diff:
            best, best_diff = (tw, th), diff
        elif diff == best_diff and width * height > 0.5 * image_size**2 * tw * th:
            best = (tw, th)
    return best


def expected_tokens(
    width: int, height: int, base: int, image: int, crop: bool, min_crops: int = 2, max_crops: int = 6
) -> int:
    q_b = math.ceil((base / 16) / 4)
    q_i = math.ceil((image / 16) / 4)
    tokens = q_b * (q_b + 1) + 1
    if crop and (width > image or height > image):
        tw, th = expected_grid(width, height, image, min_crops, max_crops)
        if (tw, th) != (1, 1):
            tokens += q_i * th * (q_i * tw + 1)
    return tokens


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


# ---------------------------------------------------------------- token counts


def test_num_queries() -> None:
    assert [num_queries(s) for s in (512, 640, 1024, 1280)] == [8, 10, 16, 20]
    assert num_queries(1) == 1 and num_queries(64) == 1 and num_queries(65) == 2


@pytest.mark.parametrize(
    ("size", "mode", "tokens"),
    [
        ((1, 1), "gundam", 273),  # 16*17 + 1: global view only
        ((640, 640), "gundam", 273),
        ((300, 500), "gundam", 273),
        ((1190, 1684), "gundam", 903),  # 2x3: 273 + 10*3*(10*2+1) = 273 + 630
        ((300, 8000), "gundam", 933),  # 1x6: 273 + 10*6*(10*1+1) = 273 + 660
        ((8000, 300), "gundam", 883),  # 6x1: 273 + 10*1*(10*6+1) = 273 + 610
        ((641, 640), "gundam", 693),  # 2x2: 273 + 10*2*21
        ((1190, 1684), "tiny", 73),  # 8*9 + 1
        ((1190, 1684), "small", 111),  # 10*11 + 1
        ((1190, 1684), "base", 273),  # 16*17 + 1
        ((1190, 1684), "large", 421),  # 20*21 + 1
        ((8000, 300), "large", 421),
    ],
)
def test_token_anchors(size: tuple[int, int], mode: str, tokens: int) -> None:
    assert count_image_tokens(*size, *MODES[mode]) == tokens
    assert expected_tokens(*size, *MODES[mode]) == tokens


@pytest.mark.parametrize("mode", MODES)
def test_token_count_matches_formula_sweep(mode: str) -> None:
    small = [1, 2, 63, 64, 300, 511, 512, 513, 639, 640, 641, 700, 960, 1024]
    sides = small + [1190, 1280, 1281, 1684, 2000, 2500, 3300, 5000, 8000]
    base, image, crop = MODES[mode]
    for w in sides:
        for h in sides:
            expected = expected_tokens(w, h, base, image, crop)
            assert count_image_tokens(w, h, base, image, crop) == expected, (w, h)


def test_is_tiled() -> None:
    assert not is_tiled(640, 640, 640, True)
    assert is_tiled(641, 640, 640, True) and is_tiled(640, 641, 640, True)
    assert not is_tiled(8000, 300, 640, False)


# ---------------------------------------------------------------- grid choice


def test_candidate_grids_default() -> None:
    grids = candidate_grids()
    by_product = {2: [(1, 2), (2, 1)], 3: [(1, 3), (3, 1)], 4: [(1, 4), (2, 2), (4, 1)],
                  5: [(1, 5), (5, 1)], 6: [(1, 6), (2, 3), (3, 2), (6, 1)]}  # fmt: skip
    assert sorted(grids) == sorted(g for group in by_product.values() for g in group)
    products = [tw * th for tw, th in grids]
    assert products == sorted(products)
    assert (3, 3) in candidate_grids(2, 9) and (3, 3) not in grids
    assert candidate_grids(1, 1) == [(1, 1)]


@pytest.mark.parametrize(
    ("size", "kwargs", "grid"),
    [
        # 1190/1684 = 0.707: (2,3) = 0.667 is closest (next: (1,2) 0.5, (2,2) 1.0).
        ((1190, 1684), {}, (2, 3)),
        ((1684, 1190), {}, (3, 2)),
        ((641, 640), {}, (2, 2)),
        ((8000, 300), {}, (6, 1)),
        ((300, 8000), {}, (1, 6)),
        # Exact tie at aspect 1.25: (2,2) (|1.25-1| = 0.25, 4 tiles) is met first, (3,2) (|1.25-1.5| = 0.25,
        # 6 tiles) later; (3,2) wins only if W*H > 0.5*640^2*6 = 1,228,800.
        ((1250, 1000), {}, (3, 2)),  # 1,250,000 > 1,228,800
        ((1000, 800), {}, (2, 2)),  # 800,000: stays (2,2)
        # Exact tie at aspect 2.5 between (2,1) and (3,1) (both 0.5 away); bar 0.5*640^2*3 = 614,400.
        ((2500, 1000), {}, (3, 1)),
        ((250, 100), {}, (2, 1)),
        # 2:1 matches (2,1) and, with max_crops >= 8, (4,2) exactly; (4,2) needs
        # W*H > 0.5*640^2*8 = 1,638,400.
        ((1280, 640), {"max_crops": 9}, (2, 1)),  # 819,200: stays (2,1)
        ((2560, 1280), {"max_crops": 9}, (4, 2)),  # 3,276,800
        ((2560, 1280), {}, (2, 1)),  # (4,2) is not a candidate with 6 tiles at most
        # Square: (2,2) first, (3,3) (9 tiles, max_crops=9) needs W*H > 0.5*640^2*9 = 1,843,200.
        ((1920, 1920), {"max_crops": 9}, (3, 3)),
        ((1000, 1000), {"max_crops": 9}, (2, 2)),
        # min_crops=1 makes (1,1) a candidate; (2,2) ties it and needs 819,200 > 490,000: stays (1,1).
        ((700, 700), {"min_crops": 1}, (1, 1)),
    ],
)
def test_choose_grid_anchors(size: tuple[int, int], kwargs: dict, grid: tuple[int, int]) -> None:
    assert choose_grid(*size, **kwargs) == grid
    assert expected_grid(*size, 640, kwargs.get("min_crops", 2), kwargs.get("max_crops", 6)) == grid


def test_choose_grid_uses_image_size_for_the_tie_bar() -> None:
    # Same 1.25 tie as above; with 512 tiles the bar is 0.5*512^2*6 = 786,432 < 800,000.
    assert choose_grid(1000, 800, image_size=512) == (3, 2)


def test_max_crops_configurable_tokens() -> None:
    # 3x3 of 640 tiles: 273 + 10*3*(10*3+1) = 1203.
    assert count_image_tokens(1920, 1920, 1024, 640, True, max_crops=9) == 1203
    assert count_image_tokens(1920, 1920, 1024, 640, True) == 273 + 10 * 2 * 21  # 2x2 at most 6 tiles
    # A 1x1 grid adds no local view (as in the reference): global view only.
    assert count_image_tokens(700, 700, 1024, 640, True, min_crops=1) == 273


# ---------------------------------------------------------------- preprocess


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_preprocess_shapes_and_tokens(size: tuple[int, int], mode: str) -> None:
    base, image, crop = MODES[mode]
    out = preprocess(noise_image(*size), base, image, crop)
    assert isinstance(out, ImageInputs)
    assert (out.base_size, out.image_size) == (base, image)
    assert out.global_view.shape == (3, base, base) and out.global_view.dtype == torch.float32
    assert out.image_tokens == count_image_tokens(*size, base, image, crop)
    assert out.image_tokens == expected_tokens(*size, base, image, crop)
    views = [out.global_view]
    if crop and (size[0] > image or size[1] > image):
        tw, th = expected_grid(*size, image, 2, 6)
        assert out.grid == (tw, th)
        assert out.tiles is not None and out.tiles.shape == (tw * th, 3, image, image)
        assert out.tiles.dtype == torch.float32
        views.append(out.tiles)
    else:
        assert out.grid == (1, 1) and out.tiles is None
    for view in views:
        assert view.min() >= -1.0 and view.max() <= 1.0
        assert view.std() > 0  # some image content survived, even of a 1x5000 strip


def _pad_columns(view: torch.Tensor) -> int:
    """Number of columns entirely equal to the pad value on all three channels."""
    return int((view == PAD_VALUE).all(dim=0).all(dim=0).sum())


def _edge_run(mask: torch.Tensor) -> tuple[int, int]:
    """Lengths of the leading and trailing runs of True."""
    flags = mask.tolist()
    lead = next((i for i, f in enumerate(flags) if not f), len(flags))
    trail = next((i for i, f in enumerate(reversed(flags)) if not f), len(flags))
    return lead, trail


@pytest.mark.parametrize("mode", ["base", "large", "gundam"])
@pytest.mark.parametrize("size", [(1190, 1684), (1684, 1190), (300, 200), (8000, 300)])
def test_global_view_padding(size: tuple[int, int], mode: str) -> None:
    base, image, crop = MODES[mode]
    color = (200, 30, 90)
    out = preprocess(Image.new("RGB", size, color), base, image, crop)
    view = out.global_view
    is_pad = (view == PAD_VALUE).all(dim=0)  # (base, base)
    w, h = size
    if w < h:  # portrait: pad columns left and right
        lead, trail = _edge_run(is_pad.all(dim=0))
        content = base * w / h
    else:  # landscape: pad rows above and below
        lead, trail = _edge_run(is_pad.all(dim=1))
        content = base * h / w
    assert abs((base - lead - trail) - content) <= 1  # aspect kept
    assert abs(lead - trail) <= 1  # centred
    assert lead > 0
    # The middle of the view is the image colour, normalised.
    assert torch.equal(view[:, base // 2, base // 2], norm(color))
    # Padding is exactly PAD_COLOR normalised, on every channel.
    assert PAD_COLOR == (127, 127, 127)
    assert torch.all(view[:, 0, 0] == PAD_VALUE)


@pytest.mark.parametrize("size", [(1190, 1684), (1684, 1190), (333, 1000), (1000, 1000)])
def test_global_view_matches_imageops_pad(size: tuple[int, int]) -> None:
    # The reference builds the global view with ImageOps.pad; ours must agree pixel for pixel.
    image = noise_image(*size)
    padded = ImageOps.pad(image, (1024, 1024), method=Image.Resampling.BICUBIC, color=PAD_COLOR)
    expected = norm(np.asarray(padded)).permute(2, 0, 1)
    assert torch.equal(preprocess(image, 1024, 640, True).global_view, expected)


def test_thin_strip_keeps_one_column() -> None:
    # ImageOps.pad would round a 1x5000 strip to 0 columns at 1024; we keep one, centred.
    out = preprocess(Image.new("RGB", (1, 5000), (0, 0, 0)), 1024, 1024, False)
    is_content = ~(out.global_view == PAD_VALUE).all(dim=0).all(dim=0)
    assert is_content.nonzero().flatten().tolist() == [512]


def test_gundam_small_image_padded_to_base_not_tiled() -> None:
    out = preprocess(Image.new("RGB", (600, 300), (0, 0, 0)), 1024, 640, True)
    assert out.tiles is None and out.grid == (1, 1) and out.global_view.shape == (3, 1024, 1024)
    lead, trail = _edge_run((out.global_view == PAD_VALUE).all(dim=0).all(dim=1))
    assert lead + trail == 1024 - 512  # 600x300 scaled to 1024x512


@pytest.mark.parametrize("mode", ["tiny", "small"])
def test_tiny_small_stretch_without_padding(mode: str) -> None:
    base, image, crop = MODES[mode]
    out = preprocess(Image.new("RGB", (1190, 1684), (10, 250, 40)), base, image, crop)
    assert _pad_columns(out.global_view) == 0
    assert torch.equal(out.global_view, norm((10, 250, 40)).view(3, 1, 1).expand(3, base, base))


def test_tiles_are_row_by_row() -> None:
    # A 1190x1684 image (grid 2x3) painted as 2 columns x 3 rows of distinct colours, block boundaries at
    # the same fractions as the tile boundaries after stretching.
    tw, th = 2, 3
    colours = [(40 * k, 255 - 40 * k, 20 + 30 * k) for k in range(tw * th)]
    arr = np.zeros((1684, 1190, 3), dtype=np.uint8)
    xs = [round(1190 * c / tw) for c in range(tw + 1)]
    ys = [round(1684 * r / th) for r in range(th + 1)]
    for k, colour in enumerate(colours):
        r, c = divmod(k, tw)
        arr[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = colour
    out = preprocess(Image.fromarray(arr), 1024, 640, True)
    assert out.grid == (tw, th) and out.tiles is not None
    for k, colour in enumerate(colours):
        assert torch.equal(out.tiles[k, :, 320, 320], norm(colour)), k


def test_max_crops_9_gives_3x3_tiles() -> None:
    out = preprocess(noise_image(1920, 1920), 1024, 640, True, max_crops=9)
    assert out.grid == (3, 3) and out.tiles is not None and out.tiles.shape == (9, 3, 640, 640)
    assert out.image_tokens == 1203


def test_single_tile_grid_is_global_only() -> None:
    out = preprocess(noise_image(700, 700), 1024, 640, True, min_crops=1)
    assert out.grid == (1, 1) and out.tiles is None and out.image_tokens == 273


@pytest.mark.parametrize("pil_mode", ["L", "1", "P", "CMYK", "RGBA", "LA", "I;16", "F"])
def test_any_pil_mode(pil_mode: str) -> None:
    image = noise_image(900, 700).convert(pil_mode) if pil_mode != "I;16" else None
    if image is None:
        image = Image.fromarray(np.full((700, 900), 40000, dtype=np.uint16))
        assert image.mode == "I;16"
    out = preprocess(image, 1024, 640, True)
    assert out.global_view.shape == (3, 1024, 1024) and out.tiles is not None
    assert out.global_view.min() >= -1 and out.global_view.max() <= 1


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((100, 100), 257 * 100, dtype=np.uint16))
    out = preprocess(image, 512, 512, False)
    assert torch.equal(out.global_view, norm(100).expand(3, 512, 512))


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    out = preprocess(image, 512, 512, False)
    assert torch.all(out.global_view == 1.0)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_size": 1000}, "1000"),
        ({"image_size": 600}, "600"),
        ({"base_size": 0}, "base_size"),
        ({"min_crops": 0}, "min_crops"),
        ({"min_crops": 3, "max_crops": 2}, "max_crops"),
    ],
)
def test_preprocess_rejects_bad_settings(kwargs: dict, match: str) -> None:
    args = {"base_size": 1024, "image_size": 640, "crop": True} | kwargs
    with pytest.raises(ValueError, match=match):
        preprocess(noise_image(10, 10), **args)
    with pytest.raises(ValueError, match=match):
        count_image_tokens(10, 10, **args)


def test_rejects_bad_dimensions() -> None:
    with pytest.raises(ValueError, match="width"):
        count_image_tokens(0, 10, 1024, 640, True)
    with pytest.raises(ValueError, match="height"):
        choose_grid(10, -3)
    with pytest.raises(ValueError, match="width"):
        preprocess(Image.new("RGB", (0, 10)), 1024, 640, True)
    with pytest.raises(ValueError, match="size"):
        num_queries(0)
    with pytest.raises(ValueError, match="max_crops"):
        candidate_grids(4, 3)
    with pytest.raises(TypeError, match="PIL"):
        preprocess(np.zeros((10, 10, 3)), 1024, 640, True)  # type: ignore[arg-type]
