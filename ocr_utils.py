"""Post-processing of DeepSeek-OCR output: grounding tags to blocks, markdown, text, images, PDF and ZIP.

The model's grounded output interleaves ``<|ref|>LABEL<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>``
with content; boxes are on a 0..999 grid. Everything here is a plain function on text, images and
bytes (no FastAPI). Model output is parsed with linear-time scanning and strict number matching,
never eval: the reference scripts eval() the box lists, which lets generated text run code.

Image numbering contract: the n-th box of the regions labelled ``image`` (in output order, counting
from 0, boxes that parse to zero area excluded) is linked by `to_markdown` as ``images/{n}.jpg``
(``images/{page}_{n}.jpg`` with a page) and cropped by `crop_images` under exactly that name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from outputs.archive import build_zip, encode_jpeg, encode_png, layout_pdf, safe_member_name, to_rgb

Box = tuple[int, int, int, int]

GRID_MAX = 999
IMAGE_LABEL = "image"
UNKNOWN_LABEL = "unknown"
PAGE_SPLIT = "\n<--- Page Split --->\n"
MAX_WARNINGS = 50
MAX_BOXES_PER_BLOCK = 256
MAX_LABEL_CHARS = 64

# Special tokens the decoder may leave in the text. Grounding tags are handled by the scanner and
# `<td>`/`<tr>` are table HTML, so neither is listed. The fullwidth-bar form covers bos/eos/pad.
_SPECIAL_RE = re.compile(r"<｜[^｜<>\n]{0,64}｜>|<\|(?:grounding|User|Assistant)\|>|<image>")
_TAG_RE = re.compile(r"<\|(/?)(ref|det)\|>")
_BRACKET_RE = re.compile(r"[\[\]]")
_INNER_LIST_RE = re.compile(r"\[([^\[\]]*)\]")
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d*)?")
_RESIDUE_RE = re.compile(r"[^\[\],\s]")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


@dataclass
class Block:
    """One grounded region: its label, its boxes on the 0..999 grid and the content that follows it."""

    index: int
    label: str
    text: str
    boxes: list[Box] = field(default_factory=list)


@dataclass
class ParsedOutput:
    """Result of `parse_grounding`: blocks in output order, repairs made, and text before the first tag."""

    blocks: list[Block] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    preamble: str = ""


@dataclass
class Crop:
    """A cropped ``image`` region, JPEG-encoded, named as `to_markdown` links it."""

    name: str
    label: str
    box: Box
    width: int
    height: int
    jpeg: bytes = field(repr=False)


# --------------------------------------------------------------------------- scanning


@dataclass
class _Region:
    label: str
    boxes: list[Box] = field(default_factory=list)
    has_det: bool = False


@dataclass
class _Tag:
    start: int
    end: int
    closing: bool
    kind: str


class _Warnings:
    """Collects repair notes, capped so hostile output cannot make the list as large as the input."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.dropped = 0

    def add(self, message: str) -> None:
        if len(self.items) < MAX_WARNINGS:
            self.items.append(message)
        else:
            self.dropped += 1

    def finish(self) -> list[str]:
        if self.dropped:
            return [*self.items, f"{self.dropped} more warnings not shown"]
        return self.items


def _snippet(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def strip_special_tokens(text: str) -> str:
    """Remove decoder special tokens (eos, bos, pad, ``<|grounding|>``, ``<image>``) from `text`."""
    return _SPECIAL_RE.sub("", text)


def _scan(text: str, warn: _Warnings) -> list[str | _Region]:
    """Split output into content strings and regions, in order. Linear: one pass over the tag list."""
    text = strip_special_tokens(text)
    tags = [_Tag(m.start(), m.end(), m.group(1) == "/", m.group(2)) for m in _TAG_RE.finditer(text)]
    events: list[str | _Region] = []
    awaiting: _Region | None = None  # a ref whose det has not been seen yet
    gap = False  # non-blank text between that ref and its det
    cursor, i = 0, 0
    while i < len(tags):
        tag = tags[i]
        if tag.start > cursor:
            chunk = text[cursor : tag.start]
            events.append(chunk)
            gap = gap or (awaiting is not None and bool(chunk.strip()))
        cursor, i = tag.end, i + 1
        if tag.closing:
            warn.add(f"stray closing tag <|/{tag.kind}|> at offset {tag.start} removed")
        elif tag.kind == "ref":
            if awaiting is not None:
                warn.add(f"ref {_snippet(awaiting.label)} has no det: kept without boxes")
            label, rest, cursor, i = _read_label(text, tags, i, tag, warn)
            awaiting, gap = _Region(label), False
            events.append(awaiting)
            if rest:
                events.append(rest)
        else:
            boxes, cursor, i = _read_det(text, tags, i, tag, warn)
            if awaiting is None:
                warn.add(f"det without ref at offset {tag.start}: labelled {UNKNOWN_LABEL!r}")
                events.append(_Region(UNKNOWN_LABEL, boxes, has_det=True))
            else:
                if gap:
                    warn.add(f"text between ref {_snippet(awaiting.label)} and its det kept as content")
                awaiting.boxes, awaiting.has_det, awaiting = boxes, True, None
    if cursor < len(text):
        events.append(text[cursor:])
    if awaiting is not None:
        warn.add(f"ref {_snippet(awaiting.label)} has no det: kept without boxes")
    return events


def _read_label(text: str, tags: list[_Tag], i: int, tag: _Tag, warn: _Warnings) -> tuple[str, str, int, int]:
    """Read a ref label; returns (label, content spilled out of a malformed label, cursor, next tag)."""
    if i < len(tags) and tags[i].kind == "ref" and tags[i].closing:
        raw, cursor, i = text[tag.end : tags[i].start], tags[i].end, i + 1
    else:
        # Unclosed (truncated or the model skipped it): the label cannot span a line or another tag.
        limit = tags[i].start if i < len(tags) else len(text)
        newline = text.find("\n", tag.end, limit)
        cursor = limit if newline < 0 else newline
        raw = text[tag.end : cursor]
        warn.add(f"ref {_snippet(raw.strip())} at offset {tag.start} not closed")
    label, _, rest = raw.partition("\n")
    label = label.strip()
    if rest:
        warn.add(f"ref label {_snippet(label)} spans lines: the rest kept as content")
        rest = "\n" + rest
    if not label:
        warn.add(f"empty ref label at offset {tag.start}: labelled {UNKNOWN_LABEL!r}")
        label = UNKNOWN_LABEL
    elif len(label) > MAX_LABEL_CHARS:
        warn.add(f"ref label {_snippet(label)} longer than {MAX_LABEL_CHARS} characters: truncated")
        label = label[:MAX_LABEL_CHARS]
    return label, rest, cursor, i


def _read_det(text: str, tags: list[_Tag], i: int, tag: _Tag, warn: _Warnings) -> tuple[list[Box], int, int]:
    """Read a det body and parse its boxes; returns (boxes, cursor, next tag index)."""
    if i < len(tags) and tags[i].kind == "det" and tags[i].closing:
        body, cursor, i = text[tag.end : tags[i].start], tags[i].end, i + 1
    else:
        limit = tags[i].start if i < len(tags) else len(text)
        cursor = _list_end(text, tag.end, limit)
        body = text[tag.end : cursor]
        warn.add(f"det at offset {tag.start} not closed")
    return _parse_boxes(body, warn), cursor, i


def _list_end(text: str, start: int, limit: int) -> int:
    """End of the bracketed list starting at `start` (after blanks), or `start` when there is none.

    Used for an unclosed det, so that content after a complete box list is not swallowed; a list
    that never closes (truncated output) runs to `limit`.
    """
    pos = start
    while pos < limit and text[pos] in " \t":
        pos += 1
    if pos >= limit or text[pos] != "[":
        return start
    depth = 0
    for m in _BRACKET_RE.finditer(text, pos, limit):
        depth += 1 if m.group() == "[" else -1
        if depth == 0:
            return m.end()
    return limit


def _parse_boxes(body: str, warn: _Warnings) -> list[Box]:
    """Boxes from a det body: each innermost ``[...]`` must hold exactly four numbers."""
    boxes: list[Box] = []
    for m in _INNER_LIST_RE.finditer(body):
        if not m.group(1).strip():
            continue  # "[]": nothing to report beyond the det holding no box
        parts = m.group(1).split(",")
        if len(parts) != 4:
            warn.add(f"box {_snippet(m.group())} does not have 4 coordinates: skipped")
            continue
        parts = [p.strip() for p in parts]
        if not all(_NUMBER_RE.fullmatch(p) for p in parts):
            warn.add(f"box {_snippet(m.group())} has a non-number: skipped")
            continue
        box = _check_box([float(p) for p in parts], m.group(), warn)
        if box is None:
            continue
        if len(boxes) == MAX_BOXES_PER_BLOCK:
            warn.add(f"more than {MAX_BOXES_PER_BLOCK} boxes in one det: the rest skipped")
            break
        boxes.append(box)
    if _RESIDUE_RE.search(_INNER_LIST_RE.sub("", body)):
        warn.add(f"det {_snippet(body.strip())} has unparsed text (truncated or malformed)")
    if not boxes:
        warn.add(f"det {_snippet(body.strip())} holds no usable box")
    return boxes


def _check_box(values: list[float], source: str, warn: _Warnings) -> Box | None:
    """Clamp to the grid, put corners in order, drop zero-area boxes; each repair is noted."""
    # float() of a long digit string is inf, never an error; clamping before round() keeps it finite.
    clamped = [min(max(v, 0.0), float(GRID_MAX)) for v in values]
    if clamped != values:
        warn.add(f"box {_snippet(source)} outside 0..{GRID_MAX}: clamped")
    x1, y1, x2, y2 = (round(v) for v in clamped)
    if x1 > x2 or y1 > y2:
        warn.add(f"box {_snippet(source)} has inverted corners: swapped")
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    if x1 == x2 or y1 == y2:
        warn.add(f"box {_snippet(source)} has zero area: skipped")
        return None
    return (x1, y1, x2, y2)


# --------------------------------------------------------------------------- text outputs


def parse_grounding(text: str) -> ParsedOutput:
    """Parse grounded model output into blocks; never raises.

    A block's `text` is the content after its det up to the next ref (stripped). Malformed input is
    repaired or skipped, each time with an entry in `warnings`: out-of-range coordinates are clamped,
    inverted corners swapped, zero-area and malformed boxes skipped, unclosed tags closed at the next
    tag (or line end for a label), a det without ref labelled ``unknown``, a ref without det kept with
    no boxes (dropped when it also has no content, as a ref cut off at the end is). Text before the
    first tag is returned as `preamble`; output with no tags at all is all preamble.
    """
    warn = _Warnings()
    events = _scan(text, warn)
    preamble: list[str] = []
    pending: list[tuple[_Region, list[str]]] = []
    for event in events:
        if isinstance(event, _Region):
            pending.append((event, []))
        elif pending:
            pending[-1][1].append(event)
        else:
            preamble.append(event)
    blocks: list[Block] = []
    for region, chunks in pending:
        content = "".join(chunks).strip()
        if region.boxes or content:
            blocks.append(Block(len(blocks), region.label, content, list(region.boxes)))
    return ParsedOutput(blocks, warn.finish(), "".join(preamble).strip())


def image_name(n: int, page: int | str | None = None) -> str:
    """Name of the n-th image crop: ``images/{n}.jpg``, or ``images/{page}_{n}.jpg`` for a PDF page."""
    return f"images/{n}.jpg" if page is None else f"images/{page}_{n}.jpg"


def _render(text: str, image_link: Callable[[int], str] | None) -> str:
    events = _scan(text, _Warnings())
    out: list[str] = []
    n = 0
    for event in events:
        if not isinstance(event, _Region):
            out.append(event)
        elif event.label == IMAGE_LABEL:
            for _ in event.boxes:
                if image_link is not None:
                    out.append(image_link(n))
                n += 1
    result = "".join(out).replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    return _BLANK_LINES_RE.sub("\n\n", result).strip()


def to_markdown(text: str, *, page: int | str | None = None) -> str:
    """Markdown as the reference scripts make it, from raw grounded output.

    Each box of an ``image`` region becomes ``![](images/{n}.jpg)`` plus a newline (named by
    `image_name`); all other tags are removed and their content kept; ``\\coloneqq`` -> ``:=``,
    ``\\eqqcolon`` -> ``=:``; 3+ newlines -> 2; special tokens removed. Differs from the reference in
    that the result is stripped and an image region with k boxes gets k links (the reference links
    one but crops k, so its later links point at the wrong files).
    """
    return _render(text, lambda n: f"![]({image_name(n, page)})\n")


def plain_text(text: str) -> str:
    """Like `to_markdown` but image regions are dropped instead of linked: no grounding tags remain.

    Content itself (table HTML, LaTeX) is kept as the model wrote it.
    """
    return _render(text, None)


def join_pages(markdowns: Iterable[str]) -> str:
    """Join per-page markdown with `PAGE_SPLIT` between pages (the reference also appends one at the end)."""
    return PAGE_SPLIT.join(markdowns)


_FORMULA_TOKEN_RE = re.compile(r"\\\[|\\\]|\n")
_EQ_TAG_RE = re.compile(r"\\quad\s*\([^)]*\)")


def clean_formula(text: str) -> str:
    """Inside each ``\\[...\\]`` (on one line, as in the reference), drop ``\\quad (...)`` tags and trim.

    Same matches as the reference batch-eval ``re.sub(r'\\\\\\[(.*?)\\\\\\]', ...)`` without DOTALL,
    found with one token pass so a long line of unmatched ``\\[`` stays linear.
    """
    out: list[str] = []
    cursor = 0
    open_at = -1
    for m in _FORMULA_TOKEN_RE.finditer(text):
        token = m.group()
        if token == "\n":
            open_at = -1
        elif token == "\\[":
            if open_at < 0:
                open_at = m.start()
        elif open_at >= 0:
            inner = _EQ_TAG_RE.sub("", text[open_at + 2 : m.start()]).strip()
            out.append(text[cursor:open_at])
            out.append("\\[" + inner + "\\]")
            cursor, open_at = m.end(), -1
    out.append(text[cursor:])
    return "".join(out)


# --------------------------------------------------------------------------- images


def box_to_pixels(box: Box, width: int, height: int) -> Box:
    """Grid box (0..999) to pixels: ``round(v / 999 * size)``, x with width, y with height, clipped."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box

    def scale(v: float, size: int) -> int:
        return min(max(round(v / GRID_MAX * size), 0), size)

    return (scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height))


def label_color(label: str) -> tuple[int, int, int]:
    """A stable colour per label (same ranges as the reference's random ones, dark enough to read)."""
    digest = hashlib.sha256(label.encode("utf-8")).digest()
    return (digest[0] % 200, digest[1] % 200, digest[2])


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def draw_layout(image: Image.Image, parsed: ParsedOutput, *, fill_alpha: int = 20) -> Image.Image:
    """RGB copy of `image` with every box outlined (4 px titles, 2 px others) over a translucent fill.

    The fill goes under the outlines so borders keep the exact label colour; each label is written
    above its box on a white patch (inside the box when there is no room above).
    """
    canvas = to_rgb(image)
    width, height = canvas.size
    placed = [(block.label, box_to_pixels(box, width, height)) for block in parsed.blocks for box in block.boxes]
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    for label, (x1, y1, x2, y2) in placed:
        fill.rectangle(_inclusive(x1, y1, x2, y2), fill=(*label_color(label), fill_alpha))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for label, (x1, y1, x2, y2) in placed:
        line = 4 if label == "title" else 2
        draw.rectangle(_inclusive(x1, y1, x2, y2), outline=label_color(label), width=line)
    for label, (x1, y1, _, _) in placed:
        _draw_label(draw, label, x1, y1, width)
    return canvas


def _inclusive(x1: int, y1: int, x2: int, y2: int) -> tuple[int, int, int, int]:
    # Pixel boxes are half-open (like crop); PIL rectangles include their far edge.
    return (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))


def _draw_label(draw: ImageDraw.ImageDraw, label: str, x1: int, y1: int, width: int) -> None:
    # The bundled font may lack glyphs and the bitmap fallback only takes latin-1: keep ASCII.
    text = label.encode("ascii", "replace").decode("ascii")
    font = _font()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left, bottom - top
    x = max(0, min(x1, width - text_w))
    y = y1 - text_h - 3 if y1 - text_h - 3 >= 0 else y1 + 4
    draw.rectangle((x, y, x + text_w, y + text_h + 2), fill=(255, 255, 255))
    draw.text((x - left, y - top), text, font=font, fill=label_color(label))


def crop_images(
    image: Image.Image, parsed: ParsedOutput, *, page: int | str | None = None, jpeg_quality: int = 95
) -> list[Crop]:
    """Crop every box of the ``image`` regions, named as `to_markdown` links them.

    Numbering follows the parsed boxes, so crop n is always link n. A box that collapses below one
    pixel (a tiny image) is widened to one pixel instead of skipped, so no link points at a missing
    file; boxes of zero area on the grid were already dropped by the parser, from links and crops alike.
    """
    rgb = to_rgb(image)
    width, height = rgb.size
    crops: list[Crop] = []
    for block in parsed.blocks:
        if block.label != IMAGE_LABEL:
            continue
        for box in block.boxes:
            x1, y1, x2, y2 = box_to_pixels(box, width, height)
            x1, x2 = _at_least_one(x1, x2, width)
            y1, y2 = _at_least_one(y1, y2, height)
            jpeg = encode_jpeg(rgb.crop((x1, y1, x2, y2)), quality=jpeg_quality)
            name = image_name(len(crops), page)
            crops.append(Crop(name, block.label, (x1, y1, x2, y2), x2 - x1, y2 - y1, jpeg))
    return crops


def _at_least_one(lo: int, hi: int, size: int) -> tuple[int, int]:
    if hi > lo:
        return lo, hi
    lo = min(lo, size - 1)
    return lo, lo + 1


__all__ = [  # the packaging helpers live in outputs/archive.py; these names stay importable from here
    "build_zip",
    "encode_jpeg",
    "encode_png",
    "layout_pdf",
    "safe_member_name",
    "GRID_MAX",
    "IMAGE_LABEL",
    "PAGE_SPLIT",
    "Block",
    "Box",
    "Crop",
    "ParsedOutput",
    "box_to_pixels",
    "clean_formula",
    "crop_images",
    "draw_layout",
    "image_name",
    "join_pages",
    "label_color",
    "parse_grounding",
    "plain_text",
    "strip_special_tokens",
    "to_markdown",
    "to_rgb",
]
