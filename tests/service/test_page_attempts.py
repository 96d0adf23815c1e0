"""Job pages whose engine worker dies under them: re-run at once on another worker, each start an attempt,
and `failed` with the reason after 3 (jobs/runner.py PAGE_ATTEMPTS); the other pages are unaffected.

Four replay engines stand in for four engine workers (tests/helpers/replay.py: the model only; the service, the
supervisor that restarts them, the job runner and store are the real ones). Every one of them dies on page
3's image, as a worker dies on an input that crashes its engine; the supervisor brings each back.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from helpers.jobs import submit, wait
from helpers.pdfs import make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app

from serve_ocr import create_app
from service.admission import Admission

POISON = (595, 420)  # make_pdf's page 3 (A5 landscape) at 72 dpi


def test_a_page_that_kills_its_worker_three_times_fails_and_the_job_completes(tmp_path: Path) -> None:
    def poison(request) -> bool:
        return request.image is not None and request.image.size == POISON

    engines = [ReplayEngine("text", max_concurrency=1, crash_on=poison) for _ in range(4)]
    settings = make_settings(None, data_dir=str(tmp_path), max_concurrency=1)
    with serve_app(create_app(settings, engine_factory=factory(*engines))) as url:
        job = submit(url, make_pdf(5), mode="tiny", dpi="72", max_tokens="8")
        final = wait(url, job["id"], timeout=60)
        pages = {p["page"]: p for p in final["pages"]}
        assert final["status"] == "done" and final["pages_failed"] == 1, final
        assert pages[3]["status"] == "failed" and pages[3]["attempts"] == 3, final
        assert "attempts" in pages[3]["error"] or "quarantined" in pages[3]["error"], final
        assert all(p["status"] == "ok" and p["attempts"] == 1 for n, p in pages.items() if n != 3), final
        # The workers it killed come back: the supervisor restarts them on its own schedule, which may be
        # after the job's last page (the job does not wait for them).
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health").json())["restarts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["restarts"] >= 2, health
    assert sum(e.starts for e in engines) >= 4 + 2


def test_admission_add_engine_takes_waiting_items() -> None:
    """A worker that joins (Ray scaler) is an ordinary engine to admission at once, waiters included."""
    import asyncio

    async def go() -> None:
        first, joined = ReplayEngine("a", max_concurrency=1), ReplayEngine("b", max_concurrency=1)
        for engine in (first, joined):
            await engine.start()
        admission = Admission([first], max_queue=8)
        held = await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0.05)
        assert not waiter.done() and admission.waiting == 1
        admission.add_engine(joined)
        slot = await asyncio.wait_for(waiter, 1)
        assert slot.engine is joined and admission.busy(joined) == 1 and admission.capacity == 2
        slot.release()
        held.release()

    asyncio.run(go())
