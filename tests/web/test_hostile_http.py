"""Issue 18 pieces checked below the full HTTP scenarios of tests/web/test_hostile_server.py (which covers every
finding against a real server): an item over the whole pixel budget, `API_KEY` spellings that hold no key,
the JSON answer cap, the pixel budget's order and cancellation. A server process with the Makefile's uvicorn
options is started here; the options and the PNG writer are in tests/helpers/.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from helpers.hostile_server import makefile_options
from helpers.images import png_image
from helpers.server import data_dir, free_port, scratch_root, show, survivors
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serve_with_limits(env: dict[str, str]) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="uvicorn-", suffix=".log", delete=False, dir=scratch_root())
    command = [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*command, *makefile_options()], cwd=ROOT, env={**os.environ, **env},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{Path(log.name).read_text()[-5000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, Path(log.name).read_text()[-5000:]
            time.sleep(0.2)
        yield url, psutil.Process(proc.pid)
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        alive = survivors(children)
        assert not alive, f"workers left after the server stopped: {alive}"
        log.close()
        os.unlink(log.name)


def problem(r: httpx.Response, status: int, names: str) -> None:
    assert r.status_code == status, show(r)
    assert r.headers["content-type"].startswith("application/problem+json"), show(r)
    assert names in r.json()["detail"], show(r)


def test_item_over_the_whole_budget_is_413(tiny_checkpoint: Path) -> None:
    """An image larger than MAX_DECODED_MPIX can never be decoded: 413 naming the setting, nothing waits."""
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DEFAULT_MAX_TOKENS": "4",
           "MAX_DECODED_MPIX": "1", "NUM_WORKERS": "2", "DATA_DIR": data_dir()}
    with serve_with_limits(env) as (url, _):
        files = {"file": ("big.png", png_image(2000, 1000), "image/png")}
        problem(httpx.post(url + "/ocr/image/simple", files=files, timeout=60), 413, "MAX_DECODED_MPIX")


def test_pdf_page_over_the_whole_budget_is_rendered_to_fit(tiny_checkpoint: Path) -> None:
    """A PDF page that would render to more than MAX_DECODED_MPIX failed with a 413 naming a size it does not
    have (the budget it reserved, grown by twice its render), or, where the shortfall alone fitted, waited for
    ever for pixels only its own release could free. It is rendered at the dpi that fits instead, as for
    MAX_IMAGE_PIXELS, with a note saying so."""
    from helpers.pdfs import make_pdf

    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DEFAULT_MAX_TOKENS": "4",
           "MAX_DECODED_MPIX": "1", "DATA_DIR": data_dir()}
    with serve_with_limits(env) as (url, _):
        r = httpx.post(url + "/pdf/ocr", files={"file": ("a4.pdf", make_pdf(2))}, data={"dpi": "144"},
                       timeout=60)
        assert r.status_code == 200, show(r)
        pages = r.json()["pages"]
        assert len(pages) == 2 and {p["status"] for p in pages} <= {"ok", "truncated"}, pages
        for p in pages:
            assert p["width"] * p["height"] <= 1_000_000 and p["dpi"] < 144, p
            assert "instead of 144 dpi" in (p.get("note") or ""), p


@pytest.mark.parametrize("key", [" ", ",", " , ,"])
def test_api_key_without_a_key_stops_startup(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`API_KEY=" "` silently opened every route: building the app (start-up) now stops, saying why."""
    from config import SettingsError
    from serve_ocr import create_app

    monkeypatch.setenv("API_KEY", key)
    with pytest.raises(SettingsError, match="API_KEY.*holds no key"):
        create_app()


def test_json_answer_images_are_capped() -> None:
    """A 14 MB six-page PDF made a 286 MB JSON answer: images past MAX_ANSWER_MB are left out, with a warning
    naming the cap; the ZIP download keeps them all."""
    import zipfile

    import ocr_utils
    from service.results import DocumentRun, ItemResult, PagePost
    from web.answers import pdf_response, pdf_zip

    def page(n: int) -> ItemResult:
        buf = io.BytesIO()
        Image.effect_noise((600, 600), 64).convert("RGB").save(buf, "JPEG", quality=95)
        jpeg = buf.getvalue()
        crop = ocr_utils.Crop(f"images/{n}_0.jpg", "image", (0, 0, 10, 10), 600, 600, jpeg)
        post = PagePost("m", "p", [], [], 600, 600, annotated_jpeg=jpeg, crops=[crop])
        return ItemResult(n, "ok", post=post, width=600, height=600, dpi=144)

    one = len(page(1).post.annotated_jpeg)  # type: ignore[union-attr]
    run = DocumentRun("gundam", 6, 144, [page(n) for n in range(1, 7)], [], time.perf_counter(),
                      max_answer_bytes=int(one * 4 / 3 * 4.5))
    answer = pdf_response(run)
    assert len(answer.images) < 6
    assert any("MAX_ANSWER_MB" in w for w in answer.warnings), answer.warnings
    assert len(answer.model_dump_json()) < run.max_answer_bytes + 100_000  # type: ignore[operator]
    run = DocumentRun("gundam", 6, 144, [page(n) for n in range(1, 7)], [], time.perf_counter(),
                      max_answer_bytes=1)
    with zipfile.ZipFile(io.BytesIO(pdf_zip(run, "doc"))) as z:
        assert len([n for n in z.namelist() if n.startswith("images/")]) == 6


def test_pixel_budget_is_fifo_and_released_on_cancel() -> None:
    """Waiters are served in order; a waiter cancelled (its deadline) takes nothing; an item over the whole
    budget is a 413 naming MAX_DECODED_MPIX."""
    import asyncio

    from errors import PayloadTooLarge
    from service.pixel_budget import PixelBudget

    async def scenario() -> None:
        budget = PixelBudget(100)
        first = await budget.reserve(80)
        late = asyncio.create_task(budget.reserve(50))
        small = asyncio.create_task(budget.reserve(10))
        await asyncio.sleep(0.01)
        assert not late.done() and not small.done()  # FIFO: the small one waits behind the big one
        late.cancel()
        await asyncio.sleep(0.01)
        assert small.done() and budget.used == 90
        first.resize(30)
        assert budget.used == 40
        first.release()
        small.result().release()
        first.release()
        assert budget.used == 0 and budget.waiting == 0
        with pytest.raises(PayloadTooLarge, match="MAX_DECODED_MPIX"):
            await budget.reserve(101)

    asyncio.run(scenario())


def test_pixel_budget_settle_past_the_whole_budget_is_413_not_a_wait() -> None:
    """An item that grows (`settle`) past the whole budget can never fit: growing waited for ever when the
    shortfall alone fitted in the budget. Growth that fits waits its turn and is then held."""
    import asyncio

    from errors import PayloadTooLarge
    from service.pixel_budget import PixelBudget

    async def scenario() -> None:
        budget = PixelBudget(100)
        held = await budget.reserve(100)
        with pytest.raises(PayloadTooLarge, match="MAX_DECODED_MPIX"):
            await asyncio.wait_for(budget.settle(held, 150), 1)
        held.resize(40)
        grown = await asyncio.wait_for(budget.settle(held, 70), 1)
        assert grown.pixels == 70 and budget.used == 70
        grown.release()
        held.release()
        assert budget.used == 0

    asyncio.run(scenario())


def test_pixel_budget_serves_the_request_holding_least_first() -> None:
    """Freed pixels go to the flow holding the fewest (then the one served longest ago, then arrival), a
    flow's own waiters in order; the chosen waiter blocks the rest until it fits (no bypass)."""
    import asyncio

    from service.pixel_budget import PixelBudget

    async def scenario() -> None:
        budget = PixelBudget(100)
        pdf = object()
        held = [await budget.reserve(40, flow=pdf), await budget.reserve(40, flow=pdf)]
        queued = [asyncio.create_task(budget.reserve(40, flow=pdf)) for _ in range(3)]
        await asyncio.sleep(0.01)
        photo = asyncio.create_task(budget.reserve(15))  # its own flow, holding nothing: fits at once
        await asyncio.sleep(0.01)
        assert photo.done() and not any(t.done() for t in queued) and budget.used == 95
        big = asyncio.create_task(budget.reserve(90))  # a new flow, first in turn, but 90 do not fit yet
        small = asyncio.create_task(budget.reserve(5))  # would fit now; waits behind the chosen big one
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done()
        held.pop().release()  # 55 used: the big one still does not fit, so nobody goes
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done() and not any(t.done() for t in queued)
        held.pop().release()
        photo.result().release()  # nothing used: the big one goes first, then the small one fits
        await asyncio.sleep(0.01)
        assert big.done() and small.done() and budget.used == 95 and not any(t.done() for t in queued)
        big.result().release()
        small.result().release()
        await asyncio.sleep(0.01)
        # The PDF's own waiters, in their order, as pixels allow (two of 40 fit in 100).
        assert [t.done() for t in queued] == [True, True, False] and budget.used == 80
        for t in queued[:2]:
            t.result().release()
        await asyncio.sleep(0.01)
        queued[2].result().release()
        assert budget.used == 0 and budget.waiting == 0
        assert not budget._turns.held and not budget._queues and not budget._turns.served  # nothing kept per flow

    asyncio.run(scenario())
