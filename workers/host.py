"""The worker side: one engine in this process, serving the server's requests over the worker socket.

Messages from the server: ("start", settings, model spec, worker spec, engine kind) once, then
("run", EngineRequest without its images, [(mode, size, byte count) per image], "memfd" or "socket") with the
images' raw pixels in memfds passed just before it on the descriptor channel, or following it on the socket
(workers.wire), ("abort", request id) and ("close",). Answers: ("ready", info) or
("failed", error) once, then ("chunk", request id, EngineChunk), ("error", request id, error, engine ready, reason) and
("health", ready, reason, running, detail) whenever the engine's state changes (and every few seconds).
The engine is the ordinary `engines.registry.build_engine` one; this module only moves its work across the socket.
A request the server cancels is cancelled here too: `BaseEngine.stream` then aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from config import Settings
from engines.base import BaseEngine, EngineRequest
from errors import OcrError
from workers.plan import WorkerSpec
from workers.wire import RequestFailed, encode_error, frame, read_frame, read_request

log = logging.getLogger("deepseek_ocr.worker")

HEALTH_EVERY_S = 0.5  # how often the engine's state is checked; sent when it changes
HEALTH_REFRESH = 6  # ...and every this many checks regardless (running counts, vLLM detail)


def worker_settings(settings: Settings, spec: WorkerSpec, kind: str) -> Settings:
    """The server's settings as this worker's engine needs them: its engine kind, inline, and the device
    by the GPUs this process sees (CUDA_VISIBLE_DEVICES holds only its own, so `cuda:N` becomes `cuda`)."""
    update: dict[str, Any] = {"engine": kind, "engine_workers": "inline"}
    if spec.gpus == ():
        update["device"] = "cpu"
    elif settings.device.startswith("cuda"):
        update["device"] = "cuda"
    return settings.model_copy(update=update)


async def stop_engine(engine: BaseEngine | None, tasks: dict[str, asyncio.Task[None]]) -> None:
    """A worker's end (socket or Ray actor): its requests cancelled (each aborts itself in the engine), then
    the engine closed."""
    for task in list(tasks.values()):
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    if engine is not None:
        with contextlib.suppress(Exception):
            await engine.close()


class EngineHost:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 fds: socket.socket | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.fds = fds  # the descriptor channel: images' memfds, each passed just before its "run" frame
        self.engine: BaseEngine | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def send(self, message: Any) -> None:
        self.writer.write(frame(message))
        await self.writer.drain()

    async def serve(self) -> None:
        """Start the engine the first message asks for, then serve until the server closes or goes away."""
        try:
            if not await self._start(await read_frame(self.reader)):
                return
            monitor = asyncio.create_task(self._monitor())
            try:
                await self._loop()
            finally:
                monitor.cancel()
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("worker %d: the server went away; stopping", os.getpid())
        finally:
            await self._shutdown()

    async def _start(self, message: Any) -> bool:
        from engines.registry import build_engine
        from logging_config import configure_logging

        op, settings, model, spec, kind = message
        if op != "start":
            raise ValueError(f"the first worker message must be 'start', not {op!r}")
        configure_logging(settings)  # the server's LOG_LEVEL / LOG_FORMAT
        try:
            self.engine = build_engine(worker_settings(settings, spec, kind))
            self.engine.model = model
            await self.engine.start()
        except Exception as exc:
            log.exception("worker %s: the %s engine failed to start", spec.label, kind)
            await self.send(("failed", encode_error(exc)))
            return False
        info = {"name": self.engine.name, "served_modes": list(self.engine.served_modes), "pid": os.getpid(),
                "max_concurrency": self.engine.max_concurrency}
        await self.send(("ready", info))
        log.info("worker %s ready: %s engine, pid %d", spec.label, self.engine.name, os.getpid())
        return True

    async def _loop(self) -> None:
        while True:
            message = await read_frame(self.reader)
            op = message[0]
            if op == "run":
                try:
                    request: EngineRequest = await read_request(message, self.reader, self.fds)
                except RequestFailed as failed:  # this request's pixels only: the streams are still in step
                    log.error("worker: request %s: %s", failed.request.request_id, failed)
                    await self.send(("error", failed.request.request_id, encode_error(failed.cause), True, None))
                    continue
                task = asyncio.create_task(self._run(request))
                self.tasks[request.request_id] = task
                task.add_done_callback(lambda _, rid=request.request_id: self.tasks.pop(rid, None))
            elif op == "abort":
                if (task := self.tasks.get(message[1])) is not None:
                    task.cancel()
            elif op == "close":
                return
            else:
                log.error("worker: unknown message %r ignored", op)

    async def _run(self, request: EngineRequest) -> None:
        assert self.engine is not None
        rid = request.request_id
        try:
            async for chunk in self.engine.stream(request):
                await self.send(("chunk", rid, chunk))
        except asyncio.CancelledError:
            return  # the server aborted it; BaseEngine.stream has aborted it in the engine
        except Exception as exc:
            if not isinstance(exc, OcrError):
                log.exception("worker: request %s failed", rid)
            # Whether the engine is still up: an engine that died under this request must be marked dead on
            # the server before the request ends, so that its input gets the strike (engines.supervisor).
            health = self.engine.health()
            with contextlib.suppress(ConnectionError):
                await self.send(("error", rid, encode_error(exc), health.ready, health.reason))

    async def _monitor(self) -> None:
        assert self.engine is not None
        last: tuple[bool, str | None] | None = None
        tick = 0
        while True:
            health = self.engine.health()
            state = (health.ready, health.reason)
            if state != last or tick % HEALTH_REFRESH == 0:
                await self.send(("health", health.ready, health.reason, health.running, health.detail))
                last = state
            tick += 1
            await asyncio.sleep(HEALTH_EVERY_S)

    async def _shutdown(self) -> None:
        await stop_engine(self.engine, self.tasks)
        self.writer.close()
        if self.fds is not None:
            self.fds.close()
