"""The worker socket's image transfer (`workers.wire`) over a real socket pair: pixels arrive exactly as
sent, for every mode and for sizes around the band boundaries, and the next message still reads cleanly."""

from __future__ import annotations

import asyncio
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


async def send_and_read(images: list[Image.Image | None]) -> list[EngineRequest]:
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=left)
    peer_reader, peer_writer = await asyncio.open_connection(sock=right)

    async def send() -> None:
        for n, image in enumerate(images):
            request = EngineRequest(f"prompt {n}", image, MODES["base"], SamplingParams(max_tokens=4))
            head, pixels = wire.request_frames(request)
            writer.write(head)
            await wire.write_pixels(writer, pixels)
        writer.write(wire.frame(("end",)))
        await writer.drain()

    async def receive() -> list[EngineRequest]:
        got = []
        while (message := await wire.read_frame(peer_reader))[0] == "run":
            got.append(await wire.read_request(message, peer_reader))
        return got

    try:
        _, received = await asyncio.gather(send(), receive())
    finally:
        writer.close()
        peer_writer.close()
    return received


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16", "1"])
def test_images_cross_the_socket_unchanged(mode: str) -> None:
    row = wire.CHUNK // 3  # an RGB row of a third of a band: bands of 3 rows, and a last short one
    # A strip whose one row is 2.5 bands (RGB) crosses in pieces of a row; a 1-bit row never splits.
    sizes = [(1, 1), (7, 5), (row, 7), (1190, 1684), (wire.CHUNK // 2 + 1, 3), (wire.CHUNK * 5 // 6, 2)]
    images = [noise(mode, size, seed) for seed, size in enumerate(sizes)]
    received = asyncio.run(send_and_read([*images, None]))
    assert [r.prompt for r in received] == [f"prompt {n}" for n in range(len(images) + 1)]
    for sent, got in zip(images, received, strict=False):
        assert got.image is not None and (got.image.mode, got.image.size) == (sent.mode, sent.size)
        assert got.image.tobytes() == sent.tobytes(), f"{mode} {sent.size}: pixels differ"
    assert received[-1].image is None


def test_a_size_that_does_not_match_the_image_is_refused() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"\0" * 30)
        request = EngineRequest("p", None, MODES["base"], SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="cannot be 31 bytes"):
            await wire.read_request(("run", request, ("RGB", (5, 2)), 31), reader)

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
