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

import errors
from errors import OcrError

if TYPE_CHECKING:
    from engines.base import EngineRequest

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31  # 2 GiB: larger than any image admission lets through
CHUNK = 1 << 20  # image pixels cross the socket a megabyte at a time


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; `asyncio.IncompleteReadError` at end of stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"worker frame of {size} bytes is over {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(size))


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


async def request_frames(request: EngineRequest) -> tuple[bytes, bytes]:
    """A ("run", ...) message and the image's raw pixels after it, made off the event loop.

    A 40 MP page is 120 MB: pickled on the event loop it held the server's GIL for half a second per image
    (`/health` stalled 2 s on a batch of them). `tobytes` in a thread is chunked, so other threads run.
    """
    image = request.image
    if image is None:
        return frame(("run", request, None, 0)), b""
    raw = await asyncio.to_thread(image.tobytes)
    header = dataclasses.replace(request, image=None)
    return frame(("run", header, (image.mode, image.size), len(raw))), raw


async def read_request(message: tuple[Any, ...], reader: asyncio.StreamReader) -> EngineRequest:
    """The request of a ("run", ...) message, its image rebuilt from the raw pixels that follow it."""
    from PIL import Image

    _, request, meta, size = message
    if size > MAX_FRAME:
        raise ValueError(f"worker image of {size} bytes is over {MAX_FRAME}")
    if meta is not None:
        # Read into one buffer of the final size: `readexactly` would grow its own buffer to the whole image
        # and then copy it out (three copies of a 120 MB page at once instead of two).
        raw = bytearray(size)
        view = memoryview(raw)
        got = 0
        while got < size:
            chunk = await reader.read(min(CHUNK, size - got))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(view[:0]), size)
            view[got:got + len(chunk)] = chunk
            got += len(chunk)
        view.release()
        mode, dims = meta
        request.image = await asyncio.to_thread(Image.frombytes, mode, dims, raw)
        del raw
    return request


async def write_pixels(writer: asyncio.StreamWriter, raw: bytes) -> None:
    """Send `raw` a chunk at a time, draining between: the transport never buffers a copy of the whole
    image. The caller holds the connection's send lock from the header to the last chunk."""
    view = memoryview(raw)
    for start in range(0, len(raw), CHUNK):
        writer.write(view[start:start + CHUNK])
        await writer.drain()
    view.release()


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
