"""FastAPI dependencies and request helpers shared by the routers.

Settings and the service come from `app.state` (never a global); the service dependency refuses work up
front when no engine is ready or too much is waiting; uploads are read under their size limit; shared form
fields are declared once; deadlines end in 504.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Form, Request, UploadFile

from config import Settings
from errors import BadRequest, DeadlineExceeded, PayloadTooLarge
from pipeline import OcrService
from schemas import ModeName

_CHUNK = 1 << 20


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> OcrService:
    """The app's service, after admission: 503 when no engine is ready or too much work is waiting."""
    service: OcrService = request.app.state.service
    service.admit()
    return service


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[OcrService, Depends(get_service)]

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


def prompt_form(description: str) -> object:
    return Form(max_length=PROMPT_MAX_CHARS, description=description)


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
