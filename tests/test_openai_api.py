"""`/v1/chat/completions` and `/v1/models` driven by the official `openai` SDK against a real server.

The tiny random checkpoint answers under greedy decoding, so the streamed text must equal the non-streamed
text token for token. A slow replay engine stands in for the model only where a test needs a generation
that is still running (client disconnect, deadline).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers.facts import facts_image_tokens
from helpers.images import png_bytes
from helpers.replay import ReplayEngine, SlowEngine, factory
from helpers.server import make_settings, serve_app, show

from serve_ocr import create_app

KEY = "test-key-1"
IMAGE = png_bytes(96, 64)
DATA_URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


def user(text: str | None = "Free OCR.", url: str | None = DATA_URL) -> list[dict]:
    content: list[dict] = []
    if url is not None:
        content.append({"type": "image_url", "image_url": {"url": url}})
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def url(tiny_checkpoint: Path):
    app = create_app(make_settings(tiny_checkpoint, api_key=KEY, default_max_tokens=6))
    with serve_app(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="deepseek-ocr", messages=user(), max_tokens=6, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == "deepseek-ocr", answer
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length"), answer
    usage = answer.usage
    assert usage is not None and 1 <= usage.completion_tokens <= 6, answer
    assert usage.prompt_tokens > facts_image_tokens(96, 64, "gundam"), answer  # vision tokens + the prompt's
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, answer

    chunks = list(client.chat.completions.create(
        model="deepseek-ocr", messages=user(), max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks), chunks
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [choice.finish_reason], chunks
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content, (streamed, choice.message.content)
    assert not chunks[-1].choices and chunks[-1].usage == usage, chunks[-1]


def test_extra_body_options_and_max_completion_tokens(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="deepseek-ocr", messages=user(), max_completion_tokens=2, extra_body={"mode": "tiny", "ngram_size": 0}
    )
    assert answer.usage is not None and answer.usage.completion_tokens <= 2, answer
    assert facts_image_tokens(96, 64, "tiny") < answer.usage.prompt_tokens < facts_image_tokens(96, 64, "small")
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model="deepseek-ocr", messages=user(), extra_body={"mode": "huge"})
    assert "mode 'huge' is not a mode" in bad.value.message, bad.value.body


def test_models_list_and_unknown_model(client: openai.OpenAI, tiny_checkpoint: Path) -> None:
    assert [m.id for m in client.models.list()] == ["deepseek-ocr"]
    assert client.models.retrieve("deepseek-ocr").id == "deepseek-ocr"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    answer = client.chat.completions.create(model=tiny_checkpoint.name, messages=user(), max_tokens=1)
    assert answer.model == tiny_checkpoint.name, answer  # the MODEL_PATH basename is accepted too
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=user())
    assert missing.value.code == "model_not_found" and missing.value.param == "model", missing.value.body
    assert "this server serves 'deepseek-ocr'" in missing.value.message


def test_remote_url_and_too_many_images_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as remote:
        client.chat.completions.create(model="deepseek-ocr", messages=user(url="https://example.com/scan.png"))
    assert "remote image URLs are not fetched" in remote.value.message, remote.value.body
    five = user(text=None) * 4 + user()  # MAX_IMAGES_PER_PROMPT is 4 by default
    with pytest.raises(openai.APIStatusError) as several:
        client.chat.completions.create(model="deepseek-ocr", messages=five)
    assert several.value.status_code == 413, several.value.body
    assert "5 images in one prompt; at most 4" in several.value.message, several.value.body


def test_wrong_key_refused(url: str) -> None:
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.code == "invalid_api_key", refused.value.body
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="deepseek-ocr", messages=user())


def test_errors_on_v1_are_openai_shaped_and_elsewhere_problem_json(url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/chat/completions", json={"model": "deepseek-ocr", "messages": user(),
                                                          "temperature": 5}, headers=auth)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json", show(r)
    error = r.json()["error"]
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error", show(r)
    assert set(error) == {"message", "type", "param", "code"}, show(r)
    broken = {"model": "deepseek-ocr", "messages": user(url="data:image/png;base64,!!")}
    r = httpx.post(url + "/v1/chat/completions", json=broken, headers=auth)
    assert r.status_code == 400 and "base64" in r.json()["error"]["message"], show(r)
    r = httpx.get(url + "/v1/nothing-here", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "http_404", show(r)
    r = httpx.get(url + "/ocr/status")  # no key: the rest of the API keeps problem+json
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", show(r)


def test_client_disconnect_stops_the_stream_and_deadline_ends_it(tiny_checkpoint: Path) -> None:
    engine = SlowEngine(step_s=0.05)
    settings = make_settings(tiny_checkpoint, generate_timeout_s=1.0)
    with serve_app(create_app(settings, engine_factory=factory(engine))) as base:
        body = {"model": "deepseek-ocr", "messages": user(), "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), show(r)
            lines = r.iter_lines()
            first = [next(lines) for _ in range(4)]
            assert any('"content": "word "' in line for line in first), first
        deadline = time.monotonic() + 5
        while (engine.running or not engine.aborted) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running == 0 and len(engine.aborted) == 1, (engine.running, engine.aborted)

        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)  # 200 pieces x 0.05 s > 1 s
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", r.text[-500:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "deadline_exceeded" and "GENERATE_TIMEOUT_S" in error["message"], error
        assert len(engine.aborted) == 2, engine.aborted
        r = httpx.post(base + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["type"] == "server_error", show(r)


def test_data_url_image_is_counted_by_the_pixel_budget(tmp_path: Path) -> None:
    """A data-URL image is decoded like every upload: its pixels reserved first (MAX_DECODED_MPIX); one over
    the whole budget is a 413 before any pixel is decoded, in OpenAI's error shape."""
    settings = make_settings(None, data_dir=str(tmp_path), max_decoded_mpix=0.005)  # 5,000 pixels
    with serve_app(create_app(settings, engine_factory=factory(ReplayEngine("text")))) as base:
        small = "data:image/png;base64," + base64.b64encode(png_bytes(64, 48)).decode()
        body = {"model": "deepseek-ocr", "messages": user(url=small)}
        ok = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert ok.status_code == 200, show(ok)
        r = httpx.post(base + "/v1/chat/completions", json={**body, "messages": user()}, timeout=60)  # 96 x 64
        assert r.status_code == 413, show(r)
        assert "MAX_DECODED_MPIX" in r.json()["error"]["message"], show(r)
