"""DeepSeek-OCR-2 through the service, alone and side by side with DeepSeek-OCR (tiny checkpoints, CPU).

The formula of FACTS section 8 (256 + 144 x tiles + 1) is written out here, independently of
`process.image_process`, and compared with `usage.image_tokens` over HTTP.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import httpx
import pytest
from helpers.facts import facts_image_tokens
from helpers.server import make_settings, serve_app, show
from PIL import Image

from serve_ocr import create_app


def v2_tokens(width: int, height: int) -> int:
    """FACTS 8: global 1024 view (256) + separator, plus 144 per 768 tile when a side is over 768."""
    if width <= 768 and height <= 768:
        return 257
    target = width / height
    grids = sorted({(i, j) for n in range(2, 7) for i in range(1, n + 1) for j in range(1, n + 1) if 2 <= i * j <= 6},
                   key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), math.inf
    for i, j in grids:
        diff = abs(target - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * 768 * 768 * i * j:
            best = (i, j)
    return 257 + 144 * best[0] * best[1]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (240, 240, 240)).save(buf, format="PNG")
    return buf.getvalue()


def tokens_of(url: str, size: tuple[int, int], **data: str) -> httpx.Response:
    return httpx.post(url + "/generate_with_file", files={"file": ("p.png", png(*size))},
                      data={"max_tokens": "1", **data}, timeout=120)


SIZES = [(1, 1), (600, 400), (768, 768), (769, 768), (768, 769), (1190, 1684), (2000, 700), (8000, 300), (300, 8000)]


@pytest.fixture(scope="module")
def v2_url(tiny_checkpoint_v2: Path):
    with serve_app(create_app(make_settings(tiny_checkpoint_v2))) as url:
        yield url


@pytest.mark.parametrize("size", SIZES)
def test_v2_image_tokens_over_http_equal_the_formula(v2_url: str, size: tuple[int, int]) -> None:
    r = tokens_of(v2_url, size)
    assert r.status_code == 200, show(r)
    assert r.json()["usage"]["image_tokens"] == v2_tokens(*size), (size, r.json())


def test_v2_a4_page_is_1121_and_its_one_mode(v2_url: str) -> None:
    assert v2_tokens(1190, 1684) == 1121
    root = httpx.get(v2_url + "/").json()
    assert root["modes"] == ["gundam"] and root["models"][0]["arch"] == "ocr2", root
    r = tokens_of(v2_url, (640, 480), mode="base")
    assert r.status_code == 400 and r.json()["served_modes"] == ["gundam"], show(r)
    assert "gundam" in r.json()["detail"], show(r)


def test_two_models_side_by_side(tiny_checkpoint: Path, tiny_checkpoint_v2: Path) -> None:
    settings = make_settings(None, models=f"ocr={tiny_checkpoint},ocr2={tiny_checkpoint_v2}")
    with serve_app(create_app(settings)) as url:
        root = httpx.get(url + "/").json()
        assert [(m["name"], m["arch"], m["default"]) for m in root["models"]] == [
            ("ocr", "ocr", True), ("ocr2", "ocr2", False)], root
        assert [m["modes"] for m in root["models"]] == [["tiny", "small", "base", "large", "gundam"], ["gundam"]]
        status = httpx.get(url + "/ocr/status").json()
        assert [m["name"] for m in status["models"]] == ["ocr", "ocr2"], status
        for size in ((1190, 1684), (640, 480)):
            default = tokens_of(url, size)
            v1 = tokens_of(url, size, model="ocr")
            v2 = tokens_of(url, size, model="ocr2")
            assert default.status_code == v1.status_code == v2.status_code == 200, (show(v1), show(v2))
            assert default.json()["usage"]["image_tokens"] == v1.json()["usage"]["image_tokens"]
            assert v1.json()["usage"]["image_tokens"] == facts_image_tokens(*size, "gundam"), v1.json()
            assert v2.json()["usage"]["image_tokens"] == v2_tokens(*size), v2.json()
        # A mode only v1 has: fine on v1, a 400 naming v2's modes on v2.
        assert tokens_of(url, (640, 480), model="ocr", mode="base").status_code == 200
        r = tokens_of(url, (640, 480), model="ocr2", mode="base")
        assert r.status_code == 400 and "'ocr2'" in r.json()["detail"] and "gundam" in r.json()["detail"], show(r)
        unknown = tokens_of(url, (640, 480), model="ocr3")
        assert unknown.status_code == 400 and unknown.json()["models"] == ["ocr", "ocr2"], show(unknown)
        assert "ocr, ocr2" in unknown.json()["detail"], show(unknown)
        pdf = httpx.get(url + "/health").json()
        assert {e["model"] for e in pdf["engines"]} == {"ocr", "ocr2"}, pdf


def test_v2_ngram_defaults_differ_from_v1(tiny_checkpoint: Path, tiny_checkpoint_v2: Path) -> None:
    """The official v2 image script guards with 20/90; v1's image routes with 30/90 (both as defaults)."""
    from config import NGRAM_DEFAULTS

    assert NGRAM_DEFAULTS["ocr2"]["image"] == (20, 90) and NGRAM_DEFAULTS["ocr"]["image"] == (30, 90)
    settings = make_settings(None, models=f"ocr={tiny_checkpoint},ocr2={tiny_checkpoint_v2}")
    app = create_app(settings)
    with serve_app(app) as url:
        service = app.state.service
        from config import IMAGE_PROMPT
        from service.request import OcrRequest

        for name, expected in (("ocr", (30, 90)), ("ocr2", (20, 90))):
            req = service.admit(OcrRequest.build(service.settings, prompt="", default_prompt=IMAGE_PROMPT,
                                                 model=name))
            assert (req.sampling.ngram_size, req.sampling.ngram_window) == expected, name
        given = service.admit(OcrRequest.build(service.settings, prompt="", default_prompt=IMAGE_PROMPT,
                                               model="ocr2", ngram=(12, None)))
        assert (given.sampling.ngram_size, given.sampling.ngram_window) == (12, 90)
        r = tokens_of(url, (640, 480), model="ocr2", ngram_size="12")
        assert r.status_code == 200, show(r)
