"""The server process never loads MuPDF or torch: PDFs (the text layer too) live in render processes, models in
engine worker processes. Checked on a real `uvicorn serve_ocr:app` (engines in worker processes, the default) by
reading the libraries mapped into the server process after every route that touches a PDF or a model. Without
PyMuPDF the PDF router drops out and says why, and the rest of the app works.
"""

from __future__ import annotations

import base64
import io
import os
import time
import zipfile
from pathlib import Path

import httpx
import pymupdf
from helpers.server import serve_process, show
from PIL import Image, ImageDraw

from ocr_utils import PAGE_SPLIT, plain_text
from outputs.searchable import layer_text

# What MuPDF and torch map: PyMuPDF's extensions (_mupdf, _fitz / _extra) and libmupdf*, torch's _C and libtorch*.
FORBIDDEN = ("mupdf", "fitz", "libtorch", "torch/_C", "torch/lib")


def squeeze(text: str) -> str:
    return "".join(text.split())


def make_pdf(pages: int) -> bytes:
    doc = pymupdf.open()
    for n in range(1, pages + 1):
        page = doc.new_page(width=300, height=200)
        page.insert_text((30, 60), f"Page {n} of the report", fontsize=14)
    return doc.tobytes()


def make_png() -> bytes:
    image = Image.new("RGB", (240, 120), "white")
    ImageDraw.Draw(image).text((10, 50), "an image to read", fill="black")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def server_pid(url: str) -> int:
    """The uvicorn process listening on `url`'s port (found by its command line)."""
    port = url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve_ocr:app" in argv and b"--port" in argv and port.encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no server process for {url}")


def forbidden_libraries(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split()[-1] for line in f if "/" in line}
    return {p for p in paths if any(name in p for name in FORBIDDEN)}


def check_layer(pdf: bytes, texts: list[str]) -> None:
    """A valid PDF with one page per text, each page's text layer holding that text (the model's answer)."""
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        assert doc.page_count == len(texts), doc.page_count
        for page, text in zip(doc, texts, strict=True):
            assert squeeze(page.get_text()).endswith(squeeze(layer_text(plain_text(text)))), (page.get_text(), text)


def wait_job(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 180
    while True:
        job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_server_process_maps_no_mupdf_and_no_torch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # ENGINE, DEVICE and GPUS at their defaults (auto): choosing them must not import torch here either.
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "auto", "DEVICE": "auto", "DEFAULT_MAX_TOKENS": "12",
           "DATA_DIR": str(tmp_path / "data"), "ENGINE_WORKERS": "process"}
    with serve_process(env) as url:
        pid = server_pid(url)
        r = httpx.post(url + "/ocr/image/advanced", files={"file": ("a.png", make_png())}, timeout=120)
        assert r.status_code == 200, show(r)

        source = make_pdf(3)
        r = httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", source)},
                       data={"dpi": "72", "searchable_pdf": "true", "pages": "1,3"}, timeout=120)
        assert r.status_code == 200, show(r)
        check_layer(base64.b64decode(r.json()["searchable_pdf"]), [p["text"] for p in r.json()["pages"]])

        r = httpx.post(url + "/pdf/ocr/download", files={"file": ("d.pdf", source)}, data={"dpi": "72"}, timeout=120)
        assert r.status_code == 200, show(r)
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            check_layer(z.read("d_searchable.pdf"), z.read("d_det.mmd").decode().split(PAGE_SPLIT))

        r = httpx.post(url + "/batch/ocr/download", files=[("files", ("b.png", make_png()))], timeout=120)
        assert r.status_code == 200, show(r)
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            check_layer(z.read("b_searchable.pdf"), [z.read("b_det.md").decode()])

        r = httpx.post(url + "/jobs", files={"file": ("j.pdf", make_pdf(2))}, data={"dpi": "72"}, timeout=60)
        assert r.status_code == 202, show(r)
        job = wait_job(url, r.json()["id"])
        assert job["status"] == "done", job
        r = httpx.get(f"{url}/jobs/{job['id']}/download", timeout=60)
        assert r.status_code == 200, show(r)
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            check_layer(z.read("j_searchable.pdf"), z.read("j_det.mmd").decode().split(PAGE_SPLIT))

        loaded = forbidden_libraries(pid)
        assert not loaded, f"the server process {pid} mapped {sorted(loaded)}"
        assert os.path.exists(f"/proc/{pid}")  # the pid read was the live server's


def test_without_pymupdf_the_pdf_router_drops_out_and_the_rest_works(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pymupdf.py").write_text("raise ImportError('PyMuPDF is not installed (test shadow)')\n")
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DEFAULT_MAX_TOKENS": "8",
           "DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(shadow)}
    with serve_process(env) as url:
        routers = httpx.get(url + "/", timeout=30).json()["routers"]
        assert not routers["pdf"]["available"] and "PyMuPDF" in routers["pdf"]["reason"], routers
        assert all(state["available"] for name, state in routers.items() if name != "pdf"), routers
        status = httpx.get(url + "/pdf/status", timeout=30)
        assert status.status_code == 200 and not status.json()["available"], show(status)
        assert "PyMuPDF" in status.json()["reason"], show(status)
        assert httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", b"%PDF-1.4")}, timeout=30).status_code == 404

        r = httpx.post(url + "/ocr/image/advanced", files={"file": ("a.png", make_png())}, timeout=120)
        assert r.status_code == 200, show(r)
        # The batch ZIP has no searchable PDF without PyMuPDF; the rest of it is there.
        r = httpx.post(url + "/batch/ocr/download", files=[("files", ("b.png", make_png()))], timeout=120)
        assert r.status_code == 200, show(r)
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            names = z.namelist()
        assert "b.md" in names and "b_searchable.pdf" not in names, names


def test_a_searchable_pdf_past_its_deadline_is_a_504_naming_the_setting(tiny_checkpoint: Path) -> None:
    """A render process that does not finish the text layer in time is killed: a problem naming the setting, not a
    500 or a hung request; the pages' OCR still answers without it, on a fresh render process."""
    from helpers.server import make_settings, serve_app

    from serve_ocr import create_app

    # No text layer is written in a millisecond (the font subsetting alone takes longer).
    settings = make_settings(tiny_checkpoint, pdf_searchable_timeout_s=0.001)
    with serve_app(create_app(settings)) as url:
        for route, fields in (("/pdf/ocr", {"searchable_pdf": "true"}), ("/pdf/ocr/download", {})):
            r = httpx.post(url + route, files={"file": ("r.pdf", make_pdf(1))}, data={"dpi": "72", **fields},
                           timeout=120)
            assert r.status_code == 504 and r.headers["content-type"].startswith("application/problem+json"), show(r)
            assert "PDF_SEARCHABLE_TIMEOUT_S" in r.json()["detail"], show(r)
        r = httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", make_pdf(1))}, data={"dpi": "72"}, timeout=120)
        assert r.status_code == 200 and r.json()["searchable_pdf"] is None, show(r)
