"""Service settings, resolution modes and prompt presets.

`Settings` reads the environment variables documented in the README (the seed's `MODEL_PATH`,
`GPU_MEM_UTILIZATION`, `CROP_MODE`, `BASE_SIZE`, `IMAGE_SIZE`, `MAX_CONCURRENCY`, `NUM_WORKERS` keep
their meaning). Nothing happens at import: settings are built by `load_settings()` or by tests.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from process.modes import ARCHITECTURES, DEFAULT_MODE, MODES, ModeSpec, modes_for

__all__ = ["DEFAULT_MODE", "MODES", "ModeSpec"]  # re-exported: the table itself lives in process/image_process.py


# ------------------------------------------------------------------------------------------ the models served
# `MODEL_PATH` serves one model; `MODELS=ocr=/models/DeepSeek-OCR,ocr2=/models/DeepSeek-OCR-2` serves several
# side by side, each with its own engine, and requests choose one with their `model` field (default: the
# first). The architecture is read from the checkpoint's config.json (`architectures`).

ARCH_OF = {name: arch for arch, name in ARCHITECTURES.items()}
DEFAULT_NAMES = {"ocr": "deepseek-ocr", "ocr2": "deepseek-ocr-2"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# n-gram guard defaults (size, window) per route kind, from each model's reference scripts (FACTS 6 and 8).
NGRAM_DEFAULTS = {
    "ocr": {"image": (30, 90), "pdf": (20, 50), "batch": (40, 90)},
    "ocr2": {"image": (20, 90), "pdf": (20, 90), "batch": (20, 90)},
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    arch: str  # "ocr" or "ocr2"; "ocr" when the checkpoint cannot be read (its engine then says why)

    @property
    def modes(self) -> dict[str, ModeSpec]:
        return modes_for(self.arch)

    def ngram(self, kind: str) -> tuple[int, int]:
        return NGRAM_DEFAULTS[self.arch][kind]


def read_arch(path: str | Path) -> str:
    """The checkpoint's architecture from config.json; ValueError naming what was found and what is known."""
    config_file = Path(path) / "config.json"
    try:
        names = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from None
    for name in names:
        if name in ARCH_OF:
            return ARCH_OF[name]
    raise ValueError(f"{config_file} names architectures {names}; known: {', '.join(ARCH_OF)}")


def parse_models(value: str) -> list[tuple[str, str]]:
    """`name=path,name2=path2` -> pairs; ValueError saying what is wrong and what is allowed."""
    pairs: list[tuple[str, str]] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, eq, path = (s.strip() for s in part.partition("="))
        if not eq or not NAME_RE.match(name) or not path:
            raise ValueError(
                f"MODELS entry {part!r} is not name=path (name: letters, digits, '.', '_', '-', at most 64); "
                "e.g. MODELS=ocr=/models/DeepSeek-OCR,ocr2=/models/DeepSeek-OCR-2"
            )
        if name in dict(pairs):
            raise ValueError(f"MODELS names {name!r} twice; each model needs its own name")
        pairs.append((name, path))
    if not pairs:
        raise ValueError("MODELS is set but names no model; e.g. MODELS=ocr=/models/DeepSeek-OCR")
    return pairs


def model_specs(models: str | None, model_path: str | None) -> list[ModelSpec]:
    """The configured models in order (the first is the default); none when nothing is configured."""
    if models:
        return [ModelSpec(name, path, _arch_or_v1(path)) for name, path in parse_models(models)]
    if model_path:
        arch = _arch_or_v1(model_path)
        return [ModelSpec(DEFAULT_NAMES[arch], model_path, arch)]
    return []


def _arch_or_v1(path: str) -> str:
    try:
        return read_arch(path)
    except ValueError:
        return "ocr"  # unreadable: the engine that fails to load it reports why


@dataclass(frozen=True)
class PromptPreset:
    name: str
    prompt: str
    description: str


PROMPTS: dict[str, PromptPreset] = {
    p.name: p
    for p in (
        PromptPreset(
            "document",
            "<image>\n<|grounding|>Convert the document to markdown.",
            "Documents to markdown with layout boxes (default for PDFs and batches)",
        ),
        PromptPreset("ocr", "<image>\n<|grounding|>OCR this image.", "Any image: text with boxes"),
        PromptPreset("free", "<image>\nFree OCR.", "Plain text, no layout"),
        PromptPreset("figure", "<image>\nParse the figure.", "Charts and figures"),
        PromptPreset("describe", "<image>\nDescribe this image in detail.", "A description"),
        PromptPreset(
            "locate",
            "<image>\nLocate <|ref|>xxxx<|/ref|> in the image.",
            "Find a phrase: replace xxxx with the text to find",
        ),
    )
}
DOCUMENT_PROMPT = PROMPTS["document"].prompt
IMAGE_PROMPT = PROMPTS["ocr"].prompt
FREE_PROMPT = PROMPTS["free"].prompt

# n-gram guard defaults of the reference scripts (FACTS section 6).
NGRAM_IMAGE = NGRAM_DEFAULTS["ocr"]["image"]  # (30, 90)
NGRAM_PDF = NGRAM_DEFAULTS["ocr"]["pdf"]  # (20, 50)
NGRAM_BATCH = NGRAM_DEFAULTS["ocr"]["batch"]  # (40, 90)


MAX_SEQUENCES = 4096  # the most MAX_CONCURRENCY may be, set or measured (auto)
MAX_ENGINES_PER_GPU = 8

AUTO_SEQUENCES_BEFORE_START = 100  # MAX_CONCURRENCY=auto before an engine measured its KV cache (and torch's)


def _whole_or_auto(value: object, most: int) -> int | str:
    """A whole number 1..most, or auto (any case)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not 1 <= number <= most:
        raise ValueError(f"must be a whole number 1..{most} or auto")
    return number


def vllm_renderer_threads() -> int:
    """Threads of vLLM's async renderer (image preprocessing) in each engine's process."""
    return max(1, min(8, usable_cpus()))


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask (a container's cpuset, `taskset`), not the
    machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of the service; each field is read from the env variable of the same name in capitals."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_ignore_empty=True)

    model_path: str | None = Field(None, description="Checkpoint directory (config.json, weights, tokenizer)")
    models: str | None = Field(None, description="Several models side by side: name=path,name2=path2")
    engine: Literal["auto", "vllm", "torch"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (PyTorch engine)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gpu_mem_utilization: float = Field(0.75, gt=0.0, le=1.0)

    mode: str | None = Field(None, description="Default mode; derived from BASE_SIZE/IMAGE_SIZE/CROP_MODE")
    crop_mode: bool | None = None
    base_size: int | None = Field(None, ge=64, le=4096)
    image_size: int | None = Field(None, ge=64, le=4096)
    min_crops: int = Field(2, ge=1, le=64)
    max_crops: int = Field(6, ge=1, le=64)

    max_concurrency: int | Literal["auto"] = Field(
        100, description="Engine sequences in flight at once, 1..4096; auto (vLLM): as many as its KV cache holds "
        "at MAX_MODEL_LEN tokens each, measured at start (the PyTorch engine takes 100)",
    )
    max_queue: int = Field(512, ge=0, le=100_000, description="Sequences waiting beyond those in flight")
    num_workers: int = Field(64, ge=1, le=1024, description="Threads for decoding, rendering and drawing")
    max_model_len: int = Field(8192, ge=512, le=131072)
    default_max_tokens: int = Field(8192, ge=1, le=131072)

    max_upload_mb: float = Field(50.0, gt=0, le=16384)
    max_image_pixels: int = Field(40_000_000, ge=1, le=2_000_000_000)
    max_pdf_pages: int = Field(500, ge=1, le=100_000)
    max_batch_files: int = Field(100, ge=1, le=100_000)
    max_batch_mb: float = Field(500.0, gt=0, le=65536, description="Largest batch request body, all files")
    max_decoded_mpix: float | None = Field(
        None, gt=0, le=100_000,
        description="Decoded pixels held at once, all requests; unset = 400 MP (~1.2 GB RGB) or 5 MP per engine "
        "sequence (MAX_CONCURRENCY x workers), whichever is more",
    )
    max_image_aspect: float = Field(
        100.0, ge=1, le=1_000_000,
        description="Longest side over shortest of an image upload; longer strips get a 413 before decoding",
    )
    max_photo_mpix: float = Field(
        120.0, gt=0, le=100_000,
        description="Largest HEIF photo read reduced past MAX_IMAGE_PIXELS (decoded whole first); JPEGs past "
        "MAX_IMAGE_PIXELS are read at 1/2 to 1/8 in the decoder",
    )
    max_answer_mb: float = Field(
        64.0, gt=0, le=65536, description="Annotated images and crops in one JSON answer; past it they are dropped"
    )
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest wait for the next piece of a body")
    # SSE_MAX_STREAMS idle event streams and room beside them: at 1000, a burst of 1,000 stream requests met
    # uvicorn's plain-text 503 before the streams' own 429 could answer (benchmarks/bench_reliability.py n3).
    limit_concurrency: int = Field(2000, ge=1, le=1_000_000, description="Open connections; more get a 503")

    generate_timeout_s: float = Field(60.0, gt=0, le=86_400)
    pdf_timeout_s: float = Field(300.0, gt=0, le=86_400)
    batch_timeout_s: float = Field(600.0, gt=0, le=86_400)
    pdf_render_timeout_s: float = Field(60.0, gt=0, le=3600, description="Longest one PDF page may take to render")
    pdf_open_timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest opening and checking a PDF may take")
    pdf_render_memory_mb: int = Field(1024, ge=64, le=65536, description="Memory one render process may add")
    pdf_searchable_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Longest writing one searchable PDF (in a render process) may take"
    )
    pdf_render_prestart: bool = Field(
        True, description="Start the PDF render processes with the service, not on the first PDF"
    )
    pdf_max_stream_mb: int = Field(256, ge=1, le=65536, description="Largest decompressed stream of a PDF")
    pdf_max_objects: int = Field(1_000_000, ge=1000, le=100_000_000, description="Largest xref /Size of a PDF")
    pdf_max_image_pixels: int = Field(100_000_000, ge=1_000_000, le=2_000_000_000, description="Largest PDF image")
    # Office files (pdf/office.py): converted to PDF by LibreOffice headless, then OCR'd as PDFs.
    office_binary: str = Field("soffice", description="LibreOffice's soffice (a name on PATH or a path)")
    office_timeout_s: float = Field(120.0, gt=0, le=3600, description="Longest one office-to-PDF conversion")
    office_memory_mb: int = Field(2048, ge=256, le=65536, description="Address space and largest file of one")
    office_concurrency: int = Field(2, ge=1, le=64, description="Office conversions at once (each a LibreOffice)")
    pdf_render_per_document: int = Field(
        0, ge=0, le=1024, description="Render processes one PDF may hold at once; 0 = all but one (at least one)"
    )

    retry_ladder: bool = Field(True, description="Retry runaway pages: tighter n-gram guard, other mode, Free OCR")
    engine_restart: bool = Field(True, description="Restart a dead engine in place, with backoff")
    api_key: SecretStr | None = Field(None, description="One key or several, comma-separated")
    log_level: Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_public: bool = Field(False, description="Serve /metrics without the API key (for a scraper)")
    max_images_per_prompt: int = Field(
        4, ge=1, le=16, description="Images one prompt may hold (generate_with_file `files`, /v1 parts); 413 past it"
    )
    confidence: bool = Field(True, description="Each page's `confidence` from its sampled tokens' log-probabilities "
                             "(vLLM: logprobs=0 on every request); false: vLLM leaves it out (torch's is free)")
    confidence_retry_below: float | None = Field(
        None, le=0, description="A page whose mean token log-probability is under this climbs the retry ladder as a "
        "runaway does (e.g. -1.0); unset = off",
    )
    git_commit: str | None = Field(None, description="The build's git commit for build_info (set at image build); "
                                   "unset = `git rev-parse HEAD` where the source is a checkout")

    # The OpenAI-compatible API and the MCP server.
    served_model_name: str = Field(
        "deepseek-ocr", min_length=1, description="Model id of /v1/models (the MODEL_PATH basename is accepted too)"
    )
    mcp_allowed_dir: str | None = Field(
        None, description="Directory whose files the MCP tools may read by path; unset = paths refused"
    )
    # Jobs (jobs/, jobs_routes.py).
    data_dir: str = Field("./data", description="Job inputs and page results; the default job store's folder")
    job_store_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///DATA_DIR/jobs.sqlite")
    job_ttl_s: float = Field(86_400.0, gt=0, le=365 * 86_400, description="Ended jobs are removed after this")
    max_jobs_queued: int = Field(100, ge=1, le=1_000_000, description="Jobs queued or running at once")
    max_job_pages: int = Field(10_000, ge=1, le=1_000_000, description="Pages (or files) of one job")
    job_max_inflight: int = Field(0, ge=0, le=100_000, description="Pages of one job in flight; 0 = the window")
    jobs_running: int = Field(4, ge=1, le=1024, description="Jobs run at once, oldest first")
    job_lease_s: float = Field(30.0, ge=1.0, le=3600.0, description="A replica's hold on a job it runs, renewed "
                               "every third of it; a dead replica's jobs go to another once it expired")
    webhook_allow: str | None = Field(None, description="Hosts (host or host:port, comma-separated) webhooks may call")
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key of X-Signature-256")
    webhook_retries: int = Field(5, ge=0, le=50)
    webhook_backoff_s: float = Field(2.0, ge=0, le=3600, description="First retry delay; doubles each time")
    sse_max_streams_per_key: int = Field(32, ge=1, le=100_000, description="Open /jobs/{id}/events streams of one "
                                         "API key (without API_KEY: of one client address); more get a 429")
    sse_max_streams: int = Field(500, ge=1, le=1_000_000, description="Open event streams in total; more get a 429 "
                                 "(keep it under LIMIT_CONCURRENCY so other requests still get in)")
    sse_idle_timeout_s: float = Field(300.0, gt=0, le=86_400, description="An event stream with no event for this "
                                      "long closes (the client resumes with Last-Event-ID)")
    sse_ping_s: float = Field(15.0, gt=0, le=3600, description="Interval of `: ping` keep-alive comments")
    sse_poll_s: float = Field(2.0, gt=0, le=3600, description="How often one watcher per watched job reads the "
                              "store for events written by another replica (this server's own wake it at once)")

    # Jobs' disk (jobs/quota.py): what one key and everyone together may keep under DATA_DIR.
    max_jobs_queued_per_key: int = Field(20, ge=1, le=1_000_000, description="Jobs one key has queued or running")
    job_quota_jobs_per_key: int = Field(1_000, ge=1, le=10_000_000, description="Jobs one key keeps (any status)")
    job_quota_bytes_per_key: int = Field(5 * 1024**3, ge=1, description="Bytes of uploads and results one key keeps")
    data_quota_jobs: int = Field(10_000, ge=1, le=100_000_000, description="Jobs kept by every key together")
    data_quota_bytes: int = Field(50 * 1024**3, ge=1, description="Bytes of uploads and results of every job")
    data_min_free_gb: float = Field(1.0, ge=0, description="New jobs get 507 while DATA_DIR's disk has less free")
    job_engine_slots: int = Field(
        0, ge=0, le=100_000, description="Engine slots all jobs together may hold, the rest kept for sync requests; "
        "0 = a GPU engine's all (sync requests go first), a CPU engine's half, at most one per core"
    )

    # Engine workers (workers/): one process per GPU, the HTTP edge apart.
    engine_workers: Literal["process", "inline"] = Field(
        "process", description="process: each engine in its own worker process, one per GPU; inline: in the server"
    )
    gpus: str = Field(
        "auto", pattern=r"(?i)^\s*(auto|none|\d+(\s*,\s*\d+)*)\s*$",
        description="GPUs for engine workers: auto (every visible GPU), none (CPU), or ids as in CUDA_VISIBLE_DEVICES",
    )
    data_parallel_size: int | None = Field(
        None, ge=1, le=1024, description="Engine workers to run (each on its own GPUs); unset = one per GPU"
    )
    engines_per_gpu: int | Literal["auto"] = Field(
        1, description="vLLM engine workers side by side on each GPU (per TENSOR_PARALLEL_SIZE GPUs), 1..8, each with"
        " its share of GPU_MEM_UTILIZATION and MAX_CONCURRENCY, started in turn; auto: 2 on GPUs of 64 GiB or more",
    )
    # Beyond one host (workers/ray_cluster.py): the engine workers as Ray actors across a cluster's nodes.
    orchestrator: Literal["local", "ray"] = Field(
        "local", description="local: engine workers on this host; ray: one Ray actor per GPU of the cluster "
        "at RAY_ADDRESS (one per node where it has no GPU)",
    )
    ray_address: str | None = Field(None, description="The Ray cluster to join (host:port); unset = auto")
    ngram_impl: Literal["batched", "vllm"] = Field(
        "batched", description="vLLM n-gram guard: batched (one tensor pass per step) or vLLM's per-request processor"
    )

    # vLLM engine only.
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    enforce_eager: bool = False
    max_num_batched_tokens: int = Field(
        0, ge=0, le=1_048_576,
        description="Tokens one vLLM step may schedule (prefill chunks and image encodes); 0 = vLLM's offline "
        "default for the GPU (16,384 on H100/H200-class, 8,192 on smaller ones)",
    )
    quantization: str | None = None
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="vLLM's KV cache: auto (the model's dtype, bfloat16) or fp8 (e4m3, half the bytes a "
        "token: about twice the sequences in the same memory; no faster on an H100, 99.4% of forced tokens as bf16)",
    )
    load_format: str = Field("auto", description="'dummy' = random weights from config.json (tests only)")

    @field_validator("max_concurrency", mode="before")
    @classmethod
    def _check_concurrency(cls, value: object) -> object:
        return _whole_or_auto(value, MAX_SEQUENCES)

    @field_validator("engines_per_gpu", mode="before")
    @classmethod
    def _check_engines_per_gpu(cls, value: object) -> object:
        return _whole_or_auto(value, MAX_ENGINES_PER_GPU)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        """A key that parses to no key (" " or ",") would silently open every route: refuse to start."""
        if value is not None and not any(k.strip() for k in value.get_secret_value().split(",")):
            raise ValueError("API_KEY is set but holds no key (only spaces or commas); unset it or give a key")
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str | None) -> str | None:
        if value is not None:
            parse_models(value)  # raises with what is wrong and what is allowed
        return value

    @model_validator(mode="after")
    def _resolve_mode(self) -> Settings:
        if self.max_crops < self.min_crops:
            raise ValueError(f"MAX_CROPS ({self.max_crops}) must be >= MIN_CROPS ({self.min_crops})")
        if self.mode is not None:
            self.mode = self.mode.strip().lower()
            if self.mode not in MODES:
                raise ValueError(f"MODE={self.mode!r} is not a mode; allowed: {', '.join(MODES)}")
        if self.crop_mode is None and self.base_size is None and self.image_size is None:
            self.mode = self.mode or DEFAULT_MODE
            return self
        crop = True if self.crop_mode is None else self.crop_mode
        base = self.base_size if self.base_size is not None else 1024
        size = self.image_size if self.image_size is not None else (640 if crop else base)
        matches = [m for m in MODES.values() if (m.base_size, m.image_size, m.crop) == (base, size, crop)]
        if not matches:
            allowed = "; ".join(
                f"{m.name}: BASE_SIZE={m.base_size} IMAGE_SIZE={m.image_size} CROP_MODE={str(m.crop).lower()}"
                for m in MODES.values()
            )
            raise ValueError(
                f"BASE_SIZE={base}, IMAGE_SIZE={size}, CROP_MODE={str(crop).lower()} match no mode; "
                f"allowed combinations: {allowed}"
            )
        if self.mode is not None and self.mode != matches[0].name:
            raise ValueError(
                f"MODE={self.mode} contradicts BASE_SIZE/IMAGE_SIZE/CROP_MODE, which give {matches[0].name}"
            )
        self.mode = matches[0].name
        return self

    @property
    def default_mode(self) -> ModeSpec:
        return MODES[self.mode or DEFAULT_MODE]

    @property
    def sequences(self) -> int:
        """MAX_CONCURRENCY as a number: the setting, or for `auto` the figure an engine takes until it has
        measured its own (a vLLM engine once started) or where it cannot (the PyTorch engine)."""
        return self.max_concurrency if isinstance(self.max_concurrency, int) else AUTO_SEQUENCES_BEFORE_START

    @property
    def workers(self) -> int:
        """NUM_WORKERS capped to what this machine can use (threads beyond 4 per core only queue)."""
        return max(1, min(self.num_workers, 4 * usable_cpus()))

    @property
    def render_processes(self) -> int:
        """Processes that render PDF pages: NUM_WORKERS, at most one per core (rendering is CPU-bound)."""
        return max(1, min(self.num_workers, usable_cpus()))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_batch_bytes(self) -> int:
        return int(self.max_batch_mb * 1024 * 1024)

    def max_decoded_pixels(self, capacity: int = 0) -> int:
        """MAX_DECODED_MPIX, or by default enough for `capacity` sequences in flight: a budget that holds
        fewer pages than the engines take would cap their batch (A4 at 144 dpi is 2 MP, held twice while an
        engine worker process has it: 5 MP leaves room)."""
        if self.max_decoded_mpix is not None:
            return int(self.max_decoded_mpix * 1_000_000)
        return max(400_000_000, capacity * 5_000_000)

    @property
    def max_answer_bytes(self) -> int:
        return int(self.max_answer_mb * 1024 * 1024)

    @property
    def api_keys(self) -> tuple[str, ...]:
        if self.api_key is None:
            return ()
        return tuple(k.strip() for k in self.api_key.get_secret_value().split(",") if k.strip())


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad variable, naming it in capitals with what is allowed."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or value is None else f"={value!r}"
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        allowed = _allowed_range(field)
        if allowed:
            message += f" (allowed: {allowed})"
        lines.append(f"{field.upper()}{shown}: {message}" if field != "settings" else message)
    return "invalid settings: " + "; ".join(lines)


def _allowed_range(field: str) -> str | None:
    info = Settings.model_fields.get(field)
    if info is None:
        return None
    low = high = None
    for rule in info.metadata:
        low = getattr(rule, "ge", None) if getattr(rule, "ge", None) is not None else low
        low = f"> {rule.gt}" if getattr(rule, "gt", None) is not None else low
        high = getattr(rule, "le", None) if getattr(rule, "le", None) is not None else high
    if low is None and high is None:
        return None
    if isinstance(low, str):
        return f"{low} and <= {high}" if high is not None else low
    return f"{low}..{high}" if high is not None else f">= {low}"


class SettingsError(SystemExit):
    """Raised at start-up for invalid settings; SystemExit so uvicorn stops with the message."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
