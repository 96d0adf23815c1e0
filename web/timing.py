"""The request's stage timing as the client sees it: the `Server-Timing` header and the JSON `timing` object.

The service fills a `service.timing.RequestTiming` per request (ObservabilityMiddleware starts it); a JSON
route puts the frozen figures on its answer with `stamped`, and the middleware writes the same figures in
`Server-Timing` (W3C: `name;dur=<ms>`, comma-separated) when the answer starts. A streamed answer's header
has the stages known before its first chunk; `/metrics` gets the final figures when the answer ends.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from service import timing
from web.schemas.common import StageTimes

M = TypeVar("M", bound=BaseModel)


def stamped(answer: M) -> M:
    """`answer` with the request's timing, frozen now: the header will carry the same figures."""
    clock = timing.current()
    if clock is not None and "timing" in type(answer).model_fields:
        answer.timing = StageTimes(**clock.freeze(), items=clock.items)  # type: ignore[attr-defined]
    return answer


def header_value(figures: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={ms}" for name, ms in figures.items())  # the JSON `timing` figures exactly


def response_header(clock: timing.RequestTiming, content_type: bytes) -> tuple[bytes, bytes]:
    """The `Server-Timing` header of an answer that starts now. A stream's figures stay open (its engine stages
    come after this header); every other answer's are final from here on."""
    streaming = content_type.startswith(b"text/event-stream")
    figures = clock.milliseconds() if streaming else clock.freeze()
    return b"server-timing", header_value(figures).encode()
