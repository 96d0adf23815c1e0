"""Engine workers: each engine in its own process (one per GPU), the HTTP edge apart from them.

One Python process tops out near 4.3 pages/s on vLLM whatever GPU it drives: HTTP, the PDF pipeline,
vLLM's frontend (tokenising, image preprocessing, detokenising) and our post-processing share one GIL.
With `ENGINE_WORKERS=process` (the default) the server starts one worker process per GPU (`GPUS`, or
`DATA_PARALLEL_SIZE`; `auto` = every visible GPU, one CPU worker where there is none), or `ENGINES_PER_GPU`
vLLM workers per GPU, each with its share of the GPU's memory and sequences. Each worker holds one
engine, vLLM or PyTorch, with its own image preprocessing, and talks to the server over a socket pair
(`workers.wire`). In the server each worker is a `workers.client.WorkerEngine`: an ordinary engine to
admission, which balances items over workers by in-flight work, and to the supervisor, which replaces a
worker that dies. `ENGINE_WORKERS=inline` runs the engine inside the server process (tests, debugging). With
`ORCHESTRATOR=ray` the workers are Ray actors across a cluster's hosts instead (`workers.ray_cluster`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from config import Settings, usable_cpus
from engines.registry import nvml_gpu_count, nvml_gpu_memory_gib


@dataclass(frozen=True)
class WorkerSpec:
    """One engine worker: its index and the GPUs it sees (None: no GPU given, the engine's own choice)."""

    index: int
    gpus: tuple[str, ...] | None
    # Threads each torch/OpenMP operation of the worker may use (OMP_NUM_THREADS), so that workers together
    # do not oversubscribe the cores; None: the library's default (every core).
    threads: int | None = None
    # Engines on these GPUs, this one included (ENGINES_PER_GPU): each takes its share of the GPU's memory
    # and of its sequences (`share_settings`).
    shares: int = 1

    @property
    def label(self) -> str:
        where = f"gpu {','.join(self.gpus)}" if self.gpus else "cpu" if self.gpus == () else "default device"
        if self.shares > 1:
            where += f", {self.index % self.shares + 1} of {self.shares}"
        return f"w{self.index} ({where})"


def share_settings(settings: Settings, spec: WorkerSpec) -> Settings:
    """The settings of one of `spec.shares` engines on the same GPUs: GPU_MEM_UTILIZATION and a numeric
    MAX_CONCURRENCY divided between them, so that together they take what one engine would (`auto`: each
    measures its own cache in its own share of the memory)."""
    if spec.shares == 1:
        return settings
    update: dict[str, object] = {"gpu_mem_utilization": settings.gpu_mem_utilization / spec.shares}
    if isinstance(settings.max_concurrency, int):
        update["max_concurrency"] = max(1, settings.max_concurrency // spec.shares)
    return settings.model_copy(update=update)


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out: CUDA_VISIBLE_DEVICES when set, else every GPU NVML counts.

    NVML answers without initialising CUDA here, which would break vLLM's and torch's children.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(nvml_gpu_count())]  # not torch: the server never imports it


# ENGINES_PER_GPU=auto: two vLLM engines on each GPU with at least this much memory (NVML's total, GiB). On
# 80 GB H100s two made 1.66x and 1.21x one engine's pages a second (docs/BENCHMARKS.md sections 28 and 29),
# each with its own copy of the weights and activations (~18% of one engine's KV cache); smaller GPUs were not
# measured, and give each engine less room for its cache.
AUTO_SHARING_MIN_GIB = 64


def engines_per_gpu(settings: Settings, kind: str, memory_gib: float | None) -> int:
    """How many engines each GPU (each TENSOR_PARALLEL_SIZE group) runs: ENGINES_PER_GPU for vLLM, one for
    the PyTorch engine (its memory is not divided up front). `auto`: two where the GPUs have
    AUTO_SHARING_MIN_GIB (`memory_gib`, the smallest of them), one GPU a worker and room for two sequences;
    else one."""
    value = settings.engines_per_gpu
    if kind != "vllm":
        return 1
    if value != "auto":
        return value
    few = isinstance(settings.max_concurrency, int) and settings.max_concurrency < 2
    big = memory_gib is not None and memory_gib >= AUTO_SHARING_MIN_GIB
    return 2 if big and settings.tensor_parallel_size == 1 and not few else 1


def worker_plan(settings: Settings, kind: str, gpus: list[str] | None = None,
                memory_gib: float | None = None) -> list[WorkerSpec]:
    """The workers for `settings`: one per GPU (per TENSOR_PARALLEL_SIZE GPUs for vLLM; ENGINES_PER_GPU of
    them for vLLM, side by side on the same GPUs), or one CPU worker. `memory_gib`: the GPUs' memory for
    ENGINES_PER_GPU=auto (None: NVML's figure).

    Raises ValueError naming the setting when GPUS asks for GPUs that are not there.
    """
    count = settings.data_parallel_size or 1
    cores = usable_cpus()
    share = max(1, cores // count) if count > 1 else None
    cpu_workers = [WorkerSpec(i, (), share) for i in range(count)]

    def on_cpus() -> list[WorkerSpec]:
        # Each CPU worker holds its own model and torch threads: more of them than cores only costs memory.
        if count > cores:
            raise ValueError(f"DATA_PARALLEL_SIZE={count} CPU workers on {cores} usable cores: at most {cores}")
        return cpu_workers

    if kind == "torch" and settings.device == "cpu":
        return on_cpus()  # several only when DATA_PARALLEL_SIZE asks (each uses its own torch threads)
    available = visible_gpus() if gpus is None else gpus
    chosen = _chosen(settings, available, cpu=kind != "vllm")
    if not chosen:
        if kind == "vllm":
            raise ValueError("ENGINE=vllm needs a GPU, and GPUS selects none (visible: "
                             f"{', '.join(available) or 'none'})")
        return on_cpus()
    group = settings.tensor_parallel_size if kind == "vllm" else 1
    if len(chosen) % group:
        raise ValueError(f"GPUS gives {len(chosen)} GPUs ({', '.join(chosen)}), not a multiple of "
                         f"TENSOR_PARALLEL_SIZE={group}: every worker needs {group}")
    groups = len(chosen) // group
    if memory_gib is None and settings.engines_per_gpu == "auto":
        memory_gib = nvml_gpu_memory_gib()
    shares = engines_per_gpu(settings, kind, memory_gib)
    count = groups * shares
    # A vLLM worker alone on its host runs in raw vLLM's environment (OMP_NUM_THREADS unset): vLLM preprocesses
    # images with one thread per operation whatever the cores (its renderer's set_default_torch_num_threads),
    # and its engine core, a child of the worker, keeps torch's default (OMP_NUM_THREADS=1 there is the suspect
    # for one client's +46 ms a page over raw on an H100, not yet measured on and off: docs/BENCHMARKS.md
    # section 21). Several vLLM workers on one host get one thread per operation each, as vLLM gives its own
    # GPU worker processes and Ray its actors, which were the faster ones on two H200s (section 13). The
    # PyTorch engine preprocesses in its own process, one page at a time: its share of the cores. So do
    # vLLM workers that share a GPU (as measured in section 28): their engine cores merge each step's page
    # pixels into one pinned buffer on the CPU (~18 ms a page at 256 sequences, section 27), a copy torch
    # spreads over its threads (one thread against the share not measured).
    if kind != "vllm" or shares > 1:
        threads: int | None = max(1, cores // count)
    else:
        threads = 1 if count > 1 else None
    # A GPU's engines are neighbours in the list (w0, w1 on GPU 0, ...): `workers.start` starts them one after
    # another, since vLLM sizes its cache by the GPU memory it sees free.
    return [WorkerSpec(i, tuple(chosen[(i // shares) * group:(i // shares + 1) * group]), threads, shares)
            for i in range(count)]


def _chosen(settings: Settings, available: list[str], *, cpu: bool) -> list[str]:
    """GPUS is a list of ids as CUDA_VISIBLE_DEVICES writes them (`0,1`), `auto` or `none`;
    DATA_PARALLEL_SIZE takes that many workers' worth of the visible GPUs."""
    value = settings.gpus.strip().lower()
    if value == "none":
        return []
    if value == "auto":
        chosen = available
    else:
        chosen = [g.strip() for g in value.split(",") if g.strip()]
        missing = [g for g in chosen if g not in available]
        if missing:
            raise ValueError(f"GPUS={settings.gpus}: GPU {', '.join(missing)} is not visible here (visible: "
                             f"{', '.join(available) or 'none'})")
    if settings.data_parallel_size is not None and (chosen or not cpu):
        group = settings.tensor_parallel_size if settings.engine != "torch" else 1
        wanted = settings.data_parallel_size * group
        if wanted > len(chosen):
            raise ValueError(f"DATA_PARALLEL_SIZE={settings.data_parallel_size} needs {wanted} GPUs; GPUS gives "
                             f"{len(chosen)} ({', '.join(chosen) or 'none'})")
        chosen = chosen[:wanted]
    return chosen
