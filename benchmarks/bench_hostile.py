"""How fast hostile inputs are refused: the figures tests/test_hostile.py used to assert as wall-clock bounds.

The tests check which guard refused each input (the setting named in the problem's detail); the time it took
depends on the machine and its load, so it is printed here instead:

    python benchmarks/bench_hostile.py

- an object-stream bomb (16 MB of deflated zeros before the catalog), refused by PDF_MAX_STREAM_MB;
- a progressive JPEG of 20,000 empty scans, refused by JPEG_MAX_SCANS (image_info and decode_image);
- the header of a 40 MP PNG read by image_info, beside a full decode of the same file.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers.hostile import objstm_bomb, progressive_jpeg  # noqa: E402
from helpers.images import png_image  # noqa: E402

import images  # noqa: E402  (the repository root is on sys.path only from here)
from errors import OcrError  # noqa: E402
from pdf.limits import PdfLimits  # noqa: E402
from pdf.render_pool import RenderPool  # noqa: E402

LIMITS = PdfLimits(max_stream_mb=8, max_objects=100_000, max_image_pixels=50_000_000, max_jpeg_scans=100)
BIG = 100_000_000


def timed(fn) -> tuple[float, str]:
    started = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except OcrError as err:
        outcome = f"{err.status} {err.detail[:60]}"
    return time.perf_counter() - started, outcome


def bomb() -> None:
    pool = RenderPool(1, limits=LIMITS, page_timeout_s=30.0, open_timeout_s=30.0, memory_limit_mb=1024)

    async def render() -> None:
        async with pool.document(objstm_bomb(16 << 20), password=None, max_pages=10) as doc:
            await doc.render(1, dpi=72, max_pixels=BIG)

    try:
        asyncio.run(render())
    finally:
        pool.close()


def main() -> None:
    jpeg, png = progressive_jpeg(20_000), png_image(8000, 5000)
    rows = [
        ("objstm bomb, 16 MB of zeros (render pool, 1 worker)", bomb),
        ("progressive JPEG, 20,000 scans: image_info", lambda: images.image_info(jpeg)),
        ("progressive JPEG, 20,000 scans: decode_image", lambda: images.decode_image(jpeg, max_pixels=BIG)),
        ("40 MP PNG: image_info (header only)", lambda: images.image_info(png, max_pixels=BIG)),
        ("40 MP PNG: decode_image (every pixel)", lambda: images.decode_image(png, max_pixels=BIG)),
    ]
    for name, fn in rows:
        seconds, outcome = timed(fn)
        print(f"{seconds * 1000:9.1f} ms  {name}: {outcome}")


if __name__ == "__main__":
    main()
