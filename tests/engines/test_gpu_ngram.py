"""GPU test: the batched n-gram processor (engines/vllm/ngram.py) bans what vLLM's per-request one bans.

Two vLLM engines on a real-size config with random weights (LOAD_FORMAT=dummy; greedy decoding with random
weights loops, so the guard bans a lot), each in a child process (tests/data/vllm_ngram_audit.py):
1. audit: the batched processor's bans are applied, and at every step vLLM's `NGramPerReqLogitsProcessor`
   runs on a copy of the same logits with the same batch updates; every row's banned set must be equal.
2. vllm: the per-request processor alone. Its greedy outputs must equal the audit run's, token for token.
Both runs' outputs must obey the rule at every position (checked here in Python). 16 requests with mixed
sizes, windows, whitelists and the guard off, through max_num_seqs 8, so rows are refilled and condensed.
Run: `GPU_TEST_MODEL=DIR python -m pytest -m gpu tests/engines/test_gpu_ngram.py -v` (about 4 min on an H200).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.gpu import real_size_model

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "tests" / "data" / "vllm_ngram_audit.py"


def _gpu_ready() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # do not initialise CUDA in this process
    import torch

    return bool(torch.cuda.is_available())


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and vllm")]


def reference_bans(output: list[int], n: int, window: int, whitelist: set[int]) -> set[int]:
    """vLLM's rule (see tests/engines/test_vllm_ngram.py): n = 1 bans nothing."""
    if len(output) < n or n == 1:
        return set()
    prefix = output[len(output) - (n - 1) :]
    found = {output[i + n - 1] for i in range(max(0, len(output) - window), len(output) - n + 1)
             if output[i : i + n - 1] == prefix}
    return found - whitelist


def violations(output: list[int], args: dict[str, Any] | None) -> list[int]:
    """Positions where the output took a token the rule bans there."""
    if not args:
        return []
    n, window = args["ngram_size"], args.get("window_size", 100)
    whitelist = set(args.get("whitelist_token_ids") or ())
    return [t for t in range(len(output)) if output[t] in reference_bans(output[:t], n, window, whitelist)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_size_model(tmp_path_factory)


def run_engine(model: Path, impl: str, tmp: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    out, audit = tmp / f"{impl}.json", tmp / f"{impl}-audit.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HELPER.parent),
                                                         os.environ.get("PYTHONPATH", "")]),
           "NGRAM_AUDIT_OUT": str(audit)}
    proc = subprocess.run([sys.executable, str(HELPER), "--model", str(model), "--impl", impl, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{impl} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text()), (json.loads(audit.read_text()) if audit.is_file() else None)


def test_batched_bans_equal_per_request_bans_on_gpu(model_dir: Path, tmp_path: Path) -> None:
    audited, audit = run_engine(model_dir, "audit", tmp_path)
    assert audit is not None, "the audit processor never ran (no step reached apply)"
    print(f"audit: {audit}")
    assert audit["mismatched_rows"] == 0, f"batched and per-request bans differ: {audit}"
    assert audit["steps"] > 100 and audit["row_checks"] > 500, audit
    assert audit["bans"] > 0, f"no step banned anything: the check proved nothing {audit}"
    # Both ways of finding the bans ran (the audit keeps up to 4 guarded rows on the host, more on the device).
    assert 10 < audit["host_steps"] < audit["steps"] - 10, audit
    for i, (out, args) in enumerate(zip(audited["outputs"], audited["requests"], strict=True)):
        assert not violations(out, args), f"request {i} {args}: banned tokens taken at {violations(out, args)}"

    per_request, _ = run_engine(model_dir, "vllm", tmp_path)
    for i, (a, b) in enumerate(zip(audited["outputs"], per_request["outputs"], strict=True)):
        first = next((t for t, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert a == b, (f"request {i} {audited['requests'][i]}: batched and per-request greedy outputs part at "
                        f"token {first} (lengths {len(a)}, {len(b)}): {a[first:first + 8]} vs {b[first:first + 8]}")
    unguarded = [out for out, args in zip(audited["outputs"], audited["requests"], strict=True) if not args]
    looping = sum(bool(violations(out, {"ngram_size": 3, "window_size": 100})) for out in unguarded)
    print(f"unguarded outputs that repeat a 3-gram: {looping}/{len(unguarded)}")
