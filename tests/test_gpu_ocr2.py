"""GPU tests of DeepSeek-OCR-2 served by vLLM through the real service (uvicorn, ENGINE=vllm).

The checkpoint is `make-tiny --arch ocr2 --vision real --decoder small` (real vision sizes, a 2-layer
real-width decoder, real random weights: vLLM's v2 encoder sizes are fixed in code). Skipped unless CUDA and
vLLM are present; `benchmarks/gpu_run.sh tests` runs it with tests/test_gpu.py.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.gpu import GPU_ONLY, VLLM, post_image, post_pdf, serve, show

pytestmark = GPU_ONLY


def png(width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 7 + height)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ocr2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepseek_ocr import make_tiny

    given = os.environ.get("GPU_TEST_MODEL_V2")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    if not VLLM:
        return make_tiny(tmp_path_factory.mktemp("tiny2"), seed=0, arch="ocr2")
    return make_tiny(tmp_path_factory.mktemp("ocr2-small"), seed=0, vision="real", decoder="small", arch="ocr2")


@pytest.fixture(scope="module")
def url2(ocr2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server2") / "server.log"
    env = {"MAX_CONCURRENCY": "16", "DEFAULT_MAX_TOKENS": "32", "LOAD_FORMAT": "auto", "GPU_MEM_UTILIZATION": "0.5"}
    with serve(ocr2_dir, log, **env) as base:
        yield base
    if os.environ.get("GPU_TEST_LOG_V2"):
        Path(os.environ["GPU_TEST_LOG_V2"]).write_text(log.read_text())


def test_v2_is_served_with_its_one_mode(url2: str) -> None:
    root = httpx.get(url2 + "/", timeout=10).json()
    assert root["ready"] and root["modes"] == ["gundam"], root
    assert [(m["name"], m["arch"]) for m in root["models"]] == [("deepseek-ocr-2", "ocr2")], root
    r = post_image(url2, "/ocr/image/simple", {"mode": "base"})
    assert r.status_code == 400 and "gundam" in r.json()["detail"], show(r)


@pytest.mark.parametrize("size", [(600, 400), (768, 768), (769, 768), (1190, 1684), (2000, 700), (300, 3000)])
def test_v2_image_tokens_over_http(url2: str, size: tuple[int, int]) -> None:
    from process.modes import count_image_tokens_v2

    r = post_image(url2, "/generate_with_file", {"max_tokens": "4"}, png(*size))
    assert r.status_code == 200, show(r)
    assert r.json()["usage"]["image_tokens"] == count_image_tokens_v2(*size), (size, r.json())


def test_v2_pdf_and_batch_routes(url2: str) -> None:
    import pymupdf

    doc = pymupdf.open()
    for n in range(2):
        doc.new_page(width=595, height=842).insert_text((72, 72), f"Page {n + 1}", fontsize=20)
    r = post_pdf(url2, "/pdf/ocr", doc.tobytes(), {"max_tokens": "16"})
    assert r.status_code == 200, show(r)
    assert [p["usage"]["image_tokens"] for p in r.json()["pages"]] == [1121, 1121], show(r)
    files = [("files", (f"{i}.png", png(640, 480), "image/png")) for i in range(3)]
    b = httpx.post(url2 + "/batch/ocr", files=files, data={"max_tokens": "8"}, timeout=120)
    assert b.status_code == 200 and b.json()["files"] == 3, show(b)
    assert all(res["usage"]["image_tokens"] == 257 for res in b.json()["results"]), show(b)
