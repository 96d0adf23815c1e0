"""Several images in one prompt (issue 28): `/generate_with_file` `files` and `/v1` image parts, over real HTTP
on the tiny checkpoint with our PyTorch engine. The image-token counts are checked against a second reading of
DEEPSEEK_OCR_FACTS section 3 (tests/helpers/facts.py), image by image and summed."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import openai
import pytest
from helpers.facts import facts_image_tokens
from helpers.images import png_bytes
from helpers.server import make_settings, serve_app, serve_process, show

from serve_ocr import create_app

SMALL = png_bytes(96, 64)  # within 640x640: the global view only
WIDE = png_bytes(900, 300, (20, 120, 200))  # wider than 640: tiled in gundam
SMALL_TOKENS = facts_image_tokens(96, 64, "gundam")
WIDE_TOKENS = facts_image_tokens(900, 300, "gundam")
CAP = 3


@pytest.fixture(scope="module")
def url(tiny_checkpoint: Path):
    app = create_app(make_settings(tiny_checkpoint, default_max_tokens=4, max_images_per_prompt=CAP))
    with serve_app(app) as base:
        yield base


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"page{i}.png", data, "image/png")) for i, data in enumerate(images)]


def test_two_files_one_prompt(url: str) -> None:
    assert WIDE_TOKENS > SMALL_TOKENS == 273  # the two differ, so a swapped or dropped image shows
    r = httpx.post(url + "/generate_with_file", files=files(SMALL, WIDE),
                   data={"prompt": "<image>\n<image>\nFree OCR."}, timeout=120)
    assert r.status_code == 200, show(r)
    usage = r.json()["usage"]
    assert usage["image_tokens"] == SMALL_TOKENS + WIDE_TOKENS, show(r)
    assert usage["per_image"] == [SMALL_TOKENS, WIDE_TOKENS], show(r)
    assert usage["prompt_tokens"] > usage["image_tokens"], show(r)
    # The order sent is the order of the tags.
    r = httpx.post(url + "/generate_with_file", files=files(WIDE, SMALL),
                   data={"prompt": "<image><image> Free OCR."}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["per_image"] == [WIDE_TOKENS, SMALL_TOKENS], show(r)


def test_one_file_still_works_both_ways(url: str) -> None:
    one = httpx.post(url + "/generate_with_file", files={"file": ("a.png", SMALL, "image/png")}, timeout=120)
    assert one.status_code == 200, show(one)
    assert one.json()["usage"]["image_tokens"] == SMALL_TOKENS and one.json()["usage"]["per_image"] == [SMALL_TOKENS]
    listed = httpx.post(url + "/generate_with_file", files=files(SMALL), timeout=120)
    assert listed.status_code == 200 and listed.json()["usage"]["image_tokens"] == SMALL_TOKENS, show(listed)


def test_tag_count_must_match(url: str) -> None:
    r = httpx.post(url + "/generate_with_file", files=files(SMALL, WIDE), data={"prompt": "<image>\nFree OCR."})
    assert r.status_code == 422, show(r)
    assert r.headers["content-type"].startswith("application/problem+json"), show(r)
    assert "1 <image> tag(s) for 2 images" in r.json()["detail"], show(r)
    none = httpx.post(url + "/generate_with_file", data={"prompt": "Free OCR."})
    assert none.status_code == 422 and "no image was sent" in none.json()["detail"], show(none)


def test_past_the_cap_is_413(url: str) -> None:
    r = httpx.post(url + "/generate_with_file", files=files(*[SMALL] * (CAP + 1)),
                   data={"prompt": "<image>" * (CAP + 1) + "Free OCR."})
    assert r.status_code == 413, show(r)
    assert f"{CAP + 1} images in one prompt; at most {CAP}" in r.json()["detail"], show(r)
    assert "MAX_IMAGES_PER_PROMPT" in r.json()["detail"], show(r)


def part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def test_openai_sdk_two_image_parts(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": [part(SMALL), part(WIDE), {"type": "text", "text": "Free OCR."}]}]
    answer = client.chat.completions.create(model="deepseek-ocr", messages=messages, max_tokens=4)
    extra = answer.usage.model_extra or {}
    assert extra.get("image_tokens") == SMALL_TOKENS + WIDE_TOKENS, answer
    assert extra.get("per_image") == [SMALL_TOKENS, WIDE_TOKENS], answer
    assert (answer.model_extra or {}).get("confidence") is not None, answer
    # Tags written by the client are used as they are; a count that differs is refused.
    messages[0]["content"][2]["text"] = "<image>\nFree OCR."
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model="deepseek-ocr", messages=messages, max_tokens=4)
    assert "1 <image> tag(s) for 2 images" in bad.value.message, bad.value.body


def test_two_images_through_an_engine_worker_process(tiny_checkpoint: Path) -> None:
    """The default placement: the engine in a worker process. The second image crosses the socket with the
    request (the first as raw pixels), and the confidence comes back with the last piece."""
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DEFAULT_MAX_TOKENS": "4",
           "DATA_DIR": str(tiny_checkpoint.parent / "multi-image-data")}
    with serve_process(env) as base:
        workers = httpx.get(base + "/health").json()["engines"]
        assert workers and all(e["detail"].get("pid") for e in workers), workers  # not inline
        r = httpx.post(base + "/generate_with_file", files=files(WIDE, SMALL),
                       data={"prompt": "<image>\n<image>\nFree OCR."}, timeout=120)
    assert r.status_code == 200, show(r)
    assert r.json()["usage"]["per_image"] == [WIDE_TOKENS, SMALL_TOKENS], show(r)
    assert r.json()["confidence"]["tokens"] >= 1, show(r)
