"""The vLLM engine: DeepSeek-OCR on `vllm.AsyncLLM` (continuous batching on NVIDIA GPUs).

`VllmEngine` implements `engines.base.BaseEngine` over vLLM 0.26's built-in `DeepseekOCRForCausalLM`. The
service's prompt construction is kept: plain `bos + prompt`, one `<image>` id where the tag is, tokenised
by our own tokenizer loader; vLLM only expands that id into the image's placeholder run.

Resolution modes: every mode of the model is served on one engine, chosen per request. vLLM's DeepSeek-OCR
processing counts placeholders from module constants (Gundam only, vLLM issue #28160); `engines.vllm.modes`
installs a vLLM plugin (in this process and, through an entry point, in every process vLLM spawns) whose
classes take the view sizes from each request's `mm_processor_kwargs` and keep images of different modes out
of one encoder batch. vLLM stretches base/large images to a square where the reference pads them; those are
padded here first, which makes vLLM's stretch a no-op. DeepSeek-OCR-2 keeps its one mode (vLLM's own class).

Helpers used by the benchmarks too: `engine_kwargs`, `prepare_environment`, `PromptBuilder`,
`sampling_params`, `vllm_image`, `mm_processor_kwargs`. `vllm` is imported lazily, so this module imports on
machines without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import deepseek_ocr
from config import MAX_SEQUENCES, MODES, ModeSpec, Settings, vllm_renderer_threads
from engines.base import BaseEngine, Confidence, EngineChunk, EngineHealth, EngineRequest, SamplingParams, Usage
from engines.vllm import modes as vllm_modes
from errors import BadRequest, ModelNotReady, OcrError, PromptTooLong

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("deepseek_ocr.vllm")

GUNDAM = "gundam"
# vLLM's tiling grid is fixed at import (MIN_CROPS/MAX_CROPS bound into default arguments).
VLLM_CROPS = (2, 6)
# Above this view size the reference pads (aspect kept) where vLLM stretches; see vllm_image().
_STRETCH_MAX = 640


# --------------------------------------------------------------------------------------- engine args


def engine_kwargs(settings: Settings, ngram_impl: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for `AsyncEngineArgs` / `EngineArgs` / `LLM`, from the service settings.

    ngram_impl (default: NGRAM_IMPL, else "batched") picks the n-gram guard's logits processor: "batched"
    (engines/vllm/ngram.py, the whole batch in tensor ops), "vllm" (vLLM's per-request processor, same bans),
    or "off" (none registered: requests' n-gram settings are then ignored; for benchmarks).
    """
    impl = ngram_impl or getattr(settings, "ngram_impl", "batched")
    if impl == "batched":
        from engines.vllm.ngram import NGramBatchProcessor as ngram_processor
    elif impl == "vllm":
        from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor as ngram_processor
    elif impl != "off":
        raise ValueError(f"NGRAM_IMPL must be batched, vllm or off, got {impl!r}")

    if not settings.model_path:
        raise ValueError("MODEL_PATH is not set")
    kwargs: dict[str, Any] = {
        "model": settings.model_path,
        "tokenizer": settings.model_path,
        "trust_remote_code": False,  # vLLM has the architecture built in; the config's auto_map is ignored
        "dtype": settings.dtype,  # "auto" = the checkpoint's torch_dtype (bfloat16)
        "gpu_memory_utilization": settings.gpu_mem_utilization,
        "max_num_seqs": settings.max_concurrency if isinstance(settings.max_concurrency, int) else
        auto_sequences_ceiling(settings),
        "max_num_batched_tokens": settings.max_num_batched_tokens or offline_batched_tokens(
            settings.tensor_parallel_size),
        "max_model_len": settings.max_model_len,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "enforce_eager": settings.enforce_eager,
        "quantization": settings.quantization,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "load_format": settings.load_format,
        # One image per request and no reuse between requests: caches would only cost memory and hashing.
        "enable_prefix_caching": False,
        "mm_processor_cache_gb": 0,
        "limit_mm_per_prompt": {"image": settings.max_images_per_prompt},
        "logits_processors": [] if impl == "off" else [ngram_processor],
        # Image preprocessing runs in the renderer's threads (async path); several pages decode at once.
        "renderer_num_workers": vllm_renderer_threads(),
    }
    kwargs.update(overrides)
    return kwargs


# Bytes of one element of the KV cache by its dtype (KV_CACHE_DTYPE, else the model's).
_KV_BYTES = {"fp8": 1, "float16": 2, "bfloat16": 2, "float32": 4}


def kv_bytes_per_token(settings: Settings, model_path: str | Path | None = None) -> int:
    """KV cache bytes one token takes on one GPU: K and V of every decoder layer, the KV heads a tensor-parallel
    rank holds (DeepSeek-OCR's decoder has no MLA: plain heads, 60 KiB a token in bfloat16)."""
    path = Path(model_path or settings.model_path or "")
    cfg = deepseek_ocr.DeepseekOCRConfig.from_pretrained(path)
    dtype = settings.kv_cache_dtype if settings.kv_cache_dtype != "auto" else settings.dtype
    if dtype == "auto":
        dtype = checkpoint_dtype(path)
    heads = max(1, cfg.num_key_value_heads // settings.tensor_parallel_size)
    return 2 * cfg.num_hidden_layers * heads * cfg.head_dim * _KV_BYTES.get(dtype, 2)


def checkpoint_dtype(path: str | Path) -> str:
    """The checkpoint's own dtype (config.json `torch_dtype`, or `dtype` in newer exports); bfloat16 if unnamed."""
    import json

    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "bfloat16"
    lang = raw.get("language_config") or {}
    for value in (raw.get("torch_dtype"), raw.get("dtype"), lang.get("torch_dtype")):
        if isinstance(value, str) and value.removeprefix("torch.") in _KV_BYTES:
            return value.removeprefix("torch.")
    return "bfloat16"


def auto_sequences_ceiling(settings: Settings, total_memory: int | None = None) -> int:
    """vLLM's `max_num_seqs` for MAX_CONCURRENCY=auto, before vLLM has measured its KV cache: the sequences of
    MAX_MODEL_LEN tokens that the GPU's whole memory at GPU_MEM_UTILIZATION would hold with no weights and no
    activations, an upper bound of the measured figure (`measured_sequences`), which the engine then keeps
    to. Not far above it (the weights are ~6 GB of 60-130 GB), so vLLM sizes its batch buffers and sampler
    warm-up for about the batch it will run. `total_memory`: bytes of one GPU (default: NVML's, GPU 0 of
    those this process sees)."""
    if total_memory is None:
        from vllm.platforms import current_platform

        total_memory = int(current_platform.get_device_total_memory(0))
    per_sequence = kv_bytes_per_token(settings) * settings.max_model_len
    ceiling = int(total_memory * settings.gpu_mem_utilization) // per_sequence
    return max(1, min(MAX_SEQUENCES, ceiling))


def measured_sequences(kv_tokens: int, settings: Settings, max_num_seqs: int) -> int:
    """MAX_CONCURRENCY=auto once vLLM has measured its cache: the sequences of MAX_MODEL_LEN tokens (the
    longest a request may grow to) that `kv_tokens` hold, so that no sequence is ever preempted for room;
    at most vLLM's `max_num_seqs`, at least one."""
    return max(1, min(max_num_seqs, kv_tokens // settings.max_model_len))


def offline_batched_tokens(world_size: int = 1) -> int | None:
    """vLLM's `max_num_batched_tokens` for its offline `LLM` on this GPU (16,384 on H100/H200-class GPUs).

    `AsyncLLM` left to itself takes 2,048 (its engine context), a quarter of what `vllm serve` takes and an
    eighth of `LLM`: a burst of pages then prefills ~2 pages a step and fills 256 sequences slowly. The
    service batches pages as offline inference does, so it takes the offline figure. None (vLLM decides)
    where vLLM's table cannot be read."""
    try:
        from vllm import EngineArgs
        from vllm.usage.usage_lib import UsageContext

        tokens, _ = EngineArgs.get_batch_defaults(world_size)
        value = tokens.get(UsageContext.LLM_CLASS)
    except Exception:  # another vLLM version: its own default stands
        log.debug("vLLM's batch defaults could not be read", exc_info=True)
        return None
    return int(value) if value else None


def prepare_environment() -> None:
    """Environment vLLM needs here; call before it starts its processes."""
    # vLLM's FlashInfer sampler is its default; without the package installed it fails at the first step.
    if importlib.util.find_spec("flashinfer") is None:
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    # vLLM forks its engine core unless it sees CUDA initialised, but `torch.cuda.is_available()` (as in
    # ENGINE=auto) already poisons fork without marking CUDA initialised: the child then dies with
    # "Cannot re-initialize CUDA in forked subprocess". Spawn is safe whatever ran before.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    # Per-request modes: our DeepSeek-OCR classes here and, by entry point, in the processes vLLM spawns.
    vllm_modes.install_plugin()
    use_moe_configs()


MOE_CONFIGS = Path(__file__).resolve().parent.parent / "moe_configs"


def moe_table(settings: Settings) -> dict[str, Any]:
    """The fused-MoE tile table vLLM's Triton kernel takes for this model's experts on this GPU: the file name
    vLLM looks for and where it found it (`found` None: vLLM's default tiles, with its "sub-optimal" warning).
    The same two places vLLM searches, in its order: VLLM_TUNED_CONFIG_FOLDER (engines/moe_configs here),
    then vLLM's own tables."""
    fused_moe = importlib.import_module("vllm.model_executor.layers.fused_moe.fused_moe")  # the module itself
    cfg = deepseek_ocr.DeepseekOCRConfig.from_pretrained(settings.model_path or "")
    width = cfg.moe_intermediate_size // settings.tensor_parallel_size  # vLLM's N: one rank's expert width
    name = fused_moe.get_config_file_name(cfg.n_routed_experts, width, None)
    folders = [os.environ.get("VLLM_TUNED_CONFIG_FOLDER"), str(Path(fused_moe.__file__).resolve().parent / "configs")]
    found = next((str(Path(f) / name) for f in folders if f and (Path(f) / name).is_file()), None)
    return {"file": name, "found": found}


def use_moe_configs() -> None:
    """Point vLLM at the fused-MoE tables shipped for this model's expert shape (`benchmarks/tune_moe.py`):
    vLLM reads `VLLM_TUNED_CONFIG_FOLDER` first and falls back to its own tables and defaults for any shape
    or GPU without a file there. An operator's own VLLM_TUNED_CONFIG_FOLDER is kept."""
    if MOE_CONFIGS.is_dir():
        os.environ.setdefault("VLLM_TUNED_CONFIG_FOLDER", str(MOE_CONFIGS))


# --------------------------------------------------------------------------------------- modes


def mm_processor_kwargs(mode: ModeSpec, arch: str = "ocr") -> dict[str, Any] | None:
    """Per-request processor options: the mode's view sizes and crop flag (DeepSeek-OCR); None for OCR-2,
    whose one mode is vLLM's own."""
    return vllm_modes.mode_kwargs(mode) if arch == "ocr" else None


def vllm_image(image: Image.Image, mode: ModeSpec) -> Image.Image:
    """The image as vLLM must receive it so that its views equal the reference's (and our model's).

    RGB; in base/large (no crop, view over 640 px) padded to the view square first, because vLLM
    stretches it there where the reference pads; and lifted one grey level when its mean is exactly mid-grey
    (see `_balanced`).
    """
    from PIL import ImageOps

    from process.modes import PAD_COLOR

    if image.mode != "RGB":
        image = image.convert("RGB")
    if _balanced(image):
        # vLLM 0.26 treats a view whose normalised pixels sum to exactly 0 as "no image" and its engine
        # core then dies on the missing embeddings (a 1280x1280 half-black, half-white page does it).
        # One grey level is invisible to the model and moves every view's sum off zero.
        image = image.point(lambda v: min(255, v + 1))
    if not mode.crop and mode.image_size > _STRETCH_MAX:
        image = ImageOps.pad(image, (mode.base_size, mode.base_size), color=PAD_COLOR)
    return image


def _balanced(image: Image.Image) -> bool:
    """Whether the pixel mean is exactly 127.5, the condition for views whose normalised sum is 0."""
    hist = image.histogram()  # 256 bins per band, bands one after another
    total = sum((i % 256) * n for i, n in enumerate(hist))
    return 2 * total == 255 * sum(hist)


# --------------------------------------------------------------------------------------- prompts


class PromptBuilder(deepseek_ocr.PromptBuilder):
    """The one prompt builder (`deepseek_ocr.PromptBuilder`), with the vLLM token-prompt shape on top:
    one `<image>` id at the tag, which vLLM expands to the image's placeholders itself, and the mode's
    view sizes as the request's `mm_processor_kwargs` (DeepSeek-OCR; `arch="ocr2"` sends none)."""

    def __init__(self, tokenizer: Any, arch: str = "ocr") -> None:
        super().__init__(tokenizer)
        self.arch = arch

    @classmethod
    def from_checkpoint(cls, path: str | Path, arch: str | None = None) -> PromptBuilder:
        """`arch` None: read from the checkpoint's config.json ("ocr" when it names no known one)."""
        if arch is None:
            from config import read_arch

            try:
                arch = read_arch(path)
            except ValueError:
                arch = "ocr"  # vLLM itself will say what is wrong with the checkpoint
        return cls(deepseek_ocr.load_tokenizer(path), arch)

    def prompt(self, prompt: str, image: Image.Image | Sequence[Image.Image] | None, mode: ModeSpec,
               extra_ids: Sequence[int] = ()) -> dict[str, Any]:
        """A vLLM `TokensPrompt` dict; `image` must already be `vllm_image(image, mode)`: a list for a prompt of
        several images (one `<image>` id at each tag, vLLM expands each in order)."""
        several = isinstance(image, (list, tuple))
        ids = self.token_ids(prompt, None if image is None else [1] * len(image) if several else 1)
        out: dict[str, Any] = {"prompt_token_ids": [*ids, *extra_ids]}
        if image is not None:
            out["multi_modal_data"] = {"image": list(image) if several else image}
            if (kwargs := mm_processor_kwargs(mode, self.arch)) is not None:
                out["mm_processor_kwargs"] = kwargs
        return out


def sampling_params(sampling: SamplingParams, whitelist: Sequence[int], *, delta: bool = True, logprobs: bool = True,
                    **extra: Any) -> Any:
    """vLLM `SamplingParams` for our `Sampling`; the n-gram guard rides in `extra_args` (off at size 0);
    `logprobs`: the sampled tokens' log-probabilities for the page's confidence (CONFIDENCE)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    args = None
    if sampling.ngram_size > 0:
        args = {"ngram_size": sampling.ngram_size, "window_size": sampling.ngram_window,
                "whitelist_token_ids": list(whitelist)}
    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        skip_special_tokens=False,  # grounding tags are the answer's structure
        spaces_between_special_tokens=False,
        output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        extra_args=args,
        # The sampled token's own log-probability only (0 = no alternatives): the page's `confidence`. vLLM's
        # default logprobs_mode (raw_logprobs) scores it before the logits processors, as TorchEngine does.
        logprobs=0 if logprobs else None,
        **extra,
    )


# --------------------------------------------------------------------------------------- the engine


class VllmEngine(BaseEngine):
    """`BaseEngine` over `vllm.AsyncLLM`: vLLM batches, our `BaseEngine` bounds the sequences in flight."""

    name = "vllm"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.sequences)
        self.settings = settings
        self.model_path = settings.model_path
        self._engine: Any = None
        self._prompts: PromptBuilder | None = None
        self._version = "?"
        self._settled: dict[str, Any] = {}  # what vLLM settled on at start (/health)

    @property
    def arch(self) -> str:
        return self.model.arch if self.model is not None else "ocr"

    async def start(self) -> None:
        prepare_environment()
        import vllm
        from vllm.v1.engine.async_llm import AsyncLLM

        self._version = vllm.__version__
        crops = (self.settings.min_crops, self.settings.max_crops)
        if GUNDAM in self.served_modes and crops != VLLM_CROPS:
            raise ValueError(
                f"MIN_CROPS={crops[0]}, MAX_CROPS={crops[1]}: vLLM {self._version} tiles Gundam pages "
                f"with its fixed {VLLM_CROPS[0]}..{VLLM_CROPS[1]} grid; set MIN_CROPS=2 MAX_CROPS=6 "
                "or use ENGINE=torch"
            )
        self._reason = f"starting vLLM {self._version} on {self.model_path}"
        self._prompts = await asyncio.to_thread(PromptBuilder.from_checkpoint, self.model_path, self.arch)
        args = vllm.AsyncEngineArgs(**engine_kwargs(self.settings))
        log.info("starting vLLM %s engine: %s (modes %s)", self._version, self.model_path,
                 ", ".join(self.served_modes))
        started = time.time()
        # Built on the event loop thread: AsyncLLM binds its output task and sockets to the running loop.
        self._engine = AsyncLLM.from_engine_args(args)
        try:
            self._check_plugin(started)
            self._settle()
            await self._warm_up()
        except BaseException:
            self._engine.shutdown()
            self._engine = None
            raise
        self.set_ready()

    def _settle(self) -> None:
        """Read back what vLLM settled on (for /health), and with MAX_CONCURRENCY=auto take as many sequences
        as its measured KV cache holds at MAX_MODEL_LEN tokens each."""
        config = self._engine.vllm_config
        cache, scheduler = config.cache_config, config.scheduler_config
        kv_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0)
        if self.settings.max_concurrency == "auto" and kv_tokens:
            self.max_concurrency = measured_sequences(kv_tokens, self.settings, scheduler.max_num_seqs)
            log.info("MAX_CONCURRENCY=auto: %d sequences (%s KV cache tokens / MAX_MODEL_LEN %d; vLLM "
                     "max_num_seqs %d)", self.max_concurrency, f"{kv_tokens:,}", self.settings.max_model_len,
                     scheduler.max_num_seqs)
        try:
            moe = moe_table(self.settings)
        except Exception as exc:  # another vLLM's layout: say so rather than guess
            moe = {"file": None, "found": None, "error": f"{type(exc).__name__}: {exc}"}
        self._settled = {
            "max_num_seqs": scheduler.max_num_seqs,
            "max_num_batched_tokens": scheduler.max_num_batched_tokens,
            "async_scheduling": bool(scheduler.async_scheduling),
            "kv_cache_dtype": cache.cache_dtype,
            "kv_cache_tokens": kv_tokens,
            "max_model_len": config.model_config.max_model_len,
            "moe_table": moe,
        }

    def _check_plugin(self, started: float) -> None:
        """The engine core (vLLM spawned it from this process) must have loaded the modes plugin: on vLLM's
        own class, images of different modes could share an encoder batch and be answered wrongly, silently."""
        if self.arch != "ocr" or vllm_modes.children_registered(started):
            return
        if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "fork":
            return  # a forked core inherits this process's registration (and does not load plugins again)
        raise RuntimeError(
            f"vLLM's engine core did not load the {vllm_modes.PLUGIN_NAME!r} plugin (entry point of "
            f"{vllm_modes.plugin_dir()}, PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}, "
            f"VLLM_PLUGINS={os.environ.get('VLLM_PLUGINS')!r}); see the engine core's log for why"
        )

    async def _warm_up(self) -> None:
        """Run each prompt shape once before reporting ready.

        Triton compiles the fused-MoE kernel for new token counts on first use: on an H100 the first image
        prompt after start took over 20 s, past a 10 s GENERATE_TIMEOUT_S. Text-only; then Gundam's one-view
        image and tiled A4 page and every other mode (each has its own prompt length), each alone, then all
        together (a mixed batch, as traffic brings it); then a burst of A4 pages; two tokens each, n-gram on.
        """
        from PIL import Image

        started = time.perf_counter()
        modes = self.model.modes if self.model is not None else MODES
        sampling = SamplingParams(max_tokens=2, ngram_size=20, ngram_window=50)

        async def run(prompt: str, mode: ModeSpec, size: tuple[int, int] | None) -> None:
            image = Image.new("RGB", size, "white") if size else None
            async for _ in self._stream(EngineRequest(prompt, image, mode, sampling)):
                pass

        steps: list[str] = []
        clock = time.perf_counter()

        def lap(what: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            steps.append(f"{what} {now - clock:.1f} s")
            clock = now

        shapes = [(modes[GUNDAM], (640, 480)), (modes[GUNDAM], (1190, 1684))]
        shapes += [(mode, (1190, 1684)) for name, mode in modes.items() if name != GUNDAM]
        await run("Hello", modes[GUNDAM], None)
        lap("text")
        # Each shape alone (a batch of one mode), then all at once (a mixed batch). The other order cost
        # 110-134 s instead of 41-60 s on an H200 (docs/BENCHMARKS.md section 15), when each mode's first
        # request still built its own processor.
        for mode, size in shapes:
            await run("<image>\nFree OCR.", mode, size)
            lap(f"{mode.name} {size[0]}x{size[1]}")
        await asyncio.gather(*(run("<image>\nFree OCR.", mode, size) for mode, size in shapes))
        lap("all at once")
        # A step of over 8,256 tokens (64 experts x 129: vLLM's default fused-MoE config switches to grouped
        # M tiles past 128 tokens per expert) is what a burst of PDF pages brings; twelve A4 pages give
        # ~11,000 prefill tokens, so that kernel is compiled here and not mid-benchmark.
        burst = min(12, self.max_concurrency)
        await asyncio.gather(*(run("<image>\nFree OCR.", modes[GUNDAM], (1190, 1684)) for _ in range(burst)))
        lap(f"burst of {burst}")
        log.info("vLLM warm-up took %.1f s (modes %s): %s", time.perf_counter() - started, ", ".join(modes),
                 "; ".join(steps))

    def health(self) -> EngineHealth:
        if self._ready and self._engine is not None and self._engine.errored:
            self._mark_dead()
        h = super().health()
        h.detail = {
            "vllm_version": self._version,
            "dtype": self.settings.dtype,
            "load_format": self.settings.load_format,
            "max_concurrency_setting": self.settings.max_concurrency,
            "tensor_parallel_size": self.settings.tensor_parallel_size,
            "served_modes": list(self.served_modes),
            **self._settled,  # what vLLM settled on: sequences, batched tokens, KV cache, the MoE table
        }
        processor = getattr(self._engine, "output_processor", None)
        if processor is not None and hasattr(processor, "get_num_unfinished_requests"):
            # vLLM's own count: sequences it still holds (0 after every abort has landed).
            h.detail["vllm_unfinished"] = processor.get_num_unfinished_requests()
        return h

    def _mark_dead(self) -> None:
        if self._ready:
            self.mark_dead("the vLLM engine core died (see the service log for its error)")
            log.error("%s", self._reason)

    async def close(self) -> None:
        await super().close()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    async def abort(self, request_id: str) -> None:
        engine = self._engine
        if engine is not None and not engine.errored:
            await engine.abort(request_id)

    async def _render(self, prompt: dict[str, Any]) -> Any:
        # vLLM 0.26's renderer preprocesses the image in its thread pool; a raw prompt handed to
        # generate() would be preprocessed on the event loop.
        renderer = getattr(self._engine, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl_async"):
            return prompt
        (engine_input,) = await renderer.render_cmpl_async([prompt])
        return engine_input

    async def _stream(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        engine, prompts = self._engine, self._prompts
        if engine is None or prompts is None:
            raise ModelNotReady(self._reason or "the vLLM engine is not running", retry_after=30)
        image: Any = None
        if request.more_images:
            image = [await asyncio.to_thread(vllm_image, i, request.mode) for i in request.images]
        elif request.image is not None:
            image = await asyncio.to_thread(vllm_image, request.image, request.mode)
        params = sampling_params(request.sampling, prompts.whitelist, delta=request.stream,
                                 logprobs=self.settings.confidence)
        completion = 0
        confidence = Confidence()
        try:
            engine_input = await self._render(prompts.prompt(request.prompt, image, request.mode))
            async for out in engine.generate(engine_input, params, request.request_id):
                piece = out.outputs[0]
                completion += len(piece.token_ids)
                score_tokens(confidence, piece.token_ids, piece.logprobs, skip=prompts.eos_id)
                if not out.finished:
                    if piece.text:
                        yield EngineChunk(piece.text)
                    continue
                finish = _finish_reason(piece.finish_reason)
                ids = out.prompt_token_ids or []
                usage = Usage(
                    prompt_tokens=len(ids),
                    image_tokens=sum(1 for t in ids if t == prompts.image_id),
                    # The EOS that ends a "stop" is not part of the answer (as in TorchEngine).
                    completion_tokens=completion - (1 if finish == "stop" and completion else 0),
                    per_image=per_image_tokens(out, ids, prompts.image_id),
                )
                yield EngineChunk(piece.text, finish, usage, confidence)
                return
        except EngineDeadError:
            self._mark_dead()
            raise ModelNotReady(self._reason or "the vLLM engine core died", retry_after=60) from None
        except ValueError as exc:  # vLLM's request validation: prompt length, processor failures
            text = str(exc)
            if "maximum model length" in text:
                raise PromptTooLong(f"{text} (MAX_MODEL_LEN={self.settings.max_model_len})") from None
            raise BadRequest(f"vLLM refused the request: {text}") from None
        except EngineGenerateError as exc:
            if engine.errored:
                self._mark_dead()
                raise ModelNotReady(self._reason or "the vLLM engine core died", retry_after=60) from None
            raise OcrError(f"the vLLM engine failed on this request: {exc.__cause__ or exc}") from exc


def score_tokens(confidence: Confidence, token_ids: Sequence[int], logprobs: Any, *, skip: int | None = None) -> None:
    """Add the sampled tokens' log-probabilities of one output (a DELTA's new positions, or all of them) to
    `confidence`. With `logprobs=0` each position holds the sampled token's entry (a dict token id -> Logprob).
    `skip`: the EOS id, which is no part of the answer (TorchEngine leaves it out too)."""
    for token, position in zip(token_ids, logprobs or (), strict=False):
        if token == skip:
            continue
        entry = position.get(token) if hasattr(position, "get") else None
        if entry is None and position:
            entry = next(iter(position.values()))
        if entry is not None:
            confidence.add(float(getattr(entry, "logprob", entry)))


def per_image_tokens(out: Any, ids: Sequence[int], image_id: int) -> list[int]:
    """Placeholder tokens of each image of the prompt, in order: vLLM's placeholder ranges where it gives them,
    else the runs of the image id in the expanded prompt (adjacent images would merge there; tags are apart)."""
    ranges = (getattr(out, "multi_modal_placeholders", None) or {}).get("image")
    if ranges:
        return [int(getattr(r, "length", 0)) for r in ranges]
    runs: list[int] = []
    previous = None
    for t in ids:
        if t == image_id:
            if previous == image_id:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = t
    return runs


def _finish_reason(reason: str | None) -> str:
    if reason in ("stop", "length", "abort"):
        return reason
    if reason == "repetition":  # vLLM's own repetition detector (not enabled here) ends like a stop
        return "stop"
    raise OcrError(f"the vLLM engine ended the request with finish_reason={reason!r}")
