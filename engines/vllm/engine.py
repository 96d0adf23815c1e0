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

Its start arguments and environment are `engines.vllm.args`'. Helpers used by the benchmarks too:
`PromptBuilder`, `sampling_params`, `vllm_image`, `mm_processor_kwargs`. `vllm` is imported lazily, so this
module imports on machines without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import deepseek_ocr
from config import MODES, ModeSpec, Settings
from engines.base import BaseEngine, Confidence, EngineChunk, EngineHealth, EngineRequest, SamplingParams, Usage
from engines.vllm import modes as vllm_modes
from engines.vllm.args import engine_kwargs, measured_sequences, moe_table, prepare_environment
from errors import BadRequest, ModelNotReady, OcrError, PromptTooLong

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("deepseek_ocr.vllm")

GUNDAM = "gundam"
# An A4 page at 144 dpi in Gundam: 903 image tokens and the prompt's text (docs/GPU_NOTES.md section 1).
A4_GUNDAM_PROMPT_TOKENS = 914
# vLLM's tiling grid is fixed at import (MIN_CROPS/MAX_CROPS bound into default arguments).
VLLM_CROPS = (2, 6)
# Above this view size the reference pads (aspect kept) where vLLM stretches; see vllm_image().
_STRETCH_MAX = 640


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
        # ~11,000 prefill tokens, so that kernel is compiled here and not mid-benchmark. The burst fills a whole
        # step (max_num_batched_tokens: 18 A4 pages at 16,384), the largest a batch of pages brings: the suspect
        # for every start's first 256-page run being 1-3 s slower than the next ones (docs/BENCHMARKS.md
        # sections 28, 29) is what such a step allocates the first time (the pinned host buffer its pages'
        # pixels are merged into, which torch caches by power-of-two size; the encoder's largest batch).
        full_step = int(self._settled.get("max_num_batched_tokens") or 0) // A4_GUNDAM_PROMPT_TOKENS + 1
        burst = min(max(12, full_step), self.max_concurrency)
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
