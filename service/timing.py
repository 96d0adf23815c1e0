"""Where an answer's time went: the stages of one item and of one request, measured where the work happens.

The service measures each item's stages into its `ItemResult.timing` and adds them to the request's
`RequestTiming` when the item is counted (`OcrService._observe`), so a PDF's or a batch's figures are sums
over its items. Work of a request outside any item (a single upload's read and decode) goes straight to the
request's. The web layer starts a `RequestTiming` per request (`begin`), renders it as `Server-Timing` and
the JSON `timing` object, and observes it in `/metrics`; the service only finds it through `current()`, so
it never imports the web layer. Only `perf_counter` calls: no copies, nothing per token.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields

# The stage names, in the order of the data path (and of the Server-Timing header).
STAGES = ("read", "decode", "wait", "transfer", "ttft", "gen", "post", "encode")


@dataclass
class Timing:
    """Seconds spent in each stage: `read` the upload (its arrival, from the request's headers to its body's
    last byte, and reading it), `decode` it (or render a PDF page), `wait` for the
    pixel budget and an engine slot, `transfer` it to an engine worker process, the engine's time to first
    token (`ttft`) and the rest of its generation (`gen`), post-processing (`post`), building the answer
    (`encode`)."""

    read: float = 0.0
    decode: float = 0.0
    wait: float = 0.0
    transfer: float = 0.0
    ttft: float = 0.0
    gen: float = 0.0
    post: float = 0.0
    encode: float = 0.0

    def add(self, other: Timing) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def engine(self, wait_s: float, transfer_s: float, ttft_s: float, gen_s: float) -> None:
        """One engine call's figures (a retried item has several)."""
        self.wait += wait_s
        self.transfer += transfer_s
        self.ttft += ttft_s
        self.gen += gen_s


@contextlib.contextmanager
def measure(stage: str, into: Timing | None = None) -> Iterator[None]:
    """Add the block's seconds to `stage` of `into` (None: the current request's, if any). Counted when the
    block raises too: a failed decode took its time."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add(stage, time.perf_counter() - start, into)


def add(stage: str, seconds: float, into: Timing | None = None) -> None:
    """`seconds` more in `stage` of `into` (None: the current request's, if any)."""
    target = into if into is not None else _request_stages()
    if target is not None:
        setattr(target, stage, getattr(target, stage) + seconds)


class RequestTiming:
    """One request's stages, summed over its items, and its clock. `freeze` fixes the figures once the answer
    is built, so the JSON `timing` and the `Server-Timing` header say the same; `encode` is the time from the
    service's last work to that point (building the JSON or ZIP, writing a searchable PDF)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stages = Timing()
        self.items = 0
        self.used = False  # the service or a route measured something: an OCR answer
        self._work_done: float | None = None
        self._frozen: dict[str, float] | None = None
        self.body_received: float | None = None  # the body's last byte came (web/guard.py), perf_counter

    def body_done(self) -> None:
        """The request's body has all arrived: its arrival joins `read` (a slow or loaded client's upload,
        which no other stage holds; the route starts only once the form is parsed)."""
        if self.body_received is None:
            self.body_received = time.perf_counter()

    def absorb(self, item: Timing) -> None:
        """An item was counted: its stages join the request's."""
        self.stages.add(item)
        self.items += 1
        self.touch()

    def touch(self) -> None:
        self.used = True
        self._work_done = time.perf_counter()

    def milliseconds(self) -> dict[str, float]:
        """The figures now, in ms, `total` last (not frozen: a stream's header shows what is known so far)."""
        if self._frozen is not None:
            return self._frozen
        now = time.perf_counter()
        stages = {f.name: getattr(self.stages, f.name) for f in fields(self.stages)}
        if self.body_received is not None:
            stages["read"] += self.body_received - self.started
        if self._work_done is not None:
            stages["encode"] += now - self._work_done
        figures = {name: round(seconds * 1000, 3) for name, seconds in stages.items()}
        figures["total"] = round((now - self.started) * 1000, 3)
        return figures

    def freeze(self) -> dict[str, float]:
        if self._frozen is None:
            self._frozen = self.milliseconds()
        return self._frozen

    @property
    def frozen(self) -> bool:
        return self._frozen is not None


_current: contextvars.ContextVar[RequestTiming | None] = contextvars.ContextVar("request_timing", default=None)


def begin() -> RequestTiming:
    """A new request's timing, current for the request's task and the tasks it starts."""
    timing = RequestTiming()
    _current.set(timing)
    return timing


def current() -> RequestTiming | None:
    return _current.get()


def _request_stages() -> Timing | None:
    timing = _current.get()
    if timing is None:
        return None
    timing.touch()
    return timing.stages
