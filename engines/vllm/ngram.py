"""A batch-level no-repeat n-gram guard for vLLM v1: the bans of vLLM's per-request processor, in tensor ops.

vLLM's `NGramPerReqLogitsProcessor` (vllm/model_executor/models/deepseek_ocr.py) wraps one Python object per
request, and every decoding step calls each of them: a window scan in Python and two small tensor writes
per sequence, so 256 sequences cost 256 Python calls and ~500 kernel launches per step. `NGramBatchProcessor`
computes the same bans for every guarded row of the batch at once:

- a token history on the device, one row per guarded request (a slot), written incrementally: each step
  appends the tokens vLLM added to the request's live output list since the last step (usually one);
- `ngram_bans`: for each row, the last n-1 output tokens (the prefix) are compared with the n-1 tokens before
  every position of the row's window (one `unfold` compare); a position whose predecessors equal the prefix
  has its token banned, unless whitelisted;
- `apply_bans`: one `scatter_reduce_(amin)` writes -inf at every banned (row, token); duplicates are harmless.
- few guarded rows (`host_rows`, 8): those tensor ops cost ~40 kernel launches a step whatever the batch, a
  fifth of a lone sequence's engine-core time in a GPU profile (docs/BENCHMARKS.md section 22). Then each row's
  bans come from its live output list in plain Python (`host_bans`, the same rule), and one `index_fill_` writes them,
  none when nothing is banned; the device history catches up from the lists when the batch grows again.

The rule (vLLM's `NoRepeatNGramLogitsProcessor`, which this must equal ban for ban), with L output tokens
(never prompt tokens), n = ngram_size, w = window_size: nothing is banned while L < n; otherwise every n-gram
starting at i in [max(0, L - w), L - n] whose first n-1 tokens equal the last n-1 tokens bans its last token;
whitelisted ids are never banned. Edge cases as vLLM has them: n = 1 bans nothing (vLLM's prefix slice
`[-(n-1):]` is then the whole output, which no empty n-gram head equals); w < n bans nothing (empty range).

Request settings come from `SamplingParams.extra_args` with vLLM's keys and defaults (`ngram_size`,
`window_size` = 100, `whitelist_token_ids`), validated as vLLM validates them, so a request means the same
thing under either processor. One difference: an empty `extra_args` ({}) is "guard off" here, where vLLM's
check turns it into a ValueError (its `extra_args and ...` yields {} instead of None).

Like any custom logits processor in vLLM 0.26, it keeps the engine on the V1 model runner.

The pure-torch core (`ngram_bans`, `apply_bans`) and the bookkeeping import without vLLM, for CPU tests;
the class derives from vLLM's `LogitsProcessor` when vLLM is importable (its loader requires the subclass).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:  # vLLM's interface when present; stand-ins with the same names otherwise (CPU tests)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _Base
    from vllm.v1.sample.logits_processor import MoveDirectionality
except ImportError:  # pragma: no cover - exercised on machines without vLLM
    _Base = object  # type: ignore[assignment,misc]

    class MoveDirectionality(enum.Enum):  # type: ignore[no-redef]
        UNIDIRECTIONAL = enum.auto()
        SWAP = enum.auto()


DEFAULT_WINDOW = 100  # vLLM's default window_size when a request names none
# Elements of the (rows, window, n-1) compare held at once; larger problems are compared in chunks of n-1.
_COMPARE_BUDGET = 1 << 26
# Guarded rows up to which a step's bans are found on the host (plain Python, ~20 us a row) instead of on the device
# (a fixed ~40 small kernels and their launches).
HOST_ROWS = 8


# --------------------------------------------------------------------------------------- the pure core


def ngram_bans(
    tail: torch.Tensor,
    lengths: torch.Tensor,
    ngram_sizes: torch.Tensor,
    windows: torch.Tensor,
    whitelist: torch.Tensor | None = None,
    max_ngram: int | None = None,
) -> torch.Tensor:
    """Which tokens of `tail` are banned as each row's next token: a (G, M) bool mask over `tail`.

    tail: (G, M) integer tokens, each row's last M output tokens right-aligned (tail[:, -1] the newest);
        entries before a row's first output token may hold anything (they are never read as tokens).
    lengths: (G,) output tokens per row (L); ngram_sizes (n) and windows (w): (G,) per-row settings.
    whitelist: (G, K) ids never banned, padded with any negative id; None for none.
    max_ngram: max(ngram_sizes) when the caller knows it (saves a device sync); computed otherwise.
    M must be >= min(L, w) for every row that can ban (L >= n, w >= n, n >= 2).
    """
    rows, width = tail.shape
    if max_ngram is None:
        max_ngram = int(ngram_sizes.max()) if rows else 0
    span = max_ngram - 1  # D: the longest prefix compared
    if rows == 0 or width == 0 or span < 1:
        return torch.zeros(tail.shape, dtype=torch.bool, device=tail.device)
    n = ngram_sizes.to(torch.long).unsqueeze(1)  # (G, 1)
    # heads[g, e, k] = tail[g, e - span + k]: the `span` tokens before position e (e = width: the prefix).
    heads = torch.nn.functional.pad(tail, (span, 0), value=-1).unfold(1, span, 1)  # (G, M + 1, D)
    prefix = heads[:, width:, :]  # (G, 1, D)
    # Only the last n-1 of the D compared tokens count for a row: k >= D - (n - 1).
    ignored = (torch.arange(span, device=tail.device).unsqueeze(0) < span - (n - 1)).unsqueeze(1)  # (G, 1, D)
    match = torch.ones(tail.shape, dtype=torch.bool, device=tail.device)
    step = max(1, _COMPARE_BUDGET // max(1, rows * width))
    for k0 in range(0, span, step):
        k1 = min(span, k0 + step)
        same = heads[:, :width, k0:k1] == prefix[:, :, k0:k1]  # (G, M, chunk)
        match &= (same | ignored[:, :, k0:k1]).all(dim=2)
    # Position e holds the last token of an n-gram that starts in the window: e - (n-1) >= M - min(L, w).
    seen = torch.minimum(lengths.to(torch.long), windows.to(torch.long)).unsqueeze(1)  # (G, 1)
    position = torch.arange(width, device=tail.device).unsqueeze(0)  # (1, M)
    banned = match & (position >= width - seen + n - 1) & (n >= 2) & (tail >= 0)
    if whitelist is not None and whitelist.numel():
        banned &= ~(tail.unsqueeze(2) == whitelist.unsqueeze(1)).any(dim=2)
    return banned


def host_bans(output: list[int], n: int, window: int) -> list[int]:
    """The tokens one row bans next, from its output list: `ngram_bans`' rule for one row, in plain Python
    (a window of ~100 tokens: a loop of one comparison each beats numpy's per-call overhead several times).

    With M = min(L, window): an n-gram starting at j of the last M tokens (0 <= j <= M - n) whose first n-1
    tokens equal the last n-1 tokens bans its last token; negative tokens (an unrepaired async placeholder) are
    never banned. Whitelists are the caller's. Repeated ids may appear.
    """
    length = len(output)
    width = min(length, window)
    if n < 2 or width < n:
        return []
    tail = output[length - width :]
    last, prefix = tail[-1], tail[width - n + 1 :]
    return [tail[j + n - 1] for j in range(width - n + 1)
            if tail[j + n - 2] == last and tail[j : j + n - 1] == prefix and tail[j + n - 1] >= 0]


def apply_bans(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """Set logits[rows[g], tokens[g, e]] = -inf wherever banned[g, e]; returns the (possibly new) logits.

    One scatter with `amin`: a banned entry brings -inf, any other +inf (no change), so repeated tokens in a
    row - banned or not - need no de-duplication and the result does not depend on write order.
    """
    vocab = logits.shape[1]
    if not logits.is_contiguous():
        logits = logits.contiguous()
    ok = banned & (tokens < vocab)
    index = rows.to(torch.long).unsqueeze(1) * vocab + tokens.to(torch.long).clamp(0, vocab - 1)
    src = torch.full(ok.shape, float("inf"), dtype=logits.dtype, device=logits.device).masked_fill_(ok, float("-inf"))
    logits.view(-1).scatter_reduce_(0, index.reshape(-1), src.reshape(-1), reduce="amin", include_self=True)
    return logits


# --------------------------------------------------------------------------------------- request settings


def request_settings(extra_args: Mapping[str, Any] | None) -> tuple[int, int, tuple[int, ...]] | None:
    """(ngram_size, window_size, whitelist) of one request, None when its guard is off.

    The keys, default window and checks of vLLM's `NGramPerReqLogitsProcessor.validate_params`; a bad value
    raises ValueError (vLLM turns it into the request's error).
    """
    if not extra_args:
        return None
    size = extra_args.get("ngram_size")
    if size is None:
        return None
    window = extra_args.get("window_size", DEFAULT_WINDOW)
    whitelist = extra_args.get("whitelist_token_ids")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"ngram_size must be a positive integer (or absent for no guard), got {size!r}")
    if not isinstance(window, int) or window <= 0:
        raise ValueError(f"window_size must be a positive integer, got {window!r}")
    if whitelist is not None and not isinstance(whitelist, Iterable):
        raise ValueError(f"whitelist_token_ids must be a sequence of token ids, got {whitelist!r}")
    return int(size), int(window), tuple(sorted({int(t) for t in whitelist})) if whitelist else ()


@dataclass
class _Guarded:
    """One guarded request: where its history lives and how much of its live output list is there."""

    slot: int
    ngram: int
    window: int
    whitelist: tuple[int, ...]
    output: list[int]  # vLLM's live list: it grows (and, after a placeholder repair, changes) in place
    synced: int = 0  # output[:synced] is in the device history


class NGramBatchProcessor(_Base):
    """vLLM v1 logits processor: the n-gram bans of `NGramPerReqLogitsProcessor`, for the whole batch at once.

    State: `guarded` maps a batch row to its request (slot, settings, live output list); the device tensor
    `history` (max_num_seqs, max_model_len) holds each slot's output tokens by position. `update_state` only
    moves dict entries and slots (batch changes); `apply` syncs the new tokens (read there, not in
    `update_state`: with async scheduling vLLM repairs placeholder tokens just before sampling) and bans.
    Per step the Python work is one `len` and one `[-1]` per guarded row; the rest is numpy and torch.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.host_rows = HOST_ROWS  # up to this many guarded rows, bans are found on the host
        self.device = torch.device(device)
        self.pin = bool(is_pin_memory) and self.device.type == "cuda"
        self.capacity = int(vllm_config.model_config.max_model_len)  # no request outputs more tokens
        slots = int(vllm_config.scheduler_config.max_num_seqs)
        self.history = torch.zeros((slots, self.capacity), dtype=torch.int32, device=self.device)
        self.free = list(range(slots - 1, -1, -1))
        self.guarded: dict[int, _Guarded] = {}
        self._batch: _Batch | None = None  # the guarded rows as arrays, rebuilt after a batch change

    # ---- vLLM interface

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        request_settings(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False  # bans change the greedy choice

    def update_state(self, batch_update: Any) -> None:
        """Apply removed, then added, then moved rows (the order vLLM's interface prescribes)."""
        if not batch_update:
            return
        if self._batch is not None:
            self._batch.store()
            self._batch = None
        for row in batch_update.removed:
            self._drop(row)
        for row, params, _prompt, output in batch_update.added:
            self._drop(row)  # an added request may replace the row's previous one
            settings = request_settings(params.extra_args)
            if settings is not None and settings[0] >= 2:  # n = 1 never bans (see the module docstring)
                self.guarded[row] = _Guarded(self.free.pop(), *settings, output)
        for a, b, direction in batch_update.moved:
            first, second = self.guarded.pop(a, None), self.guarded.pop(b, None)
            if first is not None:
                self.guarded[b] = first
            if second is not None:
                if direction == MoveDirectionality.SWAP:
                    self.guarded[a] = second
                else:  # a one-way move into b: b's request left the batch (vLLM reports it only so)
                    self.free.append(second.slot)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.guarded:
            return logits
        if self._batch is None:
            self._batch = _Batch(self.guarded, self.capacity)
        batch = self._batch
        lengths = np.fromiter(map(len, batch.outputs), np.int64, batch.size)
        seen = np.minimum(lengths, batch.window)
        live = np.flatnonzero((seen >= batch.ngram) & (batch.rows < logits.shape[0]))
        if live.size <= self.host_rows:
            return self._apply_on_host(logits, batch, lengths, live)
        index, tokens = batch.new_tokens(lengths)
        if not index.size and not live.size:
            return logits
        # Everything this step needs goes to the device in one copy.
        whitelist = batch.whitelist[live]
        packed = np.concatenate([index, tokens, batch.rows[live], batch.slots[live], lengths[live],
                                 batch.ngram[live], batch.window[live], whitelist.reshape(-1)])
        data = torch.from_numpy(packed)
        data = data.pin_memory().to(self.device, non_blocking=True) if self.pin else data.to(self.device)
        w, g = index.size, live.size
        if w:
            self.history.view(-1)[data[:w]] = data[w : 2 * w].to(torch.int32)
        if not g:
            return logits
        rows, slots, lens, ngram, window = data[2 * w : 2 * w + 5 * g].view(5, g)
        width = int(seen[live].max())
        positions = lens.unsqueeze(1) - width + torch.arange(width, device=self.device)  # (G, M)
        tail = self.history.view(-1)[slots.unsqueeze(1) * self.capacity + positions.clamp(min=0)]
        banned = ngram_bans(tail, lens, ngram, window, data[2 * w + 5 * g :].view(whitelist.shape),
                            max_ngram=int(batch.ngram[live].max()))
        return apply_bans(logits, rows, tail, banned)

    def _apply_on_host(self, logits: torch.Tensor, batch: _Batch, lengths: np.ndarray,
                       live: np.ndarray) -> torch.Tensor:
        """Few guarded rows: each one's bans from its live output list (`host_bans`), written in one
        `index_fill_`. The device history is left behind; `new_tokens` catches it up from the lists when a step
        takes the device path again. As there, a row's last token counts as not yet synced (vLLM may have
        rewritten it in place: a repaired placeholder, a discarded token decoded again), and a shrunk list lowers
        its row's count."""
        np.minimum(batch.synced, np.maximum(lengths - 1, 0), out=batch.synced)
        vocab = logits.shape[1]
        found: list[int] = []
        for i in live.tolist():
            entry = batch.entries[i]
            base = int(batch.rows[i]) * vocab
            found += [base + t for t in host_bans(entry.output, entry.ngram, entry.window)
                      if t < vocab and t not in entry.whitelist]
        if not found:
            return logits
        if not logits.is_contiguous():
            logits = logits.contiguous()
        index = torch.tensor(found, dtype=torch.long)
        # Pinned and non-blocking, as the device path's copy: a copy from pageable memory would wait for the
        # forward pass queued before it, and with async scheduling the step's CPU work would wait with it.
        index = index.pin_memory().to(self.device, non_blocking=True) if self.pin else index.to(self.device)
        logits.view(-1).index_fill_(0, index, float("-inf"))
        return logits

    def _drop(self, row: int) -> None:
        entry = self.guarded.pop(row, None)
        if entry is not None:
            self.free.append(entry.slot)


class _Batch:
    """The guarded rows of one batch make-up as arrays (rows in ascending order), for `apply`."""

    def __init__(self, guarded: Mapping[int, _Guarded], capacity: int) -> None:
        self.entries = [guarded[row] for row in sorted(guarded)]
        self.size = len(self.entries)
        self.capacity = capacity
        self.outputs = [e.output for e in self.entries]

        def column(values: Iterable[int]) -> np.ndarray:
            return np.fromiter(values, np.int64, self.size)

        self.rows = column(sorted(guarded))
        self.slots = column(e.slot for e in self.entries)
        self.ngram = column(e.ngram for e in self.entries)
        self.window = column(e.window for e in self.entries)
        self.synced = column(e.synced for e in self.entries)
        widest = max((len(e.whitelist) for e in self.entries), default=0)
        self.whitelist = np.full((self.size, widest), -1, np.int64)
        for i, e in enumerate(self.entries):
            self.whitelist[i, : len(e.whitelist)] = e.whitelist

    def store(self) -> None:
        """Hand the synced counts back to the entries (the batch make-up is about to change)."""
        for entry, synced in zip(self.entries, self.synced.tolist(), strict=True):
            entry.synced = synced

    def new_tokens(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat history index, token) of every output token not yet on the device; marks them synced.

        Normally one token per row: its last (rewritten every step). A row just added (or resumed after
        preemption) brings its whole output so far; a list that shrank (tokens discarded) keeps its still-valid
        prefix. A negative token (an unrepaired async placeholder) is written but not counted as synced, so it
        is read again.
        """
        synced = np.minimum(self.synced, lengths)
        base = self.slots * self.capacity
        # The last token is written again even when it was synced: a placeholder vLLM repaired in place, or a
        # discarded token replaced within one step, leaves the length unchanged.
        one = np.flatnonzero((lengths > 0) & (lengths - synced <= 1))
        synced[one] = lengths[one] - 1
        index, owner = [base[one] + synced[one]], [one]
        tokens = [np.fromiter((self.outputs[i][-1] for i in one.tolist()), np.int64, one.size)]
        for i in np.flatnonzero(lengths - synced > 1).tolist():  # rare: a new or resumed request
            start, end = int(synced[i]), int(lengths[i])
            index.append(np.arange(base[i] + start, base[i] + end, dtype=np.int64))
            owner.append(np.full(end - start, i, np.int64))
            tokens.append(np.asarray(self.outputs[i][start:end], np.int64))
        index_all, tokens_all = np.concatenate(index), np.concatenate(tokens)
        self.synced = lengths.copy()
        negative = np.flatnonzero(tokens_all < 0)
        if negative.size:
            rows = np.concatenate(owner)[negative]
            np.minimum.at(self.synced, rows, index_all[negative] - base[rows])
        return index_all, tokens_all
