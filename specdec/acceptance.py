"""Acceptance by draft position, per session: the estimate behind the verifier's draft budget (specdec/budget.py)
and the client's own gamma schedule (draft_worker/gamma.py: RttGamma).

A block of gamma draft tokens is accepted up to its first rejected position, so what a session's verdicts measure
is alpha_j = P(position j accepted | positions before it accepted), one rate per position; E(gamma), the
expected committed tokens of a block, follows from them (specdec.gamma.expected_tokens_table).

An answer's opening is a regime of its own. With the real pair (Qwen2.5-Coder 0.5B drafting for 1.5B) on 16
PubMedQA prompts at a fixed gamma 2, the first block of the answer was rejected outright in 12 of 16 answers and the
second in 8, the later blocks in about 1 of 10. Counted as the session's acceptance, those two rejections took a
new session's estimate from ~0.7 to ~0.3, below the ~0.45 an LM draft needs on a CPU verifier: the client and the
verifier both stopped drafting and the session decoded alone for 9-12 rounds before a probe or shadow blocks brought
it back (auto 0.90x a fixed gamma 2 at one session). So `DrafterAcceptance`, what the drafters seen so far did (the
client's history of one drafter, the verifier's population of sessions), keeps the first OPENING_ROUNDS rounds of
every answer apart: an opening round is priced by the openings of earlier answers, and a session's own estimate
starts after its opening. A drafter whose openings are like the rest of its answers loses nothing but those rounds'
evidence about its own session; one whose openings are worse drafts less there instead of stopping later. Shadow
blocks drafted in the opening (the verifier decoding it alone) count as the opening's on both sides too.

A session's own estimate starts from its drafter's rates by position (`DrafterAcceptance.session_rates`), not
from one pooled rate: the LM's blocks at a fixed gamma 2 landed at position 1 ~0.95 of the time and at 2 ~0.84 where
its pooled rate, over every position and miss, read ~0.77, the rate at which a block of 2 starts paying over one of 1
on a CPU verifier; pooled, its sessions were granted blocks of 1 (0.93 of a fixed gamma 2, session 24).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.gamma import expected_tokens_table

OPENING_ROUNDS = 2  # an answer's first rounds (verdicts, plain decoding steps included): its opening
CALIBRATION_PRIOR = 4.0  # promised tokens of pseudo-evidence that the estimates are right (Calibration)
CALIBRATION_FORGET = 0.99  # per granted block


@dataclass
class AcceptanceTracker:
    """One session's acceptance by draft position: decayed counts with a prior (a Beta per position).

    alpha_j = (accepted_j + prior * pooled) / (reached_j + prior), pooled = the session's rate over all
    positions, itself shrunk toward `prior_alpha` (for a new session: its drafter's rate); with its drafter's rates by
    position (`rates(prior_rates=...)`), each position is shrunk toward its own instead. So a position never reached
    gets the prior's rate, and the first verdicts move the estimate only so far. Every verdict
    multiplies the counts by `forget` (~1 / (1 - forget) verdicts of memory), so a session whose answer
    turns easy or hard is followed; a verdict of 0 draft tokens only decays, drifting a session that was
    denied drafts back toward the prior so it is given another try.
    """

    max_gamma: int = 16
    prior: float = 4.0  # pseudo-blocks pulling each position toward the pooled rate
    prior_alpha: float = 0.5  # the pooled rate before any verdict
    forget: float = 0.95
    _accepted: list[float] = field(default_factory=list, init=False)  # [positions] blocks accepting j
    _reached: list[float] = field(default_factory=list, init=False)  # [positions] blocks that reached j

    def update(self, proposed: int, accepted: int, offered: int = 0) -> None:
        """One verdict: the first `accepted` of `proposed` draft tokens were accepted. offered: the budget the
        block could have used; a client that drafted fewer (an n-gram with no match, its own smaller gamma)
        failed at position proposed + 1 as far as a grant is concerned: what a grant buys is what the client
        then sends, so E(gamma) counts the budget it leaves unused."""
        if not 0 <= accepted <= proposed:
            raise ValueError(f"need 0 <= accepted <= proposed, got {accepted}, {proposed}")
        self._accepted = [n * self.forget for n in self._accepted]
        self._reached = [n * self.forget for n in self._reached]
        # the first rejected (or offered but not drafted) position was reached too
        reached = min(accepted + 1, max(proposed, offered), self.max_gamma)
        grow = reached - len(self._reached)
        if grow > 0:
            self._accepted += [0.0] * grow
            self._reached += [0.0] * grow
        for j in range(reached):
            self._reached[j] += 1
            self._accepted[j] += float(j < accepted)

    def pooled(self, prior_alpha: float | None = None) -> float:
        """The session's acceptance over all positions, shrunk toward prior_alpha (default: its own)."""
        p = self.prior_alpha if prior_alpha is None else prior_alpha
        return (sum(self._accepted) + self.prior * p) / (sum(self._reached) + self.prior)

    def rates(self, prior_alpha: float | None = None, prior_rates: list[float] | None = None) -> list[float]:
        """[max_gamma] alpha_j = P(position j+1 accepted | positions 1..j accepted).

        prior_rates: [max_gamma] the population's own rates by position (`DrafterAcceptance`), whose pooled rate is
        prior_alpha: each position is then shrunk toward its own population rate, moved by this session's pooled rate
        against the population's (an odds ratio), instead of toward one pooled rate for every position. A drafter's
        positions differ: the real pair's LM blocks landed at position 1 ~0.95 of the time and at position 2 ~0.84,
        pooled ~0.77 over every position and miss, so a new session read 0.77 at both and was granted blocks of 1
        (blocks of 2 pay above ~0.77 there); an n-gram's later positions, once its match holds, ~0.9 where its first
        reads far less."""
        pooled = self.pooled(prior_alpha)
        if prior_rates is None:
            toward = [pooled] * self.max_gamma
        else:
            shift = _odds(pooled) / _odds(self.prior_alpha if prior_alpha is None else prior_alpha)
            toward = [_probability(_odds(rate) * shift) for rate in prior_rates[: self.max_gamma]]
            toward += [pooled] * (self.max_gamma - len(toward))
        return self.shrunk(toward)

    def shrunk(self, toward: list[float]) -> list[float]:
        """[len(toward)] each position's counts shrunk toward `toward`'s rate there by `prior` pseudo-blocks (a
        position never reached reads it)."""
        pad = max(0, len(toward) - len(self._reached))
        return [(a + self.prior * base) / (r + self.prior)
                for a, r, base in zip(self._accepted + [0.0] * pad, self._reached + [0.0] * pad, toward)]

    def expected_tokens(self, gamma: int, prior_alpha: float | None = None) -> float:
        """Expected committed tokens of this session's next block of gamma draft tokens."""
        return expected_tokens_table(self.rates(prior_alpha), gamma)[gamma]


def _odds(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return p / (1 - p)


def _probability(odds: float) -> float:
    return odds / (1 + odds)


@dataclass
class DrafterAcceptance:
    """What the sessions seen so far did, answers' openings (their first OPENING_ROUNDS rounds) kept apart: the
    prior a new session starts from (`pooled`, `rates`). Every real block counts, decayed over ~1 / (1 - forget)."""

    max_gamma: int = 16
    prior_alpha: float = 0.5
    forget: float = 0.99
    body: AcceptanceTracker = field(init=False)  # the rounds after the openings
    opening: AcceptanceTracker = field(init=False)  # the openings' rounds

    def __post_init__(self) -> None:
        self.body = AcceptanceTracker(self.max_gamma, prior_alpha=self.prior_alpha, forget=self.forget)
        self.opening = AcceptanceTracker(self.max_gamma, prior_alpha=self.prior_alpha, forget=self.forget)

    def update(self, proposed: int, accepted: int, offered: int = 0, *, opening: bool = False) -> None:
        proposed = min(proposed, self.max_gamma)
        (self.opening if opening else self.body).update(proposed, min(accepted, proposed), offered)

    def pooled(self) -> float:
        """The rate past the openings: where a session's own estimate starts."""
        return self.body.pooled()

    def opening_rates(self) -> list[float]:
        """[max_gamma] an opening round's rates: the openings seen, shrunk toward the rest's rate."""
        return self.opening.rates(self.pooled())

    def session_rates(self, tracker: AcceptanceTracker, rounds: int) -> list[float]:
        """[max_gamma] the rates of a session's next block after `rounds` rounds: in its answer's opening the
        openings seen, after it its own estimate (`tracker`, fed past its opening) shrunk toward the rest's rates by
        position (`AcceptanceTracker.rates`)."""
        if rounds < OPENING_ROUNDS:
            return self.opening_rates()
        return tracker.rates(self.pooled(), self.body.rates()[: tracker.max_gamma])


@dataclass
class Calibration:
    """The verifier's draft budget (verifier_worker/budgeting.py): accepted draft tokens granted blocks bought against
    those their grants promised, decayed sums (over ~1 / (1 - CALIBRATION_FORGET) blocks), and their ratio, shrunk
    toward 1 by CALIBRATION_PRIOR tokens, at most 1: what scales a drafter's estimates before a grant."""

    bought: float = 0.0
    promised: float = 0.0

    def add(self, bought: float, promised: float) -> None:
        self.bought = CALIBRATION_FORGET * self.bought + bought
        self.promised = CALIBRATION_FORGET * self.promised + promised

    def ratio(self) -> float:
        return min(1.0, (self.bought + CALIBRATION_PRIOR) / (self.promised + CALIBRATION_PRIOR))
