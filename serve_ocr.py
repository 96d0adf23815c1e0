"""DeepSeek-OCR API: the FastAPI app, its lifecycle, error handling and router loading.

`create_app(settings, engine_factory=None)` builds the app. Its lifespan starts the engines (the configured
one, or the factory's: tests inject replay engines), puts them behind one `service.admission.Admission` and builds
the `service.ocr.OcrService` every router calls (`app.state.service`). The image, PDF, batch and OpenAI (`/v1`)
routers are included when they import; one that does not is reported by `/` and by its `/status`, and the
rest keeps working. The MCP server (`mcp_server.py`) is mounted at `/mcp` the same way.
Run: `uvicorn serve_ocr:app` (or `python serve_ocr.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import base_routes
import logging_config
import web
from config import Settings, load_settings
from engines.base import UnavailableEngine
from engines.supervisor import EngineSupervisor
from errors import PROBLEM_MEDIA_TYPE, OcrError
from pdf.limits import PdfLimits
from pdf.office import office_converter
from pdf.render_pool import RenderPool
from service.admission import Admission
from service.ocr import OcrService
from web import metrics, slow_clients
from web.deps import accepted_fields, unknown_field_error
from web.guard import install_middleware
from web.schemas.common import Problem, RouterState
from web.schemas.openai import OpenAIErrorShape
from workers.start import DEMO_NOTICE, EngineFactory, start_engines

__version__ = base_routes.__version__
log = logging.getLogger("deepseek_ocr")

ROUTERS = {
    "ocr": ("ocr_routes", "/ocr"),
    "pdf": ("pdf_routes", "/pdf"),
    "batch": ("batch_routes", "/batch"),
    "openai": ("openai_routes", "/v1"),
    "jobs": ("jobs_routes", "/jobs"),
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": text}
    for code, text in {
        400: "Bad input (undecodable image, bad base64, prompt problems)",
        401: "Missing or wrong API key (when API_KEY is set)",
        413: "Upload, image or document over its limit",
        415: "Unsupported file type",
        422: "Invalid parameters",
        503: "Model not loaded or overloaded (see Retry-After)",
        504: "Deadline passed (the engine work was aborted)",
    }.items()
}


PRESTART_WAIT_S = 30.0  # the longest start-up waits for the render processes once the engines are up


def build_service(settings: Settings, engines: list[Any], executor: Any, render_pool: Any) -> OcrService:
    supervisor = EngineSupervisor(engines, enabled=settings.engine_restart)
    admission = Admission(engines, max_queue=settings.max_queue, job_slots=settings.job_engine_slots)
    return OcrService(settings, admission, executor, render_pool, supervisor)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="ocr-worker")
    render_pool = RenderPool(
        settings.render_processes,
        page_timeout_s=settings.pdf_render_timeout_s,
        open_timeout_s=settings.pdf_open_timeout_s,
        memory_limit_mb=settings.pdf_render_memory_mb,
        searchable_timeout_s=settings.pdf_searchable_timeout_s,
        per_document=settings.pdf_render_per_document,
        limits=PdfLimits(
            max_stream_mb=settings.pdf_max_stream_mb,
            max_objects=settings.pdf_max_objects,
            max_image_pixels=settings.pdf_max_image_pixels,
        ),
    )
    # The render processes start while the engines load (PDF_RENDER_PRESTART; else on the first PDF).
    prestart = asyncio.create_task(prestart_renderers(render_pool)) if settings.pdf_render_prestart else None
    # The OpenAPI schema too, off the event loop: built on the first `GET /` or `/openapi.json` (Swagger's first
    # load), it held the loop, and every other request, for a second or more (5.7 s on a loaded 2-core box).
    schema = asyncio.create_task(asyncio.to_thread(app.openapi))
    engines = await start_engines(settings, app.state.engine_factory)
    try:
        await schema
    except Exception:  # a route whose schema cannot be built: /docs shows the error, the rest serves
        log.exception("the OpenAPI schema could not be built")
    if prestart is not None:  # usually done by now; a slow one finishes in the background
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(prestart), PRESTART_WAIT_S)
    app.state.service = service = build_service(settings, engines, executor, render_pool)
    metrics.watch_service(app.state.metrics, service)
    service.supervisor.start()
    scaler = start_scaler(settings, service)
    mcp_sessions = app.state.mcp_sessions
    app.state.jobs = await start_jobs(settings, service, app.state.subsystems_down)
    if app.state.jobs is not None:  # the `ocr_jobs` gauge: the store's counts, read at each scrape
        app.state.metrics.set_jobs_source(app.state.jobs.store.count_by_status)
    try:
        async with mcp_sessions.run() if mcp_sessions is not None else contextlib.nullcontext():
            yield
    finally:
        await service.supervisor.stop()
        if scaler is not None:
            await scaler.stop()
        if app.state.jobs is not None:
            app.state.metrics.set_jobs_source(None)
            service.handoff = None  # a deadline from now on is the plain 504
            await app.state.jobs.stop()
        for engine in service.admission.engines:  # with the ones a Ray scaler added
            await engine.close()
        executor.shutdown(wait=False, cancel_futures=True)
        if prestart is not None:
            prestart.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await prestart
        render_pool.close()


async def prestart_renderers(pool: RenderPool) -> None:
    try:
        running = await pool.prestart()
    except Exception:  # the first PDF starts them instead (and says why if it cannot)
        log.warning("the PDF render processes could not be started ahead", exc_info=True)
        return
    log.info("PDF render processes ready: %d", running)


def start_scaler(settings: Settings, service: OcrService) -> Any:
    """ORCHESTRATOR=ray: Ray workers for nodes that join the cluster later (workers/ray_cluster.py)."""
    if settings.orchestrator != "ray":
        return None
    from workers import ray_cluster

    if ray_cluster.CLUSTER is None:  # no model: nothing to scale
        return None
    scaler = ray_cluster.Scaler(ray_cluster.CLUSTER, service)
    scaler.start()
    return scaler


async def start_jobs(settings: Settings, service: OcrService, down: dict[str, str]) -> Any:
    """The job runner (jobs/), or None when it cannot start: `down` then says why (`/health` is `degraded`).
    With it the service hands a sync request over to a job at its deadline; without it the deadline is a
    plain 504."""
    try:
        from jobs import store_url
        from jobs.handoff import take_over
        from jobs.runner import Runner
        from jobs.store import Store

        store = await asyncio.to_thread(Store, store_url(settings))  # creates the tables: off the event loop
        runner = Runner(service, store, settings, Path(settings.data_dir))
        await runner.start()
        down.pop("job_runner", None)  # an app whose lifespan runs again
        service.handoff = functools.partial(take_over, runner)
        return runner
    except Exception as exc:
        log.exception("the job runner could not start; /jobs answers 503")
        down["job_runner"] = f"the job runner could not start: {type(exc).__name__}: {exc}"
        return None


def problem_response(request: Request, exc: OcrError) -> JSONResponse:
    return JSONResponse(
        exc.to_problem(request.url.path),
        status_code=exc.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=exc.headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    async def on_ocr_error(request: Request, exc: OcrError) -> JSONResponse:
        return problem_response(request, exc)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query")),
                "msg": e["msg"],
            }
            for e in exc.errors()
        ]
        # A JSON field the body model forbids (a typo, a field of another route): name it, list the accepted ones.
        unknown = [err for err, e in zip(errors, exc.errors(), strict=True) if e["type"] == "extra_forbidden"]
        if unknown:
            accepted = accepted_fields(request.scope.get("route"))
            if len(unknown) == len(errors):
                problem = unknown_field_error([e["field"] for e in unknown], accepted, where="JSON")
                return problem_response(request, problem)
            for e in unknown:
                e["msg"] = f"unknown field; this route accepts: {', '.join(accepted)}"
        detail = "; ".join(f"{e['field'] or 'body'}: {e['msg']}" for e in errors)
        err = OcrError(detail, errors=errors)
        err.status, err.slug, err.title = 422, "validation-error", "The request parameters are invalid"
        return problem_response(request, err)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = OcrError(str(exc.detail), headers=dict(exc.headers or {}))
        err.status, err.slug, err.title = exc.status_code, f"http-{exc.status_code}", _reason(exc.status_code)
        return problem_response(request, err)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(request, OcrError(f"internal error ({type(exc).__name__}); this is a bug"))

    app.add_exception_handler(OcrError, on_ocr_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)


def _reason(status: int) -> str:
    from http import HTTPStatus

    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase
    return "Error"


def include_routers(app: FastAPI) -> dict[str, RouterState]:
    """Include each optional router; one that fails to import gets a `/status` saying why."""
    states: dict[str, RouterState] = {}
    for name, (module, prefix) in ROUTERS.items():
        try:
            app.include_router(importlib.import_module(module).router)
            states[name] = RouterState(available=True, prefix=prefix)
        except Exception as exc:
            reason = f"{module} failed to import: {type(exc).__name__}: {exc}"
            log.error("router %s unavailable: %s", name, reason)
            states[name] = RouterState(available=False, reason=reason, prefix=prefix)
            app.add_api_route(
                f"{prefix}/status",
                _unavailable_status(name, reason),
                methods=["GET"],
                tags=[name],
                summary=f"{name} router status (unavailable)",
            )
    return states


def mount_mcp(app: FastAPI) -> Any:
    """The MCP server at /mcp (its session manager, which the lifespan runs); None when it cannot load."""
    try:
        sessions = importlib.import_module("mcp_server").mount(app)
    except Exception as exc:
        reason = f"mcp_server failed to load: {type(exc).__name__}: {exc}"
        log.error("MCP server unavailable: %s", reason)
        app.state.routers["mcp"] = RouterState(available=False, reason=reason, prefix="/mcp")
        return None
    app.state.routers["mcp"] = RouterState(available=True, prefix="/mcp")
    return sessions


def _unavailable_status(name: str, reason: str) -> Any:
    from web.status import route_status

    async def status(request: Request) -> Any:
        return route_status(request, name, available=False, reason=reason)

    return status


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    settings = settings or load_settings()
    logging_config.configure_logging(settings)
    app = FastAPI(
        title="DeepSeek-OCR API",
        version=__version__,
        description="Images, PDFs and batches of files to markdown, text and layout boxes with DeepSeek-OCR.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine_factory = engine_factory
    app.state.started = time.monotonic()
    # Until the lifespan has started the engines, every route answers as "starting".
    app.state.service = build_service(settings, [UnavailableEngine("the engine is starting", recoverable=True)],
                                      None, None)
    install_error_handlers(app)
    install_middleware(app, settings)
    slow_clients.install(settings.body_timeout_s)  # request headers get BODY_TIMEOUT_S too (h11)
    app.add_middleware(OpenAIErrorShape)  # outermost: /v1/* errors in OpenAI's shape, the guard's 401 too
    metrics.install(app, settings)
    web.install(app)
    app.include_router(base_routes.router)
    app.state.routers = include_routers(app)
    app.state.subsystems_down = {}  # what is not a router and failed to start (the job runner), with why
    app.state.office = office_converter(settings)  # office files -> PDF (LibreOffice), for the PDF routes and jobs
    if app.state.office.unavailable:
        app.state.subsystems_down["office conversion"] = app.state.office.unavailable
    app.state.mcp_sessions = mount_mcp(app)
    install_security_schemes(app, settings)
    install_announcer(settings)
    return app


LOOPBACK_HOSTS = {"localhost", "::1"}


class StartupAnnouncer(logging.Filter):
    """Watches for uvicorn's "Uvicorn running on http://HOST:PORT" record and adds the service's own lines after
    it: the address to open in a browser and, when the socket is reachable from other machines without an
    API key, a warning. Uvicorn knows the real host and port only once it is bound (after the lifespan
    started), whichever way it was launched (`uvicorn serve_ocr:app`, `python serve_ocr.py`, the image)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Uvicorn running on %s://%s:%d") and len(record.args or ()) == 3:
            scheme, host, port = record.args  # type: ignore[misc]
            try:  # after uvicorn's own line, which is being emitted now
                asyncio.get_running_loop().call_soon(announce, self.settings, str(scheme), str(host), int(port))
            except RuntimeError:
                announce(self.settings, str(scheme), str(host), int(port))
        return True


def announce(settings: Settings, scheme: str, host: str, port: int) -> None:
    shown = "localhost" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    log.info("open %s://%s:%d/ui", scheme, shown, port)
    if not settings.api_keys and not is_loopback(host):
        log.warning(
            "listening on %s:%d, reachable from other machines, without API_KEY: anyone who can reach this port "
            "can run OCR and read every job. Set API_KEY, or HOST=127.0.0.1 to listen on this machine only",
            host, port,
        )


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def install_announcer(settings: Settings) -> None:
    """One announcer on uvicorn's logger, for the latest app (tests build many apps in one process)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    for old in [f for f in uvicorn_log.filters if isinstance(f, StartupAnnouncer)]:
        uvicorn_log.removeFilter(old)
    uvicorn_log.addFilter(StartupAnnouncer(settings))


def install_security_schemes(app: FastAPI, settings: Settings) -> None:
    """Declare the API-key schemes so Swagger UI's Authorize button works; required only with API_KEY."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        spec.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API_KEY>"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        if settings.api_keys:
            spec["security"] = [{"bearer": []}, {"apiKey": []}]
            for path in ("/health",):
                for op in spec["paths"].get(path, {}).values():
                    op["security"] = []
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def main() -> None:
    """`python serve_ocr.py`: serve MODEL_PATH, or write and serve the tiny random demo checkpoint."""
    import uvicorn

    if not os.environ.get("MODEL_PATH"):
        demo = Path(os.environ.get("DEMO_MODEL_DIR", "models/demo-tiny-random"))
        if not (demo / "config.json").is_file():
            from deepseek_ocr import make_tiny

            make_tiny(demo, seed=0)
        os.environ["MODEL_PATH"] = str(demo)
        os.environ.setdefault("DEFAULT_MAX_TOKENS", "64")
        print(f"MODEL_PATH is not set: serving the random-weights demo at {demo}. {DEMO_NOTICE}")
    uvicorn.run(
        "serve_ocr:app",
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", "8000")),
        log_level=os.environ.get("LOG_LEVEL", "info").lower(),
        **uvicorn_options(),
    )


def uvicorn_options() -> dict[str, object]:
    """The connection limits the Makefile and the Dockerfile pass on uvicorn's command line.

    h11, not httptools: httptools took 49.5 s to parse a 200 MB header line (stalling /health); h11 refuses
    an incomplete event past 64 KB at once. LIMIT_CONCURRENCY connections at most (more get a 503), and an
    idle keep-alive connection is closed after 5 s.
    """
    limit = os.environ.get("LIMIT_CONCURRENCY") or "2000"
    return {"http": "h11", "h11_max_incomplete_event_size": 65536, "limit_concurrency": int(limit),
            "timeout_keep_alive": 5}


if __name__ == "__main__":
    main()

app = create_app()
