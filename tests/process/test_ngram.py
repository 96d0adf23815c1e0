"""Tests for process/ngram_norepeat.py: banned continuations, window, whitelist, batching, tokenizer ids."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from process.ngram_norepeat import NoRepeatNGramProcessor, banned_tokens

# Trigrams of SEQ: (1,2,3) (2,3,1) (3,1,2) (1,2,4) (2,4,1) (4,1,2). Prefix for the next step: (1,2).
SEQ = [1, 2, 3, 1, 2, 4, 1, 2]


def test_bans_exactly_the_seen_continuations() -> None:
    assert banned_tokens(SEQ, 3, 100) == {3, 4}  # (1,2) was followed by 3 and by 4
    assert banned_tokens([1, 2, 1, 2], 3, 100) == {1}  # (1,2,1), (2,1,2): prefix (1,2) -> 1
    assert banned_tokens([1, 2, 1, 2], 2, 100) == {1}  # prefix (2,): (2,1)
    assert banned_tokens([9, 8, 7, 6], 2, 100) == set()  # 6 never seen before


def test_window_limits_what_is_seen() -> None:
    # window 5: n-grams start at 8-5 = 3: (1,2,4) (2,4,1) (4,1,2) -> only 4.
    assert banned_tokens(SEQ, 3, 5) == {4}
    # window 3: only (4,1,2), whose head (4,1) is not the prefix.
    assert banned_tokens(SEQ, 3, 3) == set()
    # window == n still sees a run of one token.
    assert banned_tokens([5, 5, 5], 2, 2) == {5}


def test_nothing_before_ngram_size_tokens() -> None:
    assert banned_tokens([], 3, 10) == set()
    assert banned_tokens([7, 7], 3, 10) == set()
    assert banned_tokens([7, 7, 7], 3, 10) == {7}


def test_whitelist_never_banned() -> None:
    assert banned_tokens(SEQ, 3, 100, whitelist={3}) == {4}
    assert banned_tokens(SEQ, 3, 100, whitelist=frozenset({3, 4})) == set()


def test_disabled_and_invalid_settings() -> None:
    assert banned_tokens(SEQ, 0, 0) == set()
    assert banned_tokens(SEQ, -1, 5) == set()
    with pytest.raises(ValueError, match="ngram_size.*1"):
        banned_tokens(SEQ, 1, 10)
    with pytest.raises(ValueError, match="window.*4"):
        banned_tokens(SEQ, 5, 4)


def _naive(tokens: list[int], n: int, window: int, whitelist: set[int]) -> set[int]:
    """FACTS section 6, word for word."""
    if len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - (n - 1) :])
    out = set()
    for i in range(max(0, len(tokens) - window), len(tokens) - n + 1):
        if tuple(tokens[i : i + n - 1]) == prefix:
            out.add(tokens[i + n - 1])
    return out - whitelist


def test_matches_naive_rule_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(60))]
        n = rng.randrange(2, 6)
        window = rng.randrange(n, 40)
        assert banned_tokens(tokens, n, window, {3}) == _naive(tokens, n, window, {3}), (tokens, n, window)


def test_processor_batch_with_different_settings() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 16)
    before = logits.clone()
    generated = [
        SEQ,  # n=3, wide window: bans 3, 4
        [4, 6, 4, 7, 9, 4],  # n=2, window 4 sees (4,7) (7,9) (9,4): bans 7 but not 6
        [5, 5, 5, 5, 5],  # disabled: untouched
        [11, 12, 11],  # n=2, window 3 sees (11,12) (12,11); prefix (11,): bans 12
    ]
    out = NoRepeatNGramProcessor(whitelist_token_ids=[4])(logits, generated, [3, 2, 0, 2], [100, 4, 90, 3])
    assert out is logits  # in place
    banned = {(0, 3), (1, 7), (3, 12)}  # (0, 4) is whitelisted
    for row in range(4):
        for col in range(16):
            if (row, col) in banned:
                assert logits[row, col] == float("-inf"), (row, col)
            else:
                assert logits[row, col] == before[row, col], (row, col)


def test_processor_validates_inputs() -> None:
    proc = NoRepeatNGramProcessor()
    with pytest.raises(ValueError, match="one entry per logits row"):
        proc(torch.zeros(2, 8), [[1, 2]], [3], [10])
    with pytest.raises(ValueError, match="shape"):
        proc(torch.zeros(8), [[1]], [3], [10])
    with pytest.raises(ValueError, match="ngram_size"):
        proc(torch.zeros(1, 8), [[1, 2, 3]], [1], [10])
    with pytest.raises(ValueError, match="20"):
        proc(torch.zeros(1, 8), [[20, 20, 20]], [2], [10])


def _tokenizer(with_tags: tuple[str, ...]) -> Tokenizer:
    tok = Tokenizer(WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.add_special_tokens(list(with_tags))
    return tok


def test_from_tokenizer_resolves_td_tags() -> None:
    raw = _tokenizer(("<image>", "<td>", "</td>"))
    td, td_close = raw.token_to_id("<td>"), raw.token_to_id("</td>")
    assert {td, td_close} == {4, 5}
    assert NoRepeatNGramProcessor.from_tokenizer(raw).whitelist == {td, td_close}
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    proc = NoRepeatNGramProcessor.from_tokenizer(fast)
    assert proc.whitelist == frozenset({td, td_close})
    # The whitelisted tag survives a repeat that would ban it.
    logits = torch.zeros(1, 8)
    proc(logits, [[1, td, 1, td, 1]], [2], [10])
    assert logits[0, td] == 0


def test_from_tokenizer_skips_missing_tags() -> None:
    raw = _tokenizer(("<td>",))
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    for tok in (raw, fast):
        assert NoRepeatNGramProcessor.from_tokenizer(tok).whitelist == {raw.token_to_id("<td>")}
