"""The Ray side of an engine worker: `EngineActor`, one engine in a Ray actor on some node of the cluster.

It is `workers.host.EngineHost` for a Ray cluster: the same engine (`engines.registry.build_engine` with the worker's
settings), started once, then requests streamed back. Ray carries the messages instead of our socket: `run`
is a streaming generator method, so chunks reach the server as the engine makes them, and `abort` cancels a
request by id. Errors cross as data (`("error", ...)` items, encoded as `workers.wire` does), never as Ray
task errors, so a 400 from the engine is the client's 400 and Ray's own errors mean the actor is gone.

Imported only in Ray worker processes and by `workers.ray_cluster` (ORCHESTRATOR=ray).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray

from config import ModelSpec, Settings
from engines.base import BaseEngine, EngineRequest
from errors import OcrError
from workers.host import stop_engine, worker_settings
from workers.plan import WorkerSpec
from workers.wire import encode_error

log = logging.getLogger("deepseek_ocr.worker")

_END = None


class EngineActor:
    """One engine; its methods are called by `workers.ray_cluster.RayWorkerEngine` on the API server."""

    def __init__(self) -> None:
        self.engine: BaseEngine | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, settings: Settings, model: ModelSpec | None, index: int, kind: str) -> dict[str, Any]:
        """Build and start the engine on the GPUs Ray gave this actor (none: a CPU worker)."""
        from engines.registry import build_engine
        from logging_config import configure_logging

        configure_logging(settings)
        gpus = tuple(str(g) for g in ray.get_gpu_ids())
        self.engine = build_engine(worker_settings(settings, WorkerSpec(index, gpus or ()), kind))
        self.engine.model = model
        await self.engine.start()
        context = ray.get_runtime_context()
        info = {"name": self.engine.name, "served_modes": list(self.engine.served_modes), "pid": os.getpid(),
                "node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "gpus": list(gpus),
                "actor_id": context.get_actor_id(), "max_concurrency": self.engine.max_concurrency}
        log.info("Ray engine worker a%d ready on node %s: %s engine, pid %d", index, info["node_ip"],
                 self.engine.name, os.getpid())
        return info

    async def run(self, request: EngineRequest) -> AsyncIterator[tuple[Any, ...]]:
        """("chunk", EngineChunk) items until the finishing chunk, or one ("error", encoded, engine ready, reason)."""
        assert self.engine is not None, "start() first"
        engine = self.engine
        queue: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for chunk in engine.stream(request):
                    queue.put_nowait(("chunk", chunk))
            except asyncio.CancelledError:
                pass  # aborted: BaseEngine.stream has aborted it in the engine
            except Exception as exc:
                if not isinstance(exc, OcrError):
                    log.exception("Ray engine worker: request %s failed", request.request_id)
                health = engine.health()
                queue.put_nowait(("error", encode_error(exc), health.ready, health.reason))
            finally:
                queue.put_nowait(_END)

        task = asyncio.create_task(pump())
        self.tasks[request.request_id] = task
        try:
            while (item := await queue.get()) is not _END:
                yield item
        finally:
            self.tasks.pop(request.request_id, None)
            if not task.done():
                task.cancel()

    async def abort(self, request_id: str) -> None:
        if (task := self.tasks.get(request_id)) is not None:
            task.cancel()

    async def health(self) -> tuple[bool, str | None, int, dict[str, Any]]:
        if self.engine is None:
            return False, "the engine is starting", 0, {}
        h = self.engine.health()
        return h.ready, h.reason, h.running, h.detail

    async def close(self) -> None:
        await stop_engine(self.engine, self.tasks)
