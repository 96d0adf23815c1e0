"""vLLM engine settings that reach `vllm.AsyncEngineArgs`, checked on the CPU without vLLM
(`engines.vllm.engine.engine_kwargs`); on the GPU, tests/test_gpu.py reads back what vLLM settled on."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from config import Settings
from engines.vllm.engine import engine_kwargs, offline_batched_tokens


def test_max_num_batched_tokens_setting_reaches_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_NUM_BATCHED_TOKENS", "4096")
    settings = Settings(model_path="/models/ocr")
    assert settings.max_num_batched_tokens == 4096
    kwargs = engine_kwargs(settings)
    assert kwargs["max_num_batched_tokens"] == 4096
    assert kwargs["max_num_seqs"] == settings.max_concurrency


def test_max_num_batched_tokens_default_is_vllms_offline_figure() -> None:
    """0 (the default) asks vLLM's own table; with no vLLM installed there is none, and vLLM (absent)
    would decide: None, never a made-up number."""
    kwargs = engine_kwargs(Settings(model_path="/models/ocr"))
    if importlib.util.find_spec("vllm") is None:
        assert offline_batched_tokens() is None
        assert kwargs["max_num_batched_tokens"] is None
    else:  # vLLM's own table, read here directly
        from vllm import EngineArgs
        from vllm.usage.usage_lib import UsageContext

        assert kwargs["max_num_batched_tokens"] == EngineArgs.get_batch_defaults(1)[0][UsageContext.LLM_CLASS]


@pytest.mark.parametrize("value", ["-1", "2000000", "many"])
def test_max_num_batched_tokens_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MAX_NUM_BATCHED_TOKENS", value)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Settings(model_path="/models/ocr")


def test_vllm_reads_the_shipped_moe_tables_unless_the_operator_points_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`prepare_environment` points vLLM's fused-MoE table lookup at engines/moe_configs; an operator's
    own folder wins."""
    from engines.vllm import engine as vllm_engine

    assert vllm_engine.MOE_CONFIGS.is_dir() and (vllm_engine.MOE_CONFIGS / "README.md").is_file()
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    vllm_engine.use_moe_configs()
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(vllm_engine.MOE_CONFIGS)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    vllm_engine.use_moe_configs()
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(tmp_path)
