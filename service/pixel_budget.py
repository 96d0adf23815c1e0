"""The decoded-pixel budget (MAX_DECODED_MPIX): how many pixels the server and its engine workers hold at once.

Engine slots (`service.admission`) bound engine work; this bounds memory. Every item reserves its pixels before any
exist (an upload's header, a PDF page's size) and holds them until it is post-processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from errors import PayloadTooLarge
from service.admission import FlowTurns


class PixelBudget:
    """A memory budget for decoded pixels (MAX_DECODED_MPIX), counted before any pixel exists.

    Engine slots bound engine work only; decoded images were bounded by nothing, so six 77 KB PNG strips
    of 1 x 40,000,000 took a server from 1.1 to 6.2 GB. An item reserves the pixels its header declares
    (a PDF page: its size from the PDF, or MAX_IMAGE_PIXELS, until its render says) before decoding and
    holds them until it is post-processed. One item larger than the whole budget can never run: 413 naming
    the setting. A waiter's wait is bounded by its request's deadline (the caller's cancellation), and a
    cancelled waiter takes nothing.

    Freed pixels go to waiters by request (`flow`), as engine slots do: to the request holding the fewest
    pixels, among equals the one served longest ago (one never served first), then in arrival order; a
    request's own items in arrival order. So a photo posted while long PDFs fill the budget decodes at the
    next release, not after every page queued ahead (arrival order made it wait for all of them). The chosen
    waiter blocks the others until its pixels fit: a large item is never passed over for ever.
    """

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max(1, max_pixels)
        self.used = 0
        self._queues: dict[object, deque[_PixelWaiter]] = {}  # waiters by flow, each in arrival order
        self._turns = FlowTurns()  # pixels each flow holds, and when each was last served
        self._arrivals = 0
        self._held: dict[int, PixelReservation] = {}  # id(image) -> its reservation, until post-processed

    def hold_for(self, image: object, reservation: PixelReservation) -> None:
        """Tie `reservation` to `image`: `release_for(image)` gives it back, or, failing that, freeing the
        image does (a route that decodes and never post-processes, or fails in between)."""
        key = id(image)
        self._held[key] = reservation
        weakref.finalize(image, release_soon, asyncio.get_running_loop(), reservation, self._held, key)

    def release_for(self, image: object) -> None:
        reservation = self._held.pop(id(image), None)
        if reservation is not None:
            reservation.release()

    @property
    def waiting(self) -> int:
        return sum(1 for queue in self._queues.values() for w in queue if not w.future.done())

    def check(self, pixels: int, copies: int = 1) -> None:
        if pixels > self.max_pixels:
            twice = " (counted twice: it is held by the server and by an engine worker)" if copies > 1 else ""
            raise PayloadTooLarge(
                f"this item decodes to {pixels / copies / 1e6:.1f} megapixels{twice}, over the decoded-pixel budget of "
                f"{self.max_pixels / 1e6:.0f} megapixels (MAX_DECODED_MPIX)",
                pixels=pixels, max_decoded_pixels=self.max_pixels,
            )

    async def reserve(self, pixels: int, copies: int = 1, flow: object = None) -> PixelReservation:
        """Wait until `pixels` x `copies` fit and this waiter's turn comes (an image handed to an engine worker
        process exists twice: here and there); 413 when they never can. `flow`: the request it belongs to
        (None: a request of its own)."""
        pixels = max(0, int(pixels)) * copies
        self.check(pixels, copies)
        flow = object() if flow is None else flow
        self._arrivals += 1
        entry = _PixelWaiter(asyncio.get_running_loop().create_future(), pixels, flow, self._arrivals)
        self._queues.setdefault(flow, deque()).append(entry)
        self._wake()
        try:
            await entry.future
        except BaseException:
            if entry.future.done() and not entry.future.cancelled():
                self._give(pixels, flow)  # granted as we were cancelled: hand it on
            entry.future.cancel()
            raise
        finally:
            self._leave(entry)
            self._wake()
        return PixelReservation(self, pixels, flow)

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, copies: int = 1, flow: object = None) -> AsyncIterator[PixelReservation]:
        token = await self.reserve(pixels, copies, flow)
        try:
            yield token
        finally:
            token.release()

    def handover(self, reservation: PixelReservation, pixels: int) -> PixelReservation:
        """A new reservation of `pixels` (at most the old one's) taken over from `reservation`, which `hold`
        then releases as empty: used to keep a page's budget past the `hold` block, shrunk to its real size."""
        reservation.resize(pixels)
        kept = PixelReservation(self, reservation.pixels, reservation.flow)
        reservation.pixels = 0
        return kept

    async def settle(self, reservation: PixelReservation, pixels: int, copies: int = 1) -> PixelReservation:
        """`handover` at the real size, growing first (waiting for budget) when the item came out larger than
        reserved (a page whose crop box did not tell its render size)."""
        missing = pixels * copies - reservation.pixels
        if missing > 0:
            self.check(pixels * copies, copies)  # more than the whole budget: growing would wait for ever
            extra = await self.reserve(missing, flow=reservation.flow)
            reservation.pixels, extra.pixels = reservation.pixels + extra.pixels, 0
        return self.handover(reservation, pixels * copies)

    def _give(self, pixels: int, flow: object) -> None:
        self.used -= pixels
        if self._turns.give(flow, pixels) and flow not in self._queues:
            self._turns.forget(flow)
        self._wake()

    def _leave(self, entry: _PixelWaiter) -> None:
        queue = self._queues.get(entry.flow)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(entry)
        if not queue:
            del self._queues[entry.flow]
            self._turns.forget(entry.flow)

    def _wake(self) -> None:
        """Grant the chosen waiter (each flow's first live waiter, ordered by the flow's pixels held, its
        latest grant, arrival) while its pixels fit; when they do not, it blocks the rest."""
        while True:
            best: _PixelWaiter | None = None
            best_key: tuple[float, float, int] = (math.inf, math.inf, 0)
            for flow, queue in self._queues.items():
                while queue and queue[0].future.done():
                    queue.popleft()  # granted or cancelled: `_leave` drops the empty queue
                if not queue:
                    continue
                key = (*self._turns.key(flow), queue[0].arrival)
                if key < best_key:
                    best, best_key = queue[0], key
            if best is None or self.used + best.pixels > self.max_pixels:
                return
            self.used += best.pixels
            self._turns.grant(best.flow, best.pixels)
            self._queues[best.flow].popleft()
            best.future.set_result(None)


@dataclass(eq=False)
class _PixelWaiter:
    future: asyncio.Future[None]
    pixels: int
    flow: object
    arrival: int


@dataclass(eq=False)
class PixelReservation:
    """Pixels held in a `PixelBudget`; `resize` to the real size once known, `release` exactly once."""

    budget: PixelBudget
    pixels: int
    flow: object = None
    released: bool = False

    def resize(self, pixels: int) -> None:
        """Shrink to what was really decoded (never grows: growth would bypass the queue)."""
        if not self.released and 0 <= pixels < self.pixels:
            self.budget._give(self.pixels - pixels, self.flow)
            self.pixels = pixels

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.budget._give(self.pixels, self.flow)


def release_soon(
    loop: asyncio.AbstractEventLoop, reservation: PixelReservation, held: dict | None = None, key: int = 0
) -> None:
    """Release from any thread (a finaliser, a worker's callback): the budget lives on the event loop."""
    if held is not None and held.get(key) is reservation:
        held.pop(key, None)
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits any more
        loop.call_soon_threadsafe(reservation.release)
