"""What the verifier sees of a session's next block before any draft arrives: whether its text repeats itself. Pure
math on token ids; the draft budget's acceptance by context (verifier_worker/budgeting.py).

A draft is accepted in runs. An n-gram drafter quotes its prompt: from a fresh start its first draft token lands ~40%
of the time, inside a quoted passage ~85%, and nothing lands where the text's last tokens occur nowhere earlier (it
has no match to draft from). The verifier holds every session's tokens, so it can tell which of these the next block
starts in, at no lag, for any drafter: its suffix bucket is the length of the longest suffix of the tokens so far that
also occurs earlier in them, capped at MAX_SUFFIX. On the real pair's 24 recorded PubMedQA answers (scripts/
replay_gamma.py), blocks of 4 by the bucket they started in, P(position j lands | the ones before it landed):

    bucket       n-gram j = 1 / 2 / 3 / 4      LM (the 0.5B draft) j = 1 / 2 / 3 / 4
    0            0.00 / -    / -    / -        0.71 / 0.76 / 0.80 / 0.80
    1            0.26 / 0.67 / 0.79 / 0.88     0.69 / 0.79 / 0.83 / 0.92
    2            0.67 / 0.83 / 0.90 / 0.86     0.84 / 0.86 / 0.94 / 0.93
    3+           0.85 / 0.87 / 0.88 / 0.91     0.93 / 0.93 / 0.92 / 0.91

(the n-gram's first position over all of them: 55%). The later positions depend on where the block started too (a
quote that began one token ago breaks sooner), and an LM's on it nearly as much as an n-gram's.

`SuffixIndex` keeps it incrementally (a dict per suffix length: O(MAX_SUFFIX) per token). `ContextRates` learns a
drafter's rate at every position per bucket from its verified blocks (decayed counts shrunk toward the session's own
rate at that position), which is what the grant reads for a session's next block in that bucket: per drafter, since
an LM's dependence on repetition is not an n-gram's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from specdec.acceptance import AcceptanceTracker
from specdec.config import MAX_GAMMA

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
    """A drafter's acceptance by position per suffix bucket: an `AcceptanceTracker` of its verified blocks per bucket,
    each block counted in the bucket it started in (a position past the first: given the ones before it landed)."""

    buckets: list[AcceptanceTracker] = field(default_factory=lambda: [
        AcceptanceTracker(max_gamma=MAX_GAMMA, prior=CONTEXT_PRIOR, forget=CONTEXT_FORGET)
        for _ in range(MAX_SUFFIX + 1)])

    def add(self, bucket: int, proposed: int, accepted: int, offered: int = 0) -> None:
        """One verified block, as `AcceptanceTracker.update` counts it (the first rejected, or offered but not
        drafted, position was reached too)."""
        self.buckets[bucket].update(proposed, accepted, offered)

    def rates(self, bucket: int, prior: list[float]) -> list[float]:
        """[len(prior)] every position's rate in `bucket`, each shrunk toward the session's own there (`prior`) by
        CONTEXT_PRIOR blocks."""
        return self.buckets[bucket].shrunk(prior)
