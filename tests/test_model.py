"""Tests of deepseek_ocr.py on CPU: real-size layout on the meta device, and generation, streaming,
batching, cancellation, sampling, loading errors and the CLI on the tiny random checkpoint."""

from __future__ import annotations

import copy
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
from errors import PromptTooLong
from process.modes import count_image_tokens

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The tiny model's ops are too small to gain from threads, and on a busy 2-core box every threaded op
    # waits for a descheduled worker (a scheduler slice each): one thread halves this module's wall time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ocr(tiny_checkpoint: Path) -> dso.DeepseekOCR:
    return dso.DeepseekOCR.from_pretrained(tiny_checkpoint)


def _greedy(max_tokens: int, **kw: int) -> dso.SamplingParams:
    return dso.SamplingParams(max_tokens=max_tokens, **kw)


# ---------------------------------------------------------------------------------- real-size layout


def test_real_size_model_has_the_checkpoint_names_and_shapes() -> None:
    raw = json.loads((DATA / "deepseek_ocr_config.json").read_text())
    with torch.device("meta"):
        model = dso.DeepseekOCRForCausalLM(dso.DeepseekOCRConfig.from_dict(raw))
    expected = {}
    for line in (DATA / "deepseek_ocr_tensors.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            expected[name] = tuple(int(s) for s in shape.split(","))
    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert len(expected) == 2710
    assert sorted(set(expected) - set(got)) == [], "missing in model"
    assert sorted(set(got) - set(expected)) == [], "extra in model"
    assert {n: s for n, s in got.items() if expected[n] != s} == {}
    assert sum(t.numel() for t in model.state_dict().values()) == 3_336_106_240


def test_tiny_config_keeps_real_layout_and_token_geometry(tiny_checkpoint: Path) -> None:
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    for key in ("architectures", "candidate_resolutions", "projector_config", "vision_config", "language_config"):
        assert key in raw
    assert raw["model_type"] == "deepseek_vl_v2" and raw["tile_tag"] == "2D" and raw["global_view_pos"] == "head"
    assert raw["hidden_size"] == raw["language_config"]["hidden_size"]
    cfg = dso.DeepseekOCRConfig.from_dict(raw)
    assert (cfg.sam_patch_size, cfg.sam_image_size, cfg.sam_window_size) == (16, 1024, 14)
    assert 0 < len(cfg.sam_global_attn_indexes) < cfg.sam_layers  # both block kinds exercised
    assert cfg.first_k_dense_replace == 1 < cfg.num_hidden_layers and cfg.vocab_size == 129280


def test_config_from_directory_without_config_json_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        dso.DeepseekOCRConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        dso.DeepseekOCR.from_pretrained(tmp_path)


def test_config_only_writes_no_weights(tmp_path: Path) -> None:
    out = dso.make_tiny(tmp_path / "cfg", vision="real", decoder="real", weights=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    raw = json.loads((out / "config.json").read_text())
    ref = json.loads((DATA / "deepseek_ocr_config.json").read_text())
    # The full real config: same values as the released file wherever the released file has the key.
    assert raw["language_config"] == {k: v for k, v in ref["language_config"].items() if k != "auto_map"}
    assert raw["vision_config"] == ref["vision_config"] and raw["projector_config"] == ref["projector_config"]


@pytest.mark.parametrize(("grid", "rel_size"), [(14, 14), (10, 64)])  # window 14; a 640 px global block
def test_sam_attention_equals_explicit_relative_bias(grid: int, rel_size: int) -> None:
    torch.manual_seed(0)
    attn = dso.SamAttention(width=32, heads=2, rel_size=rel_size)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, grid, grid, 32)
    with torch.no_grad():
        got = attn(x)
        # The textbook form: softmax(q k^T * scale + rel_h[q, key_row] + rel_w[q, key_col]) v.
        q, k, v = attn.qkv(x).reshape(2, grid * grid, 3, 2, 16).permute(2, 0, 3, 1, 4)
        rh = dso._rel_pos_table(grid, attn.rel_pos_h)  # (grid, grid, 16)
        rw = dso._rel_pos_table(grid, attn.rel_pos_w)
        qg = q.reshape(2, 2, grid, grid, 16)
        bias = (
            torch.einsum("nahwc,hkc->nahwk", qg, rh)[..., :, None]
            + torch.einsum("nahwc,wkc->nahwk", qg, rw)[..., None, :]
        )
        scores = q @ k.transpose(-1, -2) * 16**-0.5 + bias.reshape(2, 2, grid * grid, grid * grid)
        want = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, grid, grid, 32))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_real_special_ids_and_round_trips(ocr: dso.DeepseekOCR) -> None:
    tok = ocr.tokenizer
    assert len(tok) == 129280
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert ocr.image_token_id == 128815 and ocr.eos_token_id == 1
    names = [
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
    assert tok.convert_tokens_to_ids(names) == list(range(128816, 128827))
    text = "Hello  world,\n\n\tindented  line \n# Título — 中文 ünïcode\n<|ref|>title<|/ref|> end "
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
    assert 128816 in ids  # tags are single special tokens


def test_incremental_detokenizer_holds_split_characters(ocr: dso.DeepseekOCR) -> None:
    tok = ocr.tokenizer
    ids = tok.encode("a中b", add_special_tokens=False)  # "中" is three byte tokens: nothing merges it
    detok = dso.IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    assert deltas == ["a", "", "", "中", "b"]
    detok = dso.IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:2]] == ["a", ""]
    assert detok.flush() == "\ufffd"  # a cut-off character is flushed, not lost


# -------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("gundam", (1190, 1684), 903),  # A4 at 144 dpi: 2x3 tiles
        ("gundam", (600, 400), 273),  # within one tile: global view only
        ("gundam", (600, 4000), 933),  # 1x6 tiles: the maximum
        ("gundam", (4000, 600), 883),  # 6x1 tiles: fewer row newlines
        ("tiny", (800, 600), 73),
        ("small", (300, 900), 111),
        ("base", (1190, 1684), 273),
        ("large", (500, 500), 421),
    ],
)
def test_prompt_holds_image_tokens_plus_text(
    ocr: dso.DeepseekOCR, mode: str, size: tuple[int, int], expected: int
) -> None:
    m = dso.MODES[mode]
    base, image_size, crop = m.base_size, m.image_size, m.crop
    assert count_image_tokens(*size, base, image_size, crop) == expected
    prompt = "Intro <image>\nFree OCR."
    req = ocr.prepare(prompt, Image.new("RGB", size, "white"), base_size=base, image_size=image_size, crop=crop)
    before = ocr.tokenizer.encode("Intro ", add_special_tokens=False)
    after = ocr.tokenizer.encode("\nFree OCR.", add_special_tokens=False)
    assert req.image_tokens == expected == req.images.image_tokens
    assert req.input_ids == [ocr.bos_token_id, *before, *[ocr.image_token_id] * expected, *after]


@pytest.mark.parametrize(("mode", "size"), [("gundam", (1190, 1684)), ("small", (300, 900)), ("large", (500, 500))])
def test_vision_encoder_fills_every_placeholder(ocr: dso.DeepseekOCR, mode: str, size: tuple[int, int]) -> None:
    m = dso.MODES[mode]
    base, image_size, crop = m.base_size, m.image_size, m.crop
    req = ocr.prepare("<image>", _noise_image(*size, seed=1), base_size=base, image_size=image_size, crop=crop)
    with torch.inference_mode():
        feats = ocr.model.model.encode_image(req.images)
    assert feats.shape == (req.image_tokens, ocr.config.hidden_size)
    assert torch.equal(feats[-1], ocr.model.model.view_seperator)  # the separator closes the image


def test_prepare_rejects_bad_prompts(ocr: dso.DeepseekOCR) -> None:
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="exactly one <image> tag.*got 0"):
        ocr.prepare("Free OCR.", img)
    with pytest.raises(ValueError, match="got 2"):
        ocr.prepare("<image><image>", img)
    with pytest.raises(ValueError, match="no image"):
        ocr.prepare("<image>\nFree OCR.", None)
    short = copy.copy(ocr)
    short.max_model_len = 100
    with pytest.raises(PromptTooLong, match=r"prompt is 275 tokens.*max_model_len 100"):  # typed, still a ValueError
        short.prepare("<image>\n", img, base_size=1024, image_size=640, crop=True)
    text_only = ocr.prepare("Just text.", None)
    assert text_only.images is None and text_only.image_tokens == 0
    assert text_only.input_ids[0] == ocr.bos_token_id and ocr.image_token_id not in text_only.input_ids


# ----------------------------------------------------------------------------------------- generation


def _batch_requests(ocr: dso.DeepseekOCR) -> list[dso.GenerationRequest]:
    return [
        ocr.prepare(dso.DEFAULT_PROMPT, _noise_image(1190, 1684, seed=2), sampling=_greedy(12)),
        ocr.prepare(
            "<image>\nFree OCR.",
            _noise_image(500, 300, seed=3),
            base_size=640,
            image_size=640,
            crop=False,
            sampling=_greedy(20, ngram_size=3, ngram_window=16),
        ),
        ocr.prepare(
            "A text-only prompt that is a little longer than the others, with\nnewlines.", None, sampling=_greedy(16)
        ),
        ocr.prepare("Describe <image> briefly.", _noise_image(400, 600, seed=4), sampling=_greedy(14)),
    ]


def test_batched_decoding_equals_each_request_alone(ocr: dso.DeepseekOCR) -> None:
    requests = _batch_requests(ocr)
    batched = ocr.generate(requests)
    alone = [ocr.generate([r])[0] for r in requests]
    for i, (b, a) in enumerate(zip(batched, alone, strict=True)):
        assert b.token_ids == a.token_ids, f"request {i} differs in the batch"
        assert b.text == a.text and b.finish_reason == a.finish_reason == "length"
        assert b.completion_tokens == requests[i].sampling.max_tokens
        assert b.prompt_tokens == len(requests[i].input_ids) and b.image_tokens == requests[i].image_tokens
    assert batched[0].image_tokens == 903 and batched[1].image_tokens == 111 and batched[2].image_tokens == 0


def test_greedy_is_deterministic(ocr: dso.DeepseekOCR) -> None:
    req = ocr.prepare("<image>\nFree OCR.", _noise_image(300, 200, seed=5), sampling=_greedy(10))
    assert ocr.generate([req])[0].token_ids == ocr.generate([req])[0].token_ids


def test_ngram_guard_blocks_repeats(ocr: dso.DeepseekOCR) -> None:
    free = ocr.generate([ocr.prepare("Loop?", None, sampling=_greedy(24))])[0].token_ids
    guarded = ocr.generate([ocr.prepare("Loop?", None, sampling=_greedy(24, ngram_size=2, ngram_window=24))])[0]
    pairs = list(zip(guarded.token_ids, guarded.token_ids[1:], strict=False))
    assert len(pairs) == len(set(pairs))  # no bigram twice
    if len(set(zip(free, free[1:], strict=False))) < len(free) - 1:  # the unguarded run looped
        assert guarded.token_ids != free


def test_stream_text_concatenates_to_final_text(ocr: dso.DeepseekOCR) -> None:
    requests = [ocr.prepare("First", None, sampling=_greedy(9)), ocr.prepare("Second one", None, sampling=_greedy(5))]
    texts, reasons, counts, steps = ["", ""], [None, None], [0, 0], 0
    for events in ocr.stream(requests):
        steps += 1
        for ev in events:
            assert reasons[ev.index] is None, "event after the request finished"
            texts[ev.index] += ev.text
            counts[ev.index] += 1
            reasons[ev.index] = ev.finish_reason
    finals = ocr.generate(requests)
    assert texts == [f.text for f in finals] and counts == [9, 5] and steps == 9
    assert reasons == ["length", "length"]


def test_cancel_one_request_mid_stream(ocr: dso.DeepseekOCR) -> None:
    requests = [ocr.prepare(p, None, sampling=_greedy(10)) for p in ("one", "two two", "three three three")]
    cancelled_first = ocr.prepare("never", None, sampling=_greedy(10))
    cancelled_first.cancelled.set()
    finals: dict[int, dso.TokenEvent] = {}
    tokens = [0] * 4
    for step, events in enumerate(ocr.stream([*requests, cancelled_first])):
        if step == 3:
            requests[1].cancelled.set()
        for ev in events:
            tokens[ev.index] += ev.token_id >= 0
            if ev.finish_reason is not None:
                finals[ev.index] = ev
    assert finals[3].finish_reason == "abort" and tokens[3] == 0
    assert finals[1].finish_reason == "abort" and finals[1].token_id == -1 and tokens[1] == 4
    assert finals[0].finish_reason == finals[2].finish_reason == "length" and tokens[0] == tokens[2] == 10


def test_eos_stops_with_reason_stop_and_without_its_text(ocr: dso.DeepseekOCR) -> None:
    req = ocr.prepare("stop me", None, sampling=_greedy(12))
    free = ocr.generate([req])[0]
    k = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    stopper = copy.copy(ocr)
    stopper.eos_token_id = free.token_ids[k]  # the same network, with that token playing EOS
    out = stopper.generate([req])[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: k + 1]
    assert out.text == ocr.tokenizer.decode(free.token_ids[:k], skip_special_tokens=False)


def test_max_model_len_ends_with_length(ocr: dso.DeepseekOCR) -> None:
    req = ocr.prepare("four words of text", None, sampling=_greedy(50))
    short = copy.copy(ocr)
    short.max_model_len = len(req.input_ids) + 5
    out = short.generate([req])[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5


def test_sampling_with_seed_is_reproducible(ocr: dso.DeepseekOCR) -> None:
    def run(seed: int) -> list[int]:
        sampling = dso.SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=seed)
        return ocr.generate([ocr.prepare("Sample", None, sampling=sampling)])[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_tiny_top_p_keeps_the_most_likely_token(ocr: dso.DeepseekOCR) -> None:
    # Found by schemathesis: 7e-111 underflows to 0.0 in float32 and used to drop every token.
    sampling = dso.SamplingParams(max_tokens=6, temperature=0.97, top_p=7e-111, seed=1)
    greedy = ocr.generate([ocr.prepare("Sample", None, sampling=_greedy(6))])[0].token_ids
    assert ocr.generate([ocr.prepare("Sample", None, sampling=sampling)])[0].token_ids == greedy


def test_bad_sampling_is_rejected(ocr: dso.DeepseekOCR) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        ocr.prepare("x", None, sampling=dso.SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        ocr.prepare("x", None, sampling=dso.SamplingParams(top_p=0.0))
    req = ocr.prepare("x", None)
    req.image_tokens = 5
    with pytest.raises(ValueError, match="0 image placeholder ids but image_tokens is 5"):
        ocr.stream([req])


# -------------------------------------------------------------------------------------------- loading


def _broken_copy(src: Path, dst: Path, edit: str) -> Path:
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    state = load_file(src / "model.safetensors")
    if edit == "remove":
        del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    elif edit == "rename":
        state["model.norm.weights"] = state.pop("model.norm.weight")
    else:
        state["model.projector.layers.bias"] = torch.zeros(7, dtype=torch.bfloat16)
    save_file(state, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        ("remove", r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"),
        ("rename", r"missing tensors: model\.norm\.weight .*unexpected tensors: model\.norm\.weights"),
        ("reshape", r"model\.projector\.layers\.bias: checkpoint shape \[7\], model expects \[64\]"),
    ],
)
def test_loading_a_mismatched_checkpoint_names_the_tensor(
    tiny_checkpoint: Path, tmp_path: Path, edit: str, pattern: str
) -> None:
    broken = _broken_copy(tiny_checkpoint, tmp_path / edit, edit)
    with pytest.raises(dso.CheckpointError, match=pattern):
        dso.DeepseekOCR.from_pretrained(broken)


def test_bfloat16_load_generates(tiny_checkpoint: Path) -> None:
    ocr16 = dso.DeepseekOCR.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert ocr16.model.lm_head.weight.dtype == torch.bfloat16
    out = ocr16.generate([ocr16.prepare("<image>\nFree OCR.", _noise_image(200, 200, 6), sampling=_greedy(4))])[0]
    assert out.completion_tokens == 4 and out.finish_reason == "length"


def test_make_tiny_is_deterministic_for_a_seed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    again = dso.make_tiny(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_checkpoint / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_run_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "page.png"
    _noise_image(600, 400, seed=7).save(image)
    cmd = [
        sys.executable,
        str(ROOT / "deepseek_ocr.py"),
        "run",
        "--model",
        str(tiny_checkpoint),
        "--image",
        str(image),
        "--max-tokens",
        "5",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"text", "finish_reason", "mode", "usage"}
    assert out["mode"] == "gundam" and out["finish_reason"] == "length"
    assert out["usage"]["image_tokens"] == count_image_tokens(600, 400, 1024, 640, True)
    assert out["usage"]["completion_tokens"] == 5
    assert out["usage"]["prompt_tokens"] > out["usage"]["image_tokens"]


# ------------------------------------------------------------------------------------------------ GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_batched_equals_alone_and_bf16_runs(tiny_checkpoint: Path) -> None:
    gpu = dso.DeepseekOCR.from_pretrained(tiny_checkpoint, device="cuda", dtype="float32")
    requests = _batch_requests(gpu)
    batched = gpu.generate(requests)
    assert [b.token_ids for b in batched] == [gpu.generate([r])[0].token_ids for r in requests]
    gpu16 = dso.DeepseekOCR.from_pretrained(tiny_checkpoint, device="cuda", dtype="bfloat16")
    sampling = dso.SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=3)
    req = gpu16.prepare(dso.DEFAULT_PROMPT, _noise_image(1190, 1684, seed=8), sampling=sampling)
    first, second = gpu16.generate([req, req])
    assert first.token_ids == second.token_ids and first.completion_tokens == 8


@pytest.mark.gpu
@needs_cuda
def test_cuda_real_vision_small_decoder(tmp_path: Path) -> None:
    ckpt = dso.make_tiny(tmp_path / "real-vision", vision="real", decoder="small")
    gpu = dso.DeepseekOCR.from_pretrained(ckpt, device="cuda", dtype="bfloat16")
    assert gpu.config.sam_width == 768 and gpu.config.clip_layers == 24 and gpu.config.hidden_size == 1280
    for mode, size in [("gundam", (1190, 1684)), ("large", (800, 800)), ("tiny", (300, 300))]:
        m = dso.MODES[mode]
        base, image_size, crop = m.base_size, m.image_size, m.crop
        req = gpu.prepare(
            dso.DEFAULT_PROMPT,
            _noise_image(*size, seed=9),
            base_size=base,
            image_size=image_size,
            crop=crop,
            sampling=_greedy(4),
        )
        with torch.inference_mode():
            feats = gpu.model.model.encode_image(req.images)
        assert feats.shape == (req.image_tokens, 1280) and torch.isfinite(feats).all()
        out = gpu.generate([req])[0]
        assert out.completion_tokens == 4 and out.image_tokens == count_image_tokens(*size, base, image_size, crop)
