"""The PyTorch engine: our `deepseek_ocr.py` model in this process, on any device (CPU included).

One worker thread runs batches of up to `max_concurrency` requests. Requests that arrive while a batch
decodes join the next batch. Each decode step checks every request's cancel flag, so an aborted request
leaves its batch within one step.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from config import Settings
from engines.base import BaseEngine, Confidence, EngineChunk, EngineHealth, EngineRequest, Usage
from errors import BadRequest, ModelNotReady, OcrError, PromptTooLong

log = logging.getLogger("deepseek_ocr.engine.torch")


@dataclass
class _Job:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)


class TorchEngine(BaseEngine):
    """`deepseek_ocr.DeepseekOCR` behind a worker thread that batches concurrent requests."""

    name = "torch"

    def __init__(self, settings: Settings, *, device: str | None = None, max_concurrency: int | None = None) -> None:
        super().__init__(max_concurrency or settings.sequences)
        self.settings = settings
        self.model_path = settings.model_path
        self.runtime: Any = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._by_id: dict[str, _Job] = {}
        self._worker: threading.Thread | None = None
        self._closing = False
        self._stopped = False  # the worker thread is ending: requests must not wait for it
        self.device = device or settings.device
        self.dtype = settings.dtype
        self.decoding = 0  # rows the worker is decoding now; an aborted row leaves within one step
        self.batches = 0

    async def start(self) -> None:
        import torch

        from deepseek_ocr import DeepseekOCR

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self._reason = f"loading the model from {self.model_path}"
        log.info("loading %s on %s (%s)", self.model_path, self.device, self.dtype)
        self.runtime = await asyncio.to_thread(
            DeepseekOCR.from_pretrained,
            self.model_path,
            device=self.device,
            dtype=self.dtype,
            max_model_len=self.settings.max_model_len,
        )
        self._jobs = queue.Queue()
        self._closing = False
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._worker.start()
        self.set_ready()

    @property
    def ready(self) -> bool:
        self._check_worker()
        return self._ready

    def _check_worker(self) -> None:
        if self._ready and self._worker is not None and not self._worker.is_alive():
            self.mark_dead("the PyTorch engine's worker thread stopped")

    def health(self) -> EngineHealth:
        self._check_worker()
        h = super().health()
        h.detail = {"device": self.device, "dtype": self.dtype, "decoding": self.decoding, "batches": self.batches}
        return h

    async def close(self) -> None:
        self._closing = True
        await super().close()
        for job in list(self._by_id.values()):
            job.cancelled.set()
        self._jobs.put(None)
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join, 30)
        self._fail_waiting("the engine was shut down while this request was waiting; retry")
        self.runtime = None

    async def abort(self, request_id: str) -> None:
        job = self._by_id.get(request_id)
        if job is not None:
            job.cancelled.set()

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._by_id[request.request_id] = job
        self._jobs.put(job)
        # The worker sets `_stopped` before it fails the requests it finds here: one that sees it unset was
        # registered in time to be found; one that sees it set fails itself.
        if self._worker is None or self._stopped:
            self._fail_waiting("the engine stopped; retry")
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
        try:
            self._serve()
        finally:
            # However the thread ends, nobody may wait for it: every request still here gets a 503. The flag
            # goes up first (see `_stream`): `is_alive()` stays true until after the requests were collected.
            self._stopped = True
            if not self._closing:
                self.mark_dead("the PyTorch engine's worker thread stopped")
            self._fail_waiting("the engine stopped while this request was running; retry")

    def _fail_waiting(self, why: str) -> None:
        """Every request still here gets a 503 (a job queued after the worker ended would wait forever)."""
        gone = ModelNotReady(why, retry_after=30)
        for job in list(self._by_id.values()):
            self._deliver(job, gone)

    def _serve(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_concurrency:
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
        r = job.request
        prepared = self.runtime.prepare(
            r.prompt,
            r.images if r.more_images else r.image,  # a list only where the prompt has several images
            base_size=r.mode.base_size,
            image_size=r.mode.image_size,
            crop=r.mode.crop,
            min_crops=self.settings.min_crops,
            max_crops=self.settings.max_crops,
            sampling=r.sampling,
        )
        prepared.cancelled = job.cancelled
        return prepared

    def _run_batch(self, batch: list[_Job]) -> None:
        jobs, prepared = [], []
        for job in batch:
            try:
                prepared.append(self._prepare(job))
                jobs.append(job)
            except PromptTooLong as exc:  # an OcrError already (400 prompt-too-long)
                self._deliver(job, PromptTooLong(f"{exc.detail} (MAX_MODEL_LEN={self.settings.max_model_len})"))
            except ValueError as exc:  # the model's other input checks (tags, sizes, sampling)
                self._deliver(job, BadRequest(str(exc)))
        if not prepared:
            return
        from deepseek_ocr import image_token_counts

        usage = [Usage(len(p.input_ids), p.image_tokens, 0, image_token_counts(p)) for p in prepared]
        scores = [Confidence() for _ in prepared]
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
                        scores[ev.index].add(ev.logprob)
                    done = ev.finish_reason is not None
                    self.decoding -= done
                    self._deliver(jobs[ev.index], EngineChunk(ev.text, ev.finish_reason, u if done else None,
                                                              scores[ev.index] if done else None))
        finally:
            self.decoding = 0
            _release_free_memory()

    @staticmethod
    def _deliver(job: _Job, item: Any) -> None:
        if job.loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def _release_free_memory() -> None:
    """Give freed heap back to the OS after a batch (glibc keeps it otherwise, so RSS only ever grows)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
