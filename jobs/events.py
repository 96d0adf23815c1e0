"""Server-Sent Events for one job: every stored event after the client's `Last-Event-ID`, then new ones.

Events live in the store (seq 1, 2, 3... per job), so a client that reconnects, even to a restarted server,
gets every event after the last one it saw, none twice. A stream ends after the job's one terminal event
(`done`, `failed` or `cancelled`), when the job is removed, or after SSE_IDLE_TIMEOUT_S without an event
(the client reconnects with `Last-Event-ID` and loses nothing); `: ping` comments every SSE_PING_S keep
proxies from cutting it meanwhile.

An idle listener costs no CPU: listeners of one job wait on one shared `asyncio.Event`. One watcher task per
watched job (not per listener) wakes them, at once when this server's runner wrote an event, else when its
read of the store every SSE_POLL_S finds one (so a replica that does not run the job streams it too). Open
streams are capped per key (SSE_MAX_STREAMS_PER_KEY) and in total (SSE_MAX_STREAMS): past a cap, 429.
Served with sse-starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from errors import OcrError, ValidationFailed

TERMINAL_EVENTS = frozenset({"done", "failed", "cancelled"})
MEDIA_TYPE = "text/event-stream"
MAX_EVENT_ID = 10**12  # far above any job's event count; keeps ids inside every store's integer range
_MAX_ID_CHARS = len(str(MAX_EVENT_ID))  # checked before int(): 60,000 digits would raise inside int()


class TooManyStreams(OcrError):
    status, slug, title = 429, "too-many-streams", "Too many event streams are open"


def last_event_id(header: str | None, query: int | None) -> int:
    """Where to resume: the `Last-Event-ID` header (reconnecting browsers send it), else `?after=`.
    Anything but an event id of this API is a 422: resuming from a made-up point would lose events."""
    if header is not None and header.strip():
        text = header.strip()
        if not (len(text) <= _MAX_ID_CHARS and text.isascii() and text.isdigit() and int(text) <= MAX_EVENT_ID):
            shown = text[:40] + ("..." if len(text) > 40 else "")
            raise ValidationFailed(
                f"Last-Event-ID {shown!r} ({len(text)} characters) is not an event id of this stream; send the "
                f"`id` of the last event received (an integer 0..{MAX_EVENT_ID}), or no header to start from the "
                "first event"
            )
        return int(text)
    return max(0, query or 0)


@dataclass
class _Watch:
    """One watched job: its listeners wait on `changed`, which the watcher replaces after setting it."""

    listeners: int = 0
    seq: int = 0  # the newest event the watcher knows of
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Streams:
    """The open streams of one server: the caps, and one watcher per watched job."""

    def __init__(self, runner: Any, settings: Any) -> None:
        self.runner, self.settings = runner, settings
        self.per_key: Counter[str] = Counter()
        self.total = 0
        self.watches: dict[str, _Watch] = {}

    def acquire(self, key: str) -> Callable[[], None]:
        """One open stream of `key` (429 past SSE_MAX_STREAMS_PER_KEY or SSE_MAX_STREAMS); call the returned
        function, once, when it closes."""
        s = self.settings
        if self.per_key[key] >= s.sse_max_streams_per_key:
            raise TooManyStreams(
                f"this key has {self.per_key[key]} event streams open, the most SSE_MAX_STREAMS_PER_KEY allows "
                f"({s.sse_max_streams_per_key}); close one, or poll GET /jobs/{{id}}",
                headers={"Retry-After": "5"}, setting="SSE_MAX_STREAMS_PER_KEY", limit=s.sse_max_streams_per_key,
            )
        if self.total >= s.sse_max_streams:
            raise TooManyStreams(
                f"the server has {self.total} event streams open, the most SSE_MAX_STREAMS allows "
                f"({s.sse_max_streams}); retry later, or poll GET /jobs/{{id}}",
                headers={"Retry-After": "5"}, setting="SSE_MAX_STREAMS", limit=s.sse_max_streams,
            )
        self.per_key[key] += 1
        self.total += 1

        def release() -> None:
            self.total -= 1
            self.per_key[key] -= 1
            if self.per_key[key] <= 0:
                del self.per_key[key]

        return release

    @contextlib.contextmanager
    def watch(self, job_id: str, seq: int) -> Iterator[_Watch]:
        watch = self.watches.get(job_id)
        if watch is None:
            watch = self.watches[job_id] = _Watch(seq=seq)
            watch.task = asyncio.create_task(self._watcher(job_id, watch), name=f"sse-watch-{job_id}")
        watch.seq = max(watch.seq, seq)
        watch.listeners += 1
        try:
            yield watch
        finally:
            watch.listeners -= 1
            if watch.listeners <= 0 and self.watches.get(job_id) is watch:
                del self.watches[job_id]
                if watch.task is not None:
                    watch.task.cancel()

    async def _watcher(self, job_id: str, watch: _Watch) -> None:
        store, poll_s = self.runner.store, self.settings.sse_poll_s
        while True:
            await self.runner.wait_change(job_id, poll_s)
            try:
                batch = await store.call(store.events_after, job_id, watch.seq)
                gone = not batch and await store.call(store.get, job_id) is None
            except Exception:  # the store hiccuped: the listeners stay; the next round reads again
                continue
            if batch or gone:
                watch.seq = batch[-1]["seq"] if batch else watch.seq
                old, watch.changed = watch.changed, asyncio.Event()
                old.set()


def streams_of(app: Any, runner: Any) -> Streams:
    """The app's stream registry, made on first use (it belongs to the runner it watches)."""
    streams = getattr(app.state, "sse_streams", None)
    if streams is None or streams.runner is not runner:
        streams = app.state.sse_streams = Streams(runner, app.state.settings)
    return streams


class _SlotResponse(EventSourceResponse):
    """Gives its stream slot back when the response is over, however it ended (a generator that never
    started, because the client left first, would never run its own `finally`)."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def response(streams: Streams, key: str, job_id: str, after: int) -> EventSourceResponse:
    """The stream as a response; 429 now (not an empty stream) when a cap is reached. sse-starlette also
    ends it when the server shuts down (uvicorn would otherwise wait for every open stream before stopping)."""
    release = streams.acquire(key)  # raises TooManyStreams before any byte is sent
    return _SlotResponse(
        stream(streams, job_id, after), release=release,
        ping=streams.settings.sse_ping_s, ping_message_factory=lambda: ServerSentEvent(comment="ping"),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def stream(streams: Streams, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    """Stored events after `after`, then new ones as the watcher reports them, until the terminal one, the
    job's removal or SSE_IDLE_TIMEOUT_S without an event.

    `data` is one line of JSON (json.dumps never writes raw newlines)."""
    store, idle_s = streams.runner.store, streams.settings.sse_idle_timeout_s
    seq = after
    last_sent = time.monotonic()
    with streams.watch(job_id, seq) as watch:
        while True:
            changed = watch.changed  # taken before reading: a change after the read wakes us
            batch = await store.call(store.events_after, job_id, seq)
            for event in batch:
                seq = event["seq"]
                last_sent = time.monotonic()
                yield ServerSentEvent(data=event["data"], event=event["type"], id=str(seq))
                if event["type"] in TERMINAL_EVENTS:
                    return
            if batch:
                continue
            if await store.call(store.get, job_id) is None:
                return  # removed (JOB_TTL_S) while we watched
            watch.seq = max(watch.seq, seq)
            left = last_sent + idle_s - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                return  # idle: the client reconnects with Last-Event-ID when it wants more
