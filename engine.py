"""The engine interface the routes call, and its in-process PyTorch implementation.

An engine turns one `EngineRequest` (prompt, optional image, mode, sampling) into text, streamed.
Two implementations share `BaseEngine` (slots, backpressure, abort on cancellation, counters):
`TorchEngine` here (our `deepseek_ocr.py`, any device) and `VllmEngine` in `vllm_engine.py` (GPUs).
`UnavailableEngine` stands in when the model cannot load, so the service still starts and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from config import MODES, ModeSpec, Settings
from errors import BadRequest, ModelNotReady, OcrError, Overloaded, PromptTooLong, UnsupportedMode

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("deepseek_ocr.engine")


@dataclass
class Sampling:
    max_tokens: int = 8192
    temperature: float = 0.0
    top_p: float = 1.0
    ngram_size: int = 30
    ngram_window: int = 90
    seed: int | None = None


@dataclass
class EngineRequest:
    prompt: str
    image: Image.Image | None
    mode: ModeSpec
    sampling: Sampling
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # False when the caller only wants the end result: vLLM then sends no per-step deltas.
    stream: bool = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineChunk:
    """A piece of streamed output; the last one carries `finish_reason` and the final usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class EngineResult:
    text: str
    finish_reason: str
    usage: Usage
    elapsed_s: float


@dataclass
class EngineHealth:
    ready: bool
    reason: str | None
    in_flight: int
    waiting: int
    detail: dict[str, Any] = field(default_factory=dict)


# Set while the current task holds a sequence slot (see BaseEngine.reserve).
_holding_slot: contextvars.ContextVar[bool] = contextvars.ContextVar("holding_slot", default=False)


class BaseEngine:
    """Slots, backpressure and bookkeeping shared by the engines.

    `max_concurrency` sequences run at once; callers beyond that wait for a slot (`waiting`). A new
    top-level request is refused with 503 when `max_queue` are already waiting (`admit`). A caller that
    is cancelled (deadline, client gone) aborts its engine request before the cancellation propagates.
    """

    name = "base"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_path = settings.model_path
        self.started_at = time.monotonic()
        self.in_flight = 0
        self.waiting = 0
        self.completed = 0
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._ready = False
        self._reason: str | None = "the engine is starting"
        self.demo = False

    # --- the interface -------------------------------------------------------------------------
    @property
    def served_modes(self) -> tuple[str, ...]:
        return tuple(MODES)

    def health(self) -> EngineHealth:
        return EngineHealth(self._ready, self._reason, self.in_flight, self.waiting)

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self._ready = False
        self._reason = "the engine is shut down"

    async def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        raise NotImplementedError

    # --- shared logic --------------------------------------------------------------------------
    def require_ready(self) -> None:
        if not self._ready:
            raise ModelNotReady(self._reason or "the model is not loaded", retry_after=30)

    def check_mode(self, mode: ModeSpec) -> None:
        if mode.name not in self.served_modes:
            raise UnsupportedMode(
                f"mode {mode.name!r} is not served by the {self.name} engine; "
                f"modes served: {', '.join(self.served_modes)}",
                served_modes=list(self.served_modes),
            )

    def admit(self) -> None:
        """Refuse new work when the engine is not ready or too much is already waiting."""
        self.require_ready()
        if self.waiting >= self.settings.max_queue and self.in_flight >= self.settings.max_concurrency:
            raise Overloaded(
                f"{self.waiting} requests are waiting and {self.in_flight} running "
                f"(MAX_QUEUE={self.settings.max_queue}, MAX_CONCURRENCY={self.settings.max_concurrency}); "
                "retry later",
                retry_after=max(1, min(60, self.waiting // max(1, self.settings.max_concurrency) + 1)),
            )

    @contextlib.asynccontextmanager
    async def reserve(self) -> AsyncIterator[None]:
        """Hold one sequence slot; work that needs memory (rendering a page) can wait for it here."""
        if _holding_slot.get():
            yield
            return
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        token = _holding_slot.set(True)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            _holding_slot.reset(token)
            self._slots.release()

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        self.require_ready()
        self.check_mode(request.mode)
        async with self.reserve():
            finished = False
            try:
                async for chunk in self._stream(request):
                    if chunk.finish_reason is not None:
                        finished = True
                    yield chunk
            finally:
                if not finished:
                    # Cancelled (deadline, disconnect) or failed: free the engine's work now.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.abort(request.request_id))
                self.completed += 1

    async def generate(self, request: EngineRequest) -> EngineResult:
        start = time.perf_counter()
        parts: list[str] = []
        finish, usage = "length", Usage()
        async for chunk in self.stream(request):
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                finish, usage = chunk.finish_reason, chunk.usage or usage
        return EngineResult("".join(parts), finish, usage, round(time.perf_counter() - start, 4))


class UnavailableEngine(BaseEngine):
    """Stands in when no model could be loaded: every OCR call answers 503 saying what to set."""

    name = "none"

    def __init__(self, settings: Settings, reason: str, engine_name: str = "none") -> None:
        super().__init__(settings)
        self.name = engine_name
        self._reason = reason

    async def start(self) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        return None


@dataclass
class _Job:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)


class TorchEngine(BaseEngine):
    """`deepseek_ocr.py` in this process: one worker thread runs batches of up to MAX_CONCURRENCY.

    Jobs that arrive while a batch decodes join the next batch. Each decode step checks every job's
    cancel flag, so an aborted request leaves its batch within one step.
    """

    name = "torch"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.runtime: Any = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._by_id: dict[str, _Job] = {}
        self._worker: threading.Thread | None = None
        self.device = "cpu"
        self.dtype = "float32"
        self.decoding = 0  # rows the worker is decoding now; an aborted row leaves within one step
        self.batches = 0

    async def start(self) -> None:
        import torch

        from deepseek_ocr import DeepseekOCR

        device = self.settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.settings.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.device, self.dtype = device, dtype
        self._reason = f"loading the model from {self.model_path}"
        log.info("loading %s on %s (%s)", self.model_path, device, dtype)
        self.runtime = await asyncio.to_thread(
            DeepseekOCR.from_pretrained,
            self.model_path,
            device=device,
            dtype=dtype,
            max_model_len=self.settings.max_model_len,
        )
        self._worker = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._worker.start()
        self._ready, self._reason = True, None

    def health(self) -> EngineHealth:
        h = super().health()
        if self._worker is not None and not self._worker.is_alive() and self._ready:
            self._ready, self._reason = False, "the engine worker thread died; restart the service"
            h = super().health()
        h.detail = {"device": self.device, "dtype": self.dtype, "decoding": self.decoding, "batches": self.batches}
        return h

    async def close(self) -> None:
        await super().close()
        for job in list(self._by_id.values()):
            job.cancelled.set()
        self._jobs.put(None)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join, 30)
        self.runtime = None

    async def abort(self, request_id: str) -> None:
        job = self._by_id.get(request_id)
        if job is not None:
            job.cancelled.set()

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._by_id[request.request_id] = job
        self._jobs.put(job)
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()
            self._by_id.pop(request.request_id, None)

    # --- worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.settings.max_concurrency:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                batch.append(nxt)
            try:
                self._run_batch([j for j in batch if not j.cancelled.is_set()])
            except Exception as exc:  # a bug or device failure: fail this batch, keep serving
                log.exception("batch failed")
                for job in batch:
                    self._deliver(job, OcrError(f"the engine failed on this request: {exc}"))

    def _prepare(self, job: _Job) -> Any:
        from deepseek_ocr import SamplingParams

        r, s = job.request, job.request.sampling
        params = SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            ngram_size=s.ngram_size,
            ngram_window=s.ngram_window,
            seed=s.seed,
        )
        prepared = self.runtime.prepare(
            r.prompt,
            r.image,
            base_size=r.mode.base_size,
            image_size=r.mode.image_size,
            crop=r.mode.crop,
            min_crops=self.settings.min_crops,
            max_crops=self.settings.max_crops,
            sampling=params,
        )
        prepared.cancelled = job.cancelled
        return prepared

    def _run_batch(self, batch: list[_Job]) -> None:
        jobs, prepared = [], []
        for job in batch:
            try:
                prepared.append(self._prepare(job))
                jobs.append(job)
            except ValueError as exc:
                err = PromptTooLong(str(exc)) if "max_model_len" in str(exc) else BadRequest(str(exc))
                self._deliver(job, err)
        if not prepared:
            return
        usage = [Usage(len(p.input_ids), p.image_tokens, 0) for p in prepared]
        self.batches += 1
        self.decoding = len(prepared)
        try:
            for step, events in enumerate(self.runtime.stream(prepared)):
                if step == 0:
                    # Prefill has embedded the images: their pixel tensors (~42 MB a gundam page) can go.
                    for p in prepared:
                        p.images = None
                for ev in events:
                    u = usage[ev.index]
                    if ev.finish_reason not in ("abort", "stop"):  # the EOS is not part of the answer
                        u.completion_tokens += 1
                    done = ev.finish_reason is not None
                    self.decoding -= done
                    self._deliver(jobs[ev.index], EngineChunk(ev.text, ev.finish_reason, u if done else None))
        finally:
            self.decoding = 0
            _release_free_memory()

    @staticmethod
    def _deliver(job: _Job, item: Any) -> None:
        if job.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)


def _release_free_memory() -> None:
    """Give freed heap back to the OS after a batch (glibc keeps it otherwise, so RSS only ever grows)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def build_engine(settings: Settings) -> BaseEngine:
    """The engine that ENGINE asks for; `auto` takes vLLM when it imports and a GPU is present."""
    kind = settings.engine
    if kind == "auto":
        kind = "vllm" if _vllm_usable() else "torch"
    if kind == "vllm":
        from vllm_engine import VllmEngine

        return VllmEngine(settings)
    return TorchEngine(settings)


def _vllm_usable() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    # NVML answers without initialising CUDA here; a CUDA init now would break vLLM's forked workers.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False
