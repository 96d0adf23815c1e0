"""Our replacements for vLLM's pluggable layers, put in place through vLLM's own out-of-tree registry.

vLLM 0.26's `PluggableLayer.__new__` looks a layer's class name up in `op_registry_oot` when the model builds
it, and instantiates the class registered there instead (`PluggableLayer.register_oot`). The service's vLLM
plugin (`engines.vllm.modes.register`) uses this for DeepSeek-OCR-2's encoder mask
(`engines.vllm.ocr2_encoder`) and SAM's attention (`engines.vllm.sam_attention`). Imports vLLM only when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def replace_layer(module: str, layer: str, ours: str, build: Callable[[], type]) -> type | None:
    """Make vLLM build `build()` (a class named `ours`) wherever it builds `module.layer`; idempotent.

    Returns the class in place, or None where this vLLM has no such layer (or a renamed one) or another
    replacement is already registered (left alone)."""
    try:
        from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

        stock = getattr(importlib.import_module(module), layer)
    except (ImportError, AttributeError):
        return None
    if stock.__name__ != layer:
        return None
    current = op_registry_oot.get(layer)
    if current is not None:
        return current if current.__name__ == ours else None
    return PluggableLayer.register_oot(build(), name=layer)
