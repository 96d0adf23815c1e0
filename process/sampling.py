"""Sampling settings of one generation: plain data shared by the HTTP process, the engines and the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_tokens: int = 8192
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    ngram_size: int = 0  # 0 = no n-gram guard
    ngram_window: int = 0
    seed: int | None = None

    def check(self) -> None:
        """Raise ValueError for settings that cannot be decoded with."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.ngram_size < 0 or self.ngram_size == 1:
            raise ValueError(f"ngram_size must be 0 (off) or >= 2, got {self.ngram_size!r}")
        if self.ngram_size and self.ngram_window < self.ngram_size:
            raise ValueError(f"ngram_window must be >= ngram_size ({self.ngram_size}), got {self.ngram_window!r}")
