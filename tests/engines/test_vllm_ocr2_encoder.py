"""DeepSeek-OCR-2's encoder mask for vLLM (engines/vllm/ocr2_encoder.py), on the CPU.

The mask must say what the released encoder's does: image tokens see the image, each query sees the image and
the queries up to itself. Checked three ways: against a per-row reference spelled out from that rule, by what
flows through real attention under it, and against our own model's encoder (deepseek_ocr.Qwen2QueryEncoder),
whose agreement with the released model the GPU runs hold.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.vllm import ocr2_encoder
from engines.vllm.ocr2_encoder import mask_from_types


def reference(types: list[int]) -> torch.Tensor:
    """Allowed (True) per row, from the rule written row by row."""
    size = len(types)
    allowed = torch.zeros(size, size, dtype=torch.bool)
    queries_seen = []
    for row, kind in enumerate(types):
        if kind == 1:
            queries_seen.append(row)
        for col, other in enumerate(types):
            if kind == 0:
                allowed[row, col] = other == 0
            elif kind == 1:
                allowed[row, col] = other == 0 or col in queries_seen
    return allowed


@pytest.mark.parametrize("types", [
    [0] * 6 + [1] * 6,             # the encoder's own layout: n image tokens, then n queries
    [1, 0, 1, 0, 0, 1, 1],         # interleaved: a query's rank counts queries only
    [0, 2, 1, 1, 2, 0],            # an unknown type sees nothing and is seen by nobody
    [1, 1, 1],                     # queries alone: plain causal
])
def test_mask_matches_the_rule_row_by_row(types: list[int]) -> None:
    mask = mask_from_types(torch.tensor([types]), torch.float32, "cpu")
    assert mask.shape == (1, 1, len(types), len(types))
    assert torch.equal(mask[0, 0] == 0, reference(types))
    assert set(mask.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}


def test_each_batch_row_gets_its_own_types() -> None:
    a, b = [0, 0, 1, 1], [1, 0, 1, 0]
    mask = mask_from_types(torch.tensor([a, b]), torch.bfloat16, "cpu")
    assert mask.dtype == torch.bfloat16
    assert torch.equal(mask[0, 0] == 0, reference(a))
    assert torch.equal(mask[1, 0] == 0, reference(b))
    assert mask.min().item() == torch.finfo(torch.bfloat16).min


def test_information_flows_as_the_encoder_needs() -> None:
    """Under the mask, real attention lets a change to an image token reach every output, and a change to a
    query reach only itself and the later queries."""
    n, dim = 5, 8
    torch.manual_seed(0)
    x = torch.randn(1, 1, 2 * n, dim)
    mask = mask_from_types(torch.tensor([[0] * n + [1] * n]), torch.float32, "cpu")

    def attend(inp: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(inp, inp, inp, attn_mask=mask)[0, 0]

    base = attend(x)
    image_changed = x.clone()
    image_changed[0, 0, 1] += 1.0
    moved = (attend(image_changed) - base).abs().amax(-1) > 1e-6
    assert moved.all()

    query = n + 2
    query_changed = x.clone()
    query_changed[0, 0, query] += 1.0
    moved = (attend(query_changed) - base).abs().amax(-1) > 1e-6
    assert moved.tolist() == [False] * query + [True] * (2 * n - query)


def test_our_encoder_gives_the_same_features_under_this_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our model's encoder (its own boolean mask) against the same encoder fed `mask_from_types`: equal."""
    import deepseek_ocr as dso
    from tiny_checkpoint import tiny_config

    cfg = dso.DeepseekOCRConfig.from_dict(tiny_config(arch="ocr2"))
    torch.manual_seed(0)
    encoder = dso.Qwen2QueryEncoder(cfg).eval()
    n = 144
    sam = torch.randn(2, cfg.qwen2_hidden, 12, 12)
    with torch.no_grad():
        ours = encoder(sam)
    masks: list[torch.Tensor] = []
    original = dso.Qwen2EncoderLayer.forward

    def with_vllm_mask(self, x, rope, mask):  # noqa: ANN001, ANN202
        swapped = mask_from_types(torch.tensor([[0] * n + [1] * n] * x.shape[0]), x.dtype, x.device)
        masks.append(swapped)
        return original(self, x, rope, swapped)

    monkeypatch.setattr(dso.Qwen2EncoderLayer, "forward", with_vllm_mask)
    with torch.no_grad():
        swapped = encoder(sam)
    assert len(masks) == cfg.qwen2_layers
    torch.testing.assert_close(swapped, ours, rtol=1e-5, atol=1e-5)


def test_the_stand_in_refuses_types_of_another_shape() -> None:
    with pytest.raises(ValueError, match="token types"):
        ocr2_encoder._fast_mask(sequence_length=4, dtype=torch.float32, device="cpu", batch_size=1,
                                token_type_ids=torch.zeros(1, 5, dtype=torch.long))


def test_register_changes_nothing_when_switched_off_or_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ocr2_encoder.SWITCH, "vllm")
    assert ocr2_encoder.register() is None
    monkeypatch.delenv(ocr2_encoder.SWITCH)
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert ocr2_encoder.register() is None  # the CPU suite: no vLLM, nothing to replace
    else:  # pragma: no cover - the GPU machine
        assert ocr2_encoder.register().__name__ == "FastMaskQwen2Decoder"
