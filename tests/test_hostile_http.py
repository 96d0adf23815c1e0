"""Hostile clients over real HTTP (issue 18's findings not covered by tests/test_hostile.py).

The server is `uvicorn serve_ocr:app` as a process with the Makefile's connection options (so the options
are tested as shipped), on the tiny checkpoint. Each test builds its hostile input here and checks: a 4xx
problem+json naming the limit, `/health` answering within 1 s throughout (polled from a thread), an
ordinary request succeeding alongside, the server's RSS under a stated bound, no worker process left.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from server import free_port, show

ROOT = Path(__file__).resolve().parent.parent
BODY_TIMEOUT_S = 2.0
# The pixel-budget tests run at half the findings' sizes (20 MP items, MAX_DECODED_MPIX=50: two at a time) to
# stay fast on a small box; full size (scripts in the report): twelve 40 MP PNGs at MAX_DECODED_MPIX=100 peak
# at +0.9 GB where the finding saw +2.35 GB. Unbudgeted, six 20 MP strips took ~+2.5 GB.
BUDGET_MPIX = 50
PEAK_GROWTH_MB = 1200


def makefile_options() -> list[str]:
    """The uvicorn options of `make serve`, with the shell default of LIMIT_CONCURRENCY filled in."""
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("UVICORN_LIMITS"))
    return shlex.split(line.split("=", 1)[1].replace("$${LIMIT_CONCURRENCY:-1000}", "1000"))


@contextlib.contextmanager
def serve_with_limits(env: dict[str, str]) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="uvicorn-", suffix=".log", delete=False)
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
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"workers left after the server stopped: {alive}"
        log.close()
        os.unlink(log.name)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[tuple[str, psutil.Process]]:
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DEFAULT_MAX_TOKENS": "4",
           "MAX_CONCURRENCY": "4", "NUM_WORKERS": "4", "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
           "MAX_DECODED_MPIX": str(BUDGET_MPIX), "DATA_DIR": tempfile.mkdtemp(prefix="ocr-data-"),
           "LOG_LEVEL": "WARNING"}
    env.pop("API_KEY", None)
    with serve_with_limits(env) as running:
        yield running


class HealthWatch:
    """Polls /health from a thread; `worst` is the slowest answer (a failed poll counts as infinite), `peak`
    the server's highest RSS (MB, render children included) seen meanwhile."""

    def __init__(self, url: str, proc: psutil.Process | None = None, *, bound_s: float = 1.0) -> None:
        self.url, self.proc, self.bound_s = url, proc, bound_s
        self.worst, self.stop = 0.0, threading.Event()
        self.peak = self.start_rss = rss_mb(proc) if proc else 0.0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.worst = max(self.worst, time.monotonic() - started if ok else float("inf"))
                if self.proc is not None:
                    self.peak = max(self.peak, rss_mb(self.proc))
                time.sleep(0.1)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert self.worst < self.bound_s, f"/health took {self.worst:.2f} s during the hostile request"


def rss_mb(proc: psutil.Process) -> float:
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def png_image(width: int, height: int) -> bytes:
    """A grey PNG of any size, written directly (Pillow would allocate the pixels first)."""
    row = b"\x00" + b"\x80" * width
    body = zlib.compress(row * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def ordinary(url: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, "PNG")
    r = httpx.post(url + "/ocr/image/simple", files={"file": ("a.png", buf.getvalue(), "image/png")}, timeout=60)
    assert r.status_code == 200, show(r)


def problem(r: httpx.Response, status: int, names: str) -> None:
    assert r.status_code == status, show(r)
    assert r.headers["content-type"].startswith("application/problem+json"), show(r)
    assert names in r.json()["detail"], show(r)


def test_pixel_strips_wait_for_the_budget(server: tuple[str, psutil.Process]) -> None:
    """Finding 4: six concurrent 1 x N PNG strips (a few KB each) decode two at a time, not all at once.

    /health is held to 5 s here, not 1 s: process/image_process resizes a strip with a Pillow coefficient
    table of ~1.2 GB for 1 x 40M, built holding the GIL for ~3 s (the engine's preprocessing, not the
    decode); the fix there is `reducing_gap` for extreme downscales (see the issue 18 report).
    """
    url, proc = server
    strip = png_image(20_000_000, 1)

    def post_strip(_: int) -> httpx.Response:
        return httpx.post(url + "/ocr/image/simple", files={"file": ("strip.png", strip, "image/png")}, timeout=120)

    with HealthWatch(url, proc, bound_s=5.0) as watch, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(post_strip, range(6)))
        ordinary(url)
    for r in answers:
        assert r.status_code == 200, show(r)
    assert watch.peak - watch.start_rss < PEAK_GROWTH_MB, f"RSS peaked {watch.peak - watch.start_rss:.0f} MB up"


def test_batch_of_large_pngs_waits_for_the_budget(server: tuple[str, psutil.Process]) -> None:
    """Finding 4: one batch of twelve large PNGs (a few KB each) holds at most MAX_DECODED_MPIX decoded."""
    url, proc = server
    square = png_image(5000, 4000)
    files = [("files", (f"p{i}.png", square, "image/png")) for i in range(12)]
    with HealthWatch(url, proc) as watch, ThreadPoolExecutor(1) as pool:
        batch = pool.submit(httpx.post, url + "/batch/ocr", files=files, timeout=300)
        time.sleep(1)
        ordinary(url)
        r = batch.result()
    assert r.status_code == 200, show(r)
    assert r.json()["failed"] == 0, show(r)
    assert watch.peak - watch.start_rss < PEAK_GROWTH_MB, f"RSS peaked {watch.peak - watch.start_rss:.0f} MB up"


def test_item_over_the_whole_budget_is_413(tiny_checkpoint: Path) -> None:
    """An image larger than MAX_DECODED_MPIX can never be decoded: 413 naming the setting, nothing waits."""
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DEFAULT_MAX_TOKENS": "4",
           "MAX_DECODED_MPIX": "1", "NUM_WORKERS": "2", "DATA_DIR": tempfile.mkdtemp(prefix="ocr-data-")}
    with serve_with_limits(env) as (url, _):
        files = {"file": ("big.png", png_image(2000, 1000), "image/png")}
        problem(httpx.post(url + "/ocr/image/simple", files=files, timeout=60), 413, "MAX_DECODED_MPIX")


def test_huge_header_is_refused_quickly(server: tuple[str, psutil.Process]) -> None:
    """A 200 MB header line (49.5 s of httptools parsing before) is refused after 64 KB."""
    url, proc = server
    port = int(url.rsplit(":", 1)[1])
    before = rss_mb(proc)
    started = time.monotonic()
    with HealthWatch(url), socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, chunk = 0, b"a" * (1 << 20)
        with contextlib.suppress(OSError):
            while sent < 200 * (1 << 20):
                sock.sendall(chunk)
                sent += len(chunk)
        with contextlib.suppress(OSError):
            reply = sock.recv(4096)
            assert not reply or reply.startswith(b"HTTP/1.1 4"), reply[:200]
        ordinary(url)
    assert sent < 200 * (1 << 20), "the server read the whole 200 MB header"
    assert time.monotonic() - started < 10
    assert rss_mb(proc) - before < 100


def test_slow_body_is_cut_with_408(server: tuple[str, psutil.Process]) -> None:
    """A body trickling at a few bytes a second gets a 408 problem after BODY_TIMEOUT_S."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    head = (b"POST /ocr/image/simple HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n")
    started = time.monotonic()
    with HealthWatch(url), socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        reply = b""
        sock.settimeout(0.5)
        while time.monotonic() - started < 20 and b"\r\n\r\n" not in reply:
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
            with contextlib.suppress(TimeoutError):
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        elapsed = time.monotonic() - started
        ordinary(url)
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                reply += data
    assert reply.startswith(b"HTTP/1.1 408"), reply[:500]
    assert b"application/problem+json" in reply and b"BODY_TIMEOUT_S" in reply, reply[:1000]
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5, elapsed


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
    from answers import pdf_response, pdf_zip
    from pipeline import DocumentRun, ItemResult, PagePost

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

    from admission import PixelBudget
    from errors import PayloadTooLarge

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
