"""The server side of an engine worker: `WorkerEngine`, an engine whose work runs in a worker process.

To admission and the supervisor it is an ordinary `BaseEngine`: its `max_concurrency` is the worker's, its
`restart` replaces the process. Requests are multiplexed over one socket pair by request id; a cancelled
request sends an abort. The worker's end of stream (it was killed, it crashed) marks the engine dead at
once: requests in flight get a 503 with Retry-After, their inputs get a strike (engines.supervisor), and the
supervisor starts a new worker with backoff. A worker whose engine dies inside it (a vLLM engine core)
reports that in its health message and is replaced the same way: a fresh process is the clean state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from config import Settings
from engines.base import BaseEngine, EngineChunk, EngineHealth, EngineRequest
from errors import ModelNotReady, OcrError
from workers import wire
from workers.plan import WorkerSpec, share_settings
from workers.wire import decode_error, frame, read_frame, request_frames, write_pixels

log = logging.getLogger("deepseek_ocr.workers")

ROOT = Path(__file__).resolve().parent.parent
CLOSE_WAIT_S = 15.0  # a worker asked to close gets this long before it is killed
GROUP_EXIT_WAIT_S = 15.0  # how long a killed worker's engine core may take to exit (its GPU memory to free)
_DEAD = object()


class WorkerEngine(BaseEngine):
    # An image it runs exists here and in the worker: the pixel budget counts it twice. The memfd it crosses in
    # stands in for the worker's copy until the worker copies out of it, then is closed: a third copy only for
    # that one copy, one request at a time per worker (workers.wire, "pixels in a memfd").
    copies_images = True

    def __init__(self, settings: Settings, kind: str, spec: WorkerSpec) -> None:
        settings = share_settings(settings, spec)  # its share of a GPU that several engines use
        super().__init__(settings.sequences)  # the worker's own once it started
        self.settings, self.kind, self.spec = settings, kind, spec
        self.name = kind
        self.worker_id = f"{socket.gethostname()}/{spec.label}"
        self.process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._fds: socket.socket | None = None  # the descriptor channel: images' memfds (workers.wire)
        self._reader_task: asyncio.Task[None] | None = None
        self._streams: dict[str, asyncio.Queue[Any]] = {}
        self._send_lock = asyncio.Lock()
        self._served: tuple[str, ...] = ()
        self._detail: dict[str, Any] = {}
        self._worker_running = 0
        self._starts = 0

    @property
    def served_modes(self) -> tuple[str, ...]:
        return self._served or super().served_modes

    # --- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.restarting:
            self._reason = f"starting engine worker {self.spec.label}"
        ours, theirs = socket.socketpair()
        passed = [theirs]
        fds_arg = "-"  # no descriptor channel: pixels cross the socket (workers.wire.HAS_MEMFD)
        if wire.HAS_MEMFD:
            self._fds, their_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._fds.setblocking(False)
            passed.append(their_fds)
            fds_arg = str(their_fds.fileno())
        env = dict(os.environ)
        if self.spec.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.spec.gpus)
        if self.spec.threads is not None and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(self.spec.threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "workers.main", str(theirs.fileno()), str(os.getpid()), fds_arg,
                pass_fds=tuple(s.fileno() for s in passed), env=env, cwd=str(ROOT),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killing it takes its engine core along
            )
        finally:
            for sock in passed:
                sock.close()
        self._starts += 1
        reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 20)
        self._send(("start", self.settings, self.model, self.spec, self.kind))
        try:
            answer = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self._reap()
            raise RuntimeError(f"engine worker {self.spec.label} exited while starting (exit code {code}); "
                               "see its log above") from None
        if answer[0] == "failed":
            await self._reap()
            raise decode_error(answer[1])
        info = answer[1]
        self._served = tuple(info["served_modes"])
        self.max_concurrency = int(info.get("max_concurrency") or self.max_concurrency)  # MAX_CONCURRENCY=auto
        self._detail = {"pid": info["pid"]}
        self._reader_task = asyncio.create_task(self._read(reader), name=f"worker-{self.spec.index}")
        log.info("engine worker %s started: pid %d, %s engine, modes %s", self.spec.label, info["pid"],
                 info["name"], ",".join(self._served))
        self.set_ready()

    async def close(self) -> None:
        await super().close()
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    async with self._send_lock:
                        writer.write(frame(("close",)))
                        await writer.drain()
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), CLOSE_WAIT_S)
            except TimeoutError:
                log.warning("engine worker %s did not stop in %.0f s: killing it", self.spec.label, CLOSE_WAIT_S)
        await self._reap()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        if writer is not None:
            writer.close()
        if self._fds is not None:
            self._fds.close()
            self._fds = None

    async def _reap(self) -> int | None:
        process = self.process
        if process is None:
            return None
        self.kill()
        code = await process.wait()
        if self.spec.shares > 1:
            # Its engine core's GPU memory is free only once that process has exited too. A successor that
            # starts sooner would see memory come free during vLLM's profiling run, which vLLM refuses
            # ("Error in memory profiling"), and would size its cache by the wrong figure.
            await _group_exited(process.pid, GROUP_EXIT_WAIT_S)
        return code

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (vLLM's engine core): its whole process group."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the group outlives a leader that already exited
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    @property
    def result_worker(self) -> str:
        """What `service.ocr.OcrService.generate` writes into each result it ran: this replica's worker (the job
        runner puts the replica's id before it in a page's `worker` field)."""
        return self.spec.label

    # --- health ------------------------------------------------------------------------------------
    def health(self) -> EngineHealth:
        h = super().health()
        h.detail = {**self._detail, "worker": self.worker_id, "gpus": list(self.spec.gpus or ()),
                    "worker_running": self._worker_running, "starts": self._starts}
        return h

    # --- requests ----------------------------------------------------------------------------------
    def _send(self, message: Any) -> None:
        if self._writer is None:
            raise ModelNotReady(self._reason or f"engine worker {self.spec.label} is not running", retry_after=5)
        self._writer.write(frame(message))

    async def abort(self, request_id: str) -> None:
        async with self._send_lock:  # never between another request's header and its pixels
            with contextlib.suppress(ModelNotReady, ConnectionError, RuntimeError):
                self._send(("abort", request_id))

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request.request_id] = queue
        fds: list[int] = []
        try:
            # The transfer: the memfd's fill (off the loop, no lock held), the wait for the send lock and the send.
            sending = time.perf_counter()
            via = wire.VIA_MEMFD if self._fds is not None and request.image is not None else wire.VIA_SOCKET
            head, images = request_frames(request, via)
            if via == wire.VIA_MEMFD:
                fds, images = await wire.to_memfds(images), []
            async with self._send_lock:  # the descriptor and the header together: no other message between them
                channel = self._fds  # a worker restarted since the fill takes the same memfd
                if self._writer is None or (fds and channel is None):
                    raise ModelNotReady(self._reason or f"engine worker {self.spec.label} is not running",
                                        retry_after=5)
                try:
                    if self._writer.is_closing():
                        raise ConnectionResetError
                    if fds and channel is not None:
                        # First, so that they are waiting when the worker reads the header (workers.wire).
                        await wire.send_fds(channel, fds)
                    self._writer.write(head)
                    await write_pixels(self._writer, images)
                # The worker went away before or during the send (its reader marks it dead). uvloop's
                # transport says so with a RuntimeError ("the handler is closed") where asyncio's says nothing.
                except (ConnectionError, OSError, RuntimeError):
                    raise ModelNotReady(self._reason or f"engine worker {self.spec.label} died",
                                        retry_after=10) from None
                finally:
                    for fd in fds:  # the worker holds its own descriptors now (or never will)
                        os.close(fd)
                    fds = []
            request.transfer_s = time.perf_counter() - sending  # the lock wait included: other sends hold it
            del images
            while True:
                item = await queue.get()
                if item is _DEAD:
                    raise ModelNotReady(self._reason or f"engine worker {self.spec.label} died", retry_after=10)
                if isinstance(item, OcrError):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            for fd in fds:  # cancelled or refused before the send
                os.close(fd)
            self._streams.pop(request.request_id, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Deliver the worker's messages; its end of stream is its death."""
        why = "closed its socket"
        try:
            while True:
                message = await read_frame(reader)
                op = message[0]
                if op == "chunk":
                    if (queue := self._streams.get(message[1])) is not None:
                        queue.put_nowait(message[2])
                elif op == "error":
                    _, rid, error, engine_ready, reason = message
                    if not engine_ready and self._ready:  # the engine died under it: strike first, then answer
                        self._died(f"engine worker {self.spec.label}: {reason or 'its engine died'}")
                    elif (queue := self._streams.get(rid)) is not None:
                        queue.put_nowait(decode_error(error))
                elif op == "health":
                    _, ready, reason, running, detail = message
                    self._worker_running = running
                    self._detail = {**detail, "pid": self._detail.get("pid")}
                    if not ready and self._ready:
                        self._died(f"engine worker {self.spec.label}: {reason or 'its engine is not ready'}")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            why = f"closed its socket ({type(exc).__name__})"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a frame we cannot read: the stream is out of step, treat the worker as gone
            log.exception("engine worker %s: bad message", self.spec.label)
            why = f"sent a message that could not be read ({exc})"
        if self._ready:
            self._died(f"engine worker {self.spec.label} {why}")
            status = await self._exit_status()
            log.error("engine worker %s: %s", self.spec.label, status)
            if not self._ready and not self.restarting:
                self._reason = f"{self._reason}; {status}"

    async def _exit_status(self) -> str:
        process = self.process
        if process is None:
            return "no process"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(process.wait()), 1.0)
        code = process.returncode
        if code is None:
            return "its process is still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def _died(self, reason: str) -> None:
        log.error("%s", reason)
        self.mark_dead(reason)
        for queue in self._streams.values():
            queue.put_nowait(_DEAD)
        self.kill()  # a worker whose engine died is replaced whole


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies aside) of process group `pgid`, from /proc; [] where there is no /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(stat.parent.name))
    return members


async def _group_exited(pgid: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            log.warning("engine worker group %d: processes still running %.0f s after SIGKILL", pgid, limit_s)
            return
        await asyncio.sleep(0.05)
