"""Tests of DeepSeek-OCR-2 in deepseek_ocr.py on CPU: token counts, the real-size layout vLLM loads, the
encoder's attention pattern, generation and batching on the tiny v2 checkpoint, loading errors, the shared
prompt builder and the make-tiny CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import deepseek_ocr as dso
from process.image_process import (
    MODES,
    choose_grid,
    count_image_tokens_for,
    count_image_tokens_v2,
    modes_for,
)

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "<image>\nFree OCR."


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def _formula(width: int, height: int) -> int:
    """FACTS section 8: 256 global queries + 144 per 768 px tile (tiles only past 768 px) + 1 separator."""
    tiles = 0
    if width > 768 or height > 768:
        tw, th = choose_grid(width, height, image_size=768)
        tiles = tw * th
    return 256 + 144 * tiles + 1


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()  # tiny ops: threads only wait on each other on a shared 2-core box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ocr2(tiny_checkpoint_v2: Path) -> dso.DeepseekOCR:
    return dso.DeepseekOCR.from_pretrained(tiny_checkpoint_v2)


# -------------------------------------------------------------------------------------- token counts

SWEEP = [
    (1, 1),
    (300, 200),
    (768, 768),
    (769, 768),
    (768, 769),
    (1190, 1684),
    (1684, 1190),
    (1000, 1000),
    (2000, 700),
    (4000, 1000),
    (8000, 300),
    (300, 8000),
    (800, 3000),
    (1536, 768),
]


@pytest.mark.parametrize(("width", "height"), SWEEP)
def test_token_count_equals_the_formula(width: int, height: int) -> None:
    assert count_image_tokens_for("ocr2", width, height, "gundam") == _formula(width, height)
    assert count_image_tokens_v2(width, height) == _formula(width, height)


def test_token_count_landmarks() -> None:
    assert count_image_tokens_v2(1190, 1684) == 1121  # A4 at 144 dpi: 2x3 tiles
    assert count_image_tokens_v2(768, 768) == 257  # one tile's worth: global view only
    assert count_image_tokens_v2(769, 768) == 256 + 144 * 4 + 1  # one pixel over: tiled (2x2)
    assert count_image_tokens_v2(8000, 300) == count_image_tokens_v2(300, 8000) == 1121  # 6x1 / 1x6
    sizes = [(w, h) for w in range(1, 5000, 97) for h in range(1, 5000, 131)]
    assert {count_image_tokens_v2(w, h) for w, h in sizes} <= {257 + 144 * t for t in (0, 2, 3, 4, 5, 6)}


def test_modes_per_arch() -> None:
    assert modes_for("ocr") is MODES
    v2 = modes_for("ocr2")
    assert list(v2) == ["gundam"] and (v2["gundam"].base_size, v2["gundam"].image_size, v2["gundam"].crop) == (
        1024,
        768,
        True,
    )
    assert count_image_tokens_for("ocr", 1190, 1684, "gundam") == 903  # v1 unchanged
    with pytest.raises(ValueError, match="'base' is not served by ocr2; its modes: gundam"):
        count_image_tokens_for("ocr2", 100, 100, "base")
    with pytest.raises(ValueError, match="arch must be one of"):
        modes_for("ocr3")


@pytest.mark.parametrize(("width", "height"), [(1, 1), (768, 768), (769, 768), (1190, 1684), (8000, 300)])
def test_prompt_and_encoder_fill_every_placeholder(ocr2: dso.DeepseekOCR, width: int, height: int) -> None:
    req = ocr2.prepare(PROMPT, _noise_image(width, height, seed=1))
    assert req.image_tokens == _formula(width, height) == req.input_ids.count(ocr2.image_token_id)
    with torch.inference_mode():
        feats = ocr2.model.model.encode_image(req.images)
    assert feats.shape == (req.image_tokens, ocr2.config.hidden_size)
    assert torch.equal(feats[-1], ocr2.model.model.view_seperator)


# ------------------------------------------------------------------------------------ real-size layout


def test_real_size_v2_model_has_the_tensors_vllm_loads() -> None:
    raw = dso.tiny_config(vision="real", decoder="real", arch="ocr2")
    with torch.device("meta"):
        model = dso.DeepseekOCRForCausalLM(dso.DeepseekOCRConfig.from_dict(raw))
    expected = {}
    for line in (DATA / "deepseek_ocr2_tensors.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            expected[name] = tuple(int(s) for s in shape.split(","))
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert len(expected) == 2707
    assert sorted(set(expected) - set(got)) == [], "missing in model"
    assert sorted(set(got) - set(expected)) == [], "extra in model"
    assert {n: s for n, s in got.items() if expected[n] != s} == {}
    assert sum(t.numel() for t in model.state_dict().values()) == 3_389_119_360
    cfg = model.config
    assert (cfg.arch, cfg.qwen2_hidden, cfg.qwen2_layers, cfg.qwen2_heads) == ("ocr2", 896, 24, 14)
    assert cfg.qwen2_kv_heads == 2
    assert (cfg.qwen2_intermediate, cfg.qwen2_rope_theta, cfg.qwen2_rms_norm_eps) == (4864, 1e6, 1e-6)


def test_unknown_architecture_is_named() -> None:
    raw = dso.tiny_config(arch="ocr2")
    raw["architectures"] = ["DeepseekOCR3ForCausalLM"]
    with pytest.raises(ValueError, match="DeepseekOCR3ForCausalLM"):
        dso.DeepseekOCRConfig.from_dict(raw)


# ------------------------------------------------------------------------------------------- encoder


def test_encoder_attention_pattern() -> None:
    """Image tokens see each other both ways, queries see all image tokens and earlier queries only."""
    torch.manual_seed(0)
    cfg = dso.DeepseekOCRConfig.from_dict(dso.tiny_config(arch="ocr2"))
    enc = dso.Qwen2QueryEncoder(cfg)
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.2)
    sam = torch.randn(1, cfg.qwen2_hidden, 12, 12)  # a 768 px tile's SAM map
    with torch.no_grad():
        base = enc(sam)  # (1, 144, C)
        assert base.shape == (1, 144, cfg.qwen2_hidden)
        enc.query_768.weight[100] += 1.0  # a later query changes only itself and the queries after it
        moved = enc(sam)
        enc.query_768.weight[100] -= 1.0
        torch.testing.assert_close(moved[:, :100], base[:, :100])
        assert not torch.allclose(moved[:, 100:], base[:, 100:])
        late = sam.clone()
        late[..., 11, 11] += 1.0  # the last image token reaches every query, the first one included
        assert not torch.allclose(enc(late)[:, 0], base[:, 0])
    with pytest.raises(ValueError, match="100 SAM tokens has no learned queries"):
        enc(torch.randn(1, cfg.qwen2_hidden, 10, 10))


# ---------------------------------------------------------------------------------------- generation


def _requests(ocr2: dso.DeepseekOCR) -> list[dso.GenerationRequest]:
    guarded = dso.SamplingParams(12, ngram_size=3, ngram_window=9)
    return [
        ocr2.prepare(dso.DEFAULT_PROMPT, _noise_image(1190, 1684, seed=2), sampling=dso.SamplingParams(max_tokens=10)),
        ocr2.prepare(PROMPT, _noise_image(500, 300, seed=3), sampling=guarded),
        ocr2.prepare("A text-only prompt, a little longer than the others.", None, sampling=dso.SamplingParams(8)),
        ocr2.prepare("Describe <image> briefly.", _noise_image(900, 600, seed=4), sampling=dso.SamplingParams(11)),
    ]


def test_tiny_v2_generates_and_batched_equals_alone(ocr2: dso.DeepseekOCR) -> None:
    assert ocr2.arch == "ocr2" and list(ocr2.modes) == ["gundam"]
    requests = _requests(ocr2)
    batched = ocr2.generate(requests)
    alone = [ocr2.generate([r])[0] for r in requests]
    for i, (b, a) in enumerate(zip(batched, alone, strict=True)):
        assert b.token_ids == a.token_ids, f"request {i} differs in the batch"
        assert b.finish_reason == a.finish_reason == "length"
        assert b.completion_tokens == requests[i].sampling.max_tokens
    assert [b.image_tokens for b in batched] == [1121, 257, 0, _formula(900, 600)]


def test_v2_serves_only_its_mode(ocr2: dso.DeepseekOCR) -> None:
    with pytest.raises(ValueError, match=r"serves base_size/image_size/crop \[\(1024, 768, True\)\]"):
        ocr2.prepare(PROMPT, _noise_image(64, 64, 5), base_size=1024, image_size=640, crop=True)


# ------------------------------------------------------------------------------------------- loading


def _broken_copy(src: Path, dst: Path, edit: str) -> Path:
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    state = load_file(src / "model.safetensors")
    if edit == "remove":
        del state["model.qwen2_model.model.model.layers.1.self_attn.k_proj.bias"]
    elif edit == "rename":
        state["model.qwen2_model.query_768.weights"] = state.pop("model.qwen2_model.query_768.weight")
    else:
        state["model.sam_model.net_3.weight"] = torch.zeros(1024, 64, 3, 3, dtype=torch.bfloat16)
    save_file(state, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ("remove", r"missing tensors: model\.qwen2_model\.model\.model\.layers\.1\.self_attn\.k_proj\.bias"),
        (
            "rename",
            r"missing tensors: model\.qwen2_model\.query_768\.weight .*"
            r"unexpected tensors: model\.qwen2_model\.query_768\.weights",
        ),
        (
            "reshape",
            r"model\.sam_model\.net_3\.weight: checkpoint shape \[1024, 64, 3, 3\], model expects \[32, 64, 3, 3\]",
        ),
    ],
)
def test_loading_a_mismatched_v2_checkpoint_names_the_tensor(
    tiny_checkpoint_v2: Path, tmp_path: Path, edit: str, pattern: str
) -> None:
    broken = _broken_copy(tiny_checkpoint_v2, tmp_path / edit, edit)
    with pytest.raises(dso.CheckpointError, match=pattern):
        dso.DeepseekOCR.from_pretrained(broken)


def test_v1_checkpoint_loads_as_ocr(tiny_checkpoint: Path) -> None:
    assert dso.DeepseekOCRConfig.from_pretrained(tiny_checkpoint).arch == "ocr"


# -------------------------------------------------------------------------------------------- prompts


def test_prompt_builder(ocr2: dso.DeepseekOCR) -> None:
    builder = dso.PromptBuilder(ocr2.tokenizer)
    assert (builder.bos_id, builder.image_id, builder.whitelist) == (0, 128815, [128821, 128822])
    text = builder.encode("\nFree OCR.")
    assert builder.token_ids(PROMPT, 1) == [0, 128815, *text]  # what the vLLM engine sends
    assert builder.token_ids(PROMPT, 3) == [0, 128815, 128815, 128815, *text]
    assert builder.token_ids("Free OCR.", None) == [0, *builder.encode("Free OCR.")]
    with pytest.raises(ValueError, match="exactly one <image> tag when an image is given, got 2"):
        builder.token_ids("<image><image>", 1)
    with pytest.raises(ValueError, match="1 <image> tag\\(s\\) but no image"):
        builder.token_ids(PROMPT, None)
    with pytest.raises(ValueError, match="image_tokens must be an integer >= 1"):
        builder.token_ids(PROMPT, 0)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_make_tiny_v2_real_config_only(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "deepseek_ocr.py"), "make-tiny", str(tmp_path / "v2")]
    cmd += ["--arch", "ocr2", "--vision", "real", "--decoder", "small", "--config-only"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "v2"
    assert not (out / "model.safetensors").exists()
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["DeepseekOCR2ForCausalLM"] and raw["model_type"] == "deepseek_vl_v2"
    assert raw["projector_config"]["input_dim"] == 896 and raw["tile_tag"] == "2D"
    assert raw["language_config"]["num_hidden_layers"] == 2 and raw["language_config"]["hidden_size"] == 1280
    cfg = dso.DeepseekOCRConfig.from_dict(raw)
    assert cfg.sam_downsample_channels == (512, 896) and cfg.qwen2_layers == 24
    tok = json.loads((out / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert ids["<image>"] == 128815 and ids["<|Assistant|>"] == 128826 and ids["<｜begin▁of▁sentence｜>"] == 0


def test_cli_run_v2_json(tiny_checkpoint_v2: Path, tmp_path: Path) -> None:
    image = tmp_path / "page.png"
    _noise_image(1000, 700, seed=7).save(image)
    cmd = [sys.executable, str(ROOT / "deepseek_ocr.py"), "run", "--model", str(tiny_checkpoint_v2)]
    cmd += ["--image", str(image), "--max-tokens", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["usage"]["image_tokens"] == _formula(1000, 700) and out["usage"]["completion_tokens"] == 3
    bad = subprocess.run([*cmd, "--mode", "base"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "modes: ['gundam']" in bad.stderr, bad.stderr


def test_tiny_checkpoint_does_not_import_the_model() -> None:
    """deepseek_ocr imports tiny_checkpoint; the reverse, even inside a function, would be an import circle."""
    import ast

    tree = ast.parse((ROOT / "tiny_checkpoint.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] == "deepseek_ocr"}, imported
