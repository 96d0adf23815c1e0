"""A long PDF keeps every engine sequence busy: nothing between the render pool and the engine caps the batch.

The vLLM engine's throughput follows its batch: on the H200 a 256-page PDF through the service ran at 0.58x
raw vLLM while the decoded-pixel budget (400 MP, each page in flight holding ~2 MP and each page being
rendered 40 MP) let only ~180 pages reach the engine at once. Now a render reserves its page's real size
and the default budget covers 5 MP per engine sequence. A replay engine that holds each item for a while
shows the engine's peak of items at once reaching its full MAX_CONCURRENCY.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
from helpers.pdfs import make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show

from serve_ocr import create_app

CONCURRENCY = 256
HOLD_S = 90.0  # an item waits this long at most for the engine to fill up


class FillingEngine(ReplayEngine):
    """Holds every item until all its sequences are busy (or HOLD_S passed): the peak then shows how many
    items the pipeline lets reach the engine at once, whatever the box's speed at rendering."""

    full: asyncio.Event | None = None

    async def _stream(self, request):  # type: ignore[no-untyped-def]
        if self.full is None:
            self.full = asyncio.Event()
        if self.running >= self.max_concurrency:
            self.full.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.full.wait(), HOLD_S)
        async for chunk in super()._stream(request):
            yield chunk


def test_a_long_pdf_fills_every_engine_sequence(tiny_checkpoint: Path) -> None:
    engine = FillingEngine("# Page\n", max_concurrency=CONCURRENCY)
    settings = make_settings(tiny_checkpoint, max_concurrency=CONCURRENCY, pdf_timeout_s=600, max_pdf_pages=400)
    app = create_app(settings, engine_factory=factory(engine))
    with serve_app(app) as url:
        assert app.state.service.pixels.max_pixels >= CONCURRENCY * 5_000_000, app.state.service.pixels.max_pixels
        pdf = make_pdf(CONCURRENCY + 20)
        r = httpx.post(url + "/pdf/ocr", files={"file": ("long.pdf", pdf)},
                       data={"dpi": "144", "draw_layouts": "false", "extract_images": "false"}, timeout=600)
        assert r.status_code == 200, show(r)
        assert len(r.json()["pages"]) == CONCURRENCY + 20, show(r)
        assert app.state.service.pixels.used == 0, app.state.service.pixels.used
    assert engine.peak_running == CONCURRENCY, f"only {engine.peak_running} of {CONCURRENCY} sequences were ever busy"


def test_an_explicit_budget_is_kept(tiny_checkpoint: Path) -> None:
    engine = ReplayEngine("# Page\n", max_concurrency=64, delay_s=2.0)
    settings = make_settings(tiny_checkpoint, max_concurrency=64, max_decoded_mpix=20)
    app = create_app(settings, engine_factory=factory(engine))
    with serve_app(app) as url:
        assert app.state.service.pixels.max_pixels == 20_000_000
        r = httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", make_pdf(30))}, data={"dpi": "144"}, timeout=300)
        assert r.status_code == 200, show(r)
    # Pages of 1 to 2 MP at 144 dpi: a 20 MP budget holds 10 to 20 at once, whatever the engine takes.
    assert 5 <= engine.peak_running <= 20 and engine.peak_running < 64, engine.peak_running


def test_render_processes_start_with_the_service(tiny_checkpoint: Path) -> None:
    """PDF_RENDER_PRESTART (the default): every render process runs before the first PDF, and that PDF
    renders on them; started on demand instead, the first long PDF waited seconds for interpreters to start
    while one or two warm processes rendered (the engines filled at ~12 pages/s on two H200s)."""
    settings = make_settings(tiny_checkpoint, pdf_render_prestart=True, num_workers=2)
    app = create_app(settings, engine_factory=factory(ReplayEngine("# Page\n")))
    with serve_app(app) as url:
        pool = app.state.service.render_pool
        started = set(pool.pids())  # start-up waited for them (PRESTART_WAIT_S)
        assert len(started) == settings.render_processes == 2, started
        r = httpx.post(url + "/pdf/ocr", files={"file": ("p.pdf", make_pdf(6))}, data={"dpi": "72"}, timeout=120)
        assert r.status_code == 200, show(r)
        assert len(r.json()["pages"]) == 6, show(r)
        assert set(pool.pids()) == started  # none started for the PDF, none lost


def test_render_processes_on_demand_when_not_prestarted(tiny_checkpoint: Path) -> None:
    settings = make_settings(tiny_checkpoint, pdf_render_prestart=False)
    app = create_app(settings, engine_factory=factory(ReplayEngine("# Page\n")))
    with serve_app(app) as url:
        pool = app.state.service.render_pool
        assert httpx.get(url + "/ready", timeout=10).status_code == 200
        assert pool.pids() == []
        r = httpx.post(url + "/pdf/ocr", files={"file": ("p.pdf", make_pdf(2))}, data={"dpi": "72"}, timeout=120)
        assert r.status_code == 200, show(r)
        assert 1 <= len(pool.pids()) <= settings.render_processes
