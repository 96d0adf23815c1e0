"""Log formats and request ids, for the server and its worker processes (no web framework here).

- Request ids: `web.guard.ObservabilityMiddleware` sets one per request (the client's `X-Request-ID` when it
  is well formed, else a new one); `request_id()` reads it anywhere in that request's task, and every log
  record carries it as `record.request_id`.
- `configure_logging(settings)`: `LOG_FORMAT=text` (the former format plus the request id, with control
  characters escaped so a client's filename cannot forge a log line) or `LOG_FORMAT=json` (one object a line).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
import sys
import uuid
from typing import Any

from config import Settings

log = logging.getLogger("deepseek_ocr.logging")

# ---------------------------------------------------------------------------------------------- request ids

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def request_id() -> str | None:
    """The id of the request being handled in this task (None outside a request)."""
    return _request_id.get()


def accept_request_id(given: str | bytes | None) -> str:
    """The client's id when it is 1-128 chars of [A-Za-z0-9._-]; otherwise a new uuid4 hex.

    Anything else is replaced rather than refused: the header is a tracing aid, never a reason to fail a
    request, and a free-form value would carry spaces or control characters into logs and headers.
    """
    if isinstance(given, bytes):
        given = given.decode("latin-1")
    if given and _REQUEST_ID_RE.fullmatch(given):
        return given
    return uuid.uuid4().hex


def bind_request_id(value: str | None) -> contextvars.Token[str | None]:
    """Set the current request id; pass the token to `reset_request_id` when the request ends."""
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


# ------------------------------------------------------------------------------------------------- logging


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` ("-" outside a request) so every formatter can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id() or "-"
        return True


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    r"""`\n`, `\r`, `\t`, ESC and other control characters as visible escapes: one record stays one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """The service's text lines with the request id; the message's control characters are escaped.

    Tracebacks stay multi-line (that is how they are read) but every line of them is indented, so no text
    inside an exception message can start a line that looks like a new record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = request_id() or "-"
        record.message = escape_control(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        extra = _exception_text(self, record)
        if extra:
            line += "\n" + "\n".join("    " + _CONTROL.sub(_escape_not_tab, part) for part in extra.splitlines())
        return line


def _escape_not_tab(match: re.Match[str]) -> str:
    return match.group() if match.group() == "\t" else match.group().encode("unicode_escape").decode("ascii")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, exception, and the
    record's `fields` (the access line: method, path, status, duration_s, pages, tokens)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _record_id(record),
        }
        fields = getattr(record, "fields", None)  # structured fields a record carries (the access line's)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        extra = _exception_text(self, record)
        if extra:
            entry["exception"] = extra
        return json.dumps(entry, ensure_ascii=False, default=str)


def _record_id(record: logging.LogRecord) -> str | None:
    rid = getattr(record, "request_id", None)
    return request_id() if rid in (None, "-") else rid


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    parts = []
    if record.exc_info:
        parts.append(formatter.formatException(record.exc_info))
    if record.stack_info:
        parts.append(formatter.formatStack(record.stack_info))
    return "\n".join(parts)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (test runners swap it), never a stale stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(settings: Settings) -> logging.Handler:
    """Install the service's one root handler (replacing the one a previous call installed); returns it.

    With LOG_FORMAT=json uvicorn's own loggers go through it too, so the whole stream parses as JSON. Uvicorn's
    access log is off in both formats: the middleware writes the one line per request, with the request id,
    pages and tokens (two lines per request read as two requests).
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_deepseek_ocr", False)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler._deepseek_ocr = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    if settings.log_format == "json":
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    return handler
