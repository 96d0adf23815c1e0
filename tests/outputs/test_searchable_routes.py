"""Searchable PDFs through the routes, on the tiny checkpoint: the layer holds what the answer says.

`outputs/searchable.py` itself is tested on known text at known places in tests/outputs/test_searchable_pdf.py; here the
real service makes the text, and each page's extracted text must equal the plain text of that page's answer
(whitespace aside: the layer wraps lines to the block's box).
"""

from __future__ import annotations

import base64
import io
import json
import zipfile

import httpx
import pymupdf
from helpers.images import png_bytes
from helpers.pdfs import make_pdf
from helpers.server import show

from ocr_utils import plain_text
from outputs.searchable import layer_text


def squeeze(text: str) -> str:
    return "".join(text.split())


def test_pdf_searchable_layer_equals_the_answer_page_by_page(base_url: str) -> None:
    source = make_pdf(3)
    r = httpx.post(
        base_url + "/pdf/ocr",
        files={"file": ("r.pdf", source)},
        data={"dpi": "72", "searchable_pdf": "true", "pages": "1,3"},
        timeout=120,
    )
    assert r.status_code == 200, show(r)
    body = r.json()
    with pymupdf.open(stream=base64.b64decode(body["searchable_pdf"]), filetype="pdf") as doc, pymupdf.open(
        stream=source, filetype="pdf"
    ) as original:
        assert doc.page_count == 2, show(r)
        for page, answer, number in zip(doc, body["pages"], (1, 3), strict=True):
            expected = squeeze(layer_text(plain_text(answer["text"])))
            assert squeeze(page.get_text()).endswith(expected), (page.get_text(), answer["text"])
            # The original text of the page is still there, unchanged, before the layer.
            assert squeeze(original[number - 1].get_text()) in squeeze(page.get_text())


def test_downloads_hold_searchable_pdfs(base_url: str) -> None:
    r = httpx.post(base_url + "/pdf/ocr/download", files={"file": ("r.pdf", make_pdf(2))}, data={"dpi": "72"},
                   timeout=120)
    assert r.status_code == 200, show(r)
    with zipfile.ZipFile(io.BytesIO(r.content)) as z, pymupdf.open(stream=z.read("r_searchable.pdf")) as doc:
        assert doc.page_count == 2
    files = [("files", ("one.png", png_bytes(320, 200))), ("files", ("two.png", png_bytes(200, 320)))]
    b = httpx.post(base_url + "/batch/ocr/download", files=files, timeout=120)
    assert b.status_code == 200, show(b)
    with zipfile.ZipFile(io.BytesIO(b.content)) as z:
        summary = json.loads(z.read("summary.json"))
        for entry, stem in zip(summary["results"], ("one", "two"), strict=True):
            assert entry["members"]["searchable"] == f"{stem}_searchable.pdf", summary
            raw = z.read(f"{stem}_det.md").decode()
            with pymupdf.open(stream=z.read(f"{stem}_searchable.pdf")) as doc:
                assert doc.page_count == 1 and doc[0].get_images(), stem  # the page is the image
                assert squeeze(doc[0].get_text()) == squeeze(layer_text(plain_text(raw))), (stem, raw)
