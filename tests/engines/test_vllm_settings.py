"""vLLM engine settings that reach `vllm.AsyncEngineArgs`, checked on the CPU without vLLM
(`engines.vllm.args.engine_kwargs`); on the GPU, tests/test_gpu.py reads back what vLLM settled on."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from config import Settings
from engines.vllm.args import engine_kwargs, offline_batched_tokens


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
    from engines.vllm import args as vllm_args

    assert vllm_args.MOE_CONFIGS.is_dir() and (vllm_args.MOE_CONFIGS / "README.md").is_file()
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    vllm_args.use_moe_configs()
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(vllm_args.MOE_CONFIGS)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    vllm_args.use_moe_configs()
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(tmp_path)


@pytest.fixture(scope="module")
def real_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The released model's config.json and tokenizer (no weights)."""
    from deepseek_ocr import make_tiny

    return make_tiny(tmp_path_factory.mktemp("real-config"), vision="real", decoder="real", weights=False)


def test_kv_cache_dtype_reaches_vllm(real_config: Path) -> None:
    assert engine_kwargs(Settings(model_path=str(real_config)))["kv_cache_dtype"] == "auto"
    assert engine_kwargs(Settings(model_path=str(real_config), kv_cache_dtype="fp8"))["kv_cache_dtype"] == "fp8"


def test_kv_bytes_per_token_are_the_models(real_config: Path) -> None:
    """60 KiB a token in bfloat16 (FACTS: 10 KV heads x 128 x 12 layers, K and V), half in fp8; a tensor-parallel
    rank holds its share of the heads."""
    from engines.vllm.args import kv_bytes_per_token

    path = str(real_config)
    assert kv_bytes_per_token(Settings(model_path=path)) == 10 * 128 * 12 * 2 * 2 == 61_440
    assert kv_bytes_per_token(Settings(model_path=path, kv_cache_dtype="fp8")) == 30_720
    assert kv_bytes_per_token(Settings(model_path=path, dtype="float32")) == 122_880
    assert kv_bytes_per_token(Settings(model_path=path, tensor_parallel_size=2)) == 30_720


def test_auto_concurrency_ceiling_is_the_whole_memory_at_max_model_len(real_config: Path) -> None:
    """vLLM's max_num_seqs for MAX_CONCURRENCY=auto before it measured its cache: what 75 % of an 80 GiB GPU
    holds at MAX_MODEL_LEN tokens a sequence with nothing else in it (the measured figure is below: weights)."""
    from engines.vllm.args import auto_sequences_ceiling

    gib80 = 80 * 1024**3
    path = str(real_config)
    assert auto_sequences_ceiling(Settings(model_path=path, max_model_len=2048), gib80) == 512
    assert auto_sequences_ceiling(Settings(model_path=path, max_model_len=2048, kv_cache_dtype="fp8"), gib80) == 1024
    assert auto_sequences_ceiling(Settings(model_path=path), gib80) == 128  # MAX_MODEL_LEN 8192
    assert auto_sequences_ceiling(Settings(model_path=path, max_model_len=512, kv_cache_dtype="fp8"),
                                  1024**4) == 4096  # never past MAX_CONCURRENCY's own limit
    assert auto_sequences_ceiling(Settings(model_path=path), 1024**3) == 1  # a GPU too small: one


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("AUTO", "auto"), (" 12 ", 12), ("4096", 4096)])
def test_max_concurrency_takes_a_number_or_auto(monkeypatch: pytest.MonkeyPatch, value: str,
                                                expected: object) -> None:
    monkeypatch.setenv("MAX_CONCURRENCY", value)
    settings = Settings()
    assert settings.max_concurrency == expected
    # The figure an engine takes until it measured its own (and the PyTorch engine's): the setting, or 100.
    assert settings.sequences == (expected if isinstance(expected, int) else 100)

