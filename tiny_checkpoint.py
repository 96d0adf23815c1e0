"""Random test checkpoints in the released DeepSeek-OCR / DeepSeek-OCR-2 layouts, without the model code.

Tests, the GPU kit and the demo need a checkpoint directory that looks like the released one (config.json,
model.safetensors, tokenizer files with the real special-token ids) but is small and random. This module
writes the config dicts (tiny or real sizes), a byte-level BPE tokenizer trained on a few lines, and the
safetensors file of whatever model it is handed. It never imports `deepseek_ocr` (which imports this
module): `deepseek_ocr.make_tiny` builds the network and passes it here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from process.modes import ARCHITECTURES

SAM_KEY = "sam_vit_b"
CLIP_KEY = "clip-l-14-224"
# vision_config key of DeepSeek-OCR-2's Qwen2-shaped encoder (vLLM hard-codes its sizes and ignores the key).
QWEN2_KEY = "qwen2-0-5b"


# The released config.json (minus auto_map, which names remote code nobody needs).
_LANGUAGE_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_size": 1280,
    "intermediate_size": 6848,
    "kv_lora_rank": None,
    "lm_head": True,
    "max_position_embeddings": 8192,
    "moe_intermediate_size": 896,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_attention_heads": 10,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 12,
    "num_key_value_heads": 10,
    "q_lora_rank": None,
    "qk_nope_head_dim": 0,
    "qk_rope_head_dim": 0,
    "rm_head": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_mla": False,
    "v_head_dim": 0,
    "vocab_size": 129280,
}
_REAL_SAM = {
    "downsample_channels": [512, 1024],
    "global_attn_indexes": [2, 5, 8, 11],
    "heads": 12,
    "layers": 12,
    "width": 768,
}
_REAL_CLIP = {"heads": 16, "image_size": 224, "layers": 24, "patch_size": 14, "width": 1024}
# Small encoders that keep patch 16, the 64x64 pos_embed grid (1024 px), window 14 and both stride-2
# convs, so every view gives exactly the real model's number of image tokens.
_TINY_SAM = {
    "downsample_channels": [64, 64],
    "global_attn_indexes": [1],
    "heads": 2,
    "layers": 2,
    "width": 32,
    "out_chans": 32,
    "window_size": 14,
    "mlp_ratio": 2.0,
}
_TINY_CLIP = {"heads": 4, "image_size": 224, "layers": 2, "patch_size": 14, "width": 64, "mlp_width": 128}
_TINY_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 2,
}
_SMALL_DECODER = {"num_hidden_layers": 2}


# DeepSeek-OCR-2 (FACTS section 8): SAM's net_3 gives 896 channels, the width of its Qwen2-shaped encoder.
_REAL_SAM_V2 = {**_REAL_SAM, "downsample_channels": [512, 896]}
_REAL_QWEN2 = {
    "dim": 896,
    "layers": 24,
    "heads": 14,
    "kv_heads": 2,
    "intermediate_size": 4864,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
}
_TINY_SAM_V2 = {**_TINY_SAM, "downsample_channels": [64, 32]}
_TINY_QWEN2 = {**_REAL_QWEN2, "dim": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 64}


def tiny_config(vision: str = "tiny", decoder: str = "tiny", arch: str = "ocr") -> dict[str, Any]:
    """A config.json dict in the released layout of `arch` ("ocr" or "ocr2") with shrunk encoder/decoder sizes."""
    if vision not in ("tiny", "real"):
        raise ValueError(f"vision must be 'tiny' or 'real', got {vision!r}")
    if decoder not in ("tiny", "small", "real"):
        raise ValueError(f"decoder must be 'tiny', 'small' or 'real', got {decoder!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    lang = copy.deepcopy(_LANGUAGE_CONFIG)
    lang.update({"tiny": _TINY_DECODER, "small": _SMALL_DECODER, "real": {}}[decoder])
    top_lang = {k: v for k, v in lang.items() if k != "architectures"}
    if arch == "ocr":
        sam = copy.deepcopy(_TINY_SAM if vision == "tiny" else _REAL_SAM)
        clip = copy.deepcopy(_TINY_CLIP if vision == "tiny" else _REAL_CLIP)
        widths: dict[str, Any] = {CLIP_KEY: clip, SAM_KEY: sam}
        input_dim = clip["width"] + sam["downsample_channels"][1]
        model_name = "deeplip_b_l"
    else:
        sam = copy.deepcopy(_TINY_SAM_V2 if vision == "tiny" else _REAL_SAM_V2)
        qwen2 = copy.deepcopy(_TINY_QWEN2 if vision == "tiny" else _REAL_QWEN2)
        widths = {QWEN2_KEY: qwen2, SAM_KEY: sam}
        input_dim = qwen2["dim"]
        model_name = "deepencoderv2"
    return {
        "_name_or_path": f"deepseek-{arch}-random-{vision}-vision-{decoder}-decoder",
        "candidate_resolutions": [[1024, 1024]],
        "global_view_pos": "head",
        "architectures": [ARCHITECTURES[arch]],
        "language_config": lang,
        "model_type": "deepseek_vl_v2",
        "projector_config": {
            "input_dim": input_dim,
            "model_type": "mlp_projector",
            "n_embed": lang["hidden_size"],
            "projector_type": "linear",
        },
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "vision_config": {
            "image_size": 1024,
            "mlp_ratio": 3.7362,
            "model_name": model_name,
            "model_type": "vision",
            "width": widths,
        },
        **top_lang,
    }


def random_init_(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Fill every parameter in place from one seeded generator: norms 1/0, everything else N(0, std).

    A norm is any module with an `eps` (LayerNorm, LayerNorm2d, RMSNorm), so no model class is imported.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = hasattr(module, "eps")
            for name, param in module.named_parameters(recurse=False):
                if norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    param.normal_(0.0, std, generator=gen)
    return model


def write_checkpoint(out_dir: str | Path, raw_config: dict[str, Any], model: nn.Module | None = None) -> Path:
    """Write config.json, the tokenizer files and (when `model` is given) its state as model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(out)
    if model is not None:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# Special tokens at the released ids (FACTS section 2); the writer is the only place ids are spelled out.
_BOS, _EOS, _PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
_OCR_TOKENS = [
    "<image>",
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<td>",
    "</td>",
    "<tr>",
    "</tr>",
    "<|User|>",
    "<|Assistant|>",
]
_OCR_FIRST_ID = 128815
_VOCAB_SIZE = 129280
# A little text so common words get merges and prompts tokenise to realistic lengths.
_MERGE_CORPUS = """Convert the document to markdown. OCR this image. Free OCR. Parse the figure.
Describe this image in detail. Locate the text in the image. The quick brown fox jumps over the lazy dog.
# Title\n\n## Section\n\nThis is a paragraph of text with numbers 0123456789 and a table:
<table><tr><td>cell</td><td>value</td></tr></table>\n- item one\n- item two\n\\[ x^2 + y^2 = z^2 \\]
title text image table figure caption formula header footer page number reference equation""".strip()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2 byte-level alphabet: printable latin-1 bytes map to themselves, the rest above U+0100."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _train_merges(corpus: str, count: int, alphabet: dict[int, str]) -> list[tuple[str, str]]:
    """Deterministic greedy BPE over the corpus' words (most frequent pair, ties by the pair itself)."""
    words: dict[tuple[str, ...], int] = {}
    for i, word in enumerate(corpus.replace("\n", " \n ").split(" ")):
        text = (" " if i else "") + word
        key = tuple(alphabet[b] for b in text.encode("utf-8"))
        if key:
            words[key] = words.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: dict[tuple[str, str], int] = {}
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return merges


def write_tokenizer(out: Path) -> None:
    """Byte-level BPE tokenizer.json of 129,280 ids with the special tokens at their released ids."""
    from tokenizers import Tokenizer

    alphabet = _byte_alphabet()
    merges = _train_merges(_MERGE_CORPUS, 300, alphabet)
    specials = {_BOS: 0, _EOS: 1, _PAD: 2, **{t: _OCR_FIRST_ID + i for i, t in enumerate(_OCR_TOKENS)}}
    vocab: dict[str, int] = dict(specials)
    pieces = [alphabet[b] for b in range(256)] + [a + b for a, b in merges]
    next_id = 3
    for piece in pieces:
        if piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
    # The rest of the id space holds placeholders (as in DeepSeek's own tokenizers), written in the
    # byte-level alphabet so they decode like any other token.
    for i in range(_VOCAB_SIZE):
        if i not in specials.values() and i >= next_id:
            vocab["".join(alphabet[b] for b in f"<｜place▁holder▁no▁{i}｜>".encode())] = i
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t, i in specials.items()
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": sorted(added, key=lambda a: a["id"]),
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": _BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": _BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {_BOS: {"id": _BOS, "ids": [0], "tokens": [_BOS]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for a, b in merges],
        },
    }
    tokenizer = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    if tokenizer.get_vocab_size(with_added_tokens=True) != _VOCAB_SIZE:
        raise RuntimeError(f"tokenizer vocab is {tokenizer.get_vocab_size(True)}, expected {_VOCAB_SIZE}")
    tokenizer.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": _PAD}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
