"""A replay engine for tests: answers fixed model text, streamed in pieces like a real engine.

It stands in for the model only (the service, admission, routes and post-processing are the real ones),
and is injected through `create_app(settings, engine_factory=...)`, so no real engine starts beside it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from engines.base import BaseEngine, Confidence, EngineChunk, EngineRequest, Usage
from errors import OcrError


class ReplayEngine(BaseEngine):
    name = "replay"

    def __init__(
        self,
        text: str | Callable[[EngineRequest], str],
        *,
        max_concurrency: int = 8,
        usage: Usage | None = None,
        finish_reason: str = "stop",
        fail_on_size: tuple[int, int] | None = None,
        delay_s: float = 0.0,
        crash_on: Callable[[EngineRequest], bool] | None = None,
        logprob: float | Callable[[EngineRequest], float] | None = None,
        hold: threading.Event | None = None,
    ) -> None:
        super().__init__(max_concurrency)
        self.text = text
        self.usage = usage or Usage(10, 273, 42)
        self.finish_reason = finish_reason
        self.fail_on_size = fail_on_size
        self.delay_s = delay_s
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.starts = 0
        self.finish_for: Callable[[str], str] | None = None  # per-answer finish reason, else `finish_reason`
        self.crash_on = crash_on
        # Each answer token's log-probability (a fixed one, or per request): the answer's confidence; None: none.
        self.logprob = logprob
        # While set to an unset Event, every request waits: a test does what it must mid-job, then sets it.
        self.hold = hold

    async def start(self) -> None:
        self.starts += 1
        self.set_ready()

    def kill(self, reason: str = "the replay engine died") -> None:
        """What a crashed engine looks like to the service: not ready, and its calls fail with 503."""
        self.mark_dead(reason)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        self.requests.append(request)
        if request.image is not None and request.image.size == self.fail_on_size:
            raise OcrError("the engine failed on this request: replayed failure")
        if self.crash_on is not None and self.crash_on(request):
            self.kill("the replay engine crashed on this input")  # as a vLLM engine core dies on a poison image
            self.require_ready()
        while self.hold is not None and not await asyncio.to_thread(self.hold.wait, 0.1):
            pass  # a bounded wait each time: a test that never sets it leaves no thread blocked for good
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.require_ready()  # a kill() while this request waited ends it like a dead engine would
        text = self.text(request) if callable(self.text) else self.text
        for i in range(0, len(text), 40):
            yield EngineChunk(text[i : i + 40])
        finish = self.finish_for(text) if self.finish_for is not None else self.finish_reason
        yield EngineChunk("", finish, Usage(**vars(self.usage)), self._confidence(request))

    def _confidence(self, request: EngineRequest) -> Confidence | None:
        if self.logprob is None:
            return None
        value = self.logprob(request) if callable(self.logprob) else self.logprob
        confidence = Confidence()
        for _ in range(self.usage.completion_tokens):
            confidence.add(value)
        return confidence


def factory(*engines: BaseEngine) -> Callable[[object], list[BaseEngine]]:
    return lambda settings: list(engines)


class SlowEngine(ReplayEngine):
    """Replayed text, one piece every `step_s`: a generation still running when the client acts."""

    def __init__(self, step_s: float) -> None:
        super().__init__("word " * 200, usage=Usage(10, 0, 200))
        self.step_s = step_s

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        self.requests.append(request)
        for _ in range(200):
            await asyncio.sleep(self.step_s)
            yield EngineChunk("word ")
        yield EngineChunk("", "stop", Usage(**vars(self.usage)))
