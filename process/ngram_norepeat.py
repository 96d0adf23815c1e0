"""No-repeat n-gram guard for DeepSeek-OCR decoding.

OCR decoders fall into loops (the same table row or line over and over until max_tokens). With the last
n-1 generated tokens as prefix, every token that completed the same prefix within the last `window`
generated tokens is banned for the next step. Only generated tokens count (never the prompt), and
whitelisted ids - the table cell tags `<td>`/`</td>`, which legitimately repeat - are never banned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from typing import Any

import torch

# Table cell tags repeat by nature (every row of an HTML table is `<td>...</td>` again).
WHITELIST_TOKENS = ("<td>", "</td>")


def _check_settings(ngram_size: int, window: int) -> None:
    if ngram_size < 2:
        raise ValueError(f"ngram_size must be >= 2 (or <= 0 to disable), got {ngram_size!r}")
    if window < ngram_size:
        raise ValueError(f"window must be >= ngram_size ({ngram_size}), got {window!r}")


def banned_tokens(
    generated: Sequence[int], ngram_size: int, window: int, whitelist: Set[int] = frozenset()
) -> set[int]:
    """Tokens that would repeat an n-gram seen in the last `window` generated tokens.

    ngram_size <= 0 disables the guard (empty set); otherwise ngram_size >= 2 and window >= ngram_size.
    """
    if ngram_size <= 0:
        return set()
    _check_settings(ngram_size, window)
    length = len(generated)
    if length < ngram_size:
        return set()
    tokens = list(generated[max(0, length - window) :])  # only the window is read; copy just that
    offset = length - len(tokens)
    prefix = tokens[len(tokens) - (ngram_size - 1) :]
    last = prefix[-1]
    banned: set[int] = set()
    # n-grams start at i in [max(0, length - window), length - ngram_size] (absolute positions).
    for i in range(0, length - ngram_size + 1 - offset):
        end = i + ngram_size - 1  # position of the n-gram's last token
        # Cheap check on the prefix's last token first; the full slice compare runs only on a hit.
        if tokens[end - 1] == last and tokens[i:end] == prefix:
            banned.add(tokens[end])
    return banned - whitelist


class NoRepeatNGramProcessor:
    """Logits processor: sets banned next tokens to -inf, each batch row with its own n and window."""

    whitelist: frozenset[int]

    def __init__(self, whitelist_token_ids: Iterable[int] = ()) -> None:
        self.whitelist = frozenset(int(t) for t in whitelist_token_ids)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> NoRepeatNGramProcessor:
        """Whitelist `<td>` and `</td>` by the tokenizer's own ids; tags it lacks are skipped.

        Works with a transformers tokenizer (`convert_tokens_to_ids`, unknown -> unk id or None) and with a
        bare `tokenizers.Tokenizer` (`token_to_id`, unknown -> None).
        """
        unk_id = getattr(tokenizer, "unk_token_id", None)
        ids = []
        for token in WHITELIST_TOKENS:
            if hasattr(tokenizer, "convert_tokens_to_ids"):
                token_id = tokenizer.convert_tokens_to_ids(token)
            else:
                token_id = tokenizer.token_to_id(token)
            if token_id is not None and token_id != unk_id:
                ids.append(token_id)
        return cls(ids)

    def __call__(
        self,
        logits: torch.Tensor,
        generated: Sequence[Sequence[int]],
        ngram_sizes: Sequence[int],
        windows: Sequence[int],
    ) -> torch.Tensor:
        """Ban repeats in place in `logits` (B, V) and return it; a row with ngram_size <= 0 is untouched."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if not len(generated) == len(ngram_sizes) == len(windows) == batch:
            raise ValueError(
                f"generated, ngram_sizes and windows need one entry per logits row ({batch}), got "
                f"{len(generated)}, {len(ngram_sizes)}, {len(windows)}"
            )
        rows: list[int] = []
        cols: list[int] = []
        for row, (tokens, n, window) in enumerate(zip(generated, ngram_sizes, windows, strict=True)):
            banned = banned_tokens(tokens, n, window, self.whitelist)
            rows.extend([row] * len(banned))
            cols.extend(banned)
        if cols:
            if min(cols) < 0 or max(cols) >= vocab:
                bad = min(cols) if min(cols) < 0 else max(cols)
                raise ValueError(f"generated token id {bad} is outside the vocabulary (size {vocab})")
            # One indexed write for the whole batch rather than one per row.
            index = torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)
            logits[index] = float("-inf")
        return logits
