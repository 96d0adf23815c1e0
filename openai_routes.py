"""OpenAI-compatible API: `POST /v1/chat/completions` and `GET /v1/models`.

Every OpenAI SDK, Open WebUI, LangChain and LlamaIndex speak this format, so they can use the service with
only a base URL and `API_KEY` as their api_key. One request is one image (an `image_url` data URL) and a
prompt (the text parts of the last user message; `<image>` is placed as the other routes place it). Our
options (`mode`, `ngram_size`, `ngram_window`) travel as extra body fields. Streaming answers OpenAI's SSE
chunks and ends with `data: [DONE]`; a client that goes away stops the engine's generation. Both go through
`OcrService.stream` like every route (quarantine, admission, crash strikes, metrics). Errors come out
in OpenAI's error shape (`web.schemas.openai.OpenAIErrorShape`). The model's text is returned raw, as
`vllm serve` does: a grounding prompt gives grounding tags.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from PIL import Image

import images
from config import FREE_PROMPT
from engines.base import EngineChunk, Usage
from errors import BadRequest, DeadlineExceeded, OcrError
from service.ocr import OcrService
from service.request import OcrRequest
from service.timing import measure
from web.answers import confidence_model
from web.deps import PROMPT_MAX_CHARS, ServiceDep, SettingsDep, deadline
from web.schemas.openai import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    CompletionUsage,
    ModelCard,
    ModelList,
    ModelNotFound,
    openai_error,
)
from web.timing import stamped

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=ERROR_RESPONSES)
_STARTED = int(time.time())


def model_ids(service: OcrService) -> dict[str, str | None]:
    """Accepted model ids -> the served model they mean. Each served model by its name (MODELS, or
    deepseek-ocr / deepseek-ocr-2 for MODEL_PATH); SERVED_MODEL_NAME and checkpoint folder names are aliases."""
    settings = service.settings
    models = service.models
    ids: dict[str, str | None] = {m.name: m.name for m in models}
    default = models[0].name if models else None
    ids.setdefault(settings.served_model_name, default)
    for spec in models:
        base = PurePath(spec.path.rstrip("/\\")).name
        if base:
            ids.setdefault(base, spec.name)
    return ids


def check_model(name: str, service: OcrService) -> str | None:
    """The served model `name` refers to; 404 model_not_found listing the served ones otherwise."""
    ids = model_ids(service)
    if name not in ids:
        served = ", ".join(repr(m) for m in (m.name for m in service.models) or ids)
        raise ModelNotFound(f"The model {name!r} does not exist; this server serves {served}", param="model")
    return ids[name]


# --------------------------------------------------------------------------------------- request parsing


def split_messages(messages: list[ChatMessage]) -> tuple[list[str], str]:
    """(the images' URLs in order, the prompt): images may sit in any message, the prompt is the last user
    message's text. The model keeps no conversation, so earlier turns only lend their images. Several images
    and a prompt without `<image>` tags: one tag per image goes in front, in order."""
    images: list[str] = []
    for message in messages:
        if isinstance(message.content, list):
            images += [_image_url(part.image_url) for part in message.content if part.type == "image_url"]
            bad = sorted({p.type for p in message.content if p.type not in ("text", "image_url")})
            if bad:
                raise BadRequest(f"content parts of type {', '.join(bad)} are not supported; send text and image_url")
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise BadRequest("the messages have no user message; send the prompt and image as a user message")
    content = users[-1].content
    if isinstance(content, list):
        text = "\n".join(p.text for p in content if p.type == "text" and p.text)
    else:
        text = content or ""
    if len(text) > PROMPT_MAX_CHARS:
        raise BadRequest(f"the prompt has {len(text)} characters; at most {PROMPT_MAX_CHARS} are accepted")
    if len(images) > 1 and "<image>" not in text:
        text = "<image>\n" * len(images) + text
    return images, text


def _image_url(value: Any) -> str:
    url = value if isinstance(value, str) else getattr(value, "url", None)
    if not url:
        raise BadRequest("an image_url part has no url; send image_url: {url: 'data:image/png;base64,...'}")
    scheme = url[:8].lower()
    if scheme.startswith(("http://", "https://")):
        raise BadRequest(
            "remote image URLs are not fetched by this server; send the image inline as a base64 data URL "
            "(data:image/png;base64,...)",
            param="messages",
        )
    if not scheme.startswith("data:"):
        raise BadRequest("image_url must be a base64 data URL (data:image/png;base64,...)", param="messages")
    return url


async def decode_url(service: OcrService, url: str) -> Image.Image:
    """Base64 data URL -> RGB image, in the worker pool (a 50 MB string is not decoded on the event loop),
    its pixels reserved in the decoded-pixel budget (MAX_DECODED_MPIX) first, like every route's uploads."""
    settings = service.settings
    with measure("read"):  # the upload's bytes out of the data URL
        data = await service.blocking(images.decode_base64_image, url, max_bytes=settings.max_upload_bytes)
    return await service.decode(data, max_pixels=settings.max_image_pixels, wait_s=settings.generate_timeout_s)


# --------------------------------------------------------------------------------------- routes


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI format)")
async def list_models(request: Request) -> ModelList:
    service: OcrService = request.app.state.service
    names = [m.name for m in service.models] or [service.settings.served_model_name]
    return ModelList(data=[ModelCard(id=name, created=_STARTED) for name in names])


@router.get("/models/{model:path}", response_model=ModelCard, summary="One served model (OpenAI format)")
async def get_model(model: str, request: Request) -> ModelCard:
    check_model(model, request.app.state.service)
    return ModelCard(id=model, created=_STARTED)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="OCR one image in OpenAI's chat format (stream=true: server-sent events)",
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when streaming"}},
)
async def chat_completions(body: ChatCompletionRequest, service: ServiceDep, settings: SettingsDep) -> Any:
    served = check_model(body.model, service)
    urls, prompt = split_messages(body.messages)
    req = OcrRequest.build(
        settings,
        prompt=prompt,
        default_prompt=FREE_PROMPT,
        has_image=bool(urls),
        images=max(1, len(urls)),
        mode=body.mode,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        ngram=(body.ngram_size, body.ngram_window),
        model=served,
    )
    req = service.admit(req)
    pictures = [await decode_url(service, url) for url in urls]
    image: Image.Image | list[Image.Image] | None = pictures if len(pictures) > 1 else pictures[0] if pictures else None
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        pieces = await service.stream(req, image, kind="chat")  # a quarantined input is refused before the 200
        return StreamingResponse(
            stream_chunks(service, pieces, head, include_usage=include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    async with deadline(settings.generate_timeout_s, "GENERATE_TIMEOUT_S"):
        out = await service.complete(req, image, kind="chat")
    return stamped(ChatCompletion(
        **head,
        choices=[Choice(message=AssistantMessage(content=out.text), finish_reason=_finish(out.finish_reason))],
        usage=completion_usage(out.usage),
        confidence=confidence_model(out.confidence),
    ))


def completion_usage(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        image_tokens=usage.image_tokens,
        per_image=usage.per_image,
    )


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


# --------------------------------------------------------------------------------------- streaming


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk(head: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return _event({**head, "object": "chat.completion.chunk", "choices": [choice]})


async def stream_chunks(
    service: OcrService, pieces: AsyncGenerator[EngineChunk, None], head: dict[str, Any], *, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: a role delta, content deltas, the finish chunk, [usage], `[DONE]`.

    GENERATE_TIMEOUT_S bounds waiting for a slot and each wait for the engine's next piece, never the
    time spent sending (a timeout around a `yield` would cancel whatever the response task does next).
    An error once the answer has started goes out as one `data: {"error": ...}` event before `[DONE]`.
    Cancellation (the client went away: the guard cancels the response) closes the engine stream, which
    aborts the generation.
    """
    seconds = service.settings.generate_timeout_s
    end = asyncio.get_running_loop().time() + seconds
    yield _chunk(head, {"role": "assistant", "content": ""})
    finish, usage = "length", Usage()
    try:
        try:
            while True:
                async with asyncio.timeout_at(end):  # the slot wait and each engine wait, never a send
                    piece = await anext(pieces, None)
                if piece is None:
                    break
                if piece.text:
                    yield _chunk(head, {"content": piece.text})
                if piece.finish_reason is not None:
                    finish, usage = piece.finish_reason, piece.usage or usage
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within {seconds:g} s (GENERATE_TIMEOUT_S); its engine work was "
                "aborted. Send less work per request or raise GENERATE_TIMEOUT_S"
            ) from None
    except OcrError as exc:
        yield _event(openai_error(exc.to_problem()))
        yield "data: [DONE]\n\n"
        return
    finally:
        await pieces.aclose()  # a client gone (cancelled here) aborts the engine's generation
    yield _chunk(head, {}, _finish(finish))
    if include_usage:
        yield _event({**head, "object": "chat.completion.chunk", "choices": [],
                      "usage": completion_usage(usage).model_dump()})
    yield "data: [DONE]\n\n"
