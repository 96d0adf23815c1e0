"""The service layer: one status policy on every route, admission apart from engines, a clean import graph.

Replay engines stand in for the model where a test needs to control it (die mid-request, answer `abort`);
they are injected through `create_app(settings, engine_factory=...)`. The two-engine test runs two real
PyTorch engines on the tiny checkpoint.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.images import png_bytes
from helpers.pdfs import make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show

from serve_ocr import create_app

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"
TEXT = "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Title\n"


ROUTES = ["/ocr/image/advanced", "/pdf/ocr", "/pdf/ocr/download", "/batch/ocr", "/batch/ocr/download"]


def post_to(url: str, route: str) -> httpx.Response:
    pdf, png = make_pdf(3), png_bytes(300, 200)
    with httpx.Client(base_url=url, timeout=60) as c:
        if route.startswith("/pdf"):
            return c.post(route, files={"file": ("r.pdf", pdf)}, data={"dpi": "72"})
        if route.startswith("/batch"):
            return c.post(route, files=[("files", ("a.png", png)), ("files", ("b.png", png))])
        return c.post(route, files={"file": ("a.png", png)})


def assert_all_503(answers: dict[str, httpx.Response], reason: str) -> None:
    for route, r in answers.items():
        assert r.status_code == 503, f"{route}: {show(r)}"
        assert r.headers["content-type"].startswith(PROBLEM), f"{route}: {show(r)}"
        assert reason in r.json()["detail"], f"{route}: {show(r)}"


def test_dead_engine_is_503_on_every_route(tiny_checkpoint: Path) -> None:
    engine = ReplayEngine(TEXT)
    # No restarts here: the engine must stay dead for the five requests (tests/test_reliability.py heals it).
    app = create_app(make_settings(tiny_checkpoint, engine_restart=False), engine_factory=factory(engine))
    with serve_app(app) as url:
        assert httpx.post(url + "/batch/ocr", files=[("files", ("a.png", png_bytes()))]).status_code == 200
        engine.kill("the replay engine died")
        assert_all_503({r: post_to(url, r) for r in ROUTES}, "the replay engine died")
        assert httpx.get(url + "/health").json()["ready"] is False


def test_engine_dying_mid_request_is_503_not_failed_items(tiny_checkpoint: Path) -> None:
    """Items already admitted when the engine dies: the whole request is a 503, never N failed items."""
    engine = ReplayEngine(TEXT, delay_s=1.0)
    app = create_app(make_settings(tiny_checkpoint, engine_restart=False), engine_factory=factory(engine))
    with serve_app(app) as url:
        timer = threading.Timer(0.5, engine.kill, args=("the replay engine died mid-request",))
        timer.start()
        with ThreadPoolExecutor(5) as pool:  # all five requests in flight when the engine dies
            futures = {route: pool.submit(post_to, url, route) for route in ROUTES}
            answers = {route: f.result() for route, f in futures.items()}
        timer.join()
        assert_all_503(answers, "mid-request")


def test_aborted_item_has_one_status_everywhere(tiny_checkpoint: Path) -> None:
    engine = ReplayEngine(TEXT, finish_reason="abort")
    app = create_app(make_settings(tiny_checkpoint), engine_factory=factory(engine))
    with serve_app(app) as url:
        pdf = httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", make_pdf(2))}, data={"dpi": "72"}, timeout=60)
        batch = httpx.post(url + "/batch/ocr", files=[("files", ("a.png", png_bytes()))], timeout=60)
    assert pdf.status_code == 200 and batch.status_code == 200, (show(pdf), show(batch))
    pages, files = pdf.json()["pages"], batch.json()["results"]
    assert [p["status"] for p in pages] == ["aborted", "aborted"], show(pdf)
    assert [f["status"] for f in files] == ["aborted"], show(batch)
    assert pdf.json()["pages_aborted"] == 2 and batch.json()["aborted"] == 1, (show(pdf), show(batch))
    assert pages[0]["finish_reason"] == files[0]["finish_reason"] == "abort"


def test_two_engines_behind_one_admission_each_keep_their_limit(tiny_checkpoint: Path) -> None:
    """Two real PyTorch engines (tiny checkpoint, CPU), one slot each: both take work, neither runs two."""
    from engines.torch_engine import TorchEngine

    settings = make_settings(tiny_checkpoint, max_concurrency=1)
    engines = [TorchEngine(settings, max_concurrency=1), TorchEngine(settings, max_concurrency=1)]
    app = create_app(settings, engine_factory=factory(*engines))
    with serve_app(app) as url:
        pdf = make_pdf(6)
        r = httpx.post(url + "/pdf/ocr/simple", files={"file": ("r.pdf", pdf)}, data={"dpi": "72"}, timeout=120)
        assert r.status_code == 200, show(r)
        assert all(p["status"] in ("ok", "truncated") for p in r.json()["pages"]), show(r)
        health = httpx.get(url + "/health").json()
    assert [e.batches > 0 for e in engines] == [True, True], [e.batches for e in engines]
    assert [e.peak_running for e in engines] == [1, 1], [e.peak_running for e in engines]
    assert len(health["engines"]) == 2 and all(e["max_concurrency"] == 1 for e in health["engines"]), health
    assert health["in_flight"] == 0 and health["waiting"] == 0, health


async def one_slot_admission() -> tuple[ReplayEngine, Any]:
    """A started replay engine of one slot, and admission over it alone."""
    from service.admission import Admission

    engine = ReplayEngine(TEXT, max_concurrency=1)
    await engine.start()
    return engine, Admission([engine], max_queue=10)


def test_admission_waiters_wake_in_order_and_leave_when_cancelled() -> None:

    async def scenario() -> list[str]:
        engine, admission = await one_slot_admission()
        first = await admission.acquire()
        order: list[str] = []

        async def wait(name: str) -> None:
            async with admission.slot():
                order.append(name)

        a, b, c = (asyncio.create_task(wait(n)) for n in "abc")
        await asyncio.sleep(0.05)
        assert admission.waiting == 3
        b.cancel()
        first.release()
        await asyncio.gather(a, c, return_exceptions=True)
        assert admission.in_flight == 0 and admission.waiting == 0
        assert not admission._turns.held and not admission._turns.served  # nothing kept of finished or cancelled flows
        return order

    assert asyncio.run(scenario()) == ["a", "c"]


async def _granted_in_order(capacity: int, held: list[str], queued: list[str], late: list[str]) -> list[str]:
    """Items named `<flow><n>`: `held` get slots at once, `queued` then wait (in that order), `late` arrive
    after the first slot is freed. Slots are then freed one at a time, the oldest grant first; returns the
    order in which the waiting items got theirs."""
    from service.admission import Admission

    engine = ReplayEngine(TEXT, max_concurrency=capacity)
    await engine.start()
    admission = Admission([engine], max_queue=100)
    slots = {name: await admission.acquire(flow=name[0]) for name in held}
    granted: list[str] = []
    tasks = []

    async def wait(name: str) -> None:
        slots[name] = await admission.acquire(flow=name[0])
        granted.append(name)

    for name in queued:
        tasks.append(asyncio.create_task(wait(name)))
        await asyncio.sleep(0)  # arrival order = list order
    await asyncio.sleep(0.01)
    assert admission.waiting == len(queued) and not granted
    order = list(held)
    for n in range(len(held) + len(queued) + len(late)):
        if n == 1:
            for name in late:
                tasks.append(asyncio.create_task(wait(name)))
                await asyncio.sleep(0)
        if n >= len(order):
            break
        slots[order[n]].release()
        await asyncio.sleep(0.01)
        order = list(held) + granted
    await asyncio.gather(*tasks)
    for name in order[len(order) - capacity:]:
        slots[name].release()
    assert admission.in_flight == 0 and admission.waiting == 0
    assert not admission._turns.held and not admission._turns.served
    return granted


def test_a_slot_freed_while_the_engine_was_down_goes_out_when_it_is_back() -> None:
    """The engine dies with an item waiting; the item holding its slot ends (nothing can take the slot
    then); the engine is restarted within the waiters' re-check period. The waiting item gets the slot
    instead of waiting out its deadline (CI saw two 504s after 60 s this way)."""

    async def scenario() -> None:
        engine, admission = await one_slot_admission()
        held = await admission.acquire(flow="a")
        waiter = asyncio.create_task(admission.acquire(flow="b"))
        await asyncio.sleep(0.05)
        engine.kill()
        held.release()  # no ready engine: the slot goes to nobody now
        await engine.start()  # back before the waiter looked (re-check period 0.5 s)
        slot = await asyncio.wait_for(waiter, 3)
        assert slot.engine is engine and admission.busy(engine) == 1
        slot.release()
        assert admission.in_flight == 0 and admission.waiting == 0

    asyncio.run(scenario())


def test_admission_forgets_a_flow_whose_last_waiter_gave_up() -> None:

    async def scenario() -> None:
        engine, admission = await one_slot_admission()
        first = await admission.acquire(flow="pdf")
        second = asyncio.create_task(admission.acquire(flow="pdf"))
        photo = asyncio.create_task(admission.acquire(flow="photo"))
        await asyncio.sleep(0.05)
        first.release()  # the photo's flow was never served: it goes first
        photo_slot = await photo
        assert not second.done() and "pdf" not in admission._turns.held and "pdf" in admission._turns.served
        second.cancel()  # the PDF's client went away while its next page waited
        await asyncio.gather(second, return_exceptions=True)
        assert "pdf" not in admission._turns.served, admission._turns.served
        photo_slot.release()
        assert admission.in_flight == 0 and admission.waiting == 0
        assert not admission._turns.held and not admission._turns.served

    asyncio.run(scenario())


def test_admission_shares_slots_between_requests() -> None:
    """A freed slot goes to the request (flow) with the fewest items in flight: two big requests take turns,
    and a photo posted behind them goes next instead of waiting for their queues."""
    assert asyncio.run(_granted_in_order(2, ["A1", "A2"], ["A3", "A4", "A5", "B1", "B2", "B3"], [])) == [
        "B1", "A3", "B2", "A4", "B3", "A5"]
    assert asyncio.run(_granted_in_order(2, ["A1", "A2"], ["A3", "A4", "A5", "A6"], ["C1"])) == [
        "A3", "C1", "A4", "A5", "A6"]
    # One slot: both flows have nothing in flight when it frees; the one served longest ago goes first.
    assert asyncio.run(_granted_in_order(1, ["A1"], ["A2", "A3", "A4"], ["C1"])) == ["A2", "C1", "A3", "A4"]


class _ModesEngine(ReplayEngine):
    """A replay engine serving only some modes."""

    def __init__(self, modes: tuple[str, ...], capacity: int) -> None:
        super().__init__(TEXT, max_concurrency=capacity)
        self._served = modes

    @property
    def served_modes(self) -> tuple[str, ...]:
        return self._served


class _Rule:
    """Admission's documented rule, computed item by item over every waiting item: the reference that the
    grouped-by-flow implementation must agree with."""

    def __init__(self, engines: list[ReplayEngine]) -> None:
        self.engines = engines
        self.busy = {id(e): 0 for e in engines}
        self.flows: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.grants = 0
        self.waiting: list[tuple[int, str, str]] = []  # (arrival, flow, mode)

    def free(self, mode: str) -> ReplayEngine | None:
        usable = [e for e in self.engines if mode in e.served_modes and self.busy[id(e)] < e.max_concurrency]
        return min(usable, key=lambda e: self.busy[id(e)] / e.max_concurrency, default=None)

    def grant(self, engine: ReplayEngine, flow: str) -> None:
        self.busy[id(engine)] += 1
        self.flows[flow] = self.flows.get(flow, 0) + 1
        self.grants += 1
        self.served[flow] = self.grants

    def release(self, engine: ReplayEngine, flow: str) -> tuple[int, ReplayEngine] | None:
        """Free a slot; returns the waiting item (its arrival) that gets it, and where, or None."""
        self.busy[id(engine)] -= 1
        self.flows[flow] -= 1
        if not self.flows[flow]:
            del self.flows[flow]
            if not any(f == flow for _, f, _ in self.waiting):
                self.served.pop(flow, None)
        candidates = [(self.flows.get(f, 0), self.served.get(f, -1), arrival, f, mode)
                      for arrival, f, mode in self.waiting if self.free(mode) is not None]
        if not candidates:
            return None
        _, _, arrival, f, mode = min(candidates)
        engine = self.free(mode)
        assert engine is not None
        self.waiting = [w for w in self.waiting if w[0] != arrival]
        self.grant(engine, f)
        return arrival, engine


def test_admission_grants_follow_the_rule_over_random_traffic() -> None:
    """Random flows and modes on two engines that serve different modes: every freed slot goes where the
    rule says (fewest in flight for the flow, then served longest ago, then arrival; only to an item that
    a free engine can run), whatever the grouping of waiters inside `Admission`."""
    import random

    from config import MODES
    from service.admission import Admission

    async def trial(rng: random.Random) -> int:
        engines = [_ModesEngine(("base", "gundam"), 2), _ModesEngine(("tiny", "gundam"), 3)]
        for engine in engines:
            await engine.start()
        admission = Admission(engines, max_queue=1000)
        rule = _Rule(engines)
        held: list[tuple[object, str]] = []  # (slot, flow)
        for _ in range(5):
            slot = await admission.acquire(MODES["gundam"], flow="x")
            rule.grant(slot.engine, "x")
            held.append((slot, "x"))
        tasks: dict[int, tuple[asyncio.Task, str]] = {}
        for arrival in range(1, 41):
            flow, mode = rng.choice("abcdef"), rng.choice(("tiny", "base", "gundam"))
            tasks[arrival] = (asyncio.create_task(admission.acquire(MODES[mode], flow=flow)), flow)
            rule.waiting.append((arrival, flow, mode))
            await asyncio.sleep(0)
        assert admission.waiting == 40
        checked = 0
        while held:
            slot, flow = held.pop(rng.randrange(len(held)))
            expected = rule.release(slot.engine, flow)
            slot.release()
            for _ in range(20):  # the granted waiter resumes through wait_for and shield: a few loop turns
                await asyncio.sleep(0)
            done = [a for a, (t, _) in tasks.items() if t.done()]
            if expected is None:
                assert not done, done
            else:
                arrival, engine = expected
                assert done == [arrival], (done, arrival)
                task, f = tasks.pop(arrival)
                assert task.result().engine is engine
                held.append((task.result(), f))
                checked += 1
            assert admission.waiting == len(rule.waiting) == len(tasks)
        assert not tasks and admission.in_flight == 0 and not admission._turns.held and not admission._turns.served
        return checked

    rng = random.Random(20261130)
    assert sum(asyncio.run(trial(rng)) for _ in range(25)) == 25 * 40


def test_a_photo_does_not_wait_for_a_long_pdfs_queue(tiny_checkpoint: Path) -> None:
    """Over HTTP: with the engine full of a PDF's pages and more of them queued, a photo posted meanwhile
    runs on the next free slot (FIFO would put it behind every queued page)."""
    engine = ReplayEngine(TEXT, max_concurrency=1, delay_s=1.0)
    settings = make_settings(tiny_checkpoint, max_concurrency=1, num_workers=4, pdf_timeout_s=120)
    app = create_app(settings, engine_factory=factory(engine))
    with serve_app(app) as url, ThreadPoolExecutor(1) as pool:
        pdf = pool.submit(httpx.post, url + "/pdf/ocr", files={"file": ("long.pdf", make_pdf(8))},
                          data={"dpi": "72", "draw_layouts": "false"}, timeout=120)
        deadline = time.monotonic() + 30
        while app.state.service.admission.waiting < 2:  # one page running, the rest of its window queued
            assert time.monotonic() < deadline, app.state.service.admission.waiting
            time.sleep(0.02)
        started = len(engine.requests)
        r = httpx.post(url + "/ocr/image/advanced", files={"file": ("photo.png", png_bytes(200, 120))},
                       data={"draw_boxes": "false"}, timeout=60)
        assert r.status_code == 200, show(r)
        assert pdf.result().status_code == 200, show(pdf.result())
    pages = [r.image.size if r.image is not None else None for r in engine.requests]
    at = pages.index((200, 120))
    # Started on the first or second slot freed after it was posted (a page takes 1 s: at most one more
    # starts while the photo's upload is read); behind the two queued pages it would have been third.
    assert started <= at <= started + 1, (started, at, len(pages))


def sized_pdf(pages: int, width: int, height: int) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for n in range(pages):
        doc.new_page(width=width, height=height).insert_text((56, 72), f"Page {n + 1}", fontsize=22)
    data = doc.tobytes()
    doc.close()
    return data


def test_a_photo_does_not_wait_behind_pdf_pages_for_pixel_budget(tiny_checkpoint: Path) -> None:
    """Over HTTP: three PDFs whose rendered pages fill the decoded-pixel budget (MAX_DECODED_MPIX), more pages
    waiting for it; a photo posted meanwhile gets budget before them (its request holds none) and then the
    next engine slot. In arrival order it would wait until every page queued ahead had run."""
    engine = ReplayEngine(TEXT, max_concurrency=1, delay_s=0.4)
    # About two pages at 72 dpi (0.25-0.5 MP each): the PDFs' windows (3 pages each) queue for budget.
    settings = make_settings(tiny_checkpoint, max_concurrency=1, num_workers=2, pdf_timeout_s=120,
                             max_decoded_mpix=0.75)
    app = create_app(settings, engine_factory=factory(engine))
    widths = (595, 500, 420)  # one PDF of each page width: a page's width says which PDF it is from

    def pdf_of(size: tuple[int, int] | None) -> int | None:
        return None if size is None else min(widths, key=lambda w: abs(size[0] - w))

    with serve_app(app) as url, ThreadPoolExecutor(3) as pool:
        pdfs = [pool.submit(httpx.post, url + "/pdf/ocr", files={"file": (f"{w}.pdf", sized_pdf(8, w, 842))},
                            data={"dpi": "72", "draw_layouts": "false"}, timeout=120) for w in widths]
        deadline = time.monotonic() + 60
        # Every PDF has had a page run (each has been served), and pages wait for budget.
        while {pdf_of(r.image.size if r.image else None) for r in engine.requests} < set(widths) \
                or app.state.service.pixels.waiting < 3:
            assert time.monotonic() < deadline, (len(engine.requests), app.state.service.pixels.waiting)
            time.sleep(0.02)
        started, queued = len(engine.requests), app.state.service.pixels.waiting
        r = httpx.post(url + "/ocr/image/advanced", files={"file": ("photo.png", png_bytes(200, 120))},
                       data={"draw_boxes": "false"}, timeout=60)
        assert r.status_code == 200, show(r)
        for pdf in pdfs:
            assert pdf.result().status_code == 200, show(pdf.result())
    sizes = [r.image.size if r.image is not None else None for r in engine.requests]
    at = sizes.index((200, 120))
    # The first or second engine slot freed after it was posted (a page takes 0.4 s: at most one more
    # starts while the photo's upload is read); in arrival order, behind the `queued` pages.
    assert started <= at <= started + 1, (started, at, queued, len(sizes))


@pytest.mark.parametrize("route", ["/ocr/status", "/pdf/status", "/batch/status"])
def test_status_routes_report_every_engine_mode(base_url: str, route: str) -> None:
    r = httpx.get(base_url + route)
    assert r.status_code == 200 and r.json()["ready"] and "gundam" in r.json()["modes"], show(r)
