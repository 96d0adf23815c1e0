"""The worker socket's image transfer (`workers.wire`) over real socket pairs: pixels arrive exactly as
sent, in a memfd passed on the descriptor channel and in tiles on the socket (where there is no memfd), for
every mode and for sizes around the band boundaries, and the next message still reads cleanly."""

from __future__ import annotations

import asyncio
import os
import socket

import numpy as np
import pytest
from PIL import Image

from engines.base import EngineRequest, SamplingParams
from process.modes import MODES
from workers import wire


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


async def send_and_read(images: list[Image.Image | list[Image.Image] | None],
                        via: str = wire.VIA_SOCKET) -> list[EngineRequest]:
    """What `workers.client` and `workers.host` do with each request's images (one, a prompt's several as a
    list, or none), over real socket pairs."""
    left, right = socket.socketpair()
    fds, peer_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds.setblocking(False)
    peer_fds.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=left)
    peer_reader, peer_writer = await asyncio.open_connection(sock=right)

    async def send() -> None:
        for n, image in enumerate(images):
            several = image if isinstance(image, list) else [image] if image is not None else []
            request = EngineRequest(f"prompt {n}", several[0] if several else None, MODES["base"],
                                    SamplingParams(max_tokens=4), more_images=several[1:])
            head, pixels = wire.request_frames(request, via)
            if via == wire.VIA_MEMFD and pixels:
                sent = await wire.to_memfds(pixels)
                await wire.send_fds(fds, sent)
                for fd in sent:
                    os.close(fd)
                pixels = []
            writer.write(head)
            await wire.write_pixels(writer, pixels)
        writer.write(wire.frame(("end",)))
        await writer.drain()

    async def receive() -> list[EngineRequest]:
        got = []
        while (message := await wire.read_frame(peer_reader))[0] == "run":
            got.append(await wire.read_request(message, peer_reader, peer_fds))
        return got

    try:
        _, received = await asyncio.gather(send(), receive())
    finally:
        writer.close()
        peer_writer.close()
        fds.close()
        peer_fds.close()
    return received


@pytest.mark.parametrize("via", [wire.VIA_MEMFD, wire.VIA_SOCKET])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16", "1"])
def test_images_cross_unchanged(mode: str, via: str) -> None:
    row = wire.CHUNK // 3  # an RGB row of a third of a band: bands of 3 rows, and a last short one
    # A strip whose one row is 2.5 bands (RGB) crosses in pieces of a row; a 1-bit row never splits.
    sizes = [(1, 1), (7, 5), (row, 7), (1190, 1684), (wire.CHUNK // 2 + 1, 3), (wire.CHUNK * 5 // 6, 2)]
    images = [noise(mode, size, seed) for seed, size in enumerate(sizes)]
    before = open_fds()
    received = asyncio.run(send_and_read([*images, None], via))
    assert [r.prompt for r in received] == [f"prompt {n}" for n in range(len(images) + 1)]
    for sent, got in zip(images, received, strict=False):
        assert got.image is not None and (got.image.mode, got.image.size) == (sent.mode, sent.size)
        assert got.image.tobytes() == sent.tobytes(), f"{mode} {sent.size}: pixels differ"
    assert received[-1].image is None
    assert open_fds() == before  # every memfd closed on both sides


@pytest.mark.parametrize("via", [wire.VIA_MEMFD, wire.VIA_SOCKET])
def test_a_prompts_several_images_cross_in_order(via: str) -> None:
    """A multi-image prompt's later images cross like its first (not pickled in the header), in tag order,
    beside single-image and image-less requests."""
    first, second, third = noise("RGB", (1190, 1684), 1), noise("L", (7, 5), 2), noise("RGB", (300, 40), 3)
    alone = noise("RGB", (9, 9), 4)
    before = open_fds()
    received = asyncio.run(send_and_read([[first, second, third], None, alone, [second, first]], via))
    assert [len(r.images) for r in received] == [3, 0, 1, 2]
    for got, sent in zip(received, [[first, second, third], [], [alone], [second, first]], strict=True):
        assert [(i.mode, i.size, i.tobytes()) for i in got.images] == [(i.mode, i.size, i.tobytes()) for i in sent]
    assert open_fds() == before


def test_the_header_carries_no_pixels() -> None:
    """The ("run", ...) frame is the request without its images: a 40 MP second image adds no bytes to it."""
    small = EngineRequest("p", noise("RGB", (8, 8)), MODES["base"], SamplingParams(max_tokens=4),
                          more_images=[noise("RGB", (8, 8))])
    large = EngineRequest("p", noise("RGB", (8, 8)), MODES["base"], SamplingParams(max_tokens=4),
                          more_images=[Image.new("RGB", (8000, 5000))])
    head_small, _ = wire.request_frames(small, wire.VIA_MEMFD)
    head_large, images = wire.request_frames(large, wire.VIA_MEMFD)
    assert len(head_large) < len(head_small) + 64 and len(head_large) < 4096, len(head_large)
    assert [i.size for i in images] == [(8, 8), (8000, 5000)]


def test_a_memfd_of_the_wrong_size_fails_that_request_only() -> None:
    """A memfd that does not hold the bytes its header announces is refused for that request, its
    descriptor closed, and the next request on the same channels still reads."""
    async def scenario() -> None:
        fds, peer_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer_fds.setblocking(False)
        reader = asyncio.StreamReader()
        try:
            short = os.memfd_create("short")
            os.ftruncate(short, 29)
            socket.send_fds(fds, [b"\0"], [short])
            os.close(short)
            request = EngineRequest("p", None, MODES["base"], SamplingParams(max_tokens=4))
            with pytest.raises(wire.RequestFailed, match="holds 29 bytes, not the 30 announced") as caught:
                await wire.read_request(("run", request, [("RGB", (5, 2), 30)], wire.VIA_MEMFD), reader, peer_fds)
            assert caught.value.request is request
            good = noise("RGB", (5, 2))
            [fd] = await wire.to_memfds([good])
            await wire.send_fds(fds, [fd])
            os.close(fd)
            after = await wire.read_request(("run", request, [("RGB", (5, 2), 30)], wire.VIA_MEMFD), reader, peer_fds)
            assert after.image is not None and after.image.tobytes() == good.tobytes()
        finally:
            fds.close()
            peer_fds.close()

    before = open_fds()
    asyncio.run(scenario())
    assert open_fds() == before


def test_a_size_that_does_not_match_the_image_is_refused() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"\0" * 30)
        request = EngineRequest("p", None, MODES["base"], SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="cannot be 31 bytes"):
            await wire.read_request(("run", request, [("RGB", (5, 2), 31)], wire.VIA_SOCKET), reader)

    asyncio.run(scenario())


def test_tiles_cover_the_image_once_and_none_is_over_a_band() -> None:
    for mode, size in [("RGB", (40_000_000, 1)), ("RGB", (1190, 1684)), ("L", (3, 2_000_000)), ("1", (9, 3)),
                       ("1", (40_000_000, 1)), ("I;16", (700_001, 2))]:
        boxes = list(wire.tiles(mode, *size))
        covered = sum((r - left) * (b - t) for left, t, r, b in boxes)
        assert covered == size[0] * size[1], (mode, size)
        sizes = [wire.row_bytes(mode, r - left) * (b - t) for left, t, r, b in boxes]
        assert sum(sizes) == wire.row_bytes(mode, size[0]) * size[1], (mode, size)
        if mode != "1":
            assert max(sizes) <= wire.CHUNK, (mode, size, max(sizes))
