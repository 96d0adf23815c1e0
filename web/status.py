"""The `/status` and `/info` routes of the image, PDF and batch routers, written once; and the build's
identity (`VERSION`, `build_info`) that `/`, `/health` and `/metrics` show.

Each router calls `add_status_routes` with what is its own (features, description, endpoints, the
parameter help built from the settings, curl examples); the answers' shared parts come from here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Request

from config import MODES, PROMPTS, Settings
from service.ocr import OcrService
from web.schemas.common import LimitsModel, RouteInfo, RouteStatus

VERSION = "1.0.0"
_SOURCE = Path(__file__).resolve().parents[1]


@functools.cache
def package_version(name: str) -> str:
    """An installed package's version from its metadata, "" when absent: the HTTP process never imports torch
    or vLLM (they load in engine workers) just to name them. Read once: parsing torch's metadata took ~2 ms of
    the event loop on every `/health` (a load balancer's probes, issue 29's loaded profile)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


@functools.cache
def git_commit(configured: str | None) -> str:
    """GIT_COMMIT as the image build set it, else the checkout's HEAD where the source is one, else ""."""
    if configured:
        return configured.strip()
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_SOURCE, capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def build_info(settings: Settings) -> dict[str, str]:
    """The labels of `ocr_build_info`: version, commit, and the torch and vLLM installed ("" when not)."""
    return {"version": VERSION, "commit": git_commit(settings.git_commit), "torch": package_version("torch"),
            "vllm": package_version("vllm")}


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
    service: OcrService = request.app.state.service
    settings: Settings = request.app.state.settings
    engine = service.admission.primary
    health = engine.health()
    return RouteStatus(
        router=router,
        available=available,
        reason=reason if not available else health.reason,
        ready=available and service.admission.ready,
        engine=engine.name,
        modes=list(service.admission.served_modes),
        default_mode=settings.default_mode.name,
        limits=limits(settings),
        features=features or {},
        models=service.admission.model_infos(),
    )


def add_status_routes(
    router: APIRouter,
    name: str,
    *,
    title: str,
    features: dict[str, bool],
    description: str,
    endpoints: dict[str, str],
    parameters: Callable[[Settings], dict[str, str]],
    examples: list[str],
) -> None:
    """`GET {prefix}/status` (readiness, engine, modes, limits) and `GET {prefix}/info` (how to use)."""

    @router.get("/status", response_model=RouteStatus, summary=f"{title} readiness, engine, modes and limits")
    async def status(request: Request) -> RouteStatus:
        return route_status(request, name, features=features)

    @router.get("/info", response_model=RouteInfo, summary=f"How to use the {title} routes")
    async def info(request: Request) -> RouteInfo:
        settings: Settings = request.app.state.settings
        service: OcrService = request.app.state.service
        served = set(service.admission.served_modes)
        engine = service.admission.primary.name
        return RouteInfo(
            router=name,
            description=description,
            endpoints=endpoints,
            parameters=parameters(settings),
            prompts={p.name: p.prompt for p in PROMPTS.values()},
            modes={
                m.name: m.description + ("" if m.name in served else f" (not served by the {engine} engine)")
                for m in MODES.values()
            },
            limits=limits(settings),
            examples=examples,
        )
