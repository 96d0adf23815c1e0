"""The `decode` stage alone (issue 29): what the service does to an uploaded page before the engine sees it,
on an A4 page at 144 dpi (1190 x 1684) as PNG and as JPEG.

    python benchmarks/bench_decode.py [--repeat 30]

Prints the median milliseconds of each step the `Server-Timing: decode` stage holds: the header read
(`images.image_info`), the decode to RGB as the user sees it (`images.decode_image`: Pillow's decode, the EXIF
orientation, the conversion), and the pixels' hash (`images.content_hash`); and Pillow's bare decode
(`Image.open(...).load()`), which raw vLLM pays too. One thread, no server: the figures are the CPU's own.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

A4 = (1190, 1684)


def page(fmt: str) -> bytes:
    """A page of dark text on white, encoded as `fmt`."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", A4, "white")
    draw = ImageDraw.Draw(image)
    for y in range(20, A4[1] - 24, 18):
        draw.text((30, y), "Invoice 2026-12 line item, quantity 3, unit price 12.50 EUR, total 37.50 EUR " * 2,
                  fill="black")
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def median_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # first use (imports, plugin registration) is not counted
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    from PIL import Image

    import images
    from config import Settings

    settings = Settings()
    limits = {"max_pixels": settings.max_image_pixels, "max_photo_pixels": int(settings.max_photo_mpix * 1e6),
              "max_aspect": settings.max_image_aspect}
    for fmt in ("PNG", "JPEG"):
        data = page(fmt)
        decoded = images.decode_image(data, **limits)
        steps = {
            "image_info": median_ms(lambda data=data: images.image_info(data, **limits), args.repeat),
            "decode_image": median_ms(lambda data=data: images.decode_image(data, **limits), args.repeat),
            "content_hash": median_ms(lambda decoded=decoded: images.content_hash(decoded), args.repeat),
            "pillow_load": median_ms(lambda data=data: Image.open(io.BytesIO(data)).load(), args.repeat),
        }
        stage = steps["image_info"] + steps["decode_image"] + steps["content_hash"]
        print(f"{fmt:4} {len(data) / 1024:7.0f} KiB  " + "  ".join(f"{k} {v:6.2f} ms" for k, v in steps.items())
              + f"  stage {stage:6.2f} ms")


if __name__ == "__main__":
    main()
