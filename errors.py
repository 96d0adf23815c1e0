"""The service's one exception family and its RFC 9457 problem+json rendering.

Everything below raises an `OcrError` subclass; `serve_ocr.py` installs one handler that renders
each as `application/problem+json`. Plain modules (`ocr_utils`, `images`, `process/`) raise these
without importing FastAPI.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://deepseek-ocr.local/problems/"


class OcrError(Exception):
    """A failure with an HTTP status, a stable `type` slug and a human-readable detail."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal server error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class BadRequest(OcrError):
    status, slug, title = 400, "bad-request", "Bad request"


class InvalidImage(BadRequest):
    slug, title = "invalid-image", "The image could not be decoded"


class InvalidPdf(BadRequest):
    slug, title = "invalid-pdf", "The PDF could not be read"


class PdfPasswordRequired(BadRequest):
    slug, title = "pdf-encrypted", "The PDF is encrypted"


class InvalidPageRange(BadRequest):
    slug, title = "invalid-page-range", "The page selection is invalid"


class UnsupportedMode(BadRequest):
    slug, title = "unsupported-mode", "The resolution mode is not served"


class UnknownModel(BadRequest):
    slug, title = "unknown-model", "The model is not served here"


class PromptTooLong(BadRequest, ValueError):
    """Raised by the model itself (a `ValueError` to its own callers), mapped by type by the engines."""

    slug, title = "prompt-too-long", "The prompt does not fit the model's context"


class Unauthorized(OcrError):
    status, slug, title = 401, "unauthorized", "Missing or invalid API key"


class PayloadTooLarge(OcrError):
    status, slug, title = 413, "payload-too-large", "The request is too large"


class UnsupportedMediaType(OcrError):
    status, slug, title = 415, "unsupported-media-type", "The file type is not supported"


class ValidationFailed(OcrError):
    status, slug, title = 422, "validation-error", "The request parameters are invalid"


class PoisonInput(ValidationFailed):
    slug, title = "quarantined-input", "This input crashed the engine and is quarantined"


class ServiceUnavailable(OcrError):
    status, slug, title = 503, "service-unavailable", "The service cannot take this request now"

    def __init__(self, detail: str, *, retry_after: int | None = 5, **extra: Any) -> None:
        # No Retry-After when waiting cannot help (a model directory that can never load).
        super().__init__(detail, headers={"Retry-After": str(retry_after)} if retry_after else None, **extra)


class ModelNotReady(ServiceUnavailable):
    slug, title = "model-not-ready", "The model is not loaded"


class Aborted(ServiceUnavailable):
    """The engine gave up on a generation (stopped, preempted): a request of one item answers this, with
    Retry-After, since retrying is the remedy; an item of a PDF, batch or job keeps `status: aborted`."""

    slug, title = "aborted", "The engine aborted the generation"


class Overloaded(ServiceUnavailable):
    slug, title = "overloaded", "Too many requests are waiting"


class DeadlineExceeded(OcrError):
    status, slug, title = 504, "deadline-exceeded", "The request ran past its deadline"
