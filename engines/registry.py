"""Which engine class ENGINE names, and building one: imported by the server and by engine workers alike.

Kept apart from `engines/__init__` (which starts engines, through worker processes or Ray actors) so that the
workers, which build their engine here, do not import the code that starts them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
from collections.abc import Callable, Iterator

from config import Settings
from engines.base import BaseEngine


def _torch(settings: Settings) -> BaseEngine:
    from engines.torch_engine import TorchEngine

    return TorchEngine(settings)


def _vllm(settings: Settings) -> BaseEngine:
    from engines.vllm.engine import VllmEngine

    return VllmEngine(settings)


REGISTRY: dict[str, Callable[[Settings], BaseEngine]] = {"torch": _torch, "vllm": _vllm}


def engine_kind(settings: Settings) -> str:
    """The registry name ENGINE resolves to; `auto` takes vLLM when it imports and a GPU is present."""
    if settings.engine != "auto":
        return settings.engine
    return "vllm" if _vllm_usable() else "torch"


def build_engine(settings: Settings) -> BaseEngine:
    return REGISTRY[engine_kind(settings)](settings)


def _vllm_usable() -> bool:
    return importlib.util.find_spec("vllm") is not None and nvml_gpu_count() > 0


@contextlib.contextmanager
def _nvml() -> Iterator[ctypes.CDLL | None]:
    """The driver's NVML library, initialised for the block (None without a driver): torch is not imported (the
    server with engines in worker processes never loads it) and CUDA is not initialised (that would break vLLM's
    and torch's forked children)."""
    # Children (engine workers, vLLM's) that import torch check CUDA through NVML too, as they always did here.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        nvml = None
    if nvml is None or nvml.nvmlInit_v2() != 0:
        yield None
        return
    try:
        yield nvml
    finally:
        nvml.nvmlShutdown()


def _count(nvml: ctypes.CDLL) -> int:
    count = ctypes.c_uint(0)
    return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0


def nvml_gpu_count() -> int:
    """GPUs NVML counts (0 without a driver): what `torch.cuda.device_count()` answers with
    PYTORCH_NVML_BASED_CUDA_CHECK."""
    with _nvml() as nvml:
        return _count(nvml) if nvml is not None else 0


def nvml_gpu_memory_gib() -> float | None:
    """The smallest total memory of the GPUs NVML lists, in GiB (an 80 GB H100 reports 79.6); None without a
    driver or a GPU."""
    with _nvml() as nvml:
        if nvml is None:
            return None
        sizes = []
        for index in range(_count(nvml)):
            handle = ctypes.c_void_p()
            memory = (ctypes.c_ulonglong * 3)()  # nvmlMemory_t: total, free, used (bytes)
            if (nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) == 0
                    and nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == 0):
                sizes.append(memory[0] / 2**30)
        return min(sizes) if sizes else None
