"""The worker socket's framing: length-prefixed pickles between the server and its own engine workers.

Both ends are this project's processes on one host, started by the server over a socket pair, so pickle
is the encoding (PIL images pickle as their raw pixels, no PNG round trip). Errors cross as the `OcrError`
class name, detail, headers and extra fields, and are rebuilt on the other side, so a worker's 400 is the
client's 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import struct
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
    return frame(("run", header, (image.mode, image.size), _row_bytes(image) * image.height)), image


def _row_bytes(image: Image.Image) -> int:
    return len(image.crop((0, 0, image.width, 1)).tobytes())


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK // max(1, row_bytes))


async def write_pixels(writer: asyncio.StreamWriter, image: Image.Image | None) -> None:
    """Send the image's raw pixels a band of rows (about CHUNK bytes) at a time, draining between: neither
    this process nor the transport ever holds a second copy of the whole image. The caller holds the
    connection's send lock from the header to the last band."""
    if image is None:
        return
    width, height = image.size
    rows = _rows_per_chunk(_row_bytes(image))
    for top in range(0, height, rows):
        # Off the event loop: an A4 page's bands take ~5 ms of copying, which the loop has better uses for.
        band = await asyncio.to_thread(_band, image, top, min(height, top + rows))
        writer.write(band)
        await writer.drain()


def _paste(image: Image.Image, data: bytes, top: int, rows: int) -> None:
    image.paste(Image.frombytes(image.mode, (image.width, rows), data), (0, top))


def _band(image: Image.Image, top: int, bottom: int) -> bytes:
    return image.crop((0, top, image.width, bottom)).tobytes()


async def read_request(message: tuple[Any, ...], reader: asyncio.StreamReader) -> EngineRequest:
    """The request of a ("run", ...) message, its image rebuilt band by band from the raw pixels that
    follow it: the image and one band exist here, never a whole raw copy beside the image."""
    _, request, meta, size = message
    if size > MAX_FRAME:
        raise ValueError(f"worker image of {size} bytes is over {MAX_FRAME}")
    if meta is None:
        return request
    mode, (width, height) = meta
    row_bytes = size // height if height else 0
    if height < 1 or width < 1 or row_bytes * height != size:
        raise ValueError(f"worker image of {width}x{height} ({mode}) cannot be {size} bytes")
    image = await asyncio.to_thread(Image.new, mode, (width, height))
    rows = _rows_per_chunk(row_bytes)
    for top in range(0, height, rows):
        band = min(rows, height - top)
        data = await reader.readexactly(row_bytes * band)
        await asyncio.to_thread(_paste, image, data, top, band)
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
