"""benchmarks/equivalence.py's FP8-against-bfloat16 KV comparison (the vLLM runs themselves are on the GPU
machine: `gpu_run.sh kvfp8`). The two runs' answers are built here, so every count has a known answer."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import equivalence  # noqa: E402

from config import MODES  # noqa: E402

N = equivalence.CONT_TOKENS


def run(pages: int, flips: dict[str, list[int]]) -> dict:
    """One run's answers: at each position token 7 leads token 9 by 0.5; at the positions in `flips[key]`
    token 9 leads instead (by 0.0156, a near-tie)."""
    cases = {}
    for key, _, seed in equivalence.kv_items(pages):
        positions = []
        for j in range(N):
            top, second = (9, 7) if j in flips.get(key, ()) else (7, 9)
            gap = 0.0156 if j in flips.get(key, ()) else 0.5
            positions.append([[top, -0.1, 1], [second, -0.1 - gap, 2]])
        cases[key] = {"prompt_token_ids": [1, 2, seed], "positions": positions, "greedy": [5] * 64}
    return {"cases": cases, "ready_s": 50.0}


def test_each_case_gets_k_pages_with_distinct_seeds_and_the_first_keeps_its_name() -> None:
    items = equivalence.kv_items(3)
    assert len(items) == 3 * len(equivalence.CASES)
    keys = [key for key, _, _ in items]
    seeds = [seed for _, _, seed in items]
    assert len(set(keys)) == len(keys) and len(set(seeds)) == len(seeds)
    assert keys[:3] == ["small-600x500", "small-600x500#1", "small-600x500#2"]
    assert [seed for key, _, seed in items if key == "tiny-a4"] == [11]  # the one-page runs' page
    assert equivalence.kv_items(1) == [(c.name, c, i) for i, c in enumerate(equivalence.CASES)]


def test_agreement_is_counted_over_every_page_of_every_mode() -> None:
    base = run(4, {})
    fp8 = run(4, {"tiny-a4#2": [3, 40], "tiny-square": [10], "large-a4#3": [5]})
    out = equivalence.compare_kv(base, fp8, pages=4)
    tiny, large, gundam = out["per_mode"]["tiny"], out["per_mode"]["large"], out["per_mode"]["gundam"]
    assert (tiny["agree"], tiny["positions"]) == (2 * 4 * N - 3, 2 * 4 * N)
    assert (large["agree"], large["positions"]) == (2 * 4 * N - 1, 2 * 4 * N)
    assert (gundam["agree"], gundam["positions"]) == (5 * 4 * N, 5 * 4 * N)
    assert out["pages_per_case"] == 4 and set(out["per_mode"]) == set(MODES)
    # Tiny: 509/512 = 99.41% >= 99%: accepted; one page's three flips alone would have failed it.
    assert out["accepted"] is True
    row = next(r for r in out["cases"] if r["case"] == "tiny-a4#2")
    assert row["top1_agree"] == f"{N - 2}/{N}"
    assert [(f["position"], f["bf16_margin"], f["fp8_margin"]) for f in row["flips"]] == [(3, 0.5, 0.0156),
                                                                                          (40, 0.5, 0.0156)]
    one = equivalence.compare_kv(run(1, {}), run(1, {"tiny-a4": [3, 40], "tiny-square": [10]}), pages=1)
    assert one["accepted"] is False and one["per_mode"]["tiny"]["agree"] == 2 * N - 3
