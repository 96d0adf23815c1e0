"""SAM's relative-position attention without a bias tensor (`deepseek_ocr.fused_rel_pos_attention`, which our
model's SAM runs, and `engines.vllm.sam_attention`, which puts it into vLLM's SAM).

On the CPU: the function against the attention written out with its explicit (tokens x tokens) bias, in
float64, for global and windowed grids. Where vLLM imports (the GPU machine): vLLM 0.26's own
`RelPosAttention` and its whole SAM-B against the replacement, same weights.
"""

from __future__ import annotations

import pytest
import torch

import deepseek_ocr as dso
from engines.vllm import encoder_batch, sam_attention


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
             scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v with bias[q, (r, c)] = rel_h[q, r] + rel_w[q, c], written out."""
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(*rel_h.shape[:-1], height * width)
    return torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1) @ v


@pytest.mark.parametrize(("batch", "heads", "height", "width", "dim"),
                         [(2, 3, 8, 8, 16), (1, 2, 5, 7, 8), (3, 1, 14, 14, 12)])
def test_the_fused_form_gives_the_explicit_bias_attention(batch: int, heads: int, height: int, width: int,
                                                          dim: int) -> None:
    gen = torch.Generator().manual_seed(height * 100 + width)
    shape = (batch, heads, height * width, dim)
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3))
    rel_h = torch.randn(batch, heads, height * width, height, generator=gen, dtype=torch.float64) * 3
    rel_w = torch.randn(batch, heads, height * width, width, generator=gen, dtype=torch.float64) * 3
    got = dso.fused_rel_pos_attention(q, k, v, rel_h, rel_w, dim**-0.5)
    assert got.shape == shape
    torch.testing.assert_close(got, explicit(q, k, v, rel_h, rel_w, dim**-0.5))
    # the bias matters: without it the answer is another one
    plain = torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5, dim=-1) @ v
    assert (got - plain).abs().max() > 1e-2


def test_shapes_that_do_not_fit_the_grid_are_refused() -> None:
    q = torch.zeros(1, 1, 12, 8)
    with pytest.raises(ValueError, match="4 x 4 position grid"):
        dso.fused_rel_pos_attention(q, q, q, torch.zeros(1, 1, 12, 4), torch.zeros(1, 1, 12, 4), 1.0)


def test_the_switch_keeps_vllms_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, batched, fused in (("", True, True), ("batched", True, False), ("vllm", False, False)):
        monkeypatch.setenv(encoder_batch.SWITCH, value)
        assert (encoder_batch.enabled(), encoder_batch.fused_attention()) == (batched, fused)
    monkeypatch.setenv(encoder_batch.SWITCH, "batched")
    assert sam_attention.register() is None


def test_vllms_relpos_attention_and_the_replacement_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM 0.26's layer and ours with the same weights, float64, a global 16 x 16 grid (the table interpolated
    from 64 positions, as for a 640 px tile) and a 14 x 14 window."""
    deepencoder = pytest.importorskip("vllm.model_executor.models.deepencoder")
    monkeypatch.delenv(encoder_batch.SWITCH, raising=False)
    fused_cls = sam_attention.fused_class()
    torch.manual_seed(0)
    for size, table in ((16, (64, 64)), (14, (14, 14))):
        stock = torch.nn.Module.__new__(deepencoder.RelPosAttention)  # vLLM's own, not the registry's
        deepencoder.RelPosAttention.__init__(stock, 96, num_heads=4, use_rel_pos=True, input_size=table)
        ours = torch.nn.Module.__new__(fused_cls)
        fused_cls.__init__(ours, 96, num_heads=4, use_rel_pos=True, input_size=table)
        for module in (stock, ours):
            module.double()
        with torch.no_grad():
            for p in stock.parameters():
                p.normal_(0, 0.3)
            ours.load_state_dict(stock.state_dict())
            x = torch.randn(2, size, size, 96, dtype=torch.float64)
            torch.testing.assert_close(ours(x), stock(x))


def test_vllms_whole_sam_with_the_replacement_gives_its_own_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's SAM-B as its model builds it, once as it is and once with the replacement registered the way the
    plugin does, same weights, float64, a 256 px view (windowed blocks with padding, global blocks with the
    table interpolated): the same features."""
    deepencoder = pytest.importorskip("vllm.model_executor.models.deepencoder")
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.custom_op import op_registry_oot

    monkeypatch.delenv(encoder_batch.SWITCH, raising=False)
    monkeypatch.delitem(op_registry_oot, sam_attention.LAYER_NAME, raising=False)
    torch.manual_seed(0)
    config = VllmConfig(device_config=DeviceConfig(device="cuda" if torch.cuda.is_available() else "cpu"))
    with set_current_vllm_config(config):  # vLLM's layers read it when they are built
        stock = deepencoder.build_sam_vit_b().double().eval()
        monkeypatch.setitem(op_registry_oot, sam_attention.LAYER_NAME, sam_attention.fused_class())
        fused = deepencoder.build_sam_vit_b().double().eval()
    assert {type(b.attn).__name__ for b in fused.blocks} == {"FusedRelPosAttention"}
    assert {type(b.attn).__name__ for b in stock.blocks} == {"RelPosAttention"}
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_(0, 0.05)
        fused.load_state_dict(stock.state_dict())
        x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
        torch.testing.assert_close(fused(x), stock(x))


def test_register_puts_the_replacement_in_place_once_and_leaves_others_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(encoder_batch.SWITCH, raising=False)
    try:
        from vllm.model_executor.custom_op import op_registry_oot
    except ImportError:
        assert sam_attention.register() is None  # the CPU suite: no vLLM, nothing to replace
        return
    monkeypatch.delitem(op_registry_oot, sam_attention.LAYER_NAME, raising=False)
    first = sam_attention.register()
    assert first is not None and first.__name__ == "FusedRelPosAttention"
    assert sam_attention.register() is first
    monkeypatch.setitem(op_registry_oot, sam_attention.LAYER_NAME, type("SomeoneElses", (), {}))
    assert sam_attention.register() is None
