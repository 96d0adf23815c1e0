"""`/batch/*` over real HTTP on the tiny random checkpoint, plus the pure functions the batch router builds on.

The seed README's batch examples run verbatim (only host:port changed to the test server's). The random model
cannot be asked for formulas or figures, so markdown building, crop naming and ZIP assembly are checked on given
model texts through the service's own functions (`service.ocr.postprocess`, `web.answers.member_stems`,
`web.answers.batch_zip`), no mocks.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import time
import unicodedata
import zipfile
from pathlib import Path

import httpx
import pytest
import requests
from helpers.images import image_bytes
from helpers.server import make_settings, serve_app, show
from PIL import Image

from config import DOCUMENT_PROMPT
from engines.base import Usage
from errors import InvalidImage
from serve_ocr import create_app
from service.postprocess import PostOptions, postprocess
from service.results import ItemResult
from web.answers import BatchRun, batch_zip, member_stems

FAST = {"mode": "tiny", "max_tokens": "4"}  # 73 image tokens, 4 generated: a file costs ~0.1 s on a CPU
HOSTILE_NAMES = ["../../evil.png", "/abs.png", "a\\b.png", "same.png", "same.png"]
LINK_RE = re.compile(r"!\[\]\(([^)]+)\)")


def truncated_png() -> bytes:
    data = image_bytes("PNG", (64, 64))
    return data[: len(data) // 2]


def write_seed_images(folder: Path) -> None:
    for i in (1, 2, 3):
        (folder / f"img{i}.jpg").write_bytes(image_bytes("JPEG", seed=i))


def post(url: str, files: list[tuple[str, bytes]], **data: str) -> httpx.Response:
    parts = [("files", (name, content, "application/octet-stream")) for name, content in files]
    return httpx.post(url, files=parts, data={**FAST, **data}, timeout=120)


def problem(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, show(resp)
    assert resp.headers["content-type"].startswith("application/problem+json"), show(resp)
    return resp.json()


def open_zip(resp: httpx.Response | requests.Response) -> zipfile.ZipFile:
    archive = zipfile.ZipFile(io.BytesIO(resp.content))
    assert archive.testzip() is None
    return archive


# --------------------------------------------------------------------------- the seed's examples, verbatim


def test_seed_batch_ocr_requests_example(base_url: str, tmp_path: Path, monkeypatch, capsys) -> None:
    write_seed_images(tmp_path)
    monkeypatch.chdir(tmp_path)
    # The seed README's /batch/ocr example as written; only "http://localhost:8000" is the test server's URL.
    # fmt: off
    files = [
        ('files', ('img1.jpg', open('img1.jpg', 'rb'), 'image/jpeg')),
        ('files', ('img2.jpg', open('img2.jpg', 'rb'), 'image/jpeg')),
    ]

    response = requests.post(
        f"{base_url}/batch/ocr",
        files=files,
        data={"prompt": "<image>Extract text"}
    )

    results = response.json()
    for result in results['results']:
        print(f"{result['filename']}: {result['markdown'][:100]}...")
    # fmt: on
    # End of the seed's example.
    assert response.status_code == 200, show(response)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["img1.jpg", "img2.jpg"], printed
    assert [r["status"] for r in results["results"]] != ["failed", "failed"], show(response)
    assert results["files"] == 2 and results["failed"] == 0, show(response)


def test_seed_batch_download_curl_example(base_url: str, tmp_path: Path) -> None:
    write_seed_images(tmp_path)
    seed = """curl -X POST "http://localhost:8000/batch/ocr/download" \\
     -F "files=@img1.jpg" \\
     -F "files=@img2.jpg" \\
     -F "files=@img3.jpg" \\
     -o results.zip"""
    command = seed.replace("http://localhost:8000", base_url)  # the test server's host:port, nothing else
    out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with zipfile.ZipFile(tmp_path / "results.zip") as archive:
        names = set(archive.namelist())
        summary = json.loads(archive.read("summary.json"))
    expected = {"summary.json"} | {f"img{i}{suffix}" for i in (1, 2, 3) for suffix in (".md", "_det.md")}
    assert expected <= names, names
    assert [r["filename"] for r in summary["results"]] == ["img1.jpg", "img2.jpg", "img3.jpg"], summary
    assert summary["failed"] == 0 and summary["prompt"] == DOCUMENT_PROMPT, summary


def test_seed_batch_simple_requests_example(base_url: str, tmp_path: Path, monkeypatch, capsys) -> None:
    write_seed_images(tmp_path)
    monkeypatch.chdir(tmp_path)
    # The seed README's /batch/ocr/simple example as written; only the URL's host:port is the test server's.
    # fmt: off
    files = [
        ('files', open('img1.jpg', 'rb')),
        ('files', open('img2.jpg', 'rb'))
    ]
    response = requests.post(
        f"{base_url}/batch/ocr/simple",
        files=files
    )
    print(response.json())
    # fmt: on
    # End of the seed's example.
    assert response.status_code == 200, show(response)
    assert "img1.jpg" in capsys.readouterr().out
    body = response.json()
    assert [(r["index"], r["filename"]) for r in body["results"]] == [(0, "img1.jpg"), (1, "img2.jpg")], body
    assert all(set(r) == {"index", "filename", "text", "status", "error", "confidence"} for r in body["results"]), body
    assert all("<|ref|>" not in r["text"] and r["error"] is None for r in body["results"]), body


# --------------------------------------------------------------------------- one broken file, hostile names


def test_corrupt_file_gets_its_own_error_and_order_is_kept(base_url: str) -> None:
    files = [(f"page{i}.png", image_bytes(seed=i)) for i in range(5)]
    files[2] = ("broken.png", truncated_png())
    resp = post(f"{base_url}/batch/ocr", files)
    assert resp.status_code == 200, show(resp)
    body = resp.json()
    results = body["results"]
    assert [(r["index"], r["filename"]) for r in results] == [(i, n) for i, (n, _) in enumerate(files)], show(resp)
    broken = results[2]
    assert broken["status"] == "failed" and broken["error"]["status"] == 400, show(resp)
    assert broken["error"]["type"].endswith("/invalid-image"), show(resp)
    assert "truncated or corrupt" in broken["error"]["detail"], show(resp)
    assert broken["width"] is None and broken["usage"] is None, show(resp)
    for r in results[:2] + results[3:]:
        assert r["status"] != "failed" and r["error"] is None, show(resp)
        assert (r["width"], r["height"]) == (48, 32) and r["usage"]["completion_tokens"] <= 4, show(resp)
        assert r["status"] == ("truncated" if r["finish_reason"] == "length" else "ok"), show(resp)
    assert (body["files"], body["failed"], body["ok"] + body["truncated"]) == (5, 1, 4), show(resp)
    assert body["usage"]["image_tokens"] == 4 * 73, show(resp)  # tiny mode, summed over the four good files


def test_hostile_and_duplicate_names_stay_inside_the_zip(base_url: str, tmp_path: Path) -> None:
    files = [(name, image_bytes(seed=i)) for i, name in enumerate(HOSTILE_NAMES)]
    listed = post(f"{base_url}/batch/ocr", files)
    assert listed.status_code == 200, show(listed)
    assert [r["filename"] for r in listed.json()["results"]] == HOSTILE_NAMES, show(listed)

    resp = post(f"{base_url}/batch/ocr/download", files)
    assert resp.status_code == 200, show(resp)
    archive = open_zip(resp)
    names = archive.namelist()
    assert len({n.casefold() for n in names}) == len(names), names
    root = tmp_path.resolve()
    for name in names:
        assert not name.startswith("/") and "\\" not in name and ".." not in name.split("/"), name
        assert not any(unicodedata.category(ch).startswith("C") for ch in name), name
        assert (root / name).resolve().is_relative_to(root), name
    archive.extractall(root)
    extracted = [p for p in root.rglob("*") if p.is_file()]
    assert len(extracted) == len(names) and all(p.resolve().is_relative_to(root) for p in extracted)

    summary = json.loads(archive.read("summary.json"))
    assert [r["filename"] for r in summary["results"]] == HOSTILE_NAMES, summary
    markdowns = [r["members"]["markdown"] for r in summary["results"]]
    assert len(set(markdowns)) == 5 and set(markdowns) <= set(names), summary
    assert {m.removesuffix(".md") for m in markdowns} == {"evil", "abs", "a_b", "same", "same-1"}, summary


# --------------------------------------------------------------------------- limits, parameters, deadline


@pytest.fixture(scope="module")
def strict_url(tiny_checkpoint: Path):
    settings = make_settings(tiny_checkpoint, max_batch_files=3, max_upload_mb=0.01)
    with serve_app(create_app(settings)) as url:
        yield url


def test_too_many_files_is_413_naming_both_numbers_then_a_good_batch_works(strict_url: str) -> None:
    files = [(f"f{i}.png", image_bytes(seed=i)) for i in range(4)]
    body = problem(post(f"{strict_url}/batch/ocr", files), 413)
    assert "4 files" in body["detail"] and "at most 3" in body["detail"], body
    assert (body["files"], body["max_batch_files"]) == (4, 3), body
    ok = post(f"{strict_url}/batch/ocr", files[:3])
    assert ok.status_code == 200 and ok.json()["failed"] == 0, show(ok)


def test_file_over_its_own_limit_fails_alone(strict_url: str) -> None:
    big = image_bytes(size=(96, 96))  # ~27 KB of noise, over MAX_UPLOAD_MB=0.01
    resp = post(f"{strict_url}/batch/ocr", [("big.png", big), ("small.png", image_bytes())])
    assert resp.status_code == 200, show(resp)
    big_result, small_result = resp.json()["results"]
    assert big_result["error"]["status"] == 413 and "MAX_UPLOAD_MB" in big_result["error"]["detail"], show(resp)
    assert small_result["status"] != "failed", show(resp)


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        ({"max_tokens": "0"}, 422, "max_tokens"),
        ({"max_tokens": "99999"}, 422, "MAX_MODEL_LEN"),
        ({"ngram_size": "1"}, 422, "ngram_size"),
        ({"mode": "huge"}, 422, "mode"),
        ({"prompt": "<image><image>two"}, 400, "<image>"),
    ],
)
def test_bad_parameters_refuse_the_batch_once(base_url: str, data: dict, status: int, needle: str) -> None:
    body = problem(post(f"{base_url}/batch/ocr", [("a.png", image_bytes())], **data), status)
    assert needle in body["detail"], body


@pytest.mark.parametrize("path", ["/batch/ocr", "/batch/ocr/download", "/batch/ocr/simple"])
def test_no_files_is_422(base_url: str, path: str) -> None:
    body = problem(httpx.post(base_url + path, data={"prompt": "x"}, timeout=30), 422)
    assert "files" in body["detail"], body


def test_deadline_gives_504_and_aborts_the_engine_work(tiny_checkpoint: Path) -> None:
    with serve_app(create_app(make_settings(tiny_checkpoint, batch_timeout_s=2))) as url:
        files = [(f"long{i}.png", image_bytes(seed=i)) for i in range(3)]
        body = problem(post(f"{url}/batch/ocr", files, max_tokens="8000"), 504)
        assert "BATCH_TIMEOUT_S" in body["detail"], body
        assert httpx.delete(f"{url}/jobs/{body['job_id']}").json()["status"] == "cancelled"  # the rest went on
        for _ in range(50):
            health = httpx.get(f"{url}/health").json()
            if health["in_flight"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.1)
        assert (health["in_flight"], health["waiting"]) == (0, 0), health
        # Un-aborted, the three 8000-token sequences would hold the engine far past this batch's own 2 s.
        after = post(f"{url}/batch/ocr", [("short.png", image_bytes())], max_tokens="2")
        assert after.status_code == 200, show(after)


# --------------------------------------------------------------------------- status, info, OpenAPI


def test_status_info_and_openapi(base_url: str) -> None:
    status = httpx.get(f"{base_url}/batch/status").json()
    assert status["router"] == "batch" and status["ready"] and status["limits"]["max_batch_files"] == 100, status
    info = httpx.get(f"{base_url}/batch/info").json()
    assert {"POST /batch/ocr", "POST /batch/ocr/download", "POST /batch/ocr/simple"} <= set(info["endpoints"])
    assert any("/batch/ocr/download" in e and "-o results.zip" in e for e in info["examples"]), info
    spec = httpx.get(f"{base_url}/openapi.json").json()
    download = spec["paths"]["/batch/ocr/download"]["post"]["responses"]
    assert "application/zip" in download["200"]["content"], download
    assert "413" in download and "504" in download, download
    ocr = spec["paths"]["/batch/ocr"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ocr["$ref"].endswith("/BatchResponse"), ocr
    result = spec["components"]["schemas"]["BatchFileResult"]["properties"]
    assert all("description" in result[f] for f in ("markdown", "text", "status", "error")), result


# --------------------------------------------------------------------------- the router's pure functions


FORMULA_TEXT = (
    "<|ref|>title<|/ref|><|det|>[[10, 10, 990, 80]]<|/det|>\n# Energy\n\n"
    "<|ref|>equation<|/ref|><|det|>[[10, 100, 990, 200]]<|/det|>\n\\[E = mc^2 \\quad (1)\\]\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 500, 499, 999], [500, 500, 999, 999]]<|/det|>\n"
)


@pytest.mark.parametrize("clean", [True, False])
def test_render_markdown_cleans_formulas_only_when_asked(clean: bool) -> None:
    image = Image.new("RGB", (200, 100), "white")
    post = postprocess(FORMULA_TEXT, image, label="doc", options=PostOptions(crop=True, clean_formulas=clean))
    assert "# Energy" in post.markdown and "<|ref|>" not in post.markdown, post.markdown
    if clean:
        assert "\\[E = mc^2\\]" in post.markdown and "\\quad" not in post.markdown, post.markdown
    else:
        assert "\\[E = mc^2 \\quad (1)\\]" in post.markdown, post.markdown
    assert LINK_RE.findall(post.markdown) == ["images/doc_0.jpg", "images/doc_1.jpg"], post.markdown
    sizes = [(c.name, c.width, c.height) for c in post.crops]
    assert sizes == [("images/doc_0.jpg", 100, 50), ("images/doc_1.jpg", 100, 50)], sizes


def test_member_stems_are_safe_distinct_and_never_overwrite_each_other() -> None:
    names = ["x.png", "x_det.png", "X.jpg", "sub/dir/p.png", "sub_dir_p.png", "", "nul.png", "../" * 5 + "z.png"]
    stems = member_stems(names)
    assert stems == ["x", "x_det-1", "X-1", "sub_dir_p", "sub_dir_p-1", "file_5", "_nul", "z"], stems
    members = [m.casefold() for s in stems for m in (f"{s}.md", f"{s}_det.md", f"{s}.error.json")]
    assert len(set(members)) == len(members) and "summary.json" not in members


def test_zip_links_point_at_each_files_own_crops(tmp_path: Path) -> None:
    """Two files of the same name, both with figures: each markdown links its own crops, all present."""
    stems = member_stems(["scan.png", "scan.png", "broken.png"])
    outcomes = []
    for index, color in enumerate(("red", "blue")):
        image = Image.new("RGB", (60, 40), color)
        post = postprocess(FORMULA_TEXT, image, label=stems[index], options=PostOptions(crop=True, clean_formulas=True))
        outcomes.append(
            ItemResult(stems[index], "ok", text=FORMULA_TEXT, finish_reason="stop", usage=Usage(84, 73, 30), post=post)
        )
    outcomes.append(ItemResult(stems[2]).fail(InvalidImage("truncated")))
    run = BatchRun(["scan.png", "scan.png", "broken.png"], outcomes, DOCUMENT_PROMPT, "tiny", True, 0.5)
    built = batch_zip(run)
    with zipfile.ZipFile(io.BytesIO(built)) as archive:
        archive.extractall(tmp_path)
        summary = json.loads(archive.read("summary.json"))
        members = [r["members"] for r in summary["results"]]
        listed = [n for m in members for n in (*m["images"], m["markdown"], m["raw"], m["error"]) if n]
        assert sorted([*listed, "summary.json"]) == sorted(archive.namelist()), archive.namelist()
    for stem, color in zip(stems[:2], ((255, 0, 0), (0, 0, 255)), strict=True):
        links = LINK_RE.findall((tmp_path / f"{stem}.md").read_text())
        assert links == [f"images/{stem}_0.jpg", f"images/{stem}_1.jpg"], links
        for link in links:
            pixel = Image.open(tmp_path / link).convert("RGB").getpixel((5, 5))
            assert all(abs(a - b) < 40 for a, b in zip(pixel, color, strict=True)), (link, pixel)
    assert json.loads((tmp_path / "broken.error.json").read_text())["status"] == 400
    assert (summary["files"], summary["ok"], summary["failed"], summary["usage"]["image_tokens"]) == (3, 2, 1, 146)
