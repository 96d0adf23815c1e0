"""CPU tests of engines/vllm/ngram.py: the batched n-gram bans equal vLLM's per-request processor's.

The reference is vLLM's own `NoRepeatNGramLogitsProcessor` / `NGramPerReqLogitsProcessor` when vllm imports;
otherwise `reference_bans` below (vLLM's rule written out plainly) together with our PyTorch engine's
`process.ngram_norepeat.banned_tokens` where that one is defined (n >= 2, window >= n). `REFERENCE` says
which ran; pytest prints it in the header of a failure and with -v in `test_which_reference_ran`.

With vllm importable, one more test drives both processors from vLLM's own persistent batch (`InputBatch` on
the CPU). Sequences come from a 50-token vocabulary with copied runs, so n-grams up to 6 really repeat; windows are
shorter and longer than the outputs; rows mix sizes, windows, whitelists and the guard off.
"""

from __future__ import annotations

import importlib.util
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import tokens

from engines.vllm.ngram import (
    HOST_ROWS,
    MoveDirectionality,
    NGramBatchProcessor,
    apply_bans,
    host_bans,
    ngram_bans,
    request_settings,
)
from process.ngram_norepeat import banned_tokens

VLLM = importlib.util.find_spec("vllm") is not None
REFERENCE = (
    "vLLM's NoRepeatNGramLogitsProcessor / NGramPerReqLogitsProcessor"
    if VLLM
    else "plain-Python reference_bans + process.ngram_norepeat.banned_tokens (vllm not importable)"
)
VOCAB = 50


def reference_bans(output: list[int], n: int, window: int, whitelist: set[int]) -> set[int]:
    """vLLM's per-request rule, written out: n-grams starting in the last `window` outputs whose head is the
    last n-1 tokens ban their last token. n = 1 bans nothing in vLLM: its prefix slice [-(n-1):] = [0:] is
    the whole output, which the empty head of a 1-gram never equals."""
    if len(output) < n or n == 1:
        return set()
    prefix = output[len(output) - (n - 1) :]
    found = set()
    for i in range(max(0, len(output) - window), len(output) - n + 1):
        if output[i : i + n - 1] == prefix:
            found.add(output[i + n - 1])
    return found - whitelist


def vllm_bans(output: list[int], n: int, window: int, whitelist: set[int]) -> set[int]:
    """vLLM's own per-request processor on a zero logits row: the ids it set to -inf."""
    from vllm.model_executor.models.deepseek_ocr import NoRepeatNGramLogitsProcessor

    row = NoRepeatNGramLogitsProcessor(n, window, set(whitelist) or None)(list(output), torch.zeros(VOCAB))
    return set(torch.isinf(row).nonzero().flatten().tolist())


def expected_bans(output: list[int], n: int, window: int, whitelist: set[int]) -> set[int]:
    """The reference bans; without vLLM, our PyTorch guard must agree with the plain rule where it applies."""
    if VLLM:
        return vllm_bans(output, n, window, whitelist)
    plain = reference_bans(output, n, window, whitelist)
    if n >= 2 and window >= n:
        assert banned_tokens(output, n, window, frozenset(whitelist)) == plain, (output, n, window, whitelist)
    return plain


def repetitive(rng: random.Random, length: int) -> list[int]:
    return tokens.repetitive(rng, length, VOCAB)


def random_settings(rng: random.Random) -> dict[str, Any] | None:
    """extra_args as the service sends them (guard off = None), with sizes 1..6 and any window."""
    if rng.random() < 0.15:
        return None
    args: dict[str, Any] = {"ngram_size": rng.randint(1, 6)}
    if rng.random() < 0.85:  # else vLLM's default window (100)
        args["window_size"] = rng.choice([1, 2, 3, 5, 8, 13, 30, 60, 200, 1000])
    if rng.random() < 0.5:
        args["whitelist_token_ids"] = rng.sample(range(VOCAB), rng.randint(0, 4))
    return args


def settings_of(args: dict[str, Any] | None) -> tuple[int, int, set[int]] | None:
    got = request_settings(args)
    return None if got is None else (got[0], got[1], set(got[2]))


def test_which_reference_ran() -> None:
    print(f"reference: {REFERENCE}")
    assert reference_bans([1, 2, 3, 1, 2, 4, 1, 2], 3, 100, set()) == {3, 4}


# --------------------------------------------------------------------------------------- the pure core


@pytest.mark.parametrize("seed", range(6))
def test_ngram_bans_equal_reference(seed: int) -> None:
    """Random batches straight through `ngram_bans` + `apply_bans`, the tail cut as tight as allowed."""
    rng = random.Random(seed)
    for _ in range(25):
        rows = rng.randint(1, 12)
        outputs = [repetitive(rng, rng.choice([0, 1, 2, 3, 5, 9, 20, 40, 90, 150])) for _ in range(rows)]
        settings = [settings_of(random_settings(rng)) for _ in range(rows)]
        sizes = [s[0] if s else 0 for s in settings]
        windows = [s[1] if s else 1 for s in settings]
        lists = [sorted(s[2]) if s else [] for s in settings]
        width = max(max(min(len(o), w) for o, w in zip(outputs, windows, strict=True)), rng.randint(0, 3))
        tail = torch.full((rows, width), -7, dtype=torch.int32)  # junk before each row's first token
        for r, out in enumerate(outputs):
            kept = out[max(0, len(out) - width) :]
            if kept:
                tail[r, width - len(kept) :] = torch.tensor(kept, dtype=torch.int32)
        widest = max(map(len, lists))
        whitelist = torch.full((rows, widest), -1, dtype=torch.long)
        for r, ids in enumerate(lists):
            whitelist[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        banned = ngram_bans(tail, torch.tensor([len(o) for o in outputs]), torch.tensor(sizes),
                            torch.tensor(windows), whitelist)
        logits = torch.randn(rows + 2, VOCAB)
        row_ids = torch.arange(rows) + 1  # rows of the logits need not be 0..G-1
        got = apply_bans(logits.clone(), row_ids, tail, banned)
        for r in range(rows):
            want = expected_bans(outputs[r], sizes[r], windows[r], set(lists[r])) if settings[r] else set()
            inf = set(torch.isinf(got[r + 1]).nonzero().flatten().tolist())
            assert inf == want, (outputs[r], settings[r], inf, want)
            keep = [t for t in range(VOCAB) if t not in want]
            assert torch.equal(got[r + 1, keep], logits[r + 1, keep])
        assert torch.equal(got[0], logits[0]) and torch.equal(got[-1], logits[-1])


def test_edge_cases() -> None:
    seq = [1, 2, 3, 1, 2, 4, 1, 2]

    def one(out: list[int], n: int, w: int, wl: tuple[int, ...] = ()) -> set[int]:
        width = max(1, min(len(out), w))
        tail = torch.tensor([([-1] * width + out)[-width:]])
        wl_t = torch.tensor([list(wl)]) if wl else None
        mask = ngram_bans(tail, torch.tensor([len(out)]), torch.tensor([n]), torch.tensor([w]), wl_t)
        return set(tail[mask].tolist())

    assert one(seq, 3, 100) == {3, 4}
    assert one(seq, 3, 5) == {4}  # n-grams start at 8-5=3
    assert one(seq, 3, 3) == set()  # only (4,1,2)
    assert one(seq, 3, 2) == set()  # window < n: vLLM's range is empty (our PyTorch guard refuses it)
    assert one([7, 7], 3, 10) == set() and one([7, 7, 7], 3, 10) == {7}
    assert one([5, 5, 5], 1, 10) == set()  # n = 1: nothing, as in vLLM
    assert one(seq, 3, 100, (3,)) == {4}
    assert one([], 2, 10) == set()


@pytest.mark.parametrize("seed", range(4))
def test_host_bans_equal_the_device_rule(seed: int) -> None:
    """`host_bans` (few rows, plain Python) bans what `ngram_bans` bans for the same row, placeholders (-1) included,
    and what the reference bans where there are none; whitelists are the caller's in both."""
    rng = random.Random(100 + seed)
    for _ in range(300):
        out = repetitive(rng, rng.choice([0, 1, 2, 3, 5, 9, 20, 40, 90, 150]))
        if out and rng.random() < 0.3:  # unrepaired async placeholders, at the end or (discarded) inside
            out[rng.choice([-1, rng.randrange(len(out))])] = -1
        n, window = rng.randint(1, 6), rng.choice([1, 2, 3, 5, 8, 13, 30, 60, 200, 1000])
        got = set(host_bans(out, n, window))
        width = max(1, min(len(out), window))
        tail = torch.tensor([([-7] * width + out)[-width:]])
        mask = ngram_bans(tail, torch.tensor([len(out)]), torch.tensor([n]), torch.tensor([window]))
        assert got == set(tail[mask].tolist()), (out, n, window)
        if -1 not in out:
            assert got == reference_bans(out, n, window, set()), (out, n, window)


def test_request_settings_follow_vllm_checks() -> None:
    assert request_settings(None) is None and request_settings({}) is None
    assert request_settings({"window_size": 5}) is None
    assert request_settings({"ngram_size": 3}) == (3, 100, ())
    assert request_settings({"ngram_size": 3, "window_size": 7, "whitelist_token_ids": [9, 2, 9]}) == (3, 7, (2, 9))
    for bad in ({"ngram_size": 0}, {"ngram_size": -2}, {"ngram_size": "3"}, {"ngram_size": 3, "window_size": 0},
                {"ngram_size": 3, "window_size": None}, {"ngram_size": 3, "whitelist_token_ids": 5}):
        with pytest.raises(ValueError):
            request_settings(bad)
        if VLLM:
            from vllm import SamplingParams
            from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor

            with pytest.raises(ValueError):
                NGramPerReqLogitsProcessor.validate_params(SamplingParams(extra_args=bad))


# --------------------------------------------------------------------------------------- the processor


class PerRequestReference:
    """Without vLLM: the per-request processor's contract (a row -> live output list map, each step the
    reference bans of each row); with vLLM, `NGramPerReqLogitsProcessor` itself is used instead."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[tuple[int, int, set[int]], list[int]]] = {}

    def update_state(self, update: Any) -> None:
        if not update:
            return
        for row in update.removed:
            self.rows.pop(row, None)
        for row, params, _prompt, output in update.added:
            self.rows.pop(row, None)
            if (settings := settings_of(params.extra_args)) is not None:
                self.rows[row] = (settings, output)
        for a, b, direction in update.moved:
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if second is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, ((n, window, whitelist), output) in self.rows.items():
            for token in expected_bans(output, n, window, whitelist):
                logits[row, token] = float("-inf")
        return logits


def reference_processor() -> Any:
    if VLLM:
        from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor

        return NGramPerReqLogitsProcessor(None, torch.device("cpu"), False)
    return PerRequestReference()


class FakeBatch:
    """vLLM's persistent batch as the logits processors see it (gpu_input_batch.py): removed rows are refilled
    by added requests lowest first, then the batch is condensed by one-way moves from its end; swaps now and
    then; each step every request's live output list gets one token (a -1 placeholder first when `async_`,
    repaired just before sampling, as vLLM's async scheduling does)."""

    def __init__(self, rng: random.Random, slots: int, async_: bool) -> None:
        self.rng, self.slots, self.async_ = rng, slots, async_
        self.rows: list[dict[str, Any] | None] = []  # each: output list, the token stream it will produce
        self.steps_left: list[int] = []

    def step(self) -> SimpleNamespace | None:
        """Finish some requests, add some, condense, maybe swap: the BatchUpdate vLLM would send (or None).

        As in vLLM, a hole refilled by an added request or by a condensing move is not reported as removed."""
        rng = self.rng
        holes = [i for i, left in enumerate(self.steps_left) if left <= 0 or rng.random() < 0.03]
        for i in holes:
            self.rows[i] = None
        added, moved = [], []
        for _ in range(rng.randint(0, 3)):
            if len(self.rows) - len(holes) >= self.slots:
                break
            stream = repetitive(rng, 400)
            resumed = stream[: rng.choice([0, 0, 0, 5, 30])]  # a resumed (preempted) request has outputs
            request = {"output": list(resumed), "stream": stream, "args": random_settings(rng)}
            if holes:
                index = holes.pop(0)
                self.rows[index], self.steps_left[index] = request, rng.randint(1, 250)
            else:
                index = len(self.rows)
                self.rows.append(request)
                self.steps_left.append(rng.randint(1, 250))
            added.append((index, SimpleNamespace(extra_args=request["args"]), [0], request["output"]))
        while holes:  # condense: the last live row moves into the lowest hole
            last = max(i for i, r in enumerate(self.rows) if r is not None) if any(self.rows) else -1
            if holes[0] >= last:
                break
            hole = holes.pop(0)
            self.rows[hole], self.steps_left[hole] = self.rows[last], self.steps_left[last]
            self.rows[last] = None
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
            self.steps_left.pop()
        if len(self.rows) >= 2 and rng.random() < 0.2:
            a, b = rng.sample(range(len(self.rows)), 2)
            self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            self.steps_left[a], self.steps_left[b] = self.steps_left[b], self.steps_left[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        if not (added or moved or holes):
            return None
        return SimpleNamespace(batch_size=len(self.rows), removed=sorted(holes, reverse=True), added=added,
                               moved=moved)

    def grow(self) -> None:
        """One decoded token per request (a placeholder first when async). Now and then a request first
        loses its last tokens (vLLM discards tokens after a KV-load failure) and decodes others there."""
        for i, request in enumerate(self.rows):
            out = request["output"]
            if out and self.rng.random() < 0.05:
                del out[-self.rng.randint(1, 3) :]
                request["stream"][len(out) % 400] = self.rng.randrange(VOCAB)
            out.append(-1 if self.async_ else request["stream"][len(out) % 400])
            self.steps_left[i] -= 1

    def repair(self) -> None:
        for request in self.rows:
            out = request["output"]
            if out and out[-1] == -1:
                out[-1] = request["stream"][(len(out) - 1) % 400]


@pytest.mark.parametrize("host_rows", [0, HOST_ROWS, 10**6], ids=["device", "mixed", "host"])
@pytest.mark.parametrize(("seed", "async_"), [(0, False), (1, True), (2, False), (3, True)])
def test_processor_equals_per_request_processor(seed: int, async_: bool, host_rows: int) -> None:
    """A few hundred steps of a changing batch (0 to 16 rows): batched and per-request processors give equal
    logits, with the bans found on the device every step, on the host every step, or (the default) on the host
    while few rows are guarded, so that the device history must catch up whenever the batch grows."""
    rng = random.Random(seed)
    slots = 16
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=slots),
                             model_config=SimpleNamespace(max_model_len=1024))
    ours, theirs = NGramBatchProcessor(config, torch.device("cpu"), False), reference_processor()
    ours.host_rows = host_rows
    paths = {"host": 0, "device": 0}
    on_host = ours._apply_on_host  # counted as it runs (a spy: the real method still finds the bans)

    def counted(*args: Any) -> torch.Tensor:
        paths["host"] += 1
        return on_host(*args)

    ours._apply_on_host = counted
    batch = FakeBatch(rng, slots, async_)
    banned_total = 0
    for step in range(300):
        update = batch.step()
        for request in update.added if update else ():
            NGramBatchProcessor.validate_params(request[1])
        batch.grow() if step else None
        ours.update_state(update)
        theirs.update_state(update)
        batch.repair()
        logits = torch.randn(len(batch.rows), VOCAB)
        want = theirs.apply(logits.clone())
        host_before = paths["host"]
        got = ours.apply(logits.clone())
        paths["device"] += bool(ours.guarded) and paths["host"] == host_before
        banned_total += int(torch.isinf(want).sum())
        for row in range(len(batch.rows)):
            assert torch.equal(got[row], want[row]), (
                f"step {step} row {row} ({REFERENCE}): output {batch.rows[row]['output'][-40:]} "
                f"args {batch.rows[row]['args']}: ours {set(torch.isinf(got[row]).nonzero().flatten().tolist())} "
                f"reference {set(torch.isinf(want[row]).nonzero().flatten().tolist())}"
            )
    assert banned_total > 500, banned_total  # the guard really banned things along the way
    if host_rows == HOST_ROWS:  # both paths ran, and switched
        assert min(paths.values()) > 20, paths
    assert sorted(ours.free + [g.slot for g in ours.guarded.values()]) == list(range(slots))  # no slot leaked


@pytest.mark.skipif(not VLLM, reason="needs vllm (its InputBatch drives the batch updates)")
def test_processor_under_vllm_input_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own persistent batch (InputBatch on the CPU: add, remove, condense, swap, refresh_metadata) drives
    our processor and vLLM's per-request one side by side; their logits must be equal at every step."""
    import vllm.v1.worker.gpu_input_batch as input_batch
    from vllm import SamplingParams
    from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor
    from vllm.v1.sample.logits_processor import LogitsProcessors

    if not torch.cuda.is_available():
        monkeypatch.setattr(input_batch, "PIN_MEMORY", False)
    rng = random.Random(7)
    slots, length = 12, 2048
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=slots),
                             model_config=SimpleNamespace(max_model_len=length))
    cpu = torch.device("cpu")
    ours, theirs = NGramBatchProcessor(config, cpu, False), NGramPerReqLogitsProcessor(config, cpu, False)
    batch = input_batch.InputBatch(
        max_num_reqs=slots, max_model_len=length, max_num_batched_tokens=4096, device=cpu, vocab_size=VOCAB,
        block_sizes=[16], kernel_block_sizes=[16], max_num_blocks_per_req=[length // 16],
        logitsprocs=LogitsProcessors([ours, theirs]), logitsprocs_need_output_token_ids=True)
    live: dict[str, list[Any]] = {}
    bans = 0
    for step in range(800):
        for rid in [r for r, (left, _) in live.items() if left <= 0 or rng.random() < 0.02]:
            batch.remove_request(rid)
            del live[rid]
        for _ in range(rng.randint(0, 3)):
            if len(live) >= slots:
                break
            rid = f"r{step}-{len(live)}"
            params = SamplingParams(temperature=0, extra_args=random_settings(rng))
            request = input_batch.CachedRequestState(
                req_id=rid, prompt_token_ids=[1, 2, 3], mm_features=[], sampling_params=params, generator=None,
                block_ids=([],), num_computed_tokens=3, output_token_ids=repetitive(rng, rng.choice([0, 0, 7, 40])))
            batch.add_request(request)
            live[rid] = [rng.randint(5, 300), request]
        batch.condense()
        if batch.num_reqs >= 2 and rng.random() < 0.3:
            batch.swap_states(*rng.sample(range(batch.num_reqs), 2))
        batch.refresh_metadata()
        logits = torch.randn(batch.num_reqs, VOCAB)
        want, got = theirs.apply(logits.clone()), ours.apply(logits.clone())
        assert torch.equal(got, want), f"step {step}: rows differ {(got != want).any(1).nonzero().flatten().tolist()}"
        bans += int(torch.isinf(want).sum())
        for entry in live.values():  # one decoded token each, often a copy of a recent one (loops)
            out = entry[1].output_token_ids
            out.append(out[-rng.randint(1, 6)] if len(out) > 6 and rng.random() < 0.6 else rng.randrange(VOCAB))
            entry[0] -= 1
    assert bans > 500, bans
    assert sorted(ours.free + [g.slot for g in ours.guarded.values()]) == list(range(slots))
