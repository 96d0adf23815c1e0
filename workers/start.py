"""Starting the engines: which engine (`engines.registry`) and where it runs (here, worker processes, Ray).

`ENGINE=torch` is our PyTorch model (`engines.torch_engine`), `ENGINE=vllm` is vLLM (`engines.vllm.engine`),
`auto` takes vLLM when it is installed and a GPU is visible. Each engine module is imported only when it
is chosen, so the CPU default never imports vLLM. `start_engines` is what the app's lifespan calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from config import ModelSpec, Settings, model_specs
from engines.base import Engine, UnavailableEngine
from engines.registry import build_engine, engine_kind

log = logging.getLogger("deepseek_ocr.engine")

DEMO_NOTICE = (
    "DEMO: serving a tiny checkpoint with RANDOM weights; its text is meaningless. Set MODEL_PATH to the "
    "DeepSeek-OCR weights directory (config.json, *.safetensors, tokenizer.json) for real OCR."
)
NO_MODEL_HINT = (
    "set MODEL_PATH to the DeepSeek-OCR weights directory (config.json, *.safetensors, tokenizer.json), "
    "or run `make serve` for a random-weights demo"
)

# A factory builds the app's engines from its settings (tests pass their own replay engines).
EngineFactory = Callable[[Settings], list[Engine]]


def default_factory(settings: Settings) -> list[Engine]:
    """One engine in this process (ENGINE_WORKERS=inline), one worker process per GPU (the default), or
    one Ray actor per GPU of a cluster (ORCHESTRATOR=ray; Ray is imported only then)."""
    kind = engine_kind(settings)
    if settings.engines_per_gpu not in (1, "auto") and (settings.orchestrator == "ray" or kind != "vllm"
                                                         or settings.engine_workers == "inline"):
        log.warning("ENGINES_PER_GPU=%s is for vLLM engine workers on this host (ENGINE_WORKERS=process, "
                    "ORCHESTRATOR=local): one engine per GPU here", settings.engines_per_gpu)
    if settings.orchestrator == "ray":
        from workers.ray_cluster import ray_engines

        return ray_engines(settings)
    if settings.engine_workers == "inline":
        return [build_engine(settings)]
    from workers.client import WorkerEngine
    from workers.plan import worker_plan

    return [WorkerEngine(settings, kind, spec) for spec in worker_plan(settings, kind)]


def is_random_weights(settings: Settings) -> bool:
    """True for the checkpoints `deepseek_ocr.py make-tiny` writes, and for vLLM's dummy weights."""
    if settings.load_format == "dummy":
        return True
    try:
        config = json.loads((Path(settings.model_path or "") / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(config.get("_name_or_path", "")).startswith("deepseek-ocr-random")


async def start_engines(settings: Settings, factory: EngineFactory | None = None) -> list[Engine]:
    """The engines of every configured model, started; a model that cannot load is an `UnavailableEngine`
    saying why (the others still serve).

    With a factory (tests), its engines are started as they are: no checkpoint checks.
    """
    specs = model_specs(settings.models, settings.model_path)
    if factory is not None:
        engines = factory(settings)
        for engine in engines:
            if engine.model is None and specs:
                engine.model = specs[0]
            await engine.start()
        return engines
    if not specs:
        log.warning("MODEL_PATH is not set: OCR endpoints answer 503 until it is")
        return [UnavailableEngine(f"MODEL_PATH is not set: {NO_MODEL_HINT}")]
    engines: list[Engine] = []
    for spec in specs:
        engines += await _start_model(settings.model_copy(update={"model_path": spec.path}), spec)
    return engines


async def _start_model(settings: Settings, spec: ModelSpec) -> list[Engine]:
    where = f"model {spec.name!r} at {spec.path}"
    if not (Path(spec.path) / "config.json").is_file():
        reason = f"{where}: MODEL_PATH={spec.path} has no config.json: {NO_MODEL_HINT}"
        log.error("%s", reason)
        return [_unavailable(reason, spec)]
    try:
        engines = default_factory(settings)
    except ValueError as exc:  # GPUS / DATA_PARALLEL_SIZE that this machine cannot give
        log.error("%s: %s", where, exc)
        return [_unavailable(f"{where}: {exc}", spec, engine_kind(settings))]
    for engine in engines:
        engine.model = spec
    outcomes = await start_side_by_side(engines)
    failed = [(e, o) for e, o in zip(engines, outcomes, strict=True) if o is not None]
    for engine, exc in failed:
        log.error("model load failed: %s on %s: %s", where, engine.worker_id or engine.name, exc,
                  exc_info=exc)
        with contextlib.suppress(Exception):
            await engine.close()
    engines = [e for e, o in zip(engines, outcomes, strict=True) if o is None]
    if not engines:
        exc = failed[0][1]
        reason = f"could not load {where} (MODEL_PATH={spec.path}): {exc}; {NO_MODEL_HINT}"
        return [_unavailable(reason, spec, engine_kind(settings))]
    demo = is_random_weights(settings)
    for engine in engines:
        engine.demo = demo
        log.info("engine %s ready: %s (%s)", engine.name, where, spec.arch)
    if demo:
        log.warning("%s", DEMO_NOTICE)
    return engines


async def start_side_by_side(engines: list[Engine]) -> list[BaseException | None]:
    """Start `engines`, each outcome in their order (None: started). Workers on different GPUs start side by
    side (a vLLM engine takes a minute or more); the ENGINES_PER_GPU workers of one GPU one after another,
    since vLLM sizes its KV cache by the GPU memory it measures in use during its own profiling run, and a
    neighbour loading at the same time would be counted as its own."""
    queues: dict[object, list[int]] = {}
    for i, engine in enumerate(engines):
        spec = getattr(engine, "spec", None)
        shared = spec is not None and getattr(spec, "shares", 1) > 1
        queues.setdefault(("gpus", spec.gpus) if shared else i, []).append(i)
    outcomes: list[BaseException | None] = [None] * len(engines)

    async def in_turn(indices: list[int]) -> None:
        for i in indices:
            try:
                await engines[i].start()
            except Exception as exc:  # the next on its GPU still starts; the caller logs and closes this one
                outcomes[i] = exc

    await asyncio.gather(*(in_turn(indices) for indices in queues.values()))
    return outcomes


def _unavailable(reason: str, spec: ModelSpec, kind: str = "none") -> UnavailableEngine:
    engine = UnavailableEngine(reason, kind)
    engine.model = spec
    return engine
