"""Tests for ocr_utils: a hand-written corpus of grounded model outputs, plus images, PDF and ZIP output."""

from __future__ import annotations

import io
import json
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image

import ocr_utils as ou

CORPUS = Path(__file__).parent / "data" / "grounding"
CASES = sorted(p.stem for p in CORPUS.glob("*.txt"))
LINK_RE = re.compile(r"!\[\]\((images/[^)]+)\)")


def load_case(name: str) -> tuple[str, dict]:
    raw = (CORPUS / f"{name}.txt").read_text(encoding="utf-8")
    expected = json.loads((CORPUS / f"{name}.expected.json").read_text(encoding="utf-8"))
    return raw, expected


def as_plain(parsed: ou.ParsedOutput) -> list[dict]:
    return [{"label": b.label, "boxes": [list(x) for x in b.boxes], "text": b.text} for b in parsed.blocks]


def gradient(width: int, height: int) -> Image.Image:
    """An image whose pixels differ by position, so a wrong crop or a stray change shows."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([(x * 7) % 256, (y * 5) % 256, (x + y) % 256], axis=-1).astype(np.uint8))


# --------------------------------------------------------------------------- corpus


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 20
    for name in CASES:
        assert (CORPUS / f"{name}.expected.json").is_file(), f"{name} has no expected output"


@pytest.mark.parametrize("name", CASES)
def test_corpus_parse(name: str) -> None:
    raw, expected = load_case(name)
    parsed = ou.parse_grounding(raw)
    assert as_plain(parsed) == expected["blocks"], parsed.warnings
    assert [b.index for b in parsed.blocks] == list(range(len(parsed.blocks)))
    assert len(parsed.warnings) == expected["warnings"], parsed.warnings
    if "preamble" in expected:
        assert parsed.preamble == expected["preamble"]


@pytest.mark.parametrize("name", CASES)
def test_corpus_markdown_and_text(name: str) -> None:
    raw, expected = load_case(name)
    markdown = ou.to_markdown(raw, page=expected.get("page"))
    assert markdown == expected["markdown"], markdown
    text = ou.plain_text(raw)
    if "plain_text" in expected:
        assert text == expected["plain_text"], text
    for out in (markdown, text):
        for token in ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<｜end▁of▁sentence｜>"):
            assert token not in out
    assert "![](" not in text


@pytest.mark.parametrize("name", CASES)
def test_corpus_crops_match_links(name: str) -> None:
    raw, expected = load_case(name)
    page = expected.get("page")
    crops = ou.crop_images(gradient(64, 48), ou.parse_grounding(raw), page=page)
    names = [c.name for c in crops]
    assert names == LINK_RE.findall(ou.to_markdown(raw, page=page))
    if "crops" in expected:
        assert names == expected["crops"]


# --------------------------------------------------------------------------- parser robustness


def test_parse_never_evaluates_and_reports_why() -> None:
    parsed = ou.parse_grounding("<|ref|>text<|/ref|><|det|>[[__import__('os'), 1, 2, 3]]<|/det|>x")
    assert parsed.blocks[0].boxes == []
    assert any("non-number" in w for w in parsed.warnings)


def test_label_spanning_lines_spills_into_content() -> None:
    parsed = ou.parse_grounding("<|ref|>text\nA paragraph the model wrote.<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>")
    assert [(b.label, b.text, b.boxes) for b in parsed.blocks] == [
        ("text", "A paragraph the model wrote.", [(1, 2, 3, 4)])
    ]
    assert len(parsed.warnings) == 1


def test_empty_and_overlong_labels() -> None:
    parsed = ou.parse_grounding(f"<|ref|><|/ref|><|det|>[[1, 2, 3, 4]]<|/det|><|ref|>{'L' * 500}<|/ref|>x")
    assert [b.label for b in parsed.blocks] == ["unknown", "L" * ou.MAX_LABEL_CHARS]
    assert len(parsed.warnings) == 3  # empty label, long label, ref without det


def test_warnings_are_capped() -> None:
    parsed = ou.parse_grounding("<|/det|>" * 1000)
    assert len(parsed.warnings) == ou.MAX_WARNINGS + 1
    assert parsed.warnings[-1] == f"{1000 - ou.MAX_WARNINGS} more warnings not shown"


def test_boxes_per_block_are_capped() -> None:
    boxes = ", ".join("[1, 2, 3, 4]" for _ in range(ou.MAX_BOXES_PER_BLOCK + 10))
    parsed = ou.parse_grounding(f"<|ref|>text<|/ref|><|det|>[{boxes}]<|/det|>")
    assert len(parsed.blocks[0].boxes) == ou.MAX_BOXES_PER_BLOCK
    assert len(parsed.warnings) == 1


@pytest.mark.parametrize(
    "hostile",
    [
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>x\n" * 24_000,
        "<|ref|>" * 150_000,
        "<|det|>[" * 130_000,
        "<|det|>" + "[" * 1_000_000,
        "<|det|>[1" + "1" * 1_000_000,
        "<|det|>[[" + "1," * 500_000 + "]]<|/det|>",
        "<|ref|>" + "a" * 1_000_000,
        "<｜" * 500_000,
        "<|ref|>image<|/ref|><|det|>[[1, 2, 3, 4]]" * 20_000,
    ],
    ids=[
        "repeated-blocks",
        "open-refs",
        "open-dets",
        "brackets",
        "digits",
        "commas",
        "long-label",
        "fullwidth",
        "unclosed-images",
    ],
)
@pytest.mark.timeout(120)
def test_hostile_megabyte_inputs_stay_linear(hostile: str) -> None:
    # The timeout is a hang guard, not a speed target: quadratic or catastrophic backtracking on a
    # megabyte would take hours; the real cost is well under a second.
    parsed = ou.parse_grounding(hostile)
    ou.to_markdown(hostile)
    ou.plain_text(hostile)
    assert len(parsed.warnings) <= ou.MAX_WARNINGS + 1


def test_repeated_blocks_all_parse() -> None:
    text = "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>x\n" * 24_000
    assert len(text) > 1_000_000
    parsed = ou.parse_grounding(text)
    assert len(parsed.blocks) == 24_000 and parsed.warnings == []
    assert ou.to_markdown(text) == "\n".join(["x"] * 24_000)


def test_fuzzed_fragments_never_raise() -> None:
    pieces = [
        "<|ref|>",
        "<|/ref|>",
        "<|det|>",
        "<|/det|>",
        "[[",
        "]]",
        "[",
        "]",
        ", ",
        "12",
        "-3",
        "1e5",
        "999",
        "image",
        "title",
        "text\n",
        "\n\n\n",
        "<｜end▁of▁sentence｜>",
        "<|grounding|>",
        "表",
        "\\[",
    ]
    rng = random.Random(1234)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        parsed = ou.parse_grounding(text)
        for block in parsed.blocks:
            for x1, y1, x2, y2 in block.boxes:
                assert 0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999, (text, block)
        markdown = ou.to_markdown(text)
        crops = ou.crop_images(gradient(8, 8), parsed)
        assert [c.name for c in crops] == LINK_RE.findall(markdown), text
        ou.plain_text(text)


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize(
    ("box", "size", "expected"),
    [
        # Worked by hand: round(v / 999 * size).
        ((100, 200, 500, 999), (1000, 1500), (100, 300, 501, 1500)),  # 100.1, 300.3, 500.5, 1500
        ((0, 0, 999, 999), (1000, 1500), (0, 0, 1000, 1500)),
        ((333, 666, 998, 750), (1000, 1500), (333, 1000, 999, 1126)),  # 333.33, 1000, 998.998, 1126.13
        ((100, 200, 500, 999), (640, 480), (64, 96, 320, 480)),  # 64.06, 96.10, 320.32, 480
        ((250, 250, 750, 750), (640, 480), (160, 120, 480, 360)),  # 160.16, 120.12, 480.48, 360.36
        ((1, 998, 2, 999), (640, 480), (1, 480, 1, 480)),  # 0.64, 479.52, 1.28, 480
        ((-10, 0, 1200, 999), (640, 480), (0, 0, 640, 480)),  # clipped to the image
    ],
)
def test_box_to_pixels(box: ou.Box, size: tuple[int, int], expected: ou.Box) -> None:
    assert ou.box_to_pixels(box, *size) == expected


def test_box_to_pixels_rejects_empty_image() -> None:
    with pytest.raises(ValueError, match="0x10"):
        ou.box_to_pixels((0, 0, 1, 1), 0, 10)


# --------------------------------------------------------------------------- drawing


def one_block(label: str, box: str = "250, 250, 750, 750") -> ou.ParsedOutput:
    return ou.parse_grounding(f"<|ref|>{label}<|/ref|><|det|>[[{box}]]<|/det|>\nx")


def test_draw_layout_outlines_fills_and_leaves_the_rest() -> None:
    image = Image.new("RGB", (640, 480), (255, 255, 255))
    out = ou.draw_layout(image, one_block("title"))  # pixel box (160, 120, 480, 360)
    assert out.size == image.size and out.mode == "RGB"
    assert image.getpixel((160, 240)) == (255, 255, 255), "input must not be modified"
    color = ou.label_color("title")
    for xy in [(160, 240), (163, 240), (479, 240), (476, 240), (320, 359), (320, 356)]:
        assert out.getpixel(xy) == color, xy  # 4 px border at the exact label colour
    fill = out.getpixel((320, 240))
    for channel, c in zip(fill, color, strict=True):
        assert abs(channel - round(255 + (c - 255) * 20 / 255)) <= 1
    for xy in [(0, 0), (639, 479), (159, 240), (480, 240), (320, 361), (600, 100)]:
        assert out.getpixel(xy) == (255, 255, 255), xy


def test_draw_layout_thin_border_for_other_labels() -> None:
    out = ou.draw_layout(Image.new("RGB", (640, 480), "white"), one_block("text"))
    color = ou.label_color("text")
    assert out.getpixel((160, 240)) == color and out.getpixel((161, 240)) == color
    assert out.getpixel((162, 240)) != color


def test_draw_layout_label_sits_above_box() -> None:
    out = ou.draw_layout(Image.new("RGB", (640, 480), "white"), one_block("text"))
    above = {pixel for _, pixel in out.crop((160, 100, 220, 119)).getcolors(10_000)}
    color = ou.label_color("text")
    # Glyph edges are anti-aliased: the strongest glyph pixels come within a few levels of the colour.
    assert min(sum(abs(a - b) for a, b in zip(p, color, strict=True)) for p in above) <= 12
    assert (255, 255, 255) in above


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (50, 7)])
def test_draw_layout_tiny_images_and_edges(size: tuple[int, int]) -> None:
    parsed = ou.parse_grounding(
        "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>"
        "<|ref|>a very long label that is wider than the image<|/ref|><|det|>[[998, 998, 999, 999]]<|/det|>"
        "<|ref|>text<|/ref|><|det|>[[0, 500, 1, 999]]<|/det|>"
    )
    assert ou.draw_layout(Image.new("RGB", size, "white"), parsed).size == size


def test_draw_layout_many_blocks_and_other_modes() -> None:
    rng = random.Random(7)
    parts = []
    for i in range(400):
        x, y = rng.randint(0, 900), rng.randint(0, 900)
        parts.append(f"<|ref|>label {i % 13} 表<|/ref|><|det|>[[{x}, {y}, {x + 50}, {y + 30}]]<|/det|>t\n")
    parsed = ou.parse_grounding("".join(parts))
    assert len(parsed.blocks) == 400
    for mode in ("RGB", "RGBA", "RGBa", "La", "LA", "L", "P", "CMYK", "1", "I", "I;16", "F"):
        out = ou.draw_layout(Image.new(mode, (300, 200)), parsed)
        assert out.mode == "RGB" and out.size == (300, 200)


def test_label_colors_are_stable_and_distinct() -> None:
    assert ou.label_color("title") == ou.label_color("title")
    assert len({ou.label_color(x) for x in ["title", "text", "image", "table", "formula"]}) == 5


# --------------------------------------------------------------------------- crops


def test_crop_sizes_equal_pixel_boxes() -> None:
    raw, _ = load_case("06_images_numbered")
    image = gradient(1000, 1500)
    crops = ou.crop_images(image, ou.parse_grounding(raw))
    # Boxes by hand: (100,100,480,400) -> (100, 150, 480, 601); (520,100,900,400) -> (521, 150, 901, 601);
    # (100,520,900,900) -> (100, 781, 901, 1351).
    assert [c.box for c in crops] == [(100, 150, 480, 601), (521, 150, 901, 601), (100, 781, 901, 1351)]
    for crop in crops:
        decoded = Image.open(io.BytesIO(crop.jpeg))
        assert decoded.format == "JPEG" and decoded.size == (crop.width, crop.height)
        assert (crop.width, crop.height) == (crop.box[2] - crop.box[0], crop.box[3] - crop.box[1])
        assert crop.label == "image"


def test_crop_takes_the_right_pixels() -> None:
    image = Image.new("RGB", (640, 480), "white")
    image.paste((200, 0, 0), (160, 120, 480, 360))
    parsed = ou.parse_grounding("<|ref|>image<|/ref|><|det|>[[250, 250, 750, 750]]<|/det|>")
    (crop,) = ou.crop_images(image, parsed, page=2)
    assert crop.name == "images/2_0.jpg" and crop.box == (160, 120, 480, 360)
    r, g, b = Image.open(io.BytesIO(crop.jpeg)).convert("RGB").resize((1, 1)).getpixel((0, 0))
    assert r > 180 and g < 20 and b < 20


def test_crop_of_a_box_below_one_pixel_is_widened_not_dropped() -> None:
    text = (
        "<|ref|>image<|/ref|><|det|>[[0, 0, 100, 100]]<|/det|>"  # (0, 0, 0, 0) on 3x3
        "<|ref|>image<|/ref|><|det|>[[998, 0, 999, 999]]<|/det|>"  # (3, 0, 3, 3) on 3x3
    )
    crops = ou.crop_images(Image.new("RGB", (3, 3)), ou.parse_grounding(text))
    assert [(c.name, c.box) for c in crops] == [("images/0.jpg", (0, 0, 1, 1)), ("images/1.jpg", (2, 0, 3, 3))]
    assert LINK_RE.findall(ou.to_markdown(text)) == ["images/0.jpg", "images/1.jpg"]


def test_crop_of_transparent_image_is_white_not_black() -> None:
    parsed = ou.parse_grounding("<|ref|>image<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>")
    (crop,) = ou.crop_images(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), parsed)
    assert min(Image.open(io.BytesIO(crop.jpeg)).convert("RGB").getpixel((10, 10))) > 245


# --------------------------------------------------------------------------- formulas, pages


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\[E = mc^2 \quad (1)\]", r"\[E = mc^2\]"),
        (r"\[ a+b \quad(2.3) \]", r"\[a+b\]"),
        (r"see \[x\quad (1)\] and \[y \quad  (2)\] here", r"see \[x\] and \[y\] here"),
        (r"\[  x  \]", r"\[x\]"),
        (r"\[a \quad b\]", r"\[a \quad b\]"),  # \quad without a parenthesised tag stays
        (r"(\quad (3)) outside", r"(\quad (3)) outside"),
        ("\\[\nx \\quad (1)\n\\]", "\\[\nx \\quad (1)\n\\]"),  # the reference matches within one line
        (r"\[a \[b \quad (4)\] c\]", r"\[a \[b\] c\]"),  # the first \[ opens, the first \] closes
        (r"unclosed \[x \quad (5)", r"unclosed \[x \quad (5)"),
        ("", ""),
    ],
)
def test_clean_formula(text: str, expected: str) -> None:
    assert ou.clean_formula(text) == expected


@pytest.mark.timeout(120)
def test_clean_formula_is_linear() -> None:
    hostile = "\\[" * 500_000  # a hang guard (timeout), not a speed target
    assert ou.clean_formula(hostile) == hostile


def test_join_pages() -> None:
    assert ou.PAGE_SPLIT == "\n<--- Page Split --->\n"
    assert ou.join_pages(["a", "b", "c"]) == "a\n<--- Page Split --->\nb\n<--- Page Split --->\nc"
    assert ou.join_pages([]) == ""


# --------------------------------------------------------------------------- encoders, PDF


def test_layout_pdf_pages_and_sizes() -> None:
    first = ou.encode_jpeg(Image.new("RGB", (200, 100), "red"))  # no dpi: img2pdf assumes 96
    second = ou.encode_jpeg(Image.new("RGB", (288, 144), "blue"), dpi=144)
    with pymupdf.open(stream=ou.layout_pdf([first, second]), filetype="pdf") as doc:
        assert doc.page_count == 2
        assert (doc[0].rect.width, doc[0].rect.height) == (150, 75)
        assert (doc[1].rect.width, doc[1].rect.height) == (144, 72)


def test_layout_pdf_of_annotated_pages() -> None:
    raw, _ = load_case("01_title_paragraphs")
    pages = [ou.encode_jpeg(ou.draw_layout(gradient(300, 400), ou.parse_grounding(raw))) for _ in range(3)]
    with pymupdf.open(stream=ou.layout_pdf(iter(pages)), filetype="pdf") as doc:
        assert doc.page_count == 3


def test_layout_pdf_needs_pages() -> None:
    with pytest.raises(ValueError):
        ou.layout_pdf([])


def test_encoders() -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    decoded = Image.open(io.BytesIO(ou.encode_jpeg(rgba, quality=80)))
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and min(decoded.getpixel((5, 5))) > 245
    png = Image.open(io.BytesIO(ou.encode_png(rgba)))
    assert png.format == "PNG" and png.mode == "RGBA" and png.getpixel((5, 5)) == (0, 0, 0, 0)
    for mode in ("CMYK", "I", "F", "La"):  # modes PNG cannot store
        assert Image.open(io.BytesIO(ou.encode_png(Image.new(mode, (4, 4))))).mode == "RGB"
    for mode in ("I", "F", "La", "CMYK", "1"):
        assert Image.open(io.BytesIO(ou.encode_jpeg(Image.new(mode, (4, 4))))).mode == "RGB"


# --------------------------------------------------------------------------- ZIP


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("result.md", "result.md"),
        ("images/0.jpg", "images/0.jpg"),
        ("../../evil.png", "evil.png"),
        ("/abs.png", "abs.png"),
        ("//server/share/x.png", "server/share/x.png"),
        ("a\\b.png", "a_b.png"),
        ("..\\..\\evil.png", "_.._evil.png"),
        ("a/../../b.png", "a/b.png"),
        ("C:\\Windows\\evil.dll", "C__Windows_evil.dll"),
        ("a\x00b\nc\x7f.png", "abc.png"),
        ("\u202egnp.exe", "gnp.exe"),
        (".hidden", "hidden"),
        ("CON.txt", "_CON.txt"),
        ("", "file"),
        ("///", "file"),
        ("..", "file"),
        ("页面 1.md", "页面 1.md"),
    ],
)
def test_safe_member_name(name: str, expected: str) -> None:
    assert ou.safe_member_name(name, set()) == expected


def test_safe_member_name_long_names_keep_extension() -> None:
    name = ou.safe_member_name("x" * 500 + ".png", set())
    assert len(name) <= 100 and name.endswith(".png")
    deep = ou.safe_member_name("/".join(["d"] * 50) + "/f.txt", set())
    assert deep.endswith("/f.txt") and deep.count("/") < 10


def test_safe_member_name_deduplicates() -> None:
    used: set[str] = set()
    names = [
        ou.safe_member_name(n, used)
        for n in ["same.png", "same.png", "SAME.png", "same-1.png", "README", "README", "../same.png"]
    ]
    assert names == ["same.png", "same-1.png", "SAME-2.png", "same-1-1.png", "README", "README-1", "same-3.png"]


HOSTILE_NAMES = [
    "../../evil.png",
    "/abs.png",
    "a\\b.png",
    "same.png",
    "same.png",
    "x\x00y.txt",
    "",
    "..",
    "/",
    "\\\\srv\\s",
    "C:/x.txt",
    "~/x",
    "a/./b/../c.txt",
    " ../ spaced.png",
    "\n",
    "." * 300,
    "images/0.jpg",
    "images/0.jpg",
]


def test_build_zip_members_stay_inside(tmp_path: Path) -> None:
    members = [(name, f"data {i}".encode()) for i, name in enumerate(HOSTILE_NAMES)]
    data = ou.build_zip(members)
    root = (tmp_path / "out").resolve()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        assert len(infos) == len(members)
        assert len({i.filename.casefold() for i in infos}) == len(infos)
        for info, (_, payload) in zip(infos, members, strict=True):
            name = info.filename
            assert name and not name.startswith("/") and "\\" not in name and ".." not in name.split("/")
            assert not any(ord(ch) < 32 for ch in name)
            assert info.compress_type == zipfile.ZIP_DEFLATED
            # Extract by hand, as a naive client would: join and write without any sanitising.
            target = (root / name).resolve()
            assert target.is_relative_to(root), name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
            assert target.read_bytes() == payload
    extracted = [p for p in root.rglob("*") if p.is_file()]
    assert len(extracted) == len(members)
    assert all(p.resolve().is_relative_to(root) for p in extracted)


def test_build_zip_empty_and_roundtrip() -> None:
    with zipfile.ZipFile(io.BytesIO(ou.build_zip([]))) as archive:
        assert archive.namelist() == []
    with zipfile.ZipFile(io.BytesIO(ou.build_zip([("doc.md", b"# hi"), ("images/0.jpg", b"\xff")]))) as archive:
        assert archive.namelist() == ["doc.md", "images/0.jpg"]
        assert archive.read("doc.md") == b"# hi"
