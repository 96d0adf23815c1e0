"""`/ocr/image/*` over real HTTP: the seed example, EXIF, and post-processing checked against a replayed text.

The replay engine stands in for the model only where a test checks our post-processing (boxes on the
right pixels, crops of the right sizes): a random-weights model cannot be asked for a given layout.
"""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import httpx
import pytest
from helpers.facts import facts_image_tokens
from helpers.images import jpeg_bytes, png_bytes
from helpers.replay import ReplayEngine, factory
from helpers.server import curl_form_string, make_settings, serve_app, show
from PIL import Image

from serve_ocr import create_app

SEED_CURL = """curl -X POST "http://localhost:8000/ocr/image/advanced" \\
     -F "file=@document.png" \\
     -F "prompt=<image>Extract all text and structure" \\
     -F "draw_boxes=true" \\
     -F "crop_regions=true" \\
     -F "crop_mode=singlepage"
""".strip()

REPLAY_TEXT = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 150, 900, 400]]<|/det|>\nRevenue grew by 12 %.\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 500, 499, 999], [500, 500, 999, 999]]<|/det|>\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 960, 900, 990]]<|/det|>\nFigure 1: growth\n"
)


@pytest.fixture(scope="module")
def replay_url(tiny_checkpoint: Path):
    app = create_app(make_settings(tiny_checkpoint), engine_factory=factory(ReplayEngine(REPLAY_TEXT)))
    with serve_app(app) as url:
        yield url


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_seed_curl_example(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "document.png").write_bytes(png_bytes(900, 1200))
    seed = SEED_CURL.replace("http://localhost:8000", base_url)  # the test server's port
    verbatim = subprocess.run(seed, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert verbatim.returncode == 26, verbatim.stderr  # curl reads `prompt=<image>...` as a file name
    command = curl_form_string(seed) + " -s -w '\\n%{http_code}'"
    out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    body, _, code = out.stdout.rpartition("\n")
    assert code == "200", out.stdout + out.stderr
    import json

    answer = json.loads(body)
    assert answer["mode"] == "base"  # crop_mode=singlepage: global view only
    assert answer["usage"]["image_tokens"] == facts_image_tokens(900, 1200, "base")
    assert decode(answer["annotated_image"]).size == (900, 1200)
    assert {"text", "markdown", "blocks", "crops", "width", "height", "finish_reason"} <= set(answer)


def test_exif_orientation_6_annotated_image_has_oriented_size(base_url: str) -> None:
    data = jpeg_bytes(1000, 600, orientation=6)  # stored landscape, seen portrait 600x1000
    r = httpx.post(
        base_url + "/ocr/image/advanced",
        files={"file": ("photo.jpg", data, "image/jpeg")},
        data={"draw_boxes": "true", "crop_regions": "true", "max_tokens": "4"},
        timeout=60,
    )
    assert r.status_code == 200, show(r)
    body = r.json()
    assert (body["width"], body["height"]) == (600, 1000), body
    image = decode(body["annotated_image"])
    assert image.format == "PNG" and image.size == (600, 1000)
    assert body["usage"]["image_tokens"] == facts_image_tokens(600, 1000, "gundam")


def test_boxes_land_on_expected_pixels(replay_url: str) -> None:
    r = httpx.post(
        replay_url + "/ocr/image/advanced",
        files={"file": ("page.png", png_bytes(1000, 1500), "image/png")},
        data={"draw_boxes": "true", "crop_regions": "true"},
    )
    assert r.status_code == 200, show(r)
    body = r.json()
    blocks = body["blocks"]
    assert [b["label"] for b in blocks] == ["title", "text", "image", "image_caption"]
    assert blocks[0]["text"] == "# Quarterly report"
    # round(v / 999 * size): 100 -> 100 (x, 1000 wide), 50 -> 75, 900 -> 901, 120 -> 180 (y, 1500 high)
    assert blocks[0]["boxes"][0] == {"grid": [100, 50, 900, 120], "pixels": [100, 75, 901, 180]}
    assert blocks[2]["boxes"][1]["pixels"] == [501, 751, 1000, 1500]
    assert body["markdown"].startswith("# Quarterly report")
    assert "![](images/0.jpg)" in body["markdown"] and "![](images/1.jpg)" in body["markdown"]
    assert "<|ref|>" not in body["markdown"] and "<|det|>" not in body["markdown"]
    crops = body["crops"]
    assert [c["name"] for c in crops] == ["images/0.jpg", "images/1.jpg"]
    # [0, 500, 499, 999] -> x 0..round(499.4995)=499, y round(750.75)=751..1500: 499 x 749
    assert (crops[0]["width"], crops[0]["height"]) == (499, 749)
    assert decode(crops[0]["image_base64"]).size == (499, 749)
    annotated = decode(body["annotated_image"]).convert("RGB")
    assert annotated.size == (1000, 1500)
    assert annotated.getpixel((100, 130)) != (200, 30, 30)  # the title's 4 px left border was drawn
    assert annotated.getpixel((990, 300)) == (200, 30, 30)  # outside every box: untouched
    assert body["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 42


def test_draw_and_crop_can_be_turned_off(replay_url: str) -> None:
    r = httpx.post(
        replay_url + "/ocr/image/advanced",
        files={"file": ("page.png", png_bytes(640, 480))},
        data={"draw_boxes": "false", "crop_regions": "false"},
    )
    assert r.status_code == 200, show(r)
    assert r.json()["annotated_image"] is None and r.json()["crops"] == []


def test_simple_route_returns_plain_text(replay_url: str) -> None:
    r = httpx.post(replay_url + "/ocr/image/simple", files={"file": ("page.png", png_bytes(640, 480))})
    assert r.status_code == 200, show(r)
    text = r.json()["text"]
    assert "Quarterly report" in text and "Figure 1: growth" in text
    assert "<|" not in text and "images/" not in text


def test_malformed_output_never_500(tiny_checkpoint: Path) -> None:
    broken = "<|ref|>title<|/ref|><|det|>[[10, 20, 5000, 15], [a, b]]<|/det|>Title<|ref|>text<|det|>[[1,2"
    app = create_app(make_settings(tiny_checkpoint), engine_factory=factory(ReplayEngine(broken)))
    with serve_app(app) as url:
        r = httpx.post(url + "/ocr/image/advanced", files={"file": ("p.png", png_bytes(400, 300))})
        assert r.status_code == 200, show(r)
        assert r.json()["warnings"], r.json()


def test_status_and_info(base_url: str) -> None:
    status = httpx.get(base_url + "/ocr/status")
    assert status.status_code == 200, show(status)
    assert status.json()["ready"] is True and "gundam" in status.json()["modes"]
    info = httpx.get(base_url + "/ocr/info")
    assert info.status_code == 200, show(info)
    assert "POST /ocr/image/advanced" in info.json()["endpoints"] and info.json()["prompts"]
