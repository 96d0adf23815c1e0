"""Engine workers on a Ray cluster (ORCHESTRATOR=ray): one Ray actor per GPU of the cluster, across hosts.

`ray_engines(settings)` (called by `engines.default_factory`) joins the cluster at RAY_ADDRESS (unset:
`auto`) and makes one `RayWorkerEngine` per worker slot: one per GPU (per TENSOR_PARALLEL_SIZE GPUs for
vLLM), one per node where the cluster has no GPU (or DEVICE=cpu), or DATA_PARALLEL_SIZE of them. Each holds
one `workers.ray_actor.EngineActor`; to admission and the supervisor it is an ordinary engine, like
`workers.client.WorkerEngine` for one host. An actor that dies (its node went away, its process was killed)
marks its engine dead at once: items in flight get 503 (job pages are re-run by the job runner) and the
supervisor's `restart` makes a new actor wherever the cluster has room. `Scaler` checks the cluster every
few seconds and adds engines for GPUs (or CPU nodes) that joined, so a running job takes them too.

Every node must hold this code at the same path as the API server (the same image) and the model at
MODEL_PATH; the actors get the API's code directory on their PYTHONPATH. Nothing else imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from config import Settings
from engines.base import BaseEngine, EngineChunk, EngineHealth, EngineRequest
from errors import ModelNotReady, OcrError
from workers.ray_actor import EngineActor
from workers.wire import decode_error

log = logging.getLogger("deepseek_ocr.workers")

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 900.0  # an actor waiting for room, or loading vLLM, this long is given up and tried again
PING_S = 1.0  # how often each engine asks its actor how it is
PING_TIMEOUT_S = 15.0
NODE_WAIT_S = 5.0  # at start-up, while the cluster has no node for workers, how often it is checked
SCALE_EVERY_S = 5.0  # how often the cluster is compared with the engines (nodes that joined take work)
_STANDARD = ("CPU", "GPU", "memory", "object_store_memory")

CLUSTER: RayCluster | None = None  # this server's cluster, once `ray_engines` joined it


class RayCluster:
    """The cluster as this server sees it: its nodes (refreshed by the scaler) and the engines made on it."""

    def __init__(self, settings: Settings, kind: str) -> None:
        self.settings, self.kind = settings, kind
        self.address = settings.ray_address or "auto"
        self.engines: list[RayWorkerEngine] = []
        self.nodes: list[dict[str, Any]] = []
        self.actor_class: Any = None
        self._made = 0

    def connect(self) -> None:
        if not ray.is_initialized():
            # ray.init takes SIGTERM over (sys.exit at once): uvicorn's graceful shutdown, which gives the
            # job leases back and closes the engines, must keep it.
            kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                # Our code first, then the node's own PYTHONPATH (Ray expands ${...} on the node): packages
                # installed with --target (a GPU host's vLLM, say) stay importable in the actors.
                path = f"{ROOT}{os.pathsep}${{PYTHONPATH}}"
                ray.init(address=self.address, namespace="deepseek-ocr", log_to_driver=True,
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
            finally:
                if threading.current_thread() is threading.main_thread():
                    for sig, handler in kept.items():
                        if handler is not None:
                            signal.signal(sig, handler)
        self.actor_class = ray.remote(max_restarts=0)(EngineActor)
        self.refresh()

    def refresh(self) -> list[dict[str, Any]]:
        self.nodes = [n for n in ray.nodes() if n.get("Alive")]
        return self.nodes

    @property
    def gpus(self) -> int:
        return int(sum(n["Resources"].get("GPU", 0) for n in self.nodes))

    @property
    def on_gpus(self) -> bool:
        return self.gpus > 0 and not (self.kind == "torch" and self.settings.device == "cpu")

    @property
    def group(self) -> int:
        """GPUs per actor: TENSOR_PARALLEL_SIZE for vLLM, else one."""
        return self.settings.tensor_parallel_size if self.kind == "vllm" else 1

    def slots(self) -> list[str | None]:
        """Where workers belong now: None (any GPU) per GPU group, or a node id per CPU node."""
        if self.on_gpus:
            return [None] * (self.gpus // self.group)
        return [n["NodeID"] for n in self.nodes if n["Resources"].get("CPU", 0) >= 1]

    def actor_options(self, node_id: str | None) -> dict[str, Any]:
        options: dict[str, Any] = {"num_gpus": self.group} if self.on_gpus else {"num_cpus": 1}
        if node_id is not None:  # hard: one per node; it waits for room there (a restart goes anywhere)
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return options

    def new_engine(self, node_id: str | None) -> RayWorkerEngine:
        engine = RayWorkerEngine(self, self._made, node_id)
        self._made += 1
        self.engines.append(engine)
        return engine

    def view(self, busy: Any = None) -> dict[str, Any]:
        """The cluster for /health: each node, its resources, the workers on it and their items in flight."""
        nodes = []
        for n in self.nodes:
            here = [e for e in self.engines if e.node_id == n["NodeID"]]
            resources = n["Resources"]
            nodes.append({
                "node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"), "cpus": resources.get("CPU", 0),
                "gpus": resources.get("GPU", 0),
                "resources": {k: v for k, v in resources.items() if k not in _STANDARD and not k.startswith("node:")},
                "workers": [e.worker_id for e in here],
                "in_flight": sum(busy(e) for e in here) if busy is not None else sum(e.running for e in here),
            })
        return {"address": self.address, "engine": self.kind, "gpus": self.gpus,
                "workers": len(self.engines), "workers_ready": sum(e.ready for e in self.engines), "nodes": nodes}


def ray_engines(settings: Settings) -> list[BaseEngine]:
    """The engines for ORCHESTRATOR=ray: one per worker slot of the cluster (DATA_PARALLEL_SIZE: that many)."""
    global CLUSTER
    kind = settings.engine if settings.engine != "auto" else None
    cluster = RayCluster(settings, kind or "torch")
    try:
        cluster.connect()
    except (ConnectionError, RuntimeError) as exc:  # start_engines reports a ValueError as the model's 503
        raise ValueError(f"ORCHESTRATOR=ray could not join the Ray cluster at RAY_ADDRESS={cluster.address}: "
                         f"{exc}") from None
    deadline = time.monotonic() + START_TIMEOUT_S
    while not cluster.slots() and time.monotonic() < deadline:  # the API's head node came up first
        log.warning("Ray cluster at %s: no node with a GPU or CPU for workers yet; waiting for one to join",
                    cluster.address)
        time.sleep(NODE_WAIT_S)  # start-up: nothing is served before the engines exist
        cluster.refresh()
    if kind is None:  # auto: vLLM when the cluster has GPUs (the API host itself may have none)
        cluster.kind = "vllm" if cluster.gpus else "torch"
    slots = cluster.slots()
    if settings.data_parallel_size is not None:
        nodes = slots or [None]
        slots = [None if cluster.on_gpus else nodes[i % len(nodes)] for i in range(settings.data_parallel_size)]
    if not slots:
        raise ValueError(f"the Ray cluster at {cluster.address} has no node with a CPU or GPU to place a worker on")
    log.info("Ray cluster at %s: %d nodes, %d GPUs: %d %s workers", cluster.address, len(cluster.nodes),
             cluster.gpus, len(slots), cluster.kind)
    if CLUSTER is None:  # MODELS: the default (first) model's workers are the ones the scaler adds to
        CLUSTER = cluster
    return [cluster.new_engine(node) for node in slots]


class RayWorkerEngine(BaseEngine):
    """One Ray actor as an engine: requests stream from its `run`; its death is noticed by the failing call
    or by the health ping (PING_S), whichever comes first."""

    copies_images = True  # an image it runs is also serialized into Ray's object store: the budget counts it twice

    def __init__(self, cluster: RayCluster, index: int, node_id: str | None) -> None:
        super().__init__(cluster.settings.sequences)  # the actor's own once it started
        self.cluster, self.index = cluster, index
        self.name = cluster.kind
        self.node_id = node_id  # where it runs (once started), or where it was asked to go
        self.worker_id = f"ray/a{index}"
        self.actor: Any = None
        self._monitor: asyncio.Task[None] | None = None
        self._info: dict[str, Any] = {}
        self._detail: dict[str, Any] = {}
        self._remote_running = 0
        self._starts = 0

    @property
    def served_modes(self) -> tuple[str, ...]:
        return tuple(self._info.get("served_modes", ())) or super().served_modes

    @property
    def result_worker(self) -> str:
        """What `service.ocr.OcrService.generate` writes into each result it ran: a job page's `worker` field."""
        return self.worker_id

    # --- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.restarting:
            self._reason = f"starting Ray engine worker a{self.index}"
        # A restart goes wherever there is room; the first start spreads CPU workers one per node.
        where = self.node_id if self._starts == 0 else None
        actor = self.cluster.actor_class.options(**self.cluster.actor_options(where)).remote()
        self.actor = actor
        self._starts += 1
        settings, model = self.cluster.settings, self.model
        try:
            self._info = await asyncio.wait_for(actor.start.remote(settings, model, self.index, self.cluster.kind),
                                                START_TIMEOUT_S)
        except BaseException as exc:
            self._kill()
            if isinstance(exc, TimeoutError):
                raise RuntimeError(f"Ray engine worker a{self.index} did not start in {START_TIMEOUT_S:.0f} s "
                                   "(no room in the cluster, or a slow model load)") from None
            if isinstance(exc, RayError):
                raise RuntimeError(f"Ray engine worker a{self.index} failed to start: {exc}") from None
            raise
        self.node_id = self._info["node_id"]
        self.max_concurrency = int(self._info.get("max_concurrency") or self.max_concurrency)  # MAX_CONCURRENCY=auto
        self.worker_id = f"ray/{self._info['node_ip']}/{self.node_id[:12]}/a{self.index}"
        self._monitor = asyncio.create_task(self._watch(actor), name=f"ray-worker-{self.index}")
        log.info("Ray engine worker %s started: pid %d, %s engine", self.worker_id, self._info["pid"],
                 self._info["name"])
        self.set_ready()

    async def close(self) -> None:
        serving = self._ready  # a dead or still-pending actor is not asked to close: it is killed
        await super().close()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        actor = self.actor
        if actor is not None and serving:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(actor.close.remote(), 10)
        self._kill()

    def _kill(self) -> None:
        actor, self.actor = self.actor, None
        if actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    # --- health ------------------------------------------------------------------------------------
    def health(self) -> EngineHealth:
        h = super().health()
        info = self._info
        h.detail = {**self._detail, "orchestrator": "ray", "worker": self.worker_id, "node_id": self.node_id,
                    "node_ip": info.get("node_ip"), "gpus": info.get("gpus", []), "pid": info.get("pid"),
                    "worker_running": self._remote_running, "starts": self._starts}
        return h

    async def _watch(self, actor: Any) -> None:
        """Ask the actor how it is every PING_S: one that does not answer, or whose engine died, is dead."""
        while True:
            await asyncio.sleep(PING_S)
            try:
                ready, reason, running, detail = await asyncio.wait_for(actor.health.remote(), PING_TIMEOUT_S)
            except (RayError, TimeoutError) as exc:
                if self._ready and actor is self.actor:
                    self._died(f"Ray engine worker {self.worker_id} is gone ({type(exc).__name__}: {exc})")
                return
            self._remote_running, self._detail = running, detail
            if not ready and self._ready:
                self._died(f"Ray engine worker {self.worker_id}: {reason or 'its engine is not ready'}")
                return

    def _died(self, reason: str) -> None:
        log.error("%s", reason)
        self.mark_dead(reason)
        self._kill()  # replaced whole by the supervisor's restart

    # --- requests ----------------------------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        if self.actor is not None:
            with contextlib.suppress(Exception):
                self.actor.abort.remote(request_id)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        actor = self.actor
        if actor is None:
            raise ModelNotReady(self._reason or f"Ray engine worker a{self.index} is not running", retry_after=5)
        try:
            async for ref in actor.run.options(num_returns="streaming").remote(request):
                item = await ref
                if item[0] == "chunk":
                    yield item[1]
                    if item[1].finish_reason is not None:
                        return
                    continue
                _, error, engine_ready, reason = item
                if not engine_ready and self._ready:  # its engine died under this item: replace the worker
                    self._died(f"Ray engine worker {self.worker_id}: {reason or 'its engine died'}")
                    raise ModelNotReady(self._reason or "the engine worker died", retry_after=10)
                raise decode_error(error)
        except RayActorError as exc:
            if actor is self.actor and self._ready:
                self._died(f"Ray engine worker {self.worker_id} died ({type(exc).__name__}: {exc})")
            raise ModelNotReady(self._reason or f"Ray engine worker {self.worker_id} died", retry_after=10) from None
        except RayError as exc:
            raise OcrError(f"the Ray engine worker failed on this request: {type(exc).__name__}: {exc}") from None


class Scaler:
    """Adds engines for the cluster's new GPUs (or CPU nodes) while the server runs, and refreshes the
    node list /health shows. DATA_PARALLEL_SIZE fixes the count: then nothing is added."""

    def __init__(self, cluster: RayCluster, service: Any) -> None:
        self.cluster, self.service = cluster, service
        self._task: asyncio.Task[None] | None = None
        self._joining: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ray-scaler")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._joining) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SCALE_EVERY_S)
            try:
                await self.check()
            except Exception:
                log.exception("Ray scaler: checking the cluster failed; retrying")

    async def check(self) -> None:
        """An engine for each slot no engine fills (or is being started for); each starts on its own, so one
        that waits for room does not hold up the others."""
        cluster = self.cluster
        await asyncio.to_thread(cluster.refresh)
        if cluster.settings.data_parallel_size is not None or not cluster.engines:
            return
        slots = cluster.slots()
        if cluster.on_gpus:
            missing: list[str | None] = slots[len(cluster.engines):]
        else:
            placed = {e.node_id for e in cluster.engines}
            missing = [node for node in slots if node not in placed]
        template = cluster.engines[0]
        for node in missing:
            engine = cluster.new_engine(node)  # counted from now on: not added twice
            engine.model, engine.demo = template.model, template.demo
            task = asyncio.create_task(self._join(engine), name=f"ray-join-{engine.index}")
            self._joining.add(task)
            task.add_done_callback(self._joining.discard)

    async def _join(self, engine: RayWorkerEngine) -> None:
        try:
            await engine.start()
        except Exception as exc:
            log.warning("Ray scaler: a new worker for node %s did not start: %s", engine.node_id, exc)
            self.cluster.engines.remove(engine)
            return
        self.service.admission.add_engine(engine)
        self.service.supervisor.engines.append(engine)
        log.info("Ray scaler: worker %s joined", engine.worker_id)
