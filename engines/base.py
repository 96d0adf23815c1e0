"""The engine protocol: what the service asks of an engine, and the state every engine shares.

An engine turns one `EngineRequest` (prompt, optional image, mode, sampling) into streamed text. It owns
nothing of admission: how many requests may run on it at once is its `max_concurrency`, and the service's
`service.admission.Admission` keeps that limit with explicit slot tokens, so several engines can stand behind one
service. Implementations: `engines.torch_engine.TorchEngine` (our `deepseek_ocr.py`, any device) and
`engines.vllm.engine.VllmEngine` (vLLM on GPUs); `UnavailableEngine` stands in when no model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from config import ModelSpec
from errors import ModelNotReady, UnsupportedMode
from process.modes import MODES, ModeSpec
from process.sampling import SamplingParams

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["SamplingParams"]  # the one sampling type, shared with the model


@dataclass
class EngineRequest:
    prompt: str
    image: Image.Image | None
    mode: ModeSpec
    sampling: SamplingParams
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # False when the caller only wants the end result: vLLM then sends no per-step deltas.
    stream: bool = False
    # Content hash of the image: an input in flight when an engine dies gets a strike (engines.supervisor).
    input_hash: str | None = None
    # Seconds spent sending it to where the engine runs (a worker process's socket); set by such engines.
    transfer_s: float = 0.0
    # The prompt's second and later images, in the order of its `<image>` tags (`image` is the first). They
    # cross to a worker process pickled with the request header; the first goes as raw pixels (workers/wire).
    more_images: list[Image.Image] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the prompt, in tag order."""
        return [] if self.image is None else [self.image, *self.more_images]


@dataclass
class Usage:
    prompt_tokens: int = 0
    image_tokens: int = 0  # every image of the prompt together
    completion_tokens: int = 0
    per_image: list[int] = field(default_factory=list)  # image tokens of each image, in prompt order


# A sampled token under this log-probability (probability 0.5) counts as unsure in `Confidence.low_share`.
# Fixed, not a setting, so that the share means the same on every server and in every stored job.
LOW_LOGPROB = math.log(0.5)


@dataclass
class Confidence:
    """How sure the model was of one generation: the log-probabilities of the tokens it sampled, under the
    model's own distribution before the n-gram guard (what vLLM returns with `logprobs=0`). Engines add each
    sampled token; the service reads the summary. A generation of no tokens has none (`tokens == 0`)."""

    tokens: int = 0
    sum_logprob: float = 0.0
    min_logprob: float = 0.0
    low: int = 0  # tokens under LOW_LOGPROB

    def add(self, logprob: float) -> None:
        if not math.isfinite(logprob):  # -inf: a token the distribution ruled out (a sampling bug upstream)
            logprob = -1e4
        self.min_logprob = logprob if self.tokens == 0 else min(self.min_logprob, logprob)
        self.tokens += 1
        self.sum_logprob += logprob
        self.low += logprob < LOW_LOGPROB

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / self.tokens if self.tokens else 0.0

    @property
    def low_share(self) -> float:
        return self.low / self.tokens if self.tokens else 0.0

    def summary(self) -> dict[str, float | int] | None:
        """The answer's `confidence` object, or None where no token was scored."""
        if not self.tokens:
            return None
        return {"mean_logprob": round(self.mean_logprob, 4), "min_logprob": round(self.min_logprob, 4),
                "low_share": round(self.low_share, 4), "tokens": self.tokens}


@dataclass
class EngineChunk:
    """A piece of streamed output; the last one carries `finish_reason` and the final usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    confidence: Confidence | None = None  # on the last piece, where the engine scores its tokens


@dataclass
class EngineResult:
    text: str
    finish_reason: str
    usage: Usage
    elapsed_s: float
    worker: str | None = None  # the engine worker that ran it (its `result_worker`): a job page's `worker` field
    # Seconds from the call to its first piece (less the transfer) and from there to the end. Where the engine
    # sends only its final piece (vLLM without per-step deltas), the whole generation is `ttft_s`.
    transfer_s: float = 0.0
    ttft_s: float = 0.0
    gen_s: float = 0.0
    confidence: Confidence | None = None


@dataclass
class EngineHealth:
    ready: bool
    reason: str | None
    running: int
    detail: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """Every member the service, admission, the supervisor and the web layer use; `BaseEngine` gives the
    defaults, so an engine declares only what it changes."""

    name: str
    demo: bool
    max_concurrency: int
    model: ModelSpec | None
    # False when the model can never load (bad MODEL_PATH): 503 without Retry-After, a person must act.
    recoverable: bool
    # True where an image it runs is held twice (here and in a worker process or Ray's object store).
    copies_images: bool
    # Where it runs, for /health, /metrics and logs (`host/w0 (gpu 0)`, `ray/...`); None: inline, its `name`.
    worker_id: str | None
    started: bool  # has served at least once: only those are restarted when they die
    restarting: bool  # the supervisor is restarting it (/health says `restarting`)

    @property
    def served_modes(self) -> tuple[str, ...]: ...
    @property
    def ready(self) -> bool: ...
    @property
    def retry_after(self) -> int: ...
    @property
    def result_worker(self) -> str | None: ...
    async def start(self) -> None: ...
    def stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]: ...
    async def generate(self, request: EngineRequest) -> EngineResult: ...
    async def abort(self, request_id: str) -> None: ...
    def health(self) -> EngineHealth: ...
    async def close(self) -> None: ...


class BaseEngine:
    """Readiness, mode checks, abort on cancellation and counters; subclasses implement `_stream`.

    A caller that is cancelled (deadline, client gone) aborts its engine request before the cancellation
    propagates, so no engine keeps decoding for nobody.
    """

    name = "base"
    recoverable = True
    copies_images = False
    worker_id: str | None = None

    def __init__(self, max_concurrency: int) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        self.max_concurrency = max_concurrency
        self.running = 0  # requests inside `stream` now
        self.peak_running = 0  # the most at once since start: admission must keep it <= max_concurrency
        self.completed = 0
        self.demo = False
        self.model: ModelSpec | None = None  # which model it serves (set by `workers.start.start_engines`)
        self.started = False  # has served at least once: only those are restarted when they die
        self.restarting = False
        self._ready = False
        self._reason: str | None = "the engine is starting"
        self._inputs: dict[str, str] = {}  # request id -> input hash, for requests in flight
        self._crash_inputs: set[str] = set()
        self._retry_after = 30

    # --- the interface -------------------------------------------------------------------------
    @property
    def served_modes(self) -> tuple[str, ...]:
        return tuple(self.model.modes if self.model is not None else MODES)

    @property
    def model_name(self) -> str | None:
        return self.model.name if self.model is not None else None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def retry_after(self) -> int:
        """Seconds a client should wait while it is down (the supervisor's next restart)."""
        return self._retry_after

    @property
    def result_worker(self) -> str | None:
        """The name its results carry (a job page's `worker`); None: the service names it (inline engines)."""
        return None

    def health(self) -> EngineHealth:
        return EngineHealth(self._ready, self._reason, self.running)

    def set_ready(self) -> None:
        """Subclasses call this at the end of a successful `start`."""
        self._ready, self._reason, self.started, self.restarting = True, None, True, False

    def mark_dead(self, reason: str) -> None:
        """The engine can no longer serve: what is in flight now is suspect (see `take_crash_inputs`)."""
        if self._ready:
            self._crash_inputs.update(self._inputs.values())
        self._ready, self._reason = False, reason

    def take_crash_inputs(self) -> set[str]:
        inputs, self._crash_inputs = self._crash_inputs, set()
        return inputs

    def mark_restarting(self, attempt: int, reason: str | None, *, next_in_s: float | None = None) -> None:
        self.restarting = True
        self._retry_after = int(next_in_s or 30)
        when = f"; next try in {next_in_s:.0f} s" if next_in_s else ""
        self._reason = f"restarting (attempt {attempt}) after: {reason}{when}"

    async def restart(self) -> None:
        """Start again in place after a death (the supervisor calls this)."""
        with contextlib.suppress(Exception):
            await self.close()
        await self.start()

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self._ready = False
        if not self.restarting:  # mid-restart the reason stays "restarting (attempt N) after: ..."
            self._reason = "the engine is shut down"

    async def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        raise NotImplementedError

    # --- shared logic --------------------------------------------------------------------------
    def require_ready(self) -> None:
        if not self._ready:
            raise not_ready(self)

    def check_mode(self, mode: ModeSpec) -> None:
        if mode.name not in self.served_modes:
            raise UnsupportedMode(
                f"mode {mode.name!r} is not served by the {self.name} engine; "
                f"modes served: {', '.join(self.served_modes)}",
                served_modes=list(self.served_modes),
            )

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        self.require_ready()
        self.check_mode(request.mode)
        if self.model is not None:  # the mode's view sizes for this model's architecture (OCR-2 tiles 768)
            request.mode = self.model.modes.get(request.mode.name, request.mode)
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        if request.input_hash is not None:
            self._inputs[request.request_id] = request.input_hash
        finished = False
        try:
            async for chunk in self._stream(request):
                if chunk.finish_reason is not None:
                    finished = True
                yield chunk
        finally:
            self.running -= 1
            self.completed += 1
            self._inputs.pop(request.request_id, None)
            if not finished:
                # Cancelled (deadline, disconnect) or failed: free the engine's work now.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.abort(request.request_id))

    async def generate(self, request: EngineRequest) -> EngineResult:
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        finish, usage, confidence = "length", Usage(), None
        async for chunk in self.stream(request):
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                finish, usage, confidence = chunk.finish_reason, chunk.usage or usage, chunk.confidence
        end = time.perf_counter()
        first = end if first is None else first
        return EngineResult("".join(parts), finish, usage, round(end - start, 4), transfer_s=request.transfer_s,
                            ttft_s=max(0.0, first - start - request.transfer_s), gen_s=end - first,
                            confidence=confidence)


def not_ready(engine: Engine) -> ModelNotReady:
    """503 for an engine that cannot serve: with Retry-After while it may come back, without when it cannot."""
    reason = engine.health().reason or "the model is not loaded"
    if engine.recoverable:
        return ModelNotReady(reason, retry_after=engine.retry_after)
    return ModelNotReady(reason, retry_after=None)


class UnavailableEngine(BaseEngine):
    """Stands in when no model could be loaded: every OCR call answers 503 saying what to fix."""

    name = "none"

    def __init__(self, reason: str, engine_name: str = "none", *, recoverable: bool = False) -> None:
        super().__init__(1)
        self.name = engine_name
        self._reason = reason
        self.recoverable = recoverable

    async def start(self) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        return None
