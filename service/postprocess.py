"""The model's text made into what a page answers: markdown, plain text, blocks, drawing and crops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

import ocr_utils
from service.results import PagePost


@dataclass(frozen=True)
class PostOptions:
    """What to make of the model's text beside markdown and plain text."""

    draw: bool = False  # the image with boxes drawn
    annotated_format: Literal["png", "jpeg"] = "png"
    crop: bool = False  # JPEG crops of regions labelled `image`
    clean_formulas: bool = False  # the batch-eval formula clean-up of the markdown
    searchable: bool = False  # a one-page searchable PDF of an uploaded image (the upload embedded as is)


def postprocess(
    text: str, image: Image.Image, *, label: int | str | None = None, options: PostOptions = PostOptions(), dpi=None
) -> PagePost:
    """Parse grounded `text` against `image`: markdown, blocks with pixel boxes, drawing and crops."""
    parsed = ocr_utils.parse_grounding(text)
    markdown = ocr_utils.to_markdown(text, page=label)
    post = PagePost(
        markdown=ocr_utils.clean_formula(markdown) if options.clean_formulas else markdown,
        plain=ocr_utils.plain_text(text),
        blocks=parsed.blocks,
        warnings=parsed.warnings,
        width=image.width,
        height=image.height,
    )
    if options.draw:
        annotated = ocr_utils.draw_layout(image, parsed)
        if options.annotated_format == "png":
            post.annotated_png = ocr_utils.encode_png(annotated)
        else:
            # The dpi makes img2pdf size the layout PDF's page like the original page.
            post.annotated_jpeg = ocr_utils.encode_jpeg(annotated, quality=95, dpi=dpi)
    if options.crop:
        post.crops = ocr_utils.crop_images(image, parsed, page=label)
    return post
