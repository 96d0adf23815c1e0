"""From an image to a finished answer: engine call plus the reference post-processing.

Shared by the image, PDF and batch routers. The CPU-heavy parts (parsing, drawing, cropping, encoding)
are plain functions the routers run in the worker pool.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from PIL import Image

import ocr_utils
from engine import EngineResult
from schemas import BlockModel, BoxModel, CropModel, UsageModel


@dataclass
class PagePost:
    """Post-processed output of one image or page."""

    markdown: str
    plain: str
    blocks: list[BlockModel]
    warnings: list[str]
    width: int
    height: int
    annotated_png: bytes | None = None
    annotated_jpeg: bytes | None = None
    crops: list[ocr_utils.Crop] = field(default_factory=list)


def postprocess(
    text: str,
    image: Image.Image,
    *,
    page: int | str | None = None,
    draw: bool = False,
    crop: bool = False,
    annotated_format: str = "png",
    dpi: int | None = None,
) -> PagePost:
    """Parse grounded `text` against `image`: markdown, blocks with pixel boxes, drawing and crops."""
    parsed = ocr_utils.parse_grounding(text)
    width, height = image.size
    blocks = [
        BlockModel(
            index=b.index,
            label=b.label,
            text=b.text,
            boxes=[
                BoxModel(grid=list(box), pixels=list(ocr_utils.box_to_pixels(box, width, height))) for box in b.boxes
            ],
        )
        for b in parsed.blocks
    ]
    post = PagePost(
        markdown=ocr_utils.to_markdown(text, page=page),
        plain=ocr_utils.plain_text(text),
        blocks=blocks,
        warnings=parsed.warnings,
        width=width,
        height=height,
    )
    if draw:
        annotated = ocr_utils.draw_layout(image, parsed)
        if annotated_format == "png":
            post.annotated_png = ocr_utils.encode_png(annotated)
        else:
            # The dpi makes img2pdf size the layout PDF's page like the original page.
            post.annotated_jpeg = ocr_utils.encode_jpeg(annotated, quality=95, dpi=dpi)
    if crop:
        post.crops = ocr_utils.crop_images(image, parsed, page=page)
    return post


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def crop_models(crops: list[ocr_utils.Crop]) -> list[CropModel]:
    return [
        CropModel(
            name=c.name,
            label=c.label,
            box=list(c.box),
            width=c.width,
            height=c.height,
            image_base64=b64(c.jpeg),
        )
        for c in crops
    ]


def usage_model(result: EngineResult) -> UsageModel:
    return UsageModel(**vars(result.usage))


def page_status(finish_reason: str) -> str:
    """`truncated` when generation stopped at max_tokens: kept and marked, never dropped."""
    return "truncated" if finish_reason == "length" else "ok"
