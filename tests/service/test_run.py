"""The one item loop (`service.run.run_items`) on its own: the window, the deadline handoff, errors and
cancellation, with plain coroutines as items (no engine: the loop's contract, not OCR). The routes' and jobs'
use of it is tested over HTTP in test_pdf_routes, test_batch_routes and test_jobs."""

from __future__ import annotations

import asyncio

import pytest

from errors import DeadlineExceeded, OcrError
from service.results import ItemResult
from service.run import Deadline, run_items


class Items:
    """Items that finish when told to (`release`), recording how many run at once and which were cancelled."""

    def __init__(self, instant: frozenset[int] = frozenset(), blocked: int = 0) -> None:
        self.instant = instant
        self.running = 0
        self.most = 0
        self.cancelled: list[int] = []
        self.gate = asyncio.Event()
        self.blocked, self.all_blocked = blocked, asyncio.Event()  # set once `blocked` items wait at the gate

    async def __call__(self, item: int) -> ItemResult:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if item not in self.instant:
                self.blocked -= 1
                if self.blocked == 0:
                    self.all_blocked.set()
                await self.gate.wait()
            return ItemResult(item, status="ok", text=f"item {item}")
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        finally:
            self.running -= 1


def test_results_come_in_item_order_within_the_window() -> None:
    async def main() -> None:
        items = Items(blocked=3)
        run = asyncio.create_task(run_items(list(range(10)), items, window=3))
        await items.all_blocked.wait()
        items.gate.set()
        results = await run
        assert [r.label for r in results] == list(range(10))
        assert items.most == 3, items.most

    asyncio.run(main())


def test_shared_semaphores_bound_several_loops_together() -> None:
    """The job runner's case: one window across jobs, one per job."""

    async def main() -> None:
        shared, items = asyncio.Semaphore(2), Items(blocked=2)
        kept: list[ItemResult] = []

        async def save(index: int, result: ItemResult) -> None:
            kept.append(result)

        loops = [run_items(list(range(5)), items, window=(asyncio.Semaphore(5), shared), on_item=save)
                 for _ in range(3)]
        runs = asyncio.gather(*loops)
        await items.all_blocked.wait()
        items.gate.set()
        assert await runs == [[], [], []]  # handed over, not kept
        assert len(kept) == 15 and items.most == 2, (len(kept), items.most)

    asyncio.run(main())


def test_the_deadline_cancels_the_rest_and_hands_over_the_finished() -> None:
    async def main() -> None:
        items, handed = Items(instant=frozenset({0, 2})), {}

        async def on_deadline(done: dict[int, ItemResult]) -> None:
            handed.update(done)

        with pytest.raises(DeadlineExceeded) as raised:
            await run_items(list(range(4)), items, window=4, deadline=Deadline(0.1, "PDF_TIMEOUT_S"),
                            on_deadline=on_deadline)
        assert sorted(handed) == [0, 2] and handed[2].text == "item 2", handed
        assert sorted(items.cancelled) == [1, 3] and items.running == 0, items.cancelled
        assert "PDF_TIMEOUT_S" in raised.value.detail, raised.value.detail

    asyncio.run(main())


def test_on_deadline_may_answer_for_the_request() -> None:
    async def main() -> None:
        async def to_job(done: dict[int, ItemResult]) -> None:
            raise Deadline(0.1, "BATCH_TIMEOUT_S").handed_off("abc", len(done), 3)

        with pytest.raises(DeadlineExceeded) as raised:
            await run_items([0, 1, 2], Items(instant=frozenset({0})), window=1,
                            deadline=Deadline(0.1, "BATCH_TIMEOUT_S"), on_deadline=to_job)
        problem = raised.value.to_problem()
        assert problem["job_id"] == "abc" and "1 of 3 items" in problem["detail"], problem

    asyncio.run(main())


def test_an_error_cancels_the_others_and_is_raised_as_itself() -> None:
    async def main() -> None:
        items = Items()

        async def item(n: int) -> ItemResult:
            if n == 2:
                await asyncio.sleep(0)
                raise OcrError("item 2 broke")
            return await items(n)

        with pytest.raises(OcrError, match="item 2 broke"):
            await run_items(list(range(4)), item, window=4, deadline=Deadline(60, "PDF_TIMEOUT_S"),
                            on_deadline=pytest.fail)
        assert sorted(items.cancelled) == [0, 1, 3], items.cancelled

    asyncio.run(main())


def test_a_cancelled_request_hands_nothing_over() -> None:
    """A client that disconnects cancels the request: no handoff, every item cancelled."""

    async def main() -> None:
        items = Items(instant=frozenset({0}), blocked=2)
        task = asyncio.create_task(run_items(list(range(3)), items, window=3, deadline=Deadline(60, "PDF_TIMEOUT_S"),
                                             on_deadline=pytest.fail))
        await items.all_blocked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(items.cancelled) == [1, 2] and items.running == 0, items.cancelled

    asyncio.run(main())
