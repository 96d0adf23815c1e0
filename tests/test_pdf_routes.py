"""The PDF routes over real HTTP on the tiny random checkpoint: pages, ZIP, seed examples, bad inputs, deadline."""

from __future__ import annotations

import base64
import io
import json
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pymupdf
import pytest
from helpers.pdfs import FAILING_SIZE, make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import curl_form_string, make_settings, serve_app, show
from PIL import Image

from engines.base import Usage
from serve_ocr import create_app
from web.answers import attachment, download_stem

PROBLEM = "application/problem+json"
PAGE_SPLIT = "\n<--- Page Split --->\n"
# (width, height) in points as displayed; page 4 is an A4 page with /Rotate 90.
PAGE_SIZES = [(595, 842), (612, 792), (595, 420), (842, 595), (595, 842)]
FAST = {"mode": "tiny", "dpi": "72", "max_tokens": "2"}  # cheapest real OCR: 73 image tokens a page


def post(url: str, path: str, data: bytes, name: str = "report.pdf", **fields: str) -> httpx.Response:
    return httpx.post(url + path, files={"file": (name, data, "application/pdf")}, data=fields, timeout=300)


def assert_ok(r: httpx.Response, pages: list[int]) -> dict:
    assert r.status_code == 200, show(r)
    body = r.json()
    assert [p["page"] for p in body["pages"]] == pages, show(r)
    return body


def assert_problem(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, show(r)
    assert r.headers["content-type"].startswith(PROBLEM), show(r)
    detail = r.json()["detail"]
    for needle in needles:
        assert needle.lower() in detail.lower(), show(r)


# --- the work -------------------------------------------------------------------------------------------
def test_pdf_ocr_five_pages_in_order_with_layout_pdf(base_url: str) -> None:
    r = post(base_url, "/pdf/ocr", make_pdf(), dpi="72", max_tokens="4")
    body = assert_ok(r, [1, 2, 3, 4, 5])
    for page, (width, height) in zip(body["pages"], PAGE_SIZES, strict=True):
        assert (page["width"], page["height"], page["dpi"]) == (width, height, 72), show(r)
        assert page["status"] in ("ok", "truncated") and page["error"] is None, show(r)
        assert page["status"] == ("truncated" if page["finish_reason"] == "length" else "ok"), show(r)
        assert page["usage"]["image_tokens"] > 0 and page["usage"]["completion_tokens"] <= 4, show(r)
    totals = {k: body[k] for k in ("page_count", "pages_processed", "pages_failed")}
    assert totals == {"page_count": 5, "pages_processed": 5, "pages_failed": 0}, show(r)
    assert body["pages_ok"] + body["pages_truncated"] == 5, show(r)
    summed = sum(p["usage"]["prompt_tokens"] for p in body["pages"])
    assert body["usage"]["prompt_tokens"] == summed and body["mode"] == "gundam", show(r)
    assert body["markdown"].count(PAGE_SPLIT) == 4, show(r)
    for crop in body["images"]:  # random weights rarely box an `image` region; when they do, it is linked
        assert crop["name"] in body["markdown"], show(r)
    with pymupdf.open(stream=base64.b64decode(body["layout_pdf"]), filetype="pdf") as layout:
        assert layout.page_count == 5, show(r)
        sizes = [(round(pg.rect.width), round(pg.rect.height)) for pg in layout]
        assert sizes == PAGE_SIZES, sizes  # drawn pages keep the source pages' size in points


def test_pdf_download_zip_members(base_url: str) -> None:
    r = post(base_url, "/pdf/ocr/download", make_pdf(), **FAST)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", show(r)
    assert r.headers["content-disposition"] == 'attachment; filename="report.zip"', show(r)
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    names = set(archive.namelist())
    fixed = {"report.md", "report_det.mmd", "report_layouts.pdf", "report_searchable.pdf", "pages.json"}
    assert fixed <= names, names
    assert all(n.startswith("images/") for n in names - fixed), names
    manifest = json.loads(archive.read("pages.json"))
    assert [p["page"] for p in manifest["pages"]] == [1, 2, 3, 4, 5], manifest
    assert all("usage" in p and "blocks" in p and "status" in p for p in manifest["pages"]), manifest
    assert "base64" not in archive.read("pages.json").decode(), "pages.json must not embed base64"
    assert archive.read("report.md").decode().count(PAGE_SPLIT) == 4
    assert archive.read("report_det.mmd").decode().count(PAGE_SPLIT) == 4
    with pymupdf.open(stream=archive.read("report_layouts.pdf"), filetype="pdf") as layout:
        assert layout.page_count == 5


def test_download_of_a_non_ascii_name(base_url: str) -> None:
    r = post(base_url, "/pdf/ocr/download", make_pdf(1), name="年報 2024.pdf", draw_layouts="false", **FAST)
    assert r.status_code == 200, show(r)
    assert r.headers["content-disposition"].endswith("filename*=UTF-8''%E5%B9%B4%E5%A0%B1%202024.zip"), show(r)
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert sorted(names) == ["pages.json", "年報 2024.md", "年報 2024_det.mmd", "年報 2024_searchable.pdf"], names


def test_page_selection_keeps_truncated_pages(base_url: str) -> None:
    r = post(base_url, "/pdf/ocr", make_pdf(), pages="2-3", mode="tiny", dpi="72", max_tokens="1")
    body = assert_ok(r, [2, 3])
    assert (body["page_count"], body["pages_processed"]) == (5, 2), show(r)
    # Random weights almost never emit EOS at once: pages stop at max_tokens and are kept, marked truncated.
    assert body["pages_truncated"] >= 1 and body["pages_ok"] + body["pages_truncated"] == 2, show(r)
    for page in body["pages"]:
        assert page["status"] == ("truncated" if page["finish_reason"] == "length" else "ok"), show(r)
    assert body["markdown"].count(PAGE_SPLIT) == 1 and len(body["layout_pdf"]) > 100, show(r)


def test_simple_text_per_page(base_url: str) -> None:
    r = post(base_url, "/pdf/ocr/simple", make_pdf(3), **FAST)
    body = assert_ok(r, [1, 2, 3])
    assert set(body["pages"][0]) == {"page", "text", "status", "finish_reason", "error", "confidence"}, show(r)
    assert body["text"] == PAGE_SPLIT.join(p["text"] for p in body["pages"]), show(r)
    assert "<|ref|>" not in body["text"] and "<|det|>" not in body["text"], show(r)
    assert body["page_count"] == 3 and body["pages_failed"] == 0, show(r)


# --- grounded output, replayed: the model's text is fixed so figures and failures can be checked -------
REPLAY_TEXT = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 500, 499, 999], [500, 500, 999, 999]]<|/det|>\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 960, 900, 990]]<|/det|>\nFigure 1: growth\n"
)


@pytest.fixture(scope="module")
def replay_url(tiny_checkpoint: Path):
    engine = ReplayEngine(REPLAY_TEXT, usage=Usage(10, 73, 42), fail_on_size=FAILING_SIZE)
    app = create_app(make_settings(tiny_checkpoint), engine_factory=factory(engine))
    with serve_app(app) as url:
        yield url


def test_figures_extracted_and_a_failed_page_kept(replay_url: str) -> None:
    r = post(replay_url, "/pdf/ocr", make_pdf(3), dpi="72")
    body = assert_ok(r, [1, 2, 3])
    first, failed, third = body["pages"]
    assert failed["status"] == "failed" and "replayed failure" in failed["error"], show(r)
    assert failed["text"] == "" and failed["usage"]["completion_tokens"] == 0 and failed["dpi"] == 72, show(r)
    assert body["pages_failed"] == 1 and body["pages_ok"] == 2 and "page 2 failed" in body["markdown"], show(r)
    assert first["status"] == "ok" and first["finish_reason"] == "stop", show(r)
    assert [b["label"] for b in first["blocks"]] == ["title", "image", "image_caption"], show(r)
    assert first["blocks"][0]["boxes"][0]["pixels"] == [60, 42, 536, 101], show(r)  # 0..999 grid -> 595x842
    assert "![](images/1_0.jpg)" in first["markdown"] and "<|ref|>" not in first["markdown"], show(r)
    assert "![](images/3_1.jpg)" in third["markdown"], show(r)
    names = [c["name"] for c in body["images"]]
    assert names == ["images/1_0.jpg", "images/1_1.jpg", "images/3_0.jpg", "images/3_1.jpg"], names
    for crop in body["images"]:
        assert crop["name"] in body["markdown"], show(r)
        figure = Image.open(io.BytesIO(base64.b64decode(crop["image_base64"])))
        assert figure.format == "JPEG" and figure.size == (crop["width"], crop["height"]), crop["name"]
    with pymupdf.open(stream=base64.b64decode(body["layout_pdf"]), filetype="pdf") as layout:
        assert layout.page_count == 2, show(r)  # the failed page has no drawing

    z = post(replay_url, "/pdf/ocr/download", make_pdf(3), dpi="72")
    assert z.status_code == 200, show(z)
    archive = zipfile.ZipFile(io.BytesIO(z.content))
    assert set(names) <= set(archive.namelist()), archive.namelist()
    assert "![](images/3_0.jpg)" in archive.read("report.md").decode()
    assert "<|ref|>image<|/ref|>" in archive.read("report_det.mmd").decode()
    assert json.loads(archive.read("pages.json"))["pages"][1]["status"] == "failed"

    s = post(replay_url, "/pdf/ocr/simple", make_pdf(3), dpi="72")
    simple = assert_ok(s, [1, 2, 3])
    assert [p["status"] for p in simple["pages"]] == ["ok", "failed", "ok"], show(s)
    assert "Quarterly report" in simple["text"] and "<|" not in simple["text"] and "images/" not in simple["text"]


# --- the seed's examples, verbatim ----------------------------------------------------------------------
SEED_CURL_PDF = r'''curl -X POST "http://localhost:8000/pdf/ocr" \
     -F "file=@report.pdf" \
     -F "prompt=<image>\n<|grounding|>Convert to markdown" \
     -F "draw_layouts=true" \
     -F "extract_images=true" \
     -F "dpi=144"'''

SEED_PY_PDF_SIMPLE = """
import requests

# 測試 PDF
response = requests.post(
    "http://localhost:8000/pdf/ocr/simple",
    files={"file": open("test.pdf", "rb")}
)
print(response.json()["text"])
"""


def run_seed(command: str, cwd: Path, url: str) -> subprocess.CompletedProcess[str]:
    # Verbatim except the host:port: the seed talks to localhost:8000, the test server has its own port.
    command = command.replace("http://localhost:8000", url)
    return subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_seed_curl_pdf_ocr(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(make_pdf(2))
    verbatim = run_seed(SEED_CURL_PDF, tmp_path, base_url)
    assert verbatim.returncode == 26, verbatim.stderr  # curl reads `-F "prompt=<image>..."` as a file name
    out = run_seed(curl_form_string(SEED_CURL_PDF) + " -s -w '\\n%{http_code}'", tmp_path, base_url)
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200", f"{out.stdout[:3000]}\n{out.stderr}"
    answer = json.loads(body)
    assert [p["page"] for p in answer["pages"]] == [1, 2] and answer["layout_pdf"], body[:3000]
    assert {p["dpi"] for p in answer["pages"]} == {144}, body[:3000]
    # The typed `\n` reached the model as a newline: same prompt length as the prompt with a real newline.
    real = post(base_url, "/pdf/ocr", make_pdf(1), prompt="<image>\n<|grounding|>Convert to markdown", **FAST)
    usages = (answer["pages"][0]["usage"], assert_ok(real, [1])["pages"][0]["usage"])
    text_tokens = [u["prompt_tokens"] - u["image_tokens"] for u in usages]
    assert text_tokens[0] == text_tokens[1], (text_tokens, body[:3000])


def test_seed_requests_pdf_simple(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "test.pdf").write_bytes(make_pdf(2))
    (tmp_path / "seed.py").write_text(SEED_PY_PDF_SIMPLE.replace("http://localhost:8000", base_url))
    out = run_seed(f"{shlex.quote(sys.executable)} seed.py", tmp_path, base_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("<--- Page Split --->") == 1, out.stdout


# --- bad inputs -----------------------------------------------------------------------------------------
def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


ENCRYPTED = {"encryption": pymupdf.PDF_ENCRYPT_AES_256, "user_pw": "s3cret", "owner_pw": "owner"}
BAD_INPUTS = {
    "encrypted, no password": (make_pdf(1, **ENCRYPTED), {}, 400, ["encrypted", "password"]),
    "encrypted, wrong password": (make_pdf(1, **ENCRYPTED), {"password": "nope"}, 400, ["password", "wrong"]),
    "truncated": (make_pdf(2)[:-900], {}, 400, ["truncated"]),
    "a PNG named .pdf": (png_bytes(), {}, 415, ["PNG"]),
    "a text file named .pdf": (b"hello, this is not a PDF\n" * 20, {}, 415, ["text file"]),
    "empty": (b"", {}, 400, ["empty"]),
    "page beyond the end": (make_pdf(5), {"pages": "9"}, 400, ["page 9", "5 pages"]),
    "page range garbage": (make_pdf(2), {"pages": "1-x"}, 400, ["'1-x'"]),
    "dpi too high": (make_pdf(1), {"dpi": "500"}, 422, ["dpi", "300"]),
    "dpi too low": (make_pdf(1), {"dpi": "10"}, 422, ["dpi", "72"]),
    "max_tokens 0": (make_pdf(1), {"max_tokens": "0"}, 422, ["max_tokens"]),
    "unknown mode": (make_pdf(1), {"mode": "huge"}, 422, ["mode"]),
    "n-gram window below its size": (make_pdf(1), {"ngram_size": "20", "ngram_window": "5"}, 422, ["ngram"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_problem_then_good_request_works(base_url: str, case: str) -> None:
    data, fields, status, needles = BAD_INPUTS[case]
    assert_problem(post(base_url, "/pdf/ocr", data, **fields), status, *needles)
    assert_ok(post(base_url, "/pdf/ocr", make_pdf(1), **FAST), [1])


def test_encrypted_pdf_with_its_password(base_url: str) -> None:
    r = post(base_url, "/pdf/ocr/simple", make_pdf(2, **ENCRYPTED), password="s3cret", **FAST)
    assert_ok(r, [1, 2])


@pytest.fixture(scope="module")
def strict_url(tiny_checkpoint: Path):
    with serve_app(create_app(make_settings(tiny_checkpoint, max_pdf_pages=3, max_image_pixels=300_000))) as url:
        yield url


def test_too_many_pages_names_both_numbers(strict_url: str) -> None:
    assert_problem(post(strict_url, "/pdf/ocr", make_pdf(5)), 413, "5 pages", "limit of 3 pages")
    assert_ok(post(strict_url, "/pdf/ocr", make_pdf(3), **FAST), [1, 2, 3])


def test_big_page_rendered_lower_and_unrenderable_page_kept_as_error(strict_url: str) -> None:
    doc = pymupdf.open()
    doc.new_page(width=595, height=842)  # 1190x1684 at 144 dpi: over 300,000 pixels, so rendered lower
    doc.new_page(width=100_000, height=100_000)  # over the limit even at 1 dpi: this page fails
    doc.new_page(width=144, height=144)
    r = post(strict_url, "/pdf/ocr", doc.tobytes(), mode="tiny", dpi="144", max_tokens="2")
    body = assert_ok(r, [1, 2, 3])
    first, giant, small = body["pages"]
    assert first["dpi"] < 144 and first["width"] * first["height"] <= 300_000, show(r)
    assert "144 dpi" in first["note"] and str(first["dpi"]) in first["note"], show(r)
    assert giant["status"] == "failed" and "too large" in giant["error"] and giant["usage"]["prompt_tokens"] == 0
    assert small["dpi"] == 144 and small["note"] is None and small["status"] != "failed", show(r)
    assert body["pages_failed"] == 1 and body["markdown"].count(PAGE_SPLIT) == 2, show(r)
    assert "page 2 failed" in body["markdown"], show(r)
    with pymupdf.open(stream=base64.b64decode(body["layout_pdf"]), filetype="pdf") as layout:
        assert layout.page_count == 2  # the failed page has no drawing


def test_deadline_is_504_and_aborts_every_page(tiny_checkpoint: Path) -> None:
    app = create_app(make_settings(tiny_checkpoint, pdf_timeout_s=1.5, max_concurrency=2))
    with serve_app(app) as url:
        r = post(url, "/pdf/ocr", make_pdf(5), dpi="144", max_tokens="400")
        assert_problem(r, 504, "PDF_TIMEOUT_S")
        job = r.json()["job_id"]  # the finished pages went to a job that goes on: cancel it
        assert httpx.delete(f"{url}/jobs/{job}").json()["status"] == "cancelled"
        health: dict = {}
        for _ in range(50):  # the aborted pages give their engine slots back within a decode step
            health = httpx.get(url + "/health").json()
            if health["in_flight"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.1)
        assert health["in_flight"] == 0 and health["waiting"] == 0, health
        assert_ok(post(url, "/pdf/ocr", make_pdf(1), **FAST), [1])


# --- contract -------------------------------------------------------------------------------------------
def test_status_info_and_openapi(base_url: str) -> None:
    status = httpx.get(base_url + "/pdf/status")
    assert status.status_code == 200 and status.json()["available"] and status.json()["ready"], show(status)
    assert status.json()["limits"]["max_pdf_pages"] == 500, show(status)
    info = httpx.get(base_url + "/pdf/info")
    assert info.status_code == 200, show(info)
    assert {"dpi", "pages", "password"} <= set(info.json()["parameters"]), show(info)
    assert any("/pdf/ocr" in e and "dpi=144" in e for e in info.json()["examples"]), show(info)
    paths = httpx.get(base_url + "/openapi.json").json()["paths"]
    zip_ok = paths["/pdf/ocr/download"]["post"]["responses"]["200"]["content"]
    assert list(zip_ok) == ["application/zip"], zip_ok
    for path, model in (("/pdf/ocr", "PdfOcrResponse"), ("/pdf/ocr/simple", "PdfSimpleResponse")):
        schema = paths[path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(model), schema


def test_download_names_are_safe() -> None:
    assert download_stem("report.v2.pdf") == "report.v2"
    assert download_stem("../../etc/passwd.pdf") == "passwd"
    assert download_stem("C:\\Users\\me\\scan.PDF") == "scan"
    assert download_stem(None) == "document" and download_stem(".pdf") == "pdf"
    assert attachment(download_stem('we"ird.pdf') + ".zip") == 'attachment; filename="we_ird.zip"'
    assert download_stem("new\nline.pdf") == "newline"
