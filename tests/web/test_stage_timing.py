"""Issue 29: every OCR answer says where its time went (`Server-Timing`, the JSON `timing`, `/metrics`), over real
HTTP on the tiny model, one request per route of each OCR family. No timing thresholds: only that the figures
are there, parse, are consistent with each other, and reach the stage histograms."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from helpers.images import png_bytes
from helpers.pdfs import make_pdf
from helpers.server import make_settings, serve_app, show
from prometheus_client.parser import text_string_to_metric_families

from serve_ocr import create_app
from service.timing import STAGES

ALL = (*STAGES, "total")
PNG = png_bytes(64, 48)
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
SHORT = {"max_tokens": "4"}


@pytest.fixture(scope="module")
def url(tiny_checkpoint: Path):
    with serve_app(create_app(make_settings(tiny_checkpoint))) as base:
        yield base


def server_timing(r: httpx.Response) -> dict[str, float]:
    """The header parsed by its W3C grammar: `name;dur=<ms>` metrics, comma-separated."""
    assert "server-timing" in r.headers, show(r)
    figures: dict[str, float] = {}
    for metric in r.headers["server-timing"].split(","):
        name, _, params = metric.strip().partition(";")
        key, _, value = params.partition("=")
        assert key == "dur", r.headers["server-timing"]
        figures[name] = float(value)
    return figures


def stage_counts(url: str, route: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200, show(r)
    return {
        s.labels["stage"]: s.value
        for family in text_string_to_metric_families(r.text) if family.name == "ocr_stage_seconds"
        for s in family.samples if s.name == "ocr_stage_seconds_count" and s.labels["route"] == route
    }


def moved(url: str, route: str, before: dict[str, float]) -> dict[str, float]:
    """The route's stage counts once they moved: the middleware observes them after the answer was sent."""
    for _ in range(100):
        after = stage_counts(url, route)
        if after.get("total", 0) > before.get("total", 0):
            return after
        time.sleep(0.05)
    return stage_counts(url, route)


def post(url: str, path: str, **kwargs: object) -> Callable[[], httpx.Response]:
    return lambda: httpx.post(url + path, timeout=120, **kwargs)  # type: ignore[arg-type]


REQUESTS: dict[str, tuple[str, dict]] = {
    # route: (what it answers, the request's keyword arguments)
    "/ocr/image/advanced": ("json", {"files": {"file": ("a.png", PNG, "image/png")}, "data": SHORT}),
    "/ocr/image/simple": ("json", {"files": {"file": ("a.png", PNG, "image/png")}, "data": SHORT}),
    "/pdf/ocr": ("json", {"files": {"file": ("a.pdf", make_pdf(1), "application/pdf")}, "data": SHORT}),
    "/pdf/ocr/simple": ("json", {"files": {"file": ("a.pdf", make_pdf(1), "application/pdf")}, "data": SHORT}),
    "/pdf/ocr/download": ("zip", {"files": {"file": ("a.pdf", make_pdf(1), "application/pdf")}, "data": SHORT}),
    "/batch/ocr": ("json", {"files": [("files", ("a.png", PNG, "image/png"))], "data": SHORT}),
    "/batch/ocr/simple": ("json", {"files": [("files", ("a.png", PNG, "image/png"))], "data": SHORT}),
    "/batch/ocr/download": ("zip", {"files": [("files", ("a.png", PNG, "image/png"))], "data": SHORT}),
    "/generate": ("json", {"json": {"prompt": "<image>\nFree OCR.", "image_base64": DATA_URL, "max_tokens": 4}}),
    "/generate_with_file": ("json", {"files": {"file": ("a.png", PNG, "image/png")},
                                     "data": {"prompt": "<image>\nFree OCR.", **SHORT}}),
    "/v1/chat/completions": ("json", {"json": {
        "model": "deepseek-ocr", "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Free OCR."},
                                                  {"type": "image_url", "image_url": {"url": DATA_URL}}]}],
    }}),
}


@pytest.mark.parametrize("route", sorted(REQUESTS))
def test_every_ocr_answer_says_where_its_time_went(url: str, route: str) -> None:
    kind, kwargs = REQUESTS[route]
    before = stage_counts(url, route)
    r = post(url, route, **kwargs)()
    assert r.status_code == 200, show(r)
    figures = server_timing(r)
    assert list(figures) == list(ALL), r.headers["server-timing"]
    assert all(ms >= 0 for ms in figures.values()), figures
    # One item per request here, so no stage is a sum of overlapping items: each fits in the request.
    assert figures["total"] >= max(figures[s] for s in STAGES), figures
    assert figures["ttft"] + figures["gen"] > 0, figures  # the engine ran: the time is on its stages, not lost
    if kind == "json":
        timing = r.json()["timing"]
        assert {k: v for k, v in timing.items() if k != "items"} == figures, (timing, figures)
        assert timing["items"] == 1, timing
    after = moved(url, route, before)
    assert {s: after.get(s, 0) - before.get(s, 0) for s in ALL} == dict.fromkeys(ALL, 1), (before, after)


def test_a_batch_sums_its_items(url: str) -> None:
    files = [("files", (f"{n}.png", png_bytes(40 + n, 30), "image/png")) for n in range(3)]
    r = post(url, "/batch/ocr/simple", files=files, data=SHORT)()
    assert r.status_code == 200, show(r)
    timing = r.json()["timing"]
    assert timing["items"] == 3, timing
    assert {k: v for k, v in timing.items() if k != "items"} == server_timing(r), timing
    assert timing["read"] >= 0 and timing["decode"] > 0 and timing["post"] > 0, timing


def test_a_slow_upload_is_counted_in_read(url: str) -> None:
    """The upload's arrival is part of `read`: a client that pauses 0.6 s mid-body makes `read` about that
    (no stage held it before, so a loaded or slow client's upload was in `total` only)."""
    boundary = "stage-timing-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"max_tokens\"\r\n\r\n4\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + PNG
    tail = f"\r\n--{boundary}--\r\n".encode()
    pause = 0.6

    def body():
        yield head
        time.sleep(pause)
        yield tail

    r = httpx.post(url + "/ocr/image/simple", content=body(), timeout=120,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, show(r)
    figures = server_timing(r)
    # The server's clock starts once it has parsed the request's head, a few ms after the client began its
    # pause; without the upload in `read`, `read` is ~1 ms here.
    assert figures["read"] >= pause * 1000 - 100, figures
    assert figures["total"] >= sum(figures[s] for s in STAGES), figures  # stages do not overlap on one image


def test_a_stream_names_what_it_knows_before_its_first_chunk(url: str) -> None:
    route = "/v1/chat/completions"
    before = stage_counts(url, route)
    body = {**REQUESTS[route][1]["json"], "stream": True}
    with httpx.stream("POST", url + route, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        figures = server_timing(r)
        text = r.read().decode()
    assert text.rstrip().endswith("data: [DONE]"), text
    assert set(figures) == set(ALL) and all(ms >= 0 for ms in figures.values()), figures
    assert figures["decode"] > 0 and figures["gen"] == 0, figures  # decoded before the answer; generated after
    after = moved(url, route, before)
    assert after.get("gen", 0) - before.get("gen", 0) == 1, (before, after)


def test_answers_that_do_no_ocr_have_no_server_timing(url: str) -> None:
    for path in ("/health", "/v1/models", "/"):
        r = httpx.get(url + path)
        assert r.status_code == 200 and "server-timing" not in r.headers, (path, dict(r.headers))
