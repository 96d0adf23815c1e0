"""Admission: which engine runs an item, how many run at once, and when new requests are turned away.

Every engine keeps its own in-flight limit (`engine.max_concurrency`). Work asks for an explicit `Slot`
token (`async with admission.slot() as slot: await slot.engine.generate(...)`): it goes to the ready engine
with the least work in flight, or waits. A freed slot goes to the waiting item whose request (its `flow`:
one HTTP request's pages, one job) has the fewest items in flight; among equals, to the flow served longest
ago (one never served first), then to the earliest arrival (`service.fairness`). So one photo posted while a
2,000-page PDF fills the engines waits for one free slot, not for the PDF's queue, and several big requests
share the engines evenly. Jobs (background flows) go after every sync request, and together hold at most
JOB_ENGINE_SLOTS slots (by default half of each engine's, on a CPU engine one per core): the rest stay free
for sync requests, and an image never queues behind many job pages inside an engine. An engine batches what
it holds: on the 2-core box a CPU batch of 35 job pages ran past 45 s, so a photo behind it waited two
such batches; with jobs at two pages a batch it is served within one short batch. A new request is refused
up front with 503 and `Retry-After` when MAX_QUEUE items already wait (`check`). Only engine work holds a
slot: rendering, decoding and post-processing happen outside it, so they never hold an engine idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from config import ModelSpec, usable_cpus
from engines.base import Engine, not_ready
from errors import Overloaded, UnknownModel, UnsupportedMode
from process.modes import ModeSpec
from service.fairness import FlowTurns, is_background

__all__ = ["Admission", "FlowTurns", "Slot"]  # FlowTurns: `service.pixel_budget` takes it from here

# How often a waiting item re-checks that some engine is still alive (a dead engine never frees its slots)
# and hands out slots freed while no engine could take them.
_RECHECK_S = 0.5


@dataclass(eq=False)
class Slot:
    """One admitted item on one engine; release it exactly once (the context manager does)."""

    engine: Engine
    admission: Admission
    flow: object = None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self.engine, self.flow)


class Admission:
    def __init__(self, engines: Sequence[Engine], *, max_queue: int, job_slots: int = 0) -> None:
        if not engines:
            raise ValueError("admission needs at least one engine")
        if job_slots < 0:
            raise ValueError(f"job_slots must be >= 0 (0: automatic), got {job_slots}")
        self.engines: list[Engine] = list(engines)
        self.max_queue = max_queue
        self.wait_observers: list[Callable[[float], None]] = []  # seconds from asking for a slot to getting it
        self.job_slots_set = job_slots  # JOB_ENGINE_SLOTS; 0: `job_slots` works it out per engine
        self._busy: dict[int, int] = {id(e): 0 for e in self.engines}
        self._turns = FlowTurns()  # items in flight per flow, and when each was last served
        # Waiting items by flow, each flow's in arrival order: a freed slot compares flows, not items, so a
        # grant costs O(flows waiting), however many items wait (MAX_QUEUE allows 100,000).
        self._queues: dict[object, deque[_Waiter]] = {}
        self._waiting = 0  # items waiting (their futures not done)
        self._arrivals = 0
        self._swept = 0.0  # when a waiter last looked for slots freed while no engine could take them
        self.admitted = 0

    def add_engine(self, engine: Engine) -> None:
        """One more engine (a Ray worker that joined the cluster): it takes waiting items at once."""
        self._busy.setdefault(id(engine), 0)
        self.engines.append(engine)
        self._wake()

    # --- state --------------------------------------------------------------------------------
    @property
    def primary(self) -> Engine:
        """The engine that speaks for the service (name, modes, demo flag): the first ready one."""
        return next((e for e in self.engines if e.ready), self.engines[0])

    @property
    def ready(self) -> bool:
        return any(e.ready for e in self.engines)

    @property
    def served_modes(self) -> tuple[str, ...]:
        """Modes of the default model (the first); `modes_of` gives another model's."""
        return self.modes_of(self.models[0].name if self.models else None)

    def modes_of(self, model: str | None) -> tuple[str, ...]:
        modes: dict[str, None] = {}
        for engine in self._engines_of(model):
            modes.update(dict.fromkeys(engine.served_modes))
        return tuple(modes)

    @property
    def models(self) -> list[ModelSpec]:
        """The models served, in configured order (the first is the default)."""
        seen: dict[str, ModelSpec] = {}
        for engine in self.engines:
            if engine.model is not None:
                seen.setdefault(engine.model.name, engine.model)
        return list(seen.values())

    def model_infos(self) -> list[dict[str, object]]:
        """Each model with its modes and readiness, for `/`, `/health` and the `/status` routes."""
        return [
            {"name": m.name, "arch": m.arch, "path": m.path, "modes": list(self.modes_of(m.name)),
             "ready": any(e.ready for e in self._engines_of(m.name)), "default": i == 0}
            for i, m in enumerate(self.models)
        ]

    def model(self, name: str | None) -> ModelSpec | None:
        """The model a request names (None: the default); 400 listing the known ones for an unknown name."""
        models = self.models
        if not models:
            return None
        if name is None or name == "":
            return models[0]
        for spec in models:
            if spec.name == name:
                return spec
        raise UnknownModel(
            f"model {name!r} is not served here; models: {', '.join(m.name for m in models)}",
            models=[m.name for m in models],
        )

    def _engines_of(self, model: str | None) -> list[Engine]:
        if model is None:
            return self.engines
        return [e for e in self.engines if e.model is None or e.model.name == model]

    @property
    def capacity(self) -> int:
        """Items that can run at once on the engines that are ready now."""
        return sum(e.max_concurrency for e in self.engines if e.ready) or 1

    @property
    def job_slots(self) -> int:
        """Slots the jobs together may hold: JOB_ENGINE_SLOTS, or by engine: a GPU engine's all (it batches
        continuously, so a sync request, served first, gets the next slot a finished sequence frees within a
        step or two; a cap would only idle the GPU while no sync request waits), a CPU engine's half, at most
        one per core (its static batch takes every waiting item and its time grows with each); at least one."""
        if self.job_slots_set:
            return self.job_slots_set
        share = 0
        for engine in self.engines:
            if engine.ready:
                if engine.health().detail.get("device") == "cpu":
                    share += min(max(1, engine.max_concurrency // 2), usable_cpus())
                else:
                    share += engine.max_concurrency
        return max(1, share)

    def _job_room(self, flow: object) -> bool:
        """False for a job's item while the jobs hold their share already."""
        return not is_background(flow) or self._turns.background_held() < self.job_slots

    @property
    def in_flight(self) -> int:
        return sum(self._busy.values())

    @property
    def waiting(self) -> int:
        return self._waiting

    def busy(self, engine: Engine) -> int:
        return self._busy[id(engine)]

    # --- admission ----------------------------------------------------------------------------
    def check(self, mode: ModeSpec | None = None, model: str | None = None) -> None:
        """Refuse a new request now: no engine ready (503), the mode not served (400), or a full queue (503)."""
        engines = self._engines_of(model)
        if not any(e.ready for e in engines):
            raise not_ready(next((e for e in engines if e.model is not None), engines[0]) if engines else self.primary)
        served = self.modes_of(model)
        if mode is not None and mode.name not in served:
            who = f"model {model!r}" if model else f"the {self.primary.name} engine"
            raise UnsupportedMode(
                f"mode {mode.name!r} is not served by {who}; modes served: {', '.join(served)}",
                served_modes=list(served),
            )
        waiting = self.waiting
        if waiting >= self.max_queue and self._free(mode, model) is None:
            capacity = self.capacity
            raise Overloaded(
                f"{waiting} items are waiting and {self.in_flight} running (MAX_QUEUE={self.max_queue}, "
                f"engine capacity {capacity}); retry later",
                retry_after=max(1, min(60, math.ceil(waiting / capacity))),
            )

    async def acquire(self, mode: ModeSpec | None = None, model: str | None = None, flow: object = None) -> Slot:
        """A slot on the least busy ready engine of `model` serving `mode`. While all are full it waits, and
        a freed slot goes to the waiter whose `flow` has the fewest items in flight (None: a flow of its own)."""
        flow = object() if flow is None else flow
        engine = self._free(mode, model) if not self.waiting and self._job_room(flow) else None
        if engine is not None:
            self._grant(engine, flow)
            self.admitted += 1
            return Slot(engine, self, flow)
        future: asyncio.Future[Engine] = asyncio.get_running_loop().create_future()
        self._arrivals += 1
        entry = _Waiter(future, mode, model, flow, self._arrivals)
        self._queues.setdefault(flow, deque()).append(entry)
        self._waiting += 1
        self._wake()  # a slot may be free already (waiters ahead of us may have left)
        try:
            while True:
                if not any(e.ready for e in self._engines_of(model)):
                    raise not_ready(self.primary)
                with contextlib.suppress(TimeoutError):
                    engine = await asyncio.wait_for(asyncio.shield(future), _RECHECK_S)
                    break
                self._sweep()
        except BaseException:
            if future.done() and not future.cancelled():
                self._release(future.result(), flow)  # handed a slot as we were cancelled: pass it on
            elif not future.done():
                self._waiting -= 1  # leaves without a slot
            future.cancel()
            raise
        finally:
            self._leave(entry)
            self._forget_if_idle(flow)  # a waiter that gave up may have been its flow's last
        self.admitted += 1
        return Slot(engine, self, flow)

    @contextlib.asynccontextmanager
    async def slot(self, mode: ModeSpec | None = None, model: str | None = None,
                   flow: object = None) -> AsyncIterator[Slot]:
        asked = time.perf_counter()
        token = await self.acquire(mode, model, flow)
        for observe in self.wait_observers:  # /metrics' queue wait
            observe(time.perf_counter() - asked)
        try:
            yield token
        finally:
            token.release()

    # --- internals ----------------------------------------------------------------------------
    def _free(self, mode: ModeSpec | None, model: str | None = None) -> Engine | None:
        best, best_load = None, math.inf
        for engine in self._engines_of(model):
            if not engine.ready or (mode is not None and mode.name not in engine.served_modes):
                continue
            busy = self._busy[id(engine)]
            if busy >= engine.max_concurrency:
                continue
            load = busy / engine.max_concurrency
            if load < best_load:
                best, best_load = engine, load
        return best

    def _grant(self, engine: Engine, flow: object) -> None:
        self._busy[id(engine)] += 1
        self._turns.grant(flow, 1)

    def _release(self, engine: Engine, flow: object) -> None:
        self._busy[id(engine)] -= 1
        if self._turns.give(flow, 1):
            self._forget_if_idle(flow)
        self._wake()

    def _sweep(self) -> None:
        """A slot freed while no engine could take it (one was down, and came back since) wakes nobody at the
        time: the waiters' re-checks look again, once a period between them all, not once each. Without this,
        two requests waited out their 60 s deadline behind a PyTorch engine restarted in 0.3 s."""
        now = time.monotonic()
        if now - self._swept >= _RECHECK_S:
            self._swept = now
            self._wake()

    def _leave(self, entry: _Waiter) -> None:
        queue = self._queues.get(entry.flow)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(entry)  # O(that flow's waiters); the one granted is usually at the front
        if not queue:
            del self._queues[entry.flow]

    def _forget_if_idle(self, flow: object) -> None:
        """A flow with nothing in flight and nothing waiting is over (or between items): forget it."""
        if not any(not w.future.done() for w in self._queues.get(flow, ())):
            self._turns.forget(flow)

    def _wake(self) -> None:
        """Hand free slots to waiters, each to the first by (sync before jobs, its flow's items in flight, its
        flow's latest grant, arrival); a waiter whose mode no free engine serves is skipped, and so is a job's
        while the jobs hold their share."""
        while True:
            best: tuple[_Waiter, Engine] | None = None
            best_key: tuple[float, ...] = (math.inf, math.inf, math.inf, 0)
            room = self._turns.background_held() < self.job_slots
            for flow, queue in self._queues.items():
                key = self._turns.key(flow)
                if key > best_key[:3] or (key[0] and not room):
                    continue
                for waiter in queue:  # this flow's first waiter that a free engine can take
                    if waiter.future.done():
                        continue
                    if (*key, waiter.arrival) >= best_key:
                        break  # an earlier waiter with no worse a key is already chosen
                    engine = self._free(waiter.mode, waiter.model)
                    if engine is not None:
                        best, best_key = (waiter, engine), (*key, waiter.arrival)
                        break
            if best is None:
                return
            waiter, engine = best
            self._grant(engine, waiter.flow)
            self._waiting -= 1
            waiter.future.set_result(engine)


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[Engine]
    mode: ModeSpec | None
    model: str | None
    flow: object
    arrival: int
