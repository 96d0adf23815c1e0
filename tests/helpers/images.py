"""Images built on the fly: flat PNGs, JPEGs with an EXIF orientation, noise, and PNGs of any size written
without allocating their pixels."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(width: int = 64, height: int = 48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(width: int, height: int, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (width, height), (240, 240, 240))
    image.paste((0, 0, 0), (0, 0, width // 4, height // 4))
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buf, "JPEG", exif=exif)
    return buf.getvalue()



def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (48, 32), seed: int = 0) -> bytes:
    """Noise, so a PNG does not compress to a few bytes and truncating it cuts into the pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()



def png_image(width: int, height: int) -> bytes:
    """A grey PNG of any size, written directly (Pillow would allocate the pixels first)."""
    row = b"\x00" + b"\x80" * width
    body = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


