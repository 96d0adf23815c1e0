"""/metrics, X-Request-ID and log formats, over real HTTP on the tiny model (issue 15)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers.images import png_bytes
from helpers.jobs import submit, wait
from helpers.pdfs import make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

import logging_config
from serve_ocr import create_app
from web import metrics

KEY = "obs-key"
AUTH = {"X-API-Key": KEY}
FAMILIES = {
    "ocr_http_requests_total": "counter",
    "ocr_http_request_duration_seconds": "histogram",
    "ocr_items_total": "counter",
    "ocr_tokens_total": "counter",
    "ocr_finish_reasons_total": "counter",
    "ocr_image_tokens": "histogram",
    "ocr_in_flight": "gauge",
    "ocr_waiting": "gauge",
    "ocr_engine_ready": "gauge",
    "ocr_engines": "gauge",
    "ocr_jobs": "gauge",
    # The operator's view (issue 28).
    "ocr_build_info": "gauge",
    "ocr_engine_restarts_total": "counter",
    "ocr_quarantined_inputs": "gauge",
    "ocr_queue_wait_seconds": "histogram",
    "ocr_item_seconds": "histogram",
    "ocr_job_duration_seconds": "histogram",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "python_info": "gauge",
    "python_gc_collections_total": "counter",
}


@pytest.fixture(scope="module")
def served(tiny_checkpoint: Path):
    """The app with an API key and a 1 MB upload limit, plus a route with a path parameter."""
    app = create_app(make_settings(tiny_checkpoint, api_key=KEY, max_upload_mb=1))

    @app.get("/echo/{item}")
    async def echo(item: str) -> dict[str, str | None]:
        logging.getLogger("deepseek_ocr.test").info("echo handler for %s", item)
        return {"item": item, "request_id": logging_config.request_id()}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with serve_app(app) as url:
        yield app, url
    logging_config.configure_logging(make_settings(None))


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", headers=AUTH if headers is None else headers)
    assert r.status_code == 200, show(r)
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST, show(r)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for_text(capsys: pytest.CaptureFixture[str], needle: str, timeout: float = 10.0) -> str:
    """Everything written to stderr so far, once `needle` is in it (access lines follow the answer)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += capsys.readouterr().err
        if needle in seen:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not logged; stderr was:\n{seen[-3000:]}")


def test_metrics_lists_families_and_counts_requests(served) -> None:
    _, url = served
    r = httpx.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200, show(r)
    for name, kind in FAMILIES.items():
        assert f"# TYPE {name} {kind}" in r.text, f"{name} missing:\n{r.text[:3000]}"
    before = scrape(url)
    r = httpx.post(url + "/ocr/image/simple", files={"file": ("a.png", png_bytes())}, headers=AUTH, timeout=60)
    assert r.status_code == 200, show(r)
    after = scrape(url)
    route = {"route": "/ocr/image/simple", "method": "POST"}
    assert sample(after, "ocr_http_requests_total", **route, status="200") == 1 + sample(
        before, "ocr_http_requests_total", **route, status="200"
    ), r.text
    assert sample(after, "ocr_http_request_duration_seconds_count", **route) == 1 + sample(
        before, "ocr_http_request_duration_seconds_count", **route
    )
    # The service counted the item under the route that asked for it, with its tokens.
    item = {"route": "/ocr/image/simple", "mode": "gundam", "status": r.json()["finish_reason"] == "length"
            and "truncated" or "ok"}
    assert sample(after, "ocr_items_total", **item) == 1 + sample(before, "ocr_items_total", **item), after
    usage = r.json()["usage"]
    for kind in ("prompt", "image", "completion"):
        moved = sample(after, "ocr_tokens_total", kind=kind) - sample(before, "ocr_tokens_total", kind=kind)
        assert moved == usage[f"{kind}_tokens"], (kind, usage)
    # Gauges read from the engine at scrape time.
    assert sample(after, "ocr_engine_ready") == 1
    assert sample(after, "ocr_engines") == 1
    assert sample(after, "ocr_in_flight") == 0
    assert sample(after, "ocr_waiting") == 0


def test_route_template_not_raw_path_and_refusals_counted(served) -> None:
    _, url = served
    before = scrape(url)
    for item in ("one", "two"):
        r = httpx.get(f"{url}/echo/{item}", headers=AUTH)
        assert r.status_code == 200, show(r)
    r = httpx.get(url + "/echo/three")  # no key: the guard answers before routing
    assert r.status_code == 401, show(r)
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers
    r = httpx.get(url + "/no/such/page", headers=AUTH)
    assert r.status_code == 404, show(r)
    r = httpx.request("PROPFIND", url + "/echo/four")  # a real method, but not a label
    assert r.status_code == 401, show(r)
    after = scrape(url)
    for status, added in (("200", 2), ("401", 1)):
        labels = {"route": "/echo/{item}", "method": "GET", "status": status}
        assert (
            sample(after, "ocr_http_requests_total", **labels) - sample(before, "ocr_http_requests_total", **labels)
            == added
        ), status
    assert sample(after, "ocr_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert sample(after, "ocr_http_requests_total", route="/echo/{item}", method="other", status="401") >= 1
    assert not any(needle in str(key) for key in after for needle in ("/echo/one", "/no/such", "PROPFIND"))


def test_413_from_the_guard_carries_the_request_id(served) -> None:
    _, url = served
    r = httpx.post(
        url + "/ocr/image/simple",
        content=b"x" * (3 << 20),
        headers={**AUTH, "content-type": "multipart/form-data; boundary=zz", "X-Request-ID": "big-upload-1"},
    )
    assert r.status_code == 413, show(r)
    assert r.headers["x-request-id"] == "big-upload-1", r.headers


def test_record_item_moves_item_token_and_finish_counters(served) -> None:
    """The service layer will call this per page; until it is wired, call it as that layer will."""
    app, url = served
    metrics: metrics.Metrics = app.state.metrics
    before = scrape(url)
    metrics.record_item("/pdf/ocr", "gundam", "truncated", "length", 10, 603, 5)
    metrics.record_item("/pdf/ocr", "gundam", "ok", "stop", 12, 273, 7)
    metrics.record_item("/pdf/ocr", "gundam", "failed", None, 0, 0, 0)
    after = scrape(url)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    for status in ("truncated", "ok", "failed"):
        assert moved("ocr_items_total", route="/pdf/ocr", mode="gundam", status=status) == 1, status
    assert moved("ocr_tokens_total", kind="prompt") == 22
    assert moved("ocr_tokens_total", kind="image") == 876
    assert moved("ocr_tokens_total", kind="completion") == 12
    assert moved("ocr_finish_reasons_total", reason="length") == 1
    assert moved("ocr_finish_reasons_total", reason="stop") == 1
    assert moved("ocr_image_tokens_count", mode="gundam") == 2
    assert moved("ocr_image_tokens_bucket", mode="gundam", le="273.0") == 1
    with pytest.raises(ValueError, match="truncated"):
        metrics.record_item("/pdf/ocr", "gundam", "weird", None, 0, 0, 0)


def test_state_and_jobs_sources_are_read_at_scrape_time(served) -> None:
    app, url = served
    metrics: metrics.Metrics = app.state.metrics
    jobs = {"queued": 2, "running": 1}
    metrics.set_jobs_source(lambda: jobs)
    try:
        assert sample(scrape(url), "ocr_jobs", status="queued") == 2
        jobs["queued"] = 5
        assert sample(scrape(url), "ocr_jobs", status="queued") == 5
        metrics.set_jobs_source(lambda: 1 / 0)  # a broken callback loses its gauge, not the scrape
        assert sample(scrape(url), "ocr_jobs", status="queued") == 0
    finally:
        metrics.set_jobs_source(None)


def test_request_id_round_trips_into_header_handler_and_log(served, capsys) -> None:
    _, url = served
    logging_config.configure_logging(make_settings(None, log_level="INFO"))
    capsys.readouterr()
    r = httpx.get(url + "/echo/x", headers={**AUTH, "X-Request-ID": "trace-42.A_b"})
    assert r.status_code == 200, show(r)
    assert r.headers["x-request-id"] == "trace-42.A_b"
    assert r.json()["request_id"] == "trace-42.A_b", show(r)
    err = wait_for_text(capsys, "GET /echo/x 200")
    lines = [line for line in err.splitlines() if "[trace-42.A_b]" in line]
    assert any(" INFO deepseek_ocr.test [trace-42.A_b]: echo handler for x" in line for line in lines), err
    access = [line for line in lines if "deepseek_ocr.access" in line]
    assert access and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", access[0]), err


def test_unhandled_error_500_carries_the_request_id(served, capsys) -> None:
    _, url = served
    logging_config.configure_logging(make_settings(None, log_level="INFO"))
    capsys.readouterr()
    r = httpx.get(url + "/boom", headers={**AUTH, "X-Request-ID": "bug-7"})
    assert r.status_code == 500, show(r)
    assert r.headers["x-request-id"] == "bug-7", r.headers
    assert r.headers["content-type"] == "application/problem+json", show(r)
    assert "RuntimeError" in r.json()["detail"], show(r)
    err = wait_for_text(capsys, "GET /boom 500")
    assert any("[bug-7]: unhandled error on /boom" in line for line in err.splitlines()), err
    assert "    RuntimeError: a bug" in err, err  # traceback lines indented under their record


@pytest.mark.parametrize("given", ["has space", "x" * 129, "semi;colon", "ünïcode"])
def test_invalid_request_id_is_replaced(served, capsys, given: str) -> None:
    _, url = served
    capsys.readouterr()
    r = httpx.get(url + "/echo/y", headers={**AUTH, "X-Request-ID": given.encode()})
    assert r.status_code == 200, show(r)
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid), r.headers
    assert r.json()["request_id"] == rid, show(r)
    wait_for_text(capsys, f"[{rid}]: GET /echo/y 200")


def test_text_logs_escape_control_characters(served, capsys) -> None:
    _, url = served
    logging_config.configure_logging(make_settings(None, log_level="INFO"))
    capsys.readouterr()
    # The raw path reaches the access line decoded: a client-chosen newline and ESC sequence.
    r = httpx.get(url + "/forged%0A2026-01-01 00:00:00,000 INFO fake: hi%1B[2J", headers=AUTH)
    assert r.status_code == 404, show(r)
    # The access line, not httpx's own INFO line about the same 404 (which may come first: a CI flake).
    err = wait_for_text(capsys, "deepseek_ocr.access")
    line = next(line for line in err.splitlines() if "deepseek_ocr.access" in line and " 404 " in line)
    assert "/forged\\n2026-01-01 00:00:00,000 INFO fake: hi\\x1b[2J 404" in line, err
    assert "\x1b" not in err and not any(x.startswith("2026-01-01") for x in err.splitlines()), err
    logging.getLogger("deepseek_ocr").warning("file %s failed", "evil\r\n.png\x1b[31m")
    err = wait_for_text(capsys, "failed")
    assert "file evil\\r\\n.png\\x1b[31m failed" in err, err


def test_json_logs_one_object_per_line(served, capsys) -> None:
    _, url = served
    logging_config.configure_logging(make_settings(None, log_format="json", log_level="INFO"))
    try:
        capsys.readouterr()
        r = httpx.get(url + "/echo/z%0Aq", headers={**AUTH, "X-Request-ID": "json-1"})
        assert r.status_code == 200, show(r)
        err = wait_for_text(capsys, "GET /echo/z")
        try:
            int("not a number")
        except ValueError:
            logging.getLogger("deepseek_ocr.test").exception("outside a request")
        err += wait_for_text(capsys, "outside a request")
        entries = [json.loads(line) for line in err.splitlines() if line.strip()]
        mine = [e for e in entries if e["request_id"] == "json-1"]
        assert {e["logger"] for e in mine} >= {"deepseek_ocr.test", "deepseek_ocr.access"}, err
        handler = next(e for e in mine if e["logger"] == "deepseek_ocr.test")
        assert handler["message"] == "echo handler for z\nq" and handler["level"] == "INFO", handler
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", handler["time"]), handler
        failure = next(e for e in entries if e["message"] == "outside a request")
        assert failure["request_id"] is None and "ValueError" in failure["exception"], failure
    finally:
        logging_config.configure_logging(make_settings(None))


def test_metrics_public_setting_and_separate_registries(tiny_checkpoint: Path) -> None:
    """A second app in the same process has its own registry; METRICS_PUBLIC opens /metrics only."""
    app = create_app(make_settings(None, api_key=KEY, metrics_public=True))
    with serve_app(app) as url:
        samples = scrape(url, headers={})
        assert sample(samples, "ocr_engine_ready") == 0
        assert not any(key[0] == "ocr_http_requests_total" and "/echo/{item}" in str(key) for key in samples)
        r = httpx.get(url + "/")
        assert r.status_code == 401, show(r)


def test_build_info_and_health_version(served) -> None:
    _, url = served
    after = scrape(url)
    builds = [dict(labels) for (name, labels), value in after.items() if name == "ocr_build_info" and value == 1]
    assert len(builds) == 1, builds
    build = builds[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, check=False).stdout.strip()
    assert build["version"] == "1.0.0" and build["commit"] == head, build
    assert build["torch"] == importlib.metadata.version("torch"), build  # read from metadata, not by importing
    health = httpx.get(url + "/health").json()
    assert health["version"] == "1.0.0" and health["commit"] == (head or None), health
    assert sample(after, "process_resident_memory_bytes") > 0 and sample(after, "process_open_fds") > 0


def test_queue_wait_item_seconds_and_jobs_move(served) -> None:
    _, url = served
    before = scrape(url)
    r = httpx.post(url + "/ocr/image/simple", files={"file": ("a.png", png_bytes())}, headers=AUTH, timeout=60)
    assert r.status_code == 200, show(r)
    job = submit(url, make_pdf(1), headers=AUTH)
    done = wait(url, job["id"], headers=AUTH)
    assert done["status"] == "done", done
    after = scrape(url)
    assert sample(after, "ocr_queue_wait_seconds_count") >= 2 + sample(before, "ocr_queue_wait_seconds_count")
    route = {"route": "/ocr/image/simple"}
    assert sample(after, "ocr_item_seconds_count", **route) == 1 + sample(before, "ocr_item_seconds_count", **route)
    assert sample(after, "ocr_item_seconds_sum", **route) > sample(before, "ocr_item_seconds_sum", **route)
    # A job's pages are counted under /jobs (no HTTP request is current while they run).
    jobs = {"route": "/jobs"}
    assert sample(after, "ocr_item_seconds_count", **jobs) == 1 + sample(before, "ocr_item_seconds_count", **jobs)
    moved = sum(v for (name, labels), v in after.items() if name == "ocr_items_total" and ("route", "/jobs") in labels)
    was = sum(v for (name, labels), v in before.items() if name == "ocr_items_total" and ("route", "/jobs") in labels)
    assert moved == was + 1, after
    ended = {"kind": "pdf", "status": "done"}
    assert sample(after, "ocr_job_duration_seconds_count", **ended) == 1 + sample(
        before, "ocr_job_duration_seconds_count", **ended)
    assert not any(("route", "background") in labels for _, labels in after), "job pages still labelled background"


def test_restarts_and_quarantine_move(tiny_checkpoint: Path) -> None:
    poison_size = (77, 55)
    engine = ReplayEngine("# fine\n", crash_on=lambda req: req.image is not None and req.image.size == poison_size)
    app = create_app(make_settings(tiny_checkpoint, api_key=KEY), engine_factory=factory(engine))
    poison = {"file": ("poison.png", png_bytes(*poison_size))}
    with serve_app(app) as url:
        before = scrape(url)
        assert sample(before, "ocr_engine_restarts_total") == 0 and sample(before, "ocr_quarantined_inputs") == 0
        for crash in (1, 2):
            r = httpx.post(url + "/ocr/image/simple", files=poison, headers=AUTH, timeout=30)
            assert r.status_code == 503, show(r)
            deadline = time.monotonic() + 60
            while sample(scrape(url), "ocr_engine_restarts_total") < crash or not engine.ready:
                assert time.monotonic() < deadline, "the engine was not restarted"
                time.sleep(0.1)
        after = scrape(url)
        assert sample(after, "ocr_engine_restarts_total") == 2, after
        assert sample(after, "ocr_quarantined_inputs") == 1, after
