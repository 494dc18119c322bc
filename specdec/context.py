"""What the verifier sees of a session's next block before any draft arrives: whether its text repeats itself. Pure
math on token ids; the draft budget's acceptance by context (verifier_worker/budgeting.py).

A draft is accepted in runs. An n-gram drafter quotes its prompt: from a fresh start its first draft token lands ~40%
of the time, inside a quoted passage ~85%, and nothing lands where the text's last tokens occur nowhere earlier (it
has no match to draft from). The verifier holds every session's tokens, so it can tell which of these the next block
starts in, at no lag, for any drafter: its suffix bucket is the length of the longest suffix of the tokens so far that
also occurs earlier in them, capped at MAX_SUFFIX. On the real pair's 24 recorded PubMedQA answers (scripts/
replay_gamma.py) the n-gram's first draft token landed in 0% of positions at length 0, 28% at 1, 68% at 2 and 78-87%
at 3 and more, against 55% over all of them.

`SuffixIndex` keeps it incrementally (a dict per suffix length: O(MAX_SUFFIX) per token). `ContextRates` learns a
drafter's first-position rate per bucket from its verified blocks (decayed counts shrunk toward the session's own
rate), which is what the grant reads for a session's next block in that bucket: per drafter, since an LM's
dependence on repetition is not an n-gram's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_SUFFIX = 3  # suffix lengths 0, 1, 2 and "3 or more": the recording's rate is flat past 3
CONTEXT_PRIOR = 4.0  # pseudo-blocks at the session's own rate, per bucket
CONTEXT_FORGET = 0.995  # per verified block of the drafter in that bucket


class SuffixIndex:
    """The longest suffix (<= MAX_SUFFIX tokens) of a token sequence that also occurs earlier in it, kept as tokens
    are appended. seen[n] maps each n-gram to whether it occurred ending before the last token."""

    def __init__(self, tokens: Iterable[int] = ()):
        self._tail: list[int] = []  # the last MAX_SUFFIX tokens
        self._seen: list[set[tuple[int, ...]]] = [set() for _ in range(MAX_SUFFIX + 1)]
        self._pending: list[tuple[int, ...]] = []  # the n-grams ending at the last token, added with the next one
        self.bucket = 0
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            for n, gram in enumerate(self._pending, start=1):
                self._seen[n].add(gram)
            self._tail = (self._tail + [token])[-MAX_SUFFIX:]
            self._pending = [tuple(self._tail[-n:]) for n in range(1, len(self._tail) + 1)]
            self.bucket = 0
            for n, gram in enumerate(self._pending, start=1):
                if gram not in self._seen[n]:
                    break
                self.bucket = n


@dataclass
class ContextRates:
    """A drafter's first-position acceptance per suffix bucket: decayed (landed, reached) counts of its verified
    blocks, each counted in the bucket its block started in."""

    landed: list[float] = field(default_factory=lambda: [0.0] * (MAX_SUFFIX + 1))
    reached: list[float] = field(default_factory=lambda: [0.0] * (MAX_SUFFIX + 1))

    def add(self, bucket: int, landed: bool) -> None:
        self.landed[bucket] = CONTEXT_FORGET * self.landed[bucket] + landed
        self.reached[bucket] = CONTEXT_FORGET * self.reached[bucket] + 1

    def rate(self, bucket: int, prior: float) -> float:
        """The first position's rate in `bucket`, shrunk toward `prior` (the session's own) by CONTEXT_PRIOR."""
        return (self.landed[bucket] + CONTEXT_PRIOR * prior) / (self.reached[bucket] + CONTEXT_PRIOR)
