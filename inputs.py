"""Safe decoding and validation of user uploads: images, base64 images, PDFs and page selections.

Everything here is a plain function on bytes (no FastAPI). Bad input raises an `errors.OcrError`
subclass whose message says what was wrong and what is allowed; anything else escaping is a bug.

Images come back as RGB `PIL.Image.Image` objects as the user sees them (EXIF orientation applied,
transparency on white, 16-bit scaled to 8-bit). PDFs are opened once into a `PdfSource` and rendered
one page at a time with `render_page`, so a 2,000-page scan never sits in memory as images.

Thread safety: PyMuPDF documents itself as not supporting Python threads. Every MuPDF call in this
module runs under `MUPDF_LOCK` (see its comment for why a lock and not per-thread documents).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
import math
import multiprocessing
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from errors import (
    BadRequest,
    InvalidImage,
    InvalidPageRange,
    InvalidPdf,
    OcrError,
    PayloadTooLarge,
    PdfPasswordRequired,
    UnsupportedMediaType,
)

if TYPE_CHECKING:
    import pymupdf

# PyMuPDF is imported inside the PDF functions, not here, so that the image functions (and the
# image routes that import this module) keep working where PyMuPDF is not installed; the PDF
# router imports it itself and reports it missing.

log = logging.getLogger(__name__)

# Pillow format names we hand to `Image.open(formats=...)`. Restricting the plugins matters for
# safety, not only for the message: without it Pillow would also try EPS (runs Ghostscript), FITS,
# PSD and ~30 other parsers on attacker-controlled bytes. MPO is what phones' multi-picture JPEGs
# identify as; PPM covers PBM/PGM/PPM/PNM.
ACCEPTED_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP", "GIF", "PPM")
# MPO has no opener of its own: the JPEG opener returns an MPO image when it finds MP data.
_PILLOW_OPENERS: tuple[str, ...] = tuple(f for f in ACCEPTED_IMAGE_FORMATS if f != "MPO")
_ACCEPTED_TEXT = ", ".join(ACCEPTED_IMAGE_FORMATS)

# MuPDF's global context is shared by every Document in the process, and PyMuPDF initialises it
# single-threaded (`mupdf.reinit_singlethreaded()`, no lock callbacks). The SWIG bindings keep the
# GIL during calls, but MuPDF calls back into Python for every warning/error, and a thread switch
# there lets a second thread enter MuPDF with the same context mid-call (its exception stack lives
# in the context). Per-thread Documents would still share that one context, so they are not a fix;
# one process-wide lock is. It costs no parallelism: the bindings never release the GIL, so threads
# cannot render in parallel anyway (measured: 2-4 threads render slower than 1, with or without this
# lock). The lock also makes the process-global MuPDF warning store attributable to one call.
# Other modules that call PyMuPDF should take this lock too.
MUPDF_LOCK = threading.RLock()

_PDF_MAGIC = b"%PDF-"
_PDF_HEADER_WINDOW = 1024  # the PDF spec lets readers find the header within the first 1024 bytes
_PDF_EOF_WINDOW = 1024  # ...and the %%EOF marker within the last 1024 bytes


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, read without decoding pixels."""

    format: str  # Pillow's name, one of ACCEPTED_IMAGE_FORMATS
    width: int  # as stored, before EXIF orientation
    height: int
    frames: int = 1
    orientation: int = 1  # EXIF orientation (1-8); 5-8 swap width and height when displayed

    @property
    def displayed_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def image_info(data: bytes, *, max_pixels: int | None = None) -> ImageInfo:
    """Identify an upload from its header only. Raises like `decode_image` for empty, unsupported,
    unreadable-header and (when `max_pixels` is given) too-large images."""
    with _open_lazy(data, max_pixels) as im:
        if max_pixels is not None:
            _check_pixels(im.size, max_pixels)
        return ImageInfo(im.format or "", im.width, im.height, getattr(im, "n_frames", 1), _orientation(im))


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)  # reads the EXIF block only, no pixels
    except Exception:  # broken EXIF: same policy as decode_image, ignore the rotation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode an uploaded image to RGB as the user sees it; animated images give their first frame.

    The pixel limit is checked on the header before any pixel is decoded.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    with _open_lazy(data, max_pixels) as im:
        _check_pixels(im.size, max_pixels)
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(exc, data, max_pixels) from exc
        except Exception as exc:  # any decoder failure on user bytes is the user's file, not a bug
            raise InvalidImage(
                f"The {im.format} image is truncated or corrupt and could not be decoded ({exc}). "
                "Send the complete, undamaged file."
            ) from exc
        # Re-check what was decoded, not only what the header claimed (a plugin may adjust the size).
        _check_pixels(im.size, max_pixels)
        oriented = _exif_transposed(im)
        return _to_rgb(oriented)


def _open_lazy(data: bytes, max_pixels: int | None) -> ImageFile.ImageFile:
    """`Image.open` (lazy: parses the header only) restricted to the accepted formats."""
    if not data:
        raise InvalidImage(f"The file is empty (0 bytes). Send an image; accepted formats: {_ACCEPTED_TEXT}.")
    try:
        return Image.open(io.BytesIO(data), formats=list(_PILLOW_OPENERS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, data, max_pixels) from exc
    except UnidentifiedImageError as exc:
        if _PDF_MAGIC in data[:_PDF_HEADER_WINDOW]:  # the common mistake: say where PDFs go
            raise UnsupportedMediaType(
                "The file is a PDF; this route takes images. Send PDFs to POST /pdf/ocr (also /pdf/ocr/download "
                "and /pdf/ocr/simple), or to POST /jobs for long documents (progress, resumable). "
                f"Accepted image formats here: {_ACCEPTED_TEXT}.",
                accepted_formats=list(ACCEPTED_IMAGE_FORMATS),
                pdf_routes=["/pdf/ocr", "/pdf/ocr/download", "/pdf/ocr/simple", "/jobs"],
            ) from exc
        raise UnsupportedMediaType(
            f"The file is not an image format we accept (it looks like {_describe(data)}). "
            f"Accepted formats: {_ACCEPTED_TEXT}.",
            accepted_formats=list(ACCEPTED_IMAGE_FORMATS),
        ) from exc
    except Exception as exc:  # a plugin recognised the signature but choked on the header
        raise InvalidImage(
            f"The image is truncated or corrupt: its header could not be read ({exc}). "
            "Send the complete, undamaged file."
        ) from exc


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise _too_many_pixels(size, max_pixels)


def _too_many_pixels(size: tuple[int, int], max_pixels: int, why: str = "") -> PayloadTooLarge:
    width, height = size
    return PayloadTooLarge(
        f"The image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
        f"pixels{why}. Downscale it before uploading.",
        width=width,
        height=height,
        pixels=width * height,
        max_pixels=max_pixels,
    )


def _bomb_error(exc: Exception, data: bytes, max_pixels: int | None) -> PayloadTooLarge:
    """Pillow's own decompression-bomb guard fired. It reads the process-wide
    `Image.MAX_IMAGE_PIXELS`, which we leave alone (changing it per call is not thread-safe), and it
    fires inside `Image.open` before we see the size, so recover the size for the message."""
    size = _declared_size(data)
    if size is not None and max_pixels is not None and size[0] * size[1] > max_pixels:
        return _too_many_pixels(size, max_pixels)
    # Either the header could not be re-read or our limit is configured above Pillow's guard.
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if size is not None:
        return _too_many_pixels(size, pillow_limit, " (the image decoder's safety limit)")
    found = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{found.group(1)} pixels" if found else "too many pixels"
    return PayloadTooLarge(
        f"The image header declares {count}, over the limit of {max_pixels or pillow_limit} pixels. "
        "Downscale it before uploading.",
        max_pixels=max_pixels or pillow_limit,
    )


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Best effort: run the accepted plugins' header parsers directly (what `Image.open` does, minus
    its bomb check) to learn the declared size. Any failure only loses the size from a message."""
    Image.init()
    for fmt in _PILLOW_OPENERS:
        try:
            factory, accept = Image.OPEN[fmt]
            verdict = accept(data[:16]) if accept else True
            if verdict and not isinstance(verdict, str):
                with factory(io.BytesIO(data), "") as im:
                    return im.size
        except Exception:
            continue
    return None


def _exif_transposed(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block only costs the rotation, never the request."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # EXIF parsing raises a zoo of types on garbage (struct, Syntax, Value...)
        log.warning("ignoring unreadable EXIF orientation: %s", exc)
        return im


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB the way it looks on screen."""
    if im.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(im)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Flatten on white: documents are dark ink on paper; transparent areas as black would hide text.
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return flat
    try:
        return im.convert("RGB")  # 1, L, P, CMYK (Adobe-inverted JPEGs are un-inverted by Pillow), YCbCr
    except ValueError as exc:
        raise UnsupportedMediaType(
            f"The image's colour mode {im.mode} cannot be converted to RGB. Send an RGB or grayscale image."
        ) from exc


def _to_uint8(im: Image.Image) -> np.ndarray:
    """Scale 16/32-bit integer and float grayscale to 8 bit. Pillow's own convert("L") clips values
    above 255, which turns any 16-bit scan white."""
    arr = np.asarray(im)
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if im.mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
            # Full 16-bit range (Pillow also scales 16-bit PGM into it); x/257 maps 65535 -> 255.
            return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo_f, hi_f = float(values.min()), float(values.max())
    if im.mode == "F" and lo_f >= 0.0 and hi_f <= 1.0:
        return np.round(values * 255.0).astype(np.uint8)
    if hi_f <= lo_f:
        return np.zeros(values.shape, np.uint8)
    # Unknown range (32-bit integers, arbitrary floats): stretch what is there.
    return np.round((values - lo_f) * (255.0 / (hi_f - lo_f))).astype(np.uint8)


_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"BM", "a BMP image"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (8, b"WEBP", "a WebP image"),
    (0, b"PK\x03\x04", "a ZIP archive (e.g. DOCX/XLSX)"),
    (0, b"\x1f\x8b", "a gzip archive"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _describe(data: bytes) -> str:
    """A short guess of what a rejected upload is, for the error message."""
    head = data[:64]
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "a HEIC/HEIF photo (convert it to JPEG or PNG)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image (convert it to JPEG or PNG)"
        return "an MP4/QuickTime-family file"
    if _PDF_MAGIC in data[:_PDF_HEADER_WINDOW]:
        return "a PDF (send PDFs as PDFs, not as images)"
    for offset, magic, name in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    text = data[:512].decode("utf-8", errors="replace")
    # A multi-byte character cut at the 512-byte boundary gives one replacement char; more is binary.
    if text.count("\ufffd") <= 1 and all(c.isprintable() or c.isspace() for c in text.replace("\ufffd", "")):
        return "a text file"
    return "an unrecognised binary file"


# --------------------------------------------------------------------------------------------
# Base64
# --------------------------------------------------------------------------------------------

_DATA_URL_HINT = "raw base64, or a data URL such as data:image/png;base64,iVBORw0..."


def decode_base64_image(value: str, *, max_bytes: int) -> bytes:
    """Decode raw base64 or a `data:image/...;base64,` URL to bytes (not yet validated as an image).

    Whitespace and newlines anywhere, missing padding and the URL-safe alphabet are tolerated.
    The size is bounded from the encoded length before decoding, so a 1 GB string is never decoded.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    # Base64 of n bytes is at most 4*ceil(n/3) characters. Check the raw string first, allowing
    # generous whitespace and a data-URL header, so a huge string is rejected before any copy.
    encoded_limit = 4 * math.ceil(max_bytes / 3)
    if len(value) > encoded_limit + encoded_limit // 4 + 2048:
        raise _base64_too_large(len(value) * 3 // 4, max_bytes)
    payload = _strip_data_url(value.strip())
    compact = "".join(payload.split())
    if len(compact) > encoded_limit:
        raise _base64_too_large(len(compact) * 3 // 4, max_bytes)
    compact = compact.replace("-", "+").replace("_", "/").rstrip("=")
    if not compact:
        raise BadRequest(f"The image is empty: no base64 data was sent. Send {_DATA_URL_HINT}.")
    if len(compact) % 4 == 1:
        raise BadRequest(
            f"The image is not valid base64 (no base64 string has length {len(compact)}). Send {_DATA_URL_HINT}."
        )
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"The image is not valid base64 ({exc}). Send {_DATA_URL_HINT}.") from exc
    if len(raw) > max_bytes:
        raise _base64_too_large(len(raw), max_bytes)
    return raw


def _strip_data_url(text: str) -> str:
    """Return the base64 payload of a data URL, or `text` unchanged when it is not one."""
    if not text[:5].lower() == "data:":
        return text
    header, sep, payload = text[5:].partition(",")
    if not sep:
        raise BadRequest(f"The data URL has no ',' before its data. Send {_DATA_URL_HINT}.")
    media_type, *params = (part.strip().lower() for part in header.split(";"))
    if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
        raise BadRequest(f"The data URL is of type {media_type!r}, not an image. Send {_DATA_URL_HINT}.")
    if "base64" not in params:
        raise BadRequest(f"The data URL is not base64-encoded (no ';base64'). Send {_DATA_URL_HINT}.")
    return payload


def _base64_too_large(size: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The base64 image decodes to {size} bytes, over the limit of {max_bytes} bytes.",
        size_bytes=size,
        max_bytes=max_bytes,
    )


# --------------------------------------------------------------------------------------------
# Page selections
# --------------------------------------------------------------------------------------------

_PAGE_SYNTAX = "1-based page numbers and ranges separated by commas, e.g. '1-3,7', '5-' (5 to the end), '-2'"
_PAGE_PART = re.compile(r"^(?P<start>[0-9]+)?\s*(?P<dash>-)?\s*(?P<end>[0-9]+)?$")  # ASCII digits only


def parse_page_ranges(spec: str | None, page_count: int) -> list[int]:
    """Parse a page selection into sorted, de-duplicated 1-based page numbers. None/"" = all pages."""
    if page_count < 1:
        raise ValueError(f"page_count must be positive, got {page_count}")
    if spec is None or not spec.strip():
        return list(range(1, page_count + 1))
    selected: set[int] = set()
    for part in spec.split(","):
        start, end = _parse_page_part(part.strip(), spec, page_count)
        selected.update(range(start, end + 1))
    return sorted(selected)


def _parse_page_part(part: str, spec: str, page_count: int) -> tuple[int, int]:
    def invalid(reason: str) -> InvalidPageRange:
        return InvalidPageRange(
            f"Invalid page selection {spec!r}: {reason}. The document has {page_count} pages; use {_PAGE_SYNTAX}.",
            pages=spec,
            page_count=page_count,
        )

    found = _PAGE_PART.match(part)
    if not part or found is None or (found["start"] is None and found["end"] is None):
        raise invalid(f"{part!r} is not a page number or range" if part else "it has an empty item")
    if found["dash"] is None and found["end"] is not None:  # "3 4" parses as start+end without a dash
        raise invalid(f"{part!r} is not a page number or range")
    # More than 9 digits is beyond any page count; don't hand int() thousands of digits.
    if any(len(found[g] or "") > 9 for g in ("start", "end")):
        raise invalid(f"{part!r} is beyond the last page")
    start = int(found["start"]) if found["start"] else 1
    end = start if found["dash"] is None else (int(found["end"]) if found["end"] else page_count)
    if start < 1 or end < 1:
        raise invalid("pages are numbered from 1")
    if max(start, end) > page_count:
        raise invalid(f"page {max(start, end)} is beyond the last page")
    if start > end:
        raise invalid(f"the range {part!r} is reversed")
    return start, end


# --------------------------------------------------------------------------------------------
# PDFs
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PdfSource:
    """An opened (and unlocked) PDF. Render pages with `render_page`; close it when done.

    Holds the original bytes and password so a caller can reopen the file elsewhere (e.g. in a
    worker process). Safe to share between threads: every MuPDF call goes through `MUPDF_LOCK`.
    """

    data: bytes = field(repr=False)
    password: str | None = field(repr=False)
    page_count: int
    metadata: dict[str, str]
    repaired: bool  # MuPDF had to rebuild the cross-reference table (damaged but complete file)
    warnings: tuple[str, ...]  # MuPDF warnings while opening
    _doc: pymupdf.Document | None = field(repr=False)
    _spill_path: str | None = field(default=None, repr=False)  # the bytes on disk, for RenderPool children

    @property
    def title(self) -> str | None:
        return self.metadata.get("title")

    @property
    def closed(self) -> bool:
        return self._doc is None

    def close(self) -> None:
        with MUPDF_LOCK:
            if self._doc is not None:
                self._doc.close()
                self._doc = None
        if self._spill_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._spill_path)
            self._spill_path = None

    def __enter__(self) -> PdfSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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


def open_pdf(data: bytes, *, password: str | None = None, max_pages: int) -> PdfSource:
    """Open and validate an uploaded PDF without rendering anything."""
    if max_pages <= 0:
        raise ValueError(f"max_pages must be positive, got {max_pages}")
    if not data:
        raise InvalidPdf("The file is empty (0 bytes). Send a PDF.")
    if _PDF_MAGIC not in data[:_PDF_HEADER_WINDOW]:
        raise UnsupportedMediaType(
            f"Expected a PDF (a file starting with %PDF-), but this looks like {_describe(data)}."
        )
    import pymupdf

    with MUPDF_LOCK:
        _drain_mupdf_warnings()  # drop what earlier calls left in the global store
        try:
            doc = pymupdf.open(stream=data, filetype="pdf")
        except Exception as exc:
            raise InvalidPdf(
                f"The PDF is damaged or truncated and could not be opened ({exc}). Send the complete file."
            ) from exc
        try:
            return _validated_source(doc, data, password, max_pages)
        except BaseException:
            doc.close()
            raise


def _validated_source(doc: pymupdf.Document, data: bytes, password: str | None, max_pages: int) -> PdfSource:
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
        raise InvalidPdf(f"The PDF's page tree could not be read ({exc}). The file is damaged.") from exc
    warnings = _drain_mupdf_warnings()
    if doc.is_repaired and b"%%EOF" not in data[-_PDF_EOF_WINDOW:]:
        # Cut-off uploads still "open" after MuPDF's repair, but with pages missing, blank or given
        # default sizes. Rendering those silently would drop content, so refuse the file.
        raise InvalidPdf(
            "The PDF is truncated (it has no %%EOF end marker and its cross-reference table is "
            "broken), so pages would be missing or blank. "
            f"Send the complete file ({len(data)} bytes received)."
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
    return PdfSource(data, password, page_count, metadata, bool(doc.is_repaired), warnings, doc)


def render_page(source: PdfSource, page: int, *, dpi: int, max_pixels: int) -> RenderedPage:
    """Render one 1-based page to RGB at `dpi` (zoom dpi/72, no alpha, rotation as displayed).

    When the page at `dpi` would exceed `max_pixels`, it is rendered at the largest integer dpi
    that fits and `reduced`/`note` say so. If even 1 dpi does not fit (absurd page box or absurdly
    small limit) the page is refused with PayloadTooLarge: an image that small is useless for OCR.
    Thread-safe; the rendering itself runs under `MUPDF_LOCK`.
    """
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not 1 <= page <= source.page_count:
        raise InvalidPageRange(
            f"Page {page} does not exist: the document has {source.page_count} pages (numbered from 1).",
            page=page,
            page_count=source.page_count,
        )
    with MUPDF_LOCK:
        if source._doc is None:
            raise ValueError("render_page called on a closed PdfSource")
        _drain_mupdf_warnings()
        size, stride, samples, used_dpi, full_size = _render_locked(source._doc, page, dpi, max_pixels)
        warnings = _drain_mupdf_warnings()
    image = Image.frombytes("RGB", size, samples, "raw", "RGB", stride)
    note = None
    if used_dpi < dpi:
        note = (
            f"Page {page} was rendered at {used_dpi} dpi instead of {dpi} dpi: at {dpi} dpi it would be "
            f"{full_size[0]}x{full_size[1]} = {full_size[0] * full_size[1]} pixels, over the limit of "
            f"{max_pixels} pixels."
        )
    return RenderedPage(image, page, used_dpi, dpi, used_dpi < dpi, note, warnings)


def iter_rendered_pages(
    source: PdfSource, pages: Iterable[int], *, dpi: int, max_pixels: int
) -> Iterator[RenderedPage]:
    """Render the given pages lazily, one at a time, so only the current page is in memory."""
    for page in pages:
        yield render_page(source, page, dpi=dpi, max_pixels=max_pixels)


def _render_locked(
    doc: pymupdf.Document, page: int, dpi: int, max_pixels: int
) -> tuple[tuple[int, int], int, bytes, int, tuple[int, int]]:
    """Render under MUPDF_LOCK and return plain bytes, so no MuPDF object outlives the lock
    (their destructors call into MuPDF too)."""
    import pymupdf

    pg = pix = None
    try:
        pg = doc.load_page(page - 1)
        rect = pg.rect  # the displayed box: CropBox with /Rotate applied
        if rect.is_empty or rect.is_infinite:
            raise InvalidPdf(f"Page {page} has an empty or invalid page size ({rect}); it cannot be rendered.")
        full_size = _pixel_size(rect, dpi)
        used_dpi = (
            dpi if full_size[0] * full_size[1] <= max_pixels else _largest_fitting_dpi(rect, dpi, max_pixels, page)
        )
        zoom = used_dpi / 72
        pix = pg.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
        return (pix.width, pix.height), pix.stride, pix.samples, used_dpi, full_size
    except OcrError:
        raise
    except Exception as exc:
        raise InvalidPdf(f"Page {page} of the PDF could not be rendered ({exc}). The file is damaged.") from exc
    finally:
        pix = pg = None  # drop MuPDF objects here, inside the lock, not when a traceback is freed


_MAX_WARNINGS = 20  # a damaged content stream can emit hundreds of identical lines


def _drain_mupdf_warnings() -> tuple[str, ...]:
    """MuPDF's warnings since the last drain, de-duplicated. The store is process-global, so the
    lines belong to the current call only because callers hold MUPDF_LOCK."""
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


# --------------------------------------------------------------------------------------------
# Rendering in worker processes
# --------------------------------------------------------------------------------------------


class RenderPool:
    """Renders PDF pages in child processes, each page under a deadline.

    PyMuPDF holds the GIL for a whole render and threads cannot render in parallel (see MUPDF_LOCK),
    so in a thread one page with 20,000 lines of text freezes the event loop, health checks included,
    for tens of seconds. Child processes render in parallel, leave the server's loop alone, and can be
    killed: a page past `timeout_s` is refused (413) and the pool restarts. Each child keeps the few
    documents it rendered last open, so pages of one PDF do not reparse it.
    """

    def __init__(self, workers: int, timeout_s: float = 60.0) -> None:
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"workers must be >= 1 and timeout_s > 0, got {workers}, {timeout_s}")
        self.workers = workers
        self.timeout_s = timeout_s
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._spill_dir = tempfile.TemporaryDirectory(prefix="ocr-pdf-")

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the server process has threads (and maybe CUDA) that must not be forked.
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:
                return
            self._pool = None
        for process in list(getattr(broken, "_processes", {}).values()):  # no public kill before 3.14
            with contextlib.suppress(Exception):
                process.kill()
        broken.shutdown(wait=False, cancel_futures=True)

    def spill(self, source: PdfSource) -> str:
        """The PDF's bytes in a private file the children open by name (written once per document)."""
        if source._spill_path is None:
            fd, path = tempfile.mkstemp(suffix=".pdf", dir=self._spill_dir.name)
            with os.fdopen(fd, "wb") as f:
                f.write(source.data)
            source._spill_path = path
        return source._spill_path

    async def render(self, source: PdfSource, page: int, *, dpi: int, max_pixels: int) -> RenderedPage:
        path = self.spill(source)
        for attempt in (1, 2):
            pool = self._executor()
            future = asyncio.wrap_future(pool.submit(_render_in_child, path, source.password, page, dpi, max_pixels))
            try:
                result = await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                self._restart(pool)
                raise PayloadTooLarge(
                    f"Page {page} did not render within {self.timeout_s:g} s (PDF_RENDER_TIMEOUT_S); its content "
                    "is too complex. Try a lower dpi or leave the page out with `pages`.",
                    page=page,
                ) from None
            except BrokenProcessPool:
                self._restart(pool)  # another page's deadline killed the pool under this one: once more
                if attempt == 2:
                    raise
                continue
            return _rendered_from_child(result)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._spill_dir.cleanup()


_CHILD_DOCS: OrderedDict[tuple[str, str | None], PdfSource] = OrderedDict()
_CHILD_KEEP = 4


def _render_in_child(path: str, password: str | None, page: int, dpi: int, max_pixels: int) -> tuple:
    """Runs in a pool process. Errors come back as data: OcrError subclasses do not survive pickling."""
    try:
        key = (path, password)
        source = _CHILD_DOCS.pop(key, None)
        if source is None:
            with open(path, "rb") as f:
                source = open_pdf(f.read(), password=password, max_pages=10**9)
        _CHILD_DOCS[key] = source
        while len(_CHILD_DOCS) > _CHILD_KEEP:
            _CHILD_DOCS.popitem(last=False)[1].close()
        r = render_page(source, page, dpi=dpi, max_pixels=max_pixels)
        return ("ok", r.image.size, r.image.tobytes(), r.page, r.dpi, r.requested_dpi, r.reduced, r.note, r.warnings)
    except OcrError as exc:
        return ("error", type(exc).__name__, exc.detail, exc.extra)


def _rendered_from_child(result: tuple) -> RenderedPage:
    if result[0] == "error":
        _, name, detail, extra = result
        cls = {c.__name__: c for c in (PayloadTooLarge, InvalidPdf, PdfPasswordRequired, InvalidPageRange)}
        raise cls.get(name, InvalidPdf)(detail, **extra)
    _, size, pixels, page, dpi, requested, reduced, note, warnings = result
    image = Image.frombytes("RGB", size, pixels)
    return RenderedPage(image, page, dpi, requested, reduced, note, warnings)
