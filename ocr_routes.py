"""Image OCR routes: `/ocr/image/advanced` (text, markdown, boxes, drawing, crops) and `/ocr/image/simple`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, UploadFile

import images
from config import FREE_PROMPT, IMAGE_PROMPT, MODES, NGRAM_IMAGE, ModeSpec, Settings
from service.ocr import OcrService
from service.options import ImageOptions, ImageSimpleOptions
from service.postprocess import PostOptions
from service.results import only
from service.timing import measure
from web.answers import confidence_model, image_response, usage_model
from web.deps import KnownFieldsOnly, ServiceDep, SettingsDep, deadline, file_field, read_upload
from web.forms import form_of
from web.schemas.common import ImageOcrResponse, SimpleTextResponse
from web.status import add_status_routes
from web.timing import stamped

router = APIRouter(prefix="/ocr", tags=["image OCR"], dependencies=[KnownFieldsOnly])

FileField = Annotated[
    UploadFile,
    file_field("Image: PNG, JPEG, WebP, TIFF, BMP, GIF (first frame). PDFs go to `/pdf/ocr`"),
]


def mode_for(mode: str | None, crop_mode: str | None, service: OcrService, settings: Settings) -> ModeSpec | str | None:
    """`mode` wins; the seed's crop_mode maps singlepage -> base (global view only), tiling -> gundam.

    An engine that serves only some modes (vLLM: gundam) keeps its default for crop_mode, since the
    seed's examples send crop_mode and must keep working there.
    """
    if mode or not crop_mode:
        return mode  # resolved with the request (the model's own default when none is given)
    wanted = MODES["base"] if crop_mode == "singlepage" else MODES["gundam"]
    return wanted if wanted.name in service.admission.served_modes else settings.default_mode


async def decoded(service: OcrService, file: UploadFile) -> object:
    with measure("read"):
        data = await read_upload(file, service.settings)
    return await service.blocking(images.decode_image, data, max_pixels=service.settings.max_image_pixels)


@router.post(
    "/image/advanced",
    response_model=ImageOcrResponse,
    summary="OCR an image: raw text, markdown, layout boxes, annotated image and figure crops",
)
async def image_advanced(
    service: ServiceDep,
    settings: SettingsDep,
    file: FileField,
    options: Annotated[ImageOptions, Depends(form_of(ImageOptions))],
) -> ImageOcrResponse:
    req = service.admit(options.request(settings, mode=mode_for(options.mode, options.crop_mode, service, settings)))
    image = await decoded(service, file)
    async with deadline(settings.generate_timeout_s, "GENERATE_TIMEOUT_S"):
        result = only(await service.image(req, image, PostOptions(draw=options.draw_boxes, crop=options.crop_regions)))
    return stamped(image_response(result, req.mode.name, settings.max_answer_bytes))


@router.post("/image/simple", response_model=SimpleTextResponse, summary="Plain text of an image, no tags")
async def image_simple(
    service: ServiceDep,
    settings: SettingsDep,
    file: FileField,
    options: Annotated[ImageSimpleOptions, Depends(form_of(ImageSimpleOptions))],
) -> SimpleTextResponse:
    req = service.admit(options.request(settings))
    image = await decoded(service, file)
    async with deadline(settings.generate_timeout_s, "GENERATE_TIMEOUT_S"):
        result = only(await service.image(req, image, PostOptions()))
    return stamped(SimpleTextResponse(
        text=result.post.plain if result.post else "",
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        mode=result.mode or req.mode.name,  # type: ignore[arg-type]
        usage=usage_model(result.usage),
        confidence=confidence_model(result.confidence),
        elapsed_s=result.elapsed_s,
    ))


def _parameters(s: Settings) -> dict[str, str]:
    return {
        "file": f"The image (required); at most {s.max_upload_mb:g} MB and {s.max_image_pixels:,} pixels",
        "prompt": f"Default {IMAGE_PROMPT!r} (advanced), {FREE_PROMPT!r} (simple)",
        "mode": f"One of {', '.join(MODES)}; default {s.default_mode.name}",
        "crop_mode": "singlepage (global view only) or tiling (dynamic tiles); `mode` wins",
        "draw_boxes": "true/false, default true",
        "crop_regions": "true/false, default true",
        "max_tokens": f"1..{s.max_model_len}; default {min(s.default_max_tokens, s.max_model_len)}",
        "temperature": "0..2, default 0 (greedy)",
        "ngram_size / ngram_window": f"No-repeat guard, default {NGRAM_IMAGE[0]}/{NGRAM_IMAGE[1]} "
        "(DeepSeek-OCR-2: 20/90); 0 = off",
        "model": "A model name from `GET /` (MODELS); default the first",
    }


add_status_routes(
    router,
    "ocr",
    title="image OCR",
    features={"draw_boxes": True, "crop_regions": True, "grounding": True},
    description="OCR of one image: raw grounded text, cleaned markdown, layout blocks with pixel boxes, "
    "the image with boxes drawn, and crops of figure regions.",
    endpoints={
        "POST /ocr/image/advanced": "Full OCR with layout (multipart)",
        "POST /ocr/image/simple": "Plain text only (multipart)",
        "GET /ocr/status": "Readiness, engine, modes, limits",
        "GET /ocr/info": "This page",
    },
    parameters=_parameters,
    examples=[
        'curl -X POST "http://localhost:8000/ocr/image/advanced" -F "file=@document.png" '
        '-F "draw_boxes=true" -F "crop_regions=true"',
        'curl -X POST "http://localhost:8000/ocr/image/simple" -F "file=@receipt.jpg"',
    ],
)
