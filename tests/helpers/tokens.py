"""Token streams for the n-gram guard's tests and its per-step benchmark (`benchmarks/bench_ngram_step.py`)."""

from __future__ import annotations

import random


def repetitive(rng: random.Random, length: int, vocab: int, longest_copy: int = 12) -> list[int]:
    """Random tokens with copied stretches of 2..longest_copy tokens (as a looping decoder writes), so long
    n-grams recur."""
    out: list[int] = []
    while len(out) < length:
        if len(out) > 4 and rng.random() < 0.5:
            start = rng.randrange(len(out))
            out.extend(out[start : start + rng.randint(2, longest_copy)])
        else:
            out.append(rng.randrange(vocab))
    return out[:length]
