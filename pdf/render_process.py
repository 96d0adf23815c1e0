"""What runs inside a PDF render worker process: open, validate and render PDFs, and write searchable PDFs (the
text layer, `outputs.searchable`), under caps.

The server process never runs MuPDF on an upload: `pdf.render_pool.RenderPool` sends work here, to
killable child processes under RLIMIT_AS (opening a hostile PDF can hold the GIL for tens of seconds
and allocate gigabytes). `worker_main` is the child's loop; `open_pdf`/`render_page`/`text_layer` are plain
functions that tests also call directly. PyMuPDF is imported here (and by `outputs.searchable`) only.
Caps checked before MuPDF works are in `pdf.limits`.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import mmap
import os
import re
import resource
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from errors import InvalidImage, InvalidPageRange, InvalidPdf, OcrError, PayloadTooLarge, PdfPasswordRequired
from images import not_a_pdf, pixels_hash
from pdf.limits import MemoryLimitHit, PdfLimits, check_page_images, memory_or, prescan

if TYPE_CHECKING:
    import pymupdf

# MuPDF's context is global to a process. A worker is single-threaded, but tests call these functions
# from threads, so every MuPDF call goes through one lock; it also makes the global warning store
# attributable to one call.
MUPDF_LOCK = threading.RLock()

PDF_EOF_WINDOW = 1024  # the PDF spec lets readers find %%EOF within the last 1024 bytes
_MAX_WARNINGS = 20  # a damaged content stream can emit hundreds of identical lines
KEEP_OPEN = 8  # documents one worker keeps open (least recently used closed first); the parent mirrors it
PREVIEW_SIDE = 1024  # the long side of a page preview (jobs keep one per page for /ui), in pixels
PREVIEW_QUALITY = 80


@dataclass(eq=False)
class PdfSource:
    """An opened, unlocked and validated PDF inside one process. Close it when done."""

    password: str | None = field(repr=False)
    page_count: int
    metadata: dict[str, str]
    repaired: bool  # MuPDF rebuilt the cross-reference table (damaged but complete file)
    warnings: tuple[str, ...]  # MuPDF warnings while opening
    _doc: pymupdf.Document | None = field(repr=False)

    @property
    def title(self) -> str | None:
        return self.metadata.get("title")

    @property
    def closed(self) -> bool:
        return self._doc is None

    def page_sizes(self) -> tuple[tuple[float, float], ...]:
        """Each page's crop box (points), read without loading the pages: what the server reserves pixel
        budget by before a render. Empty when the document cannot say (the server then reserves the most)."""
        try:
            with MUPDF_LOCK:
                doc = self._doc
                return tuple((r.width, r.height) for r in (doc.page_cropbox(i) for i in range(self.page_count)))
        except Exception:  # a damaged page tree: render-time checks report it per page
            return ()

    def close(self) -> None:
        with MUPDF_LOCK:
            if self._doc is not None:
                self._doc.close()
                self._doc = None

    def __enter__(self) -> PdfSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RenderedPage:
    """One rendered PDF page: an RGB image without alpha and how it was rendered."""

    image: Image.Image
    page: int  # 1-based
    dpi: int  # dpi actually used
    requested_dpi: int
    reduced: bool  # True when dpi < requested_dpi to stay within max_pixels
    note: str | None = None  # why the dpi was reduced, for the response
    warnings: tuple[str, ...] = ()  # MuPDF warnings while rendering (damaged content streams...)
    content_hash: str | None = None  # `images.content_hash` of `image`, where the renderer computed it
    preview: bytes | None = None  # a small JPEG of the page (`preview_jpeg`), where the caller asked for one


# ------------------------------------------------------------------------------------ open


def open_pdf(data: bytes, *, password: str | None = None, max_pages: int, limits: PdfLimits | None = None) -> PdfSource:
    """Open and validate a PDF from its bytes without rendering anything."""
    return _open(data, data, password, max_pages, limits or PdfLimits())


def open_pdf_file(path: str, *, password: str | None, max_pages: int, limits: PdfLimits) -> PdfSource:
    """`open_pdf` for a spill file: the caps read it through mmap and MuPDF reads it from disk on demand."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return _open(view, path, password, max_pages, limits)


def _open(view: bytes | mmap.mmap, source: bytes | str, password: str | None, max_pages: int, limits: PdfLimits):
    if max_pages <= 0:
        raise ValueError(f"max_pages must be positive, got {max_pages}")
    check_pdf_header(view[:PDF_EOF_WINDOW])
    prescan(view, limits)
    import pymupdf

    with MUPDF_LOCK:
        drain_mupdf_warnings()  # drop what earlier calls left in the global store
        try:
            doc = (
                pymupdf.open(source, filetype="pdf")
                if isinstance(source, str)
                else pymupdf.open(stream=source, filetype="pdf")
            )
        except Exception as exc:
            damaged = InvalidPdf(
                f"The PDF is damaged or truncated and could not be opened ({exc}). Send the complete file."
            )
            raise memory_or(exc, damaged) from exc
        try:
            return _validated(doc, view[-PDF_EOF_WINDOW:], len(view), password, max_pages)
        except BaseException:
            doc.close()
            raise


def check_pdf_header(head: bytes) -> None:
    """The cheap checks the server may do itself (no parsing): empty file, no %PDF- header."""
    if not head:
        raise InvalidPdf("The file is empty (0 bytes). Send a PDF.")
    if b"%PDF-" not in head[:1024]:
        raise not_a_pdf(head)


def _validated(doc: pymupdf.Document, tail: bytes, size: int, password: str | None, max_pages: int) -> PdfSource:
    """Unlock and check an open document; caller holds MUPDF_LOCK and closes `doc` on error."""
    if doc.needs_pass:
        if not password:
            raise PdfPasswordRequired(
                "The PDF is encrypted. Send its password in the `password` field.", password_required=True
            )
        if not doc.authenticate(password):
            raise PdfPasswordRequired(
                "The password for this encrypted PDF is wrong. Send the correct one in the `password` field.",
                password_required=True,
            )
    try:
        page_count = doc.page_count  # loads the page tree, which may trigger a repair
    except Exception as exc:
        raise memory_or(
            exc, InvalidPdf(f"The PDF's page tree could not be read ({exc}). The file is damaged.")
        ) from exc
    warnings = drain_mupdf_warnings()
    if doc.is_repaired and b"%%EOF" not in tail:
        # Cut-off uploads still "open" after MuPDF's repair, but with pages missing, blank or given
        # default sizes. Rendering those silently would drop content, so refuse the file.
        raise InvalidPdf(
            "The PDF is truncated (it has no %%EOF end marker and its cross-reference table is "
            "broken), so pages would be missing or blank. "
            f"Send the complete file ({size} bytes received)."
        )
    if page_count < 1:
        raise InvalidPdf("The PDF has no pages.")
    if page_count > max_pages:
        raise PayloadTooLarge(
            f"The PDF has {page_count} pages, over the limit of {max_pages} pages per request. "
            "Split it into smaller files.",
            page_count=page_count,
            max_pages=max_pages,
        )
    metadata = {k: v.strip() for k, v in (doc.metadata or {}).items() if isinstance(v, str) and v.strip()}
    return PdfSource(password, page_count, metadata, bool(doc.is_repaired), warnings, doc)


# ------------------------------------------------------------------------------------ render


def render_page(
    source: PdfSource, page: int, *, dpi: int, max_pixels: int, limits: PdfLimits | None = None
) -> RenderedPage:
    """Render one 1-based page to RGB at `dpi` (zoom dpi/72, no alpha, rotation as displayed).

    When the page at `dpi` would exceed `max_pixels`, it is rendered at the largest integer dpi that
    fits and `reduced`/`note` say so; if even 1 dpi does not fit the page is refused (413). A page
    using an image over the caps is refused before it is decoded. A page that renders blank while
    MuPDF reports errors (its objects could not be loaded) is refused with those errors: a blank
    image marked ok would hide the content.
    """
    size, samples, used_dpi, note, warnings = render_samples(
        source, page, dpi=dpi, max_pixels=max_pixels, limits=limits
    )
    return RenderedPage(Image.frombytes("RGB", size, samples), page, used_dpi, dpi, used_dpi < dpi, note, warnings)


def render_samples(
    source: PdfSource, page: int, *, dpi: int, max_pixels: int, limits: PdfLimits | None = None
) -> tuple[tuple[int, int], bytes, int, str | None, tuple[str, ...]]:
    """`render_page` as packed RGB bytes: (size, samples, dpi used, note, warnings). The worker sends
    these bytes as they are, so a page exists once in its memory, not as pixmap + image + pickle."""
    check_render_args(page, source.page_count, dpi=dpi, max_pixels=max_pixels)
    with MUPDF_LOCK:
        if source._doc is None:
            raise ValueError("render_page called on a closed PdfSource")
        drain_mupdf_warnings()
        size, samples, used_dpi, full_size = _render_locked(source._doc, page, dpi, max_pixels, limits or PdfLimits())
        warnings = drain_mupdf_warnings()
    failures = [line for line in warnings if _LOAD_FAILURE.search(line)]
    if failures and _blank(samples):
        raise InvalidPdf(
            f"Page {page} rendered blank because MuPDF could not read its content ({'; '.join(failures[:4])}). "
            "The file is damaged.",
            page=page,
        )
    note = None
    if used_dpi < dpi:
        note = (
            f"Page {page} was rendered at {used_dpi} dpi instead of {dpi} dpi: at {dpi} dpi it would be "
            f"{full_size[0]}x{full_size[1]} = {full_size[0] * full_size[1]} pixels, over the limit of "
            f"{max_pixels} pixels."
        )
    return size, samples, used_dpi, note, warnings


# MuPDF lines that mean content was dropped (an object or stream could not be loaded), not a cosmetic fix-up.
_LOAD_FAILURE = re.compile(r"error|cannot|failed|overflow|too deep|too many", re.IGNORECASE)


def _blank(samples: bytes) -> bool:
    """Every pixel the same colour (RGB, no alpha)."""
    pixels = np.frombuffer(samples, np.uint8)
    return pixels.size == 0 or bool((pixels.reshape(-1, 3) == pixels[:3]).all())


def _render_locked(
    doc: pymupdf.Document, page: int, dpi: int, max_pixels: int, limits: PdfLimits
) -> tuple[tuple[int, int], bytes, int, tuple[int, int]]:
    """Render under MUPDF_LOCK and return plain bytes, so no MuPDF object outlives the lock
    (their destructors call into MuPDF too)."""
    import pymupdf

    pg = pix = None
    try:
        pg = doc.load_page(page - 1)
        rect = pg.rect  # the displayed box: CropBox with /Rotate applied
        if rect.is_empty or rect.is_infinite:
            raise InvalidPdf(f"Page {page} has an empty or invalid page size ({rect}); it cannot be rendered.")
        check_page_images(doc, pg, page, limits)
        full_size = _pixel_size(rect, dpi)
        used_dpi = (
            dpi if full_size[0] * full_size[1] <= max_pixels else _largest_fitting_dpi(rect, dpi, max_pixels, page)
        )
        zoom = used_dpi / 72
        pix = pg.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
        samples = pix.samples
        if pix.stride != pix.width * 3:  # MuPDF pads no RGB rows today; repack if it ever does
            samples = b"".join(samples[y * pix.stride : y * pix.stride + pix.width * 3] for y in range(pix.height))
        return (pix.width, pix.height), samples, used_dpi, full_size
    except OcrError:
        raise
    except Exception as exc:
        damaged = InvalidPdf(f"Page {page} of the PDF could not be rendered ({exc}). The file is damaged.", page=page)
        raise memory_or(exc, damaged) from exc
    finally:
        pix = pg = None  # drop MuPDF objects here, inside the lock, not when a traceback is freed


def drain_mupdf_warnings() -> tuple[str, ...]:
    """MuPDF's warnings and errors since the last drain, de-duplicated. The store is process-global,
    so the lines belong to the current call only because callers hold MUPDF_LOCK."""
    import pymupdf

    lines = (line.strip() for line in pymupdf.TOOLS.mupdf_warnings(reset=True).splitlines())
    return tuple(dict.fromkeys(line for line in lines if line))[:_MAX_WARNINGS]


def _pixel_size(rect: pymupdf.Rect, dpi: int) -> tuple[int, int]:
    """The pixmap size MuPDF will produce: the transformed page box rounded by fz_round_rect."""
    import pymupdf

    box = (rect * pymupdf.Matrix(dpi / 72, dpi / 72)).irect
    return box.width, box.height


def _largest_fitting_dpi(rect: pymupdf.Rect, dpi: int, max_pixels: int, page: int) -> int:
    """Largest integer dpi below `dpi` whose render fits in max_pixels (area grows with dpi^2)."""
    area_at_72 = rect.width * rect.height
    guess = max(1, min(dpi - 1, int(72 * math.sqrt(max_pixels / area_at_72))))

    def fits(d: int) -> bool:
        w, h = _pixel_size(rect, d)
        return w * h <= max_pixels

    while guess > 1 and not fits(guess):  # rounding can push the estimate just over the limit
        guess -= 1
    while guess + 1 < dpi and fits(guess + 1):
        guess += 1
    if not fits(guess):
        w, h = _pixel_size(rect, 1)
        raise PayloadTooLarge(
            f"Page {page} is too large to render: even at 1 dpi it is {w}x{h} = {w * h} pixels, over the "
            f"limit of {max_pixels} pixels.",
            page=page,
            max_pixels=max_pixels,
        )
    return guess


# ------------------------------------------------------------------------------------ the child's loop

_PR_SET_PDEATHSIG = 1


def worker_main(conn: Connection, parent_pid: int, memory_limit_mb: int, limits: PdfLimits) -> None:
    """A render worker: answer ("open" | "render" | "searchable") messages one at a time; "forget" has no answer.

    Replies are tuples: ("opened", page_count, metadata, repaired, warnings, page sizes), ("page", size, page, dpi,
    requested_dpi, reduced, note, warnings, content hash, preview JPEG or None) followed by the RGB bytes as one
    raw message, ("searchable",) followed by the PDF's bytes as one raw message, ("error",
    OcrError class name, detail, extra), or
    ("memory", detail), after which the worker exits (its heap is suspect) and the parent replaces it.
    """
    # Ctrl-C in a terminal reaches the whole process group: the server shuts down and closes the pipe (EOF
    # below), or sends SIGTERM; a KeyboardInterrupt here would only print a traceback per render process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the server, even on kill -9
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        return  # the server died before prctl took effect
    import pymupdf

    pymupdf.TOOLS.mupdf_display_errors(False)  # errors are collected as warnings and answered instead
    _limit_address_space(memory_limit_mb)
    docs: OrderedDict[str, PdfSource] = OrderedDict()
    # The server closes its end when it shuts down or gives up on this worker, maybe mid-answer: a send then
    # fails with EPIPE, and the worker ends quietly (a traceback per render process in the server's log else).
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _serve(conn, docs, limits)


def _serve(conn: Connection, docs: OrderedDict[str, PdfSource], limits: PdfLimits) -> None:
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        op, doc_id, *args = message
        if op == "forget":
            with contextlib.suppress(Exception):
                docs.pop(doc_id).close()
            continue
        pixels = None
        try:
            reply = _handle(docs, op, doc_id, args, limits)
            if reply[0] != "opened":
                reply, pixels = reply
        except (MemoryLimitHit, MemoryError) as exc:
            conn.send(("memory", str(exc)[:300]))
            return
        except OcrError as exc:
            reply = ("error", type(exc).__name__, exc.detail, exc.extra)
        conn.send(reply)
        if pixels is not None:
            conn.send_bytes(pixels)  # raw, after the small tuple: no pickled copy of a 120 MB page
            del pixels


def _handle(docs: OrderedDict[str, PdfSource], op: str, doc_id: str, args: list, limits: PdfLimits) -> tuple:
    if op == "searchable":
        return ("searchable",), text_layer(*args, limits=limits)
    path, password, *rest = args
    source = docs.pop(doc_id, None)
    if source is None:  # "open" validates; "render" on another worker reopens an already validated file
        max_pages = rest[0] if op == "open" else 10**9
        source = open_pdf_file(path, password=password, max_pages=max_pages, limits=limits)
    docs[doc_id] = source
    while len(docs) > KEEP_OPEN:
        docs.popitem(last=False)[1].close()
    if op == "open":
        return ("opened", source.page_count, source.metadata, source.repaired, source.warnings, source.page_sizes())
    page, dpi, max_pixels, preview = rest
    size, samples, used_dpi, note, warnings = render_samples(
        source, page, dpi=dpi, max_pixels=max_pixels, limits=limits
    )
    digest = pixels_hash("RGB", size, samples)  # here, not in the server: see `images.pixels_hash`
    small = preview_jpeg(size, samples) if preview else None
    return ("page", size, page, used_dpi, dpi, used_dpi < dpi, note, warnings, digest, small), samples


def preview_jpeg(size: tuple[int, int], samples: bytes, side: int = PREVIEW_SIDE) -> bytes:
    """The page as a JPEG whose long side is at most `side` pixels: what a job keeps for /ui to show beside the
    text. Made here, from the pixels just rendered, so the server never decodes or resizes a page itself."""
    image = Image.frombytes("RGB", size, samples)
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=PREVIEW_QUALITY, optimize=True)
    return out.getvalue()


def text_layer(path: str, password: str | None, kind: str, pages: list[tuple[int, str]], *, limits: PdfLimits) -> bytes:
    """The searchable PDF of a spilled upload: a PDF's `pages` (1-based number, grounded text), or one image
    (`kind` "image") as a page, with the text laid invisibly over it (`outputs.searchable`). Run here, never in the
    server: writing it opens the whole upload with MuPDF (a 45 MB PDF without an xref table held the server's GIL
    for 82-129 s)."""
    from outputs import searchable  # PyMuPDF: only render processes import it

    with open(path, "rb") as f:
        data = f.read()
    failed = InvalidImage if kind == "image" else InvalidPdf
    try:
        if kind == "image":
            return searchable.searchable_from_images([(data, pages[0][1], None)])
        check_pdf_header(data[:PDF_EOF_WINDOW])
        prescan(data, limits)  # the caps a render has: this file may come from a job's store, not a fresh open
        return searchable.searchable_from_pdf(data, pages, password=password)
    except OcrError:
        raise
    except Exception as exc:
        raise memory_or(exc, failed(f"The searchable PDF could not be written ({exc}).")) from exc


def _limit_address_space(memory_limit_mb: int) -> None:
    """RLIMIT_AS = what the worker has mapped after start-up + memory_limit_mb: a page that needs more
    fails its allocation (answered as a memory problem) instead of growing the machine's RSS."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + (memory_limit_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def check_render_args(page: int, page_count: int, *, dpi: int, max_pixels: int) -> None:
    """Refuse a render request before any work: a bad dpi or pixel limit is a bug (ValueError), a page
    outside the document the client's mistake (400)."""
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not 1 <= page <= page_count:
        raise InvalidPageRange(
            f"Page {page} does not exist: the document has {page_count} pages (numbered from 1).",
            page=page,
            page_count=page_count,
        )
