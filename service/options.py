"""Request options typed once: one pydantic model per kind of request, with the texts, limits and Swagger
pre-fills that `/docs` shows. `web/forms.py` turns a model into a route's multipart fields, `POST /generate`
reads the same fields as JSON, and a job stores its model inside its `JobSpec` (jobs/spec.py).

The models are built from small groups of fields (prompt, engine, n-gram guard, PDF input), so that a
field is declared in one place and every route takes exactly the fields it took before.

Swagger UI's "Try it out" pre-fills a multipart field from `examples[0]`, else `default`, else a value
made from its type, and sends it; an empty box goes out as `""`, which the form layer reads as "not
given". So every optional field without a real default carries `examples: [""]` (`UNSET`): an untouched
box means "not set", never the text `null` or a made-up `string`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from config import DOCUMENT_PROMPT, FREE_PROMPT, IMAGE_PROMPT, Settings
from process.modes import MODES, ModeSpec
from service.request import OcrRequest

ModeName = Literal[tuple(MODES)]  # type: ignore[valid-type]

PROMPT_MAX_CHARS = 100_000  # far above any prompt that fits MAX_MODEL_LEN; bounds tokenizer work
GENERATE_PROMPT = "<image>\nFree OCR."
# An optional field's pre-fill in Swagger UI: an empty box (sent as "", read as absent: the default applies).
UNSET = [""]
# The order of the fields in /docs (the models' own order follows their base classes).
FIELD_ORDER = (
    "prompt", "dpi", "pages", "password", "draw_boxes", "crop_regions", "crop_mode", "draw_layouts",
    "extract_images", "searchable_pdf", "clean_formulas", "mode", "max_tokens", "temperature", "top_p",
    "ngram_size", "ngram_window", "model", "webhook_url",
)
_NGRAM_DEFAULTS = (
    "Empty: the model's default for this route (DeepSeek-OCR: 30/90 images, 20/50 PDFs, 40/90 batches; "
    "DeepSeek-OCR-2: 20/90)"
)


def code(prompt: str) -> str:
    """A prompt as a markdown code span: `<image>` stays visible in /docs, newlines shown as `\\n`."""
    return "`" + prompt.replace("\n", "\\n") + "`"


def _prompt(description: str) -> Any:
    """A prompt field: default "" (an empty box; "" means the route's own prompt)."""
    return Field("", max_length=PROMPT_MAX_CHARS, description=description)


class Options(BaseModel):
    """What every kind shares: the resolution mode, the token budget and the model."""

    model_config = ConfigDict(extra="forbid")
    # The prompt used when none is sent (a route's own); models without a `prompt` field always use it.
    default_prompt: ClassVar[str] = DOCUMENT_PROMPT
    kind: ClassVar[str] = "image"  # picks the model's n-gram defaults (config.NGRAM_DEFAULTS)

    mode: ModeName | None = Field(
        None,
        examples=UNSET,
        description="Resolution mode: `tiny`, `small`, `base`, `large` or `gundam`. "
        "Empty: the server's DEFAULT_MODE (see `GET /`)",
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=131072,
        examples=UNSET,
        description="Most tokens to generate (per image or page), at most MAX_MODEL_LEN. "
        "Empty: the server's DEFAULT_MAX_TOKENS",
    )
    model: str | None = Field(
        None,
        max_length=64,
        examples=UNSET,
        description="Which model: a `name` listed by `GET /` (`MODELS`). Empty: the first (default) model",
    )

    @property
    def ngram(self) -> tuple[int | None, int | None]:
        """The n-gram guard as sent; None parts take the model's defaults when the request is admitted."""
        return (getattr(self, "ngram_size", None), getattr(self, "ngram_window", None))

    def request(
        self, settings: Settings, *, mode: str | ModeSpec | None = None, has_image: bool = True,
        kind: str | None = None, images: int = 1,
    ) -> OcrRequest:
        """The validated request these options ask for (`mode` overrides the field, e.g. from crop_mode;
        `kind` the model's, for a job, whose kind is known once its upload is read; `images` the prompt's)."""
        return OcrRequest.build(
            settings,
            prompt=getattr(self, "prompt", ""),
            default_prompt=self.default_prompt,
            has_image=has_image,
            mode=mode if mode is not None else self.mode,
            max_tokens=self.max_tokens,
            temperature=getattr(self, "temperature", 0.0),
            top_p=getattr(self, "top_p", 1.0),
            ngram=self.ngram,
            model=self.model,
            kind=kind or self.kind,
            images=images,
        )


class NgramGuard(BaseModel):
    ngram_size: int | None = Field(
        None, ge=0, le=512, examples=UNSET,
        description=f"No-repeat n-gram size; 0 turns the guard off. {_NGRAM_DEFAULTS}",
    )
    ngram_window: int | None = Field(
        None, ge=0, le=8192, examples=UNSET,
        description=f"Recent tokens the n-gram guard looks back at. {_NGRAM_DEFAULTS}",
    )


class Temperature(BaseModel):
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (recommended for OCR); 0..2")


class PdfInput(BaseModel):
    """How a PDF is opened and rendered."""

    dpi: int = Field(144, ge=72, le=300, description="Render resolution, 72..300 (lowered per page to fit)")
    pages: str | None = Field(
        None, max_length=4096, examples=UNSET,
        description="Pages to process, 1-based: `1-3,7`, `5-`, `-2`. Empty: all pages",
    )
    password: str | None = Field(
        None, max_length=1024, examples=UNSET,
        description="Password of an encrypted PDF. Empty: the PDF is not encrypted",
    )


# --- images --------------------------------------------------------------------------------------------
class ImageSimpleOptions(Options):
    """`/ocr/image/simple`."""

    default_prompt: ClassVar[str] = FREE_PROMPT
    prompt: str = _prompt(f"Empty: {code(FREE_PROMPT)}")


class ImageOptions(ImageSimpleOptions, Temperature, NgramGuard):
    """`/ocr/image/advanced`."""

    default_prompt: ClassVar[str] = IMAGE_PROMPT
    prompt: str = _prompt(f"Empty: the grounding OCR prompt {code(IMAGE_PROMPT)}")
    draw_boxes: bool = Field(True, description="Return the image with boxes drawn (base64 PNG)")
    crop_regions: bool = Field(True, description="Return regions labelled `image` as JPEG crops")
    crop_mode: Literal["singlepage", "tiling"] | None = Field(
        None,
        examples=UNSET,
        description="Seed option: `singlepage` = global view only (mode base), `tiling` = dynamic tiles (mode "
        "gundam); `mode` wins when both are set. Empty: the server's default mode",
    )


class GenerateOptions(Options, Temperature, NgramGuard):
    """`/generate_with_file` (and, as JSON with `image_base64`, `/generate`)."""

    default_prompt: ClassVar[str] = GENERATE_PROMPT
    prompt: str = _prompt(f"Empty: {code(GENERATE_PROMPT)}. Without an `<image>` tag, `<image>\\n` is put in front")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass when temperature > 0; (0, 1]")


# --- PDFs ----------------------------------------------------------------------------------------------
class PdfSimpleOptions(Options, PdfInput):
    """`/pdf/ocr/simple`: the free OCR prompt, no prompt field."""

    default_prompt: ClassVar[str] = FREE_PROMPT
    kind: ClassVar[str] = "pdf"


class PdfOptions(PdfSimpleOptions, NgramGuard):
    """`/pdf/ocr` and `/pdf/ocr/download`."""

    default_prompt: ClassVar[str] = DOCUMENT_PROMPT
    prompt: str = _prompt(f"Empty: {code(DOCUMENT_PROMPT)}; a typed `\\n` is a newline")
    draw_layouts: bool = Field(True, description="Return a PDF of the pages with boxes drawn")
    extract_images: bool = Field(True, description="Return regions labelled `image` as JPEG")
    searchable_pdf: bool = Field(
        False, description="Return the PDF with the recognised text laid under each page (always in the ZIP)"
    )


# --- batches -------------------------------------------------------------------------------------------
class BatchSimpleOptions(Options, NgramGuard):
    """`/batch/ocr/simple`."""

    default_prompt: ClassVar[str] = FREE_PROMPT
    kind: ClassVar[str] = "batch"
    prompt: str = _prompt(f"Empty: {code(DOCUMENT_PROMPT)}; {code(FREE_PROMPT)} for `/batch/ocr/simple`")


class BatchOptions(BatchSimpleOptions):
    """`/batch/ocr` and `/batch/ocr/download`."""

    default_prompt: ClassVar[str] = DOCUMENT_PROMPT
    clean_formulas: bool = Field(True, description="Clean formulas: drop `\\quad (n)` tags inside `\\[...\\]`")


# --- jobs ----------------------------------------------------------------------------------------------
class JobOptions(Options, PdfInput, NgramGuard):
    """What a job runs with, a PDF's or a batch's (stored in its `JobSpec`)."""

    prompt: str = _prompt(f"Empty: {code(DOCUMENT_PROMPT)}")
    dpi: int = Field(144, ge=72, le=300, description="PDF render resolution, 72..300")
    pages: str | None = Field(
        None, max_length=4096, examples=UNSET, description="PDF pages, 1-based: `1-3,7`; empty: all"
    )
    password: str | None = Field(None, max_length=1024, examples=UNSET, description="Password of an encrypted PDF")
    draw_layouts: bool = Field(True, description="PDF: the layout PDF of the download")
    extract_images: bool = Field(True, description="Regions labelled `image` as JPEG")
    clean_formulas: bool = Field(True, description="Images: drop `\\quad (n)` tags in formulas")


class JobForm(JobOptions):
    """`POST /jobs`: the job's options and where to report its end (kept with the job row, not the spec)."""

    webhook_url: str | None = Field(
        None, max_length=2048, examples=UNSET,
        description="POSTed the summary when the job ends (hosts in WEBHOOK_ALLOW)",
    )

    def job_options(self) -> JobOptions:
        return JobOptions.model_validate(self.model_dump(exclude={"webhook_url"}))
