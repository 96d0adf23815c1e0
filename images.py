"""Safe decoding and validation of user uploads: images, base64 images and page selections.

Everything here is a plain function on bytes (no FastAPI). Bad input raises an `errors.OcrError`
subclass whose message says what was wrong and what is allowed; anything else escaping is a bug.

Images come back as RGB `PIL.Image.Image` objects as the user sees them (EXIF orientation applied,
transparency on white, 16-bit scaled to 8-bit). `image_info` reads only the header, so admission can
count an image's pixels (`ImageInfo.pixels`) before any are decoded. PDFs are opened and rendered only
in worker processes: see `pdf.render_pool`.

Why images decode in threads, not in the PDF workers: Pillow releases the GIL while decoding, and with
the caps below the work is bounded before it starts (pixels by `max_pixels`; a progressive JPEG by
`JPEG_MAX_SCANS`: each scan is a pass over every pixel, so 20,000 empty scans took 48 s, while 100 scans
of a 40 MP image take 1.4 s, about a normal 40 MP decode). Decoding in a process would add a copy of
up to 120 MB of pixels back through a pipe for every image, and process start-up, to save nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

import image_pixels
from errors import BadRequest, InvalidImage, InvalidPageRange, PayloadTooLarge, UnsupportedMediaType
from image_pixels import exif_transposed, to_rgb

log = logging.getLogger(__name__)

# Pillow format names we hand to `Image.open(formats=...)`. Restricting the plugins matters for
# safety, not only for the message: without it Pillow would also try EPS (runs Ghostscript), FITS,
# PSD and ~30 other parsers on attacker-controlled bytes. MPO is what phones' multi-picture JPEGs
# identify as; PPM covers PBM/PGM/PPM/PNM; HEIF (iPhone photos) comes from pillow-heif (`image_pixels`).
ACCEPTED_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "WEBP", "TIFF", "BMP", "GIF", "PPM", "HEIF")
# MPO has no opener of its own: the JPEG opener returns an MPO image when it finds MP data.
_PILLOW_OPENERS: tuple[str, ...] = tuple(f for f in ACCEPTED_IMAGE_FORMATS if f != "MPO")
_ACCEPTED_TEXT = ", ".join(ACCEPTED_IMAGE_FORMATS)

_PDF_MAGIC = b"%PDF-"
_PDF_HEADER_WINDOW = 1024  # the PDF spec lets readers find the header within the first 1024 bytes
# A progressive JPEG decodes in one pass over every pixel per scan, data or not; real files have
# about 10 scans (mozjpeg's most ~20). 20,000 empty scans in 278 KB took 48 s to decode.
JPEG_MAX_SCANS = 100


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


# Pillow allocates each image row on its own: beside its pixels (~5 B each through decoding, conversion and
# resizing) a row cost ~23 B more, measured with decode_image + preprocess (gundam and tiny), peak RSS: 40 MP as
# 6325x6325, 632x63245 and 200x200000 took +196 to +201 MB; as 1x40,000,000, +1073 MB. Charged as pixels.
ROW_COST_PIXELS = 6


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, read without decoding pixels."""

    format: str  # Pillow's name, one of ACCEPTED_IMAGE_FORMATS
    width: int  # as stored, before EXIF orientation
    height: int
    frames: int = 1
    orientation: int = 1  # EXIF orientation (1-8); 5-8 swap width and height when displayed
    reduce_by: int = 1  # a photo over the pixel limit is read at 1/reduce_by (`image_pixels`)

    @property
    def pixels(self) -> int:
        """Pixels `decode_image` will produce (one frame): what is held once it has returned."""
        return math.prod(image_pixels.reduced_size((self.width, self.height), self.reduce_by))

    @property
    def decoded_pixels(self) -> int:
        """Pixels the decoder holds on the way (a HEIF is decoded whole, then reduced), each row charged
        ROW_COST_PIXELS more: what admission counts."""
        size = (self.width, self.height)
        rows = image_pixels.reduced_size(size, self.reduce_by)[1]
        return image_pixels.decoded_pixels(self.format, size, self.reduce_by) + ROW_COST_PIXELS * rows

    @property
    def displayed_size(self) -> tuple[int, int]:
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def image_info(data: bytes, *, max_pixels: int | None = None, max_photo_pixels: int = 0,
               max_aspect: float | None = None) -> ImageInfo:
    """Identify an upload from its header only. Raises like `decode_image` for empty, unsupported,
    unreadable-header, too-large (when `max_pixels` is given) and too-elongated images. A photo over
    `max_pixels` comes back with the reduction `decode_image` will apply (see `image_pixels`)."""
    with _open_lazy(data, max_pixels) as im:
        check_shape(im.size, max_aspect)
        factor = 1 if max_pixels is None else _reduction(im, max_pixels, max_photo_pixels)
        return ImageInfo(im.format or "", im.width, im.height, getattr(im, "n_frames", 1), _orientation(im), factor)


HASH_CHUNK_PIXELS = 1 << 18  # ~1 MB of RGB: one `tobytes` call holds the GIL for about a millisecond


def content_hash(image: Image.Image) -> str:
    """The decoded pixels' identity: the same picture in another file format is the same input.

    The bytes are hashed in pieces of HASH_CHUNK_PIXELS, in row order (the digest is that of `tobytes()`):
    one `tobytes()` of a 1 x 40,000,000 strip held the GIL for ~0.3 s, and six of them stalled `/health`
    for 2 s (issue 18); hashlib itself releases the GIL.
    """
    digest = _digest(image.mode, image.size)
    width, height = image.size
    if width <= HASH_CHUNK_PIXELS:
        rows = HASH_CHUNK_PIXELS // width
        boxes = ((0, y, width, min(height, y + rows)) for y in range(0, height, rows))
    else:  # rows wider than a piece: each row in segments, left to right
        boxes = ((x, y, min(width, x + HASH_CHUNK_PIXELS), y + 1)
                 for y in range(height) for x in range(0, width, HASH_CHUNK_PIXELS))
    for box in boxes:
        digest.update(image.crop(box).tobytes())
    return digest.hexdigest()


def pixels_hash(mode: str, size: tuple[int, int], data: bytes | memoryview) -> str:
    """`content_hash` of the image whose raw bytes (`tobytes()`) are `data`, without building it: a PDF render
    process hashes its page's samples where they are, so the server does not (4 ms of an A4 page's bytes)."""
    digest = _digest(mode, size)
    digest.update(data)
    return digest.hexdigest()


def _digest(mode: str, size: tuple[int, int]) -> hashlib._Hash:
    # SHA-256: x86's SHA extensions make it ~2x BLAKE2b on an A4 page's 6 MB (3.8 against 8.3 ms on the CI box),
    # and the hash is on every image's way to the engine (issue 29's one-client latency).
    digest = hashlib.sha256()
    digest.update(f"{mode}:{size[0]}x{size[1]}:".encode())
    return digest


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation found in the header. A PNG's eXIf chunk may follow the pixel data, and Pillow's
    `getexif` then decodes the whole image to reach it: a 40 MP PNG was decoded here, before the pixel budget
    (issue 18). Such a PNG reads as 1 here; `decode_image` still applies its rotation (the pixel count, what
    admission counts, is the same either way)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(0x0112, 1)  # reads the EXIF block only, no pixels
    except Exception:  # broken EXIF: same policy as decode_image, ignore the rotation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(data: bytes, *, max_pixels: int, max_photo_pixels: int = 0,
                 max_aspect: float | None = None) -> Image.Image:
    """Decode an uploaded image to RGB as the user sees it; animated images give their first frame.

    The pixel and shape limits are checked on the header before any pixel is decoded. A photo (JPEG, HEIF)
    over `max_pixels` is read reduced to fit it (HEIF only up to `max_photo_pixels`); its `info["note"]`
    says so. Other formats over `max_pixels` are refused.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    with _open_lazy(data, max_pixels) as im:
        check_shape(im.size, max_aspect)
        original, factor = im.size, _reduction(im, max_pixels, max_photo_pixels)
        image_pixels.start(im, factor)
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(exc, data, max_pixels) from exc
        except Exception as exc:  # any decoder failure on user bytes is the user's file, not a bug
            raise InvalidImage(
                f"The {im.format} image is truncated or corrupt and could not be decoded ({exc}). "
                "Send the complete, undamaged file."
            ) from exc
        reduced = image_pixels.finish(im, factor)
        # Re-check what was decoded, not only what the header claimed (a plugin may adjust the size).
        _check_pixels(reduced.size, max_pixels)
        rgb = to_rgb(exif_transposed(reduced))
        if factor > 1:
            rgb.info["note"] = image_pixels.note(original, reduced.size)
        return rgb


def _reduction(im: Image.Image, max_pixels: int, max_photo_pixels: int) -> int:
    """1, or the factor a photo over `max_pixels` is read at; 413 naming the limit when it cannot be."""
    factor = image_pixels.reduction(im.format or "", im.size, max_pixels, max_photo_pixels)
    if factor is None:
        photo = im.format in image_pixels.REDUCIBLE_FORMATS
        raise _too_many_pixels(im.size, max_photo_pixels if photo else max_pixels,
                               " (MAX_PHOTO_MPIX: a HEIF photo is decoded whole before it is reduced)"
                               if photo and im.format == "HEIF" else " (MAX_IMAGE_PIXELS)")
    return factor


def check_shape(size: tuple[int, int], max_aspect: float | None) -> None:
    """Refuse an image far longer than wide (or the reverse) before decoding it. A 77 KB PNG of 1 x 40,000,000
    pixels held ~650 MB through decoding, conversion and resizing (each image row is an allocation of its own
    in Pillow, and the resizers keep per-row tables), and no page of text has that shape: the model sees it as
    a line a pixel thick."""
    if max_aspect is None:
        return
    width, height = size
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > max_aspect:
        raise PayloadTooLarge(
            f"The image is {width}x{height}: its long side is {ratio:,.0f} times its short side; the limit is "
            f"{max_aspect:g} (MAX_IMAGE_ASPECT). Split it into pieces (a long receipt into pages) or pad it.",
            width=width, height=height, aspect=round(ratio, 1), max_aspect=max_aspect,
        )


def _open_lazy(data: bytes, max_pixels: int | None) -> ImageFile.ImageFile:
    """`Image.open` (lazy: parses the header only) restricted to the accepted formats."""
    if not data:
        raise InvalidImage(f"The file is empty (0 bytes). Send an image; accepted formats: {_ACCEPTED_TEXT}.")
    image_pixels.register_heif()
    try:
        im = Image.open(io.BytesIO(data), formats=list(_PILLOW_OPENERS))
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
    if im.format in ("JPEG", "MPO"):
        scans = jpeg_scans(data)
        if scans > JPEG_MAX_SCANS:
            im.close()
            raise PayloadTooLarge(
                f"The JPEG has {scans} scans, over the limit of {JPEG_MAX_SCANS} scans (JPEG_MAX_SCANS): each "
                "scan of a progressive JPEG costs a full decoding pass. Re-save it as a baseline JPEG or PNG.",
                scans=scans,
                max_scans=JPEG_MAX_SCANS,
            )
    return im


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG, counted without decoding. 0xFFDA cannot occur inside
    entropy-coded data (a 0xFF there is always followed by 0x00 or a restart marker), so counting it
    is exact up to an EXIF thumbnail's own scans, which only add a few."""
    return data.count(b"\xff\xda")


def not_a_pdf(head: bytes) -> UnsupportedMediaType:
    """The 415 for an upload to a PDF route that has no %PDF- header (used by `pdf.render_process`)."""
    return UnsupportedMediaType(f"Expected a PDF (a file starting with %PDF-), but this looks like {_describe(head)}.")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise _too_many_pixels(size, max_pixels)


def _too_many_pixels(size: tuple[int, int], max_pixels: int, why: str = " (MAX_IMAGE_PIXELS)") -> PayloadTooLarge:
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
