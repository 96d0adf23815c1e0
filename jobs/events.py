"""Server-Sent Events for one job: every stored event after the client's `Last-Event-ID`, then new ones.

Events live in the store (seq 1, 2, 3... per job), so a client that reconnects, even to a restarted server,
gets every event after the last one it saw, none twice. The stream ends after the job's one terminal event
(`done`, `failed` or `cancelled`). New events wake the stream at once when this server's runner wrote
them, else within `poll_s`: the stream reads the store, so a replica that does not run the job (another
API replica sharing the store) streams it too. Served with sse-starlette.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from errors import ValidationFailed

TERMINAL_EVENTS = frozenset({"done", "failed", "cancelled"})
PING_S = 15  # a comment line while nothing happens keeps proxies from timing the stream out
MEDIA_TYPE = "text/event-stream"


MAX_EVENT_ID = 10**12  # far above any job's event count; keeps ids inside every store's integer range


def last_event_id(header: str | None, query: int | None) -> int:
    """Where to resume: the `Last-Event-ID` header (reconnecting browsers send it), else `?after=`.
    Anything but an event id of this API is a 422: resuming from a made-up point would lose events."""
    if header is not None and header.strip():
        text = header.strip()
        if not (text.isascii() and text.isdigit() and int(text) <= MAX_EVENT_ID):
            raise ValidationFailed(
                f"Last-Event-ID {text[:40]!r} is not an event id of this stream; send the `id` of the last event "
                f"received (an integer 0..{MAX_EVENT_ID}), or no header to start from the first event"
            )
        return int(text)
    return max(0, query or 0)


def response(runner: Any, job_id: str, after: int) -> EventSourceResponse:
    """The stream as a response; sse-starlette also ends it when the server shuts down (uvicorn would
    otherwise wait for every open stream before stopping)."""
    return EventSourceResponse(stream(runner, job_id, after), ping=PING_S,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream(runner: Any, job_id: str, after: int, *, poll_s: float = 1.0) -> AsyncIterator[ServerSentEvent]:
    """Stored events after `after`, then new ones as the runner reports changes, until the terminal one.

    `data` is one line of JSON (json.dumps never writes raw newlines)."""
    store = runner.store
    seq = after
    while True:
        batch = await store.call(store.events_after, job_id, seq)
        for event in batch:
            seq = event["seq"]
            yield ServerSentEvent(data=event["data"], event=event["type"], id=str(seq))
            if event["type"] in TERMINAL_EVENTS:
                return
        if batch:
            continue
        if await store.call(store.get, job_id) is None:
            return  # removed (JOB_TTL_S) while we watched
        await runner.wait_change(job_id, poll_s)
