"""The verifier's draft budgeting: measures what `specdec.budget` decides from, and answers each session's
budget for its next block.

The engine (or whoever applies a step's outcomes) calls, all on the event loop:
- `open(key, max_gamma=..., tpot_slo_s=..., drafter=...)` when a session opens (`max_gamma=0` for `Generate`,
  which decodes one token a step: it adds to the step's cost and goodput, it is never granted drafts; drafter: the
  client's drafter name, whose sessions' acceptance a new one starts from);
- `on_step(compute_s, sessions, tokens, prefill_tokens)` after every step (tokens: all of the step's as the
  backend computed them, i.e. rows x longest row for a padding backend; prefill_tokens: its prompt chunks');
  it fits the step-cost curve;
- `on_verdict(key, proposed, accepted, offered)` for every verified block (a plain decoding step: proposed =
  0; offered: a lock-step block's budget, so budget its client left unused counts as buying nothing);
- `budget_for(key, queued_sessions, queued_tokens, prefilling)` when answering a session: the most draft
  tokens its next block may carry. queued_* = the prefill work waiting for the next step (sessions still
  prefilling, and their chunk tokens; `grants` says what of it is priced); prefilling = the keys of those
  sessions, which are that load and not also sessions sending a block;
- `dropped(tokens)` for draft tokens a block carried beyond its budget (counted, never verified);
- `on_shadow(key, drafted, accepted, gamma)` for a block the client drafted but did not send while the verifier
  decoded the session on its own (pb.ShadowVerdict: checked against the tokens committed since);
- `hold(key, grants)` when a lock-step proposal asks the verifier to decode that many steps alone (decode_alone);
- `decodes_at_zero(key)` when the verifier decodes a lock-step session on its own at budget 0 (server_decodes);
- `wants(key, gamma)` with the client's own best gamma (Proposal.wants, ShadowVerdict.wants): its grants stay within it;
- `late(key, offered)` when a step starts without a lock-step session that was granted drafts (it missed it);
- `arrives(key, turnaround_s, wait_s, drafter, round_trip_s, per_token_s)` with a lock-step session's measured
  turnaround (None: not yet), split into its round trip and its client's drafting per token, and the engine's wait;
- `close(key)` when the session ends.

The grant is made once per step, for every open session together (`specdec.budget.grant_budgets`): the first
`budget_for` after a step computes it, the others read it, so call `on_verdict` for all of a step's rows before
answering any of them (the place that applies a step's outcomes does). A session opened mid-step is added to it. Making
a grant is Python on the event loop between two steps (scripts/time_grant.py: 0.07 / 0.5 / 2.3 ms at 1 / 4 / 16
sessions here, up to 10% of a fast verifier's steps), so it is remade at most every ceil(grant time / (GRANT_SHARE x the
last step's compute)) steps, and up to STEADY_BACKOFF times less often while each remake gives the grant before and no
draft is accepted; a session opening, closing, asking to decode alone (`hold`) or leaving its answer's opening remakes
it at once, and so do a client's word that binds its cap (`wants`) and a session granted drafts that now misses steps
(`arrives`). New sessions' acceptance starts from the rates by position of recent verdicts with the same drafter (its
population: the client's model name, OpenSession.client_model_id, at most MAX_DRAFTERS; a client naming its drafter
after another's adds to that one's); an answer's first OPENING_ROUNDS rounds are priced by that drafter's openings and
kept out of the session's own estimate (specdec/acceptance.py). Before the first step the cost fit holds only its
prior (no cost), so every session may draft its cap; the first steps (the prefills) fit the curve.

Where the next block starts (`context`, the engine's: specdec/context.py): a session's rates by position are its
drafter's rates in the suffix bucket its text is in now (how much of its latest tokens occurred earlier), learnt from
that drafter's verified blocks, each counted in the bucket its grant saw; the session's own rates are the prior. An
n-gram's blocks land in runs (a quoted passage matches to its end), which the session's decayed estimate follows a
run late: replayed at 2-16 sessions (scripts/replay_gamma.py), the first position by bucket took `auto` from 0.94-0.97
to 0.96-1.00 of the best fixed gamma, and every position by bucket to 0.99-1.02 (docs/results.md, sessions 27-28).

Calibration: every grant above 0 to a lock-step session promises its block's expected accepted draft tokens, E(budget) -
1 from the session's estimate; its verdict says how many it bought. An async step verifies the drafts that have arrived
(as many as its grant allows, or fewer: a draft that comes late is no failure), and those promise E(verified) - 1 from
the estimate before its verdict. The ratio of the two over a drafter's sessions (decayed, shrunk toward 1, at most 1)
scales each of its sessions' first-position rate before the grant (per drafter: one server-wide ratio scaled an LM's
grants by an n-gram's bursts). Why: a grant follows evidence, which comes in bursts: at 4 n-gram sessions on a CPU its
shadow blocks landed at position 1 in 68% of cases where the real blocks granted on their strength landed in 37%, and
grants priced at a few percent of goodput cost 3-5% instead (`specdec_verifier_draft_budget_calibration`). An answer's
opening is neither measured nor scaled by it (its rounds are priced by the drafter's openings): counted, a verifier's
first LM answer, its opening blocks priced at the 0.5 prior and rejected, scaled the LM's grants by 0.77 for ~100 blocks.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Hashable

from specdec.acceptance import OPENING_ROUNDS, AcceptanceTracker, Calibration, DrafterAcceptance
from specdec.budget import Demand, Load, StepCostTable, grant_budgets, pays_a_missed_step, \
    predicted_gain
from specdec.gamma import expected_tokens_table, first_scaled, promised_tokens
from verifier_worker.budget_state import DrafterState, SessionState
from verifier_worker.metrics import BudgetMetrics

GRANT_SHARE = 0.02  # the most of the verifier's time that making grants may take (see the module docstring)
STEADY_BACKOFF = 4  # a grant that came out as the one before is remade up to this many times less often
MAX_DRAFTERS = 64  # drafter names whose population and latest turnaround are kept (the prior of new sessions)


class DraftBudgeter:
    """Per verifier: the step-cost fit, every session's acceptance, and the grant of the current step."""

    def __init__(self, max_gamma: int = 16, *, tpot_slo_s: float | None = None, cost: StepCostTable | None = None,
                 metrics: BudgetMetrics | None = None, forget: float = 0.95, prior_alpha: float = 0.5,
                 padded: bool = False, min_gain: float = 0.0):
        """max_gamma: the server's limit; tpot_slo_s: the default per-session latency target (None: none);
        forget: per-verdict decay of each session's acceptance counts; padded: the backend computes every row
        of a step at the longest row's length (the engine sets it from its backend's `pads_rows`); min_gain: grant
        drafts only when they promise at least that much more goodput than none (`grant_budgets`)."""
        if max_gamma < 0:
            raise ValueError(f"max_gamma must be >= 0, got {max_gamma}")
        self.max_gamma = max_gamma
        self.tpot_slo_s = tpot_slo_s
        self.cost = cost or StepCostTable()  # or a bare StepCostModel (the affine fit alone)
        self.metrics = metrics
        self.forget = forget
        self.padded = padded
        self.min_gain = min_gain
        self.prior_alpha = prior_alpha
        # per drafter name, every verdict of its sessions with a long memory: the prior of a new session's
        # acceptance, and what an answer's opening rounds are priced by (specdec.acceptance: openings apart)
        self._drafters: dict[str | None, DrafterState] = {}
        self._sessions: dict[Hashable, SessionState] = {}
        self._calibration = Calibration()  # over every drafter (the calibration gauge)
        self._grants: dict[Hashable, int] | None = None  # the latest grant; None: to be made at the next budget_for
        self._grant_s = 0.0  # what making the latest grant took
        self._grant_age = 0  # steps since it was made
        self._steady, self._last_grant = 1, None  # its reuse's multiple (1, 2, ... STEADY_BACKOFF), the grant before
        self.hold_s: float | None = None  # the most the engine holds a step for a late block (arrives; None: all)
        # a session's tokens' suffix bucket now (specdec/context.py; the engine sets it), None: not known
        self.context: Callable[[Hashable], int | None] | None = None
        self._rates: dict[Hashable, list[float]] = {}  # the acceptance each of this step's grants read (uncalibrated)
        if metrics is not None:  # the fit as a scrape finds it (solved when read, never on every step: `on_step`)
            fit = getattr(self.cost, "fit", self.cost)  # a StepCostTable's affine fit, or a bare StepCostModel
            metrics.cost_fixed.set_function(lambda: fit.peek()[0])
            metrics.cost_per_token.set_function(lambda: fit.peek()[1])

    def open(self, key: Hashable, max_gamma: int | None = None, tpot_slo_s: float | None = None,
             drafter: str | None = None) -> None:
        """A new session; max_gamma: the client's limit (None: the server's; 0: decode only); drafter: the client's
        drafter name (None: unnamed, one population of their own)."""
        self.close(key)  # opened again: one session still (its drafter counts it once)
        cap = self.max_gamma if max_gamma is None else max(0, min(max_gamma, self.max_gamma))
        tracker = AcceptanceTracker(max_gamma=max(self.max_gamma, 1), forget=self.forget)
        self._sessions[key] = SessionState(tracker, cap, self.tpot_slo_s if tpot_slo_s is None else tpot_slo_s,
                                       drafter=self._drafter(drafter))
        self._sessions[key].drafter.open += 1
        self._grants = None

    def _drafter(self, name: str | None) -> DrafterState:
        """The sessions drafting with `name` (made on first use; the most recently used MAX_DRAFTERS are kept, an
        open session keeps its own)."""
        drafter = self._drafters.pop(name, None) or self._new_drafter()
        self._drafters[name] = drafter  # the most recent last
        while len(self._drafters) > MAX_DRAFTERS:
            del self._drafters[next(iter(self._drafters))]
        return drafter

    def _new_drafter(self) -> DrafterState:
        return DrafterState(DrafterAcceptance(max(self.max_gamma, 1), prior_alpha=self.prior_alpha, forget=0.999))

    def _seen(self, name: str | None) -> DrafterState:
        """The sessions drafting with `name` as seen so far, for reading: neither made nor moved (a fresh one if none)."""
        return self._drafters.get(name) or self._new_drafter()

    def population_of(self, drafter: str | None = None) -> DrafterAcceptance:
        """The acceptance of the sessions drafting with `drafter`."""
        return self._seen(drafter).acceptance

    @property
    def population(self) -> DrafterAcceptance:
        """The unnamed drafters' population (sessions opened without a drafter name)."""
        return self.population_of(None)

    def close(self, key: Hashable) -> None:
        if (session := self._sessions.pop(key, None)) is not None:
            session.drafter.open -= 1
            self._grants = None

    def on_step(self, compute_s: float, sessions: int, tokens: int, prefill_tokens: int = 0) -> None:
        """After every engine step: measure the cost curve (specdec.stepcost: the median per token count, an affine
        fit beyond, prefill tokens priced apart; fitted when a grant reads it); the next `budget_for` grants anew,
        unless the latest grant is younger than its reuse (the module docstring: a fast verifier remakes it every few
        steps)."""
        self.cost.observe(compute_s, tokens - prefill_tokens, sessions, prefill_tokens)
        self._grant_age += 1
        if self._grant_age >= math.ceil(self._grant_s * self._steady / (GRANT_SHARE * compute_s) if compute_s > 0 else 1):
            self._grants = None

    def on_verdict(self, key: Hashable, proposed: int, accepted: int, offered: int = 0) -> None:
        """A verified block of `proposed` draft tokens whose first `accepted` were accepted; `offered`: the
        budget a lock-step block was granted (drafting fewer counts as a failure at the next position: the
        grant bought nothing there; 0 for async steps, whose drafts may just be late). Fewer by its client's
        choice is no miss: a block as long as its client's own gamma (`wants`, said with it) counts as offered that
        many. An LM client's gamma moves between 2 and 4 from block to block, and the budget granted against its
        last word: counted as misses, the grants past its gamma took the LM's rate from ~0.85 to ~0.7, the
        estimate every session's shrinks toward, and its promises above what the blocks it chose could buy."""
        if key not in self._sessions:
            self.open(key)
        session = self._sessions[key]
        proposed = min(proposed, session.drafter.acceptance.max_gamma)
        accepted = min(accepted, proposed)
        if offered and session.wants is not None and session.wants < offered:
            offered = session.wants
            if session.promised:  # the grant promised blocks of its budget: the client's own gamma promises less
                session.promised = promised_tokens(self._rates_of(session), offered)
        if proposed and not offered:  # an async step verified the drafts that had arrived: they promised E - 1
            session.promised = promised_tokens(self._rates_of(session), proposed)
        opening = session.rounds < OPENING_ROUNDS
        session.rounds += 1
        if session.rounds == OPENING_ROUNDS:  # its rates change regime (_rates_of): a new grant at once
            self._grants = None
        if not opening:  # an opening round tells the openings' rate, not this session's
            session.tracker.update(proposed, accepted, offered)
        if accepted:  # evidence that a grant may change: its reuse as scheduled again
            self._steady = 1
        if (offered or proposed) and session.promised:
            if not opening:  # an opening's rates are its drafter's openings', which learn from it below
                session.drafter.calibration.add(accepted, session.promised)
                self._calibration.add(accepted, session.promised)
                if self.metrics is not None:
                    self.metrics.calibration.set(self._calibration.ratio())
            session.promised = 0.0
        if proposed or offered:  # a plain decoding step says nothing about the drafts' acceptance
            # a grant left unused is a miss here too: counted only where a draft existed, the rate new sessions start
            # from read 45% where an n-gram's grants bought far less (no match: nothing drafted)
            session.drafter.acceptance.update(proposed, accepted, offered, opening=opening)
            if session.bucket is not None and not opening:
                session.drafter.context.add(session.bucket, proposed, accepted, offered)

    def on_shadow(self, key: Hashable, drafted: int, accepted: int, gamma: int) -> None:
        """A block of `gamma` the client drafted (`drafted` tokens) but did not send while the verifier decoded the
        session on its own, whose first `accepted` tokens were then committed: evidence that cost no verifier compute.
        Without it a session granted 0 learns nothing new, and its estimate drifts back to the prior by decay alone,
        which on a CPU may take the rest of the answer. It is the client's word: one that overstates it gains at most
        a budget of drafts whose real verdicts then pull its estimate down, which it could always get by drafting at
        the server's max_gamma. Its drafter's population (openings apart) learns from it too, as from a real block:
        the real pair's LM alone (its blocks ~75% accepted), granted 0 and so sending no real block, kept the 0.5 prior
        for good and read 0.95x `Generate` where a fixed gamma of 2 read 1.31x (docs/results.md, run CB). Per drafter:
        one population would hand an n-gram's shadow rate to an LM's sessions. Not counted by suffix bucket
        (`context`): the verdict does not say where the block started."""
        session = self._sessions.get(key)
        if session is None or gamma <= 0:
            return
        drafted, accepted = min(drafted, gamma), min(accepted, drafted)
        # drafted in the answer's opening (at least the rounds its commits took ago): the opening's, as a verdict's
        # (on_verdict); counted as the session's own, one such block rejected at position 2 held an LM to blocks of 1
        opening = session.rounds - min(accepted + 1, drafted) < OPENING_ROUNDS
        if not opening:
            session.tracker.update(drafted, accepted, gamma)
        session.drafter.acceptance.update(drafted, accepted, gamma, opening=opening)
        if accepted:
            self._steady = 1
        if self.metrics is not None:
            self.metrics.shadows.inc()

    def hold(self, key: Hashable, grants: int) -> None:
        """The session drafts nothing at its next `grants` grants whatever they say: its client asked the verifier
        to decode that many steps on its own (Proposal.decode_alone). Priced as drafting, it made each of those steps'
        grant count on tokens that never came (a padded step's ceiling chosen for drafts nobody sent)."""
        session = self._sessions.get(key)
        if session is not None and session.held != max(0, grants):  # every proposal says it: 0, none to hold
            session.held = max(0, grants)
            self._grants = None

    def decodes_at_zero(self, key: Hashable) -> None:
        """At budget 0 the verifier decodes this lock-step session on its own, with no round trip between two tokens
        (OpenSession.server_decodes), so a grant of drafts idles the verifier for the session's turnaround (round trip
        and drafting) even when no other session rides the step: its wait is priced alone too. Unpriced, a session
        alone was granted blocks whenever its drafts were expected to land, each handing the turn to a client 25 ms
        away for blocks the tiny pair's verifier commits in 6 ms steps (n-gram `auto` 0.46-0.80x `Generate`)."""
        if key in self._sessions:
            self._sessions[key].at_zero = True
            self._grants = None

    def wants(self, key: Hashable, gamma: int | None) -> None:
        """The client's own best gamma (its schedule's, from the draft time, acceptance and round trip it measures;
        None: unsaid, an older client): its blocks carry no more, so it is granted at most max(1, gamma). Granted
        more, the grant priced tokens that never came, and chose the other sessions' grants around them: at 2 LM
        sessions on a CPU, grants of 9-16 where the client sent 2-5. 0 counts as 1: a client that wants no drafts
        says so with decode_alone (`hold`, which expires), and one whose word stood at 0 could never be granted
        drafts again if it drafts no shadow blocks to speak in the verifier's turn. A new cap remakes the standing
        grant at once only where it binds (`_binds`); an n-gram's word changes every few commits."""
        session = self._sessions.get(key)
        if session is not None and gamma != session.wants:
            before, session.wants = session.cap, gamma
            if session.cap != before and self._binds(key, before, session.cap):
                self._grants = None

    def _granted(self, key: Hashable) -> int | None:
        """The standing grant's budget for `key` (None: no grant stands for it)."""
        return None if self._grants is None else self._grants.get(key)

    def _binds(self, key: Hashable, before: int, after: int) -> bool:
        """A session's cap went from `before` to `after`: the standing grant must be remade at once when it gives more
        than `after`, or gave all of `before` (the old cap held it back). Otherwise it stays the best grant: a limit
        it does not reach changes no optimum (tightened, exactly; raised, as far as the grant is concave in each
        session's budget), and it is remade on the reuse schedule anyway (GRANT_SHARE)."""
        granted = self._granted(key)
        return granted is None or granted > after or (granted == before < after)

    def late(self, key: Hashable, offered: int) -> None:
        """A lock-step session granted `offered` draft tokens whose block missed the next step (the engine's
        batch wait ran out while it drafted): the grant cost it a whole step, so it counts as a block that
        bought nothing (a failure at position 1). A draft too slow for its share of the verifier (one CPU
        core drafting for many LM sessions) is so granted less until it arrives in time; a plain decoding
        round is never late and decays the count away again."""
        if key in self._sessions and offered > 0:
            self._sessions[key].tracker.update(0, 0, offered)
            if self.metrics is not None:
                self.metrics.late.inc()

    def arrives(self, key: Hashable, turnaround_s: float | None, wait_s: float, drafter: str | None = None,
                round_trip_s: float | None = None, per_token_s: float = 0.0) -> None:
        """This lock-step session's blocks that carry drafts come `turnaround_s` after its verdict (its round trip
        and drafting), and the engine holds a step at most `wait_s` for the last step's sessions. Granted drafts,
        beside other sessions, it makes the next step idle up to min(turnaround_s, wait_s) (`specdec.budget.waited`;
        more when every session is granted drafts and nothing is ready before the first block: an LM drafting on a
        CPU core shared by several sessions, ~0.1 s against a 0.4 s step, idled the verifier 12% of the time at 2
        sessions). Slower than the wait, it misses the step too: its block rides a step later, so it is granted
        drafts only if its block is expected to commit at least 2 tokens and the grant pays over the two steps the
        block spans (`specdec.budget.pays_a_missed_step`; its `late` marks alone kept it oscillating: the estimate
        fell, shadow blocks lifted it, and the next grant cost a step again). turnaround_s None: not yet measured
        (the engine skips a session's first drafted block); with the name of the client's drafter, the latest
        turnaround measured with that drafter stands in, so a new LM session is not granted blocks that miss the
        step before it is measured itself (4 sessions, one request each: every session's first grants did), unless more
        of the drafter's sessions were open then than now: measured beside another session drafting on the same core,
        it priced a lone session after them at a wait no block pays, and granted 0, that one never measured its own.
        round_trip_s, per_token_s: the turnaround split into its client's drafting per draft token (its word,
        Proposal.draft_s_per_token) and the rest, so a grant of g is priced round_trip_s + g x per_token_s (None: the
        whole turnaround for every size, an older client's). One price for every size, that of its last blocks of 3,
        made an LM session alone on a CPU decode on its own where a block of 1 or 2 paid."""
        if drafter is not None:  # lock-step: not yet measured, it starts from the latest turnaround with its drafter
            seen = self._drafter(drafter)
            if turnaround_s is not None:
                seen.turnaround_s, seen.split, seen.measured_open = turnaround_s, (round_trip_s, per_token_s), seen.open
            elif seen.measured_open <= seen.open:  # no fewer of its sessions open than then: no less loaded a core
                turnaround_s, (round_trip_s, per_token_s) = seen.turnaround_s, seen.split
        turnaround_s = turnaround_s or 0.0
        waits = (turnaround_s, 0.0) if round_trip_s is None else (round_trip_s, per_token_s)
        session = self._sessions.get(key)
        if session is not None and ((session.wait_s, session.wait_per_token_s), session.slow, self.hold_s) != (
                waits, turnaround_s > wait_s, wait_s):
            if not session.slow and turnaround_s > wait_s and self._granted(key):
                self._grants = None  # it now misses steps with drafts granted: remade at once (no longer: as scheduled)
            (session.wait_s, session.wait_per_token_s), session.slow, self.hold_s = waits, turnaround_s > wait_s, wait_s

    def budget_for(self, key: Hashable, queued_sessions: int = 0, queued_tokens: int = 0,
                   prefilling: Collection[Hashable] = ()) -> int:
        """The most draft tokens this session's next block may carry (0: decode one token, like Generate)."""
        if key not in self._sessions:
            self.open(key)
        if self._grants is None or key not in self._grants:
            self._rates = {}  # grants() fills it
            started = time.perf_counter()
            self._grants = self.grants(Load(queued_tokens, queued_sessions), exclude=set(prefilling) - {key})
            self._grant_s, self._grant_age = time.perf_counter() - started, 0
            steady = self._grants == self._last_grant
            self._steady, self._last_grant = min(2 * self._steady, STEADY_BACKOFF) if steady else 1, self._grants
            if self.metrics is not None:
                self.metrics.grant_seconds.observe(self._grant_s)
        budget = self._grants[key]
        session = self._sessions[key]
        session.held = max(0, session.held - 1)
        session.promised = promised_tokens(self._rates.get(key) or self._rates_of(session), budget)  # 0: nothing
        if self.metrics is not None and self._sessions[key].max_gamma:  # a decode-only session is never granted drafts
            self.metrics.granted.observe(budget)
        return budget

    def dropped(self, tokens: int) -> None:
        """Draft tokens a block carried beyond its budget, dropped unverified (an older client: not an error)."""
        if tokens > 0 and self.metrics is not None:
            self.metrics.over_budget.inc(tokens)

    def _rates_of(self, session: SessionState) -> list[float]:
        """[max_gamma] the acceptance a grant reads for a session's next block: in its answer's opening, its drafter's
        openings seen so far; after it, its own estimate shrunk to its drafter's in the suffix bucket it is in now."""
        rates = session.drafter.acceptance.session_rates(session.tracker, session.rounds)
        if session.bucket is None or session.rounds < OPENING_ROUNDS:
            return rates
        return session.drafter.context.rates(session.bucket, rates)

    def calibration(self, drafter: str | None = None) -> float:
        """Accepted draft tokens the granted blocks of `drafter`'s sessions bought per token their grants promised
        (`Calibration`): what scales those sessions' estimates (an n-gram's bursts are not an LM's)."""
        return self._seen(drafter).calibration.ratio()

    def grants(self, load: Load = Load(), exclude: Collection[Hashable] = ()) -> dict[Hashable, int]:
        """A fresh grant for every open session but `exclude` (still prefilling: in `load`, not sending a block
        next step), given the other work waiting for the next step. The load's sessions count (others ride the
        step, it is ready without the drafters' blocks); its prompt tokens are not weighed against the drafts: they
        run in steps of their own (a padding backend) or add a cost per prompt token (a packing one, as fitted), so
        their seconds are spent whatever is granted. Weighed in, a prompt opening beside a session made its drafts a
        small share of a long step: on a 2-core AVX2 CPU, where the LM's drafts did not pay, sessions were granted
        5-7 tokens while another request prefilled."""
        load = Load(0, load.sessions)
        for key, s in self._sessions.items():  # where each session's next block starts (specdec/context.py)
            s.bucket = None if self.context is None else self.context(key)
        # a session that may not draft (Generate's, or held) is a row of the step with no rates to read
        self._rates = {key: self._rates_of(s) if s.cap and not s.held else [] for key, s in self._sessions.items()
                       if key not in exclude}
        rows = [(key, s, rates if s.rounds < OPENING_ROUNDS else first_scaled(rates, s.drafter.calibration.ratio()))
                for key, rates in self._rates.items() for s in (self._sessions[key],)]
        crowded = len(rows) + load.sessions > 1  # others ride the step a slow session's block misses
        demands = [Demand(key, accept, 0 if s.held or (s.slow and crowded and not _pays_a_step(accept, s.cap))
                          else s.cap, s.tpot_slo_s, *((s.wait_s, s.wait_per_token_s) if crowded or s.at_zero else ()))
                   for key, s, accept in rows]

        @functools.cache  # one grant prices the same steps hundreds of times (every wait level, every candidate)
        def step_seconds(tokens: int, sessions: int) -> float:  # the load carries no tokens (above)
            return self.cost.cost(tokens, sessions)

        grant = grant_budgets(demands, step_seconds, load, padded=self.padded, min_gain=self.min_gain,
                              hold_s=self.hold_s)
        budgets = [grant[d.key] for d in demands]
        for i, (key, s, _) in enumerate(rows):  # a slow session's granted block must pay for the step it misses too
            if s.slow and crowded and budgets[i] and not pays_a_missed_step(demands, budgets, i, step_seconds, load,
                                                                            self.padded, self.hold_s):
                grant[key] = budgets[i] = 0
        if self.metrics is not None and any(grant.values()):
            self.metrics.gain.observe(predicted_gain(demands, budgets, step_seconds, load, self.padded, self.hold_s))
        return grant


def _pays_a_step(accept: list[float], cap: int) -> bool:
    """A block of `cap` is expected to commit the 2 tokens a session alone commits in the two steps a late block takes
    (a first filter on a slow session's cap; `specdec.budget.pays_a_missed_step` prices the missed step in full)."""
    return cap > 0 and expected_tokens_table(accept, cap)[cap] >= 2
