"""Packaging of results: image encodings, the layout PDF and ZIP archives with safe member names.

Plain functions on bytes (no FastAPI). Every ZIP member name passes `safe_member_name`, so no archive we
build can write outside its extraction directory, whatever file names clients send.
"""

from __future__ import annotations

import io
import re
import time
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import img2pdf
import zipstream
from PIL import Image

# A member's data: bytes, a file on disk (read in chunks as the ZIP is written), or chunks made as it is written.
MemberData = bytes | Path | Iterable[bytes]
CHUNK = 1 << 20


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent areas become white rather than the black that convert() gives."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "La":  # premultiplied; Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def encode_jpeg(image: Image.Image, quality: int = 95, *, dpi: float | None = None) -> bytes:
    """JPEG bytes of `image` (made RGB). With `dpi`, img2pdf sizes the page from it (else 96 dpi)."""
    buffer = io.BytesIO()
    extra = {"dpi": (dpi, dpi)} if dpi else {}
    to_rgb(image).save(buffer, format="JPEG", quality=quality, **extra)
    return buffer.getvalue()


_PNG_MODES = {"1", "L", "LA", "I;16", "P", "RGB", "RGBA"}


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of `image` (modes PNG cannot store, such as CMYK, are made RGB)."""
    buffer = io.BytesIO()
    (image if image.mode in _PNG_MODES else to_rgb(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def layout_pdf(jpeg_pages: Iterable[bytes]) -> bytes:
    """One PDF with one page per JPEG, embedded as is (no re-encoding) by img2pdf."""
    pages = list(jpeg_pages)
    if not pages:
        raise ValueError("layout_pdf needs at least one page")
    # The internal engine: with pikepdf installed img2pdf would use it, at twice the peak memory.
    return img2pdf.convert(pages, engine=img2pdf.Engine.internal)


def stream_layout_pdf(jpegs: Iterable[Path]) -> Iterator[bytes]:
    """`layout_pdf` for JPEGs on disk, written as it is read: one page per JPEG, embedded as is, sized from
    its dpi (96 without one, as img2pdf does). img2pdf holds every page until it writes; this holds one."""
    offsets: list[int] = []
    written = 0

    def obj(body: bytes) -> bytes:
        offsets.append(written)
        return f"{len(offsets)} 0 obj\n".encode() + body + b"\nendobj\n"

    paths = list(jpegs)
    if not paths:
        raise ValueError("stream_layout_pdf needs at least one page")
    # Objects: 1 catalog, 2 pages, then per page: page, image, content.
    kids = " ".join(f"{3 + 3 * n} 0 R" for n in range(len(paths)))
    head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
    written = len(head)
    first = obj(b"<< /Type /Catalog /Pages 2 0 R >>")
    written += len(first)
    second = obj(f"<< /Type /Pages /Kids [{kids}] /Count {len(paths)} >>".encode())
    written += len(second)
    yield head + first + second
    for n, path in enumerate(paths):
        with Image.open(path) as image:
            (width, height), mode = image.size, image.mode
            dpi = float((image.info.get("dpi") or (96, 96))[0]) or 96.0
        space = {"L": "/DeviceGray", "CMYK": "/DeviceCMYK"}.get(mode, "/DeviceRGB")
        w, h = width * 72 / dpi, height * 72 / dpi
        number = 3 + 3 * n
        draw = f"q {w:.4f} 0 0 {h:.4f} 0 0 cm /Im0 Do Q".encode()
        page = obj(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w:.4f} {h:.4f}] /Resources << /XObject "
                   f"<< /Im0 {number + 1} 0 R >> >> /Contents {number + 2} 0 R >>".encode())
        size = path.stat().st_size
        offsets.append(written + len(page))
        image_head = (f"{number + 1} 0 obj\n<< /Type /XObject /Subtype /Image /Width {width} /Height {height} "
                      f"/ColorSpace {space} /BitsPerComponent 8 /Filter /DCTDecode /Length {size} >>\n"
                      "stream\n").encode()
        yield page + image_head
        written += len(page) + len(image_head)
        for chunk in _chunks(path):
            written += len(chunk)
            yield chunk
        tail = b"\nendstream\nendobj\n"
        written += len(tail)
        yield tail
        content = obj(f"<< /Length {len(draw)} >>\nstream\n".encode() + draw + b"\nendstream")
        written += len(content)
        yield content
    xref = [f"xref\n0 {len(offsets) + 1}\n0000000000 65535 f \n".encode()]
    xref += [f"{o:010d} 00000 n \n".encode() for o in offsets]
    trailer = f"trailer\n<< /Size {len(offsets) + 1} /Root 1 0 R >>\nstartxref\n{written}\n%%EOF\n"
    yield b"".join(xref) + trailer.encode()


# ---------------------------------------------------------------------------------------- ZIP


_UNSAFE_CHARS_RE = re.compile(r'[\\:*?"<>|]')
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{d}" for p in ("com", "lpt") for d in range(1, 10)}
_MAX_PART = 100
_MAX_EXT = 16


def _safe_part(part: str) -> str:
    # Control and format characters (NUL, newlines, bidi overrides) can disguise a name; drop them.
    part = "".join(ch for ch in part if not unicodedata.category(ch).startswith("C"))
    # Backslash and drive colons are separators on Windows extractors: neutralise, never split on them.
    part = _UNSAFE_CHARS_RE.sub("_", part).strip().lstrip(".").rstrip(". ")
    if part.split(".")[0].lower() in _WINDOWS_RESERVED:
        part = "_" + part
    stem, dot, ext = part.rpartition(".")
    if not dot or not stem or len(ext) > _MAX_EXT:
        return part[:_MAX_PART]
    return stem[: _MAX_PART - len(ext) - 1] + "." + ext


def safe_member_name(name: str, used: set[str]) -> str:
    """A ZIP member name that extracts inside the target directory, unique within `used`.

    ``/`` separates folders (our own names are ``images/0.jpg``); empty, ``.`` and ``..`` parts are
    dropped, so absolute and parent paths become relative; backslashes, drive colons and other
    characters Windows rejects become ``_``; control characters are removed; parts are capped at
    100 characters keeping the extension. An empty result becomes ``file``. Names compare
    case-insensitively (case-insensitive file systems); a taken name gets ``-1``, ``-2``... before
    its extension. `used` holds the casefolded names taken so far and is updated.
    """
    parts = [p for p in (_safe_part(p) for p in name.split("/")) if p]
    candidate = "/".join(parts[-8:]) or "file"  # a bounded depth: the ZIP is ours, not a tree copy
    folder, slash, base = candidate.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        stem, dot, ext = base, "", ""
    counter = 0
    while candidate.casefold() in used:
        counter += 1
        candidate = f"{folder}{slash}{stem}-{counter}{dot}{ext}"
    used.add(candidate.casefold())
    return candidate


def build_zip(members: Iterable[tuple[str, MemberData]]) -> bytes:
    """A deflated ZIP of (name, data) pairs, in memory (sync answers, whose results are in memory anyway).
    Every name goes through `safe_member_name` here, so a caller cannot produce an unsafe archive; read the
    final names back from the archive if needed.
    """
    used: set[str] = set()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(safe_member_name(name, used), date_time=_zip_time())
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16  # a regular file readable by all, as a user expects
            if isinstance(data, bytes):
                archive.writestr(info, data)
                continue
            with archive.open(info, "w") as out:
                for chunk in _chunks(data):
                    out.write(chunk)
    return buffer.getvalue()


def stream_zip(members: Iterable[tuple[str, MemberData]]) -> Iterator[bytes]:
    """The same ZIP as `build_zip`, made as it is sent: files are read from disk in 1 MiB chunks and deflated on
    the way, so memory holds one chunk, never the archive (four downloads of a 150-page job's 490 MB ZIP built
    in memory took the server from 2.5 to 6.8 GB). A blocking iterator: Starlette runs it in its thread pool."""
    used: set[str] = set()
    archive = zipstream.ZipStream(compress_type=zipstream.ZIP_DEFLATED)
    for name, data in members:
        archive.add(_chunks(data), safe_member_name(name, used))
    yield from archive


def _chunks(data: MemberData) -> Iterator[bytes]:
    if isinstance(data, bytes):
        yield data
    elif isinstance(data, Path):
        with data.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    else:
        yield from data


def _zip_time() -> tuple[int, int, int, int, int, int]:
    now = time.localtime()
    # ZIP timestamps start in 1980; a clock set earlier would make ZipInfo raise.
    return (max(now.tm_year, 1980), now.tm_mon, now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec)


# ------------------------------------------------------------------------------ names of downloads

SUMMARY_MEMBER = "summary.json"
MAX_STEM = 80  # leaves room for "_det.md" / ".error.json" under the 100-character part cap


def download_stem(filename: str | None) -> str:
    """The upload's name without folder or extension, safe as a ZIP member and file name."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return safe_member_name(PurePosixPath(base).stem or "document", set()).replace("/", "_")


def stem_members(stem: str) -> tuple[str, str, str, str]:
    return f"{stem}.md", f"{stem}_det.md", f"{stem}.error.json", f"{stem}_searchable.pdf"


def member_stems(filenames: list[str]) -> list[str]:
    """One stem per file, distinct (case-insensitively) and safe, at the ZIP's root.

    Each name goes through `safe_member_name` (no absolute paths, `..`, backslashes or control
    characters), is flattened (folders become `_`, so `{stem}.md` sits beside `images/` and its links resolve)
    and loses its extension. A stem is taken only when all of its members are free: `x_det.png` must not
    overwrite the `x_det.md` of `x.png`. Crops `images/{stem}_{n}.jpg` of distinct stems never collide.
    """
    used: set[str] = {SUMMARY_MEMBER}
    stems: list[str] = []
    for index, name in enumerate(filenames):
        flat = safe_member_name(name or f"file_{index}", set()).replace("/", "_")
        candidate = (flat.rpartition(".")[0] or flat)[:MAX_STEM].rstrip(". ") or f"file_{index}"
        while True:
            stem = safe_member_name(f"{candidate}.md", used).removesuffix(".md")
            others = [m.casefold() for m in stem_members(stem)[1:]]
            if not used.intersection(others):
                used.update(others)
                stems.append(stem)
                break
    return stems
