"""Which engine class ENGINE names, and building one: imported by the server and by engine workers alike.

Kept apart from `engines/__init__` (which starts engines, through worker processes or Ray actors) so that the
workers, which build their engine here, do not import the code that starts them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

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
    if importlib.util.find_spec("vllm") is None:
        return False
    # NVML answers without initialising CUDA here; a CUDA init now would break vLLM's forked workers.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False
