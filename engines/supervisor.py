"""Self-healing engines: a dead engine is restarted with backoff; an input that killed it twice is refused.

The supervisor watches every engine behind the admission. One that was serving and is no longer ready (a
vLLM engine core that died, a PyTorch worker that stopped) is restarted in place, with backoff between
failed starts; meanwhile `/health` says `restarting` and requests get 503 with a Retry-After. Each death
gives a strike to the inputs (content hashes) that were in flight on that engine; an input with two strikes
is quarantined: a later request with it is a 422 naming its hash, so one poison image cannot crash the
service in a loop (vLLM #31878: some images crash the engine core on every retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence

from engines.base import BaseEngine
from errors import PoisonInput

log = logging.getLogger("deepseek_ocr.supervisor")

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 60.0)
STRIKES_TO_QUARANTINE = 2


class EngineSupervisor:
    def __init__(self, engines: Sequence[BaseEngine], *, check_s: float = 0.25, enabled: bool = True) -> None:
        self.engines = list(engines)
        self.check_s = check_s
        self.enabled = enabled
        self.strikes: Counter[str] = Counter()
        self.quarantined: set[str] = set()
        self.restarts = 0
        self._restarting: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._watch(), name="engine-supervisor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self, input_hash: str | None) -> None:
        """422 for an input that has already killed an engine twice."""
        if input_hash is not None and input_hash in self.quarantined:
            raise PoisonInput(
                f"this image (content hash {input_hash[:16]}...) crashed the engine {STRIKES_TO_QUARANTINE} times; it "
                "is quarantined and will not be run again until the service restarts",
                input_hash=input_hash,
            )

    async def _watch(self) -> None:
        while True:
            for engine in self.engines:
                if id(engine) in self._restarting or engine.ready or not engine.recoverable or not engine.started:
                    continue
                self._restarting.add(id(engine))
                asyncio.create_task(self._heal(engine), name=f"restart-{engine.name}")
            await asyncio.sleep(self.check_s)

    def _strike(self, engine: BaseEngine) -> None:
        for input_hash in engine.take_crash_inputs():
            self.strikes[input_hash] += 1
            if self.strikes[input_hash] >= STRIKES_TO_QUARANTINE and input_hash not in self.quarantined:
                self.quarantined.add(input_hash)
                log.error("input %s quarantined: it was in flight at %d engine deaths", input_hash[:16],
                          self.strikes[input_hash])

    async def _heal(self, engine: BaseEngine) -> None:
        try:
            reason = engine.health().reason
            log.error("engine %s is down (%s): restarting it", engine.name, reason)
            for attempt, delay in enumerate((*BACKOFF_S, *[BACKOFF_S[-1]] * 10_000), start=1):
                self._strike(engine)
                engine.mark_restarting(attempt, reason)
                started = time.perf_counter()
                try:
                    await engine.restart()
                except Exception as exc:
                    reason = f"restart {attempt} failed: {exc}"
                    log.exception("engine %s: restart %d failed; next in %.0f s", engine.name, attempt, delay)
                    engine.mark_restarting(attempt, reason, next_in_s=delay)
                    await asyncio.sleep(delay)
                    continue
                self.restarts += 1
                log.warning("engine %s restarted (attempt %d, %.1f s)", engine.name, attempt,
                            time.perf_counter() - started)
                return
        finally:
            self._restarting.discard(id(engine))
