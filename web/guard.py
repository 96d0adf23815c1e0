"""ASGI guard in front of every route: API keys, request-body limits while reading, disconnect = cancel.

It is plain ASGI (no BaseHTTPMiddleware) so that it sees the body as it arrives: a 2 GB upload is refused
once it passes its limit, not after it was read; and it notices a client that went away while its
request is being processed, cancelling the handler so the engine work it started is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI

import logging_config
from config import Settings
from errors import PROBLEM_MEDIA_TYPE, BadRequest, OcrError, PayloadTooLarge, Unauthorized
from service import timing
from web import metrics
from web.timing import response_header

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Reachable without a key: the probes for orchestrators and the image's HEALTHCHECK, and the API docs pages
# with their static assets, and the /ui page (they hold no data; Swagger UI's Authorize button and the /ui page's
# key field then send the key with every API call).
OPEN_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/ui"})
OPEN_PREFIXES = ("/static/",)  # web.STATIC_PREFIX: public files only
_FORM_MARGIN = 1 << 20  # room for the form fields beside the file
# The headers a key comes in. Each at most once: with two, one reader could check the key of one copy while
# another (web.deps.owner_of, which names the job's owner) reads the other.
KEY_HEADERS = (b"authorization", b"x-api-key")
# Probes and scrapes hit every few seconds: their successful answers are logged at DEBUG only.
_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})
access_log = logging.getLogger("deepseek_ocr.access")
# Metric labels must stay few: an unauthenticated client could otherwise mint one series per made-up method.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# A body must bring this much (or end) within every BODY_TIMEOUT_S: a 1 byte/s trickle is cut, while a slow
# but honest link (>= 2 KB/s at the 30 s default) is not.
BODY_PROGRESS_BYTES = 64 * 1024


class _BodyTooLarge(Exception):
    pass


class RequestTimeout(OcrError):
    status, slug, title = 408, "request-timeout", "The request body came too slowly"


class GuardMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.keys = [k.encode() for k in settings.api_keys]
        self.open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_public else set())

    def body_limit(self, path: str) -> int:
        s = self.settings
        if path.startswith(("/batch", "/jobs")):  # a job may carry a batch; each file still has MAX_UPLOAD_MB
            return s.max_batch_bytes + _FORM_MARGIN
        if path in ("/generate", "/v1/chat/completions", "/mcp"):  # JSON with base64 files
            return s.max_upload_bytes * 4 // 3 + _FORM_MARGIN  # base64 grows data by a third
        return s.max_upload_bytes + _FORM_MARGIN

    def authorised(self, scope: Scope) -> bool:
        path = scope["path"]
        if not self.keys or path in self.open_paths or (path.startswith(OPEN_PREFIXES) and "/.." not in path):
            return True
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        # Compare with every key (no early exit) so timing does not tell which one nearly matched.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        repeated = [name.decode() for name in KEY_HEADERS
                    if sum(1 for k, _ in scope.get("headers") or [] if k.lower() == name) > 1]
        if self.keys and repeated:
            await send_problem(send, scope, BadRequest(
                f"the {' and '.join(repeated)} header came more than once; send the API key once, as "
                "`Authorization: Bearer <key>` or `X-API-Key: <key>`", header=repeated[0]))
            return
        if not self.authorised(scope):
            await send_problem(
                send,
                scope,
                Unauthorized(
                    "send the API key as `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
            return
        limit = self.body_limit(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await send_problem(send, scope, _too_large(int(declared), limit, declared=True))
            return
        await _Exchange(self.app, scope, receive, send, limit, self.settings.body_timeout_s).run()


class _Exchange:
    """One request: counts body bytes, watches for the client going away, guards the response."""

    def __init__(
        self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int, body_timeout_s: float = 30.0
    ) -> None:
        self.app, self.scope, self.receive, self.send, self.limit = app, scope, receive, send, limit
        self.received = 0
        self.body_timeout_s = body_timeout_s
        self.progress_at = time.monotonic()  # when the body last brought BODY_PROGRESS_BYTES
        self.progress_mark = 0
        self.body_done = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.started = False
        self.finished = False
        self.refused = False

    async def app_receive(self) -> Message:
        if self.body_done.is_set():
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        message = await self.receive_in_time()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received - self.progress_mark >= BODY_PROGRESS_BYTES:
                self.progress_at, self.progress_mark = time.monotonic(), self.received
            if self.received > self.limit:
                self.refused = True
                await send_problem(self.send, self.scope, _too_large(self.received, self.limit))
                self.started = self.finished = True
                raise _BodyTooLarge()
            if not message.get("more_body", False):
                self.body_done.set()
                if (clock := timing.current()) is not None:
                    clock.body_done()
        elif message["type"] == "http.disconnect":
            self.disconnected.set()
        return message

    async def receive_in_time(self) -> Message:
        """The next body message; a client that sends too little for BODY_TIMEOUT_S gets a 408 and is cut."""
        left = self.progress_at + self.body_timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(self.receive(), max(0.0, left))
        except TimeoutError:
            self.refused = True
            if not self.started:
                await send_problem(self.send, self.scope, RequestTimeout(
                    f"the request body brought {self.received} bytes and then less than {BODY_PROGRESS_BYTES} "
                    f"bytes in {self.body_timeout_s:g} s (BODY_TIMEOUT_S); send the body without pauses",
                    headers={"Connection": "close"}, body_timeout_s=self.body_timeout_s,
                ))
            self.started = self.finished = True
            raise _BodyTooLarge() from None

    async def app_send(self, message: Message) -> None:
        if self.refused:
            return
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self.send(message)

    async def watch(self, task: asyncio.Task[None]) -> None:
        await self.body_done.wait()
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected.set()
            if not self.finished:
                task.cancel()

    async def run(self) -> None:
        task = asyncio.ensure_future(self.app(self.scope, self.app_receive, self.app_send))
        watcher = asyncio.ensure_future(self.watch(task))
        try:
            await task
        except asyncio.CancelledError:
            if not self.disconnected.is_set():
                raise
        except Exception:
            if not self.refused:
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher


def _too_large(size: int, limit: int, *, declared: bool = False) -> PayloadTooLarge:
    what = "declares" if declared else "sent more than"
    return PayloadTooLarge(
        f"the request body {what} {size / 1048576:.1f} MB; this route accepts at most "
        f"{limit / 1048576:.1f} MB (MAX_UPLOAD_MB per file, MAX_BATCH_MB for /batch)",
        limit_bytes=limit,
    )


async def send_problem(send: Send, scope: Scope, exc: OcrError) -> None:
    body = json.dumps(exc.to_problem(scope.get("path"))).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if exc.status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ObservabilityMiddleware:
    """Outside the guard: every answer (the guard's 401/413 too) gets the request id and is counted.

    Sets the request id for the request's task (`logging_config.request_id()`, every log record), echoes it
    in `X-Request-ID`, counts the request by route template and status, times it, and writes one access line.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = logging_config.accept_request_id(dict(scope.get("headers") or []).get(b"x-request-id"))
        token = logging_config.bind_request_id(rid)
        metrics.current_scope.set(scope)
        clock = timing.begin()  # the service adds the request's stages; the answer's header shows them
        status: int | None = None
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers") or [] if h[0].lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                if clock.used:  # an OCR answer
                    headers.append(response_header(clock, dict(headers).get(b"content-type", b"")))
                message = {**message, "headers": headers}
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Starlette answers unhandled errors in its outermost middleware, outside this one: answer here so
            # that 500 carries the id too (it then sends nothing), and keep the id set for its log line.
            failed = True
            if status is None:
                with contextlib.suppress(Exception):
                    await send_problem(
                        send_with_id, scope, OcrError(f"internal error ({type(exc).__name__}); this is a bug")
                    )
                status = status or 500
            raise
        finally:
            # No answer at all: the client went away first (499, nginx's code for it).
            self.account(scope, status or 499, time.perf_counter() - start, clock)
            if not failed:
                logging_config.reset_request_id(token)

    @staticmethod
    def account(scope: Scope, status: int, elapsed: float, clock: timing.RequestTiming | None = None) -> None:
        app_metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
        if app_metrics is not None:
            method = scope["method"] if scope["method"] in _METHODS else "other"  # any token is a method in HTTP
            route = metrics.route_template(scope)
            app_metrics.observe_request(route, method, status, elapsed)
            if clock is not None and clock.used:  # once per OCR request; a stream's figures are final only now
                app_metrics.observe_stages(route, clock.freeze())
        quiet = scope["path"] in _QUIET_PATHS and status < 400
        level = logging.DEBUG if quiet else logging.INFO
        counts = scope.get(metrics.ACCESS_COUNTS) or {"pages": 0, "tokens": 0}
        fields = {"method": scope["method"], "path": scope["path"], "status": status,
                  "duration_s": round(elapsed, 3), **counts}
        # The one access line per request (uvicorn's own is off: logging_config); JSON logs get `fields` as keys.
        access_log.log(level, "%s %s %d %.3fs pages=%d tokens=%d", scope["method"], scope["path"], status, elapsed,
                       counts["pages"], counts["tokens"], extra={"fields": fields})


def install_middleware(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(GuardMiddleware, settings=settings)  # type: ignore[arg-type]
    app.add_middleware(ObservabilityMiddleware)  # added last = outermost
