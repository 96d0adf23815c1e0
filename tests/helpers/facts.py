"""Image-token counts by DEEPSEEK_OCR_FACTS section 3, written out independently of process/image_process.py,
so the service's own count is checked against a second reading of the facts."""

from __future__ import annotations

import math

MODE_SIZES = {
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}


def facts_grid(w: int, h: int) -> tuple[int, int]:
    grids = sorted(
        {(i, j) for n in range(2, 7) for i in range(1, n + 1) for j in range(1, n + 1) if 2 <= i * j <= 6},
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for tw, th in grids:
        diff = abs(w / h - tw / th)
        if diff < best_diff:
            best, best_diff = (tw, th), diff
        elif diff == best_diff and w * h > 0.5 * 640 * 640 * tw * th:
            best = (tw, th)
    return best


def facts_image_tokens(w: int, h: int, mode: str) -> int:
    base, size, crop = MODE_SIZES[mode]
    q_b, q_i = math.ceil(base / 16 / 4), math.ceil(size / 16 / 4)
    tokens = q_b * (q_b + 1) + 1
    if crop and (w > size or h > size):
        tw, th = facts_grid(w, h)
        tokens += q_i * th * (q_i * tw + 1)
    return tokens


