"""Fairness: whose turn it is in every shared queue (engine slots, the decoded-pixel budget, render processes).

One rule for all of them. Work belongs to a `flow` (one HTTP request's items, one job's pages, one PDF's
renders). Sync requests go before jobs: a flow named by `job_flow` is background and waits while any sync
flow waits. Among flows of the same kind, whatever is freed goes to the flow holding the least, among equals
to the one served longest ago (one never served first); each flow's own waiters in arrival order. So a photo
posted while a 300-page job runs takes the next free slot, and two jobs share evenly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

_JOB = "job:"


def job_flow(job_id: str) -> str:
    """The flow of a job's pages: background, after any sync request's."""
    return f"{_JOB}{job_id}"


def is_background(flow: object) -> bool:
    return isinstance(flow, str) and flow.startswith(_JOB)


class FlowTurns:
    """Whose turn it is among flows waiting for a shared capacity (`key`: lower goes first), and what each
    holds of it. Engine slots (counted in items), the decoded-pixel budget (in pixels) and render processes
    (in processes) hand out what is freed in this order."""

    def __init__(self) -> None:
        self.held: dict[object, int] = {}  # what each flow holds (absent: nothing)
        self.served: dict[object, int] = {}  # each flow's latest grant (a rising count), while it has any
        self._grants = 0

    def key(self, flow: object) -> tuple[int, int, int]:
        """Lower goes first: sync before background, then the least held, then the longest unserved."""
        return int(is_background(flow)), self.held.get(flow, 0), self.served.get(flow, -1)

    def background_held(self) -> int:
        """What the background flows (jobs) hold together."""
        return sum(amount for flow, amount in self.held.items() if is_background(flow))

    def grant(self, flow: object, amount: int) -> None:
        self.held[flow] = self.held.get(flow, 0) + amount
        self._grants += 1
        self.served[flow] = self._grants

    def give(self, flow: object, amount: int) -> bool:
        """`amount` given back by `flow`; True when it holds nothing any more."""
        left = self.held.get(flow, 0) - amount
        if left > 0:
            self.held[flow] = left
            return False
        self.held.pop(flow, None)
        return True

    def forget(self, flow: object) -> None:
        """Call when `flow` waits for nothing: holding nothing either, it is over (or between items)."""
        if flow not in self.held:
            self.served.pop(flow, None)


@dataclass(eq=False)
class Turn:
    """One waiter in a `FlowQueue`: its future's result is set when it is granted."""

    future: asyncio.Future[None]
    flow: object
    arrival: int


class FlowQueue:
    """Waiters by flow, each flow's in arrival order, granted in `FlowTurns` order: the queue of a capacity
    counted in whole units (render processes). `free()` says how many units are free now; a flow holds at
    most `cap` at once. `await wait(flow)` returns once a unit is the caller's (`taken()` when it has it in
    hand); `give(flow)` hands one back. `dispatch()` after anything that frees units."""

    def __init__(self, free: Callable[[], int], cap: int) -> None:
        self.free, self.cap = free, cap
        self.turns = FlowTurns()
        self._queues: dict[object, deque[Turn]] = {}
        self._arrivals = itertools.count()
        self._pending = 0  # units granted whose waiter has not taken them yet

    async def wait(self, flow: object) -> None:
        turn = Turn(asyncio.get_running_loop().create_future(), flow, next(self._arrivals))
        self._queues.setdefault(flow, deque()).append(turn)
        self.dispatch()
        try:
            await turn.future
        except BaseException:
            if turn.future.done() and not turn.future.cancelled():
                self.taken()
                self.give(flow)  # granted as we were cancelled: pass it on
            turn.future.cancel()
            raise
        finally:
            self._leave(turn)

    def taken(self) -> None:
        self._pending -= 1

    def give(self, flow: object) -> None:
        """One unit given back by `flow`: the next waiter's turn."""
        if self.turns.give(flow, 1) and flow not in self._queues:
            self.turns.forget(flow)
        self.dispatch()

    def dispatch(self) -> None:
        """Grant free units: sync before jobs, then the flow holding the fewest, longest unserved first; a
        flow at `cap` waits for one of its own."""
        while self.free() - self._pending > 0:
            best: Turn | None = None
            best_key: tuple[int, ...] | None = None
            for flow, queue in self._queues.items():
                while queue and queue[0].future.done():
                    queue.popleft()
                if not queue or self.turns.held.get(flow, 0) >= self.cap:
                    continue
                key = (*self.turns.key(flow), queue[0].arrival)
                if best_key is None or key < best_key:
                    best, best_key = queue[0], key
            if best is None:
                return
            self._pending += 1
            self.turns.grant(best.flow, 1)
            best.future.set_result(None)

    def wake_all(self) -> None:
        """Every waiter let go at once (the capacity is closing: each finds out and leaves)."""
        for queue in self._queues.values():
            for turn in queue:
                if not turn.future.done():
                    self._pending += 1
                    turn.future.set_result(None)

    def _leave(self, turn: Turn) -> None:
        queue = self._queues.get(turn.flow)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(turn)
        if not queue:
            del self._queues[turn.flow]
            self.turns.forget(turn.flow)
