"""RttGamma: a per-request gamma schedule that learns the costs of a round and picks the best gamma.

After every verdict (or async commit) it updates four estimates and sets `gamma = specdec.gamma.choose_gamma(...)`:
- acceptance by position: decayed counts of blocks that reached / accepted each draft position, shrunk
  toward the pooled per-token rate (itself shrunk toward `prior_alpha`), or with a `history` toward the drafter's
  own rate at each position (moved by the request's pooled rate against the history's), so a position never reached
  gets the prior's rate and the first rounds pick a sane gamma;
- draft seconds per token (EMA), skipping the first drafted block: it was drafted while the verifier
  prefilled, and its time includes the draft model's own prefill of the prompt, which would make a token
  look many times dearer than it is; until a sample arrives it is the drafter's earlier requests' (`history`),
  or with none the gamma stays where it is. Async, a draft token costs no less than the chunks' own drafting time
  (`drafted`, an EMA kept by the history too), which needs no verdict;
- the network round trip, service excluded (EMA; an async session passes 0: its verifier never waits on
  the link);
- the verifier's service time as fixed_s + gamma * per_token_s: an EMA of the service time per block
  size, and a least-squares line through the sizes seen (so a size visited long ago still anchors it),
  flat while they span fewer than FIT_SPAN tokens.

min_gamma defaults to 0: a drafter that is never accepted (an n-gram table with no match, a mismatched
draft model) makes speculation a loss, and plain decoding rounds are the best it can do. It can come back:
now and then it drafts one position past the gamma it chose (gamma 1 from plain decoding), after 1, 2,
4, ... rounds, then every `probe_every` rounds, and from 1 again whenever it falls to plain decoding (an
answer whose first blocks are rejected may be accepted later). A request that opens at gamma 0 (its history's last
opening) while its history's latest request stood at 0 probes where that one had backed off to: starting from 1 in
every request, a drafter that does not pay probed at the 2nd, 5th, 10th and 19th commits of each answer, and an LM
drafter's first probe in an answer costs its draft model's prefill of the prompt. A probe re-measures a position it
would otherwise never reach again (a few unlucky early rejections there would pin the estimate low for good) and
gives the verifier's cost model another block size. A probe stands until a block goes out: the turn to draft
can come rounds after it fired (the verifier decoding alone, a budget of 0), and a probe that lasted one round
was lost there every time. Same interface as `draft_worker.drafters.AdaptiveGamma`:
`gamma`, `max_gamma` (the client lowers it to the verifier's limit), `update(...)`. With `decode_alone` (lock-step
against a verifier that decodes on its own while the client does not draft) gamma 0 pays no round trip.

Each position's rate is shrunk toward the pooled rate by `prior` = 8 pseudo-blocks. With 4, a request over-reacted
both ways: two misses took an LM draft (accepted ~80% a token over an answer) to gamma 0 and a hold of ~12 rounds
decoding alone, and three blocks accepted whole took it to blocks of 6-8 where its per-token acceptance fell to 68%.
Replayed on the real pair's greedy agreements (scripts/replay_gamma.py: 24 PubMedQA answers x 32 tokens, one session,
this CPU's costs), the LM's auto came to 0.957x the best fixed gamma with 4, 0.966x with 6, 0.978x with 8 and 0.975x
with 12, the n-gram to 0.99x with any; the whole sweep then read 0.98x at one session (run AE, README).

The acceptance prior: 0.5 by default, or the pooled rate of the drafter's earlier blocks in this process (`history`,
`new_history()`: every block of every request that shares it). The real pair's LM drafter is accepted ~75% of the
time, yet an answer's first blocks are often rejected: from 0.5, two early rejections take a request to gamma 0 at
a CPU verifier, where an LM draft only pays above ~60%, and it climbs back by probes and shadow blocks alone. With a
history, an answer's first OPENING_ROUNDS rounds are priced by the earlier requests' openings and kept out of the
request's own rates (specdec/acceptance.py: the real pair's answers open with one or two rejected blocks).

Also here: `FixedGamma` (a fixed block size behind the same interface) and `Link` (async: where the verifier
will be when a claim sent now arrives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specdec.config import MAX_GAMMA
from specdec.acceptance import OPENING_ROUNDS, AcceptanceTracker, DrafterAcceptance
from specdec.gamma import VerifyCost, choose_gamma

PROBE_COMMITS = 16  # async: commits between two chunks drafted although their drafting time said too late
FIT_SPAN = 2  # block sizes (draft tokens) the service times seen must span before a per-token cost is fitted


def ema(old: float | None, new: float, weight: float) -> float:
    """Exponential moving average; the first sample (old is None) is taken as is."""
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class DrafterHistory(DrafterAcceptance):
    """A drafter's acceptance over this process's requests (DrafterAcceptance), and its draft seconds per token (an
    EMA of its requests' samples; None before any): where a new request's estimates start."""

    draft_s: float | None = None
    opening_gamma: int | None = None  # what its latest request chose at its first round (None: none yet)
    probe_interval: int | None = None  # how far its latest request's probes had backed off (None: none yet)
    drafting_s: float | None = None  # async: an EMA of its chunks' own drafting time a token (None: none yet)


def new_history(forget: float = 0.99) -> DrafterHistory:
    """A drafter's acceptance over the requests of this process (a draft worker, `serve-draft`, a benchmark), for
    their schedules to share (`RttGamma.history`): each real or shadow block of any of them counts, decayed over
    ~1 / (1 - forget) blocks, and a new request's estimates start from its pooled rate instead of `prior_alpha`;
    its answer's opening rounds are priced by the earlier requests' openings (specdec.acceptance), and its draft
    time starts from theirs, so the opening's second block is chosen, not drafted at the first block's gamma. Its
    first block is drafted at the gamma the latest request chose at its first round (a fixed 4 before: an LM that
    does not pay at 4 async sessions drafted 3 chunks of each request before its first commit)."""
    return DrafterHistory(MAX_GAMMA, forget=forget)


@dataclass
class RttGamma:
    """Per request: after each verdict or commit, the gamma that maximises expected committed tokens per second."""

    gamma: int = 4  # the next block's gamma
    max_gamma: int = MAX_GAMMA
    min_gamma: int = 0
    probe_every: int = 16  # rounds between two probes one position past the chosen gamma
    probe_share: float = 0.05  # decode_alone: the most of a session's time its probes may cost
    prior: float = 8.0  # pseudo-blocks pulling each position's rate toward the pooled rate
    prior_alpha: float = 0.5  # the pooled rate before any verdict
    forget: float = 0.99  # per-round decay of the acceptance counts (~1 / (1 - forget) rounds of memory)
    smoothing: float = 0.2  # EMA weight of the newest draft, service and round-trip sample
    draft_s: float | None = field(default=None, init=False)  # seconds per draft token; None before any draft
    rtt_s: float | None = field(default=None, init=False)  # network round trip, service excluded
    decode_alone: bool = field(default=False, init=False)  # gamma 0: the verifier decodes on its own (no round trip)
    # this drafter's acceptance over the process's requests, shared by their schedules (new_history()): the pooled
    # rate each one shrinks toward instead of prior_alpha; None: every request starts from prior_alpha
    history: DrafterHistory | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_gamma <= self.gamma <= self.max_gamma:
            raise ValueError(f"need 0 <= min_gamma <= gamma <= max_gamma, "
                             f"got {self.min_gamma}, {self.gamma}, {self.max_gamma}")
        # acceptance by draft position, decayed by `forget` per round (the verifier's own estimator)
        self._counts = AcceptanceTracker(max(self.max_gamma, 1), self.prior, self.prior_alpha, self.forget)
        self._service: dict[int, float] = {}  # draft tokens of a block -> EMA of its service seconds
        self._rounds_since_probe = 0
        self._probe_interval = 1  # rounds to the next probe: 1, 2, 4, ... probe_every
        self._probe_due = False  # a probe fired and no block was drafted since: it stands until one is
        self._chosen = self.gamma
        self._skipped_prefill = False
        self._rounds = 0  # updates so far: with a history, the first OPENING_ROUNDS are the answer's opening
        self.draft_s = None if self.history is None else self.history.draft_s  # its drafter's (None: none yet)
        # async: an EMA of its chunks' own drafting time a token (`drafted`), from its drafter's
        self._drafting_s = None if self.history is None else self.history.drafting_s
        if self.history is not None and self.history.opening_gamma is not None:  # the first block: as the last opening
            self.gamma = self._chosen = min(max(self.history.opening_gamma, self.min_gamma), self.max_gamma)
            if self.gamma == 0 and self.history.probe_interval:  # a drafter at 0 probes where it had backed off to
                self._probe_interval = self.history.probe_interval

    def update(self, proposed: int, accepted: int, *, draft_s: float, service_s: float | None, rtt_s: float) -> None:
        """Learn from one verdict: `accepted` leading tokens of `proposed` drafted in `draft_s` seconds,
        verified in `service_s` (queue + compute; None: not a sample of a block's cost, e.g. its step carried another
        session's prefill, whose one outlier would price that block size for good if it is never chosen again),
        `rtt_s` the round trip minus service_s."""
        opening, draft_s_known = self._opening(), self._draft_cost() is not None
        self._rounds += 1
        self.observe(proposed, accepted, draft_s, opening=opening)
        if proposed:  # a block went out: the probe standing, if any, was drafted
            self._probe_due = False
        if service_s is not None:
            self._service[proposed] = ema(self._service.get(proposed), service_s, self.smoothing)
        self.rtt_s = ema(self.rtt_s, max(rtt_s, 0.0), self.smoothing)
        self.gamma = self._next_gamma()
        if self.history is not None and self._rounds == 1 and draft_s_known:  # chosen, not kept for want of a draft time
            self.history.opening_gamma = self._chosen

    def chunk_drafted(self) -> None:
        """Async: a chunk is being drafted at the current gamma, which spends a probe standing. Its tokens may never
        be verified (a commit contradicts its guess or passes it first), and a probe left standing until a verified
        one kept a slow LM drafting at every commit (4 tiny LM sessions: 63-113 chunks a level, 23-29 tokens verified).
        The gamma falls back to the one chosen at once: kept to the next commit, a probe of 1 token past gamma 0 drafted
        a chunk of 1 three times over (2 * gamma + 1 tokens ahead, draft_worker.loop)."""
        if self._probe_due:
            self._probe_due, self.gamma = False, self._chosen

    def drafted(self, draft_s: float) -> None:
        """Async: a chunk took `draft_s` a token to draft. A draft token is then priced at no less than its chunks'
        recent drafting time (an EMA), a lower bound of what a verified one costs: the price of a verdict (`observe`:
        the drafting time of every chunk since the last verified one, over the tokens verified) comes only with a
        verified chunk, and may be another load's (its drafter's history). Without it, 4 tiny LM sessions on a fresh
        draft side kept gamma 4 through whole answers for want of a draft time, drafting 5-17 chunks each (2-18 ms a
        token, the verifier's steps 8-9 ms) of which one or none was verified; and sessions that started from the
        history of one session, where chunks drafted at ~3 ms a token were verified, kept drafting at 4 sessions
        where the same chunks took 3-34 ms. Its drafter's history keeps an EMA of the same over its requests, where
        a new request's starts: the draft core's load is the drafter's, not one request's (at 4 sessions each
        request started from the 1-session level's 3 ms and drafted 4-8 chunks learning its own 8-17), and a request
        opening at gamma 0 with no draft time at all never probed (a schedule keeps its gamma while it has none), so
        nothing more was ever measured."""
        self._drafting_s = ema(self._drafting_s, draft_s, self.smoothing)
        if self.history is not None:
            self.history.drafting_s = ema(self.history.drafting_s, draft_s, self.smoothing)

    def observe(self, proposed: int, accepted: int, draft_s: float | None = None, *, opening: bool = False) -> None:
        """Learn acceptance and draft time alone: `accepted` leading tokens of `proposed` drafted in `draft_s` (a
        verdict's, or a shadow block's, checked against what the verifier committed on its own:
        draft_worker/shadow.py); gamma is chosen anew at the next `update`. A schedule at gamma 0 before any draft
        time was measured keeps its gamma until one is (see the module docstring), so shadow blocks measure it.
        opening: a block of the answer's opening, which tells the history's openings and not this request's rates."""
        if draft_s is not None and proposed:
            if self._skipped_prefill:
                self.draft_s = ema(self.draft_s, draft_s / proposed, self.smoothing)
                if self.history is not None:
                    self.history.draft_s = ema(self.history.draft_s, draft_s / proposed, self.smoothing)
            self._skipped_prefill = True
        accepted = min(accepted, proposed)
        if not opening:
            self._counts.update(proposed, accepted)
        if self.history is not None and proposed:
            self.history.update(proposed, accepted, opening=opening)

    def accept_rates(self) -> list[float]:
        """[max_gamma] estimated P(position i+1 accepted | positions 1..i accepted) for the next block."""
        if self.history is None:
            return self._counts.rates()[: self.max_gamma]
        return self.history.session_rates(self._counts, self._rounds)[: self.max_gamma]

    def _opening(self) -> bool:
        """The next round is in the answer's opening, and a history says what openings do."""
        return self.history is not None and self._rounds < OPENING_ROUNDS

    def opens_at(self, base: int) -> bool:
        """A shadow block drafted from the answer's `base`-th commit belongs to its opening (`observe(opening=...)`):
        the opening's rounds, the verifier decoding alone, commit one token each after the prefill's. Counted as the
        request's own, one opening shadow block rejected at position 2 held an LM to blocks of 1 for 8 rounds."""
        return self.history is not None and base <= OPENING_ROUNDS

    def verify_cost(self) -> VerifyCost:
        """(fixed_s, per_token_s) of the verifier's service time, fitted to the block sizes seen.

        With the sizes seen within FIT_SPAN - 1 tokens of each other the split is unknown: assume it is all
        fixed cost (their mean), as when decoding is memory-bound (one pass over the weights scores gamma + 1
        positions about as fast as one); a block size further off fixes it. A line through two neighbouring
        sizes is mostly noise: the real pair's verifier served blocks of 2 in 0.285 s and one of 3 in 0.334 s
        (an 8% outlier; others took 0.31), and that line priced a plain decoding step at 0.19 s where every step
        takes 0.29, so drafting looked hopeless and the session decoded alone for 19 rounds.
        """
        if not self._service:
            return (0.0, 0.0)
        if max(self._service) - min(self._service) < FIT_SPAN:
            return (sum(self._service.values()) / len(self._service), 0.0)
        points = self._service.items()
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        per_token_s = max(slope, 0.0)
        return (max(mean_y - per_token_s * mean_x, 0.0), per_token_s)

    def _draft_cost(self) -> float | None:
        """Seconds a draft token costs: the verdicts' price (`draft_s`), and no less than the chunks' own drafting
        time (`drafted`); None before either."""
        known = [s for s in (self.draft_s, self._drafting_s) if s is not None]
        return max(known) if known else None

    def _next_gamma(self) -> int:
        draft_s = self._draft_cost()
        if draft_s is None:  # no draft time measured yet (see the module docstring)
            if not self._hopeless(0.0):  # unless even free drafts could not pay: then choose 0 already
                return min(max(self.gamma, self.min_gamma), self.max_gamma)
            draft_s = 0.0
        chosen = choose_gamma(self.accept_rates(), draft_s, self.verify_cost(), self.rtt_s or 0.0,
                              self.max_gamma, self.decode_alone)
        chosen = min(max(chosen, self.min_gamma), self.max_gamma)
        if chosen == 0 < self._chosen:  # just fell to plain decoding: look again soon
            self._rounds_since_probe, self._probe_interval = 0, 1
        self._chosen = chosen
        if self.history is not None:  # where a request that opens at 0 probes from (None: this one drafts)
            self.history.probe_interval = self._probe_interval if chosen == 0 else None
        if self._probe_due and chosen < self.max_gamma:
            return chosen + 1
        self._rounds_since_probe += 1
        if self._rounds_since_probe > self._interval() and chosen < self.max_gamma:
            self._rounds_since_probe = 0
            self._probe_interval = min(2 * self._probe_interval, self.probe_every)
            self._probe_due = True
            return chosen + 1
        return chosen

    def _interval(self) -> float:
        """Rounds between probes. With decode_alone at gamma 0 a probe costs a round trip and a draft where the
        verifier alone would take one step: probes come at most `probe_share` of the time (a fast verifier far
        away: rarely), and never when even a draft accepted always could not beat the verifier alone."""
        if not (self.decode_alone and self._chosen == 0):
            return self._probe_interval
        draft_s, verify = self._draft_cost() or 0.0, self.verify_cost()
        if self._hopeless(draft_s):
            return math.inf
        probe_s = (self.rtt_s or 0.0) + draft_s + verify[1]  # what a 1-token probe adds to a step
        return max(self._probe_interval, probe_s / (self.probe_share * max(verify[0], 1e-9)))

    def _hopeless(self, draft_s: float) -> bool:
        """decode_alone: even a draft accepted always, at `draft_s` a token, could not beat the verifier alone, as
        measured: with a plain decoding step's service seen (until then what one costs is the line's extrapolation,
        and being hopeless stops the probes for the rest of the request)."""
        return (self.decode_alone and 0 in self._service
                and not choose_gamma([1.0] * self.max_gamma, draft_s, self.verify_cost(), self.rtt_s or 0.0,
                                     self.max_gamma, True))

    def rounds_to_probe(self) -> int | None:
        """Updates until the schedule next probes a gamma above the one it chose, or chooses anew as its answer's
        opening ends (at least 1; None: never). A gamma 0 chosen on the openings' rates stands for the opening alone:
        held to the next probe (~9 rounds for an LM draft at 0.13 s a token against 0.3 s steps), it kept a request
        whose later blocks were accepted ~80% decoding alone for 10 rounds past its opening."""
        interval = self._interval()
        rounds = None if interval == math.inf else max(1, math.ceil(interval - self._rounds_since_probe + 1))
        if self._opening():
            rounds = min(rounds or OPENING_ROUNDS, max(1, OPENING_ROUNDS - self._rounds))
        return rounds


@dataclass
class AutoGamma(RttGamma):
    """`--gamma auto` (issue 18): the client's own best gamma (RttGamma's, from its measured draft time,
    acceptance, service time and round trip), which the session caps at the verifier's draft budget of every
    round (`draft_worker.loop.ClientSession.gamma`). The client's rate is single-peaked in gamma, so that cap is
    `specdec.gamma.budgeted_gamma`: the best gamma within the budget, 0 for a draft too slow for its verifier.
    From a verifier that grants no budget it is RttGamma. tpot_slo_ms: this request's latency target, sent in
    the opening (OpenSession.tpot_slo_ms; 0: the verifier's default). says: tell the verifier this gamma with every
    message (Proposal.wants), so its grants stay within it; False is an older client (an A/B arm of
    scripts/measure_budget.py)."""

    tpot_slo_ms: float = 0.0
    says: bool = True


@dataclass
class FixedGamma:
    """A fixed block size, behind the schedules' interface (`gamma`, `max_gamma`, `update`)."""

    gamma: int
    max_gamma: int

    def update(self, *_, **__) -> None:
        pass


class Link:
    """Where the verifier will be when a claim arrives: the commits seen are half a round trip old, the claim
    takes another half, and drafting it takes `lead_s` before it goes, so it lands about (rtt_s + lead_s) /
    s_per_token commits past the last one seen. (A claim sent at once after a commit often makes the verifier's
    next step: not counting the step then running as lost kept an n-gram's 1-session async gain, 1.39-1.45x
    `Generate` against 1.30-1.38x with it counted.)

    rtt_s: the opening's round trip minus the verifier's prefill; s_per_token: an EMA of the verifier's time
    between two commits (its own clock, so replies that arrive bunched do not skew it) per committed token.
    A claim that ends before that point would only be checked and dropped.
    """

    def __init__(self, rtt_s: float):
        self.rtt_s, self.s_per_token = rtt_s, None
        self.drafted_at = 0  # the commit the last chunk was drafted from

    def on_commit(self, tokens: int, service_s: float) -> None:
        if tokens:
            self.s_per_token = ema(self.s_per_token, service_s / tokens, 0.2)

    def verifier_position(self, committed: int, lead_s: float = 0.0) -> float:
        """Where the verifier will be when a claim that goes `lead_s` from now arrives (`committed` before any
        commit was timed: everything is sent then)."""
        return committed if not self.s_per_token else committed + (self.rtt_s + lead_s) / self.s_per_token

    def worth_drafting(self, committed: int, end: int, lead_s: float) -> bool:
        """Draft a chunk ending at position `end` that takes `lead_s` to draft: it lands once drafted, or it would
        land but for its drafting time and PROBE_COMMITS commits passed since the last chunk, which measures that
        time again (the draft may have sped up). A draft slower a token than the verifier's steps never gets ahead
        of them: 4 LM sessions of the tiny pair drafting on one core (~10 ms a token against 9 ms steps) drafted
        66-98 chunks a level (256 tokens), 6-14 of their tokens verified. Skipping those cut their drafting time by
        a third (2.7 -> 1.85 s a level); the verifier's rate moved within its spread (docs/results.md, session 17)."""
        if end > self.verifier_position(committed, lead_s) or (
                end > self.verifier_position(committed) and committed - self.drafted_at >= PROBE_COMMITS):
            self.drafted_at = committed
            return True
        return False
