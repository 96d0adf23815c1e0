"""PDF rendering for the server: every PDF is opened, validated and rendered in worker processes.

The server process never parses an upload (a hostile PDF can hold the GIL for 36 s and allocate
gigabytes while MuPDF opens it). It writes the bytes to a private spill file and sends work to
`RenderPool` workers (`pdf.render_process.worker_main`), one message at a time per worker:

    async with pool.document(data, password=pw, max_pages=n) as doc:   # opened + validated in a worker
        page = await doc.render(3, dpi=144, max_pixels=40_000_000)

The searchable PDF (the text layer) is a request of its own, written in a worker too:

    pdf = await pool.searchable_pdf(data, [(1, text_of_page_1), (3, text_of_page_3)], password=pw)

Each worker keeps the documents it opened, so one request's PDF is parsed once per worker that renders
it, and pages prefer a worker that has their document open. Fairness (`service.fairness`): work waits for a
process by its `flow` (a sync request's document, a job's pages); a freed process goes to sync work before a
job's, then to the flow holding the fewest processes (round-robin among equals), and no flow holds more than
PDF_RENDER_PER_DOCUMENT at once, so a PDF whose pages take MuPDF a minute each (a 44 KB fill bomb) can never
take every process: other PDFs, and the open of `POST /jobs`, always find one. A deadline starts when the page is handed
to a worker (never while it waits for one); past it, or when the awaiting task is cancelled (client
gone, request deadline), that one worker is killed and later replaced. No other request's page shares
that worker, so nothing else can fail with it. Workers run under RLIMIT_AS and die with the server
(PR_SET_PDEATHSIG); spill files live in a per-process directory, and directories of dead servers are
removed when a pool starts. The server process never imports PyMuPDF (`mupdf_missing` asks a child interpreter).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import itertools
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from PIL import Image

import errors
from errors import DeadlineExceeded, InvalidPdf, OcrError, PayloadTooLarge, ServiceUnavailable
from pdf.limits import PdfLimits
from pdf.render_process import KEEP_OPEN, PDF_EOF_WINDOW, RenderedPage, check_pdf_header, check_render_args, worker_main
from service.fairness import FlowQueue

__all__ = ["PdfDocument", "PdfLimits", "RenderPool", "RenderedPage", "mupdf_missing"]

log = logging.getLogger(__name__)

# Defaults until the settings carry them (PDF_OPEN_TIMEOUT_S, PDF_RENDER_MEMORY_MB).
DEFAULT_OPEN_TIMEOUT_S = 30.0
DEFAULT_MEMORY_LIMIT_MB = 1024  # measured: an A4 page at 600 dpi (35 MP) renders under a 200 MB limit
DEFAULT_SEARCHABLE_TIMEOUT_S = 120.0  # PDF_SEARCHABLE_TIMEOUT_S's default

_SPILL_PREFIX = "ocr-render-"
_START_TIMEOUT_S = 120.0  # a worker importing PyMuPDF on a busy machine; not part of any page's deadline
_ids = itertools.count(1)


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    docs: OrderedDict[str, None] = field(default_factory=OrderedDict)  # mirrors the child's KEEP_OPEN LRU
    reading: Future | None = None  # the thread blocked in conn.recv(), if any
    flow: object = None  # whose work it runs (None: idle); it counts in that flow's share until released


class RenderPool:
    """Worker processes that open and render PDFs; see the module docstring."""

    def __init__(
        self,
        workers: int,
        *,
        page_timeout_s: float,
        open_timeout_s: float,
        memory_limit_mb: int,
        spill_dir: str | None = None,
        limits: PdfLimits | None = None,
        searchable_timeout_s: float = DEFAULT_SEARCHABLE_TIMEOUT_S,
        per_document: int = 0,
    ) -> None:
        if workers < 1 or page_timeout_s <= 0 or open_timeout_s <= 0 or memory_limit_mb < 1:
            raise ValueError(
                f"need workers >= 1, timeouts > 0 and memory_limit_mb >= 1, got {workers}, {page_timeout_s}, "
                f"{open_timeout_s}, {memory_limit_mb}"
            )
        self.workers = workers
        self.page_timeout_s = page_timeout_s
        self.open_timeout_s = open_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.searchable_timeout_s = searchable_timeout_s
        # Processes one flow may hold at once (PDF_RENDER_PER_DOCUMENT; 0: all but one, so others find one).
        self.per_document = min(workers, per_document or max(1, workers - 1))
        self.limits = limits or PdfLimits()
        self.spill_dir = _fresh_spill_dir(spill_dir or tempfile.gettempdir())
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._starting = 0
        # Work waiting for a process, and the processes each flow holds (idle ones, or not started yet, are free).
        self._queue = FlowQueue(lambda: len(self._idle) + self.workers - len(self._all) - self._starting,
                                self.per_document)
        # One thread per worker, blocked in conn.recv() while that worker works (killing it ends the read).
        self._readers = ThreadPoolExecutor(workers + 1, thread_name_prefix="pdf-render-reader")
        # spawn, not fork: the server has threads (and maybe CUDA) that must not be forked.
        self._context = multiprocessing.get_context("spawn")
        self._closed = False

    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and /health)."""
        return [w.process.pid for w in self._all if w.process.pid is not None]

    @contextlib.asynccontextmanager
    async def document(self, data: bytes, *, password: str | None, max_pages: int,
                       flow: object = None) -> AsyncIterator[PdfDocument]:
        """Open and validate `data` in a worker; leaving the block frees it in every worker. `flow`: whose work
        its open and renders are (`service.fairness.job_flow` for a job's; None: a sync document of its own)."""
        if max_pages <= 0:
            raise ValueError(f"max_pages must be positive, got {max_pages}")
        if self._closed:
            raise ServiceUnavailable("The PDF renderer is shutting down.")
        check_pdf_header(data[:PDF_EOF_WINDOW])  # 400/415 for an empty file or a non-PDF without a worker
        doc_id = f"{os.getpid()}-{next(_ids)}"
        path = os.path.join(self.spill_dir, f"{doc_id}.pdf")
        try:
            await _finish_even_if_cancelled(asyncio.to_thread(self._spill, path, data))
            flow = doc_id if flow is None else flow
            reply = await self._run(doc_id, ("open", doc_id, path, password, max_pages), self.open_timeout_s, flow)
            _, page_count, metadata, repaired, warnings, sizes = reply
            yield PdfDocument(self, doc_id, path, password, page_count, metadata, warnings, repaired, sizes, flow)
        finally:
            self._forget(doc_id)
            with contextlib.suppress(OSError):
                os.unlink(path)

    @property
    def unavailable(self) -> str | None:
        """Why the workers cannot run PyMuPDF (no PDFs, no searchable PDFs), or None."""
        return mupdf_missing()

    async def searchable_pdf(self, data: bytes, pages: Sequence[tuple[int, str]], *, password: str | None) -> bytes:
        """The PDF's `pages` (1-based number, the model's grounded text), in that order, with their text laid under
        them, written in a worker (`pdf.render_process.text_layer`) within PDF_SEARCHABLE_TIMEOUT_S and
        PDF_RENDER_MEMORY_MB: past them a 504 or a 413, a crash a 400, each naming the setting."""
        return await self._text_layer("pdf", data, [(int(n), text) for n, text in pages], password)

    async def searchable_image(self, data: bytes, text: str) -> bytes:
        """One uploaded image as a PDF page with its text laid over it, written in a worker like `searchable_pdf`."""
        return await self._text_layer("image", data, [(1, text)], None)

    async def _text_layer(self, kind: str, data: bytes, pages: list[tuple[int, str]], password: str | None) -> bytes:
        if not pages:
            raise ValueError("a searchable PDF needs at least one page")
        if self._closed:
            raise ServiceUnavailable("The PDF renderer is shutting down.")
        job_id = f"{os.getpid()}-{next(_ids)}"
        path = os.path.join(self.spill_dir, f"{job_id}.{kind}")
        try:
            await _finish_even_if_cancelled(asyncio.to_thread(self._spill, path, data))
            message = ("searchable", job_id, path, password, kind, pages)
            return (await self._run(job_id, message, self.searchable_timeout_s, job_id))[-1]
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def prestart(self) -> int:
        """Start every worker now, idle until work comes; returns how many are running.

        A worker is a fresh interpreter importing PyMuPDF: 0.5 s of CPU on the 2-core dev box, and by the fill
        timelines seconds on a GPU host whose cores the engines keep busy. Started on demand, the first long
        PDF rendered on the one or two warm workers while the rest started: on two H200s the engines filled
        at ~12 pages/s for the first 8 s, then at once. The service starts them while its engines load."""
        need = self.workers - len(self._all) - self._starting
        started = await asyncio.gather(*(self._start() for _ in range(max(0, need))), return_exceptions=True)
        for worker in started:
            if isinstance(worker, _Worker):
                self._release(worker)
            elif isinstance(worker, BaseException) and not isinstance(worker, ServiceUnavailable):
                raise worker
        return len(self._all)

    def close(self) -> None:
        """Kill every worker (busy ones included) and remove the spill directory."""
        self._closed = True
        for worker in list(self._all):
            self._discard(worker)
        self._queue.wake_all()  # each finds the pool closed
        self._readers.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------ internals

    @staticmethod
    def _spill(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    async def _acquire(self, doc_id: str, flow: object) -> _Worker:
        """A worker for `flow` once its turn comes (`service.fairness.FlowQueue`), preferring one that has
        `doc_id` open; starts one while under `workers`. It counts in `flow`'s share until released or discarded."""
        await self._queue.wait(flow)
        self._queue.taken()
        try:
            if self._closed:
                raise ServiceUnavailable("The PDF renderer is shutting down.")
            if self._idle:
                worker = next((w for w in self._idle if doc_id in w.docs), self._idle[-1])
                self._idle.remove(worker)
            else:
                worker = await self._start()
        except BaseException:
            self._queue.give(flow)
            raise
        worker.flow = flow
        return worker

    async def _start(self) -> _Worker:
        self._starting += 1
        try:
            parent_end, child_end = self._context.Pipe(duplex=True)
            # Started from the event loop's thread: PR_SET_PDEATHSIG fires when the creating *thread* exits.
            process = self._context.Process(
                target=worker_main,
                args=(child_end, os.getpid(), self.memory_limit_mb, self.limits),
                name="pdf-render",
                daemon=True,
            )
            process.start()
            child_end.close()
            worker = _Worker(process, parent_end)
            self._all.add(worker)
        finally:
            self._starting -= 1
        try:
            await self._read(worker, _START_TIMEOUT_S)  # ("ready", pid) once PyMuPDF is imported
        except (EOFError, OSError, TimeoutError) as exc:
            self._discard(worker)
            log.error("a PDF render worker did not start (exit code %s)", worker.process.exitcode)
            raise ServiceUnavailable("The PDF renderer could not start a worker process; try again later.") from exc
        except BaseException:
            self._discard(worker)
            raise
        return worker

    def _release(self, worker: _Worker) -> None:
        flow, worker.flow = worker.flow, None
        if not self._closed and worker in self._all:
            self._idle.append(worker)
        if flow is not None:
            self._queue.give(flow)
        else:
            self._queue.dispatch()

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker (it may be mid-render) and forget it; a later `_acquire` starts a replacement."""
        flow, worker.flow = worker.flow, None
        if worker in self._all:
            self._all.discard(worker)
            with contextlib.suppress(ValueError):
                self._idle.remove(worker)
        if flow is not None:
            self._queue.give(flow)
        elif not self._closed:
            self._queue.dispatch()  # room to start a replacement
        with contextlib.suppress(Exception):
            worker.process.kill()
        with contextlib.suppress(Exception):
            worker.process.join(1.0)  # SIGKILL: immediate; reaps the child so no zombie stays behind
        reading = worker.reading
        if reading is not None and not reading.done():
            reading.add_done_callback(lambda _: worker.conn.close())  # close only once the reader has let go
        else:
            worker.conn.close()

    async def _read(self, worker: _Worker, limit_s: float) -> tuple:
        worker.reading = self._readers.submit(_receive, worker.conn)
        return await asyncio.wait_for(asyncio.wrap_future(worker.reading), limit_s)

    async def _run(self, doc_id: str, message: tuple, limit_s: float, flow: object) -> tuple:
        """Send one message to a worker (preferring one that has `doc_id` open) and await its answer."""
        for _ in range(3):
            worker = await self._acquire(doc_id, flow)
            if doc_id not in worker.docs and message[0] == "render":
                # This worker must reopen the (already validated) file first: under PDF_OPEN_TIMEOUT_S, as its
                # own step, so that the page's deadline starts when its render starts (a reopen used to add
                # the open timeout to the page's: a 2 s page deadline let a page render for 15 s).
                reopen = ("open", doc_id, message[2], message[3], 10**9)
                if not self._send(worker, reopen):
                    continue
                await self._answer(worker, doc_id, reopen, self.open_timeout_s, keep=True)
            if not self._send(worker, message):
                continue
            return await self._answer(worker, doc_id, message, limit_s)
        raise ServiceUnavailable("The PDF renderer's worker processes keep dying; try again later.")

    def _send(self, worker: _Worker, message: tuple) -> bool:
        try:
            worker.conn.send(message)
        except OSError:  # it died while idle (the kernel's OOM killer, an operator): take another
            self._discard(worker)
            return False
        return True

    async def _answer(
        self, worker: _Worker, doc_id: str, message: tuple, limit_s: float, *, keep: bool = False
    ) -> tuple:
        """Await `worker`'s answer within `limit_s`. The worker goes back to the idle list only after a
        normal answer (or stays with the caller, `keep`, unless the answer is an error); on anything else
        (deadline, cancellation, a crash, a memory failure) it is killed, so it can never hold up or hand a
        stale answer to another page."""
        healthy = False
        try:
            if message[0] != "searchable":  # a searchable PDF's document is not kept open
                worker.docs.pop(doc_id, None)
                worker.docs[doc_id] = None
                while len(worker.docs) > KEEP_OPEN:
                    worker.docs.popitem(last=False)
            try:
                reply = await self._read(worker, limit_s)
            except TimeoutError:
                raise self._timeout_error(message) from None
            except (EOFError, OSError) as exc:
                if self._closed:
                    raise ServiceUnavailable("The PDF renderer is shutting down.") from exc
                worker.process.join(1.0)  # the pipe closed: it is exiting; learn how
                raise InvalidPdf(
                    f"{_what(message)} crashed the PDF render worker (exit code {worker.process.exitcode}; "
                    f"it may have run out of its {self.memory_limit_mb} MB, PDF_RENDER_MEMORY_MB).",
                    memory_limit_mb=self.memory_limit_mb,
                ) from exc
            if reply[0] == "memory":
                raise PayloadTooLarge(
                    f"{_what(message)} needs more memory than a render worker may use ({self.memory_limit_mb} MB, "
                    f"PDF_RENDER_MEMORY_MB): {reply[1]}",
                    memory_limit_mb=self.memory_limit_mb,
                )
            healthy = True
        finally:
            if not healthy:
                self._discard(worker)
            elif not keep or reply[0] == "error":
                self._release(worker)
        if reply[0] == "error":
            _, name, detail, extra = reply
            cls = getattr(errors, name, None)
            raise (cls if isinstance(cls, type) and issubclass(cls, OcrError) else InvalidPdf)(detail, **extra)
        return reply

    def _timeout_error(self, message: tuple) -> OcrError:
        if message[0] == "searchable":
            return DeadlineExceeded(
                f"The searchable PDF was not written within {self.searchable_timeout_s:g} s "
                "(PDF_SEARCHABLE_TIMEOUT_S); the document is too costly to rewrite. Ask without it (searchable_pdf) "
                "or raise the setting.",
            )
        if message[0] == "open":
            return PayloadTooLarge(
                f"The PDF could not be opened within {self.open_timeout_s:g} s (PDF_OPEN_TIMEOUT_S): its structure "
                "is too costly to parse.",
            )
        page = message[4]
        return PayloadTooLarge(
            f"Page {page} did not render within {self.page_timeout_s:g} s (PDF_RENDER_TIMEOUT_S); its content "
            "is too complex. Try a lower dpi or leave the page out with `pages`.",
            page=page,
        )

    def _forget(self, doc_id: str) -> None:
        """Tell every worker holding `doc_id` to close it (no answer: it is read after any current work)."""
        for worker in list(self._all):
            if worker.docs.pop(doc_id, False) is None:
                try:
                    worker.conn.send(("forget", doc_id))
                except OSError:
                    self._discard(worker)


async def _finish_even_if_cancelled(work: Awaitable[None]) -> None:
    """Await `work`; when cancelled, let it finish before re-raising (a spill file must be complete
    on disk before the caller's cleanup unlinks it, or the write would recreate it afterwards)."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def _receive(conn: Connection) -> tuple:
    """One answer from a worker; a rendered page's pixels follow its tuple as a raw message."""
    reply = conn.recv()
    return (*reply, conn.recv_bytes()) if reply[0] in ("page", "searchable") else reply


def _what(message: tuple) -> str:
    return {"open": "Opening the PDF", "searchable": "Writing the searchable PDF"}.get(message[0], f"Page {message[4]}")


def mupdf_missing() -> str | None:
    """Why a render process cannot import PyMuPDF, or None when it can. The server never imports it (a hostile
    PDF must not run in its process, nor MuPDF's 100 MB sit in it), so a child interpreter with the server's
    `sys.path`, as a render process gets it, tries. The PDF router leaves the app when this says why."""
    try:
        if importlib.util.find_spec("pymupdf") is None:
            return "PyMuPDF (pymupdf) is not installed; the PDF routes and searchable PDFs need it (requirements.txt)"
    except (ImportError, ValueError) as exc:
        return f"PyMuPDF (pymupdf) cannot be found ({exc})"
    return _child_import_failure()


@functools.cache
def _child_import_failure() -> str | None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run([sys.executable, "-c", "import pymupdf"], env=env, capture_output=True, text=True,
                              timeout=_START_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"PyMuPDF (pymupdf) could not be checked in a child process ({exc})"
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return f"PyMuPDF (pymupdf) cannot be imported ({last}); the PDF routes and searchable PDFs need it"


@dataclass(eq=False)
class PdfDocument:
    """A PDF opened and validated in a worker; valid inside its `RenderPool.document` block."""

    _pool: RenderPool = field(repr=False)
    _id: str
    _path: str = field(repr=False)
    _password: str | None = field(repr=False)
    page_count: int
    metadata: dict[str, str]
    warnings: tuple[str, ...]  # MuPDF warnings while opening
    repaired: bool  # MuPDF rebuilt the cross-reference table (damaged but complete file)
    page_sizes: tuple[tuple[float, float], ...] = ()  # crop boxes in points; empty when unknown
    _flow: object = field(default=None, repr=False)  # whose work its renders are (`RenderPool.document`)

    @property
    def title(self) -> str | None:
        return self.metadata.get("title")

    def expected_pixels(self, page: int, dpi: int, max_pixels: int) -> int:
        """The most pixels rendering `page` at `dpi` can give (a render never exceeds `max_pixels`); without
        the page's size, `max_pixels`."""
        if not 1 <= page <= len(self.page_sizes):
            return max_pixels
        width, height = self.page_sizes[page - 1]
        zoom = dpi / 72
        return min(max_pixels, (math.ceil(width * zoom) + 2) * (math.ceil(height * zoom) + 2))

    async def render(self, page: int, *, dpi: int, max_pixels: int, preview: bool = False) -> RenderedPage:
        """Render one 1-based page in a worker (see `pdf.render_process.render_page` for dpi reduction and refusals);
        with `preview`, the worker also makes the page's small JPEG (`render_process.preview_jpeg`)."""
        check_render_args(page, self.page_count, dpi=dpi, max_pixels=max_pixels)
        message = ("render", self._id, self._path, self._password, page, dpi, max_pixels, preview)
        reply = await self._pool._run(self._id, message, self._pool.page_timeout_s, self._flow or self._id)
        _, size, number, used_dpi, requested, reduced, note, warnings, digest, small, pixels = reply
        return RenderedPage(Image.frombytes("RGB", size, pixels), number, used_dpi, requested, reduced, note, warnings,
                            digest, small)


def _fresh_spill_dir(base: str) -> str:
    """A private directory for this pool's spill files, after removing those of servers that are gone
    (a `kill -9` leaves them behind). Names carry the owner's pid: ocr-render-<pid>-<random>."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            if name.startswith(_SPILL_PREFIX):
                owner = name[len(_SPILL_PREFIX) :].split("-", 1)[0]
                if owner.isdigit() and not _alive(int(owner)):
                    shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_SPILL_PREFIX}{os.getpid()}-", dir=base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
