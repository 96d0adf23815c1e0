"""Caps on what one PDF may make a render worker do, checked before MuPDF does the costly part.

MuPDF offers no limit on decompressed stream size, xref size or image dimensions, so these run first:
- `prescan` reads the raw file: an xref /Size or object number over `max_objects` (MuPDF allocates its
  xref table for it: /Size 8388607 costs ~350 MB per open), and any Flate stream inflating past
  `max_stream_mb` (inflated into a bounded buffer, so an object stream of ~20 GB of zeros is refused
  after max_stream_mb of work instead of 36 s of it). The /Filter is read as MuPDF reads it: a name, an
  array (`[/AHx /Fl]`: the ASCII decoders in front are undone first) or an indirect reference (`5 0 R`,
  followed; one that cannot be followed in the raw bytes, e.g. into an object stream, is tried as each of
  Flate, hex + Flate and ASCII85 + Flate). Abbreviated names count (`/Fl`, `/AHx`, `/A85`);
- `check_page_images` reads each image a page uses before rendering it: /Width x /Height and, for
  JPX/DCT/JBIG2, the size in the codestream itself (a dictionary can lie), against `max_image_pixels`; and a
  JPEG's scan count against `max_jpeg_scans` (each scan of a progressive JPEG costs a pass over all
  pixels, even an empty one).
Whatever slips through (encrypted streams cannot be prescanned; inline images) is bounded by the
worker's deadline and RLIMIT_AS. Each refusal is a 413 naming its environment variable.
"""

from __future__ import annotations

import base64
import binascii
import io
import mmap
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from errors import OcrError, PayloadTooLarge
from images import jpeg_scans

if TYPE_CHECKING:
    import pymupdf

_INFLATE_STEP = 16 << 20  # bytes of output per zlib call: bounds the prescan's own memory


@dataclass(frozen=True)
class PdfLimits:
    """Caps on what one PDF may make a worker do; each error names its environment variable."""

    max_stream_mb: int = 256  # PDF_MAX_STREAM_MB: one stream, decompressed
    max_objects: int = 1_000_000  # PDF_MAX_OBJECTS: xref /Size and object numbers
    max_image_pixels: int = 100_000_000  # PDF_MAX_IMAGE_PIXELS: one embedded image
    max_jpeg_scans: int = 100  # JPEG_MAX_SCANS: scans of one embedded JPEG


class MemoryLimitHit(Exception):
    """MuPDF or Python could not allocate under the worker's RLIMIT_AS; the worker must be replaced."""


# Each pattern starts with a literal, which `re` finds at memchr speed (a leading \\d or lookbehind
# made the scan of a 56 MB file take seconds instead of tens of milliseconds).
_SIZE = re.compile(rb"/Size\s+(\d{1,15})")
_OBJ = re.compile(rb"obj\b")
_OBJ_NUMBER = re.compile(rb"(\d{1,15})\s+\d{1,5}\s+$")  # "N G " just before an "obj" keyword
_STREAM = re.compile(rb"stream(?:\r\n|\n|\r)")
_FILTER = re.compile(rb"/Filter\s*(\[[^\]]{0,512}\]|/[A-Za-z0-9]+|\d{1,10}\s+\d{1,5}\s+R)")
_FILTER_NAME = re.compile(rb"/([A-Za-z0-9]+)")
_FILTER_VALUE = re.compile(rb"\s*(\[[^\]]{0,512}\]|/[A-Za-z0-9]+)")
_LONG_NAMES = {b"Fl": b"FlateDecode", b"AHx": b"ASCIIHexDecode", b"A85": b"ASCII85Decode"}
_ASCII_DECODERS = (b"ASCIIHexDecode", b"ASCII85Decode")
# An unresolvable filter is tried as each of these chains (the ones that cost MuPDF a bomb's inflation).
_GUESSES = ([b"FlateDecode"], [b"ASCIIHexDecode", b"FlateDecode"], [b"ASCII85Decode", b"FlateDecode"])


def prescan(data: bytes | mmap.mmap, limits: PdfLimits) -> None:
    """Refuse a file whose declared object count or any Flate stream exceeds the caps (raw-byte scan).

    Object numbers count too: when the xref is broken MuPDF's repair sizes its table by the largest
    "N 0 obj" it finds. Streams are found by keyword, not through the xref, so an object stream, an
    orphan stream and a stream the xref hides are all checked."""
    for found in _SIZE.finditer(data):
        if int(found[1]) > limits.max_objects:
            raise _too_many_objects(f"declares /Size {int(found[1])} in its cross-reference", limits)
    for found in _OBJ.finditer(data):
        number = _OBJ_NUMBER.search(data[max(0, found.start() - 40) : found.start()])
        if number and int(number[1]) > limits.max_objects:
            raise _too_many_objects(f"has an object numbered {int(number[1])}", limits)
    cap = limits.max_stream_mb << 20
    for found in _STREAM.finditer(data):
        start = found.start()
        if data[start - 3 : start] == b"end":
            continue
        head = data[max(0, start - 1024) : start]
        head = head[head.rfind(b"obj") + 1 :]
        if b"/Filter" in head and _decoded_size(data, found.end(), _filters(data, head), cap) > cap:
            raise PayloadTooLarge(
                f"A stream in the PDF (at byte {start}) decompresses to more than {limits.max_stream_mb} MB, "
                "over the cap on one decompressed stream (PDF_MAX_STREAM_MB). The file is a decompression bomb "
                "or needs the cap raised.",
                max_stream_mb=limits.max_stream_mb,
            )


def _too_many_objects(what: str, limits: PdfLimits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The PDF {what}, over the cap of {limits.max_objects} objects (PDF_MAX_OBJECTS).",
        max_objects=limits.max_objects,
    )


def _filters(data: bytes | mmap.mmap, head: bytes) -> list[list[bytes]]:
    """The filter chains a stream whose dictionary is `head` may have: one when its /Filter can be read (an
    indirect reference followed to its "N G obj" in the raw bytes), else every chain of `_GUESSES`."""
    found = _FILTER.search(head)
    if found is None:
        return []
    value: bytes | None = found[1]
    if value is not None and value.endswith(b"R"):
        number, generation = value.split()[:2]
        value = None
        for target in re.finditer(rb"%s\s+%s\s+obj" % (number, generation), data):
            at = target.start()
            if at == 0 or not data[at - 1 : at].isdigit():  # "15 0 obj" is not object 5
                body = _FILTER_VALUE.match(data[target.end() : target.end() + 600])
                value = body[1] if body else None
                break
    if value is None:
        return list(_GUESSES)
    return [[_LONG_NAMES.get(name, name) for name in _FILTER_NAME.findall(value)]]


def _decoded_size(data: bytes | mmap.mmap, start: int, chains: list[list[bytes]], cap: int) -> int:
    """The most any of `chains` makes of the stream at `start` through its first Flate (ASCII decoders in front
    undone first), counted up to cap + 1. Chains without Flate in that place count 0."""
    largest = 0
    for chain in chains:
        ascii_front = 0
        while ascii_front < len(chain) and chain[ascii_front] in _ASCII_DECODERS:
            ascii_front += 1
        if chain[ascii_front : ascii_front + 1] != [b"FlateDecode"]:
            continue
        if ascii_front == 0:
            size = _inflated_size(data, start, cap)
        else:
            end = data.find(b"endstream", start)
            raw = bytes(data[start : end if end >= 0 else len(data)])
            for name in chain[:ascii_front]:
                raw = _ascii_decoded(name, raw)
            size = _inflated_size(raw, 0, cap)
        largest = max(largest, size)
        if largest > cap:
            break
    return largest


def _ascii_decoded(name: bytes, raw: bytes) -> bytes:
    """ASCIIHex or ASCII85 as MuPDF reads them: whitespace skipped, stop at the end marker; garbage is b""."""
    try:
        if name == b"ASCIIHexDecode":
            text = bytes(raw.split(b">", 1)[0].translate(None, b" \t\r\n\f\x00"))
            return binascii.unhexlify(text + b"0" * (len(text) % 2))
        text = raw.split(b"~>", 1)[0].translate(None, b" \t\r\n\f\x00")
        return base64.a85decode(text.removeprefix(b"<~"))
    except (binascii.Error, ValueError):
        return b""


def _inflated_size(data: bytes | mmap.mmap, start: int, cap: int) -> int:
    """Bytes a zlib stream at `start` inflates to, counted up to cap + 1; garbage counts what came out."""
    inflater = zlib.decompressobj()
    total, pos, step = 0, start, 4096  # most streams are small: read them in small bites, then bigger
    with memoryview(data) as view:
        while pos < len(view) and not inflater.eof and total <= cap:
            pending = view[pos : pos + step]
            pos, step = pos + len(pending), min(step * 4, 1 << 20)
            total, more = _inflate_more(inflater, pending, total, cap)
            if not more:
                break
    return total


def _inflate_more(inflater: zlib._Decompress, pending: memoryview, total: int, cap: int) -> tuple[int, bool]:
    """Feed `pending` with bounded output: the new total, and False once the data stopped being zlib."""
    try:
        while pending and total <= cap:
            total += len(inflater.decompress(pending, _INFLATE_STEP))
            pending = inflater.unconsumed_tail
    except zlib.error:
        return total, False  # not (or no longer) zlib: MuPDF stops there too
    return total, True


def jpx_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a JPEG 2000 codestream's SIZ marker (JP2 files embed the codestream)."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0 or len(data) < at + 24:
        return None
    xsiz, ysiz, xo, yo = (int.from_bytes(data[at + 8 + 4 * i : at + 12 + 4 * i], "big") for i in range(4))
    return max(0, xsiz - xo), max(0, ysiz - yo)


def jbig2_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the page information segment (type 48) of an embedded JBIG2 stream: the
    bitmap jbig2dec allocates, whatever the image dictionary says. Reads at most the first 8 segments."""
    pos = 0
    for _ in range(8):
        if len(data) < pos + 11:
            return None
        number, flags = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4]
        pos += 5
        count = data[pos] >> 5
        if count == 7:  # long form: a 29-bit count, then one retention bit per referred segment (+1)
            count = int.from_bytes(data[pos : pos + 4], "big") & 0x1FFFFFFF
            pos += 4 + (count + 8) // 8
        else:
            pos += 1
        pos += count * (1 if number <= 256 else 2 if number <= 65536 else 4)
        pos += 4 if flags & 0x40 else 1  # page association
        length = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        if flags & 0x3F == 48 and len(data) >= pos + 8:
            width, height = int.from_bytes(data[pos : pos + 4], "big"), int.from_bytes(data[pos + 4 : pos + 8], "big")
            return width, (0 if height == 0xFFFFFFFF else height)  # unknown height: striped, the dict's counts
        if length == 0xFFFFFFFF:
            return None  # unknown length (immediate generic region): stop looking
        pos += length
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:  # header only
            return im.size
    except Image.DecompressionBombError:
        return (1 << 31, 1)
    except Exception:
        return None


_HEADER_SIZES = {"JPXDecode": jpx_size, "DCTDecode": _jpeg_size, "JBIG2Decode": jbig2_size}


def check_page_images(doc: pymupdf.Document, pg: pymupdf.Page, page: int, limits: PdfLimits) -> None:
    """Refuse a page using an image over the pixel or scan caps, before MuPDF decodes it."""
    for xref, _smask, width, height, _bpc, _cs, _alt, _name, filt, *_ in pg.get_images(full=True):
        sizes = [(width, height)]
        if filt in _HEADER_SIZES:
            raw = doc.xref_stream_raw(xref) or b""
            sizes.append(_HEADER_SIZES[filt](raw))
            if filt == "DCTDecode" and jpeg_scans(raw) > limits.max_jpeg_scans:
                raise PayloadTooLarge(
                    f"Page {page} holds a JPEG image (object {xref}) of {jpeg_scans(raw)} scans, over the cap of "
                    f"{limits.max_jpeg_scans} scans (JPEG_MAX_SCANS).",
                    page=page,
                    max_jpeg_scans=limits.max_jpeg_scans,
                )
        for size in sizes:
            if size is not None and size[0] * size[1] > limits.max_image_pixels:
                raise PayloadTooLarge(
                    f"Page {page} holds a {size[0]}x{size[1]} {filt or 'raw'} image (object {xref}), over the cap "
                    f"of {limits.max_image_pixels} pixels per embedded image (PDF_MAX_IMAGE_PIXELS).",
                    page=page,
                    max_image_pixels=limits.max_image_pixels,
                )


_ALLOC_FAILURE = re.compile(r"(?:m|c|re)alloc|out of memory|cannot allocate|memory allocation", re.IGNORECASE)


def memory_or(exc: BaseException, other: OcrError) -> BaseException:
    """MuPDF reports a failed allocation (RLIMIT_AS) as an ordinary error: tell the two apart."""
    if isinstance(exc, MemoryError) or _ALLOC_FAILURE.search(str(exc)):
        return MemoryLimitHit(str(exc))
    return other
