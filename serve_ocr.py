"""DeepSeek-OCR API: the FastAPI app, its engine lifecycle, error handling and base endpoints.

`create_app(settings)` builds the app; its lifespan loads one engine onto `app.state.engine`. The image,
PDF and batch routers are included when they import; one that does not is reported by `/` and by its
`/status`, and the rest keeps working. Run: `uvicorn serve_ocr:app` (or `python serve_ocr.py`).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import inputs
import pdf_render
from config import NGRAM_IMAGE, Settings, load_settings
from deps import (
    PROMPT_MAX_CHARS,
    EngineDep,
    MaxTokensForm,
    ModeForm,
    NgramSizeForm,
    NgramWindowForm,
    SettingsDep,
    TemperatureForm,
    TopPForm,
    deadline,
    make_request,
    normalize_prompt,
    read_upload,
    resolve_mode,
    run_blocking,
)
from engine import BaseEngine, UnavailableEngine, build_engine
from errors import PROBLEM_MEDIA_TYPE, OcrError
from middleware import install_middleware
from schemas import (
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    Problem,
    RootResponse,
    RouterState,
    UsageModel,
)

__version__ = "1.0.0"
log = logging.getLogger("deepseek_ocr")

ROUTERS = {"ocr": ("ocr_routes", "/ocr"), "pdf": ("pdf_routes", "/pdf"), "batch": ("batch_routes", "/batch")}
DEMO_NOTICE = (
    "DEMO: serving a tiny checkpoint with RANDOM weights; its text is meaningless. Set MODEL_PATH to the "
    "DeepSeek-OCR weights directory (config.json, *.safetensors, tokenizer.json) for real OCR."
)
NO_MODEL_HINT = (
    "set MODEL_PATH to the DeepSeek-OCR weights directory (config.json, *.safetensors, tokenizer.json), "
    "or run `make serve` for a random-weights demo"
)
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


def is_random_weights(settings: Settings) -> bool:
    """True for the checkpoints `deepseek_ocr.py make-tiny` writes, and for vLLM's dummy weights."""
    if settings.load_format == "dummy":
        return True
    try:
        config = json.loads((Path(settings.model_path or "") / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(config.get("_name_or_path", "")).startswith("deepseek-ocr-random")


async def start_engine(settings: Settings) -> BaseEngine:
    """The configured engine, started; an `UnavailableEngine` saying why when it cannot start."""
    if not settings.model_path:
        log.warning("MODEL_PATH is not set: OCR endpoints answer 503 until it is")
        return UnavailableEngine(settings, f"MODEL_PATH is not set: {NO_MODEL_HINT}")
    path = Path(settings.model_path)
    if not (path / "config.json").is_file():
        reason = f"MODEL_PATH={settings.model_path} has no config.json: {NO_MODEL_HINT}"
        log.error("%s", reason)
        return UnavailableEngine(settings, reason)
    try:
        engine = build_engine(settings)
        await engine.start()
    except Exception as exc:
        reason = f"could not load the model from MODEL_PATH={settings.model_path}: {exc}; {NO_MODEL_HINT}"
        log.exception("model load failed")
        return UnavailableEngine(settings, reason)
    engine.demo = is_random_weights(settings)
    if engine.demo:
        log.warning("%s", DEMO_NOTICE)
    log.info("engine %s ready: %s", engine.name, settings.model_path)
    return engine


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="ocr-worker")
    # Processes start on the first PDF page, not here.
    app.state.render_pool = pdf_render.RenderPool(
        settings.render_processes,
        page_timeout_s=settings.pdf_render_timeout_s,
        open_timeout_s=pdf_render.DEFAULT_OPEN_TIMEOUT_S,
        memory_limit_mb=pdf_render.DEFAULT_MEMORY_LIMIT_MB,
    )
    app.state.engine = await start_engine(settings)
    try:
        yield
    finally:
        await app.state.engine.close()
        app.state.pool.shutdown(wait=False, cancel_futures=True)
        app.state.render_pool.close()


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


def _unavailable_status(name: str, reason: str) -> Any:
    from router_status import route_status

    async def status(request: Request) -> Any:
        return route_status(request, name, available=False, reason=reason)

    return status


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(
        title="DeepSeek-OCR API",
        version=__version__,
        description="Images, PDFs and batches of files to markdown, text and layout boxes with DeepSeek-OCR.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.started = time.monotonic()
    app.state.engine = UnavailableEngine(settings, "the engine is starting")
    install_error_handlers(app)
    install_middleware(app, settings)
    app.include_router(base_router())
    app.state.routers = include_routers(app)
    install_security_schemes(app, settings)
    return app


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


def base_router() -> Any:
    from fastapi import APIRouter

    router = APIRouter(tags=["base"])

    @router.get("/", response_model=RootResponse, summary="Service information")
    async def root(request: Request) -> RootResponse:
        engine: BaseEngine = request.app.state.engine
        s: Settings = request.app.state.settings
        h = engine.health()
        paths = request.app.openapi()["paths"]
        endpoints = sorted(f"{method.upper()} {path}" for path, item in paths.items() for method in item)
        return RootResponse(
            name="DeepSeek-OCR API",
            version=__version__,
            engine=engine.name,
            model=s.model_path,
            ready=h.ready,
            demo=engine.demo,
            notice=DEMO_NOTICE if engine.demo else h.reason,
            default_mode=s.default_mode.name,  # type: ignore[arg-type]
            modes=list(engine.served_modes),
            routers=request.app.state.routers,
            endpoints=endpoints,
        )

    @router.get("/health", response_model=HealthResponse, summary="Liveness and model state (always 200)")
    async def health(request: Request) -> HealthResponse:
        return _health(request)

    @router.get(
        "/ready",
        response_model=HealthResponse,
        summary="Readiness: 200 when OCR can be served, else 503",
        responses={503: {"model": HealthResponse, "description": "Not ready; `reason` says why"}},
    )
    async def ready(request: Request) -> Any:
        body = _health(request)
        return body if body.ready else JSONResponse(body.model_dump(), status_code=503)

    @router.post(
        "/generate",
        response_model=GenerateResponse,
        summary="Generate from a prompt and an optional base64 image (JSON)",
    )
    async def generate(body: GenerateRequest, request: Request, engine: EngineDep, settings: SettingsDep):
        image = None
        if body.image_base64 is not None:
            data = inputs.decode_base64_image(body.image_base64, max_bytes=settings.max_upload_bytes)
            image = await run_blocking(request, inputs.decode_image, data, max_pixels=settings.max_image_pixels)
        return await _generate(
            engine,
            settings,
            prompt=body.prompt,
            image=image,
            mode=body.mode,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            ngram=(body.ngram_size, body.ngram_window),
        )

    @router.post(
        "/generate_with_file",
        response_model=GenerateResponse,
        summary="Generate from an uploaded image file (multipart)",
    )
    async def generate_with_file(
        request: Request,
        engine: EngineDep,
        settings: SettingsDep,
        file: Annotated[UploadFile, File(description="Image: PNG, JPEG, WebP, TIFF, BMP, GIF")],
        prompt: Annotated[
            str, Form(max_length=PROMPT_MAX_CHARS, description="Prompt; `<image>\\n` is put in front if missing")
        ] = "",
        max_tokens: MaxTokensForm = None,
        temperature: TemperatureForm = 0.0,
        top_p: TopPForm = 1.0,
        mode: ModeForm = None,
        ngram_size: NgramSizeForm = NGRAM_IMAGE[0],
        ngram_window: NgramWindowForm = NGRAM_IMAGE[1],
    ) -> GenerateResponse:
        data = await read_upload(file, settings)
        image = await run_blocking(request, inputs.decode_image, data, max_pixels=settings.max_image_pixels)
        return await _generate(
            engine,
            settings,
            prompt=prompt,
            image=image,
            mode=mode,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            ngram=(ngram_size, ngram_window),
        )

    return router


def _health(request: Request) -> HealthResponse:
    engine: BaseEngine = request.app.state.engine
    h = engine.health()
    return HealthResponse(
        status="ok" if h.ready else "not_ready",
        ready=h.ready,
        engine=engine.name,
        model=request.app.state.settings.model_path,
        model_loaded=h.ready,
        reason=h.reason,
        demo=engine.demo,
        notice=DEMO_NOTICE if engine.demo else None,
        in_flight=h.in_flight,
        waiting=h.waiting,
        uptime_s=round(time.monotonic() - request.app.state.started, 3),
        detail=h.detail,
    )


async def _generate(
    engine: BaseEngine, settings: Settings, *, prompt: str, image: Any, mode: str | None, **options: Any
) -> GenerateResponse:
    spec = resolve_mode(mode, settings)
    text = normalize_prompt(prompt, "<image>\nFree OCR.", has_image=image is not None)
    req = make_request(settings, prompt=text, image=image, mode=spec, **options)
    async with deadline(settings.generate_timeout_s, "GENERATE_TIMEOUT_S"):
        result = await engine.generate(req)
    return GenerateResponse(
        result=result.text,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        mode=spec.name,  # type: ignore[arg-type]
        usage=UsageModel(**vars(result.usage)),
        elapsed_s=result.elapsed_s,
    )


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
    )


if __name__ == "__main__":
    main()

app = create_app()
