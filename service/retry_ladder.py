"""Second chances for runaway pages, the most reported DeepSeek-OCR failure (a line repeated to max_tokens).

A result is a runaway when it stopped at max_tokens and its text ends in a repeating cycle; with
CONFIDENCE_RETRY_BELOW set, a result whose mean token log-probability is under it climbs too. It is tried
again with a tighter n-gram guard, then in another served mode, then with the plain "Free OCR." prompt.
The first attempt that does not run away is kept (`retried`, or `degraded` when only the plain prompt
worked: its text has no layout); when every attempt runs away, the first one is kept, marked `truncated`.
Nothing is ever dropped. Plain functions, no service imports beyond the request type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from process.modes import MODES

OcrRequest = Any  # a pipeline.OcrRequest (a frozen dataclass: prompt, mode, sampling); no import, no cycle

FREE_PROMPT = "<image>\nFree OCR."
_TAIL_CHARS = 4000  # the cycle is looked for in this much of the end of the text
_MAX_PERIOD = 400  # longest repeating unit considered, in characters (a table row, a long sentence)
_MIN_REPEATS = 3
_MIN_SPAN = 60  # the repeated tail covers at least this many characters
_OTHER_MODE_ORDER = ("gundam", "base", "large", "small", "tiny")
MIN_TOKENS = 32  # a budget this small is the caller's choice, not a runaway


def repeating_tail(text: str) -> bool:
    """Whether `text` ends with one unit repeated at least 3 times over at least 60 characters."""
    tail = text[-_TAIL_CHARS:]
    n = len(tail)
    for period in range(1, min(_MAX_PERIOD, n // _MIN_REPEATS) + 1):
        repeats = max(_MIN_REPEATS, -(-_MIN_SPAN // period))
        span = period * repeats
        if span > n:
            continue
        if tail[-span:] == tail[-period:] * repeats:
            return True
    return False


def runaway(text: str, finish_reason: str | None, completion_tokens: int = MIN_TOKENS) -> bool:
    return finish_reason == "length" and completion_tokens >= MIN_TOKENS and repeating_tail(text)


def unsure(confidence: Any, below: float | None) -> bool:
    """The model was unsure of the page: its mean token log-probability under CONFIDENCE_RETRY_BELOW (off when
    unset). A page of fewer than MIN_TOKENS scored tokens is not judged, as a short budget is not a runaway."""
    return below is not None and confidence is not None and confidence.tokens >= MIN_TOKENS and \
        confidence.mean_logprob < below


def needs_retry(out: Any, below: float | None) -> bool:
    """A result (`EngineResult`) the ladder should try again: a runaway, or an unsure page."""
    return runaway(out.text, out.finish_reason, out.usage.completion_tokens) or unsure(out.confidence, below)


@dataclass(frozen=True)
class Step:
    change: str  # what this attempt changed, for the answer's `retries`
    request: OcrRequest
    degraded: bool  # the plain prompt: text without layout


def steps(request: OcrRequest, served_modes: tuple[str, ...]) -> list[Step]:
    """The attempts after the first, in order."""
    s = request.sampling
    size = max(3, min(s.ngram_size or 20, 20) // 2)
    window = max(s.ngram_window, 256)
    tight = dataclasses.replace(request, sampling=dataclasses.replace(s, ngram_size=size, ngram_window=window))
    ladder = [Step(f"n-gram guard {size}/{window}", tight, False)]
    other = next((m for m in _OTHER_MODE_ORDER if m != request.mode.name and m in served_modes), None)
    if other is not None:
        ladder.append(Step(f"mode {other}, n-gram guard {size}/{window}", dataclasses.replace(tight, mode=MODES[other]),
                           False))
    if request.prompt != FREE_PROMPT:
        ladder.append(Step(f"prompt {FREE_PROMPT!r}, n-gram guard {size}/{window}",
                           dataclasses.replace(tight, prompt=FREE_PROMPT), True))
    return ladder
