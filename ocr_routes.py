"""Image OCR routes: `/ocr/image/advanced` (text, markdown, boxes, drawing, crops) and `/ocr/image/simple`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile

import inputs
from config import FREE_PROMPT, IMAGE_PROMPT, MODES, NGRAM_IMAGE, ModeSpec, Settings
from deps import (
    PROMPT_MAX_CHARS,
    EngineDep,
    MaxTokensForm,
    ModeForm,
    NgramSizeForm,
    NgramWindowForm,
    SettingsDep,
    TemperatureForm,
    deadline,
    make_request,
    normalize_prompt,
    read_upload,
    resolve_mode,
    run_blocking,
)
from engine import BaseEngine
from pipeline import b64, crop_models, postprocess, usage_model
from router_status import route_info, route_status
from schemas import ImageOcrResponse, RouteInfo, RouteStatus, SimpleTextResponse

router = APIRouter(prefix="/ocr", tags=["image OCR"])

FileField = Annotated[UploadFile, File(description="Image: PNG, JPEG, WebP, TIFF, BMP, GIF (first frame)")]


def mode_for(mode: str | None, crop_mode: str | None, engine: BaseEngine, settings: Settings) -> ModeSpec:
    """`mode` wins; the seed's crop_mode maps singlepage -> base (global view only), tiling -> gundam.

    An engine that serves only some modes (vLLM: gundam) keeps its default for crop_mode, since the
    seed's examples send crop_mode and must keep working there.
    """
    if mode or not crop_mode:
        return resolve_mode(mode, settings)
    wanted = MODES["base"] if crop_mode == "singlepage" else MODES["gundam"]
    return wanted if wanted.name in engine.served_modes else settings.default_mode


@router.post(
    "/image/advanced",
    response_model=ImageOcrResponse,
    summary="OCR an image: raw text, markdown, layout boxes, annotated image and figure crops",
)
async def image_advanced(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    file: FileField,
    prompt: Annotated[str, Form(max_length=PROMPT_MAX_CHARS, description="Default: the grounding OCR prompt")] = "",
    draw_boxes: Annotated[bool, Form(description="Return the image with boxes drawn (base64 PNG)")] = True,
    crop_regions: Annotated[bool, Form(description="Return regions labelled `image` as JPEG crops")] = True,
    crop_mode: Annotated[
        Literal["singlepage", "tiling"] | None,
        Form(description="Seed option: singlepage = global view only, tiling = dynamic tiles"),
    ] = None,
    mode: ModeForm = None,
    max_tokens: MaxTokensForm = None,
    temperature: TemperatureForm = 0.0,
    ngram_size: NgramSizeForm = NGRAM_IMAGE[0],
    ngram_window: NgramWindowForm = NGRAM_IMAGE[1],
) -> ImageOcrResponse:
    data = await read_upload(file, settings)
    image = await run_blocking(request, inputs.decode_image, data, max_pixels=settings.max_image_pixels)
    spec = mode_for(mode, crop_mode, engine, settings)
    text = normalize_prompt(prompt, IMAGE_PROMPT, has_image=True)
    req = make_request(
        settings,
        prompt=text,
        image=image,
        mode=spec,
        max_tokens=max_tokens,
        temperature=temperature,
        ngram=(ngram_size, ngram_window),
    )
    async with deadline(settings.generate_timeout_s, "GENERATE_TIMEOUT_S"):
        result = await engine.generate(req)
        post = await run_blocking(request, postprocess, result.text, image, draw=draw_boxes, crop=crop_regions)
    return ImageOcrResponse(
        text=result.text,
        markdown=post.markdown,
        blocks=post.blocks,
        warnings=post.warnings,
        annotated_image=b64(post.annotated_png) if post.annotated_png else None,
        crops=crop_models(post.crops),
        width=post.width,
        height=post.height,
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        mode=spec.name,  # type: ignore[arg-type]
        usage=usage_model(result),
        elapsed_s=result.elapsed_s,
    )


@router.post("/image/simple", response_model=SimpleTextResponse, summary="Plain text of an image, no tags")
async def image_simple(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    file: FileField,
    prompt: Annotated[str, Form(max_length=PROMPT_MAX_CHARS, description="Default: `<image>\\nFree OCR.`")] = "",
    mode: ModeForm = None,
    max_tokens: MaxTokensForm = None,
) -> SimpleTextResponse:
    data = await read_upload(file, settings)
    image = await run_blocking(request, inputs.decode_image, data, max_pixels=settings.max_image_pixels)
    spec = resolve_mode(mode, settings)
    text = normalize_prompt(prompt, FREE_PROMPT, has_image=True)
    req = make_request(settings, prompt=text, image=image, mode=spec, max_tokens=max_tokens, ngram=NGRAM_IMAGE)
    async with deadline(settings.generate_timeout_s, "GENERATE_TIMEOUT_S"):
        result = await engine.generate(req)
    from ocr_utils import plain_text

    return SimpleTextResponse(
        text=plain_text(result.text),
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        mode=spec.name,  # type: ignore[arg-type]
        usage=usage_model(result),
        elapsed_s=result.elapsed_s,
    )


@router.get("/status", response_model=RouteStatus, summary="Image OCR readiness, engine, modes and limits")
async def status(request: Request) -> RouteStatus:
    return route_status(request, "ocr", features={"draw_boxes": True, "crop_regions": True, "grounding": True})


@router.get("/info", response_model=RouteInfo, summary="How to use the image OCR routes")
async def info(request: Request) -> RouteInfo:
    s: Settings = request.app.state.settings
    return route_info(
        request,
        "ocr",
        description="OCR of one image: raw grounded text, cleaned markdown, layout blocks with pixel boxes, "
        "the image with boxes drawn, and crops of figure regions.",
        endpoints={
            "POST /ocr/image/advanced": "Full OCR with layout (multipart)",
            "POST /ocr/image/simple": "Plain text only (multipart)",
            "GET /ocr/status": "Readiness, engine, modes, limits",
            "GET /ocr/info": "This page",
        },
        parameters={
            "file": f"The image (required); at most {s.max_upload_mb:g} MB and {s.max_image_pixels:,} pixels",
            "prompt": f"Default {IMAGE_PROMPT!r} (advanced), {FREE_PROMPT!r} (simple)",
            "mode": f"One of {', '.join(MODES)}; default {s.default_mode.name}",
            "crop_mode": "singlepage (global view only) or tiling (dynamic tiles); `mode` wins",
            "draw_boxes": "true/false, default true",
            "crop_regions": "true/false, default true",
            "max_tokens": f"1..{s.max_model_len}; default {min(s.default_max_tokens, s.max_model_len)}",
            "temperature": "0..2, default 0 (greedy)",
            "ngram_size / ngram_window": f"No-repeat guard, default {NGRAM_IMAGE[0]}/{NGRAM_IMAGE[1]}; 0 = off",
        },
        examples=[
            'curl -X POST "http://localhost:8000/ocr/image/advanced" -F "file=@document.png" '
            '-F "draw_boxes=true" -F "crop_regions=true"',
            'curl -X POST "http://localhost:8000/ocr/image/simple" -F "file=@receipt.jpg"',
        ],
    )
