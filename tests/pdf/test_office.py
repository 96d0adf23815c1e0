"""Office files (DOCX, PPTX, ...) run as PDFs: converted by the real LibreOffice, then OCR'd on `/pdf/ocr` and
`/jobs` like any PDF. A converter that hangs is killed with all its processes at OFFICE_TIMEOUT_S (504); a server
without LibreOffice answers 415 naming what to install, and `/health` says so.

The tiny model's text is random: the checks are on pages (their count and rendered size against the PDF that
LibreOffice makes of the same file), never on words. On CI (`CI=true`) a missing LibreOffice fails these tests.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import docx
import httpx
import pptx
import pymupdf
import pytest
from helpers.jobs import problem, submit, wait
from helpers.server import make_settings, serve_app, show
from helpers.tools import missing_tool

from pdf.office import office_kind
from serve_ocr import create_app

DPI = 96
PACKAGES = "libreoffice-core libreoffice-writer libreoffice-impress libreoffice-calc"


def soffice() -> str:
    path = shutil.which("soffice")
    if path is None:
        message = f"LibreOffice's soffice is not installed (apt-get install --no-install-recommends {PACKAGES})"
        missing_tool(message)
    return path


def make_docx(pages: int) -> bytes:
    document = docx.Document()
    for n in range(1, pages + 1):
        document.add_heading(f"Chapter {n}", level=1)
        document.add_paragraph(f"This is page {n} of the test document.")
        if n < pages:
            document.add_page_break()
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_pptx(slides: int) -> bytes:
    deck = pptx.Presentation()
    for n in range(1, slides + 1):
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = f"Slide {n}"
        slide.placeholders[1].text = f"Point {n}"
    out = io.BytesIO()
    deck.save(out)
    return out.getvalue()


def reference_pages(data: bytes, ext: str) -> list[tuple[int, int]]:
    """The rendered size at DPI of each page of the PDF LibreOffice makes of `data`, converted here directly."""
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / f"ref.{ext}"
        source.write_bytes(data)
        subprocess.run([soffice(), "--headless", f"-env:UserInstallation=file://{work}/profile", "--convert-to",
                        "pdf", "--outdir", work, str(source)], check=True, capture_output=True, timeout=120,
                       env={**os.environ, "HOME": work})
        with pymupdf.open(Path(work) / "ref.pdf") as pdf:
            return [(round(p.rect.width * DPI / 72), round(p.rect.height * DPI / 72)) for p in pdf]


@pytest.fixture(scope="module")
def office_url(tiny_checkpoint: Path):
    soffice()
    with serve_app(create_app(make_settings(tiny_checkpoint, office_timeout_s=120))) as url:
        yield url


@pytest.mark.parametrize(("ext", "make", "count"), [("docx", make_docx, 2), ("pptx", make_pptx, 3)])
def test_office_file_pages_on_pdf_ocr(office_url: str, ext: str, make, count: int) -> None:
    data = make(count)
    assert office_kind(data, f"x.{ext}") == ext
    expected = reference_pages(data, ext)
    assert len(expected) == count, expected  # the document really has that many pages
    r = httpx.post(f"{office_url}/pdf/ocr", files={"file": (f"deck.{ext}", data)},
                   data={"dpi": str(DPI), "draw_layouts": "false", "extract_images": "false"}, timeout=300)
    assert r.status_code == 200, show(r)
    pages = r.json()["pages"]
    assert [p["page"] for p in pages] == list(range(1, count + 1)), show(r)
    assert all(p["status"] != "failed" for p in pages), show(r)
    # Each page was rendered from the converted PDF: its size is the PDF page's at the requested DPI.
    assert [(p["width"], p["height"]) for p in pages] == expected, show(r)


def test_office_file_as_a_job(office_url: str) -> None:
    data = make_docx(2)
    expected = reference_pages(data, "docx")
    job = submit(office_url, data, name="letter.docx", dpi=str(DPI))
    assert job["kind"] == "pdf", job
    done = wait(office_url, job["id"], timeout=300)
    assert done["status"] == "done", done
    assert done["pages_total"] == len(expected) == 2, done
    pages = httpx.get(f"{office_url}/jobs/{job['id']}/result", timeout=30)
    assert pages.status_code == 200, show(pages)
    body = pages.json()
    assert [(p["width"], p["height"]) for p in body["pages"]] == expected, show(pages)


def test_office_file_among_job_files_is_refused(office_url: str) -> None:
    r = httpx.post(f"{office_url}/jobs", files=[("files", ("a.docx", make_docx(1))), ("files", ("b.pptx",
                   make_pptx(1)))], timeout=60)
    problem(r, 415, "send it as `file`")


def test_text_named_docx_is_not_an_office_file(office_url: str) -> None:
    r = httpx.post(f"{office_url}/pdf/ocr", files={"file": ("notes.docx", b"just some text\n" * 10)}, timeout=60)
    problem(r, 415, "expected a pdf")


def test_detection_by_content() -> None:
    assert office_kind(b"{\\rtf1\\ansi hello}", None) == "rtf"
    assert office_kind(make_pptx(1), "renamed.docx") == "pptx"  # the content decides, not the name
    assert office_kind(b"%PDF-1.7\n", "report.docx") is None
    empty_zip = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(empty_zip, "w") as z:
        z.writestr("readme.txt", "not an office file")
    assert office_kind(empty_zip.getvalue(), "x.docx") is None


def test_hanging_converter_is_killed_at_its_timeout(tiny_checkpoint: Path, tmp_path: Path) -> None:
    soffice()  # the rest of the service is the same as with LibreOffice; only the binary is a fake one
    pids = tmp_path / "pids"
    fake = tmp_path / "soffice"
    # A converter that never finishes, with a child of its own (LibreOffice's soffice script starts soffice.bin).
    fake.write_text(f"#!/bin/sh\necho $$ >> {pids}\nsleep 600 &\necho $! >> {pids}\nwait\n")
    fake.chmod(0o755)
    settings = make_settings(tiny_checkpoint, office_binary=str(fake), office_timeout_s=2)
    with serve_app(create_app(settings)) as url:
        r = httpx.post(f"{url}/pdf/ocr", files={"file": ("slow.docx", make_docx(1))}, timeout=60)
        body = problem(r, 504, "OFFICE_TIMEOUT_S=2")
        assert body["timeout_s"] == 2, body
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2, started
    deadline = time.monotonic() + 30
    while (alive := [p for p in started if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes of the converter left running: {alive}"


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed orphan is a zombie until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_without_libreoffice_415_names_the_packages(tiny_checkpoint: Path) -> None:
    settings = make_settings(tiny_checkpoint, office_binary="/nonexistent/soffice")
    with serve_app(create_app(settings)) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "degraded", health
        assert "libreoffice-writer" in health["unavailable"]["office conversion"], health
        r = httpx.post(f"{url}/pdf/ocr", files={"file": ("deck.pptx", make_pptx(1))}, timeout=60)
        body = problem(r, 415, PACKAGES)
        assert body["format"] == "pptx", body
        problem(httpx.post(f"{url}/jobs", files={"file": ("a.docx", make_docx(1))}, timeout=60), 415, PACKAGES)
