"""The base endpoints: `/` (service info), `/health`, `/ready`, `/generate` and `/generate_with_file`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse

import images
from config import Settings
from errors import ValidationFailed
from service.ocr import OcrService
from service.options import GenerateOptions
from service.request import OcrRequest
from service.timing import measure
from web.answers import confidence_model, usage_model
from web.deps import KnownFieldsOnly, ServiceDep, SettingsDep, deadline, file_field, files_field, read_upload
from web.forms import form_of
from web.schemas.common import EngineState, GenerateRequest, GenerateResponse, HealthResponse, RootResponse
from web.status import VERSION, build_info
from web.timing import stamped
from workers.start import DEMO_NOTICE

__version__ = VERSION
router = APIRouter(tags=["base"], dependencies=[KnownFieldsOnly])


# Pages left out of the OpenAPI document that a person should still find from `/`.
PAGES = ("/ui", "/docs", "/redoc")


# HEAD answers like GET (uvicorn drops the body): load balancers and `curl -I` probe with it.
@router.head("/", include_in_schema=False)
@router.get(
    "/",
    response_model=RootResponse,
    summary="Service information",
    responses={307: {"description": "A browser (`Accept: text/html` without JSON) is sent to `/ui`"}},
)
async def root(request: Request) -> Any:
    pages = {getattr(r, "path", None) for r in request.app.routes} & set(PAGES)
    if "/ui" in pages and wants_html(request.headers.get("accept", "")):
        return RedirectResponse("/ui", status_code=307)
    service: OcrService = request.app.state.service
    engine = service.admission.primary
    s: Settings = request.app.state.settings
    paths = request.app.openapi()["paths"]
    endpoints = sorted(
        {f"{method.upper()} {path}" for path, item in paths.items() for method in item} | {f"GET {p}" for p in pages}
    )
    return RootResponse(
        name="DeepSeek-OCR API",
        version=__version__,
        engine=engine.name,
        model=s.model_path,
        ready=service.admission.ready,
        demo=engine.demo,
        notice=DEMO_NOTICE if engine.demo else engine.health().reason,
        default_mode=s.default_mode.name,  # type: ignore[arg-type]
        modes=list(service.admission.served_modes),
        routers=request.app.state.routers,
        models=service.admission.model_infos(),
        endpoints=endpoints,
    )


def wants_html(accept: str) -> bool:
    """A browser's Accept names text/html; curl (`*/*`), httpx and JSON clients do not, and get JSON."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return "text/html" in types and "application/json" not in types


@router.head("/health", include_in_schema=False)
@router.get("/health", response_model=HealthResponse, summary="Liveness and model state (always 200)")
async def health(request: Request) -> HealthResponse:
    return health_body(request)


@router.head("/ready", include_in_schema=False)
@router.get(
    "/ready",
    response_model=HealthResponse,
    summary="Readiness: 200 when OCR can be served, else 503",
    responses={503: {"model": HealthResponse, "description": "Not ready; `reason` says why"}},
)
async def ready(request: Request) -> Any:
    body = health_body(request)
    return body if body.ready else JSONResponse(body.model_dump(), status_code=503)


def health_body(request: Request) -> HealthResponse:
    service: OcrService = request.app.state.service
    admission = service.admission
    engine = admission.primary
    h = engine.health()
    ready = admission.ready
    restarting = not ready and any(e.restarting for e in admission.engines)
    unavailable = unavailable_parts(request.app)
    degraded = "failed to load: " + "; ".join(f"{name} ({why})" for name, why in unavailable.items())
    info = build_info(request.app.state.settings)
    return HealthResponse(
        version=info["version"],
        commit=info["commit"] or None,
        status=("degraded" if unavailable else "ok") if ready else "restarting" if restarting else "not_ready",
        ready=ready,
        engine=engine.name,
        model=request.app.state.settings.model_path,
        model_loaded=ready,
        reason=h.reason if not ready else degraded if unavailable else None,
        demo=engine.demo,
        notice=DEMO_NOTICE if engine.demo else None,
        in_flight=admission.in_flight,
        waiting=admission.waiting,
        uptime_s=round(time.monotonic() - request.app.state.started, 3),
        detail=h.detail,
        engines=[
            EngineState(
                name=e.name,
                ready=e.ready,
                restarting=e.restarting,
                model=e.model.name if e.model is not None else None,
                reason=(eh := e.health()).reason,
                in_flight=admission.busy(e),
                max_concurrency=e.max_concurrency,
                detail=eh.detail,
            )
            for e in admission.engines
        ],
        models=admission.model_infos(),
        unavailable=unavailable,
        restarts=service.supervisor.restarts,
        quarantined=len(service.supervisor.quarantined),
        orchestrator=request.app.state.settings.orchestrator,
        cluster=cluster_view(request.app.state.settings, admission),
    )


def unavailable_parts(app: Any) -> dict[str, str]:
    """The routers and subsystems that failed to load, each with why: what serve_ocr recorded (`/` shows the
    routers' states too). They make `/health` say `degraded`; `/ready` is about the engines only."""
    parts = {name: state.reason or "failed to load" for name, state in app.state.routers.items() if not state.available}
    parts.update(app.state.subsystems_down)
    return parts


def cluster_view(settings: Any, admission: Any) -> dict[str, Any] | None:
    """ORCHESTRATOR=ray: the cluster's nodes and workers (workers/ray_cluster.py); Ray is not imported otherwise."""
    if settings.orchestrator != "ray":
        return None
    from workers import ray_cluster

    if ray_cluster.CLUSTER is None:
        return None
    return ray_cluster.CLUSTER.view(lambda e: admission.busy(e) if e in admission.engines else 0)


@router.post(
    "/generate", response_model=GenerateResponse, summary="Generate from a prompt and an optional base64 image (JSON)"
)
async def generate(body: GenerateRequest, service: ServiceDep, settings: SettingsDep) -> GenerateResponse:
    req = body.request(settings, has_image=body.image_base64 is not None)
    req = service.admit(req)
    image = None
    if body.image_base64 is not None:
        with measure("read"):  # the upload's bytes out of the JSON body
            data = images.decode_base64_image(body.image_base64, max_bytes=settings.max_upload_bytes)
        image = await service.blocking(images.decode_image, data, max_pixels=settings.max_image_pixels)
    return await _generate(service, req, image)


@router.post(
    "/generate_with_file",
    response_model=GenerateResponse,
    summary="Generate from an uploaded image file (multipart)",
)
async def generate_with_file(
    service: ServiceDep,
    settings: SettingsDep,
    options: Annotated[GenerateOptions, Depends(form_of(GenerateOptions))],
    file: Annotated[
        UploadFile | None, file_field("Image: PNG, JPEG, WebP, TIFF, BMP, GIF. PDFs go to `/pdf/ocr`")
    ] = None,
    files: Annotated[list[UploadFile] | None, files_field(
        "Several images for one prompt (repeat the field), with one `<image>` tag in the prompt per image, "
        "filled in the order sent; `file` first where both are sent. At most MAX_IMAGES_PER_PROMPT")] = None,
) -> GenerateResponse:
    uploads = ([file] if file is not None else []) + list(files or [])
    if not uploads:
        raise ValidationFailed("no image was sent; send one as `file`, or several as `files` (one <image> tag each)",
                               errors=[{"field": "file", "msg": "Field required"}])
    req = service.admit(options.request(settings, images=len(uploads)))
    pictures = []
    for upload in uploads:
        with measure("read"):
            data = await read_upload(upload, settings)
        pictures.append(await service.blocking(images.decode_image, data, max_pixels=settings.max_image_pixels))
        del data
    return await _generate(service, req, pictures if len(pictures) > 1 else pictures[0])


async def _generate(service: OcrService, req: OcrRequest, image: Any) -> GenerateResponse:
    async with deadline(service.settings.generate_timeout_s, "GENERATE_TIMEOUT_S"):
        result = await service.complete(req, image)
    return stamped(GenerateResponse(
        result=result.text,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        mode=req.mode.name,  # type: ignore[arg-type]
        usage=usage_model(result.usage),
        confidence=confidence_model(result.confidence),
        elapsed_s=result.elapsed_s,
    ))
