"""Prometheus metrics of one app: what an operator needs to watch the service.

`Metrics` lives in its own `CollectorRegistry` (several apps in one process, as in the tests, do not
collide). Counters and histograms move as requests run; engine and job gauges are read from callbacks at
scrape time, so they are never stale. Served at `GET /metrics`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match

from config import Settings
from service.results import ITEM_STATUSES
from web.status import build_info

log = logging.getLogger("deepseek_ocr.metrics")

# The ASGI scope of the request being served: items counted deep in the service are labelled with its route
# template, read when they finish (routing has set `scope["route"]` by then).
ACCESS_COUNTS = "deepseek_ocr.access"  # scope key: items and generated tokens of the request so far
current_scope: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("current_scope", default=None)


def route_template(scope: Any) -> str:
    """The matched route's path format (`/jobs/{id}`), never the raw path: raw paths would make a metric
    label per URL. Requests the guard refused before routing are matched here; no match is "unmatched"."""
    route = scope.get("route")
    if route is None and scope.get("app") is not None:
        for candidate in scope["app"].router.routes:
            if candidate.matches(scope)[0] != Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or "unmatched"



# ------------------------------------------------------------------------------------------------- metrics

TOKEN_KINDS = ("prompt", "image", "completion")
# Image tokens per mode (FACTS): tiny 73, small 111, base 273, large 421, gundam 273 + 110 per tile (2..6).
IMAGE_TOKEN_BUCKETS = (73, 111, 273, 421, 493, 603, 713, 823, 933, 2048)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Stages run from tens of microseconds (a transfer) to minutes (a PDF's summed generation).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, *LATENCY_BUCKETS)
# A job runs from seconds (one page) to hours (a 10,000-page PDF).
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
JOBS_ROUTE = "/jobs"  # the route label of pages a job runs (no HTTP request is current while they run)

StateSource = Callable[[], dict[str, Any]]
JobsSource = Callable[[], dict[str, int]]


class Metrics:
    """The app's Prometheus metrics. The service layer calls `record_item` once per page or image done;
    the middleware calls `observe_request`; gauges come from `set_state_source` / `set_jobs_source`."""

    def __init__(self, prefix: str = "ocr") -> None:
        disable_created_metrics()  # process-wide: `*_created` series double the output and nobody graphs them
        self.registry = CollectorRegistry()
        r, p = self.registry, prefix
        self.requests = Counter(
            f"{p}_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            f"{p}_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            f"{p}_items",
            "Pages and images processed, by route, mode and outcome",
            ["route", "mode", "status"],
            registry=r,
        )
        self.tokens = Counter(
            f"{p}_tokens", "Tokens processed, by kind (prompt, image, completion)", ["kind"], registry=r
        )
        self.finish_reasons = Counter(f"{p}_finish_reasons", "Generations by finish reason", ["reason"], registry=r)
        self.image_tokens = Histogram(
            f"{p}_image_tokens",
            "Vision tokens per image or page, by mode",
            ["mode"],
            buckets=IMAGE_TOKEN_BUCKETS,
            registry=r,
        )
        self.stages = Histogram(
            f"{p}_stage_seconds",
            "Time per stage of an OCR request (read, decode, wait, transfer, ttft, gen, post, encode, total), by "
            "route template; a PDF's or batch's stages are sums over its items",
            ["stage", "route"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{p}_queue_wait_seconds", "Seconds from asking admission for an engine slot to getting one",
            buckets=STAGE_BUCKETS, registry=r,
        )
        self.item_seconds = Histogram(
            f"{p}_item_seconds", "Seconds per page or image, from its start to its post-processed result, by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.job_seconds = Histogram(
            f"{p}_job_duration_seconds", "Seconds from a job's submission to its end, by kind and final status",
            ["kind", "status"], buckets=JOB_BUCKETS, registry=r,
        )
        self.build = Info(f"{p}_build", "The build serving: version, git commit, torch and vLLM installed",
                          registry=r)  # exposed as ocr_build_info
        # The process's memory, CPU, open files and start time, the interpreter and its garbage collector: on
        # this registry, as the global one is not what /metrics serves.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        for kind in TOKEN_KINDS:
            self.tokens.labels(kind)  # present at 0 from the start, so rate() works on the first scrape
        self._state_source: StateSource | None = None
        self._jobs_source: JobsSource | None = None
        r.register(_CallbackCollector(self, p))

    def record_item(
        self,
        route: str,
        mode: str,
        status: str,
        finish_reason: str | None,
        prompt_tokens: int,
        image_tokens: int,
        completion_tokens: int,
    ) -> None:
        """One page or image finished (status: one of `ITEM_STATUSES`); route is the template."""
        if status not in ITEM_STATUSES:
            raise ValueError(f"item status {status!r} is not one of {', '.join(ITEM_STATUSES)}")
        self.items.labels(route, mode, status).inc()
        if finish_reason:
            self.finish_reasons.labels(finish_reason).inc()
        for kind, count in zip(TOKEN_KINDS, (prompt_tokens, image_tokens, completion_tokens), strict=True):
            if count:
                self.tokens.labels(kind).inc(count)
        if image_tokens:
            self.image_tokens.labels(mode).observe(image_tokens)

    def observe_stages(self, route: str, figures: dict[str, float]) -> None:
        """One OCR request's stages (`service.timing.STAGES` and `total`, in ms as the header has them)."""
        for stage, ms in figures.items():
            self.stages.labels(stage, route).observe(ms / 1000)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def set_state_source(self, fn: StateSource | None) -> None:
        """fn() -> {"in_flight": int, "waiting": int, "engine_ready": bool, "engines": int}, called per scrape."""
        self._state_source = fn

    def set_jobs_source(self, fn: JobsSource | None) -> None:
        """fn() -> {job status: count}, called per scrape."""
        self._jobs_source = fn

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CallbackCollector(Collector):
    """Gauges computed at scrape time; a failing callback costs its gauges, not the scrape."""

    def __init__(self, metrics: Metrics, prefix: str) -> None:
        self.metrics, self.prefix = metrics, prefix

    def collect(self) -> Iterable[Metric]:
        p = self.prefix
        state = _call(self.metrics._state_source)
        for key, help_text in (
            ("in_flight", "Engine sequences running now"),
            ("waiting", "Engine sequences queued for a slot"),
            ("engine_ready", "1 when the engine can serve OCR"),
            ("engines", "Engines (data-parallel replicas) serving"),
        ):
            family = GaugeMetricFamily(f"{p}_{key}", help_text)
            if key in state:
                family.add_metric([], float(state[key]))
            yield family
        restarts = CounterMetricFamily(f"{p}_engine_restarts", "Dead engines restarted in place by the supervisor")
        quarantined = GaugeMetricFamily(f"{p}_quarantined_inputs",
                                        "Inputs quarantined after engine deaths (refused with 422 until a restart)")
        if "restarts" in state:
            restarts.add_metric([], float(state["restarts"]))
            quarantined.add_metric([], float(state["quarantined"]))
        yield restarts
        yield quarantined
        ready = GaugeMetricFamily(f"{p}_worker_ready", "1 when this engine worker can serve", labels=["worker"])
        busy = GaugeMetricFamily(f"{p}_worker_in_flight", "Items on this engine worker now", labels=["worker"])
        for worker, (is_ready, in_flight) in sorted(state.get("workers", {}).items()):
            ready.add_metric([worker], float(is_ready))
            busy.add_metric([worker], float(in_flight))
        yield ready
        yield busy
        jobs = GaugeMetricFamily(f"{p}_jobs", "Jobs by status", labels=["status"])
        for status, count in sorted(_call(self.metrics._jobs_source).items()):
            jobs.add_metric([str(status)], float(count))
        yield jobs


def _call(fn: Callable[[], dict[str, Any]] | None) -> dict[str, Any]:
    if fn is None:
        return {}
    try:
        return dict(fn())
    except Exception:
        log.exception("a metrics callback failed")
        return {}


def engine_state(app: FastAPI) -> StateSource:
    """The default state source: the service's admission (every engine behind it)."""

    def read() -> dict[str, Any]:
        service = getattr(app.state, "service", None)
        if service is None:
            return {}
        a = service.admission
        # Per worker (engine workers, Ray actors: named with their host or node), else per engine name.
        workers = {str(e.worker_id or e.name): (e.ready, a.busy(e)) for e in a.engines}
        return {"in_flight": a.in_flight, "waiting": a.waiting, "engine_ready": a.ready, "engines": len(a.engines),
                "workers": workers, "restarts": service.supervisor.restarts,
                "quarantined": len(service.supervisor.quarantined)}

    return read


def install(app: FastAPI, settings: Settings) -> Metrics:
    """Give the app its `Metrics` (on `app.state.metrics`) and `GET /metrics`.

    `/metrics` needs the API key like every route unless METRICS_PUBLIC=true (the guard reads that setting).
    """
    metrics = Metrics()
    metrics.set_state_source(engine_state(app))
    metrics.build.info(build_info(settings))
    app.state.metrics = metrics

    @app.get(
        "/metrics",
        tags=["base"],
        summary="Prometheus metrics (text exposition format)",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format",
            }
        },
    )
    async def metrics_endpoint(request: Request) -> Response:
        # In a thread: the jobs gauge asks the job store (SQL), which must not hold the event loop.
        body = await asyncio.to_thread(request.app.state.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return metrics


def item_observer(metrics: Metrics) -> Callable[[str, Any, Any], None]:
    """A `service.ocr.OcrService` observer: each finished item counted under the current route."""

    def observe(kind: str, result: Any, mode: Any) -> None:
        u = result.usage
        scope = current_scope.get()
        route = route_template(scope) if scope is not None else JOBS_ROUTE
        if scope is not None:  # the request's access log line reports them (web/guard.py)
            counts = scope.setdefault(ACCESS_COUNTS, {"pages": 0, "tokens": 0})
            counts["pages"] += 1
            counts["tokens"] += u.completion_tokens
        metrics.record_item(route, mode.name, result.status, result.finish_reason, u.prompt_tokens,
                            u.image_tokens, u.completion_tokens)
        metrics.item_seconds.labels(route).observe(result.elapsed_s)

    return observe


def watch_service(metrics: Metrics, service: Any) -> None:
    """Count what the service does: items (`item_observer`), admission's queue waits and the jobs that end."""
    service.observers.append(item_observer(metrics))
    service.admission.wait_observers.append(metrics.queue_wait.observe)
    service.job_observers.append(lambda kind, status, seconds: metrics.job_seconds.labels(kind, status).observe(
        max(0.0, seconds)))
