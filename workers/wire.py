"""The worker socket's framing: length-prefixed pickles between the server and its own engine workers.

Both ends are this project's processes on one host, started by the server over a socket pair, so pickle
is the encoding (PIL images pickle as their raw pixels, no PNG round trip). Errors cross as the `OcrError`
class name, detail, headers and extra fields, and are rebuilt on the other side, so a worker's 400 is the
client's 400.

An image's pixels do not cross the socket on Linux: the server copies them into a memfd (an anonymous file
in memory, `os.memfd_create`) off its event loop, passes the descriptor over a second socket pair that
carries only descriptors (`send_fds`), and the worker maps it and builds its image in one thread hop
(`read_request`). The send lock is held for two system calls, not for ~6 MB of socket writes: 64 requests
queued 0.5 s each behind it on an H100 (issue 29). Where there is no memfd the pixels follow their header
on the socket in tiles (`write_pixels`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from PIL import Image

import errors
from errors import OcrError

if TYPE_CHECKING:
    from engines.base import EngineRequest

log = logging.getLogger("deepseek_ocr.worker")

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31  # 2 GiB: larger than any image admission lets through
CHUNK = 1 << 20  # image pixels cross the socket in bands of rows of about a megabyte
# Pixels cross in a memfd where the OS has one (Linux). Elsewhere (macOS, a dev box) they cross the socket in
# tiles: slower under load, the same pixels. Tests turn this off to check that path against a real worker.
HAS_MEMFD = hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
VIA_MEMFD, VIA_SOCKET = "memfd", "socket"


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; `asyncio.IncompleteReadError` at end of stream."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"worker frame of {size} bytes is over {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(size))


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def request_frames(request: EngineRequest, via: str = VIA_SOCKET) -> tuple[bytes, list[Image.Image]]:
    """A ("run", request without its images, [(mode, size, raw byte count) per image], via) message, and the
    prompt's images (`EngineRequest.images`, in tag order), whose raw pixels cross `via` memfds (`to_memfds`,
    `send_fds`) or the socket after the message (`write_pixels`). A multi-image prompt's later images cross the
    same way as its first: pickled in the header, a 40 MP one held the event loop half a second.

    The pixels are never pickled or copied whole: a 40 MP page is 120 MB, and pickling it on the event loop
    held the server's GIL for half a second per image (`/health` stalled 2 s on a batch of them), while one
    `tobytes` copy doubled the page in the server for as long as it took to send.
    """
    images = request.images
    if not images:
        return frame(("run", request, [], via)), []
    header = dataclasses.replace(request, image=None, more_images=[])
    shapes = [(image.mode, image.size, row_bytes(image.mode, image.width) * image.height) for image in images]
    return frame(("run", header, shapes, via)), images


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


async def write_pixels(writer: asyncio.StreamWriter, images: list[Image.Image]) -> None:
    """Send the images' raw pixels, one image after another, a tile (about CHUNK bytes) at a time, draining
    between: neither this process nor the transport ever holds a second copy of a whole image. The caller
    holds the connection's send lock from the header to the last tile. Only where there is no memfd
    (`HAS_MEMFD`)."""
    for image in images:
        for box in tiles(image.mode, *image.size):
            # Off the event loop: an A4 page's copies take ~5 ms, which the loop has better uses for.
            writer.write(await asyncio.to_thread(_copy, image, box))
            await writer.drain()


def _copy(image: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    return image.crop(box).tobytes()


def _paste(image: Image.Image, data: bytes, box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    image.paste(Image.frombytes(image.mode, (right - left, bottom - top), data), (left, top))


# --- pixels in a memfd ------------------------------------------------------------------------------------
# The memfd is a third copy of the image beside the two the pixel budget counts (`copies_images`: the server's
# image and the worker's). It lives from `to_memfds` until the worker has built its image from it: the server
# closes its descriptor once it is sent, the worker closes its own and the map right after the copy. A worker
# reads its requests one after another, so at most one memfd per worker is being copied into a worker image
# at a time; the ones waiting stand in for worker images not yet made, which the budget already counts.
async def to_memfds(images: list[Image.Image]) -> list[int]:
    """A memfd per image holding its raw pixels, all filled in one thread hop. The caller owns the descriptors."""
    filling = asyncio.ensure_future(asyncio.to_thread(_fill_memfds, images))
    try:
        return await asyncio.shield(filling)
    except asyncio.CancelledError:  # the request went away: the thread still finishes, and its fds are closed
        filling.add_done_callback(_close_result)
        raise


def _close_result(filling: asyncio.Future[list[int]]) -> None:
    if not filling.cancelled() and filling.exception() is None:
        for fd in filling.result():
            os.close(fd)


def _fill_memfds(images: list[Image.Image]) -> list[int]:
    fds: list[int] = []
    try:
        for image in images:
            fds.append(_fill_memfd(image))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _fill_memfd(image: Image.Image) -> int:
    size = row_bytes(image.mode, image.width) * image.height
    fd = os.memfd_create("deepseek-ocr-pixels", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        # pwrite, not a writable map: about twice as fast here (the kernel allocates the pages in one call per
        # band), and a memory limit is an OSError rather than a fault on a mapped page.
        offset = 0
        for box in tiles(image.mode, *image.size):  # a band at a time: never a whole raw copy in bytes
            data = _copy(image, box)
            while data:
                written = os.pwrite(fd, data, offset)
                offset += written
                data = data[written:]
    except BaseException:
        os.close(fd)
        raise
    return fd


async def send_fds(channel: socket.socket, fds: list[int]) -> None:
    """Pass a request's `fds` to the worker in one message on its descriptor channel (non-blocking), waiting
    for room if it is full. MAX_IMAGES_PER_PROMPT keeps them far below the kernel's 253 a message."""
    while True:
        try:
            socket.send_fds(channel, [b"\0"], fds)
            return
        except BlockingIOError:
            loop = asyncio.get_running_loop()
            room = loop.create_future()
            loop.add_writer(channel.fileno(), _set_once, room)
            try:
                await room
            finally:
                loop.remove_writer(channel.fileno())


def _set_once(room: asyncio.Future[None]) -> None:
    if not room.done():
        room.set_result(None)


def receive_fds(channel: socket.socket, count: int) -> list[int]:
    """The descriptors the server sent just before the "run" frame being read: they are already here."""
    _, fds, _, _ = socket.recv_fds(channel, 1, count)
    if len(fds) != count:
        for extra in fds:
            os.close(extra)
        raise ConnectionError(f"the descriptor channel gave {len(fds)} descriptors for a request, not {count}")
    return fds


def _from_memfds(fds: list[int], shapes: list[tuple[str, tuple[int, int], int]]) -> list[Image.Image]:
    """The images in the memfds; every descriptor is closed whatever happens."""
    try:
        return [_from_memfd(fd, mode, size, nbytes) for fd, (mode, size, nbytes) in zip(fds, shapes, strict=True)]
    finally:
        for fd in fds:
            os.close(fd)


def _from_memfd(fd: int, mode: str, size: tuple[int, int], nbytes: int) -> Image.Image:
    """The image in the memfd, copied out of its map in one go (PIL decodes straight from the map: no bytes
    copy beside it); the map is closed whatever happens, the descriptor is the caller's."""
    held = os.fstat(fd).st_size
    if held != nbytes:
        raise ValueError(f"the worker image's memfd holds {held} bytes, not the {nbytes} announced")
    with mmap.mmap(fd, nbytes, access=mmap.ACCESS_READ) as pixels, memoryview(pixels) as view:
        return Image.frombytes(mode, size, view)


def pixel_digest(image: Image.Image) -> str:
    """SHA-256 of the image's raw pixels (`tobytes()`), a band at a time. Logged at DEBUG for each image a
    worker receives, so the pixels the engine gets can be checked against the ones sent."""
    digest = hashlib.sha256()
    for box in tiles(image.mode, *image.size):
        digest.update(_copy(image, box))
    return digest.hexdigest()


async def read_request(message: tuple[Any, ...], reader: asyncio.StreamReader,
                       fds: socket.socket | None = None) -> EngineRequest:
    """The request of a ("run", ...) message with its images: from the memfds the server passed on `fds`, or
    rebuilt tile by tile from the raw pixels that follow the message on the socket (an image and one tile
    exist here, never a whole raw copy beside the image).

    A `RequestFailed` is this request's failure only (the streams are still in step); anything else means
    the streams can no longer be trusted."""
    _, request, shapes, via = message
    if sum(nbytes for *_, nbytes in shapes) > MAX_FRAME:
        raise ValueError(f"worker images of {sum(nbytes for *_, nbytes in shapes)} bytes are over {MAX_FRAME}")
    if not shapes:
        return request
    if via == VIA_MEMFD:
        if fds is None:
            raise ValueError("a memfd image came, but this worker has no descriptor channel")
        received = receive_fds(fds, len(shapes))
        try:
            for shape in shapes:
                _check_shape(*shape)
        except ValueError as exc:
            for fd in received:
                os.close(fd)
            raise RequestFailed(request, exc) from exc
        try:  # the thread owns the descriptors from here: it closes them even if this wait is cancelled
            images = await asyncio.to_thread(_from_memfds, received, shapes)
        except (ValueError, OSError) as exc:
            raise RequestFailed(request, exc) from exc
    else:
        images = []
        for mode, (width, height), nbytes in shapes:
            _check_shape(mode, (width, height), nbytes)
            image = await asyncio.to_thread(Image.new, mode, (width, height))
            for box in tiles(mode, width, height):
                left, top, right, bottom = box
                data = await reader.readexactly(row_bytes(mode, right - left) * (bottom - top))
                await asyncio.to_thread(_paste, image, data, box)
                del data
            images.append(image)
    request.image, request.more_images = images[0], images[1:]
    for image in images:
        await _log_digest(image, via)
    return request


def _check_shape(mode: str, size: tuple[int, int], nbytes: int) -> None:
    width, height = size
    if height < 1 or width < 1 or row_bytes(mode, width) * height != nbytes:
        raise ValueError(f"worker image of {width}x{height} ({mode}) cannot be {nbytes} bytes")


async def _log_digest(image: Image.Image, via: str) -> None:
    if log.isEnabledFor(logging.DEBUG):  # a hash of every image costs ~0.1 s on 40 MP: only when asked
        digest = await asyncio.to_thread(pixel_digest, image)
        log.debug("worker image %s %dx%d via %s: pixels sha256 %s", image.mode, *image.size, via, digest)


class RequestFailed(Exception):
    """A request whose image could not be received; the worker answers it with an error and goes on."""

    def __init__(self, request: EngineRequest, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.request, self.cause = request, cause


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
