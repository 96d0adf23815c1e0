"""Tests for searchable_pdf: scanned pages with known text at known places, a replay of the grounded
answer the model would give for them, and word extraction from the result with PyMuPDF and poppler.

The scans are made by rendering PyMuPDF text to an image, so the original pages hold no text of their
own and every extracted word comes from the layer under test. A block's box is the grid box around its
words as the rendered page shows them, which is what the model is trained to answer.
"""

from __future__ import annotations

import html
import io
import math
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pymupdf
import pytest
from PIL import Image

from ocr_utils import GRID_MAX, plain_text
from outputs import searchable as sp

LATIN_PAGES = [
    [["Quarterly Report 2024"], ["Revenue grew by twelve percent", "while costs stayed flat"]],
    [["Section two: methods"], ["We sampled 300 invoices", "from 12 offices", "in three regions"]],
    [["Appendix"], ["Tables follow; figures (in EUR) are rounded."]],
]
CHINESE_PAGES = [
    [["年度报告"], ["营业收入增长百分之十二", "成本保持 稳定"]],
    [["第二部分 方法"], ["我们抽取了 300 张发票"]],
    [["附录"], ["表格如下 数据已四舍五入"]],
]
TOLERANCE = 2.0  # points: grid rounding of the box is up to 1/999 of the page side


@dataclass
class ScanPage:
    """One scanned page: PNG of what is displayed, its size in points, and the replayed answer."""

    png: bytes
    width: float
    height: float
    boxes: list[tuple[int, int, int, int]]
    lines: list[list[str]]

    @property
    def grounded(self) -> str:
        parts = []
        for box, lines in zip(self.boxes, self.lines, strict=True):
            label = "title" if len(lines) == 1 and len(lines[0]) < 25 else "text"
            parts.append(f"<|ref|>{label}<|/ref|><|det|>[[{', '.join(map(str, box))}]]<|/det|>\n" + "\n".join(lines))
        return "\n\n".join(parts) + "\n"


def scan(blocks: list[list[str]], *, width: float = 595, height: float = 842, dpi: int = 100) -> ScanPage:
    """Write `blocks` on a page, record each block's grid box from its words, render it to PNG."""
    font = pymupdf.Font("cjk")
    with pymupdf.open() as doc:
        page = doc.new_page(width=width, height=height)
        writer = pymupdf.TextWriter(page.rect)
        y = 90.0
        spans: list[tuple[float, float]] = []
        for i, lines in enumerate(blocks):
            size = 22 if i == 0 else 13
            top = y
            for line in lines:
                y += size * 1.3
                writer.append((72, y), line, font=font, fontsize=size)
            spans.append((top, y + size * 0.4))
            y += 30
        writer.write_text(page)
        words = page.get_text("words")
        boxes = []
        for top, bottom in spans:
            rects = [pymupdf.Rect(w[:4]) for w in words if top <= (w[1] + w[3]) / 2 <= bottom]
            union = rects[0]
            for r in rects[1:]:
                union |= r
            boxes.append(to_grid(union, width, height))
        png = page.get_pixmap(dpi=dpi).tobytes("png")
    return ScanPage(png, width, height, boxes, blocks)


def to_grid(rect: pymupdf.Rect, width: float, height: float) -> tuple[int, int, int, int]:
    return (
        math.floor(rect.x0 / width * GRID_MAX),
        math.floor(rect.y0 / height * GRID_MAX),
        math.ceil(rect.x1 / width * GRID_MAX),
        math.ceil(rect.y1 / height * GRID_MAX),
    )


def box_rect(box: Sequence[int], page: pymupdf.Page) -> pymupdf.Rect:
    w, h = page.rect.width, page.rect.height
    return pymupdf.Rect(box[0] / GRID_MAX * w, box[1] / GRID_MAX * h, box[2] / GRID_MAX * w, box[3] / GRID_MAX * h)


def scanned_pdf(pages: list[ScanPage], *, photo_on: int = 1, rotation: int = 0, password: str | None = None) -> bytes:
    """A PDF whose pages show the scans upright, a photo and a vector line on page `photo_on`.

    With `rotation`, each scan is stored turned back by that angle and the page carries /Rotate, as
    a scanner that saves sideways pages does; the displayed page is the upright scan.
    """
    with pymupdf.open() as doc:
        for n, scan_page in enumerate(pages):
            sideways = rotation in (90, 270)
            w, h = (scan_page.height, scan_page.width) if sideways else (scan_page.width, scan_page.height)
            page = doc.new_page(width=w, height=h)
            page.insert_image(page.rect, stream=scan_page.png, rotate=-rotation % 360)
            if n == photo_on:
                page.insert_image(pymupdf.Rect(380, 600, 540, 720), stream=photo_png())
                page.draw_line((72, 780), (520, 780), color=(0.2, 0.2, 0.8), width=2)
                leave_transform(doc, page)
            page.set_rotation(rotation)
        if password:
            return doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw=password, user_pw=password)
        return doc.tobytes()


def leave_transform(doc: pymupdf.Document, page: pymupdf.Page) -> None:
    """End the page with a top-level ``cm`` left in force, as many producers do: it draws nothing,
    but text appended after it without isolation would be moved and scaled."""
    xref = doc.get_new_xref()
    doc.update_object(xref, "<<>>")
    doc.update_stream(xref, b"2 0 0 2 100 -50 cm\n")
    refs = " ".join(f"{x} 0 R" for x in [*page.get_contents(), xref])
    doc.xref_set_key(page.xref, "Contents", f"[{refs}]")


def photo_png() -> bytes:
    y, x = np.mgrid[0:90, 0:120]
    pixels = np.stack([(x * 7) % 256, (y * 5) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- extraction


def mupdf_words(page: pymupdf.Page) -> list[tuple[pymupdf.Rect, str]]:
    """Words in displayed-page coordinates (PyMuPDF reports them on the unrotated page)."""
    return [(pymupdf.Rect(w[:4]) * page.rotation_matrix, w[4]) for w in page.get_text("words")]


_WORD_RE = re.compile(r'<word xMin="([-\d.]+)" yMin="([-\d.]+)" xMax="([-\d.]+)" yMax="([-\d.]+)">([^<]*)</word>')


def poppler_words(pdf: bytes, tmp_path, number: int) -> list[tuple[pymupdf.Rect, str]]:
    """Words of 1-based page `number` from `pdftotext -bbox`, on the displayed (cropped) page."""
    path = tmp_path / "out.pdf"
    path.write_bytes(pdf)
    args = ["pdftotext", "-bbox", "-cropbox", "-f", str(number), "-l", str(number), str(path), "-"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [(pymupdf.Rect(*map(float, m[:4])), html.unescape(m[4])) for m in _WORD_RE.findall(out)]


def check_words(words: list[tuple[pymupdf.Rect, str]], page: pymupdf.Page, scan_page: ScanPage, tool: str) -> None:
    """Every word of every block is found, in order, inside its block's box; no word is anywhere else."""
    left = list(words)
    for box, lines in zip(scan_page.boxes, scan_page.lines, strict=True):
        area = box_rect(box, page)
        mine = [(r, t) for r, t in left if area.contains((r.tl + r.br) / 2)]
        left = [item for item in left if item not in mine]
        mine.sort(key=lambda item: (round((item[0].y0 + item[0].y1) / 2), item[0].x0))
        expected = [word for line in lines for word in line.split()]
        assert "".join(t for _, t in mine) == "".join(expected), (tool, area, mine, expected)
        if all(t.isascii() for t in expected):
            assert [t for _, t in mine] == expected, (tool, mine)
        grown = pymupdf.Rect(area.x0 - TOLERANCE, area.y0 - TOLERANCE, area.x1 + TOLERANCE, area.y1 + TOLERANCE)
        outside = [(r, t) for r, t in mine if not grown.contains(r)]
        assert not outside, (tool, area, outside)
    assert not left, (tool, "words outside every block", left)


def content_of(doc: pymupdf.Document, page: pymupdf.Page) -> tuple[list[bytes], list[bytes]]:
    """(decoded content streams, image bytes) of a page, to compare before and after."""
    streams = [doc.xref_stream(xref) for xref in page.get_contents()]
    images = [doc.extract_image(info[0])["image"] for info in page.get_images(full=True)]
    return streams, images


def check_original_kept(source: bytes, result: bytes, numbers: list[int], password: str | None = None) -> None:
    with pymupdf.open(stream=source) as before, pymupdf.open(stream=result) as after:
        if password:
            before.authenticate(password)
        assert not after.needs_pass
        assert after.page_count == len(numbers)
        for out_page, number in zip(after, numbers, strict=True):
            old_page = before[number - 1]
            old_streams, old_images = content_of(before, old_page)
            new_streams, new_images = content_of(after, out_page)
            # The original streams, unchanged, between streams of only q / only Q; then the invisible text.
            start = next(i for i, data in enumerate(new_streams) if data == old_streams[0])
            end = start + len(old_streams)
            wrap_before, kept, wrap_after = new_streams[:start], new_streams[start:end], new_streams[end:-1]
            assert kept == old_streams
            # The same objects (numbers kept), byte for byte as stored, not only once decoded.
            old_xrefs, new_xrefs = old_page.get_contents(), out_page.get_contents()[start:end]
            assert new_xrefs == old_xrefs
            assert [after.xref_stream_raw(x) for x in new_xrefs] == [before.xref_stream_raw(x) for x in old_xrefs]
            assert wrap_before and all(set(data.split()) == {b"q"} for data in wrap_before), wrap_before
            assert wrap_after and all(set(data.split()) == {b"Q"} for data in wrap_after), wrap_after
            assert sum(d.count(b"q") for d in wrap_before) == sum(d.count(b"Q") for d in wrap_after)
            assert b"3 Tr" in new_streams[-1] and b"BT" in new_streams[-1]
            assert new_images == old_images
            assert [i[0] for i in out_page.get_images()] == [i[0] for i in old_page.get_images()]
            assert (out_page.rect, out_page.rotation) == (old_page.rect, old_page.rotation)
            assert out_page.get_pixmap(dpi=30).samples == old_page.get_pixmap(dpi=30).samples  # invisible


def needs_poppler() -> None:
    if shutil.which("pdftotext") is None:
        pytest.fail("pdftotext is missing: install poppler-utils (apt-get install -y poppler-utils)")


# --------------------------------------------------------------------------- PDF input


@pytest.mark.parametrize("texts", [LATIN_PAGES, CHINESE_PAGES], ids=["latin", "chinese"])
def test_pdf_pages_get_a_text_layer_in_their_boxes(texts, tmp_path) -> None:
    needs_poppler()
    scans = [scan(blocks) for blocks in texts]
    source = scanned_pdf(scans)
    result = sp.searchable_from_pdf(source, [(n + 1, s.grounded) for n, s in enumerate(scans)])
    check_original_kept(source, result, [1, 2, 3])
    with pymupdf.open(stream=result) as doc:
        for n, (page, scan_page) in enumerate(zip(doc, scans, strict=True)):
            check_words(mupdf_words(page), page, scan_page, "pymupdf")
            check_words(poppler_words(result, tmp_path, n + 1), page, scan_page, "pdftotext")
            # The page's text is the answer's plain text, line for line.
            assert page.get_text().split() == plain_text(scan_page.grounded).split()


def test_only_the_ocred_pages_are_kept_in_the_order_given(tmp_path) -> None:
    needs_poppler()
    scans = [scan(blocks) for blocks in LATIN_PAGES]
    source = scanned_pdf(scans, password="s3cret")
    result = sp.searchable_from_pdf(source, [(3, scans[2].grounded), (2, scans[1].grounded)], password="s3cret")
    check_original_kept(source, result, [3, 2], password="s3cret")
    with pymupdf.open(stream=result) as doc:
        for n, (page, scan_page) in enumerate(zip(doc, [scans[2], scans[1]], strict=True)):
            check_words(mupdf_words(page), page, scan_page, "pymupdf")
            check_words(poppler_words(result, tmp_path, n + 1), page, scan_page, "pdftotext")


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_pages_get_the_text_where_the_rendered_page_shows_it(rotation, tmp_path) -> None:
    needs_poppler()
    scans = [scan(LATIN_PAGES[0]), scan(CHINESE_PAGES[0])]
    source = scanned_pdf(scans, rotation=rotation, photo_on=-1)
    with pymupdf.open(stream=source) as doc:  # the set-up itself: the displayed page is the upright scan
        shown = np.asarray(Image.open(io.BytesIO(doc[0].get_pixmap(dpi=100).tobytes("png"))), dtype=float)
        upright = np.asarray(Image.open(io.BytesIO(scans[0].png)).convert("RGB"), dtype=float)
        assert shown.shape == upright.shape and np.abs(shown - upright).mean() < 2
    result = sp.searchable_from_pdf(source, [(1, scans[0].grounded), (2, scans[1].grounded)])
    check_original_kept(source, result, [1, 2])
    with pymupdf.open(stream=result) as doc:
        for n, (page, scan_page) in enumerate(zip(doc, scans, strict=True)):
            assert page.rotation == rotation
            check_words(mupdf_words(page), page, scan_page, "pymupdf")
            check_words(poppler_words(result, tmp_path, n + 1), page, scan_page, "pdftotext")


def test_cropped_page_uses_the_displayed_box(tmp_path) -> None:
    needs_poppler()
    scan_page = scan(LATIN_PAGES[1])
    # The scan is placed 40 pt right and 60 pt down of a larger page whose cropbox shows just the scan.
    with pymupdf.open() as doc:
        page = doc.new_page(width=scan_page.width + 100, height=scan_page.height + 100)
        shown = pymupdf.Rect(40, 60, 40 + scan_page.width, 60 + scan_page.height)
        page.insert_image(shown, stream=scan_page.png)
        page.set_cropbox(shown)
        source = doc.tobytes()
    result = sp.searchable_from_pdf(source, [(1, scan_page.grounded)])
    check_original_kept(source, result, [1])
    with pymupdf.open(stream=result) as doc:
        check_words(mupdf_words(doc[0]), doc[0], scan_page, "pymupdf")
        check_words(poppler_words(result, tmp_path, 1), doc[0], scan_page, "pdftotext")


def test_bad_page_lists_and_passwords_are_refused() -> None:
    scans = [scan(LATIN_PAGES[2])]
    source = scanned_pdf(scans, password="pw", photo_on=-1)
    with pytest.raises(ValueError, match="password"):
        sp.searchable_from_pdf(source, [(1, "x")], password="wrong")
    with pytest.raises(ValueError, match="out of range"):
        sp.searchable_from_pdf(source, [(2, "x")], password="pw")
    with pytest.raises(ValueError, match="once"):
        sp.searchable_from_pdf(source, [(1, "x"), (1, "y")], password="pw")
    with pytest.raises(ValueError, match="at least one"):
        sp.searchable_from_pdf(source, [], password="pw")


# --------------------------------------------------------------------------- image input


def test_image_pages_are_the_images_with_the_text_layer(tmp_path) -> None:
    needs_poppler()
    latin, chinese = scan(LATIN_PAGES[0], dpi=144), scan(CHINESE_PAGES[1])
    as_pil = Image.open(io.BytesIO(latin.png)).convert("RGB")
    buffer = io.BytesIO()
    Image.open(io.BytesIO(chinese.png)).save(buffer, format="PNG")  # saved without a dpi
    no_dpi = buffer.getvalue()
    pages = [(as_pil, latin.grounded, 144), (no_dpi, chinese.grounded, None), (latin.png, latin.grounded, None)]
    result = sp.searchable_from_images(pages)
    with pymupdf.open(stream=result) as doc:
        assert doc.page_count == 3
        # Page size: the image at the dpi given, else at the dpi it records (144 here), else 72 dpi.
        assert doc[0].rect == pymupdf.Rect(0, 0, as_pil.width / 2, as_pil.height / 2)
        assert doc[1].rect == pymupdf.Rect(0, 0, *Image.open(io.BytesIO(no_dpi)).size)
        assert doc[2].rect == doc[0].rect
        for n, (page, scan_page) in enumerate(zip(doc, [latin, chinese, latin], strict=True)):
            ((xref, *_),) = page.get_images()
            embedded = Image.open(io.BytesIO(doc.extract_image(xref)["image"])).convert("RGB")
            original = Image.open(io.BytesIO(scan_page.png)).convert("RGB")
            assert np.array_equal(np.asarray(embedded), np.asarray(original))  # the page is the image
            assert page.get_image_rects(xref) == [page.rect]
            check_words(mupdf_words(page), page, scan_page, "pymupdf")
            check_words(poppler_words(result, tmp_path, n + 1), page, scan_page, "pdftotext")


def test_text_without_boxes_is_laid_over_the_whole_page() -> None:
    image = Image.new("RGB", (400, 300), "white")
    result = sp.searchable_from_images([(image, "Plain answer without grounding\nsecond line", None)])
    with pymupdf.open(stream=result) as doc:
        assert doc[0].get_text().split() == ["Plain", "answer", "without", "grounding", "second", "line"]
        for rect, _ in mupdf_words(doc[0]):
            assert rect in doc[0].rect + (-TOLERANCE, -TOLERANCE, TOLERANCE, TOLERANCE)


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def test_many_scripts_are_extractable(tmp_path) -> None:
    needs_poppler()
    lines = ["Grüße café naïve", "Привет мир", "Ελληνικά", "日本語 かな", "한국어", "שלום עולם", "नमस्ते", "∑ x² ≤ 10"]
    lines.append("مرحبا بالعالم")  # extracted as presentation forms: equal after NFKC (see the module docstring)
    image = Image.new("RGB", (800, 600), "white")
    grounded = "<|ref|>text<|/ref|><|det|>[[50, 50, 950, 950]]<|/det|>\n" + "\n".join(lines)
    result = sp.searchable_from_images([(image, grounded, None)])
    with pymupdf.open(stream=result) as doc:
        assert [nfkc(line) for line in doc[0].get_text().splitlines()] == [nfkc(line) for line in lines]
    path = tmp_path / "scripts.pdf"
    path.write_bytes(result)
    text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True, check=True).stdout
    # poppler marks a right-to-left run with U+202B ... U+202C
    assert [nfkc(line.strip("\u202b\u202c")) for line in text.splitlines() if line.strip()] == [nfkc(x) for x in lines]
    assert len(result) < 600_000  # fonts are subset, not the 4 MB CJK font


def reachable(doc: pymupdf.Document, xref: int) -> dict[int, tuple[str, bytes | None]]:
    """Every object reachable from `xref`, with its dictionary and decoded stream."""
    seen: dict[int, tuple[str, bytes | None]] = {}
    todo = [xref]
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        source = doc.xref_object(x, compressed=True)
        seen[x] = (source, doc.xref_stream(x) if doc.xref_is_stream(x) else None)
        todo.extend(int(n) for n in re.findall(r"(\d+) 0 R", source))
    return seen


def test_the_documents_own_fonts_and_fields_are_not_touched() -> None:
    """A born-digital page: its fully embedded font and its form field keep every byte (only the
    layer's fonts are subset) and it renders as before."""
    with pymupdf.open() as doc:
        page = doc.new_page()
        page.insert_font(fontname="Orig", fontbuffer=pymupdf.Font("cjk").buffer)
        page.insert_text((72, 100), "Original text 原文", fontname="Orig", fontsize=14)
        field = pymupdf.Widget()
        field.field_name, field.field_type, field.field_value = "name", pymupdf.PDF_WIDGET_TYPE_TEXT, "Ada"
        field.rect = pymupdf.Rect(72, 200, 300, 230)
        page.add_widget(field)
        source = doc.tobytes()
    grounded = "<|ref|>text<|/ref|><|det|>[[120, 100, 400, 130]]<|/det|>\nOriginal text 原文"
    result = sp.searchable_from_pdf(source, [(1, grounded)])
    assert len(result) < len(source) + 100_000  # the layer's copy of the CJK font is a subset
    with pymupdf.open(stream=source) as before, pymupdf.open(stream=result) as after:
        own = [f[0] for f in before[0].get_fonts(full=True)]
        assert own and {f[0] for f in after[0].get_fonts(full=True)} > set(own)
        for xref in own:
            assert reachable(after, xref) == reachable(before, xref)
        widgets = [(w.field_name, w.field_value, w.rect) for w in after[0].widgets()]
        assert widgets == [(w.field_name, w.field_value, w.rect) for w in before[0].widgets()]
        annots = after.xref_get_key(after[0].xref, "Annots")
        assert annots == before.xref_get_key(before[0].xref, "Annots"), annots
        assert after[0].get_pixmap(dpi=40).samples == before[0].get_pixmap(dpi=40).samples
        assert after[0].get_text().count("Original text 原文") == 2  # the page's own text and the layer


PARAGRAPH = [
    "Recurrent neural networks have been firmly established",
    "as state of the art approaches in sequence",
    "modeling and transduction problems such as",
]
PARAGRAPH_ZH = [
    "循环神经网络已被牢固确立为序列建模",
    "和转导问题的最先进方法例如语言建模",
    "和机器翻译此后许多工作继续推进",
]


@pytest.mark.parametrize(("rows", "joiner"), [(PARAGRAPH, " "), (PARAGRAPH_ZH, "")], ids=["latin", "chinese"])
def test_a_paragraph_written_as_one_line_is_wrapped_into_the_rows_the_page_shows(rows, joiner, tmp_path) -> None:
    """The model writes a paragraph as one line; the layer puts it back on as many rows as the scan."""
    needs_poppler()
    shown = scan([["Title"], rows])
    answer = ScanPage(shown.png, shown.width, shown.height, shown.boxes, [["Title"], [joiner.join(rows)]])
    result = sp.searchable_from_images([(shown.png, answer.grounded, 72)])
    with pymupdf.open(stream=result) as doc:
        page = doc[0]
        check_words(mupdf_words(page), page, answer, "pymupdf")
        check_words(poppler_words(result, tmp_path, 1), page, answer, "pdftotext")
        area = box_rect(shown.boxes[1], page)
        layer = [(r, t) for r, t in mupdf_words(page) if area.contains((r.tl + r.br) / 2)]
        slot = area.height / len(rows)
        placed = "".join(str(int(((r.y0 + r.y1) / 2 - area.y0) // slot)) * len(t) for r, t in layer)
        truth = "".join(str(i) * len(row.replace(" ", "")) for i, row in enumerate(rows))
        assert sorted(set(placed)) == ["0", "1", "2"], placed
        # Each character sits on the row the page shows it on, give or take the word at a row's end.
        assert sum(a == b for a, b in zip(placed, truth, strict=True)) >= 0.85 * len(truth), (placed, truth)


def test_table_rows_are_lines_and_a_rotated_photo_is_shown_as_displayed() -> None:
    """A phone photo with EXIF orientation 6 is stored landscape and shown portrait: the page is the
    portrait image the model saw, and a table the model wrote as one line of HTML is laid row by row."""
    portrait = Image.new("RGB", (300, 400), "white")
    portrait.paste((200, 30, 30), (0, 0, 300, 100))  # a red band at the top, to see which way is up
    stored = portrait.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote (400 x 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    table = "<table><tr><td>Name</td><td>Total</td></tr><tr><td>Ada</td><td>42</td></tr></table>"
    grounded = f"<|ref|>table<|/ref|><|det|>[[100, 300, 900, 600]]<|/det|>\n{table}"
    result = sp.searchable_from_images([(buffer.getvalue(), grounded, None)])
    with pymupdf.open(stream=result) as doc:
        page = doc[0]
        assert page.rect == pymupdf.Rect(0, 0, 300, 400)
        top = page.get_pixmap(clip=pymupdf.Rect(0, 0, 300, 50)).pixel(150, 25)
        assert top[0] > 150 and top[1] < 100, top  # red band on top: shown as displayed
        assert page.get_text().splitlines() == [
            "<table><tr><td>Name</td><td>Total</td></tr>",
            "<tr><td>Ada</td><td>42</td></tr>",
            "</table>",
        ]
    with pytest.raises(ValueError, match="dpi"):
        sp.searchable_from_images([(portrait, grounded, 0)])


@pytest.mark.parametrize(("mediabox", "rotation"), [("[100 200 695 1042]", 90), ("[0 -842 595 0]", 180)])
def test_mediabox_away_from_the_origin(mediabox, rotation, tmp_path) -> None:
    needs_poppler()
    shown = scan(LATIN_PAGES[2])
    with pymupdf.open() as doc:
        doc.new_page(width=595, height=842)
        doc.xref_set_key(doc[0].xref, "MediaBox", mediabox)
        doc[0].set_rotation(rotation)
        doc[0].draw_rect(pymupdf.Rect(10, 10, 100, 100), color=(0, 0, 1))
        source = doc.tobytes()
    result = sp.searchable_from_pdf(source, [(1, shown.grounded)])
    check_original_kept(source, result, [1])
    with pymupdf.open(stream=result) as doc:
        check_words(mupdf_words(doc[0]), doc[0], shown, "pymupdf")
        check_words(poppler_words(result, tmp_path, 1), doc[0], shown, "pdftotext")


def test_a_page_without_text_is_kept_as_it_is() -> None:
    """A page whose OCR failed or found nothing (empty answer) is kept, with no layer; a blank page
    (no content stream at all) still gets one."""
    with pymupdf.open() as doc:
        doc.new_page().draw_rect(pymupdf.Rect(10, 10, 100, 100), color=(0, 0, 1))
        doc.new_page()
        source = doc.tobytes()
    grounded = "<|ref|>text<|/ref|><|det|>[[100, 100, 500, 200]]<|/det|>\nHello blank page"
    result = sp.searchable_from_pdf(source, [(1, ""), (2, grounded)])
    with pymupdf.open(stream=source) as before, pymupdf.open(stream=result) as after:
        assert content_of(after, after[0]) == content_of(before, before[0])
        assert after[0].get_text() == "" and after[0].get_fonts() == []
        assert before[1].get_contents() == []
        assert after[1].get_text().split() == ["Hello", "blank", "page"]


def test_characters_no_reader_extracts_are_left_out(tmp_path) -> None:
    """Random model output (the tiny checkpoint's) holds U+FFFD, controls, emoji: the layer keeps
    what extracts as itself, and both extractors give back exactly `layer_text` of the answer."""
    needs_poppler()
    lines = ["smile 😀 ok", "bad \ufffd\x01 bytes", "private \ue000 use", "math 𝑥 and 𠀀 here", "tab\tzero\u200bwidth"]
    grounded = "<|ref|>text<|/ref|><|det|>[[50, 50, 950, 950]]<|/det|>\n" + "\n".join(lines)
    expected = sp.layer_text("\n".join(lines)).split()
    assert expected == [
        "smile",
        "ok",
        "bad",
        "bytes",
        "private",
        "use",
        "math",
        "and",
        "here",
        "tab",
        "zero\u200bwidth",
    ]
    result = sp.searchable_from_images([(Image.new("RGB", (600, 400), "white"), grounded, None)])
    with pymupdf.open(stream=result) as doc:
        assert doc[0].get_text().split() == expected
    path = tmp_path / "odd.pdf"
    path.write_bytes(result)
    text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True, check=True).stdout
    assert text.split() == expected
