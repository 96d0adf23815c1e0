"""Searchable PDF: the model's grounded text laid invisibly over the page it was read from.

People OCR scans to search and copy them, so, as with OCRmyPDF, the output is the page as it was
plus invisible text (render mode 3). Each block's text goes inside its box, mapped from the 0..999
grid to the page as displayed (cropbox and /Rotate applied: what the model was shown); its lines
(a paragraph written as one line is wrapped into the rows the box holds) are spread down the box
and scaled horizontally so the longest fills the box width.

For a PDF input only the OCRed pages are kept, in the order given (like `layout_pdf`, and so page
n of the result is page n of the answer). Their content streams, images, fonts and annotations keep
every byte: the page's streams are put between a ``q`` and a ``Q`` stream and one stream holding
the text follows. The result is not encrypted (the caller had the password). For an image input
each page is the image.

Font: PyMuPDF's built-in CJK font (Droid Sans Fallback: CJK, Latin, Greek, Cyrillic) with MuPDF's
built-in Noto fallbacks for the scripts it lacks (Devanagari, Thai, Hebrew, Arabic...), subset at
the end so a page costs kilobytes, not the 4 MB font. Known limits of that font machinery: Arabic
extracts as presentation forms (NFKC gives the letters back); characters no reader would extract as
themselves are left out of the layer (see `layer_text`).

Plain functions, no FastAPI. PyMuPDF is not thread-safe: call these where the PDF work runs.
"""

from __future__ import annotations

import io
import math
import re
import unicodedata
from collections.abc import Sequence

import pymupdf
from PIL import Image, ImageOps

from ocr_utils import GRID_MAX, Box, encode_png, parse_grounding, to_rgb

PageImage = Image.Image | bytes

_RTL_RE = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")
_FULL_PAGE: Box = (0, 0, GRID_MAX, GRID_MAX)
_EMBED_AS_IS = {"JPEG", "PNG"}
_MAX_PAGE_SIDE = 14400
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# Where a line may be wrapped: between words, and between CJK characters (which have no spaces).
_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+|\\s+")


_NOT_TEXT = {"Cc", "Cs", "Co", "Cn"}  # controls, surrogates, private use, unassigned


def layer_text(text: str) -> str:
    """`text` as the layer holds it: without the characters no reader extracts as themselves (MuPDF
    writes code points beyond U+FFFF truncated, reads U+FFFD back as a CJK character, and controls,
    private-use and unassigned code points have no meaning to search); tabs become spaces."""
    text = text.replace("\t", " ")
    return "".join(c for c in text if c == "\n" or (c <= "\uffef" and unicodedata.category(c) not in _NOT_TEXT))


def add_text_layer(page: pymupdf.Page, grounded_text: str) -> int:
    """Lay the blocks of one page's grounded output invisibly on `page`; returns the rows written.

    Text with no box (output of a prompt without grounding, text before the first tag, a ref with
    no det) is laid over the whole page, so it is still searchable. A block with several boxes is
    laid in their union. A table row is a line. All rows go into one new content stream.
    """
    parsed = parse_grounding(grounded_text)
    placed = [([_FULL_PAGE], parsed.preamble)] if parsed.preamble else []
    placed += [(block.boxes or [_FULL_PAGE], block.text) for block in parsed.blocks if block.text]
    font = pymupdf.Font("cjk")  # PyMuPDF's CJK font (Droid Sans Fallback), built in: no file needed
    writer = pymupdf.TextWriter(page.rect)
    count = 0
    for boxes, text in placed:
        text = layer_text(text).replace("</tr>", "</tr>\n")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            count += _lay_block(writer, page, font, _page_rect(page, boxes), lines)
    if count:
        _isolate(page)
        writer.write_text(page, render_mode=3)
    return count


def _isolate(page: pymupdf.Page) -> None:
    """Put the page's own streams (kept as they are) between a ``q`` and a ``Q`` stream: producers
    often leave a transformation in force at the end of a page, which would move the text layer.
    `wrap_contents` first balances stray Q operators."""
    if not page.get_contents():
        return
    page.wrap_contents()
    doc = page.parent
    streams = []
    for data in (b"q\n", b"\nQ\n"):
        xref = doc.get_new_xref()
        doc.update_object(xref, "<<>>")
        doc.update_stream(xref, data)
        streams.append(xref)
    refs = " ".join(f"{xref} 0 R" for xref in [streams[0], *page.get_contents(), streams[1]])
    doc.xref_set_key(page.xref, "Contents", f"[{refs}]")


def _page_rect(page: pymupdf.Page, boxes: Sequence[Box]) -> pymupdf.Rect:
    """The union of grid boxes on the displayed page (what the rendered image showed), in points."""
    sx, sy = page.rect.width / GRID_MAX, page.rect.height / GRID_MAX
    x1, y1 = min(b[0] for b in boxes) * sx, min(b[1] for b in boxes) * sy
    return pymupdf.Rect(x1, y1, max(b[2] for b in boxes) * sx, max(b[3] for b in boxes) * sy)


def _lay_block(
    writer: pymupdf.TextWriter, page: pymupdf.Page, font: pymupdf.Font, rect: pymupdf.Rect, lines: list[str]
) -> int:
    """Lay a block's rows down `rect`, each filling an equal slice from ascender to descender (so
    word boxes stay inside); returns the rows laid. One horizontal scale per block, the longest row's:
    a paragraph's short last row sits at the start of its row as on the page, not stretched across
    (where PyMuPDF would read it as part of the next row). Right-to-left rows align right."""
    extent = font.ascender - font.descender
    rows = _rows(font, lines, rect, extent)
    slot = rect.height / len(rows)
    fontsize = slot / extent
    visual = [_visual_order(writer, row) for row in rows]
    advances = [_advance(font, row, fontsize) for row in visual]
    widest = max(advances)
    if widest <= 0:
        return 0
    scale = rect.width / widest
    to_pdf, offset = _display_to_writer(page)
    turn = pymupdf.Matrix(to_pdf.a, to_pdf.b, to_pdf.c, to_pdf.d, 0, 0)
    # Glyph space is y-up and display space y-down, hence -fontsize before turning into PDF space.
    trm = pymupdf.Matrix(fontsize * scale, 0, 0, -fontsize, 0, 0) * turn
    for i, (row, source, advance) in enumerate(zip(visual, rows, advances, strict=True)):
        x = rect.x1 - advance * scale if _RTL_RE.search(source) else rect.x0
        start = pymupdf.Point(x, rect.y0 + i * slot + font.ascender * fontsize) * to_pdf - offset
        trm.e, trm.f = start.x, start.y
        pymupdf.mupdf.fz_show_string(
            writer.this, font.this, pymupdf.mupdf.FzMatrix(*trm), row, 0, 0, 0, pymupdf.mupdf.FZ_LANG_UNSET
        )
    return len(rows)


def _rows(font: pymupdf.Font, lines: list[str], rect: pymupdf.Rect, extent: float) -> list[str]:
    """A block's lines, wrapped when the box holds more rows: the model writes a paragraph as one
    line. n rows of text w wide at size 1 have size h / (n * extent) and are w * size / n wide, the
    box width when n = sqrt(w * h / (extent * width)). Rows are shared among lines by width."""
    widths = [font.text_length(line, 1) for line in lines]
    total = sum(widths)
    if total <= 0 or rect.width <= 0:
        return lines
    wanted = round(math.sqrt(total * rect.height / (extent * rect.width)))
    if wanted <= len(lines):
        return lines
    rows: list[str] = []
    for line, width in zip(lines, widths, strict=True):
        rows.extend(_wrap(font, line, max(1, round(wanted * width / total))))
    return rows


def _wrap(font: pymupdf.Font, line: str, count: int) -> list[str]:
    """`line` cut into `count` even rows between words or CJK characters: each word goes to the row
    its middle falls in (a greedy fill would leave a short extra row)."""
    tokens = _TOKEN_RE.findall(line)
    sizes = [font.text_length(token, 1) for token in tokens]
    step = sum(sizes) / count
    if count <= 1 or step <= 0:
        return [line]
    rows = [""] * count
    done = 0.0
    for token, size in zip(tokens, sizes, strict=True):
        rows[min(count - 1, int((done + size / 2) / step))] += token
        done += size
    return [row.strip() for row in rows if row.strip()]


def _visual_order(writer: pymupdf.TextWriter, line: str) -> str:
    """Right-to-left lines are written in visual order, as TextWriter.append does for them."""
    return "".join(reversed(writer.clean_rtl(line))) if _RTL_RE.search(line) else line


def _display_to_writer(page: pymupdf.Page) -> tuple[pymupdf.Matrix, pymupdf.Point]:
    """(displayed page -> PDF space, the shift TextWriter.write_text adds). The first inverts MuPDF's
    page transform, the one rendering uses (cropbox, mediabox, /Rotate). The second is subtracted so
    the two cancel; the rotation and cropbox tests hold it to PyMuPDF's behaviour."""
    ctm = pymupdf.mupdf.FzMatrix()
    pymupdf.mupdf.pdf_page_transform(page._pdf_page(), pymupdf.mupdf.FzRect(0), ctm)
    to_pdf = ~pymupdf.Matrix(ctm.a, ctm.b, ctm.c, ctm.d, ctm.e, ctm.f)
    cb, mb = page.cropbox_position, page.mediabox
    delta = page.rect.height - page.rect.width if page.rotation in (90, 270) else 0
    if bool(cb) or mb.y0 != 0 or delta != 0:
        return to_pdf, pymupdf.Point(cb.x, cb.y + mb.y0 - delta)
    return to_pdf, pymupdf.Point(0, 0)


def _advance(font: pymupdf.Font, line: str, fontsize: float) -> float:
    """Natural width of `line` at `fontsize`, fallback fonts included (measured by MuPDF itself)."""
    probe = pymupdf.TextWriter(pymupdf.Rect(0, 0, 1, 1))
    _, end = probe.append((0, 0), line, font=font, fontsize=fontsize)
    return end.x


def _finish(doc: pymupdf.Document, first_new_xref: int) -> bytes:
    _subset_own_fonts(doc, first_new_xref)
    # Only the layer's own streams are compressed: a save with deflate would rewrite the document's
    # uncompressed streams too. garbage=1 drops what unselected pages left, without renumbering.
    for xref in range(first_new_xref, doc.xref_length()):
        if doc.xref_is_stream(xref) and doc.xref_get_key(xref, "Filter")[0] == "null":
            doc.update_stream(xref, doc.xref_stream(xref), compress=True)
    return doc.tobytes(garbage=1)


_SHOWN_TO_SUBSETTER = ("Resources", "Contents", "Annots")


def _subset_own_fonts(doc: pymupdf.Document, first_new_xref: int) -> None:
    """Subset the fonts we embedded (the CJK font alone is 4 MB), and only those: MuPDF subsets every
    font the pages use, so for its run each page shows only the layer (objects from `first_new_xref`
    on): its resources, contents and annotations are swapped and then put back as they were."""
    saved: list[tuple[int, dict[str, tuple[str, str]]]] = []
    try:
        for page in doc:
            fonts = "".join(f"/{f[4]} {f[0]} 0 R" for f in page.get_fonts(full=True) if f[0] >= first_new_xref)
            layer = " ".join(f"{xref} 0 R" for xref in page.get_contents() if xref >= first_new_xref)
            saved.append((page.xref, {key: doc.xref_get_key(page.xref, key) for key in _SHOWN_TO_SUBSETTER}))
            doc.xref_set_key(page.xref, "Resources", f"<</Font<<{fonts}>>>>")
            doc.xref_set_key(page.xref, "Contents", f"[{layer}]")
            doc.xref_set_key(page.xref, "Annots", "null")
        doc.subset_fonts()
    finally:
        for page_xref, keys in saved:
            for key, (_, value) in keys.items():
                doc.xref_set_key(page_xref, key, value)  # a "null" value removes the key again


def searchable_from_pdf(pdf_bytes: bytes, pages: Sequence[tuple[int, str]], *, password: str | None = None) -> bytes:
    """The OCRed pages of a PDF, unchanged, in the order given, each with its text layer.

    `pages` holds (1-based page number, the model's grounded output for that page). Raises
    ValueError for an empty list, a page out of range or given twice, or a wrong password.
    """
    if not pages:
        raise ValueError("searchable_from_pdf needs at least one page")
    numbers = [number for number, _ in pages]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"each page may be given once, got {numbers}")
    with pymupdf.open(stream=pdf_bytes, filetype="pdf") as doc:
        if doc.needs_pass and not doc.authenticate(password or ""):
            raise ValueError("the PDF is encrypted and the password is wrong or missing")
        for number in numbers:
            if not 1 <= number <= doc.page_count:
                raise ValueError(f"page {number} is out of range: the PDF has pages 1..{doc.page_count}")
        doc.select([number - 1 for number in numbers])
        first_new_xref = doc.xref_length()
        for page, (_, text) in zip(doc, pages, strict=True):
            add_text_layer(page, text)
        return _finish(doc, first_new_xref)


def searchable_from_images(pages: Sequence[tuple[PageImage, str, int | None]]) -> bytes:
    """One page per image, the image filling it, each with its text layer.

    `pages` holds (image, grounded output, dpi). The page measures the image at `dpi`, else at the
    dpi the image records, else 72 dpi (and at most 14400 pt a side, the PDF limit). Encoded bytes
    are embedded as they are when PDF can hold them (JPEG, PNG without an EXIF rotation); anything
    else is embedded as PNG as it is displayed.
    """
    if not pages:
        raise ValueError("searchable_from_images needs at least one page")
    with pymupdf.open() as doc:
        for image, text, dpi in pages:
            if dpi is not None and dpi <= 0:
                raise ValueError(f"dpi must be positive, got {dpi}")
            stream, size, own_dpi = _page_image(image)
            # A PDF page side may not exceed 200 inches (14400 pt): a tiny recorded dpi is shrunk to fit.
            scale = min(72 / (dpi or own_dpi or 72), _MAX_PAGE_SIDE / max(size))
            page = doc.new_page(width=size[0] * scale, height=size[1] * scale)
            page.insert_image(page.rect, stream=stream)
            add_text_layer(page, text)
        return _finish(doc, 1)


def _page_image(image: PageImage) -> tuple[bytes, tuple[int, int], float | None]:
    """(bytes PDF can embed, displayed size in pixels, recorded dpi) for one page image."""
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as im:
            dpi = _recorded_dpi(im)
            if im.format in _EMBED_AS_IS and im.getexif().get(0x0112, 1) == 1:
                return image, im.size, dpi
            shown = to_rgb(ImageOps.exif_transpose(im))
        return encode_png(shown), shown.size, dpi
    return encode_png(image), image.size, _recorded_dpi(image)


def _recorded_dpi(image: Image.Image) -> float | None:
    """PNG stores pixels per metre (144 dpi reads back as 143.99): whole numbers are what was meant."""
    try:
        dpi = round(float(image.info["dpi"][0]))
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return None
    return float(dpi) if dpi >= 1 else None


__all__ = ["add_text_layer", "layer_text", "searchable_from_images", "searchable_from_pdf"]
