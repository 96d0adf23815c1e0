"""The `/status` and `/info` answers of the image, PDF and batch routers, built from the settings."""

from __future__ import annotations

from fastapi import Request

from config import MODES, PROMPTS, Settings
from engine import BaseEngine
from schemas import LimitsModel, RouteInfo, RouteStatus


def limits(settings: Settings) -> LimitsModel:
    return LimitsModel(
        max_upload_mb=settings.max_upload_mb,
        max_image_pixels=settings.max_image_pixels,
        max_pdf_pages=settings.max_pdf_pages,
        max_batch_files=settings.max_batch_files,
        max_model_len=settings.max_model_len,
        max_concurrency=settings.max_concurrency,
        max_queue=settings.max_queue,
    )


def route_status(
    request: Request,
    router: str,
    *,
    available: bool = True,
    reason: str | None = None,
    features: dict[str, bool] | None = None,
) -> RouteStatus:
    engine: BaseEngine = request.app.state.engine
    settings: Settings = request.app.state.settings
    health = engine.health()
    return RouteStatus(
        router=router,
        available=available,
        reason=reason if not available else health.reason,
        ready=available and health.ready,
        engine=engine.name,
        modes=list(engine.served_modes),
        default_mode=settings.default_mode.name,
        limits=limits(settings),
        features=features or {},
    )


def route_info(
    request: Request,
    router: str,
    *,
    description: str,
    endpoints: dict[str, str],
    parameters: dict[str, str],
    examples: list[str],
) -> RouteInfo:
    settings: Settings = request.app.state.settings
    engine: BaseEngine = request.app.state.engine
    served = set(engine.served_modes)
    return RouteInfo(
        router=router,
        description=description,
        endpoints=endpoints,
        parameters=parameters,
        prompts={p.name: p.prompt for p in PROMPTS.values()},
        modes={
            m.name: f"{m.description}"
            + ("" if m.name in served else f" (not served by the {engine.name} engine)")
            for m in MODES.values()
        },
        limits=limits(settings),
        examples=examples,
    )
