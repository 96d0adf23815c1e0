"""FastAPI dependencies and request helpers shared by the routers.

Settings and the engine come from `app.state` (never a global); uploads are read with their size limit;
form options become an `EngineRequest`; work that blocks runs in the app's worker pool; deadlines end in 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Form, Request, UploadFile

from config import MODES, ModeSpec, Settings
from engine import BaseEngine, EngineRequest, Sampling
from errors import BadRequest, DeadlineExceeded, PayloadTooLarge, ValidationFailed
from schemas import ModeName

T = TypeVar("T")
_CHUNK = 1 << 20
SAMPLING_EPS = 1e-5


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> BaseEngine:
    """The app's engine, after admission: 503 when it is not ready or too much work is waiting."""
    engine: BaseEngine = request.app.state.engine
    engine.admit()
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[BaseEngine, Depends(get_engine)]

PROMPT_MAX_CHARS = 100_000  # far above any prompt that fits MAX_MODEL_LEN; bounds tokenizer work

# Form fields shared by the multipart routes (each route sets its own default).
ModeForm = Annotated[ModeName | None, Form(description="Resolution mode; default from the server's settings")]
MaxTokensForm = Annotated[
    int | None, Form(ge=1, le=131072, description="Most tokens to generate (per image or page); <= MAX_MODEL_LEN")
]
TemperatureForm = Annotated[float, Form(ge=0.0, le=2.0, description="0 = greedy (recommended for OCR)")]
TopPForm = Annotated[float, Form(gt=0.0, le=1.0, description="Nucleus sampling mass when temperature > 0")]
NgramSizeForm = Annotated[int, Form(ge=0, le=512, description="No-repeat n-gram size; 0 turns the guard off")]
NgramWindowForm = Annotated[int, Form(ge=0, le=8192, description="Recent tokens the n-gram guard looks back over")]


async def run_blocking(request: Request, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run CPU work (PIL, PyMuPDF, drawing) in the app's worker pool, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.pool, functools.partial(fn, *args, **kwargs))


async def read_upload(file: UploadFile, settings: Settings, *, what: str = "file") -> bytes:
    """The upload's bytes, refused with 413 as soon as they pass MAX_UPLOAD_MB; 400 when empty."""
    limit = settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise _too_large(what, file.filename, file.size, settings)
    parts, total = [], 0
    while chunk := await file.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise _too_large(what, file.filename, total, settings)
        parts.append(chunk)
    if total == 0:
        raise BadRequest(f"the {what} {file.filename or ''!s} is empty (0 bytes); send an image or PDF file")
    return b"".join(parts)


def _too_large(what: str, name: str | None, size: int, settings: Settings) -> PayloadTooLarge:
    shown = "more than" if size <= settings.max_upload_bytes + _CHUNK else "at least"
    return PayloadTooLarge(
        f"the {what} {name or ''} is {shown} {size / 1048576:.1f} MB; the limit is "
        f"MAX_UPLOAD_MB={settings.max_upload_mb:g}",
        limit_bytes=settings.max_upload_bytes,
    )


def resolve_mode(name: str | None, settings: Settings) -> ModeSpec:
    if name is None or name == "":
        return settings.default_mode
    key = name.strip().lower()
    if key not in MODES:
        raise ValidationFailed(f"mode {name!r} is not a mode; allowed: {', '.join(MODES)}")
    return MODES[key]


def normalize_prompt(prompt: str | None, default: str, *, has_image: bool) -> str:
    """The prompt the model sees: the default when empty, `<image>\\n` in front when an image has no tag.

    A literal backslash-n typed after `<image>` in a shell (`-F "prompt=<image>\\n..."`) means a newline.
    """
    text = (prompt or "").strip() or default
    text = text.replace("<image>\\n", "<image>\n")
    if has_image and "<image>" not in text:
        text = "<image>\n" + text
    if not has_image and "<image>" in text:
        raise BadRequest("the prompt has an <image> tag but no image was sent; send an image or drop the tag")
    if text.count("<image>") > 1:
        raise BadRequest("the prompt has several <image> tags; one image per request is supported")
    return text


def make_request(
    settings: Settings,
    *,
    prompt: str,
    image: Any,
    mode: ModeSpec,
    max_tokens: int | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    ngram: tuple[int, int] = (30, 90),
) -> EngineRequest:
    limit = settings.max_model_len
    if max_tokens is not None and not 1 <= max_tokens <= limit:
        raise ValidationFailed(f"max_tokens={max_tokens} is out of range; allowed 1..{limit} (MAX_MODEL_LEN)")
    size, window = ngram
    if size and (size < 2 or window < size):
        raise ValidationFailed(
            f"ngram_size={size}, ngram_window={window}: the size must be 0 (off) or >= 2, "
            "and the window at least the size"
        )
    sampling = Sampling(
        max_tokens=min(max_tokens or settings.default_max_tokens, limit),
        # Below vLLM's sampling epsilon a temperature means greedy; dividing logits by 1e-148 overflows.
        temperature=temperature if temperature >= SAMPLING_EPS else 0.0,
        top_p=top_p,
        ngram_size=size,
        ngram_window=window if size else 0,
    )
    return EngineRequest(prompt=prompt, image=image, mode=mode, sampling=sampling)


@contextlib.asynccontextmanager
async def deadline(seconds: float, setting: str) -> AsyncIterator[None]:
    """504 when the block runs past `seconds`; the cancellation aborts the engine work inside it."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise DeadlineExceeded(
            f"the request did not finish within {seconds:g} s ({setting}); its engine work was aborted. "
            f"Send less work per request or raise {setting}"
        ) from None
