"""Ordinary PDFs built with PyMuPDF: text pages of three sizes, a picture, a rotated page."""

from __future__ import annotations

import io

import pymupdf
from PIL import Image


def picture_png() -> bytes:
    image = Image.new("RGB", (240, 160), (250, 250, 250))
    image.paste((30, 110, 200), (20, 20, 220, 140))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def make_pdf(pages: int = 5, **save: object) -> bytes:
    """A4, Letter and A5-landscape text pages; page 2 holds a picture, page 4 is rotated 90 degrees."""
    doc = pymupdf.open()
    for n in range(pages):
        width, height = [(595, 842), (612, 792), (595, 420), (595, 842), (595, 842)][n % 5]
        page = doc.new_page(width=width, height=height)
        page.insert_text((56, 72), f"Chapter {n + 1}", fontsize=22)
        page.insert_textbox(pymupdf.Rect(56, 100, width - 56, height - 56), "Lorem ipsum dolor sit amet. " * 12)
        if n % 5 == 1:
            page.insert_image(pymupdf.Rect(56, 260, 296, 420), stream=picture_png())
        if n % 5 == 3:
            page.set_rotation(90)
    data = doc.tobytes(**save)
    doc.close()
    return data


# make_pdf's Letter page at 72 dpi (page 2, the one with the picture): ReplayEngine(fail_on_size=FAILING_SIZE)
# fails that page and no other.
FAILING_SIZE = (612, 792)
