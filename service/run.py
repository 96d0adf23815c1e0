"""The one item loop: the items of a document or a batch, for the sync routes and the job runner alike.

`run_items` runs one function over a request's items with at most a window of them in flight, taken in
order, results in item order. The window is a count (a sync request's own) or semaphores shared with
others (the job runner's: one across all jobs, one per job for JOB_MAX_INFLIGHT). A TaskGroup: a
cancellation (deadline, client gone, job cancelled) or an error in one item cancels and awaits the
others, so no item runs on after its request; the first error is raised as itself.

At the deadline (PDF_TIMEOUT_S, BATCH_TIMEOUT_S) the unfinished items are cancelled (their engine work
aborted) and the finished ones go to `on_deadline` instead of being thrown away. For the sync routes that
is the service's `handoff`, a callback the app's lifespan gives the service when the job runner started:
it makes a job of the `Leftover` (finished items stored as done, never redone) and the answer is a 504
naming the job. Without a runner the deadline is the plain 504. A client that disconnects cancels the
request instead: no handoff, everything aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from errors import DeadlineExceeded
from service.postprocess import PostOptions
from service.request import OcrRequest
from service.results import ItemResult

T = TypeVar("T")
Window = int | Sequence[asyncio.Semaphore]
OnItem = Callable[[int, ItemResult], Awaitable[None]]
OnDeadline = Callable[[dict[int, ItemResult]], Awaitable[None]]


@dataclass(frozen=True)
class Deadline:
    """How long a request's items may take, from when they start, and the setting that said so (named in
    the 504). A PDF's open is not counted: it has its own limit (PDF_OPEN_TIMEOUT_S)."""

    seconds: float
    setting: str

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request did not finish within {self.seconds:g} s ({self.setting}); its engine work was aborted. "
            f"Send less work per request or raise {self.setting}"
        )

    def handed_off(self, job_id: str | None, done: int, total: int) -> DeadlineExceeded:
        """The 504 after a handoff: it names the job that runs the rest (None: the job limits refused one)."""
        seconds, setting = f"{self.seconds:g}", self.setting
        if job_id is None:
            return DeadlineExceeded(
                f"the request did not finish within {seconds} s ({setting}); its engine work was aborted and no "
                f"job could take over (MAX_JOBS_QUEUED / MAX_JOB_PAGES). Send less work per request or raise "
                f"{setting}"
            )
        return DeadlineExceeded(
            f"the request did not finish within {seconds} s ({setting}): {done} of {total} items were done. "
            f"The work continues as job {job_id}: follow it at /jobs/{job_id} (events, result, download), "
            f"or send less work per request or raise {setting}",
            job_id=job_id,
            job=f"/jobs/{job_id}",
            headers={"Location": f"/jobs/{job_id}"},
        )


@contextlib.asynccontextmanager
async def within(limit: Deadline | None) -> AsyncIterator[None]:
    """504 when the block runs past `limit` (None: no limit); the cancellation aborts the engine work in it."""
    if limit is None:
        yield
        return
    try:
        async with asyncio.timeout(limit.seconds):
            yield
    except TimeoutError:
        raise limit.exceeded() from None


def deadline(seconds: float, setting: str) -> contextlib.AbstractAsyncContextManager[None]:
    """`async with deadline(s, "GENERATE_TIMEOUT_S"):` the plain deadline of one request, from now."""
    return within(Deadline(seconds, setting))


@dataclass
class Leftover:
    """A sync request cut off at its deadline, as a job takes it over: the request as admitted, its inputs,
    and the items it had finished (by item index)."""

    kind: Literal["pdf", "batch"]
    request: OcrRequest
    post: PostOptions
    owner: str  # who sent it (a hash of the API key; "" without keys): the job is theirs
    filenames: list[str]  # a PDF: its one name; a batch: one per file, in order
    inputs: list[bytes]  # a PDF: the upload; a batch: one per file, b"" for the finished ones (never read again)
    done: dict[int, ItemResult]
    deadline: Deadline
    pages: list[int] = field(default_factory=list)  # a PDF's selected pages, the items in order
    dpi: int = 144
    selection: str | None = None  # the `pages` text sent
    password: str | None = None
    page_count: int | None = None
    warnings: list[str] = field(default_factory=list)
    form: Any = None  # the route's options model (`service.options`), which the job's spec keeps

    @property
    def total(self) -> int:
        return len(self.pages) if self.kind == "pdf" else len(self.filenames)


# Makes a job of a leftover; returns its id, or None when the job limits refused it.
Handoff = Callable[[Leftover], Awaitable[str | None]]


async def hand_off(handoff: Handoff | None, leftover: Leftover) -> None:
    """Give the leftover to the job runner and raise the 504 that names its job (None: no runner, no job;
    the plain 504 follows)."""
    if handoff is None:
        return
    job_id = await handoff(leftover)
    raise leftover.deadline.handed_off(job_id, len(leftover.done), leftover.total)


async def run_items(
    items: Sequence[T],
    fn: Callable[[T], Awaitable[ItemResult]],
    *,
    window: Window,
    deadline: Deadline | None = None,
    on_deadline: OnDeadline | None = None,
    on_item: OnItem | None = None,
) -> list[ItemResult]:
    """`fn` over `items` in a window; the results in item order.

    `on_item(index, result)`: each result handed over as it finishes, still inside the item's window slot
    (the job runner writes it to disk); such results are not kept (a job's thousands of pages never sit in
    memory) and the return is empty. At `deadline` the unfinished items are cancelled; `on_deadline` gets the
    finished ones (it may raise its own answer), then the plain 504 is raised.
    """
    finished: dict[int, ItemResult] = {}

    async def one(index: int) -> None:
        result = await fn(items[index])
        if on_item is not None:
            await on_item(index, result)
        else:
            finished[index] = result

    try:
        async with asyncio.timeout(deadline.seconds if deadline else None) as scope:
            await _in_window(len(items), window, one)
    except TimeoutError:
        if deadline is None or not scope.expired():
            raise  # an item's own TimeoutError, not the deadline
        if on_deadline is not None:
            await on_deadline(dict(finished))
        raise deadline.exceeded() from None
    return [result for _, result in sorted(finished.items())]


async def _in_window(count: int, window: Window, one: Callable[[int], Awaitable[None]]) -> None:
    """`one(0..count-1)`, each started once a slot of every semaphore of the window is free (FIFO)."""
    slots = [asyncio.Semaphore(max(1, window))] if isinstance(window, int) else list(window)
    try:
        async with asyncio.TaskGroup() as group:
            for index in range(count):
                held: list[asyncio.Semaphore] = []
                try:
                    for slot in slots:
                        await slot.acquire()
                        held.append(slot)
                except BaseException:
                    for slot in held:
                        slot.release()
                    raise
                task = group.create_task(one(index))
                task.add_done_callback(lambda _t, held=tuple(held): [slot.release() for slot in held])
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None  # the error handler knows single errors, not groups
