"""DeepSeek-OCR and DeepSeek-OCR-2 in plain PyTorch: the models, checkpoint loading, prompt building, batched
generation, `make_tiny` (random test checkpoints, written by tiny_checkpoint.py) and a one-shot CLI.

DeepSeek-OCR ("ocr") is DeepEncoder (SAM ViT-B whose net_3 map feeds CLIP-L as patch embeddings) -> a linear
projector -> a DeepSeek-V2 MoE decoder. DeepSeek-OCR-2 ("ocr2") replaces CLIP with a Qwen2-shaped encoder
over SAM tokens plus learned queries (DeepEncoder V2) and keeps the decoder; config.json's `architectures`
says which. Module names equal the released checkpoints' tensor names so `*.safetensors` load by name.
`DeepseekOCR` bundles model + tokenizer on one device and decodes a batch of requests together (left padding,
KV cache, per-row sampling) for the service's in-process engine; `PromptBuilder` makes the prompt ids of both
engines.

CLI:
    python deepseek_ocr.py make-tiny DIR [--seed N] [--vision tiny|real] [--decoder tiny|small|real]
                                         [--config-only] [--arch ocr|ocr2]
    python deepseek_ocr.py run --model DIR --image FILE [--mode gundam] [--prompt TEXT] [--json] ...

Importing this module is cheap: torch is imported, nothing is built; the image and n-gram helpers of
`process/` and transformers are imported on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

import tiny_checkpoint
from errors import PromptTooLong
from process.modes import MODES, modes_for
from process.sampling import SamplingParams
from tiny_checkpoint import random_init_, tiny_config  # noqa: F401 - re-exported for benchmarks and tests

if TYPE_CHECKING:
    from PIL import Image

    from process.image_process import ImageInputs, ModeSpec

DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
IMAGE_TAG = "<image>"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAM_KEY = tiny_checkpoint.SAM_KEY
_CLIP_KEY = tiny_checkpoint.CLIP_KEY
_QWEN2_KEY = tiny_checkpoint.QWEN2_KEY
# config.json `architectures` entry -> our arch name ("ocr" = DeepSeek-OCR, "ocr2" = DeepSeek-OCR-2).
ARCHS = {name: arch for arch, name in tiny_checkpoint.ARCHITECTURES.items()}


# --------------------------------------------------------------------------------------------- config


@dataclass
class DeepseekOCRConfig:
    """Sizes of the three parts, read from a checkpoint's config.json; defaults are the released model.

    `arch` "ocr" is DeepSeek-OCR (SAM + CLIP-L encoder); "ocr2" is DeepSeek-OCR-2, whose SAM feeds a
    Qwen2-shaped encoder with learned queries instead of CLIP (the qwen2_* sizes), with the same decoder.
    """

    arch: str = "ocr"
    # Decoder (language_config: DeepSeek-V2 without MLA).
    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Projector.
    projector_input_dim: int = 2048
    n_embed: int = 1280
    # SAM ViT-B.
    sam_image_size: int = 1024
    sam_patch_size: int = 16
    sam_width: int = 768
    sam_layers: int = 12
    sam_heads: int = 12
    sam_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    sam_window_size: int = 14
    sam_mlp_ratio: float = 4.0
    sam_out_chans: int = 256
    sam_downsample_channels: tuple[int, int] = (512, 1024)
    # CLIP-L/14.
    clip_width: int = 1024
    clip_layers: int = 24
    clip_heads: int = 16
    clip_mlp_width: int = 4096
    clip_image_size: int = 224
    clip_patch_size: int = 14
    # DeepSeek-OCR-2's Qwen2-shaped encoder (used when arch == "ocr2").
    qwen2_hidden: int = 896
    qwen2_layers: int = 24
    qwen2_heads: int = 14
    qwen2_kv_heads: int = 2
    qwen2_intermediate: int = 4864
    qwen2_rms_norm_eps: float = 1e-6
    qwen2_rope_theta: float = 1000000.0

    @classmethod
    def defaults(cls, arch: str) -> DeepseekOCRConfig:
        """The released model of `arch`."""
        if arch == "ocr":
            return cls()
        if arch == "ocr2":
            return cls(arch="ocr2", sam_downsample_channels=(512, 896), projector_input_dim=896)
        raise ValueError(f"arch must be one of {sorted(ARCHS.values())}, got {arch!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeepseekOCRConfig:
        """Build from a parsed config.json (the released layout; extra vision keys shrink the encoders)."""
        lang = raw.get("language_config") or raw  # older exports keep the language keys at top level only
        archs = raw.get("architectures") or ["DeepseekOCRForCausalLM"]
        known = [ARCHS[a] for a in archs if a in ARCHS]
        if not known:
            raise ValueError(f"config.json architectures {archs!r} names none of the supported {sorted(ARCHS)}")
        arch = known[0]
        if lang.get("use_mla") or lang.get("kv_lora_rank") or lang.get("q_lora_rank"):
            raise ValueError(f"MLA attention is not supported (use_mla={lang.get('use_mla')!r})")
        if lang.get("topk_method", "greedy") != "greedy":
            raise ValueError(f"only greedy expert routing is supported, got {lang.get('topk_method')!r}")
        proj = raw.get("projector_config", {})
        if proj.get("projector_type", "linear") != "linear":
            raise ValueError(f"only the linear projector is supported, got {proj.get('projector_type')!r}")
        vision = raw.get("vision_config", {})
        widths = vision.get("width", {})
        sam, clip, qwen2 = widths.get(_SAM_KEY, {}), widths.get(_CLIP_KEY, {}), widths.get(_QWEN2_KEY, {})
        d = cls.defaults(arch)
        hidden = lang.get("hidden_size", d.hidden_size)
        cfg = cls(
            arch=arch,
            vocab_size=lang.get("vocab_size", d.vocab_size),
            hidden_size=hidden,
            intermediate_size=lang.get("intermediate_size", d.intermediate_size),
            moe_intermediate_size=lang.get("moe_intermediate_size", d.moe_intermediate_size),
            num_hidden_layers=lang.get("num_hidden_layers", d.num_hidden_layers),
            num_attention_heads=lang.get("num_attention_heads", d.num_attention_heads),
            num_key_value_heads=lang.get("num_key_value_heads", lang.get("num_attention_heads", 10)),
            n_routed_experts=lang.get("n_routed_experts", d.n_routed_experts),
            num_experts_per_tok=lang.get("num_experts_per_tok", d.num_experts_per_tok),
            n_shared_experts=lang.get("n_shared_experts") or 0,
            first_k_dense_replace=lang.get("first_k_dense_replace", d.first_k_dense_replace),
            norm_topk_prob=bool(lang.get("norm_topk_prob", False)),
            routed_scaling_factor=float(lang.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(lang.get("rms_norm_eps", d.rms_norm_eps)),
            rope_theta=float(lang.get("rope_theta", d.rope_theta)),
            max_position_embeddings=lang.get("max_position_embeddings", d.max_position_embeddings),
            bos_token_id=lang.get("bos_token_id", d.bos_token_id),
            eos_token_id=lang.get("eos_token_id", d.eos_token_id),
            projector_input_dim=proj.get("input_dim", d.projector_input_dim),
            n_embed=proj.get("n_embed", hidden),
            sam_image_size=vision.get("image_size", d.sam_image_size),
            sam_patch_size=sam.get("patch_size", d.sam_patch_size),
            sam_width=sam.get("width", d.sam_width),
            sam_layers=sam.get("layers", d.sam_layers),
            sam_heads=sam.get("heads", d.sam_heads),
            sam_global_attn_indexes=tuple(sam.get("global_attn_indexes", d.sam_global_attn_indexes)),
            sam_window_size=sam.get("window_size", d.sam_window_size),
            # vision_config's top-level mlp_ratio (3.7362) is a leftover of another encoder: the released
            # SAM MLP is 4x wide (3072), so only a sam_vit_b-level key overrides the default.
            sam_mlp_ratio=float(sam.get("mlp_ratio", d.sam_mlp_ratio)),
            sam_out_chans=sam.get("out_chans", d.sam_out_chans),
            sam_downsample_channels=tuple(sam.get("downsample_channels", d.sam_downsample_channels)),
            clip_width=clip.get("width", d.clip_width),
            clip_layers=clip.get("layers", d.clip_layers),
            clip_heads=clip.get("heads", d.clip_heads),
            clip_mlp_width=clip.get("mlp_width", 4 * clip.get("width", d.clip_width)),
            clip_image_size=clip.get("image_size", d.clip_image_size),
            clip_patch_size=clip.get("patch_size", d.clip_patch_size),
            qwen2_hidden=qwen2.get("dim", d.qwen2_hidden),
            qwen2_layers=qwen2.get("layers", d.qwen2_layers),
            qwen2_heads=qwen2.get("heads", d.qwen2_heads),
            qwen2_kv_heads=qwen2.get("kv_heads", d.qwen2_kv_heads),
            qwen2_intermediate=qwen2.get("intermediate_size", d.qwen2_intermediate),
            qwen2_rms_norm_eps=float(qwen2.get("rms_norm_eps", d.qwen2_rms_norm_eps)),
            qwen2_rope_theta=float(qwen2.get("rope_theta", d.qwen2_rope_theta)),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DeepseekOCRConfig:
        """Read `path`/config.json."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {Path(path)} (looked for {file})")
        return cls.from_dict(json.loads(file.read_text(encoding="utf-8")))

    def validate(self) -> None:
        """Reject size combinations the network cannot be built with."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} heads not divisible by {self.num_key_value_heads} KV heads")
        if len(self.sam_downsample_channels) != 2:
            raise ValueError(f"downsample_channels needs 2 entries, got {self.sam_downsample_channels}")
        if self.n_embed != self.hidden_size:
            raise ValueError(f"projector n_embed {self.n_embed} != decoder hidden_size {self.hidden_size}")
        if self.arch == "ocr2":
            self._validate_ocr2()
            return
        if self.sam_width % self.sam_heads or self.clip_width % self.clip_heads:
            raise ValueError(f"vision widths {self.sam_width}/{self.clip_width} not divisible by their heads")
        if self.clip_width != self.sam_downsample_channels[1]:
            # SAM's net_3 map is CLIP's patch embedding, so the widths must agree.
            raise ValueError(
                f"clip width {self.clip_width} must equal SAM net_3 channels {self.sam_downsample_channels[1]}"
            )
        if self.projector_input_dim != self.clip_width + self.sam_downsample_channels[1]:
            raise ValueError(
                f"projector input_dim {self.projector_input_dim} != clip width {self.clip_width} + "
                f"SAM channels {self.sam_downsample_channels[1]}"
            )

    def _validate_ocr2(self) -> None:
        if self.sam_width % self.sam_heads:
            raise ValueError(f"SAM width {self.sam_width} not divisible by {self.sam_heads} heads")
        hidden, heads, kv = self.qwen2_hidden, self.qwen2_heads, self.qwen2_kv_heads
        if hidden % heads or heads % kv or (hidden // heads) % 2:
            raise ValueError(f"encoder hidden {hidden} / {heads} heads / {kv} KV heads cannot be built (even head dim)")
        if self.sam_downsample_channels[1] != hidden:
            # SAM's net_3 tokens are the encoder's input, so the widths must agree.
            raise ValueError(f"encoder hidden {hidden} must equal SAM net_3 channels {self.sam_downsample_channels[1]}")
        if self.projector_input_dim != hidden:
            raise ValueError(f"projector input_dim {self.projector_input_dim} != encoder hidden {hidden}")


# ------------------------------------------------------------------------------------------- vision


def _resize_grid(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased) resize of a (1, C, S, S) position grid to (1, C, size, size), in float32."""
    dtype = grid.dtype
    out = F.interpolate(grid.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.to(dtype)


def _rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for `size` queries x `size` keys along one axis: (size, size, C)."""
    span = 2 * size - 1
    if rel_pos.shape[0] != span:
        # Global blocks carry a table for 64 positions (1024 px); other view sizes interpolate it linearly.
        table = F.interpolate(rel_pos.float().t()[None], size=span, mode="linear")[0].t().to(rel_pos.dtype)
    else:
        table = rel_pos
    coords = torch.arange(size, device=rel_pos.device)
    return table[coords[:, None] - coords[None, :] + (size - 1)]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SamPatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C)


def fused_rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                            rel_w: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + rel_h[:, :, :, row(k)] + rel_w[:, :, :, col(k)]) v, without the bias tensor.

    q, k, v: (B, heads, H*W, d), tokens row by row; rel_h: (B, heads, H*W, H); rel_w: (B, heads, H*W, W).
    Returns (B, heads, H*W, d). SAM's bias rel_h[q, row(k)] + rel_w[q, col(k)] is a dot product of
    [rel_h[q], rel_w[q]] with the key's one-hot (row, column): appended to the pre-scaled queries and to the
    keys, they give scaled-dot-product attention the exact scores with no (H*W)^2 bias tensor, so the fused
    kernels run (a 1024 px global block needs no 800 MB mask). Also vLLM's SAM on the GPU
    (`engines.vllm.sam_attention`).
    """
    batch, heads, tokens, dim = q.shape
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    if height * width != tokens or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention over {tokens} tokens with q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} and a {height} x {width} position grid")
    rows = F.one_hot(torch.arange(height, device=q.device).repeat_interleave(width), height)  # (H*W, H)
    cols = F.one_hot(torch.arange(width, device=q.device).repeat(height), width)  # (H*W, W)
    positions = torch.cat([rows, cols], dim=-1).to(q.dtype).expand(batch, heads, -1, -1)
    q_wide = torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], dim=-1)
    k_wide = torch.cat([k, positions], dim=-1)
    # One head size for q, k and v, a multiple of 8: what the flash and memory-efficient kernels take.
    wide = -(-q_wide.shape[-1] // 8) * 8
    q_wide = F.pad(q_wide, (0, wide - q_wide.shape[-1]))
    k_wide = F.pad(k_wide, (0, wide - k_wide.shape[-1]))
    out = F.scaled_dot_product_attention(q_wide, k_wide, F.pad(v, (0, wide - dim)), scale=1.0)
    return out[..., :dim]


class SamAttention(nn.Module):
    """Multi-head attention with SAM's decomposed relative position bias."""

    def __init__(self, width: int, heads: int, rel_size: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        qkv = self.qkv(x).reshape(n, h * w, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, h*w, hd)
        q_grid = q.reshape(n, self.heads, h, w, self.head_dim)
        rel_h = torch.einsum("nahwc,hkc->nahwk", q_grid, _rel_pos_table(h, self.rel_pos_h))  # (.., h, w, h)
        rel_w = torch.einsum("nahwc,wkc->nahwk", q_grid, _rel_pos_table(w, self.rel_pos_w))  # (.., h, w, w)
        out = fused_rel_pos_attention(q, k, v, rel_h.reshape(n, self.heads, h * w, h),
                                      rel_w.reshape(n, self.heads, h * w, w), self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(n, h, w, c)  # (N, h, w, C)
        return self.proj(out)


class SamMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(nn.Module):
    """Pre-norm ViT block; windowed (window_size > 0) or global attention."""

    def __init__(self, width: int, heads: int, mlp: int, window_size: int, grid: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SamAttention(width, heads, window_size if window_size > 0 else grid)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SamMLP(width, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            b, h, w, c = x.shape
            ws = self.window_size
            # Zero padding after the norm, unmasked in attention: what the released encoder was trained with.
            x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
            hp, wp = x.shape[1], x.shape[2]
            x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
            x = self.attn(x)  # (B*windows, ws, ws, C)
            x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
            x = x[:, :h, :w]
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamEncoder(nn.Module):
    """SAM ViT-B image encoder + neck + the two stride-2 convs: (B, 3, S, S) -> (B, C3, S/64, S/64)."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        width, grid = cfg.sam_width, cfg.sam_image_size // cfg.sam_patch_size
        self.patch_embed = SamPatchEmbed(cfg.sam_patch_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, width))
        mlp = int(width * cfg.sam_mlp_ratio)
        self.blocks = nn.ModuleList(
            SamBlock(width, cfg.sam_heads, mlp, 0 if i in cfg.sam_global_attn_indexes else cfg.sam_window_size, grid)
            for i in range(cfg.sam_layers)
        )
        out = cfg.sam_out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(width, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )
        c2, c3 = cfg.sam_downsample_channels
        self.net_2 = nn.Conv2d(out, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # (B, S/16, S/16, C)
        pos = self.pos_embed
        if pos.shape[1] != x.shape[1]:
            pos = _resize_grid(pos.permute(0, 3, 1, 2), x.shape[1]).permute(0, 2, 3, 1)
        x = x + pos
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))  # (B, out, S/16, S/16)
        return self.net_3(self.net_2(x))  # (B, C3, S/64, S/64)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        width = cfg.clip_width
        self.class_embedding = nn.Parameter(torch.zeros(width))
        # Present in the checkpoint but unused: SAM features replace the pixel patches.
        self.patch_embedding = nn.Conv2d(
            3, width, kernel_size=cfg.clip_patch_size, stride=cfg.clip_patch_size, bias=False
        )
        self.position_embedding = nn.Embedding((cfg.clip_image_size // cfg.clip_patch_size) ** 2 + 1, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, C, g, g) -> (B, 1 + g*g, C)
        b, c, g, _ = features.shape
        patches = features.flatten(2).transpose(1, 2)  # (B, g*g, C)
        cls = self.class_embedding.expand(b, 1, c)
        table = self.position_embedding.weight  # (1 + S*S, C)
        src = math.isqrt(table.shape[0] - 1)
        if src != g:
            grid = table[1:].reshape(1, src, src, c).permute(0, 3, 1, 2)
            grid = _resize_grid(grid, g).permute(0, 2, 3, 1).reshape(g * g, c)
            table = torch.cat([table[:1], grid])
        return torch.cat([cls, patches], dim=1) + table


class ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, hd)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick-GELU


class ClipLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=1e-5)
        self.self_attn = ClipAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = ClipMLP(width, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ClipLayer(cfg.clip_width, cfg.clip_heads, cfg.clip_mlp_width) for _ in range(cfg.clip_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipEncoder(nn.Module):
    """CLIP-L fed with SAM features; returns the last hidden states (the checkpoint has no post-norm)."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.clip_width, eps=1e-5)
        self.transformer = ClipTransformer(cfg)

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:  # (B, C, g, g) -> (B, 1 + g*g, C)
        return self.transformer(self.pre_layrnorm(self.embeddings(sam_features)))


class Projector(nn.Module):
    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.layers = nn.Linear(cfg.projector_input_dim, cfg.n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ------------------------------------------------------------------------------------------ decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Per-layer key/value buffers (B, kv_heads, capacity, hd) shared by all rows of a left-padded batch."""

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0  # filled positions, the same for every row

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, extra: int, chunk: int = 256) -> None:
        """Make room for `extra` more positions, growing in chunks so a step rarely copies the cache."""
        need = self.length + extra - self.capacity
        if need <= 0:
            return
        grow = max(need, chunk)
        self.k = [F.pad(t, (0, 0, 0, grow)) for t in self.k]
        self.v = [F.pad(t, (0, 0, 0, grow)) for t in self.v]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished requests stop costing attention)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q (B, h, T, hd) over k/v (B, h, S, hd); mask (B, 1, T, S) bool, or None for plain causal."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if q.shape[2] == 1 and q.device.type == "cpu":
        # torch's CPU SDPA takes ~10 ms for one masked query (its blocked kernel); the plain product is
        # ~300x faster, and a single query row needs no memory-saving kernel.
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, h, 1, S)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class DecoderAttention(nn.Module):
    """Plain multi-head attention (the released model has MLA off) with neox-style RoPE."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = rope  # (B, 1, T, hd)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        start = cache.length
        cache.k[layer][:, :, start : start + t] = k
        cache.v[layer][:, :, start : start + t] = v
        keys = cache.k[layer][:, :, : start + t]  # (B, kvh, S, hd)
        values = cache.v[layer][:, :, : start + t]
        if self.kv_heads != self.heads:
            keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = _attend(q, keys, values, mask)  # (B, h, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Softmax-scored top-k routed experts (greedy, no group routing) plus always-on shared experts."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(
            DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = DenseMLP(cfg.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, H)
        # Routing in float32 so near-equal expert scores rank the same in bf16 and fp32 runs.
        scores = F.linear(flat.float(), self.gate.weight.float()).softmax(dim=-1)  # (N, E)
        weights, experts = scores.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.scaling
        order = experts.flatten().argsort(stable=True)  # (N*k,) slots grouped by expert
        counts = torch.bincount(experts.flatten(), minlength=len(self.experts)).tolist()
        tokens = order // self.top_k  # token of each sorted slot
        grouped = flat.new_empty(order.shape[0], shape[-1])  # (N*k, H) expert outputs, grouped by expert
        start = 0
        for e, count in enumerate(counts):
            if count:
                grouped[start : start + count] = self.experts[e](flat[tokens[start : start + count]])
                start += count
        slots = torch.empty_like(grouped)
        slots[order] = grouped  # back to (token, rank) order
        # A fixed-order weighted sum over each token's k experts (not scattered adds): a token's result
        # does not depend on which other tokens share the batch, and CPU index_add_ is slow.
        out = (slots.view(-1, self.top_k, shape[-1]).float() * weights[..., None]).sum(dim=1).to(flat.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekOCRConfig, index: int) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg)
        dense = index < cfg.first_k_dense_replace or cfg.n_routed_experts == 0
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------- DeepSeek-OCR-2 encoder

# Learned query sets of DeepEncoder V2, by the view size they serve: one query per SAM token of the view
# (a 768 px tile gives 12x12 net_3 tokens, the 1024 px global view 16x16). The names are the checkpoint's.
_QUERY_SETS = {144: "query_768", 256: "query_1024"}


def _rope_tables(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE cos/sin for positions 0..length-1: (length, head_dim) float32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class Qwen2EncoderAttention(nn.Module):
    """Qwen2 grouped-query attention (biased q/k/v, no o bias) over one view's full sequence; no cache."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        hidden = cfg.qwen2_hidden
        self.heads, self.kv_heads = cfg.qwen2_heads, cfg.qwen2_kv_heads
        self.head_dim = hidden // self.heads
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = rope  # (T, hd)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Qwen2EncoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.self_attn = Qwen2EncoderAttention(cfg)
        self.mlp = DenseMLP(cfg.qwen2_hidden, cfg.qwen2_intermediate)
        self.input_layernorm = RMSNorm(cfg.qwen2_hidden, cfg.qwen2_rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.qwen2_hidden, cfg.qwen2_rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2EncoderBody(nn.Module):
    """The Qwen2 stack without token embedding: `qwen2_model.model.model.{layers,norm}` in the checkpoint."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Qwen2EncoderLayer(cfg) for _ in range(cfg.qwen2_layers))
        self.norm = RMSNorm(cfg.qwen2_hidden, cfg.qwen2_rms_norm_eps)


class _Qwen2Holder(nn.Module):
    """One more `.model` level: the released encoder wraps a Qwen2 model object, and the names keep it."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.model = Qwen2EncoderBody(cfg)


class Qwen2QueryEncoder(nn.Module):
    """DeepEncoder V2's second stage: a Qwen2-shaped transformer over [SAM tokens, learned queries].

    The view's SAM tokens attend to each other in both directions (they are the image); each query attends
    to every image token and to the queries before it (causal), and only the query outputs are kept, so a
    view gives as many features as it has SAM tokens, read out in a learned order.
    """

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Qwen2Holder(cfg)
        for count, name in _QUERY_SETS.items():
            self.add_module(name, nn.Embedding(count, cfg.qwen2_hidden))

    def forward(self, sam: torch.Tensor) -> torch.Tensor:  # (N, C, q, q) -> (N, q*q, C)
        x = sam.flatten(2).transpose(1, 2)  # (N, n, C)
        batch, n, _ = x.shape
        if n not in _QUERY_SETS:
            raise ValueError(
                f"a view of {n} SAM tokens has no learned queries: DeepSeek-OCR-2 encodes 768 px tiles "
                f"(144 tokens) and the 1024 px global view (256 tokens)"
            )
        queries = getattr(self, _QUERY_SETS[n]).weight.to(x.dtype)  # (n, C)
        x = torch.cat([x, queries.expand(batch, n, -1)], dim=1)  # (N, 2n, C)
        cfg, t = self.config, 2 * n
        cos, sin = _rope_tables(t, cfg.qwen2_hidden // cfg.qwen2_heads, cfg.qwen2_rope_theta, x.device)
        rope = (cos.to(x.dtype), sin.to(x.dtype))
        idx = torch.arange(t, device=x.device)
        mask = (idx[None, :] < n) | (idx[None, :] <= idx[:, None])  # (2n, 2n): image keys always, queries causal
        body = self.model.model
        for layer in body.layers:
            x = layer(x, rope, mask)
        return body.norm(x)[:, n:]  # (N, n, C): the query outputs


# -------------------------------------------------------------------------------------------- model


class DeepseekOCRModel(nn.Module):
    """Everything under the checkpoint's `model.` prefix: encoders, projector, separators, decoder body."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.config = cfg
        self.sam_model = SamEncoder(cfg)
        if cfg.arch == "ocr2":
            self.qwen2_model = Qwen2QueryEncoder(cfg)
        else:
            self.vision_model = ClipEncoder(cfg)
        self.projector = Projector(cfg)
        if cfg.arch != "ocr2":  # v2 has no row-end token
            self.image_newline = nn.Parameter(torch.zeros(cfg.n_embed))
        self.view_seperator = nn.Parameter(torch.zeros(cfg.n_embed))  # sic: the checkpoint's spelling
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def view_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected features of square views: (N, 3, S, S) -> (N, q, q, n_embed), q = ceil(S / 64)."""
        sam = self.sam_model(pixels)  # (N, C3, q, q)
        clip = self.vision_model(sam)  # (N, 1 + q*q, C)
        n, _, q, _ = sam.shape
        feats = torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)  # (N, q*q, Cclip + C3)
        return self.projector(feats).view(n, q, q, -1)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:  # (R, W, C) -> (R * (W + 1), C)
        newline = self.image_newline.expand(grid.shape[0], 1, -1)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    def query_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """DeepSeek-OCR-2 features of square views: (N, 3, S, S) -> (N, (S/64)^2, n_embed)."""
        return self.projector(self.qwen2_model(self.sam_model(pixels)))

    def _encode_image_v2(self, image: ImageInputs) -> torch.Tensor:
        dtype, device = self.view_seperator.dtype, self.view_seperator.device
        parts = []
        if image.tiles is not None:
            tw, th = image.grid
            if image.tiles.shape[0] != tw * th:
                raise ValueError(f"{image.tiles.shape[0]} tiles do not fill a {tw}x{th} grid")
            # Tile after tile (row-major), each tile's query outputs in their own order: no 2D re-layout.
            parts.append(self.query_features(image.tiles.to(device=device, dtype=dtype)).flatten(0, 1))
        parts.append(self.query_features(image.global_view[None].to(device=device, dtype=dtype))[0])
        parts.append(self.view_seperator[None])
        return torch.cat(parts)

    def encode_image(self, image: ImageInputs) -> torch.Tensor:
        """Embeddings for one image's `<image>` positions: local grid, global view, separator: (N, C)."""
        if self.config.arch == "ocr2":
            return self._encode_image_v2(image)
        dtype, device = self.view_seperator.dtype, self.view_seperator.device
        parts = []
        if image.tiles is not None:
            tw, th = image.grid
            if image.tiles.shape[0] != tw * th:
                raise ValueError(f"{image.tiles.shape[0]} tiles do not fill a {tw}x{th} grid")
            local = self.view_features(image.tiles.to(device=device, dtype=dtype))  # (th*tw, q, q, C)
            q, c = local.shape[1], local.shape[-1]
            # Tiles come row by row; lay their feature grids side by side into one (th*q, tw*q) map.
            local = local.view(th, tw, q, q, c).permute(0, 2, 1, 3, 4).reshape(th * q, tw * q, c)
            parts.append(self._with_newlines(local))
        glob = self.view_features(image.global_view[None].to(device=device, dtype=dtype))[0]  # (qb, qb, C)
        parts.append(self._with_newlines(glob))
        parts.append(self.view_seperator[None])
        return torch.cat(parts)


class DeepseekOCRForCausalLM(nn.Module):
    """The full checkpoint: `model.*` plus the untied `lm_head`."""

    def __init__(self, cfg: DeepseekOCRConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeepseekOCRModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (length, hd) in float32, cached per device and grown on demand."""
        key = (self.lm_head.weight.device, self.lm_head.weight.dtype)
        cached = self._rope.get(key)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, self.config.max_position_embeddings)
            hd = self.config.head_dim
            inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), inv)
            emb = torch.cat([freqs, freqs], dim=-1).to(key[0])  # (size, hd)
            cached = (emb.cos(), emb.sin())
            self._rope[key] = cached
        return cached

    def decode(
        self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the decoder on new positions and return float32 logits of the last one: (B, V).

        embeds (B, T, H); positions (B, T) RoPE ids; mask (B, 1, T, cache.length + T) bool, True = attend.
        Writes the new keys/values at cache.length and advances it.
        """
        cos, sin = self.rope_tables(int(positions.max()) + 1)
        rope = (cos[positions][:, None].to(embeds.dtype), sin[positions][:, None].to(embeds.dtype))
        cache.reserve(embeds.shape[1])
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, cache, i, mask)
        cache.length += embeds.shape[1]
        return self.lm_head(self.model.norm(x[:, -1])).float()


# ----------------------------------------------------------------------------------------- weights


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match the model built from its config.json."""


def _describe(items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _checkpoint_shapes(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in checkpoint directory {path}")
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in found:
                    raise CheckpointError(f"tensor {name} appears in both {found[name][0].name} and {file.name}")
                found[name] = (file, tuple(f.get_slice(name).get_shape()))
    return found


def check_checkpoint(model: nn.Module, path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Compare the checkpoint's tensor names and shapes with `model`; raise CheckpointError naming each gap."""
    found = _checkpoint_shapes(path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = [f"{n} (expected shape {list(s)})" for n, s in sorted(expected.items()) if n not in found]
    unexpected = [f"{n} (shape {list(found[n][1])})" for n in sorted(found) if n not in expected]
    wrong = [
        f"{n}: checkpoint shape {list(found[n][1])}, model expects {list(s)}"
        for n, s in sorted(expected.items())
        if n in found and found[n][1] != s
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped tensors: {_describe(wrong)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + " | ".join(problems))
    return found


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DeepseekOCRForCausalLM:
    """Build the model from `path`/config.json and load its safetensors by name, strictly."""
    from safetensors import safe_open

    path = Path(path)
    cfg = DeepseekOCRConfig.from_pretrained(path)
    with torch.device("meta"):
        model = DeepseekOCRForCausalLM(cfg)
    found = check_checkpoint(model, path)
    state: dict[str, torch.Tensor] = {}
    for file in sorted({f for f, _ in found.values()}):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------- runtime


@dataclass
class GenerationRequest:
    input_ids: list[int]  # bos + text with each image's <image> ids in place of its tag
    images: ImageInputs | list[ImageInputs] | None  # a list where the prompt has several images, in tag order
    image_tokens: int  # every image's together
    sampling: SamplingParams
    cancelled: threading.Event = field(default_factory=threading.Event)  # checked before every decode step


@dataclass
class TokenEvent:
    index: int  # position of the request in the batch passed to stream()
    token_id: int  # -1 on an "abort" event (no token was produced)
    text: str  # newly decoded text; "" while a multi-byte character is incomplete
    finish_reason: str | None  # None while running; "stop" (EOS), "length", "abort" (cancelled)
    # log p(token) under the model's distribution before the n-gram guard (vLLM's raw_logprobs); 0.0 on "abort"
    logprob: float = 0.0


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # includes the EOS id when finish_reason is "stop" (its text is not in `text`)
    finish_reason: str
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, UTF-8 safe: a character split over several byte-level tokens
    is held back ("" deltas) until its last byte arrives. Only a short window of ids is re-decoded per
    token, so a long generation does not decode its whole text at every step."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were already emitted; they give the window its context
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one id and return the text it completes (possibly "")."""
        self.ids.append(token_id)
        seen = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if len(full) > len(seen) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full[len(seen) :]
        return ""

    def flush(self) -> str:
        """Everything still held back, even an incomplete character (the text ends here)."""
        seen = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full[len(seen) :]


@dataclass
class _Row:
    """Decoding state of one request."""

    index: int
    request: GenerationRequest
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # includes EOS; the detokenizer never sees it


def _top_p_sample(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> int:
    probs = (logits / sampling.temperature).softmax(dim=-1)  # (V,)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Drop a token when the mass before it already reaches top_p; the most likely one always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        drop[0] = False  # explicitly: a top_p under float32's range (1e-111) compares as 0.0 >= 0.0
        sorted_probs[drop] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class _DecodeBatch:
    """One batch of requests decoded together; `start()` prefills, each `step()` decodes one token per row."""

    def __init__(self, ocr: DeepseekOCR, requests: Sequence[GenerationRequest]) -> None:
        self.ocr = ocr
        self.rows = [
            _Row(i, r, ocr._generator(r.sampling), IncrementalDetokenizer(ocr.tokenizer))
            for i, r in enumerate(requests)
        ]
        self.active: list[_Row] = []
        self.cache: KVCache | None = None
        self.key_valid = torch.empty(0)  # (B, capacity) bool: False at left padding
        self.next_pos = torch.empty(0)  # (B,) RoPE position of the next token
        self.last = torch.empty(0)  # (B,) last sampled token

    @property
    def done(self) -> bool:
        return not self.active

    @staticmethod
    def _abort_cancelled(rows: list[_Row]) -> tuple[list[int], list[TokenEvent]]:
        """Positions in `rows` to keep, and an "abort" event for each cancelled row."""
        keep, events = [], []
        for i, row in enumerate(rows):
            if row.request.cancelled.is_set():
                events.append(TokenEvent(row.index, -1, row.detok.flush(), "abort", 0.0))
            else:
                keep.append(i)
        return keep, events

    @torch.inference_mode()
    def start(self) -> list[TokenEvent]:
        keep, events = self._abort_cancelled(self.rows)
        rows = [self.rows[i] for i in keep]
        if not rows:
            return events
        model, device = self.ocr.model, self.ocr.device
        embeds = [self.ocr._prompt_embeddings(row.request) for row in rows]  # each (P_i, H)
        width = max(e.shape[0] for e in embeds)
        x = torch.zeros(len(rows), width, embeds[0].shape[1], dtype=self.ocr.dtype, device=device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for b, e in enumerate(embeds):  # left padding: every row's last prompt token sits at column width-1
            x[b, width - e.shape[0] :] = e
            valid[b, width - e.shape[0] :] = True
        positions = (valid.cumsum(dim=1) - 1).clamp(min=0)  # (B, L): padding does not shift positions
        mask = None  # no padding: plain causal, the fastest kernel
        if not bool(valid.all()):
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            # A padding query may see only itself: a fully masked row would give NaN, and NaN keys poison
            # the real queries through 0 * NaN.
            eye = torch.eye(width, dtype=torch.bool, device=device)
            mask = (causal & (valid[:, None, :] | eye))[:, None]  # (B, 1, L, L)
        cfg = model.config
        self.cache = KVCache(
            cfg.num_hidden_layers, len(rows), cfg.num_key_value_heads, cfg.head_dim, width + 64, self.ocr.dtype, device
        )
        logits = model.decode(x, positions, self.cache, mask)
        self.key_valid = F.pad(valid, (0, self.cache.capacity - width))
        self.next_pos = valid.sum(dim=1)
        self.active = rows
        return events + self._emit(logits)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        keep, events = self._abort_cancelled(self.active)
        if len(keep) < len(self.active):
            self._keep(keep)
        if not self.active:
            return events
        cache = self.cache
        cache.reserve(1)
        if self.key_valid.shape[1] < cache.capacity:
            self.key_valid = F.pad(self.key_valid, (0, cache.capacity - self.key_valid.shape[1]))
        self.key_valid[:, cache.length] = True
        mask = self.key_valid[:, None, None, : cache.length + 1]  # (B, 1, 1, S)
        x = self.ocr.model.model.embed_tokens(self.last[:, None])  # (B, 1, H)
        logits = self.ocr.model.decode(x, self.next_pos[:, None], cache, mask)
        self.next_pos = self.next_pos + 1
        return events + self._emit(logits)

    def _emit(self, logits: torch.Tensor) -> list[TokenEvent]:
        """Sample one token per active row, turn them into events and drop the rows that finished."""
        # The sampled tokens' log-probabilities under the distribution before the guard (vLLM's raw_logprobs):
        # logit - logsumexp, with no (B, V) output. The guard bans in place, so the norm is taken first; a sampled
        # token was never banned, so its logit after the guard is still the raw one.
        norm = torch.logsumexp(logits.float(), dim=-1)  # (B,)
        tokens = self.ocr._sample(logits, self.active)
        picked = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].float()  # (B,)
        logprobs = (picked - norm).tolist()
        ocr, events, keep = self.ocr, [], []
        for i, (row, token) in enumerate(zip(self.active, tokens, strict=True)):
            row.token_ids.append(token)
            reason = None
            if token == ocr.eos_token_id:
                reason, text = "stop", row.detok.flush()
            else:
                text = row.detok.add(token)
                prompt = len(row.request.input_ids)
                if (
                    len(row.token_ids) >= row.request.sampling.max_tokens
                    or prompt + len(row.token_ids) >= ocr.max_model_len
                ):
                    reason = "length"
                    text += row.detok.flush()
            events.append(TokenEvent(row.index, token, text, reason, logprobs[i]))
            if reason is None:
                keep.append(i)
        self.last = torch.tensor(tokens, device=ocr.device)
        if len(keep) < len(self.active):
            self._keep(keep)
        return events

    def _keep(self, keep: list[int]) -> None:
        self.active = [self.active[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.ocr.device)
        self.cache.select(index)
        self.key_valid = self.key_valid.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)
        self.last = self.last.index_select(0, index)


class PromptBuilder:
    """Prompt token ids for both engines: bos + text, each `<image>` tag replaced by its image's placeholder ids.

    The PyTorch engine asks for the full image-token count; vLLM expands one placeholder itself, so its
    engine asks for `token_ids(prompt, 1)`. `whitelist` holds the ids the n-gram guard never bans.
    """

    def __init__(self, tokenizer: Any) -> None:
        from process.ngram_norepeat import NoRepeatNGramProcessor

        self.tokenizer = tokenizer
        self.bos_id: int = _token_id(tokenizer, tokenizer.bos_token, "bos")
        self.eos_id: int = _token_id(tokenizer, tokenizer.eos_token, "eos")
        self.image_id: int = _token_id(tokenizer, IMAGE_TAG, "image")
        self.whitelist: list[int] = sorted(NoRepeatNGramProcessor.from_tokenizer(tokenizer).whitelist)

    def encode(self, text: str) -> list[int]:
        """Plain text ids (no bos; tags like `<|grounding|>` are single special ids)."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def token_ids(self, prompt: str, image_tokens: int | Sequence[int] | None) -> list[int]:
        """bos + `prompt` with each image's ids at its `<image>` tag: an int for a prompt of one image, one
        count per tag (in order) for several; None = a text-only prompt."""
        tags = prompt.count(IMAGE_TAG)
        if image_tokens is None:
            if tags:
                raise ValueError(f"prompt has {tags} {IMAGE_TAG} tag(s) but no image was given")
            return [self.bos_id, *self.encode(prompt)]
        single = isinstance(image_tokens, int)
        counts = [image_tokens] if single else list(image_tokens)  # type: ignore[arg-type]
        for n in counts:
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"image_tokens must be an integer >= 1 (or None for no image), got {image_tokens!r}")
        if single and tags != 1:
            raise ValueError(f"prompt must contain exactly one {IMAGE_TAG} tag when an image is given, got {tags}")
        if tags != len(counts):
            raise ValueError(f"prompt must hold one {IMAGE_TAG} tag per image: {len(counts)} image(s), {tags} tag(s)")
        texts = prompt.split(IMAGE_TAG)
        ids = [self.bos_id, *self.encode(texts[0])]
        for n, text in zip(counts, texts[1:], strict=True):
            ids += [self.image_id] * n + self.encode(text)
        return ids


class DeepseekOCR:
    """Model + tokenizer on one device: what engines and the CLI call."""

    def __init__(
        self,
        config: DeepseekOCRConfig,
        model: DeepseekOCRForCausalLM,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int = 8192,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.prompts = PromptBuilder(tokenizer)
        self.eos_token_id: int = _token_id(tokenizer, tokenizer.eos_token, "eos")
        self.bos_token_id: int = self.prompts.bos_id
        self.image_token_id: int = self.prompts.image_id
        self._ngram: Any = None

    @property
    def arch(self) -> str:
        """The architecture: "ocr" (DeepSeek-OCR) or "ocr2" (DeepSeek-OCR-2), from config.json `architectures`."""
        return self.config.arch

    @property
    def modes(self) -> dict[str, ModeSpec]:
        """The resolution modes this model serves."""
        return modes_for(self.config.arch)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_model_len: int = 8192,
    ) -> DeepseekOCR:
        """Load config.json, the safetensors weights and the fast tokenizer of a checkpoint directory."""
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len!r}")
        device = torch.device(device)
        model = load_model(path, device, dtype)
        return cls(model.config, model, load_tokenizer(path), device, dtype, max_model_len)

    # -- prompts

    def prepare(
        self,
        prompt: str,
        image: Image.Image | Sequence[Image.Image] | None,
        *,
        base_size: int | None = None,
        image_size: int | None = None,
        crop: bool | None = None,
        min_crops: int = 2,
        max_crops: int = 6,
        sampling: SamplingParams | None = None,
    ) -> GenerationRequest:
        """Tokenise `prompt` with each image's placeholder ids at its `<image>` tag (one tag per image, in order;
        a list of images for several, each preprocessed in the same mode).

        base_size / image_size / crop left None take the model's default mode (gundam for both archs);
        DeepSeek-OCR-2 serves only its one mode (1024 / 768 / crop).
        """
        sampling = sampling or SamplingParams()
        sampling.check()
        images: ImageInputs | list[ImageInputs] | None = None
        if image is None:
            ids = self.prompts.token_ids(prompt, None)
            total = 0
        else:
            several = isinstance(image, (list, tuple))
            pictures = list(image) if several else [image]
            if prompt.count(IMAGE_TAG) != len(pictures) or not pictures:
                self.prompts.token_ids(prompt, [1] * len(pictures) if several else 1)  # the tag error, before pixels
            inputs = [self._preprocess(p, base_size, image_size, crop, min_crops, max_crops) for p in pictures]
            ids = self.prompts.token_ids(prompt, [i.image_tokens for i in inputs])
            images = inputs if several else inputs[0]
            total = sum(i.image_tokens for i in inputs)
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(
                f"prompt is {len(ids)} tokens, which leaves no room under max_model_len {self.max_model_len}"
            )
        return GenerationRequest(ids, images, total, sampling)

    def _preprocess(
        self,
        image: Image.Image,
        base_size: int | None,
        image_size: int | None,
        crop: bool | None,
        min_crops: int,
        max_crops: int,
    ) -> ImageInputs:
        from process.image_process import DEFAULT_MODE, preprocess, preprocess_v2

        default = self.modes[DEFAULT_MODE]
        base_size = default.base_size if base_size is None else base_size
        image_size = default.image_size if image_size is None else image_size
        crop = default.crop if crop is None else crop
        if self.arch == "ocr2":
            allowed = [(m.base_size, m.image_size, m.crop) for m in self.modes.values()]
            if (base_size, image_size, crop) not in allowed:
                raise ValueError(
                    f"DeepSeek-OCR-2 serves base_size/image_size/crop {allowed}, got {(base_size, image_size, crop)}"
                )
            return preprocess_v2(image, base_size, image_size, crop, min_crops, max_crops)
        return preprocess(image, base_size, image_size, crop, min_crops, max_crops)

    def _check_request(self, request: GenerationRequest) -> None:
        request.sampling.check()
        n = len(request.input_ids)
        if n >= self.max_model_len:
            raise PromptTooLong(f"prompt is {n} tokens; it must be 1 .. {self.max_model_len - 1} (max_model_len)")
        if n == 0:
            raise ValueError(f"prompt is {n} tokens; it must be 1 .. {self.max_model_len - 1} (max_model_len)")
        placeholders = sum(1 for t in request.input_ids if t == self.image_token_id)
        if placeholders != request.image_tokens:
            raise ValueError(
                f"prompt holds {placeholders} image placeholder ids but image_tokens is {request.image_tokens}"
            )
        if (request.images is None) != (request.image_tokens == 0):
            raise ValueError(
                f"image_tokens is {request.image_tokens} but images is "
                f"{'missing' if request.images is None else 'given'}"
            )
        made = sum(i.image_tokens for i in _image_list(request.images))
        if request.images is not None and made != request.image_tokens:
            raise ValueError(f"images produce {made} tokens, request says {request.image_tokens}")

    def _prompt_embeddings(self, request: GenerationRequest) -> torch.Tensor:
        ids = torch.tensor(request.input_ids, device=self.device)
        x = self.model.model.embed_tokens(ids)  # (P, H)
        if request.images is not None:
            # Each image's run of placeholders in tag order: its embeddings concatenated in the same order.
            feats = torch.cat([self.model.model.encode_image(i) for i in _image_list(request.images)])  # (N, H)
            slots = ids == self.image_token_id
            if feats.shape[0] != int(slots.sum()):
                raise ValueError(
                    f"vision encoder gave {feats.shape[0]} embeddings for {int(slots.sum())} image placeholders"
                )
            x[slots] = feats.to(x.dtype)
        return x

    # -- decoding

    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[list[TokenEvent]]:
        """Decode all requests in one batch; yields the events of each decode step."""
        requests = list(requests)
        for request in requests:
            self._check_request(request)  # eagerly, so a bad request fails before any work
        return self._stream(requests)

    def _stream(self, requests: list[GenerationRequest]) -> Iterator[list[TokenEvent]]:
        if not requests:
            return
        batch = _DecodeBatch(self, requests)
        # start()/step() each run under inference_mode themselves: a context held across `yield` would
        # leak into the consumer, which may resume this generator from another thread.
        events = batch.start()
        while True:
            if events:
                yield events
            if batch.done:
                return
            events = batch.step()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Run stream() to the end and collect one output per request."""
        requests = list(requests)
        texts: list[list[str]] = [[] for _ in requests]
        ids: list[list[int]] = [[] for _ in requests]
        reasons: list[str] = ["abort"] * len(requests)
        for events in self.stream(requests):
            for ev in events:
                texts[ev.index].append(ev.text)
                if ev.token_id >= 0:
                    ids[ev.index].append(ev.token_id)
                if ev.finish_reason is not None:
                    reasons[ev.index] = ev.finish_reason
        return [
            GenerationOutput("".join(t), i, reason, len(r.input_ids), r.image_tokens, len(i))
            for t, i, reason, r in zip(texts, ids, reasons, requests, strict=True)
        ]

    def _generator(self, sampling: SamplingParams) -> torch.Generator | None:
        if sampling.temperature == 0:
            return None
        gen = torch.Generator(device=self.device)
        if sampling.seed is None:
            gen.seed()
        else:
            gen.manual_seed(sampling.seed)
        return gen

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row (B, V) -> B ids: n-gram guard, then greedy or temperature/top-p sampling."""
        sizes = [row.request.sampling.ngram_size for row in rows]
        if any(sizes):
            if self._ngram is None:
                from process.ngram_norepeat import NoRepeatNGramProcessor

                self._ngram = NoRepeatNGramProcessor.from_tokenizer(self.tokenizer)
            windows = [row.request.sampling.ngram_window for row in rows]
            logits = self._ngram(logits, [row.token_ids for row in rows], sizes, windows)
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.request.sampling.temperature > 0:
                tokens[i] = _top_p_sample(logits[i], row.request.sampling, row.generator)
        return tokens


def _image_list(images: ImageInputs | list[ImageInputs] | None) -> list[ImageInputs]:
    if images is None:
        return []
    return images if isinstance(images, list) else [images]


def image_token_counts(request: GenerationRequest) -> list[int]:
    """Image tokens of each image of a prepared request, in prompt order."""
    return [i.image_tokens for i in _image_list(request.images)]


def _token_id(tokenizer: Any, token: str | None, what: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no {what} token ({token!r})")
    return int(token_id)


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer.json as a fast tokenizer, whatever class tokenizer_config.json names.

    The released checkpoint names LlamaTokenizerFast; transformers 5 would rebuild that class's own
    pre-tokenizer and lose the byte-level spaces, so the generic fast class is forced.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in checkpoint directory {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


# ------------------------------------------------------------------------------------- tiny checkpoints


def make_tiny(
    out_dir: str | Path,
    seed: int = 0,
    vision: str = "tiny",
    decoder: str = "tiny",
    weights: bool = True,
    arch: str = "ocr",
) -> Path:
    """Write a random checkpoint in the released layout of `arch` ("ocr" or "ocr2"): config.json,
    model.safetensors (unless weights=False) and the tokenizer files with the released special-token ids."""
    raw = tiny_checkpoint.tiny_config(vision, decoder, arch)
    model = None
    if weights:
        with torch.device("meta"):
            model = DeepseekOCRForCausalLM(DeepseekOCRConfig.from_dict(raw))
        # bf16 like the released file; to_empty skips a throwaway default init of every weight.
        model = tiny_checkpoint.random_init_(model.to(torch.bfloat16).to_empty(device="cpu"), seed)
    return tiny_checkpoint.write_checkpoint(out_dir, raw, model)


# --------------------------------------------------------------------------------------------- CLI


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    out = make_tiny(
        args.dir,
        seed=args.seed,
        vision=args.vision,
        decoder=args.decoder,
        weights=not args.config_only,
        arch=args.arch,
    )
    print(out)
    return 0


@contextlib.contextmanager
def _stage(what: str, started: float, every_s: float = 15.0) -> Iterator[None]:
    """`run`'s progress on stderr (stdout keeps only the answer): the stage, a line every `every_s` while it
    lasts (a real model on a CPU takes minutes and would otherwise look hung), and its end; seconds since start."""
    print(f"[{time.perf_counter() - started:6.1f}s] {what} ...", file=sys.stderr, flush=True)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            print(f"[{time.perf_counter() - started:6.1f}s] still {what.split(' ', 1)[0]}", file=sys.stderr, flush=True)

    threading.Thread(target=tick, daemon=True).start()
    try:
        yield
    finally:
        done.set()
    print(f"[{time.perf_counter() - started:6.1f}s] {what.split(' ', 1)[0]}: done", file=sys.stderr, flush=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from PIL import Image, ImageOps

    with Image.open(args.image) as img:
        image = ImageOps.exif_transpose(img).convert("RGB")
    started = time.perf_counter()
    with _stage(f"loading {args.model} ({args.device}, {args.dtype})", started):
        ocr = DeepseekOCR.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.mode not in ocr.modes:
        print(f"mode {args.mode!r} is not served by this {ocr.arch} model; modes: {list(ocr.modes)}", file=sys.stderr)
        return 2
    spec = ocr.modes[args.mode]
    base_size, image_size, crop = spec.base_size, spec.image_size, spec.crop
    sampling = SamplingParams(max_tokens=args.max_tokens, ngram_size=args.ngram_size, ngram_window=args.ngram_window)
    request = ocr.prepare(args.prompt, image, base_size=base_size, image_size=image_size, crop=crop, sampling=sampling)
    with _stage(f"generating (mode {args.mode}, up to {args.max_tokens} tokens)", started):
        out = ocr.generate([request])[0]
    if args.json:
        print(
            json.dumps(
                {
                    "text": out.text,
                    "finish_reason": out.finish_reason,
                    "mode": args.mode,
                    "usage": {
                        "prompt_tokens": out.prompt_tokens,
                        "image_tokens": out.image_tokens,
                        "completion_tokens": out.completion_tokens,
                    },
                },
                ensure_ascii=False,
            )
        )
    else:
        print(out.text)
        print(
            f"[{out.finish_reason}; {out.prompt_tokens} prompt tokens ({out.image_tokens} image), "
            f"{out.completion_tokens} generated, {time.perf_counter() - started:.2f}s]",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek_ocr.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a random checkpoint in the released layout")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--vision", choices=["tiny", "real"], default="tiny")
    tiny.add_argument("--decoder", choices=["tiny", "small", "real"], default="tiny")
    tiny.add_argument("--config-only", action="store_true", help="no model.safetensors (vLLM load_format=dummy)")
    tiny.add_argument("--arch", choices=["ocr", "ocr2"], default="ocr", help="DeepSeek-OCR or DeepSeek-OCR-2 layout")
    tiny.set_defaults(func=_cmd_make_tiny)

    run = sub.add_parser("run", help="OCR one image")
    run.add_argument("--model", required=True, help="checkpoint directory")
    run.add_argument("--image", required=True)
    run.add_argument("--mode", choices=sorted({*MODES, *modes_for("ocr2")}), default="gundam")
    run.add_argument("--prompt", default=DEFAULT_PROMPT)
    run.add_argument("--max-tokens", type=int, default=8192)
    run.add_argument("--ngram-size", type=int, default=30, help="no-repeat n-gram size, 0 = off")
    run.add_argument("--ngram-window", type=int, default=90)
    run.add_argument("--device", default="cpu")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.set_defaults(func=_cmd_run)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
