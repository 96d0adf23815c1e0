"""A deadline for a request's headers on uvicorn's h11 protocol (issue 18: slow clients were never timed out).

The body has BODY_TIMEOUT_S between pieces (middleware). Before a request exists there is nothing an ASGI
app can see, and uvicorn times nothing: a connection that sends a header line now and then (slowloris), or
nothing at all, stays open forever, and LIMIT_CONCURRENCY such connections make every other client a 503.
uvicorn's `--http` option takes only its built-in names on the command line, so the Makefile's
`--http h11` protocol class is given the deadline here, when the app is created (before any connection).

A connection gets BODY_TIMEOUT_S from its opening, or from its previous answer, to complete the headers of
its next request; past that it is closed. Once the headers are in, the request runs under its own deadlines.
"""

from __future__ import annotations

from typing import Any

_state = {"timeout_s": 30.0}


def install(timeout_s: float) -> None:
    """Give `uvicorn.protocols.http.h11_impl.H11Protocol` the header deadline (idempotent; the latest
    `timeout_s` applies to connections opened from then on)."""
    from uvicorn.protocols.http import h11_impl

    _state["timeout_s"] = timeout_s
    cls: Any = h11_impl.H11Protocol
    if getattr(cls, "_header_deadline_installed", False):
        return
    made, received, complete, lost = (cls.connection_made, cls.data_received, cls.on_response_complete,
                                      cls.connection_lost)

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        _arm(self)

    def data_received(self: Any, data: bytes) -> None:
        received(self, data)
        if not _awaiting_headers(self):
            _disarm(self)  # the headers are complete: the request's own deadlines take over

    def on_response_complete(self: Any) -> None:
        complete(self)
        if not self.transport.is_closing():
            _arm(self)  # the next request's headers get the same time

    def connection_lost(self: Any, exc: Exception | None) -> None:
        _disarm(self)
        lost(self, exc)

    cls.connection_made, cls.data_received = connection_made, data_received
    cls.on_response_complete, cls.connection_lost = on_response_complete, connection_lost
    cls._header_deadline_installed = True


def _awaiting_headers(protocol: Any) -> bool:
    cycle = protocol.cycle
    return cycle is None or cycle.response_complete


def _arm(protocol: Any) -> None:
    _disarm(protocol)
    protocol._header_deadline = protocol.loop.call_later(_state["timeout_s"], _expire, protocol)


def _disarm(protocol: Any) -> None:
    timer = getattr(protocol, "_header_deadline", None)
    if timer is not None:
        timer.cancel()
        protocol._header_deadline = None


def _expire(protocol: Any) -> None:
    protocol._header_deadline = None
    transport = protocol.transport
    if transport.get_protocol() is not protocol:  # upgraded (WebSocket): not an HTTP connection any more
        return
    if _awaiting_headers(protocol) and not transport.is_closing():
        transport.close()
