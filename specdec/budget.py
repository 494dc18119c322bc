"""The draft budget: how many draft tokens each session's next block may carry, chosen where the load is
seen (the verifier) to maximise goodput. Pure math and small online estimators; no grpc, no clock.

The model (SmartSpec's goodput, WISP's predicted verification time; vLLM RFC #4565):
- One engine step verifies every session's block at once. Session i sends [last committed token] + gamma_i
  draft tokens; its expected committed tokens are E_i(gamma_i) = 1 + sum_{k=1..gamma_i} prod_{j<=k} alpha_ij
  (`specdec.gamma.expected_tokens_table`; (1 - alpha^(gamma+1)) / (1 - alpha) for a constant alpha), where
  alpha_ij = P(position j accepted | positions before it accepted), from `AcceptanceTracker` (specdec/acceptance.py).
- The step costs T(N, S) compute seconds for N batch tokens over S sessions: N = sum_i (1 + gamma_i) plus
  the tokens of other work in the step (`Load`; the verifier counts its queued prompts' sessions there, not their
  tokens, which are spent whatever is granted: `DraftBudgeter.grants`), S = the sessions. T is measured online from
  the engine's own steps (`specdec.stepcost`: the median step time per session count and token count seen, an
  affine fit beyond), so it holds on any device: steep on a CPU (a block of gamma+1 tokens costs far more than one
  token) and nearly flat on a GPU (memory-bound decoding).
- A lock-step session granted drafts sends its block a turnaround after its verdict (round trip and drafting,
  `Demand.wait_for(gamma)`: measured by the verifier, a round trip plus the client's drafting of gamma tokens as it
  says it; 0 for one decoded by the verifier, which queues its step itself), and
  the engine holds the next step for it, idling meanwhile: W (`waited`) = the longest turnaround among the
  sessions granted drafts, at most the engine's wait (`hold_s`) once other work is ready; with every session
  granted, nothing is ready until the first block comes.
- Goodput G = sum_i E_i(gamma_i) / (T(N, S) + W): committed tokens per second of verifier time. `grant_budgets`
  picks the gamma vector maximising G, each gamma_i in [0, cap_i], cap_i = min(max_gamma, the client's
  request). 0 is allowed: the session then decodes one token per step, like `Generate`.

The decision is exact, not a heuristic: E_i's steps E_i(g+1) - E_i(g) = prod_{j<=g+1} alpha_ij never grow
with g, so for a fixed total of K draft tokens the greedy marginal allocation (the next draft token to the
session where it buys the most expected committed tokens) maximises sum_i E_i. T depends on the vector only
through K (S is fixed), so G's maximum is max_K E*(K) / T(K): one greedy pass records E*(K) for every K, and
the best K wins, ties to the smaller K (less work for the same goodput). W depends on which sessions draft,
so the search runs once per level t of the waits, each session capped at the drafts whose block comes within t
(`Demand.within`) and every step priced T + t (capped by the engine's wait), and the best true goodput wins
(`_grant_waiting`; the optimum is a candidate at its own W). With an affine T the goodput rises while the next token's gain exceeds G * b and falls
after, so this is the rule "grant until the next token of budget costs more step time than it brings";
scanning every K also handles a step-shaped T (a jump to the next kernel tile, then flat), where stopping at the
first loss would miss the flat part.

Latency target (optional, per session): the expected time per token of session i is T / E_i(gamma_i) (its
share of the verifier's steps; the client's drafting and round trip are its own side, `specdec.gamma.budgeted_gamma`).
With SLOs, for each K the SLO sessions need at least the smallest gamma_i with T(K) / E_i(gamma_i) <= slo_i;
the rest of K is filled greedily from there (still optimal: the gains above the floors are still sorted).
The best K among those that can meet every SLO wins. If none can, every SLO is stretched by the least
common factor that makes them feasible (`_least_stretch`), so no target is missed by more than needed.

Assumptions and limits:
- Acceptance is a per-session, per-position rate that does not depend on the batch or on gamma itself,
  and positions are independent given the prefix (the standard speculative-decoding analysis). A decayed
  count follows a session whose text turns easy or hard, every position read by where the block starts
  (specdec/context.py: an n-gram's runs); new sessions start from their drafter's rates.
- Every budgeted session rides the next step, after W (async sessions decode every step). One whose
  drafting makes it miss the step is not modelled in the grant; the verifier feeds it back as a block that
  bought nothing (`DraftBudgeter.late`), keeps a grant to a session it measured slower than its hold only when
  it pays over the two steps the late block spans (`pays_a_missed_step`), and
  counts a grant a lock-step client leaves unused as a failure at the next position, so E_i is what a grant
  buys, not what a full block would. Sessions the batch cannot hold (`max_batch_tokens`) are not modelled.
- The estimates are taken at face value here. They are not unbiased where grants follow bursty evidence
  (an n-gram's estimate peaks as a quoted passage ends): the verifier scales them by what its grants bought
  against what they promised before it calls `grant_budgets` (`DraftBudgeter.calibration`).
- T depends on the step's tokens (as measured, `specdec.stepcost.StepCostTable`; the affine fit only where no
  count has been seen), and the tokens are what the backend computes. A pad-and-stack forward computes
  every row at the longest row's length, so there one session's 5-token block makes each 1-token row of the
  step cost 5: the engine fits T on rows x longest row, and `grant_budgets(padded=True)` prices a grant as
  n x (1 + max gamma). Then for each ceiling g every session drafts min(g, cap_i) (fewer would cost the same),
  and the best g wins, again scanned whole. Priced as the sum, one good session's drafts looked cheap on a CPU
  while the step paid them once per row. A backend that packs tokens without padding (llama.cpp, and the
  transformers backend wherever packing computes less: rows of different lengths) is priced by the sum.
- Goodput counts verifier time only (its idle W included): a slow draft is otherwise the client's to notice
  (`specdec.gamma.budgeted_gamma`: the smaller of the budget and the client's own best gamma, so a draft too slow
  for its verifier falls to 0).
- Cost: O(K n) numpy work for K = sum of caps (a few ms at 64 sessions x 16); with SLOs O(K n log K).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from specdec.gamma import expected_tokens_table
from specdec.stepcost import StepCostModel, StepCostTable  # noqa: F401 - re-exported: the fits of T

StepSeconds = Callable[[int, int], float]  # (batch tokens, batch sessions) -> compute seconds of one step
MIN_STEP_S = 1e-9  # a fitted cost is never taken as free (goodput would be infinite)
WAIT_LEVELS = 8  # most distinct waits the grant searches over (each a full grant)


# ------------------------------------------------------------------------------------------ the grant
@dataclass(frozen=True)
class Demand:
    """One session asking for a budget for its next block."""

    key: Hashable
    accept: Sequence[float]  # [>= cap] alpha_j by position (AcceptanceTracker.rates)
    cap: int  # most draft tokens: min(the verifier's max_gamma, the client's request); 0 = decode only
    tpot_slo_s: float | None = None  # expected verifier seconds per committed token not to exceed
    wait_s: float = 0.0  # seconds after its verdict its block comes when it is granted drafts (0: at once)
    wait_per_token_s: float = 0.0  # and per draft token in it (its client's drafting): a block of g, wait_for(g)

    def wait_for(self, gamma: int) -> float:
        """How long after its verdict its block of `gamma` draft tokens comes (0 drafts: at once, none waited)."""
        return self.wait_s + gamma * self.wait_per_token_s if gamma else 0.0

    def within(self, t: float) -> int:
        """The most draft tokens, at most its cap, whose block comes within t of its verdict."""
        if self.wait_per_token_s <= 0:
            return self.cap if self.wait_s <= t else 0
        return max(0, min(self.cap, math.floor((t - self.wait_s) / self.wait_per_token_s * (1 + 1e-12))))

    def __post_init__(self) -> None:
        if not 0 <= self.cap <= len(self.accept):
            raise ValueError(f"session {self.key!r}: cap must be in [0, {len(self.accept)}], got {self.cap}")
        if not all(0.0 <= alpha <= 1.0 for alpha in self.accept[: self.cap]):
            raise ValueError(f"session {self.key!r}: acceptance rates must be in [0, 1], got {list(self.accept)}")
        if self.tpot_slo_s is not None and not self.tpot_slo_s > 0:
            raise ValueError(f"session {self.key!r}: tpot_slo_s must be > 0, got {self.tpot_slo_s}")
        if not (self.wait_s >= 0 and self.wait_per_token_s >= 0):
            raise ValueError(f"session {self.key!r}: wait_s and wait_per_token_s must be >= 0, got {self.wait_s}, "
                             f"{self.wait_per_token_s}")


@dataclass(frozen=True)
class Load:
    """Other work riding the next step that commits nothing: prefill chunks (their tokens and sessions)."""

    tokens: int = 0
    sessions: int = 0


def goodput(demands: Sequence[Demand], budgets: Sequence[int], step_seconds: StepSeconds, load: Load = Load(),
            padded: bool = False, hold_s: float | None = None) -> float:
    """Expected committed tokens per second of the next step if session i drafts budgets[i] tokens (padded:
    every session's row costs the longest row's tokens; hold_s: see `waited`)."""
    expected = sum(expected_tokens_table(d.accept, g)[g] for d, g in zip(demands, budgets))
    step = _step_seconds(step_seconds, demands, _computed(budgets, padded), load)
    return expected / (step + waited(demands, budgets, load, hold_s))


def predicted_gain(demands: Sequence[Demand], budgets: Sequence[int], step_seconds: StepSeconds, load: Load = Load(),
                   padded: bool = False, hold_s: float | None = None) -> float:
    """The goodput of `budgets` over the goodput of granting none: what the model expects the drafts to buy."""
    return goodput(demands, budgets, step_seconds, load, padded, hold_s) / goodput(
        demands, [0] * len(demands), step_seconds, load, padded, hold_s)


def grant_budgets(demands: Sequence[Demand], step_seconds: StepSeconds, load: Load = Load(),
                  padded: bool = False, min_gain: float = 0.0, hold_s: float | None = None) -> dict[Hashable, int]:
    """{key: draft tokens its next block may carry}, maximising goodput (see the module docstring). padded: the
    step computes every session's row at the longest row's length (pad-and-stack), so it costs n x (1 + max
    gamma) tokens whoever drafts them. min_gain: grant nothing unless the best grant promises at least that
    much more goodput than none (`predicted_gain` >= 1 + min_gain), when none meets every SLO too. hold_s: the
    most a step waits for a block once other work is ready (`waited`; None: it waits for every block)."""
    if not any(d.cap for d in demands):  # Generate's sessions, every session held: nothing to price
        return {d.key: 0 for d in demands}
    grant = _grant_waiting(demands, step_seconds, load, padded, hold_s)
    if min_gain > 0 and any(grant.values()) and _zero_meets_slos(demands, step_seconds, load):
        gain = predicted_gain(demands, [grant[d.key] for d in demands], step_seconds, load, padded, hold_s)
        if gain < 1 + min_gain:
            return {d.key: 0 for d in demands}
    return grant


def waited(demands: Sequence[Demand], budgets: Sequence[int], load: Load = Load(),
           hold_s: float | None = None) -> float:
    """W: how long the next step idles for the blocks of the sessions granted drafts (G). With other work ready at
    once (a session granted none, which the verifier decodes, or prefill load), the engine waits at most hold_s for
    G's blocks: W = min(max_G wait_s, hold_s); a block later than that misses the step. With every session in G,
    nothing is ready until the first block comes: W = min(max_G wait_s, min_G wait_s + hold_s)."""
    waits = [d.wait_for(g) for d, g in zip(demands, budgets) if g]
    if not waits:
        return 0.0
    if hold_s is None:
        return max(waits)
    ready = 0.0 if load.sessions or len(waits) < len(demands) else min(waits)
    return min(max(waits), ready + hold_s)


def _grant_waiting(demands: Sequence[Demand], step_seconds: StepSeconds, load: Load, padded: bool,
                   hold_s: float | None) -> dict[Hashable, int]:
    """The best grant when the step idles W (`waited`) for the blocks of the sessions granted drafts. For each
    level t among the waits of every session's every block size (at most WAIT_LEVELS, each wait rounded up to its
    level), the best grant of the drafts whose blocks come within t (`Demand.within`), every step priced
    T + min(t, hold_s): a grant leaving a session out then idles at most that, so its true goodput is at least its
    price, and the optimum among those is a candidate at its own level. A grant to every session idles W_all =
    min(max wait, min wait + hold_s): the best one is a candidate priced so at every session's cap. Where a level's
    grant goes to every session and its price undercounts W_all, the best grants leaving out each session in turn
    are candidates too. The best true goodput wins, ties to the
    first (lower levels first): exact up to the rounding of the waits, but where blocks' waits grow with their
    drafts (`Demand.wait_per_token_s`) and every session is granted and held: W_all then moves with the grant,
    and the candidate priced at the caps' waits came within 8% of a brute force (in 35 of 6000 random cases of 2
    sessions, the rest exact)."""
    levels = _wait_levels([w for d in demands for g in range(1, d.cap + 1) if (w := d.wait_for(g)) > 0])
    # priced once: every candidate has the same n rows, each at most its own cap
    seconds, expected = _seconds_of_drafts(step_seconds, demands, load, padded), _expected_of_drafts(demands)
    if not levels:
        return _grant(demands, seconds, padded, expected)
    if all(d.tpot_slo_s is None for d in demands):
        # a bound first: every session at its cap, no step idle. A wait only lowers a grant's true goodput, never
        # the zero grant's (it idles nothing), so where the bound grants nothing no wait level grants anything
        # (a fast verifier at 4 n-gram sessions: most grants, each ~9 priced candidates otherwise). Not with SLOs,
        # where a stretch can make drafts necessary at a price that includes the wait.
        bound = _grant(demands, seconds, padded, expected)
        if not any(bound.values()):
            return bound

    def priced(idle: float, within: list[Demand]) -> dict[Hashable, int]:
        return _grant(within, seconds + idle, padded, expected)

    candidates = []
    for t in [0.0, *levels]:
        within = [d if d.within(t) == d.cap else replace(d, cap=d.within(t)) for d in demands]
        idle = t if hold_s is None else min(t, hold_s)
        candidates.append(priced(idle, within))
        if idle < t and not load.sessions and all(candidates[-1].values()):
            candidates += [priced(idle, [replace(d, cap=0) if k == i else d for k, d in enumerate(within)])
                           for i, d in enumerate(within) if d.cap]
    if hold_s is not None and not load.sessions and all(d.cap for d in demands):
        waits = [d.wait_for(d.cap) for d in demands]
        candidates.append(priced(min(max(waits), min(waits) + hold_s), list(demands)))
    rows, seconds_of = expected.tolist(), seconds.tolist()  # `goodput` from the tables priced above

    def true_goodput(budgets: list[int]) -> float:
        tokens = sum(row[g] for row, g in zip(rows, budgets))
        return tokens / (seconds_of[_computed(budgets, padded)] + waited(demands, budgets, load, hold_s))

    rates = [true_goodput([grant[d.key] for d in demands]) for grant in candidates]
    return candidates[int(np.argmax(np.array(rates) >= max(rates) * (1 - 1e-12)))]


def _wait_levels(waits: list[float]) -> list[float]:
    """At most WAIT_LEVELS thresholds covering every wait (the largest among each group of sorted waits)."""
    waits = sorted(set(waits))
    if len(waits) <= WAIT_LEVELS:
        return waits
    return [waits[-(-len(waits) * i // WAIT_LEVELS) - 1] for i in range(1, WAIT_LEVELS + 1)]


def _zero_meets_slos(demands: Sequence[Demand], step_seconds: StepSeconds, load: Load) -> bool:
    seconds = _step_seconds(step_seconds, demands, 0, load)  # one committed token each
    return all(d.tpot_slo_s is None or seconds <= d.tpot_slo_s for d in demands)


def _grant(demands: Sequence[Demand], seconds_of: np.ndarray, padded: bool,
           expected: np.ndarray) -> dict[Hashable, int]:
    """grant_budgets without the margin, the step of K draft tokens in all priced seconds_of[K] (_seconds_of_drafts,
    plus any idle wait) and E_i(gamma) read from expected[i, gamma] (_expected_of_drafts, at least the caps wide)."""
    if not demands:
        return {}
    if padded:
        return _grant_padded(demands, expected, seconds_of)
    caps = np.array([d.cap for d in demands])  # [n]
    width = np.arange(caps.max() + 1)  # [max cap + 1]
    # [n, max cap + 1] E_i(gamma), +inf past cap_i
    table = np.where(width[None, :] <= caps[:, None], expected[:, : len(width)], np.inf)
    counts = _greedy_counts(table, caps)  # [K + 1, n]
    seconds = seconds_of[: len(counts)]  # [K + 1] T(K)
    slos = np.array([np.inf if d.tpot_slo_s is None else d.tpot_slo_s for d in demands])  # [n]
    budgets = _best_within(table, caps, counts, seconds, slos)
    if budgets is None:  # no K meets every SLO: stretch them all by the least common factor that can be met
        stretch = _least_stretch(table, caps, seconds, slos)
        budgets = _best_within(table, caps, counts, seconds, slos * stretch * (1 + 1e-9))
        assert budgets is not None, "the least stretch makes some K feasible"
    return {d.key: int(g) for d, g in zip(demands, budgets)}


def pays_a_missed_step(demands: Sequence[Demand], budgets: Sequence[int], i: int, step_seconds: StepSeconds,
                       load: Load = Load(), padded: bool = False, hold_s: float | None = None) -> bool:
    """Session i's blocks come after the engine's hold (an LM drafting on a CPU core it shares): beside others, a
    block granted budgets[i] misses the next step and rides the one after. Over those two steps the others commit
    twice their E and session i E_i(g), in T(the step without it) + the hold + T(the step with its block); decoding
    it instead, all commit twice in 2 T(every row at its grant, i decoding). True when the grant's rate is at least
    that. (Counting only session i's own tokens, E_i(g) >= 2, granted blocks that cost the others a step:
    2 sessions on a CPU, a 1-row step costs ~the 2-row one, and the hold idled the verifier 0.1 s a block.)"""
    g = budgets[i]
    if g == 0 or len(demands) + load.sessions < 2:
        return g > 0
    rest = [d for k, d in enumerate(demands) if k != i]
    others = [b for k, b in enumerate(budgets) if k != i]
    e_others = sum(expected_tokens_table(d.accept, b)[b] for d, b in zip(rest, others))
    missed = _step_seconds(step_seconds, rest, _computed(others, padded), load)
    riding = _step_seconds(step_seconds, demands, _computed([*others, g], padded), load)
    decoding = _step_seconds(step_seconds, demands, _computed([*others, 0], padded), load)
    granted = (2 * e_others + expected_tokens_table(demands[i].accept, g)[g]) / (missed + (hold_s or 0.0) + riding)
    return granted >= (2 * e_others + 2) / (2 * decoding)


def verifiers_turn(budget: int | None, alone: int) -> bool:
    """Lock-step with server_decodes: after a reply granting `budget` (`opened` included), with `alone` steps of
    the last proposal's decode_alone still to run, the verifier decodes the session on its own and the client
    sends nothing. Both sides apply this rule to the same replies, so they agree whose turn it is."""
    return budget == 0 or alone > 0


# ------------------------------------------------------------------------------------------ internals
def _computed(budgets: Sequence[int], padded: bool) -> int:
    """Draft tokens a step computes for these rows' budgets: each row at the longest when it pads, else their sum."""
    return len(budgets) * max(budgets, default=0) if padded else sum(budgets)


def _step_seconds(step_seconds: StepSeconds, demands: Sequence[Demand], drafts: int, load: Load) -> float:
    """T(K): the step with every session's [last committed token] + K draft tokens in all, plus the load."""
    tokens = len(demands) + drafts + load.tokens
    return max(step_seconds(tokens, len(demands) + load.sessions), MIN_STEP_S)


def _seconds_of_drafts(step_seconds: StepSeconds, demands: Sequence[Demand], load: Load, padded: bool) -> np.ndarray:
    """[K + 1] T(K) for every K a grant to these sessions can compute (n x the largest cap when it pads, else the
    caps' sum): the one place a grant calls the cost curve, once per K for every candidate and wait level (pricing
    each candidate anew took 171 ms of the verifier's event loop at 16 sessions, now 2.3: scripts/time_grant.py)."""
    most = _computed([d.cap for d in demands], padded)
    every = max(len(demands), 1) if padded else 1  # padded: only K = n x the ceiling is ever computed
    seconds = np.full(most + 1, np.nan)  # the rest stay nan, never read
    seconds[::every] = [_step_seconds(step_seconds, demands, k, load) for k in range(0, most + 1, every)]
    return seconds


def _expected_of_drafts(demands: Sequence[Demand]) -> np.ndarray:
    """[n, max cap + 1] E_i(gamma) up to each session's own cap (+inf past it)."""
    table = np.full((len(demands), max((d.cap for d in demands), default=0) + 1), np.inf)
    for i, d in enumerate(demands):
        table[i, : d.cap + 1] = expected_tokens_table(d.accept, d.cap)
    return table


def _grant_padded(demands: Sequence[Demand], expected: np.ndarray, seconds_of: np.ndarray) -> dict[Hashable, int]:
    """The grant when a step costs n x (1 + max gamma) tokens: for a ceiling g every session drafting
    min(g, cap_i) costs the same as any fewer, and E_i never falls with gamma, so the best vector for g is
    that one, and the best g (ties to the smaller) among those meeting every SLO wins; none meeting them,
    each SLO is stretched by the least common factor some g meets. Plain Python: a grant searches up to ~11 of
    these a step at 4 sessions, and numpy's per-call overhead on [17, 4] arrays made each ~4x slower than this."""
    n, caps, rows, seconds = len(demands), [d.cap for d in demands], expected.tolist(), seconds_of.tolist()
    slos = [math.inf if d.tpot_slo_s is None else d.tpot_slo_s for d in demands]
    ceilings = range(max(caps) + 1)
    expected_of = [[row[min(g, cap)] for row, cap in zip(rows, caps)] for g in ceilings]  # [G + 1][n] E_i(min(g, cap_i))
    # [G + 1] the worst T / (slo_i E_i) of each ceiling: at most 1 where it meets every SLO (0 without any)
    stretch = [max(seconds[n * g] / (slo * e) for slo, e in zip(slos, expected_of[g])) for g in ceilings] \
        if any(slo < math.inf for slo in slos) else [0.0] * len(ceilings)
    limit = 1 + 1e-12 if min(stretch) <= 1 + 1e-12 else min(stretch) * (1 + 1e-9)
    rates = [sum(expected_of[g]) / seconds[n * g] if stretch[g] <= limit else -math.inf for g in ceilings]
    best = next(g for g, rate in enumerate(rates) if rate >= max(rates) * (1 - 1e-12))
    return {d.key: min(best, cap) for d, cap in zip(demands, caps)}


def _greedy_counts(table: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """[sum(caps) + 1, n]: row K = the budgets after the greedy's first K draft tokens, each given to the
    session whose next token buys the most expected committed tokens (E_i's steps never grow, so sorting
    every session's steps at once is the greedy)."""
    n, width = table.shape
    session, gamma = np.nonzero(np.arange(width - 1)[None, :] < caps[:, None])  # every draft token of every cap
    gains = table[session, gamma + 1] - table[session, gamma]  # what each buys
    order = session[np.lexsort((gamma, session, -gains))]  # [sum(caps)] largest gain first, ties: lower session
    counts = np.zeros((len(order) + 1, n), dtype=np.int64)
    counts[np.arange(1, len(order) + 1), order] = 1
    return counts.cumsum(axis=0)


def _least_stretch(table: np.ndarray, caps: np.ndarray, seconds: np.ndarray, slos: np.ndarray) -> float:
    """The least v such that some K meets every slo_i * v: min_K T(K) w(K), with w(K) the least, over
    budgets of K draft tokens, of max_i 1 / (slo_i E_i(gamma_i)), which raising the worst session's gamma
    first attains (each 1 / E_i falls as its gamma grows) until the worst is at its cap."""
    heap = [(-1 / (slo * table[i, 0]), i) for i, slo in enumerate(slos) if np.isfinite(slo)]  # (-1 / (slo E), i)
    heapq.heapify(heap)
    gammas, w = [0] * len(caps), [-heap[0][0]]  # w[K]
    while len(w) < len(seconds) and gammas[heap[0][1]] < caps[heap[0][1]]:
        _, i = heapq.heappop(heap)
        gammas[i] += 1
        heapq.heappush(heap, (-1 / (slos[i] * table[i, gammas[i]]), i))
        w.append(-heap[0][0])
    w += [w[-1]] * (len(seconds) - len(w))
    return float((seconds * np.array(w)).min())


def _best_within(table: np.ndarray, caps: np.ndarray, counts: np.ndarray, seconds: np.ndarray,
                 slos: np.ndarray) -> np.ndarray | None:
    """[n] the budgets of the best K whose step meets every SLO (None: no K does), ties to the smaller K.

    For each K: the floors m_i = the least gamma_i with E_i(gamma_i) >= T(K) / slo_i, then the greedy's
    tokens above them: max(m, counts[P]) for the least prefix P of the greedy that sums to K (the prefix
    holds the largest steps of all, so those above the floors are the largest steps above the floors).
    """
    k = np.arange(len(seconds))  # [K + 1]
    if np.isinf(slos).all():
        budgets, feasible = counts, np.ones(len(k), dtype=bool)  # [K + 1, n]
    else:
        need = seconds[:, None] / slos[None, :] * (1 - 1e-12)  # [K + 1, n] least E_i for T(K) / E_i <= slo_i
        floors = np.stack([np.searchsorted(table[i, : c + 1], need[:, i]) for i, c in enumerate(caps)], axis=1)
        feasible = (floors <= caps).all(axis=1) & (floors.sum(axis=1) <= k)
        if not feasible.any():
            return None
        floors = np.minimum(floors, caps)
        low, high = np.zeros_like(k), np.full_like(k, len(counts) - 1)  # bisection over P, for every K at once
        while (low < high).any():
            mid = (low + high) // 2
            short = np.maximum(floors, counts[mid]).sum(axis=1) < k
            low, high = np.where(short, mid + 1, low), np.where(short, high, mid)
        budgets = np.maximum(floors, counts[low])  # [K + 1, n], summing to K where feasible
    expected = table[np.arange(len(caps))[None, :], budgets].sum(axis=1)  # [K + 1]
    rate = np.where(feasible, expected / seconds, -np.inf)
    best = int(np.argmax(rate >= rate.max() * (1 - 1e-12)))  # the least K within rounding of the best
    return budgets[best]
