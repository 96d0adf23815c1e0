"""The service: the one path from an item (an image, a PDF page, a batch file) to its result.

Routers parse their forms and call `OcrService`; nothing else talks to engines. A request is validated
once into an `OcrRequest` (prompt and `<image>` rules, mode, sampling, limits). Each item then goes
decode or render (worker pool / render processes, no engine slot) -> engine (one admission slot) ->
post-processing (worker pool), and ends as an `ItemResult` with one status policy for every route:
`ok`, `truncated` (stopped at max_tokens, kept), `aborted` (the engine aborted it), `failed` (with the
reason). An engine that is not ready is a 503 for the whole request, never N failed items.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

import images
from config import Settings
from engines.base import EngineChunk, EngineResult, Usage
from engines.supervisor import EngineSupervisor
from errors import Aborted, OcrError, Overloaded, ServiceUnavailable
from images import content_hash
from process.modes import ModeSpec
from service import retry_ladder
from service import timing as request_timing
from service.admission import Admission
from service.pixel_budget import PixelBudget, release_soon
from service.postprocess import PostOptions, postprocess
from service.request import OcrRequest, check_ngram, fill_ngram
from service.results import ABORTED, DocumentRun, ItemResult, bug, item_status
from service.run import Deadline, Handoff, Leftover, hand_off, run_items
from service.timing import Timing, measure

if TYPE_CHECKING:  # PyMuPDF is optional to this module: the PDF routes degrade without it
    from pdf.render_pool import PdfDocument

log = logging.getLogger("deepseek_ocr.service")
T = TypeVar("T")


def document_notes(doc: Any) -> list[str]:
    """The PDF's warnings as `/pdf/ocr` reports them (kept with a job for its result)."""
    notes = list(doc.warnings[:20])
    if doc.repaired:
        notes.insert(0, "The PDF was damaged: MuPDF repaired its cross-reference table; check the pages")
    return notes


class OcrService:
    """Turns items into results through admission and the engines; shared by every router."""

    def __init__(
        self,
        settings: Settings,
        admission: Admission,
        executor: Executor,
        render_pool: Any,
        supervisor: EngineSupervisor | None = None,
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.supervisor = supervisor or EngineSupervisor(admission.engines, enabled=False)
        self.executor = executor
        self.render_pool = render_pool
        self.observers: list[Callable[[str, ItemResult, ModeSpec], None]] = []
        # A job ended: (kind, status, seconds from its submission); /metrics' job durations.
        self.job_observers: list[Callable[[str, str, float], None]] = []
        # Takes a sync request over at its deadline: the lifespan sets it when the job runner started.
        self.handoff: Handoff | None = None
        self.pixels = PixelBudget(settings.max_decoded_pixels(admission.capacity))  # held at once (MAX_DECODED_MPIX)
        # An image sent to an engine worker process exists twice while the engine has it (here and there).
        self.copies = 2 if any(e.copies_images for e in admission.engines) else 1

    def admit(self, request: OcrRequest | None = None) -> OcrRequest | None:
        """Bind a request to its model and refuse it up front: unknown model (400), mode the model does not
        serve (400), no engine ready or too much waiting (503). Returns the bound request."""
        if request is None:
            self.admission.check()
            return None
        spec = self.admission.model(request.model)
        if spec is not None:
            served = self.admission.modes_of(spec.name)
            mode = request.mode
            if mode.name not in spec.modes and not request.mode_given and served:
                mode = spec.modes[served[0]]  # the server's default mode is not this model's: its own default
            sampling = request.sampling
            if not request.ngram_given:
                size, window = fill_ngram(request.ngram_sent, spec.ngram(request.kind))
                check_ngram(size, window)
                sampling = dataclasses.replace(sampling, ngram_size=size, ngram_window=window if size else 0)
            request = dataclasses.replace(request, model=spec.name, mode=spec.modes.get(mode.name, mode),
                                          sampling=sampling)
        self.admission.check(request.mode, request.model)
        return request

    @property
    def window(self) -> int:
        """Items of one request in flight at once: enough to keep every engine slot busy, no more."""
        return self.admission.capacity + self.settings.render_processes

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """CPU work (PIL, drawing, encoding) in the worker pool, off the event loop. `images.decode_image`
        called through here goes through `decode`: routes that decode uploads themselves are budgeted too."""
        if fn is images.decode_image:
            return await self.decode(*args, wait_s=self.settings.generate_timeout_s, **kwargs)  # type: ignore
        loop = asyncio.get_running_loop()
        # The worker thread runs in a copy of this context: its log lines carry the request id.
        call = functools.partial(contextvars.copy_context().run, functools.partial(fn, *args, **kwargs))
        return await loop.run_in_executor(self.executor, call)

    async def decode(self, data: bytes, *, max_pixels: int | None = None, wait_s: float | None = None,
                     flow: object = None, timing: Timing | None = None) -> Image.Image:
        """Decode an upload in the worker pool with its pixels (read from the header) reserved first; held until
        `image` post-processed it or the image is freed; a cancelled decode holds them until its thread ends.
        `wait_s` bounds the wait for budget where no request deadline does (503 with Retry-After past it).
        `flow`: the request it belongs to, for the budget's turn (None: a request of its own). `timing`: the
        item's stages (None: the request's)."""
        limits = {"max_pixels": max_pixels or self.settings.max_image_pixels,
                  "max_photo_pixels": int(self.settings.max_photo_mpix * 1_000_000),
                  "max_aspect": self.settings.max_image_aspect}
        with measure("decode", timing):
            info = await self.blocking(images.image_info, data, **limits)
        # What the decoder holds on the way (a HEIF photo whole), or the image handed on with its copies, shrunk
        # to the latter once decoded.
        held = info.pixels * self.copies
        try:
            with measure("wait", timing):
                async with asyncio.timeout(wait_s):
                    reservation = await self.pixels.reserve(max(info.decoded_pixels, held), flow=flow)
        except TimeoutError:
            raise Overloaded(f"no decoded-pixel budget came free in {wait_s:g} s (MAX_DECODED_MPIX); retry later",
                             retry_after=5) from None
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, images.decode_image, data, **limits)
        work = self.executor.submit(call)
        try:
            with measure("decode", timing):
                image = await asyncio.wrap_future(work)
        except BaseException:
            if work.done():
                reservation.release()
            else:  # cancelled while the thread decodes: free the budget when the pixels are gone
                work.add_done_callback(lambda _: release_soon(loop, reservation))
            raise
        reservation.resize(held)
        self.pixels.hold_for(image, reservation)
        return image

    async def generate(
        self, request: OcrRequest, image: Image.Image | None, *, stream: bool = False, input_hash: str | None = None,
        timing: Timing | None = None,
    ) -> EngineResult:
        """One engine call on one admission slot; a quarantined input is refused before it can crash anything.
        `timing`: the item's stages, which get the slot wait and the engine's figures."""
        if input_hash is None and image is not None:
            with measure("decode", timing):  # hashing the pixels readies the input, as decoding does
                input_hash = await self.blocking(content_hash, image)
        self.supervisor.check(input_hash)
        asked = time.perf_counter()
        async with self.admission.slot(request.mode, request.model, request.flow) as slot:
            waited = time.perf_counter() - asked
            out = await slot.engine.generate(request.engine_request(image, stream=stream, input_hash=input_hash))
            out.worker = slot.engine.result_worker  # engines that name their results (Ray)
        if timing is not None:
            timing.engine(waited, out.transfer_s, out.ttft_s, out.gen_s)
        return out

    @property
    def models(self) -> list[Any]:
        """The models served (`config.ModelSpec`), the default first: `/v1/models` lists them."""
        return self.admission.models

    async def stream(
        self, request: OcrRequest, image: Image.Image | list[Image.Image] | None, *, deltas: bool = True,
        input_hash: str | None = None, kind: str = "generate",
    ) -> AsyncGenerator[EngineChunk, None]:
        """One generation piece by piece, for the faces that answer a prompt and an image (`/v1`, `/generate`).
        Awaiting it refuses a quarantined input (422) before any answer starts; iterating it takes one admission
        slot, keeps the input in flight on the engine (a crash strikes it) and counts the item with the
        observers at its end. An abort by the engine is `Aborted` (503, Retry-After) after the pieces so far.
        A consumer that stops early calls `aclose()` (the engine's generation is aborted).
        `deltas=False`: the engine sends only the final piece (vLLM's FINAL_ONLY). `image`: a list for a prompt of
        several images (in tag order); their hashes together are the input's identity for quarantine."""
        if input_hash is None and image is not None:
            with measure("decode"):
                if isinstance(image, list):
                    hashes = [await self.blocking(content_hash, i) for i in image]
                    joined = "+".join(hashes).encode()
                    input_hash = hashes[0] if len(hashes) == 1 else hashlib.sha256(joined).hexdigest()
                else:
                    input_hash = await self.blocking(content_hash, image)
        self.supervisor.check(input_hash)
        return self._pieces(request, image, deltas, input_hash, kind)

    async def _pieces(
        self, request: OcrRequest, image: Image.Image | list[Image.Image] | None, deltas: bool,
        input_hash: str | None, kind: str,
    ) -> AsyncGenerator[EngineChunk, None]:
        started = time.perf_counter()
        pictures = image if isinstance(image, list) else [] if image is None else [image]
        first_image = pictures[0] if pictures else None
        result = ItemResult(None, width=first_image.width if first_image else None,
                            height=first_image.height if first_image else None, mode=request.mode.name)
        finish, usage = "length", Usage()
        first: float | None = None
        try:
            async with self.admission.slot(request.mode, request.model, request.flow) as slot:
                slotted = time.perf_counter()
                engine_request = request.engine_request(image, stream=deltas, input_hash=input_hash)
                pieces = slot.engine.stream(engine_request)
                try:
                    async for piece in pieces:
                        if first is None:
                            first = time.perf_counter()
                        if piece.finish_reason is not None:
                            finish, usage = piece.finish_reason, piece.usage or usage
                            result.confidence = piece.confidence
                        yield piece
                finally:
                    await pieces.aclose()
                result.worker = slot.engine.result_worker
                end = time.perf_counter()
                first = end if first is None else first
                transfer = engine_request.transfer_s
                result.timing.engine(slotted - started, transfer, max(0.0, first - slotted - transfer), end - first)
        finally:
            for picture in pictures:
                self.pixels.release_for(picture)  # the engine is done with it: its pixels leave the budget
        result.finish_reason, result.usage, result.status = finish, usage, item_status(finish)
        result.elapsed_s = round(time.perf_counter() - started, 4)
        self._observe(kind, result, request.mode)
        if result.status == "aborted":
            raise Aborted(ABORTED)

    async def complete(
        self, request: OcrRequest, image: Image.Image | list[Image.Image] | None, *, kind: str = "generate"
    ) -> EngineResult:
        """`stream` gathered into one answer (`/generate`, `/v1` without `stream`)."""
        started = time.perf_counter()
        parts: list[str] = []
        finish, usage, confidence = "length", Usage(), None
        pieces = await self.stream(request, image, deltas=False, kind=kind)
        try:
            async for piece in pieces:
                parts.append(piece.text)
                if piece.finish_reason is not None:
                    finish, usage, confidence = piece.finish_reason, piece.usage or usage, piece.confidence
        finally:
            await pieces.aclose()
        return EngineResult("".join(parts), finish, usage, round(time.perf_counter() - started, 4),
                            confidence=confidence)

    async def image(
        self, request: OcrRequest, image: Image.Image, options: PostOptions, *, label: int | str | None = None,
        kind: str = "image", dpi: int | None = None, input_hash: str | None = None, timing: Timing | None = None,
    ) -> ItemResult:
        """Engine (with the retry ladder) + post-processing of one decoded image; errors propagate.
        `input_hash`: the image's `content_hash` where its producer computed it (a PDF render process).
        `timing`: the item's stages so far (its read, decode or render), which its result carries on."""
        try:
            return await self._image(request, image, options, label=label, kind=kind, dpi=dpi, input_hash=input_hash,
                                     timing=timing or Timing())
        finally:
            self.pixels.release_for(image)  # post-processed (or failed): its pixels leave the budget

    async def _image(
        self, request: OcrRequest, image: Image.Image, options: PostOptions, *, label: int | str | None,
        kind: str, dpi: int | None, input_hash: str | None, timing: Timing,
    ) -> ItemResult:
        started = time.perf_counter()
        result = ItemResult(label, width=image.width, height=image.height, dpi=dpi, timing=timing,
                            note=image.info.get("note"))  # a photo read reduced says so (images.decode_image)
        if input_hash is None:
            with measure("decode", result.timing):  # readying the input, as decoding does
                input_hash = await self.blocking(content_hash, image)
        out = await self.generate(request, image, input_hash=input_hash, timing=result.timing)
        result.text, result.finish_reason, result.usage = out.text, out.finish_reason, out.usage
        result.worker = out.worker
        result.status = item_status(out.finish_reason)
        if result.status == "aborted":  # kept as an item of its request; a request of one item is a 503 (`only`)
            result.problem = Aborted(ABORTED).to_problem()
            result.error = ABORTED
        result.mode = request.mode.name
        result.confidence = out.confidence
        if self.settings.retry_ladder and retry_ladder.needs_retry(out, self.settings.confidence_retry_below):
            await self._climb(request, image, input_hash, result)
        with measure("post", result.timing):
            result.post = await self.blocking(postprocess, result.text, image, label=label, options=options, dpi=dpi)
        result.elapsed_s = round(time.perf_counter() - started, 4)
        self._observe(kind, result, request.mode)
        return result

    async def _climb(self, request: OcrRequest, image: Image.Image, input_hash: str, result: ItemResult) -> None:
        """A runaway (or unsure) result: the ladder's attempts in turn; the first that is neither is kept."""
        below = self.settings.confidence_retry_below
        for step in retry_ladder.steps(request, self.admission.served_modes):
            out = await self.generate(step.request, image, input_hash=input_hash, timing=result.timing)
            result.attempts += 1
            result.retries.append(
                {"attempt": result.attempts, "change": step.change, "finish_reason": out.finish_reason,
                 "completion_tokens": out.usage.completion_tokens,
                 "mean_logprob": round(out.confidence.mean_logprob, 4) if out.confidence else None}
            )
            if not retry_ladder.needs_retry(out, below):
                result.text, result.finish_reason, result.usage = out.text, out.finish_reason, out.usage
                result.confidence = out.confidence
                result.worker = out.worker
                result.mode = step.request.mode.name
                result.status = "degraded" if step.degraded else "retried"
                return
        log.info("item %s ran away (or stayed unsure) on all %d attempts; the first is kept", result.label,
                 result.attempts)

    async def page(self, request: OcrRequest, doc: Any, page: int, *, dpi: int, options: PostOptions,
                   preview: bool = False) -> ItemResult:
        """Render (no engine slot), then OCR one PDF page; its failure is a `failed` result. With `preview` the
        result carries the page's small JPEG (a job keeps it for /ui; a sync answer holding one per page would not
        be small)."""
        result = ItemResult(page, dpi=dpi)
        try:
            rendered = await self._render(doc, page, dpi, request.flow, result.timing, preview)
            result = await self.image(request, rendered.image, options, label=page, kind="page", dpi=rendered.dpi,
                                      input_hash=rendered.content_hash, timing=result.timing)
            result.note, result.render_warnings, result.preview = rendered.note, rendered.warnings, rendered.preview
        except ServiceUnavailable:
            raise  # the engine went away: the request is a 503, not N failed pages
        except OcrError as exc:
            self._observe("page", result.fail(exc), request.mode)
        except Exception as exc:  # a bug on one page must not lose the other pages; it is logged as one
            log.exception("PDF page %d hit a bug", page)
            self._observe("page", result.fail(bug(exc)), request.mode)
        return result

    async def _render(self, doc: PdfDocument, page: int, dpi: int, flow: object, timing: Timing,
                      preview: bool = False) -> Any:
        """Render a page with its pixels reserved first (from the page's size when the PDF gives it, else
        the most a render returns), then held at the real size until post-processed. A page that would not
        fit in the whole budget (MAX_DECODED_MPIX under MAX_IMAGE_PIXELS) is rendered at the dpi that fits,
        as for MAX_IMAGE_PIXELS: growing past the budget after the render can never be granted."""
        copies = self.copies
        limit = max(1, min(self.settings.max_image_pixels, self.pixels.max_pixels // copies))
        expected = doc.expected_pixels(page, dpi, limit)
        asked = time.perf_counter()
        async with self.pixels.hold(expected, copies, flow) as reservation:
            timing.wait += time.perf_counter() - asked
            with measure("decode", timing):  # a page's render is its decode
                rendered = await doc.render(page, dpi=dpi, max_pixels=limit, preview=preview)
            actual = rendered.image.width * rendered.image.height
            with measure("wait", timing):
                reservation = await self.pixels.settle(reservation, actual, copies)
        self.pixels.hold_for(rendered.image, reservation)
        return rendered

    async def file(
        self, request: OcrRequest, read: Callable[[], Awaitable[bytes]], options: PostOptions, *, label: str
    ) -> ItemResult:
        """Read, decode (worker pool, no engine slot) and OCR one uploaded image; its failure is `failed`."""
        result = ItemResult(label)
        try:
            with measure("read", result.timing):
                data = await read()
            image = await self.decode(data, flow=request.flow, timing=result.timing)
            result = await self.image(request, image, options, label=label, kind="file", timing=result.timing)
            del image  # out of the budget since `image` returned: free the pixels too
            if options.searchable and result.post is not None and self.render_pool.unavailable is None:
                # Written by a render process (MuPDF never runs here), which decodes the upload again where PDF
                # cannot embed it as it is, under that process's memory limit. Without PyMuPDF: no searchable PDF.
                # The item was counted already: the request's stages get this time too.
                with measure("post", result.timing), measure("post"):
                    result.post.searchable_pdf = await self.render_pool.searchable_image(data, result.text)
            del data
        except ServiceUnavailable:
            raise
        except OcrError as exc:
            log.info("file %s failed: %s", label, exc.detail)
            self._observe("file", result.fail(exc), request.mode)
        except Exception as exc:  # a bug on one file's data must not sink the other files
            log.exception("file %s hit a bug", label)
            self._observe("file", result.fail(bug(exc)), request.mode)
        return result

    async def document(
        self, request: OcrRequest, data: bytes, *, password: str | None, pages: str | None, dpi: int,
        options: PostOptions, deadline: Deadline | None = None, owner: str = "", filename: str | None = None,
        form: Any = None,
    ) -> DocumentRun:
        """Open the PDF (in a render process), check the selection, OCR the pages in order. At `deadline` the
        finished pages go to the job handoff (`owner`'s job), when the app has one."""
        started = time.perf_counter()
        async with self.render_pool.document(data, password=password, max_pages=self.settings.max_pdf_pages) as doc:
            request_timing.add("decode", time.perf_counter() - started)  # opening the PDF readies its pages
            selected = images.parse_page_ranges(pages, doc.page_count)
            notes = document_notes(doc)

            async def page(number: int) -> ItemResult:
                return await self.page(request, doc, number, dpi=dpi, options=options)

            async def leftover(done: dict[int, ItemResult]) -> None:
                await hand_off(self.handoff, Leftover(
                    kind="pdf", request=request, post=options, owner=owner, filenames=[filename or "document.pdf"],
                    inputs=[data], done=done, deadline=deadline, pages=selected, dpi=dpi, selection=pages,
                    password=password, page_count=doc.page_count, warnings=notes, form=form))

            results = await run_items(selected, page, window=self.window, deadline=deadline,
                                      on_deadline=leftover)
        run = DocumentRun(request.mode.name, doc.page_count, dpi, results, notes, started,
                          max_answer_bytes=self.settings.max_answer_bytes)
        log.info("PDF: %d of %d pages, %s, %.1f s", len(results), run.page_count, run.counts(), run.elapsed_s)
        return run

    async def batch(
        self, request: OcrRequest, reads: Sequence[Callable[[], Awaitable[bytes]]], options: PostOptions, *,
        labels: list[str], filenames: list[str], deadline: Deadline | None = None, owner: str = "", form: Any = None,
    ) -> list[ItemResult]:
        """Every file through `file` (labelled with its ZIP stem); results in input order. At `deadline` the
        finished files go to the job handoff, with the others read again (`reads` re-read from the start)."""

        async def one(index: int) -> ItemResult:
            return await self.file(request, reads[index], options, label=labels[index])

        async def leftover(done: dict[int, ItemResult]) -> None:
            if self.handoff is None:  # no job runner (or it stopped meanwhile): the plain 504
                return
            inputs = [b"" if index in done else await read() for index, read in enumerate(reads)]
            await hand_off(self.handoff, Leftover(kind="batch", request=request, post=options, owner=owner,
                                                  filenames=filenames, inputs=inputs, done=done, deadline=deadline,
                                                  form=form))

        return await run_items(range(len(reads)), one, window=self.window, deadline=deadline,
                               on_deadline=leftover)

    def _observe(self, kind: str, result: ItemResult, mode: ModeSpec) -> None:
        """An item is done (once per item): counted by the observers, its stages added to its request's."""
        if (clock := request_timing.current()) is not None:
            clock.absorb(result.timing)
        for observer in self.observers:
            observer(kind, result, mode)
