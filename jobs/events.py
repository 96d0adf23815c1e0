"""Server-Sent Events for one job: every stored event after the client's `Last-Event-ID`, then new ones.

Events live in the store (seq 1, 2, 3... per job), so a client that reconnects, even to a restarted server,
gets every event after the last one it saw, none twice. The stream ends after the job's one terminal event
(`done`, `failed` or `cancelled`). While nothing happens a comment line keeps proxies from timing out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

TERMINAL_EVENTS = frozenset({"done", "failed", "cancelled"})
KEEPALIVE_S = 15.0
MEDIA_TYPE = "text/event-stream"


def frame(seq: int, kind: str, data: str) -> bytes:
    """One SSE message; `data` is one line of JSON (json.dumps never writes raw newlines)."""
    return f"id: {seq}\nevent: {kind}\ndata: {data}\n\n".encode()


def last_event_id(header: str | None, query: int | None) -> int:
    """Where to resume: the `Last-Event-ID` header (reconnecting browsers send it), else `?after=`."""
    if header and header.strip().isdigit():
        return int(header.strip())
    return max(0, query or 0)


async def stream(runner: Any, job_id: str, after: int, *, poll_s: float = 1.0) -> AsyncIterator[bytes]:
    store = runner.store
    seq = after
    quiet = 0.0
    while True:
        batch = await store.call(store.events_after, job_id, seq)
        for event in batch:
            seq = event["seq"]
            yield frame(seq, event["type"], event["data"])
            if event["type"] in TERMINAL_EVENTS:
                return
        if batch:
            quiet = 0.0
            continue
        if await store.call(store.get, job_id) is None:
            return  # removed (JOB_TTL_S) while we watched
        await runner.wait_change(job_id, poll_s)
        quiet += poll_s
        if quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield b": keep-alive\n\n"
