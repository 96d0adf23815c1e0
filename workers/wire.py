"""The worker socket's framing: length-prefixed pickles between the server and its own engine workers.

Both ends are this project's processes on one host, started by the server over a socket pair, so pickle
is the encoding (PIL images pickle as their raw pixels, no PNG round trip). Errors cross as the `OcrError`
class name, detail, headers and extra fields, and are rebuilt on the other side, so a worker's 400 is the
client's 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import pickle
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from PIL import Image

import errors
from errors import OcrError

if TYPE_CHECKING:
    from engines.base import EngineRequest

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31  # 2 GiB: larger than any image admission lets through
CHUNK = 1 << 20  # image pixels cross the socket in bands of rows of about a megabyte


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; `asyncio.IncompleteReadError` at end of stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"worker frame of {size} bytes is over {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(size))


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def request_frames(request: EngineRequest) -> tuple[bytes, Image.Image | None]:
    """A ("run", ...) message, and the image whose raw pixels follow it (`write_pixels`).

    The pixels are never pickled or copied whole: a 40 MP page is 120 MB, and pickling it on the event loop
    held the server's GIL for half a second per image (`/health` stalled 2 s on a batch of them), while one
    `tobytes` copy doubled the page in the server for as long as it took to send.
    """
    image = request.image
    if image is None:
        return frame(("run", request, None, 0)), None
    header = dataclasses.replace(request, image=None)
    size = row_bytes(image.mode, image.width) * image.height
    return frame(("run", header, (image.mode, image.size), size)), image


def row_bytes(mode: str, width: int) -> int:
    """Raw bytes of `width` pixels of `mode` (PIL's raw layout), without touching any image."""
    if mode == "1":
        return (width + 7) // 8  # a bit a pixel, each row padded to a byte
    return width * _pixel_bytes(mode)


@functools.cache
def _pixel_bytes(mode: str) -> int:
    return len(Image.new(mode, (1, 1)).tobytes())


def tiles(mode: str, width: int, height: int) -> Iterator[tuple[int, int, int, int]]:
    """The boxes an image crosses the socket in, in order, each about CHUNK bytes: bands of whole rows, or
    pieces of one row where a row alone is larger (a 1 x 40,000,000 strip is 120 MB a row). Both ends make
    the same boxes from the image's mode and size."""
    row = row_bytes(mode, width)
    if row <= CHUNK or mode == "1":  # a 1-bit row is whole bytes only at its end: never split
        rows = max(1, CHUNK // max(1, row))
        for top in range(0, height, rows):
            yield 0, top, width, min(height, top + rows)
        return
    step = max(1, width * CHUNK // row)
    for top in range(height):
        for left in range(0, width, step):
            yield left, top, min(width, left + step), top + 1


async def write_pixels(writer: asyncio.StreamWriter, image: Image.Image | None) -> None:
    """Send the image's raw pixels a tile (about CHUNK bytes) at a time, draining between: neither this
    process nor the transport ever holds a second copy of the whole image. The caller holds the
    connection's send lock from the header to the last tile."""
    if image is None:
        return
    for box in tiles(image.mode, *image.size):
        # Off the event loop: an A4 page's copies take ~5 ms, which the loop has better uses for.
        writer.write(await asyncio.to_thread(_copy, image, box))
        await writer.drain()


def _copy(image: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    return image.crop(box).tobytes()


def _paste(image: Image.Image, data: bytes, box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    image.paste(Image.frombytes(image.mode, (right - left, bottom - top), data), (left, top))


async def read_request(message: tuple[Any, ...], reader: asyncio.StreamReader) -> EngineRequest:
    """The request of a ("run", ...) message, its image rebuilt tile by tile from the raw pixels that
    follow it: the image and one tile exist here, never a whole raw copy beside the image."""
    _, request, meta, size = message
    if size > MAX_FRAME:
        raise ValueError(f"worker image of {size} bytes is over {MAX_FRAME}")
    if meta is None:
        return request
    mode, (width, height) = meta
    if height < 1 or width < 1 or row_bytes(mode, width) * height != size:
        raise ValueError(f"worker image of {width}x{height} ({mode}) cannot be {size} bytes")
    image = await asyncio.to_thread(Image.new, mode, (width, height))
    for box in tiles(mode, width, height):
        left, top, right, bottom = box
        data = await reader.readexactly(row_bytes(mode, right - left) * (bottom - top))
        await asyncio.to_thread(_paste, image, data, box)
        del data
    request.image = image
    return request


def encode_error(exc: BaseException) -> tuple[str, str, dict[str, str], dict[str, Any]]:
    if isinstance(exc, OcrError):
        return type(exc).__name__, exc.detail, exc.headers, exc.extra
    return "OcrError", f"the engine worker failed on this request: {type(exc).__name__}: {exc}", {}, {}


def decode_error(encoded: tuple[str, str, dict[str, str], dict[str, Any]]) -> OcrError:
    name, detail, headers, extra = encoded
    cls = getattr(errors, name, OcrError)
    if not (isinstance(cls, type) and issubclass(cls, OcrError)):
        cls = OcrError
    exc = cls.__new__(cls)
    OcrError.__init__(exc, detail, headers=headers, **extra)
    return exc
