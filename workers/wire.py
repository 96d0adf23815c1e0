"""The worker socket's framing: length-prefixed pickles between the server and its own engine workers.

Both ends are this project's processes on one host, started by the server over a socket pair, so pickle
is the encoding (PIL images pickle as their raw pixels, no PNG round trip). Errors cross as the `OcrError`
class name, detail, headers and extra fields, and are rebuilt on the other side, so a worker's 400 is the
client's 400.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

import errors
from errors import OcrError

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31  # 2 GiB: larger than any image admission lets through


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; `asyncio.IncompleteReadError` at end of stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"worker frame of {size} bytes is over {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(size))


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


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
