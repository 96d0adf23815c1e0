"""Teacher-forced equivalence of our PyTorch DeepSeek-OCR (`deepseek_ocr.py`) and vLLM's, on a GPU.

One random checkpoint with the real SAM/CLIP sizes and a 2-layer real-width decoder (`make_tiny(...,
vision="real", decoder="small")`) is loaded by both. For each case (an image, a mode, a fixed 64-token
continuation) both see prompt + continuation; at each of the 64 continuation positions the next-token
choice of our full forward pass is compared with vLLM's top-1 prompt logprob. Every mode runs, all of them
on one vLLM engine in one `generate` call (per-request modes, `engines.vllm.modes`: mixed batches too).
Also compared: prompt ids (so prompt and image token counts), free-running greedy decoding (64 tokens,
n-gram off), and two probes of a balanced black/white page (its tiles' pixels sum to exactly 0, which
vLLM's own class took for "no image"), raw and through `vllm_image`.
Acceptance: top-1 agreement >= 99 % per mode in float32 (the exit status says whether it held).

`--kv-compare` (issue 30's KV_CACHE_DTYPE): vLLM against vLLM instead, bfloat16 with its KV cache in
bfloat16 and then in fp8 (each in its own child), the same cases and continuations; top-1 agreement of fp8
with bf16 at every teacher-forced position, per mode, and the greedy common prefix. Acceptance: >= 99 %
every mode. `--kv-pages K` gives each case K pages and continuations (K x 64 positions a case).

vLLM runs in a child process per dtype (its GPU memory is gone when the child exits); our model runs in
this process afterwards. Usage (GPU machine, kit installed):
    python benchmarks/equivalence.py --ckpt /tmp/eq-ckpt --dtypes float32,bfloat16 --out eq.json
    python benchmarks/equivalence.py --ckpt /tmp/eq-ckpt --kv-compare --kv-pages 6 --out kv.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import MODES, ModeSpec  # noqa: E402

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
CONT_TOKENS = 64
TOP_K = 5
WORDS = ("invoice total amount table figure section result method data value page report summary the of and "
         "to in for with on by 2024 12.5% revenue cost net Q1 Q2 analysis overview note appendix").split()


@dataclass(frozen=True)
class Case:
    name: str
    size: tuple[int, int]
    mode: str


CASES = (
    Case("small-600x500", (600, 500), "gundam"),
    Case("a4-1190x1684", (1190, 1684), "gundam"),
    Case("wide-8000x300", (8000, 300), "gundam"),
    Case("tall-300x2000", (300, 2000), "gundam"),
    Case("square-1024", (1024, 1024), "gundam"),
    # The other modes: padded global view for base/large (vllm_image), stretched for tiny/small.
    Case("base-a4", (1190, 1684), "base"),
    Case("base-wide", (8000, 300), "base"),
    Case("large-a4", (1190, 1684), "large"),
    Case("large-square", (1024, 1024), "large"),
    Case("small-a4", (1190, 1684), "small"),
    Case("small-wide", (8000, 300), "small"),
    Case("tiny-a4", (1190, 1684), "tiny"),
    Case("tiny-square", (1024, 1024), "tiny"),
)
ACCEPT_TOP1 = 0.99  # per mode, float32


def kv_items(pages: int) -> list[tuple[str, Case, int]]:
    """The cases of a KV comparison: each case with `pages` different pages and continuations, as (key, case,
    seed). The first page of a case is the one every other comparison uses (key = the case's name, seed = its
    index); the k-th adds "#k" and seed index + 100 k."""
    return [(case.name if k == 0 else f"{case.name}#{k}", case, i + 100 * k)
            for i, case in enumerate(CASES) for k in range(pages)]


def synth_page(size: tuple[int, int], seed: int) -> Any:
    """A white page with lines of random words and a box or two: text-like pixels at any aspect."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    y = 8
    while y < h - 12:
        x = 8 + rng.randrange(0, 40)
        while x < w - 60:
            word = rng.choice(WORDS)
            draw.text((x, y), word, fill=(rng.randrange(0, 60),) * 3, font=font)
            x += 7 * len(word) + 8
        y += 14 + rng.randrange(0, 6)
    for _ in range(2):
        x0, y0 = rng.randrange(0, max(1, w // 2)), rng.randrange(0, max(1, h // 2))
        draw.rectangle((x0, y0, x0 + w // 4, y0 + h // 6), outline=(0, 0, 0), width=2)
    return img


def continuation(tokenizer: Any, seed: int) -> list[int]:
    rng = random.Random(1000 + seed)
    text = " ".join(rng.choice(WORDS) for _ in range(200))
    ids = tokenizer.encode("# " + text, add_special_tokens=False)[:CONT_TOKENS]
    if len(ids) != CONT_TOKENS:
        raise RuntimeError(f"continuation text gave {len(ids)} tokens, need {CONT_TOKENS}")
    return ids


def balanced_page() -> Any:
    """1280x1280, left half black, right half white: 2x2 Gundam tiles whose pixels sum to exactly 0."""
    import numpy as np
    from PIL import Image

    a = np.zeros((1280, 1280, 3), np.uint8)
    a[:, 640:] = 255
    return Image.fromarray(a)


# ------------------------------------------------------------------------------------ vLLM (child)


def run_vllm(ckpt: str, dtype: str, out: str, probe: bool, kv: str = "auto", pages: int = 1) -> None:
    from config import Settings
    from engines.base import SamplingParams as Sampling
    from engines.vllm.args import engine_kwargs, prepare_environment
    from engines.vllm.engine import PromptBuilder, sampling_params, vllm_image

    prepare_environment()  # the per-request-mode plugin, here and in the engine core vLLM spawns
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    settings = Settings(model_path=ckpt, dtype=dtype, max_concurrency=16, max_model_len=4096,
                        gpu_mem_utilization=0.5, enforce_eager=True, kv_cache_dtype=kv)
    llm = LLM(**engine_kwargs(settings, seed=0))
    ready_s = time.perf_counter() - started
    builder = PromptBuilder.from_checkpoint(ckpt)
    forced = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP_K, detokenize=False,
                            skip_special_tokens=False)
    greedy = sampling_params(Sampling(max_tokens=CONT_TOKENS, ngram_size=0), builder.whitelist, delta=False)
    results: dict[str, Any] = {"dtype": dtype, "kv_cache_dtype": kv, "ready_s": round(ready_s, 1), "cases": {}}
    # Every mode in one call: one engine, mixed batches, as the service runs it.
    forced_prompts, free_prompts = [], []
    items = kv_items(pages)
    for _, case, seed in items:
        mode = MODES[case.mode]
        image = vllm_image(synth_page(case.size, seed), mode)
        cont = continuation(builder.tokenizer, seed)
        forced_prompts.append(builder.prompt(PROMPT, image, mode, extra_ids=cont))
        free_prompts.append(builder.prompt(PROMPT, image, mode))
    outs = llm.generate(forced_prompts, forced, use_tqdm=False)
    frees = llm.generate(free_prompts, greedy, use_tqdm=False)
    for (key, _, _), o, f in zip(items, outs, frees, strict=True):
        ids = list(o.prompt_token_ids)
        start = len(ids) - CONT_TOKENS
        positions = []
        for j in range(CONT_TOKENS):
            entry = o.prompt_logprobs[start + j]
            positions.append([[int(t), float(lp.logprob), lp.rank] for t, lp in entry.items()])
        results["cases"][key] = {"prompt_token_ids": ids, "positions": positions,
                                 "greedy": list(f.outputs[0].token_ids)}
    if probe:
        results["probe"] = probe_balanced(llm, builder)
    Path(out).write_text(json.dumps(results))
    print(f"vllm {dtype} (KV cache {kv}): ready in {ready_s:.0f}s, done in {time.perf_counter() - started:.0f}s",
          flush=True)
    # Stop the engine core explicitly (it may be dead after the probe), then leave without the
    # interpreter's slow teardown; the parent needs the GPU memory back.
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        sys.stdout.flush()
        os._exit(0)


def probe_balanced(llm: Any, builder: Any) -> dict[str, str]:
    """Whether vLLM survives a page whose tiles sum to 0: first through vllm_image, then raw (the plugin's
    model decides "no image" by tensor size, so raw should pass too)."""
    from engines.base import SamplingParams as Sampling
    from engines.vllm.engine import sampling_params, vllm_image

    gundam = MODES["gundam"]
    params = sampling_params(Sampling(max_tokens=4, ngram_size=0), builder.whitelist, delta=False)
    result = {}
    page = balanced_page()
    for label, image in (("through_vllm_image", vllm_image(page, gundam)), ("raw", page)):
        try:
            out = llm.generate([builder.prompt(PROMPT, image, gundam)], params, use_tqdm=False)[0]
            result[label] = (f"ok: {len(out.outputs[0].token_ids)} tokens, "
                             f"{len(out.prompt_token_ids)} prompt ids")
        except Exception as exc:  # the point of the probe: record how vLLM fails
            result[label] = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
            break
    return result


# ------------------------------------------------------------------------------------ ours (parent)


def our_forced_logprobs(ocr: Any, request: Any, cont: list[int]) -> Any:
    """log-softmax (CONT_TOKENS, V) predicting each continuation token, from one full forward pass.

    deepseek_ocr.py exposes decoding of the last position only; this wires the same public modules
    (embeddings, encode_image, layers, norm, lm_head, rope_tables, KVCache) over the whole sequence.
    """
    import torch

    from deepseek_ocr import KVCache

    model, cfg = ocr.model, ocr.model.config
    ids = torch.tensor(request.input_ids + cont, device=ocr.device)
    with torch.inference_mode():
        x = model.model.embed_tokens(ids)  # (L, H)
        if request.images is not None:
            slots = ids == ocr.image_token_id
            x[slots] = model.model.encode_image(request.images).to(x.dtype)
        length = ids.shape[0]
        positions = torch.arange(length, device=ocr.device)[None]  # (1, L)
        cos, sin = model.rope_tables(length)
        rope = (cos[positions][:, None].to(x.dtype), sin[positions][:, None].to(x.dtype))  # (1, 1, L, hd)
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, length, x.dtype,
                        ocr.device)
        mask = torch.ones(length, length, dtype=torch.bool, device=ocr.device).tril()[None, None]
        h = x[None]
        for i, layer in enumerate(model.model.layers):
            h = layer(h, rope, cache, i, mask)
        start = len(request.input_ids) - 1  # the position that predicts cont[0]
        logits = model.lm_head(model.model.norm(h[0, start : start + CONT_TOKENS])).float()
        return torch.log_softmax(logits, dim=-1)


def compare(ckpt: str, dtype: str, vres: dict[str, Any]) -> dict[str, Any]:
    import torch

    from deepseek_ocr import DeepseekOCR, SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ocr = DeepseekOCR.from_pretrained(ckpt, device="cuda", dtype=dtype, max_model_len=4096)
    rows, agree, total, max_diff = [], 0, 0, 0.0
    per_mode: dict[str, list[Any]] = {}  # mode -> [agree, positions, all ids equal]
    for i, case in enumerate(CASES):
        mode: ModeSpec = MODES[case.mode]
        v = vres["cases"][case.name]
        image = synth_page(case.size, i)
        cont = continuation(ocr.tokenizer, i)
        req = ocr.prepare(PROMPT, image, base_size=mode.base_size, image_size=mode.image_size, crop=mode.crop,
                          sampling=SamplingParams(max_tokens=CONT_TOKENS))
        ours_ids = req.input_ids + cont
        v_ids = v["prompt_token_ids"]
        lsm = our_forced_logprobs(ocr, req, cont)  # (64, V)
        top2 = lsm.topk(2, dim=-1)
        case_agree, case_diff, flips = 0, 0.0, []
        for j, entries in enumerate(v["positions"]):
            v_top = min(entries, key=lambda e: e[2] if e[2] is not None else 1 << 30)[0]
            ours_top = int(top2.indices[j, 0])
            if v_top == ours_top:
                case_agree += 1
            else:
                margin = float(top2.values[j, 0] - top2.values[j, 1])
                ranked = sorted(e[1] for e in entries)[::-1]
                flips.append({"pos": j, "ours": ours_top, "vllm": v_top, "our_margin": round(margin, 5),
                              "vllm_margin": round(ranked[0] - ranked[1], 5) if len(ranked) > 1 else None,
                              "our_lp_of_vllm_top": round(float(lsm[j, v_top]), 5)})
            for tok, lp, _rank in entries:
                case_diff = max(case_diff, abs(float(lsm[j, tok]) - lp))
        free = ocr.generate([ocr.prepare(PROMPT, image, base_size=mode.base_size, image_size=mode.image_size,
                                         crop=mode.crop, sampling=SamplingParams(max_tokens=CONT_TOKENS))])[0]
        prefix = 0
        for a, b in zip(free.token_ids, v["greedy"], strict=False):
            if a != b:
                break
            prefix += 1
        image_id = ocr.image_token_id
        row = {
            "case": case.name, "mode": case.mode, "size": f"{case.size[0]}x{case.size[1]}",
            "prompt_tokens": [len(req.input_ids), len(v_ids) - CONT_TOKENS],
            "image_tokens": [req.image_tokens, sum(1 for t in v_ids if t == image_id)],
            "ids_equal": ours_ids == v_ids,
            "top1_agree": f"{case_agree}/{CONT_TOKENS}",
            "max_abs_logprob_diff": round(case_diff, 5),
            "greedy_common_prefix": f"{prefix}/{min(len(free.token_ids), len(v['greedy']))}",
            "flips": flips[:5],
        }
        rows.append(row)
        agree += case_agree
        total += CONT_TOKENS
        max_diff = max(max_diff, case_diff)
        mode_agree, mode_total, mode_ids = per_mode.setdefault(case.mode, [0, 0, True])
        per_mode[case.mode] = [mode_agree + case_agree, mode_total + CONT_TOKENS, mode_ids and row["ids_equal"]]
    del ocr
    torch.cuda.empty_cache()
    modes = {m: {"top1_agreement": round(a / n, 4), "agree": a, "positions": n, "ids_equal": ids}
             for m, (a, n, ids) in per_mode.items()}
    return {"dtype": dtype, "top1_agreement": round(agree / total, 4), "agree": agree, "positions": total,
            "max_abs_logprob_diff": round(max_diff, 5), "vllm_ready_s": vres.get("ready_s"),
            "probe_balanced_page": vres.get("probe"), "per_mode": modes, "accepted": accepted(dtype, modes),
            "cases": rows}


def top1(entries: list[list[Any]]) -> int:
    """The top-ranked token of one position's prompt logprobs ([token, logprob, rank] entries)."""
    return int(min(entries, key=lambda e: e[2] if e[2] is not None else 1 << 30)[0])


def margin(entries: list[list[Any]]) -> float | None:
    """Top-1 minus top-2 logprob of one position (0.0: a tie the engine breaks by index); None if one listed."""
    lps = sorted((lp for _, lp, _ in entries), reverse=True)
    return round(lps[0] - lps[1], 5) if len(lps) > 1 else None


def compare_kv(base: dict[str, Any], fp8: dict[str, Any], pages: int = 1) -> dict[str, Any]:
    """fp8 KV cache against bf16 (both vLLM, bfloat16 weights): top-1 agreement at every teacher-forced position,
    per mode; the largest logprob difference of a token both list; the greedy common prefix. Every flip is listed
    with both runs' top-1 margins, so a tie broken the other way shows as one."""
    rows, per_mode = [], {}
    for key, case, _ in kv_items(pages):
        a, b = base["cases"][key], fp8["cases"][key]
        agree, diff, flips = 0, 0.0, []
        for pos, (pa, pb) in enumerate(zip(a["positions"], b["positions"], strict=True)):
            same = top1(pa) == top1(pb)
            agree += same
            if not same:
                flips.append({"position": pos, "bf16_margin": margin(pa), "fp8_margin": margin(pb)})
            lp_b = {t: lp for t, lp, _ in pb}
            diff = max([diff] + [abs(lp - lp_b[t]) for t, lp, _ in pa if t in lp_b])
        prefix = 0
        for x, y in zip(a["greedy"], b["greedy"], strict=False):
            if x != y:
                break
            prefix += 1
        rows.append({"case": key, "mode": case.mode, "top1_agree": f"{agree}/{CONT_TOKENS}",
                     "max_abs_logprob_diff": round(diff, 5),
                     "greedy_common_prefix": f"{prefix}/{min(len(a['greedy']), len(b['greedy']))}",
                     "ids_equal": a["prompt_token_ids"] == b["prompt_token_ids"], "flips": flips})
        m = per_mode.setdefault(case.mode, [0, 0])
        m[0] += agree
        m[1] += CONT_TOKENS
    modes = {m: {"top1_agreement": round(a / n, 4), "agree": a, "positions": n} for m, (a, n) in per_mode.items()}
    ok = set(MODES) <= set(modes) and all(m["top1_agreement"] >= ACCEPT_TOP1 for m in modes.values())
    total = sum(m["agree"] for m in modes.values()), sum(m["positions"] for m in modes.values())
    return {"compare": "kv fp8 vs bf16 (vLLM, bfloat16 weights)", "top1_agreement": round(total[0] / total[1], 4),
            "per_mode": modes, "accepted": ok, "pages_per_case": pages, "cases": rows,
            "ready_s": [base.get("ready_s"), fp8.get("ready_s")]}


def print_kv(summary: dict[str, Any]) -> None:
    print(f"\n=== {summary['compare']}: top-1 agreement {summary['top1_agreement']:.2%}")
    for r in summary["cases"]:
        print(f"{r['case']:16} {r['mode']:6} top1 {r['top1_agree']:6} maxdiff {r['max_abs_logprob_diff']:<8} "
              f"greedy {r['greedy_common_prefix']:6} ids {'=' if r['ids_equal'] else 'DIFF'}")
        for f in r["flips"]:
            print(f"    flip at {f['position']}: top-1 margin bf16 {f['bf16_margin']}, fp8 {f['fp8_margin']}")
    for mode, m in summary["per_mode"].items():
        print(f"mode {mode:6}: top-1 {m['agree']}/{m['positions']} = {m['top1_agreement']:.2%}")
    print(f"ACCEPTANCE (every mode >= {ACCEPT_TOP1:.0%}): {'PASS' if summary['accepted'] else 'FAIL'}")


def vllm_child(args: argparse.Namespace, dtype: str, out: Path, extra: list[str]) -> str | None:
    """Run one vLLM child; None when it wrote `out`, else what went wrong."""
    env = dict(os.environ)
    if dtype == "float32":
        env.setdefault("TRITON_F32_DEFAULT", "ieee")  # Triton dots (MoE, attention) would use TF32
    cmd = [sys.executable, __file__, "--ckpt", args.ckpt, "--vllm-child", dtype, str(out), *extra]
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.child_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        return f"vLLM child timed out after {args.child_timeout}s: {str(exc.stderr or b'')[-3000:]}"
    if proc.returncode != 0 or not out.is_file():
        return f"vLLM child exited {proc.returncode}: {proc.stderr[-4000:]}"
    print(proc.stdout.strip(), flush=True)
    return None


def accepted(dtype: str, modes: dict[str, dict[str, Any]]) -> bool | None:
    """float32: every mode at ACCEPT_TOP1 or better, with identical prompt ids; other dtypes are informative."""
    if dtype != "float32":
        return None
    every = set(MODES) <= set(modes)
    return every and all(m["top1_agreement"] >= ACCEPT_TOP1 and m["ids_equal"] for m in modes.values())


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n=== dtype {summary['dtype']}: top-1 agreement {summary['agree']}/{summary['positions']} "
          f"= {summary['top1_agreement']:.2%}, max |logprob diff| {summary['max_abs_logprob_diff']}")
    print(f"{'case':16} {'mode':6} {'size':10} {'prompt ours/vllm':17} {'image ours/vllm':16} "
          "ids  top1   maxdiff greedy")
    for r in summary["cases"]:
        print(f"{r['case']:16} {r['mode']:6} {r['size']:10} {str(r['prompt_tokens']):17} "
              f"{str(r['image_tokens']):16} {'=' if r['ids_equal'] else 'DIFF':4} {r['top1_agree']:6} "
              f"{r['max_abs_logprob_diff']:<7} {r['greedy_common_prefix']}")
        for f in r["flips"]:
            print(f"    flip at {f['pos']}: ours {f['ours']} vllm {f['vllm']} (top-1 margins: ours "
                  f"{f['our_margin']}, vllm {f['vllm_margin']}; our logprob of vllm's pick "
                  f"{f['our_lp_of_vllm_top']})")
    for mode, m in summary["per_mode"].items():
        print(f"mode {mode:6}: top-1 {m['agree']}/{m['positions']} = {m['top1_agreement']:.2%}, "
              f"prompt ids {'equal' if m['ids_equal'] else 'DIFFER'}")
    if summary["accepted"] is not None:
        print(f"ACCEPTANCE (float32, every mode >= {ACCEPT_TOP1:.0%}, ids equal): "
              f"{'PASS' if summary['accepted'] else 'FAIL'}")
    print(f"balanced-page probe: {summary['probe_balanced_page']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="/tmp/eq-ckpt", help="checkpoint dir; written when missing")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, tried in order")
    parser.add_argument("--out", help="write the JSON summary here")
    parser.add_argument("--vllm-child", nargs=2, metavar=("DTYPE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-timeout", type=float, default=300)
    parser.add_argument("--kv", default="auto", choices=["auto", "fp8"], help=argparse.SUPPRESS)
    parser.add_argument("--kv-compare", action="store_true",
                        help="vLLM bf16 with its KV cache in fp8 against bf16, instead of ours against vLLM")
    parser.add_argument("--kv-pages", type=int, default=1, choices=range(1, 33), metavar="K",
                        help=f"--kv-compare: K pages and continuations a case (K x {CONT_TOKENS} positions; 1..32)")
    args = parser.parse_args()
    if args.vllm_child:
        run_vllm(args.ckpt, args.vllm_child[0], args.vllm_child[1], args.probe, args.kv, args.kv_pages)
        return 0

    if not (Path(args.ckpt) / "model.safetensors").is_file():
        from deepseek_ocr import make_tiny

        t = time.perf_counter()
        make_tiny(args.ckpt, seed=0, vision="real", decoder="small")
        print(f"wrote checkpoint {args.ckpt} in {time.perf_counter() - t:.0f}s", flush=True)
    if args.kv_compare:
        outs = {kv: Path(args.ckpt) / f"vllm-bfloat16-kv-{kv}.json" for kv in ("auto", "fp8")}
        for kv, out in outs.items():
            error = vllm_child(args, "bfloat16", out, ["--kv", kv, "--kv-pages", str(args.kv_pages)])
            if error is not None:
                print(f"=== KV cache {kv}: vLLM FAILED: {error}", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"kv_cache_dtype": kv, "error": error}, indent=1))
                return 1
        summary = compare_kv(*(json.loads(out.read_text()) for out in outs.values()), pages=args.kv_pages)
        print_kv(summary)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1))
        return 0 if summary["accepted"] else 1
    summaries: list[dict[str, Any]] = []
    dtypes = args.dtypes.split(",")
    for n, dtype in enumerate(dtypes):
        out = Path(args.ckpt) / f"vllm-{dtype}.json"
        # The probe may kill the engine core: only in the last child.
        error = vllm_child(args, dtype, out, ["--probe"] if n == len(dtypes) - 1 else [])
        if error is not None:
            summaries.append({"dtype": dtype, "error": error})
            print(f"=== dtype {dtype}: vLLM FAILED: {error}", flush=True)
            continue
        summary = compare(args.ckpt, dtype, json.loads(out.read_text()))
        summaries.append(summary)
        print_summary(summary)
    if args.out:
        Path(args.out).write_text(json.dumps(summaries, indent=1))
    if any(s.get("accepted") is False for s in summaries):
        return 1
    return 0 if any("top1_agreement" in s for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
