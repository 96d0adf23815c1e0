"""Pydantic models of the API: request bodies, responses and the problem document.

They are the `/docs` contract: every field has a description and the models carry examples.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.options import GenerateOptions, ModeName
from service.results import ItemStatus as ItemStatus  # the one vocabulary, re-exported for the schemas

STATUS_TEXT = (
    "`ok`: finished; `retried`: it ran away (a repeating loop to max_tokens) and a retry with other settings "
    "finished; `degraded`: only the plain `Free OCR.` retry finished (text without layout); `truncated`: stopped "
    "at max_tokens (kept, marked); `aborted`: the engine aborted it; `failed`: it failed, see `error`"
)


class RetryModel(BaseModel):
    attempt: int = Field(description="Attempt number, from 2", examples=[2])
    change: str = Field(description="What this attempt changed", examples=["n-gram guard 10/256"])
    finish_reason: str = Field(description="How that attempt ended", examples=["stop"])
    completion_tokens: int = Field(description="Tokens that attempt generated", examples=[812])
    mean_logprob: float | None = Field(None, description="That attempt's mean token log-probability (null: unscored)",
                                       examples=[-0.12])
FinishReason = Literal["stop", "length", "abort"]


class Problem(BaseModel):
    """RFC 9457 problem document: every error of this API has this shape."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(description="URI identifying the kind of problem")
    title: str = Field(description="Short summary of the kind of problem")
    status: int = Field(description="HTTP status code")
    detail: str = Field(description="What was wrong with this request and what is allowed")
    instance: str | None = Field(None, description="The request path")


_SUMS = "; on a PDF or a batch the sum over its items (which overlap in time, so a sum may exceed `total`)"


class StageTimes(BaseModel):
    """Where the request's time went, in milliseconds: the figures of its `Server-Timing` header."""

    read: float = Field(description="Reading the upload (a base64 body's decoding included)" + _SUMS, examples=[1.2])
    decode: float = Field(description="Decoding the image (a PDF: opening it and rendering pages)" + _SUMS,
                          examples=[8.5])
    wait: float = Field(description="Waiting for the decoded-pixel budget and an engine slot" + _SUMS,
                        examples=[0.3])
    transfer: float = Field(description="Sending the image to the engine worker process (0 inline)" + _SUMS,
                            examples=[2.1])
    ttft: float = Field(description="Engine time to the first token (the whole generation where the engine "
                        "sends only its final output: vLLM off the streaming routes)" + _SUMS, examples=[95.0])
    gen: float = Field(description="Engine time from the first token to the end" + _SUMS, examples=[1180.0])
    post: float = Field(description="Post-processing: markdown, boxes, drawing, crops, searchable PDF" + _SUMS,
                        examples=[12.4])
    encode: float = Field(description="Building the answer (JSON model, ZIP) after the last item", examples=[0.8])
    total: float = Field(description="The request from its arrival to this answer", examples=[1310.0])
    items: int = Field(description="Items (images, pages, files) summed", examples=[1])


TIMING = "Where the time went, milliseconds (the `Server-Timing` header's figures); absent on old servers"


class UsageModel(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the prompt, image tokens included", examples=[912])
    image_tokens: int = Field(description="Vision tokens the image became (FACTS table); every image's "
                              "together in a prompt of several", examples=[903])
    completion_tokens: int = Field(description="Tokens generated", examples=[512])
    per_image: list[int] = Field(default_factory=list, description="Vision tokens of each image of the prompt, "
                                 "in order (empty in totals over pages or files)", examples=[[903]])


CONFIDENCE = ("How sure the model was of this page: its sampled tokens' log-probabilities (null where the engine "
              "scored none, e.g. a failed page)")


class ConfidenceModel(BaseModel):
    mean_logprob: float = Field(description="Mean log-probability of the generated tokens (0 = certain)",
                                examples=[-0.08])
    min_logprob: float = Field(description="The lowest token log-probability", examples=[-3.2])
    low_share: float = Field(description="Share of tokens with probability under 0.5 (log-probability < -0.693)",
                             examples=[0.02])
    tokens: int = Field(description="Tokens scored (the EOS is not)", examples=[512])


# A 32x16 PNG (a black bar on white): the example body must be one Swagger UI's "Try it out" can send as is.
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAQCAAAAABSayKFAAAAIUlEQVR42mP8z4AfMDEMAQUsDAwMDIw4JP/Txw2MwyIkASNeAx/nTMqwAAAAAElFTkSuQmCC"
)


def _generate_schema(schema: dict[str, Any]) -> None:
    # The options' `examples: [""]` is the form's empty box; in a JSON body an absent field is "not set".
    for prop in schema.get("properties", {}).values():
        if prop.get("examples") == [""]:
            del prop["examples"]
    schema["examples"] = [
        {"prompt": "<image>\nFree OCR.", "image_base64": f"data:image/png;base64,{EXAMPLE_PNG_BASE64}"}
    ]


class GenerateRequest(GenerateOptions):
    """JSON body of `POST /generate`: the options of `/generate_with_file` with a base64 image instead of a file.
    Unknown fields are refused (422), not ignored."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_generate_schema)
    prompt: str = Field(
        min_length=1,
        max_length=100_000,
        description="Prompt text. With an image and no `<image>` tag, `<image>\\n` is put in front.",
        examples=["<image>\nFree OCR."],
    )
    image_base64: str | None = Field(
        None,
        description="Image as raw base64 or a data URL (`data:image/png;base64,...`); omit for text only",
    )


class GenerateResponse(BaseModel):
    """Answer of `/generate` and `/generate_with_file`."""

    result: str = Field(description="The generated text, special tags kept", examples=["# Invoice\n..."])
    finish_reason: FinishReason = Field(description="`stop` at end of text, `length` at max_tokens")
    mode: ModeName = Field(description="Resolution mode used")
    usage: UsageModel
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)
    elapsed_s: float = Field(description="Server time spent on this request, seconds", examples=[1.42])
    timing: StageTimes | None = Field(None, description=TIMING)


class RouterState(BaseModel):
    available: bool = Field(description="Whether the router is loaded")
    reason: str | None = Field(None, description="Why not, when unavailable")
    prefix: str = Field(description="URL prefix of its endpoints", examples=["/ocr"])


class ModelInfo(BaseModel):
    name: str = Field(description="The value of the `model` field that chooses it", examples=["deepseek-ocr"])
    arch: str = Field(description="`ocr` (DeepSeek-OCR) or `ocr2` (DeepSeek-OCR-2)", examples=["ocr"])
    path: str = Field(description="Its checkpoint directory")
    modes: list[str] = Field(description="Modes it serves", examples=[["tiny", "small", "base", "large", "gundam"]])
    ready: bool
    default: bool = Field(description="Used when a request names no model")


class RootResponse(BaseModel):
    name: str = Field(examples=["DeepSeek-OCR API"])
    version: str = Field(examples=["1.0.0"])
    engine: str = Field(description="torch, vllm, or none when the model is not loaded", examples=["vllm"])
    model: str | None = Field(description="MODEL_PATH in use")
    ready: bool = Field(description="Whether OCR requests can be served")
    demo: bool = Field(description="True when serving the tiny random-weights demo checkpoint")
    notice: str | None = Field(None, description="Anything the operator must know (demo, not ready)")
    default_mode: ModeName
    modes: list[str] = Field(description="Modes the running engine serves")
    routers: dict[str, RouterState]
    models: list[ModelInfo] = Field(default_factory=list, description="The models served (MODEL_PATH or MODELS)")
    endpoints: list[str] = Field(description="`METHOD /path` of every endpoint")


class EngineState(BaseModel):
    name: str = Field(description="torch, vllm, or none", examples=["vllm"])
    ready: bool
    restarting: bool = Field(False, description="A dead engine being restarted by the service")
    model: str | None = Field(None, description="The model it serves")
    reason: str | None = Field(None, description="Why it is not ready")
    in_flight: int = Field(description="Items holding one of its slots now")
    max_concurrency: int = Field(description="Its own in-flight limit")
    detail: dict[str, Any] = Field(default_factory=dict, description="Engine specifics (device, dtype, ...)")


class HealthResponse(BaseModel):
    version: str = Field(description="The service's version", examples=["1.0.0"])
    commit: str | None = Field(None, description="The build's git commit (GIT_COMMIT, or the checkout's HEAD)")
    status: Literal["ok", "degraded", "not_ready", "restarting"] = Field(
        description="`ok` when OCR requests can be served and every router and subsystem loaded; `degraded` when "
        "OCR can be served but some failed to load (`unavailable` says which and why); `restarting` while a dead "
        "engine is being restarted"
    )
    ready: bool
    engine: str
    model: str | None = Field(description="MODEL_PATH in use")
    model_loaded: bool
    reason: str | None = Field(
        None, description="Why the model is not loaded, and what to set; when `degraded`, what failed to load"
    )
    demo: bool = Field(description="True when serving the tiny random-weights demo checkpoint")
    notice: str | None = None
    in_flight: int = Field(description="Engine sequences running now")
    waiting: int = Field(description="Engine sequences waiting for a slot")
    uptime_s: float
    detail: dict[str, Any] = Field(default_factory=dict, description="Engine specifics (device, dtype, ...)")
    engines: list[EngineState] = Field(default_factory=list, description="Every engine behind the service")
    models: list[ModelInfo] = Field(default_factory=list, description="The models served (MODEL_PATH or MODELS)")
    unavailable: dict[str, str] = Field(
        default_factory=dict,
        description="Routers and subsystems that failed to load, each with why (the rest of the service works)",
        examples=[{"jobs": "jobs_routes failed to import: ModuleNotFoundError: No module named 'httpx'"}],
    )
    restarts: int = Field(0, description="Engine restarts since the service started")
    quarantined: int = Field(0, description="Inputs refused because they crashed an engine twice")
    orchestrator: str = Field("local", description="local: engine workers on this host; ray: on a Ray cluster")
    cluster: dict[str, Any] | None = Field(
        None, description="ORCHESTRATOR=ray: the cluster's nodes (resources, the workers on each, their items in "
        "flight) and its worker counts"
    )


class LimitsModel(BaseModel):
    max_upload_mb: float
    max_image_pixels: int
    max_pdf_pages: int
    max_batch_files: int
    max_model_len: int
    max_concurrency: int | Literal["auto"] = Field(
        description="MAX_CONCURRENCY as set (each engine's own figure is under /health `engines`)")
    max_queue: int


class RouteStatus(BaseModel):
    """Answer of `/ocr/status`, `/pdf/status`, `/batch/status`."""

    router: str = Field(examples=["ocr"])
    available: bool = Field(description="Whether this router loaded")
    reason: str | None = Field(None, description="Why the router or the engine is unavailable")
    ready: bool = Field(description="Router loaded and engine ready")
    engine: str
    modes: list[str] = Field(description="Modes the running engine serves")
    default_mode: str
    limits: LimitsModel
    features: dict[str, bool] = Field(default_factory=dict)
    models: list[ModelInfo] = Field(default_factory=list, description="The models served, with their modes")


class RouteInfo(BaseModel):
    """Answer of `/ocr/info`, `/pdf/info`, `/batch/info`: how to use the routes."""

    router: str
    description: str
    endpoints: dict[str, str] = Field(description="`METHOD /path` -> what it does")
    parameters: dict[str, str] = Field(description="Form field -> meaning, default and range")
    prompts: dict[str, str] = Field(description="Prompt presets")
    modes: dict[str, str] = Field(description="Mode -> sizes and image tokens")
    limits: LimitsModel
    examples: list[str] = Field(description="curl examples")


class BoxModel(BaseModel):
    grid: list[int] = Field(description="[x1, y1, x2, y2] on the model's 0..999 grid", examples=[[61, 40, 938, 97]])
    pixels: list[int] = Field(
        description="[x1, y1, x2, y2] in pixels of the image as the user sees it (EXIF applied)",
        examples=[[49, 48, 751, 116]],
    )


class BlockModel(BaseModel):
    index: int = Field(description="Position in the output, from 0")
    label: str = Field(description="Region type: title, text, table, image, formula, ...", examples=["title"])
    text: str = Field(description="The content the model wrote for this region", examples=["# Annual report"])
    boxes: list[BoxModel]


class CropModel(BaseModel):
    name: str = Field(description="File name used by the markdown links", examples=["images/0.jpg"])
    label: str = Field(examples=["image"])
    box: list[int] = Field(description="[x1, y1, x2, y2] in pixels")
    width: int
    height: int
    image_base64: str = Field(description="The cropped region as base64 JPEG")


class ImageOcrResponse(BaseModel):
    """Answer of `/ocr/image/advanced`."""

    text: str = Field(description="Raw model output, grounding tags kept")
    markdown: str = Field(description="Cleaned markdown: image regions linked to their crops, tags removed")
    blocks: list[BlockModel] = Field(description="One per ref/det pair, in output order")
    warnings: list[str] = Field(description="Repairs made to malformed model output (never fatal)")
    annotated_image: str | None = Field(None, description="Base64 PNG with boxes and labels drawn (draw_boxes)")
    crops: list[CropModel] = Field(description="Regions labelled `image` (crop_regions)")
    width: int = Field(description="Image width as the user sees it (EXIF applied)")
    height: int = Field(description="Image height as the user sees it (EXIF applied)")
    note: str | None = Field(None, description="Why the image was read reduced (a photo over MAX_IMAGE_PIXELS)")
    finish_reason: FinishReason
    mode: ModeName
    usage: UsageModel
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)
    attempts: int = Field(1, description="Generations run for it (more than 1 when the retry ladder ran)")
    retries: list[RetryModel] = Field(default_factory=list, description="The retry ladder's attempts, if any")
    elapsed_s: float
    timing: StageTimes | None = Field(None, description=TIMING)


class SimpleTextResponse(BaseModel):
    """Answer of `/ocr/image/simple`: plain text, no tags."""

    text: str = Field(description="Text without grounding tags", examples=["Invoice 2024-001\nTotal: 120.00"])
    finish_reason: FinishReason
    mode: ModeName
    usage: UsageModel
    confidence: ConfidenceModel | None = Field(None, description=CONFIDENCE)
    elapsed_s: float
    timing: StageTimes | None = Field(None, description=TIMING)
