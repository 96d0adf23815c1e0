"""What the vLLM engine sends and reads for several images and confidence (issue 28), on the CPU without vLLM:
the token prompt and `multi_modal_data` it builds, the engine arguments, and how it reads vLLM's outputs.
vLLM's own output objects are stood in for by plain objects of the same shape (vLLM is not installed here);
tests/test_gpu.py::TestService::test_two_images_one_prompt runs the real thing on the GPU machine."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from config import Settings
from engines.base import Confidence
from engines.vllm.args import engine_kwargs
from engines.vllm.engine import PromptBuilder, per_image_tokens, score_tokens
from process.modes import MODES


def test_limit_mm_per_prompt_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_IMAGES_PER_PROMPT", "3")
    assert engine_kwargs(Settings(model_path="/models/ocr"))["limit_mm_per_prompt"] == {"image": 3}


def test_two_images_two_placeholders_and_a_list(tiny_checkpoint: Path) -> None:
    builder = PromptBuilder.from_checkpoint(tiny_checkpoint)
    a, b = Image.new("RGB", (60, 40)), Image.new("RGB", (80, 30))
    prompt = builder.prompt("<image>\n<image>\nFree OCR.", [a, b], MODES["gundam"])
    ids = prompt["prompt_token_ids"]
    assert ids.count(builder.image_id) == 2, ids  # one id per tag: vLLM expands each to its image's run
    assert prompt["multi_modal_data"] == {"image": [a, b]}, prompt
    one = builder.prompt("<image>\nFree OCR.", a, MODES["gundam"])
    assert one["multi_modal_data"] == {"image": a}  # one image stays as vLLM's single-item form
    with pytest.raises(ValueError, match="one <image> tag per image: 2 image"):
        builder.prompt("<image>\nFree OCR.", [a, b], MODES["gundam"])


def entry(logprob: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=1, decoded_token="x")  # the fields of vllm.logprobs.Logprob


def test_sampled_token_logprobs_become_confidence() -> None:
    confidence = Confidence()
    # Two DELTA outputs; each position maps the sampled token id to its Logprob (logprobs=0: only that one).
    score_tokens(confidence, [5, 6], [{5: entry(-0.1)}, {6: entry(-2.0)}], skip=1)
    score_tokens(confidence, [7, 1], [{7: entry(-0.3)}, {1: entry(-0.05)}], skip=1)  # 1 = EOS: not counted
    assert confidence.tokens == 3 and confidence.low == 1, confidence
    assert math.isclose(confidence.mean_logprob, -0.8) and confidence.min_logprob == -2.0, confidence
    assert confidence.summary() == {"mean_logprob": -0.8, "min_logprob": -2.0, "low_share": 0.3333, "tokens": 3}
    empty = Confidence()
    score_tokens(empty, [5], None)  # no logprobs asked or given: nothing scored, no summary
    assert empty.summary() is None


def test_per_image_tokens_from_placeholders_or_runs() -> None:
    ranges = {"image": [SimpleNamespace(offset=1, length=273), SimpleNamespace(offset=280, length=903)]}
    assert per_image_tokens(SimpleNamespace(multi_modal_placeholders=ranges), [], 9) == [273, 903]
    ids = [0, 9, 9, 9, 4, 9, 9, 5]
    assert per_image_tokens(SimpleNamespace(multi_modal_placeholders=None), ids, 9) == [3, 2]
