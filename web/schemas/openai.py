"""OpenAI chat-completions wire format: request and answer models, and OpenAI's error shape for `/v1/*`.

OpenAI SDKs (and Open WebUI, LangChain, LlamaIndex) read errors as `{"error": {"message", "type", "param",
"code"}}`, not problem+json. `OpenAIErrorShape` rewrites every problem+json answer under `/v1/` into that
shape at the ASGI level, so the guard's 401/413, the app's 404/405/422 and the router's own errors all come
out the same way; the rest of the API keeps problem+json. It imports nothing heavier than pydantic, so the
app can install it whether or not the router imports.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from errors import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE_BASE, OcrError
from web.schemas.common import CONFIDENCE, EXAMPLE_PNG_BASE64, TIMING, ConfidenceModel, StageTimes

OPENAI_PREFIX = "/v1/"


# --------------------------------------------------------------------------------------- requests


class ImageUrl(BaseModel):
    url: str = Field(description="`data:image/...;base64,...`; remote http(s) URLs are refused")
    detail: str | None = Field(None, description="Accepted and ignored (the mode decides the resolution)")


class ContentPart(BaseModel):
    """A part of a message's content; only `text` and `image_url` parts are understood."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Fields OpenAI defines that OCR has no use for are accepted and ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "deepseek-ocr",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "Free OCR."},
                                {"type": "image_url",
                                 "image_url": {"url": f"data:image/png;base64,{EXAMPLE_PNG_BASE64}"}},
                            ],
                        }
                    ],
                    "max_tokens": 64,
                }
            ]
        },
    )

    model: str = Field(description="The served model id (see GET /v1/models)", examples=["deepseek-ocr"])
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=131072, description="Most tokens to generate; <= MAX_MODEL_LEN")
    max_completion_tokens: int | None = Field(None, ge=1, le=131072, description="Wins over max_tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (recommended for OCR)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Our options, sent by OpenAI SDKs through `extra_body`.
    mode: str | None = Field(None, description="Resolution mode; default from the server's settings")
    ngram_size: int | None = Field(None, ge=0, le=512, description="No-repeat n-gram size; 0 = off; default: the model")
    ngram_window: int | None = Field(None, ge=0, le=8192, description="Tokens the n-gram guard looks back over")


# --------------------------------------------------------------------------------------- answers


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens, the image's vision tokens included")
    completion_tokens: int
    total_tokens: int
    # Extensions (not OpenAI fields; the SDKs keep them as extra attributes).
    image_tokens: int = Field(0, description="Vision tokens of every image of the prompt together")
    per_image: list[int] = Field(default_factory=list, description="Vision tokens of each image, in order")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE + " (not an OpenAI field)")
    timing: StageTimes | None = Field(None, description=TIMING + " (not an OpenAI field; SDKs ignore it)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepseek-ocr-service"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong and what is allowed")
    type: str = Field(description="invalid_request_error, authentication_error, server_error ...")
    param: str | None = Field(None, description="The request field at fault, when one is")
    code: str | None = Field(None, description="Stable code: model_not_found, invalid_api_key, bad_request ...")


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used on every `/v1/*` error."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad input (image not a base64 data URL, remote URL, several images, prompt problems)",
        401: "Missing or wrong API key (when API_KEY is set)",
        404: "Unknown model",
        413: "Request body or image over its limit",
        422: "Invalid parameters",
        503: "Model not loaded or overloaded (see Retry-After)",
        504: "Deadline passed (GENERATE_TIMEOUT_S; the engine work was aborted)",
    }.items()
}


class ModelNotFound(OcrError):
    status, slug, title = 404, "model_not_found", "The model does not exist"


# OpenAI's error types by status; `code` is our problem slug (snake_case) unless OpenAI has its own.
_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
_CODES = {"unauthorized": "invalid_api_key"}


def openai_error(problem: dict[str, Any]) -> dict[str, Any]:
    """A problem+json document as OpenAI's error object."""
    status = int(problem.get("status") or 500)
    slug = str(problem.get("type") or "").removeprefix(PROBLEM_TYPE_BASE)
    kind = _TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    errors = problem.get("errors") or []
    param = problem.get("param") or (errors[0].get("field") if errors and isinstance(errors[0], dict) else None)
    message = problem.get("detail") or problem.get("title") or "error"
    return {"error": {"message": message, "type": kind, "param": param or None,
                      "code": _CODES.get(slug, slug.replace("-", "_") or None)}}


Scope = MutableMapping[str, Any]


class OpenAIErrorShape:
    """ASGI middleware: problem+json answers on `/v1/*` become OpenAI error objects (same status, headers)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(OPENAI_PREFIX):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] | None = None  # the start message of a problem answer, until its body is read
        body = bytearray()

        async def reshape(message: dict[str, Any]) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                kind = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if kind.split(b";")[0].strip() == PROBLEM_MEDIA_TYPE.encode():
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                await _send_reshaped(send, held, bytes(body))
                return
            await send(message)

        await self.app(scope, receive, reshape)


async def _send_reshaped(send: Any, start: dict[str, Any], body: bytes) -> None:
    try:
        problem = json.loads(body)
    except ValueError:
        problem = {"status": start["status"], "detail": body.decode("utf-8", "replace")}
    out = json.dumps(openai_error(problem)).encode()
    headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": out})
