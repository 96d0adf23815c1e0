"""Tests for images.py and the PDF functions of render_process.py (run directly here; through the
worker processes in test_hostile.py): every input is generated at run time with Pillow and PyMuPDF."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import resource
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image, ImageOps

import images
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
from pdf import render_pool, render_process

ROOT = Path(__file__).resolve().parent.parent
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
BIG = 100_000_000  # a max_pixels no test image comes near


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def two_tone(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Left half red, right half blue: shows both colour fidelity and left/right orientation."""
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return im


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def raises_problem(exc_type: type[OcrError], fn: Callable[[], object], *needles: str) -> OcrError:
    """Call fn, expect exc_type, and check its HTTP status and that the detail names each needle."""
    with pytest.raises(exc_type) as info:
        fn()
    err = info.value
    assert err.status == exc_type.status
    for needle in needles:
        assert needle in err.detail, f"{needle!r} missing from: {err.detail}"
    return err


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------
# Images: formats and colour modes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "tol"),
    [
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 12),
        ("WEBP", {"quality": 95}, 12),
        ("TIFF", {}, 0),
        ("BMP", {}, 0),
        ("GIF", {}, 0),
        ("PPM", {}, 0),
    ],
)
def test_decode_each_accepted_format(fmt: str, params: dict[str, object], tol: int) -> None:
    data = encode(two_tone(), fmt, **params)
    im = images.decode_image(data, max_pixels=BIG)
    assert (im.mode, im.size) == ("RGB", (64, 48))
    assert close_to(im.getpixel((8, 24)), RED, tol)
    assert close_to(im.getpixel((56, 24)), BLUE, tol)
    assert images.image_info(data) == images.ImageInfo(fmt, 64, 48)
    assert images.image_info(data).pixels == 64 * 48  # what admission counts before decoding


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_uses_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, (0, 255, 0), BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert images.image_info(data).frames == 3
    im = images.decode_image(data, max_pixels=BIG)
    assert (im.mode, im.size) == ("RGB", (32, 32))
    assert close_to(im.getpixel((16, 16)), RED)


def test_cmyk_jpeg_colours_are_right() -> None:
    data = encode(two_tone().convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None  # Adobe (inverted) CMYK JPEG
    im = images.decode_image(data, max_pixels=BIG)
    assert close_to(im.getpixel((8, 24)), RED) and close_to(im.getpixel((56, 24)), BLUE)


def test_16bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535, 4096]], dtype=np.uint16).repeat(4, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    im = images.decode_image(data, max_pixels=BIG)
    row = [im.getpixel((x, 0)) for x in range(4)]
    assert row == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (16, 16, 16)]


def test_16bit_pgm_is_scaled() -> None:
    data = b"P5\n2 1\n1000\n" + struct.pack(">HH", 500, 1000)  # maxval 1000: Pillow gives mode I
    im = images.decode_image(data, max_pixels=BIG)
    assert close_to(im.getpixel((0, 0)), (128, 128, 128), 1) and im.getpixel((1, 0)) == WHITE


def test_palette_png_with_transparency_is_composited_on_white() -> None:
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    im.paste(1, (10, 0, 20, 10))
    im = images.decode_image(encode(im, "PNG", transparency=0), max_pixels=BIG)
    assert im.getpixel((2, 5)) == WHITE and im.getpixel((15, 5)) == RED


def test_rgba_transparent_areas_are_white() -> None:
    im = Image.new("RGBA", (30, 10), (0, 0, 0, 0))  # fully transparent *black*
    im.paste((0, 0, 0, 128), (10, 0, 20, 10))  # half-transparent black
    im.paste((0, 0, 255, 255), (20, 0, 30, 10))
    out = images.decode_image(encode(im, "PNG"), max_pixels=BIG)
    assert out.getpixel((5, 5)) == WHITE
    assert close_to(out.getpixel((15, 5)), (127, 127, 127), 2)
    assert out.getpixel((25, 5)) == BLUE


def test_la_and_one_bit_and_grayscale() -> None:
    la = Image.new("LA", (20, 10), (0, 0))
    la.paste((50, 255), (10, 0, 20, 10))
    out = images.decode_image(encode(la, "PNG"), max_pixels=BIG)
    assert out.getpixel((5, 5)) == WHITE and out.getpixel((15, 5)) == (50, 50, 50)

    bits = Image.new("1", (16, 8), 1)
    bits.paste(0, (0, 0, 8, 8))
    out = images.decode_image(encode(bits, "PNG"), max_pixels=BIG)
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (0, 0, 0) and out.getpixel((12, 2)) == WHITE

    out = images.decode_image(encode(Image.new("L", (4, 4), 77), "PNG"), max_pixels=BIG)
    assert out.getpixel((1, 1)) == (77, 77, 77)


# --------------------------------------------------------------------------------------------
# Images: EXIF orientation
# --------------------------------------------------------------------------------------------


def test_exif_orientation_6_is_applied() -> None:
    stored = Image.new("RGB", (300, 200), WHITE)
    stored.paste(RED, (0, 0, 40, 40))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(stored, "JPEG", exif=exif, quality=95)
    info = images.image_info(data)
    assert (info.width, info.height, info.orientation, info.displayed_size) == (300, 200, 6, (200, 300))
    im = images.decode_image(data, max_pixels=BIG)
    assert im.size == (200, 300)
    assert close_to(im.getpixel((200 - 15, 15)), RED)  # stored top-left is displayed top-right
    assert close_to(im.getpixel((15, 15)), WHITE)


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8, 0, 9])
def test_every_exif_orientation_is_displayed_as_pillow_displays_it(orientation: int | None) -> None:
    """Each of the eight orientations flips or rotates as Pillow's `exif_transpose` does; none, 1 and values
    outside 1-8 leave the stored pixels as they are (the decode then makes no copy for the rotation)."""
    stored = Image.new("RGB", (30, 20), WHITE)
    stored.paste(RED, (0, 0, 6, 4))  # a marker in the stored top-left corner, asymmetric
    stored.paste((0, 0, 255), (24, 0, 30, 8))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    out = images.decode_image(data, max_pixels=BIG)
    assert out.size == shown.size and out.tobytes() == shown.convert("RGB").tobytes()
    if orientation not in range(2, 9):
        assert out.tobytes() == stored.tobytes()
    else:
        assert out.tobytes() != stored.tobytes() or out.size != stored.size


def test_exif_rotation_keeps_palette_transparency() -> None:
    stored = Image.new("P", (30, 20), 0)
    stored.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    stored.paste(1, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    im = images.decode_image(encode(stored, "PNG", transparency=0, exif=exif), max_pixels=BIG)
    assert im.size == (20, 30) and im.getpixel((15, 5)) == RED and im.getpixel((5, 25)) == WHITE


def jpeg_with_app1(payload: bytes) -> bytes:
    jpeg = encode(two_tone((30, 20)), "JPEG")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize(
    "payload",
    [
        b"Exif\x00\x00garbage!!",
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03",  # IFD cut mid-entry
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
    ],
)
def test_broken_exif_still_decodes(payload: bytes) -> None:
    # Pillow warns "Corrupt EXIF data" and skips the block; the request must still succeed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert images.decode_image(jpeg_with_app1(payload), max_pixels=BIG).size == (30, 20)


# --------------------------------------------------------------------------------------------
# Images: bad input
# --------------------------------------------------------------------------------------------


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF"])
def test_truncated_image_is_400(fmt: str) -> None:
    data = encode(noise((200, 200)), fmt)
    raises_problem(
        InvalidImage,
        lambda: images.decode_image(data[: len(data) // 2], max_pixels=BIG),
        "truncated or corrupt",
    )


def test_text_file_is_415_listing_formats() -> None:
    err = raises_problem(
        UnsupportedMediaType,
        lambda: images.decode_image(b"hello, this is not an image\n" * 20, max_pixels=BIG),
        "text file",
        "PNG, JPEG",
        "WEBP",
        "TIFF",
    )
    assert err.extra["accepted_formats"] == list(images.ACCEPTED_IMAGE_FORMATS)


def test_empty_image_is_400() -> None:
    raises_problem(InvalidImage, lambda: images.decode_image(b"", max_pixels=BIG), "empty")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200), "HEIC"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF"),
        (bytes(range(256)) * 4, "binary"),
    ],
)
def test_unsupported_files_are_415(data: bytes, needle: str) -> None:
    raises_problem(UnsupportedMediaType, lambda: images.decode_image(data, max_pixels=BIG), needle)


def test_excluded_pillow_formats_are_415() -> None:
    """Pillow reads ICO, but we do not accept it (the list is explicit)."""
    data = encode(Image.new("RGB", (16, 16), RED), "ICO")
    raises_problem(UnsupportedMediaType, lambda: images.decode_image(data, max_pixels=BIG), "Accepted formats")


def rss_growth_mib(fn: Callable[[], object]) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        fn()
    except OcrError:
        pass
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_40000_square_header_is_413_before_decoding() -> None:
    data = png_with_header(40000, 40000)  # over Pillow's own bomb guard too
    assert len(data) < 200
    err = raises_problem(
        PayloadTooLarge,
        lambda: images.decode_image(data, max_pixels=50_000_000),
        "40000x40000",
        "1600000000 pixels",
        "50000000",
    )
    assert err.extra["width"] == 40000
    assert rss_growth_mib(lambda: images.decode_image(data, max_pixels=50_000_000)) < 50  # 1.6 GP = 4.8 GB


def test_header_over_our_limit_is_413() -> None:
    data = png_with_header(5000, 4000)  # below Pillow's guard, above ours
    raises_problem(PayloadTooLarge, lambda: images.decode_image(data, max_pixels=1_000_000), "5000x4000", "1000000")
    raises_problem(PayloadTooLarge, lambda: images.image_info(data, max_pixels=1_000_000), "5000x4000")


def test_pillow_bomb_warning_as_error_is_still_413() -> None:
    """10000x10000 trips Pillow's DecompressionBombWarning; as an error it must not become a 500."""
    data = png_with_header(10000, 10000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raises_problem(
            PayloadTooLarge,
            lambda: images.decode_image(data, max_pixels=50_000_000),
            "10000x10000",
            "50000000",
        )


def test_pillow_guard_wins_when_our_limit_is_higher() -> None:
    raises_problem(
        PayloadTooLarge,
        lambda: images.decode_image(png_with_header(40000, 40000), max_pixels=10**10),
        "40000x40000",
        "safety limit",
    )


# --------------------------------------------------------------------------------------------
# Base64
# --------------------------------------------------------------------------------------------

PNG_BYTES = encode(two_tone((8, 8)), "PNG")
PNG_B64 = base64.b64encode(PNG_BYTES).decode()


@pytest.mark.parametrize(
    "value",
    [
        PNG_B64,
        f"data:image/png;base64,{PNG_B64}",
        f"DATA:image/PNG;charset=utf-8;BASE64,{PNG_B64}",
        "\n".join(PNG_B64[i : i + 76] for i in range(0, len(PNG_B64), 76)) + "\r\n",
        f"  {PNG_B64[:10]} \t {PNG_B64[10:]}  ",
        PNG_B64.rstrip("="),
    ],
)
def test_base64_forms(value: str) -> None:
    assert images.decode_base64_image(value, max_bytes=10_000) == PNG_BYTES


def test_base64_urlsafe_alphabet() -> None:
    raw = bytes(range(256))  # encodes to both '+' and '/'
    value = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert "-" in value and "_" in value
    assert images.decode_base64_image(value, max_bytes=1000) == raw


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("not base64 at all!!!", "not valid base64"),
        ("QUJD$RA==", "not valid base64"),
        ("QQ==QQ==", "not valid base64"),
        ("A", "not valid base64"),
        ("", "empty"),
        ("   \n", "empty"),
        ("data:image/png;base64,", "empty"),
        ("data:text/plain;base64,QUJD", "not an image"),
        ("data:image/png,%89PNG", "not base64-encoded"),
        ("data:image/png;base64QUJD", "no ','"),
        ("QUJDRA\u00e9=", "not valid base64"),
    ],
)
def test_base64_invalid_is_400(value: str, needle: str) -> None:
    err = raises_problem(BadRequest, lambda: images.decode_base64_image(value, max_bytes=1000), needle)
    assert err.status == 400


def test_base64_too_large_is_413() -> None:
    value = base64.b64encode(bytes(101)).decode()
    raises_problem(PayloadTooLarge, lambda: images.decode_base64_image(value, max_bytes=100), "101", "100")
    assert len(images.decode_base64_image(value, max_bytes=101)) == 101


def test_base64_huge_string_rejected_before_decoding() -> None:
    value = "A" * 40_000_000  # would decode to 30 MB
    raises_problem(
        PayloadTooLarge, lambda: images.decode_base64_image(value, max_bytes=1_000_000), "30000000", "1000000"
    )


# --------------------------------------------------------------------------------------------
# PDFs: opening
# --------------------------------------------------------------------------------------------

# (width, height, rotation) in points: A4, US Letter shown landscape, A5, A4, an odd size.
PAGES = [(595, 842, 0), (612, 792, 90), (420, 595, 0), (595, 842, 0), (300.5, 400.3, 0)]
SIZES_72 = [(595, 842), (792, 612), (420, 595), (595, 842), (301, 401)]
SIZES_144 = [(1190, 1684), (1584, 1224), (840, 1190), (1190, 1684), (601, 801)]


def make_pdf(pages: list[tuple[float, float, int]] = PAGES, **save: object) -> bytes:
    doc = pymupdf.open()
    for number, (width, height, rotation) in enumerate(pages, start=1):
        page = doc.new_page(width=width, height=height)
        page.draw_rect(pymupdf.Rect(0, 0, 40, 40), color=(1, 0, 0), fill=(1, 0, 0))  # top-left marker
        for line in range(int(height // 30) - 2):
            page.insert_text((50, 70 + 30 * line), f"Page {number}, line {line}: the quick brown fox", fontsize=11)
        page.set_rotation(rotation)
    doc.set_metadata({"title": "Mixed test document"})
    buf = io.BytesIO()
    doc.save(buf, **save)
    doc.close()
    return buf.getvalue()


@pytest.fixture(scope="module")
def pdf_bytes() -> bytes:
    return make_pdf()


@pytest.fixture
def pdf(pdf_bytes: bytes):  # type: ignore[no-untyped-def]
    with render_process.open_pdf(pdf_bytes, max_pages=10) as source:
        yield source


def test_open_pdf_basics(pdf: render_process.PdfSource, pdf_bytes: bytes) -> None:
    assert pdf.page_count == 5
    assert pdf.title == "Mixed test document"
    assert not pdf.repaired and not pdf.closed


@pytest.mark.parametrize(("dpi", "sizes"), [(72, SIZES_72), (144, SIZES_144)])
def test_render_sizes(pdf: render_process.PdfSource, dpi: int, sizes: list[tuple[int, int]]) -> None:
    for page, size in enumerate(sizes, start=1):
        rendered = render_process.render_page(pdf, page, dpi=dpi, max_pixels=BIG)
        assert rendered.image.size == size and rendered.image.mode == "RGB"
        assert (rendered.page, rendered.dpi, rendered.requested_dpi) == (page, dpi, dpi)
        assert not rendered.reduced and rendered.note is None


def test_rotated_page_renders_as_displayed(pdf: render_process.PdfSource) -> None:
    image = render_process.render_page(pdf, 2, dpi=72, max_pixels=BIG).image
    assert image.width > image.height  # portrait Letter with /Rotate 90 shows landscape
    # /Rotate 90 turns the page clockwise: the unrotated top-left marker shows at the top-right.
    assert image.getpixel((image.width - 10, 10)) == RED and image.getpixel((10, 10)) == WHITE
    upright = render_process.render_page(pdf, 1, dpi=72, max_pixels=BIG).image
    assert upright.getpixel((10, 10)) == RED


def test_not_a_pdf_is_415() -> None:
    raises_problem(
        UnsupportedMediaType, lambda: render_process.open_pdf(b"just text\n" * 50, max_pages=10), "text file"
    )
    raises_problem(UnsupportedMediaType, lambda: render_process.open_pdf(PNG_BYTES, max_pages=10), "PNG", "%PDF-")


def test_empty_pdf_is_400() -> None:
    raises_problem(InvalidPdf, lambda: render_process.open_pdf(b"", max_pages=10), "empty")


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_truncated_pdf_is_400(pdf_bytes: bytes, fraction: float) -> None:
    cut = pdf_bytes[: int(len(pdf_bytes) * fraction)]
    raises_problem(InvalidPdf, lambda: render_process.open_pdf(cut, max_pages=10), "Send the complete file")


def test_garbage_after_pdf_header_is_400() -> None:
    data = b"%PDF-1.7\n" + bytes(random.Random(0).randbytes(5000))
    raises_problem(InvalidPdf, lambda: render_process.open_pdf(data, max_pages=10), "damaged")


def test_complete_pdf_with_broken_xref_is_repaired_and_renders(pdf_bytes: bytes) -> None:
    at = pdf_bytes.rfind(b"startxref")
    broken = pdf_bytes[:at] + b"startxref\n12\n%%EOF\n"  # wrong offset, but the file is complete
    with render_process.open_pdf(broken, max_pages=10) as source:
        assert source.repaired and source.page_count == 5 and source.warnings
        sizes = [render_process.render_page(source, p, dpi=72, max_pixels=BIG).image.size for p in range(1, 6)]
    assert sizes == SIZES_72


def test_encrypted_pdf() -> None:
    data = make_pdf(PAGES[:2], encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="s3cret", owner_pw="owner")
    err = raises_problem(PdfPasswordRequired, lambda: render_process.open_pdf(data, max_pages=10), "`password`")
    assert err.status == 400
    raises_problem(PdfPasswordRequired, lambda: render_process.open_pdf(data, password="", max_pages=10), "`password`")
    raises_problem(PdfPasswordRequired, lambda: render_process.open_pdf(data, password="nope", max_pages=10), "wrong")
    with render_process.open_pdf(data, password="s3cret", max_pages=10) as source:
        assert source.page_count == 2 and source.title == "Mixed test document"
        assert render_process.render_page(source, 2, dpi=72, max_pixels=BIG).image.size == (792, 612)


def test_too_many_pages_is_413(pdf_bytes: bytes) -> None:
    err = raises_problem(PayloadTooLarge, lambda: render_process.open_pdf(pdf_bytes, max_pages=3), "5 pages", "3 pages")
    assert err.extra == {"page_count": 5, "max_pages": 3}


# --------------------------------------------------------------------------------------------
# PDFs: page selections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        (None, 3, [1, 2, 3]),
        ("", 3, [1, 2, 3]),
        ("  ", 2, [1, 2]),
        ("1-3,7", 10, [1, 2, 3, 7]),
        ("5-", 7, [5, 6, 7]),
        ("-2", 7, [1, 2]),
        (" 7 , 1 - 2 ,2", 9, [1, 2, 7]),
        ("3,1,2-3,1", 5, [1, 2, 3]),
        ("5", 5, [5]),
        ("5-5", 5, [5]),
        ("005", 5, [5]),
    ],
)
def test_page_ranges_valid(spec: str | None, count: int, expected: list[int]) -> None:
    assert images.parse_page_ranges(spec, count) == expected


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("9", "beyond the last page"),
        ("3-9", "beyond the last page"),
        ("6-", "beyond"),
        ("3-1", "reversed"),
        ("0", "numbered from 1"),
        ("0-2", "numbered from 1"),
        ("a", "'a' is not a page"),
        ("1,,2", "empty item"),
        ("1,", "empty item"),
        ("-", "not a page"),
        ("1-2-3", "not a page"),
        ("3 4", "not a page"),
        ("+2", "not a page"),
        ("1.5", "not a page"),
        ("9" * 5000, "beyond"),
        ("\u0663", "not a page"),  # ARABIC-INDIC DIGIT THREE: int() would take it
    ],
)
def test_page_ranges_invalid(spec: str, needle: str) -> None:
    raises_problem(InvalidPageRange, lambda: images.parse_page_ranges(spec, 5), needle, "5 pages", "'1-3,7'")


# --------------------------------------------------------------------------------------------
# PDFs: rendering limits, laziness, threads
# --------------------------------------------------------------------------------------------


def test_render_reduces_dpi_to_fit_max_pixels(pdf: render_process.PdfSource) -> None:
    max_pixels = 1_000_000  # A4 at 300 dpi is 2480x3509 = 8.7 MP (MuPDF rounds outwards)
    rendered = render_process.render_page(pdf, 1, dpi=300, max_pixels=max_pixels)
    width, height = rendered.image.size
    assert rendered.reduced and rendered.requested_dpi == 300 and rendered.dpi < 300
    assert width * height <= max_pixels
    # The largest integer dpi that fits: one more would not.
    bigger = pymupdf.Rect(0, 0, 595, 842) * pymupdf.Matrix((rendered.dpi + 1) / 72, (rendered.dpi + 1) / 72)
    assert bigger.irect.width * bigger.irect.height > max_pixels
    assert rendered.note and "300 dpi" in rendered.note and f"{rendered.dpi} dpi" in rendered.note
    assert "2480x3509" in rendered.note and "1000000" in rendered.note


def test_render_refuses_page_that_cannot_fit_at_1_dpi(pdf: render_process.PdfSource) -> None:
    raises_problem(PayloadTooLarge, lambda: render_process.render_page(pdf, 1, dpi=144, max_pixels=50), "1 dpi", "50")


@pytest.mark.parametrize("dpi", [0, -72])
def test_render_rejects_non_positive_dpi(pdf: render_process.PdfSource, dpi: int) -> None:
    with pytest.raises(ValueError, match="dpi"):
        render_process.render_page(pdf, 1, dpi=dpi, max_pixels=BIG)


def test_render_page_out_of_range_and_closed(pdf_bytes: bytes) -> None:
    source = render_process.open_pdf(pdf_bytes, max_pages=10)
    raises_problem(InvalidPageRange, lambda: render_process.render_page(source, 6, dpi=72, max_pixels=BIG), "5 pages")
    source.close()
    assert source.closed
    with pytest.raises(ValueError, match="closed"):
        render_process.render_page(source, 1, dpi=72, max_pixels=BIG)


def test_concurrent_renders_match_sequential(pdf: render_process.PdfSource) -> None:
    def render(page: int) -> bytes:
        return render_process.render_page(pdf, page, dpi=100, max_pixels=BIG).image.tobytes()

    expected = {page: render(page) for page in range(1, 6)}
    jobs = [page for page in range(1, 6) for _ in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for round_ in range(3):
            random.Random(round_).shuffle(jobs)
            results = list(pool.map(render, jobs))
            assert all(got == expected[page] for page, got in zip(jobs, results, strict=True)), round_


def test_damaged_content_stream_renders_with_warnings() -> None:
    """A page whose drawing commands are garbage renders what MuPDF can read and says so."""
    doc = pymupdf.open()
    page = doc.new_page(width=200, height=200)
    page.draw_rect(pymupdf.Rect(0, 0, 40, 40), color=(1, 0, 0), fill=(1, 0, 0))
    page.clean_contents()
    xref = page.get_contents()[0]
    doc.update_stream(xref, doc.xref_stream(xref) + b"\n] } >> /NoSuchFont 12 Tf (x) Tj /Im9 Do\n" * 50)
    with render_process.open_pdf(doc.tobytes(), max_pages=1) as source:
        rendered = render_process.render_page(source, 1, dpi=72, max_pixels=BIG)
    assert rendered.image.getpixel((10, 10)) == RED  # the readable part is there
    assert 0 < len(rendered.warnings) <= 20 and len(set(rendered.warnings)) == len(rendered.warnings)


def test_image_functions_work_without_pymupdf() -> None:
    """PyMuPDF is imported lazily: the image routes must not depend on the PDF library."""
    code = (
        "import sys; sys.modules['pymupdf'] = sys.modules['fitz'] = None\n"
        "import base64, images\n"
        f"data = images.decode_base64_image({PNG_B64!r}, max_bytes=10_000)\n"
        "assert images.decode_image(data, max_pixels=100).size == (8, 8)\n"
        "assert images.parse_page_ranges('2-', 3) == [2, 3]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- rendering in worker processes -------------------------------------------------------------------


def _text_pdf(pages: int, lines: int) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for i in range(pages):
        page = doc.new_page(width=595, height=842)
        page.insert_text((50, 60), f"Page {i + 1}", fontsize=14)
        for line in range(lines):
            page.insert_text((50, 80 + (line % 700)), f"line {line} " * 8, fontsize=6)
    return doc.tobytes()


def _heavy_pdf() -> bytes:
    """One page drawing 800,000 small filled rectangles: slow to render, quick to build."""
    import pymupdf

    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.draw_rect((0, 0, 1, 1))
    ops = b"".join(b"%d %d 3 3 re f\n" % (i % 590, (i // 590) % 840) for i in range(800_000))
    doc.update_stream(page.get_contents()[0], ops, compress=False)
    return doc.tobytes()


def test_render_pool_matches_direct_render_pixel_for_pixel() -> None:
    data = _text_pdf(3, 20)
    pool = render_pool.RenderPool(2, page_timeout_s=60, open_timeout_s=60, memory_limit_mb=1024)

    async def scenario() -> None:
        async with pool.document(data, password=None, max_pages=10) as doc:
            assert doc.page_count == 3 and not doc.repaired
            with render_process.open_pdf(data, max_pages=10) as source:
                for page in (1, 3):
                    via_pool = await doc.render(page, dpi=100, max_pixels=10**8)
                    direct = render_process.render_page(source, page, dpi=100, max_pixels=10**8)
                    assert via_pool.image.size == direct.image.size and via_pool.dpi == direct.dpi == 100
                    assert via_pool.image.tobytes() == direct.image.tobytes()
                    # The render process hashes its samples: the same digest the server would compute.
                    assert via_pool.content_hash == images.content_hash(via_pool.image)
                    assert via_pool.content_hash != images.content_hash(Image.new("RGB", via_pool.image.size, "white"))
            with pytest.raises(PayloadTooLarge):
                await doc.render(1, dpi=100, max_pixels=1)  # not even 1 dpi fits: the worker's 413
            with pytest.raises(InvalidPageRange):
                await doc.render(4, dpi=100, max_pixels=10**8)

    try:
        asyncio.run(scenario())
    finally:
        pool.close()


@pytest.mark.timeout(300)
def test_render_pool_deadline_kills_a_runaway_page_and_keeps_the_loop_free() -> None:
    heavy, light = _heavy_pdf(), _text_pdf(1, 5)  # the heavy page is about a second of MuPDF work
    pool = render_pool.RenderPool(1, page_timeout_s=0.2, open_timeout_s=60, memory_limit_mb=1024)

    async def scenario() -> tuple[int, BaseException | None]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        error: BaseException | None = None
        async with pool.document(heavy, password=None, max_pages=10) as doc:
            try:
                await doc.render(1, dpi=300, max_pixels=10**8)
            except PayloadTooLarge as exc:
                error = exc
        task.cancel()
        return ticks, error

    async def after() -> render_process.RenderedPage:
        pool.page_timeout_s = 60
        async with pool.document(light, password=None, max_pages=10) as doc:
            return await doc.render(1, dpi=72, max_pixels=10**8)

    try:
        ticks, error = asyncio.run(scenario())
        assert isinstance(error, PayloadTooLarge) and "PDF_RENDER_TIMEOUT_S" in error.detail
        assert ticks >= 10  # the event loop kept running while the page rendered elsewhere
        assert asyncio.run(after()).image.size == (595, 842)  # a replacement worker renders
    finally:
        pool.close()


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (1190, 1684), (images.HASH_CHUNK_PIXELS + 3, 2)])
def test_pixels_hash_is_content_hash_of_the_raw_bytes(size: tuple[int, int]) -> None:
    """The render process's digest of its samples and the server's digest of the image agree, also where
    `content_hash` walks rows in pieces (a row wider than HASH_CHUNK_PIXELS)."""
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    digest = images.pixels_hash("RGB", image.size, image.tobytes())
    assert digest == images.content_hash(image)
    flipped = image.copy()
    last = (size[0] - 1, size[1] - 1)
    flipped.putpixel(last, (1, 2, 3) if image.getpixel(last) != (1, 2, 3) else (4, 5, 6))
    assert images.pixels_hash("RGB", flipped.size, flipped.tobytes()) != digest
