"""The vLLM engine's arguments, from the service settings: what `AsyncLLM` / `LLM` are started with and the
environment they need, and what follows from them before and after a start.

- `engine_kwargs`: `AsyncEngineArgs` / `EngineArgs` / `LLM` keyword arguments (the service's engine and the
  benchmarks' raw vLLM get the same); `offline_batched_tokens`: vLLM's offline step budget for this GPU.
- `prepare_environment`: spawn for vLLM's processes, the per-request-modes plugin, the shipped fused-MoE tables
  (`use_moe_configs`); `moe_table`: which table vLLM takes on this GPU.
- KV cache arithmetic: `kv_bytes_per_token`; MAX_CONCURRENCY=auto's ceiling before a start
  (`auto_sequences_ceiling`) and its figure once vLLM measured its cache (`measured_sequences`).

`vllm` is imported lazily, so this module imports on machines without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import deepseek_ocr
from config import MAX_SEQUENCES, Settings, vllm_renderer_threads
from engines.vllm import modes as vllm_modes

log = logging.getLogger("deepseek_ocr.vllm")


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
