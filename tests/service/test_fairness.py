"""Fairness across requests, jobs and keys (issue 26, N4/N5/N8), over real HTTP against `uvicorn serve_ocr:app`.

Key A runs a long job (many ordinary pages: it keeps the engine batching) and a fill-bomb job (pages that take
MuPDF seconds each) at once, on the CPU engine with the tiny checkpoint and the service's defaults. Meanwhile
(a) an image gets its answer within one engine batch's time plus 10 s, the batch measured in the same test from
the engine's batch counter under the same load; (b) a 1-page PDF within 30 s; (c) key B's `POST /jobs` is
accepted promptly. Before the fairness work the image waited for the job's pages queued inside the engine (two
full batches and more), the PDF for every queued render of both jobs, and `POST /jobs` for a free render process.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from helpers import hostile as h
from helpers.health_clock import HealthClock
from helpers.jobs import submit, wait
from helpers.pdfs import make_pdf, picture_png
from helpers.server import data_dir, serve_process, show

KEY_A, KEY_B = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
LONG_PAGES = 60  # scaled down from the 300: the job still outlasts the probes on the 2-core box
BOMB = dict(repeats=100, pages=20)  # ~5 s of MuPDF a page: 100 s of rendering for one process
PROBE_S = 60  # each probe's client gives up here: past every bound below, so a failure stays quick and clear


def timed(fn) -> tuple[httpx.Response | str, float]:
    """The answer (or why none came: the client gives up after PROBE_S) and how long it took."""
    started = time.monotonic()
    try:
        response: httpx.Response | str = fn()
    except httpx.TimeoutException as exc:
        response = f"no answer in {PROBE_S} s ({type(exc).__name__})"
    return response, time.monotonic() - started


def test_sync_requests_and_other_keys_are_served_while_a_long_job_and_a_fill_bomb_run(tiny_checkpoint: Path):
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_DIR": data_dir(),
           "API_KEY": "key-a,key-b", "DEFAULT_MAX_TOKENS": "64"}  # 64: the README's demo server (make serve)
    png, one_page = picture_png(), make_pdf(1)
    with serve_process(env) as url:
        image = lambda: httpx.post(url + "/ocr/image/simple", files={"file": ("a.png", png)}, headers=KEY_A,  # noqa: E731
                                   timeout=PROBE_S)
        pdf = lambda: httpx.post(url + "/pdf/ocr", files={"file": ("one.pdf", one_page)}, headers=KEY_A,  # noqa: E731
                                 timeout=PROBE_S)
        r, idle_image_s = timed(image)  # warm: the engine's first batch, the render processes' first page
        assert isinstance(r, httpx.Response) and r.status_code == 200, r if isinstance(r, str) else show(r)
        r, idle_pdf_s = timed(pdf)
        assert isinstance(r, httpx.Response) and r.status_code == 200, r if isinstance(r, str) else show(r)

        long_job = submit(url, make_pdf(LONG_PAGES), "long.pdf", headers=KEY_A)
        bomb_job = submit(url, h.heavy_pdf(**BOMB), "bomb.pdf", headers=KEY_A)
        with HealthClock(url, timeout_s=10) as clock:
            wait(url, long_job["id"], pages_done=1, timeout=60, headers=KEY_A)  # the job feeds the engine now
            image_answer, image_s = timed(image)
            pdf_answer, pdf_s = timed(pdf)
            job_answer, job_s = timed(lambda: httpx.post(url + "/jobs", files={"file": ("b.pdf", one_page)},
                                                        headers=KEY_B, timeout=PROBE_S))
        long_state = httpx.get(f"{url}/jobs/{long_job['id']}", headers=KEY_A).json()
        bomb_state = httpx.get(f"{url}/jobs/{bomb_job['id']}", headers=KEY_A).json()
        timeline = (f"idle: image {idle_image_s:.1f} s, pdf {idle_pdf_s:.1f} s; under load: image {image_s:.1f} s, "
                    f"pdf {pdf_s:.1f} s, POST /jobs {job_s:.1f} s; longest engine batch "
                    f"{clock.longest:.1f} s over {clock.batches} batches; long job {long_state['status']} "
                    f"{long_state['pages_done']}/{LONG_PAGES}, bomb {bomb_state['status']} {bomb_state['pages_done']}")
        # The load was there the whole time: neither job had ended when the probes were done.
        assert long_state["status"] == "running" and bomb_state["status"] == "running", timeline
        assert clock.batches >= 2, timeline
        assert image_s <= clock.longest + 10, timeline
        assert pdf_s <= 30, timeline
        assert job_s <= 10, timeline
        for answer, status in ((image_answer, 200), (pdf_answer, 200), (job_answer, 202)):
            assert isinstance(answer, httpx.Response) and answer.status_code == status, (
                f"{timeline}\n{show(answer) if isinstance(answer, httpx.Response) else answer}")
        print(timeline)
