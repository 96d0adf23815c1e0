"""Hostile files of issue 18, small but of the same shape as the files the security review used: PDFs
written object by object (an object-stream bomb, images claiming huge sizes, a page nested 100,000 deep,
pages of heavy drawing) and a JPEG of many empty scans."""

from __future__ import annotations

import io
import zlib

import pymupdf
from PIL import Image


def build_pdf(objects: dict[int, bytes], *, size: int | None = None) -> bytes:
    """A classic-xref PDF from numbered object bodies; object 1 is the catalog."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref, count = len(out), max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % count
    out += b"".join(b"%010d 00000 n \n" % offsets[n] for n in range(1, count))
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size or count, xref)
    return bytes(out)


def stream(data: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d %s >>\nstream\n%s\nendstream" % (len(data), extra, data)


def one_page(content: bytes, resources: bytes = b"<< >>", **more: bytes) -> bytes:
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Resources %s /Contents 4 0 R >>" % resources,
        4: stream(content),
    }
    objects.update({int(k[1:]): v for k, v in more.items()})
    return build_pdf(objects)


def objstm_pdf(
    packed: bytes, first: int, filters: bytes = b"/FlateDecode", filter_object: bytes | None = None
) -> bytes:
    """A one-page PDF whose catalog (object 1) lives in the stream `packed` (an object stream whose header is
    `first` bytes, encoded by `filters`), found through an xref stream: what the object-stream bombs are wrapped
    in. `filter_object`: the body of an object 6 (a /Filter the stream's dictionary refers to as `6 0 R`)."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = {}
    bodies = {
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        4: stream(packed, b"/Type /ObjStm /N 1 /First %d /Filter %s" % (first, filters)),
    }
    if filter_object is not None:
        bodies[6] = filter_object
    for number, body in bodies.items():
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    offsets[5] = len(out)
    listed = (2, 3, 4, 5, 6) if filter_object is not None else (2, 3, 4, 5)
    rows = [b"\x00" + bytes(4) + b"\xff\xff", b"\x02" + (4).to_bytes(4, "big") + bytes(2)]
    rows += [b"\x01" + offsets[n].to_bytes(4, "big") + bytes(2) for n in listed]
    out += b"5 0 obj\n%s\nendobj\n" % stream(b"".join(rows), b"/Type /XRef /Size %d /W [1 4 2] /Root 1 0 R"
                                               % (len(listed) + 2))
    out += b"startxref\n%d\n%%%%EOF\n" % offsets[5]
    return bytes(out)


def objstm_bomb(zero_bytes: int) -> bytes:
    """The catalog in an object stream, after `zero_bytes` of NULs (PDF whitespace), behind an xref stream."""
    catalog = b"<< /Type /Catalog /Pages 2 0 R >>"
    header = b"1 %d\n" % zero_bytes
    packer = zlib.compressobj(9)
    packed = packer.compress(header)
    chunk = bytes(1 << 20)
    for _ in range(zero_bytes >> 20):
        packed += packer.compress(chunk)
    packed += packer.compress(bytes(zero_bytes & 0xFFFFF) + catalog) + packer.flush()
    return objstm_pdf(packed, len(header))


def progressive_jpeg(extra_scans: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """A progressive JPEG followed by `extra_scans` empty scans (a scan header and no data)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    at = data.rfind(b"\xff\xda")
    header = data[at : at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")]
    return data[:-2] + header * extra_scans + b"\xff\xd9"


def image_page(image: bytes, width: int, height: int, filt: bytes) -> bytes:
    xobject = b"/Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB /BitsPerComponent 8 "
    return one_page(
        b"q 100 0 0 100 0 0 cm /Im1 Do Q",
        b"<< /XObject << /Im1 5 0 R >> >>",
        o5=stream(image, xobject % (width, height) + b"/Filter /" + filt),
    )


def jpx_claiming(width: int, height: int) -> bytes:
    """A JPEG 2000 codestream header (SOC, SIZ for 3 components, EOC) claiming width x height."""
    siz = (0).to_bytes(2, "big") + b"".join(v.to_bytes(4, "big") for v in (width, height, 0, 0, 512, 512, 0, 0))
    siz += (3).to_bytes(2, "big") + b"\x07\x01\x01" * 3
    return b"\xff\x4f\xff\x51" + (len(siz) + 2).to_bytes(2, "big") + siz + b"\xff\xd9"


def jbig2_claiming(width: int, height: int) -> bytes:
    """An embedded JBIG2 stream of one page information segment for a width x height page."""
    header = (0).to_bytes(4, "big") + bytes([48, 0, 1]) + (19).to_bytes(4, "big")  # number, type, refs, page
    return header + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes(11)


def text_pdf() -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=200, height=200)
    page.insert_text((20, 40), "An ordinary page", fontsize=12)
    return doc.tobytes()


def heavy_pdf(repeats: int = 40, pages: int = 1) -> bytes:
    """Pages drawing one form of 50,000 filled rectangles `repeats` times: ~50 ms of MuPDF work per repeat
    (2 s a page at the default), from a 0.8 MB file."""
    rects = b"".join(b"%d %d 3 3 re f\n" % (i % 197, (i // 197) % 197) for i in range(50_000))
    kids = b" ".join(b"%d 0 R" % (5 + n) for n in range(pages))
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        3: stream(b"/Fm1 Do\n" * repeats),
        4: stream(rects, b"/Type /XObject /Subtype /Form /BBox [0 0 200 200]"),
    }
    for n in range(pages):
        objects[5 + n] = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] "
                          b"/Resources << /XObject << /Fm1 4 0 R >> >> /Contents 3 0 R >>")
    return build_pdf(objects)


def nested_page(depth: int = 100_000) -> bytes:
    """The page object is a dictionary nested `depth` deep: MuPDF cannot load it and draws nothing."""
    nest = b"<< /A " * depth + b"1" + b" >>" * depth
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: b"<< /Type /Page /Parent 2 0 R /X %s /MediaBox [0 0 200 200] /Contents 4 0 R >>" % nest,
        4: stream(b"0 0 1 rg 10 10 100 100 re f"),
    }
    return build_pdf(objects)


