"""The draft budget: the goodput grant against a brute-force search, the step-cost fit, the acceptance
tracker, the client's side, and the verifier's budgeter that wires them together."""

from __future__ import annotations

import itertools
import random

import pytest
from prometheus_client import CollectorRegistry

from specdec.acceptance import OPENING_ROUNDS, AcceptanceTracker
from specdec.budget import (Demand, Load, StepCostModel, goodput,
                            grant_budgets, pays_a_missed_step, waited)
from specdec.gamma import budgeted_gamma, choose_gamma, expected_tokens, expected_tokens_table
from verifier_worker.budgeting import MAX_DRAFTERS, BudgetMetrics, DraftBudgeter

pytestmark = pytest.mark.usefixtures("free_grants")  # a grant is remade at every step, however slow this machine

COSTS = {  # (batch tokens, batch sessions) -> step seconds
    "flat": lambda n, s: 0.02,
    "linear_shallow": lambda n, s: 0.02 + 0.0005 * n,
    "linear_cpu": lambda n, s: 0.01 + 0.004 * n + 0.002 * s,
    "linear_steep": lambda n, s: 0.001 + 0.01 * n,
    "step": lambda n, s: 0.02 if n <= 8 else 0.035,  # a jump to the next tile, then flat
    "two_steps": lambda n, s: 0.01 * (1 + n // 6),
}


def _brute_force(demands, cost, load=Load(), padded=False, hold_s=None):
    """(best goodput, its budgets) over every budget vector, meeting every SLO if any vector can."""
    vectors = list(itertools.product(*(range(d.cap + 1) for d in demands)))
    feasible = [v for v in vectors if _meets_slos(demands, v, cost, load, padded=padded)] or vectors
    best = max(feasible, key=lambda v: goodput(demands, v, cost, load, padded, hold_s))
    return goodput(demands, best, cost, load, padded, hold_s), best


def _tpot(demands, budgets, cost, load, padded=False):
    """[n] each session's expected verifier seconds per committed token."""
    drafts = len(budgets) * max(budgets) if padded else sum(budgets)  # pad-and-stack: every row the longest
    step_s = cost(len(demands) + drafts + load.tokens, len(demands) + load.sessions)
    return [step_s / expected_tokens(d.accept, g) for d, g in zip(demands, budgets)]


def _meets_slos(demands, budgets, cost, load, stretch=1.0, padded=False):
    return all(d.tpot_slo_s is None or t <= d.tpot_slo_s * stretch * (1 + 1e-9)
               for d, t in zip(demands, _tpot(demands, budgets, cost, load, padded)))


def _random_demands(rng: random.Random, n: int, slo: bool = False, waits: bool = False,
                    drafting: bool = False) -> list[Demand]:
    demands = []
    for i in range(n):
        cap = rng.randint(0, 4 if drafting else 6)  # drafting: at most WAIT_LEVELS distinct waits over 2 sessions
        if rng.random() < 0.5:
            accept = [rng.choice([0.0, 0.2, 0.5, 0.8, 0.95])] * 6  # constant alpha
        else:
            accept = [rng.random() for _ in range(6)]  # by position
        demands.append(Demand(f"s{i}", accept, cap, rng.choice([None, 0.005, 0.01, 0.02]) if slo else None,
                              rng.choice([0.0, 0.0, 0.002, 0.01, 0.03]) if waits else 0.0,
                              rng.choice([0.0, 0.001, 0.004, 0.01]) if drafting else 0.0))
    return demands


@pytest.mark.parametrize("waits", ["at-once", "waited-for", "held", "drafting"])
@pytest.mark.parametrize("padded", [False, True], ids=["summed", "padded"])
@pytest.mark.parametrize("curve", sorted(COSTS))
def test_grant_matches_brute_force(curve, padded, waits):
    """waited-for: granting a session drafts makes the step idle for its block (`Demand.wait_s`), and the step
    waits for the slowest session granted, so the brute force prices every vector T + that wait. held: the engine
    holds a step at most hold_s once other work is ready (`waited`), longer when every session was granted.
    drafting: a block of g comes wait_s + g x wait_per_token_s after its verdict (its client drafts each token)."""
    cost, rng = COSTS[curve], random.Random(curve)
    for _ in range(40):
        drafting = waits == "drafting"
        demands = _random_demands(rng, rng.randint(1, 2 if drafting else 3), waits=waits != "at-once",
                                  drafting=drafting)
        load = Load(tokens=rng.choice([0, 0, 16]), sessions=rng.choice([0, 1]))
        hold_s = rng.choice([0.001, 0.005, 0.02]) if waits == "held" else None
        granted = grant_budgets(demands, cost, load, padded=padded, hold_s=hold_s)
        budgets = [granted[d.key] for d in demands]
        assert all(0 <= g <= d.cap for d, g in zip(demands, budgets))
        best, _ = _brute_force(demands, cost, load, padded, hold_s)
        assert goodput(demands, budgets, cost, load, padded, hold_s) == pytest.approx(best, rel=1e-9), (demands,
                                                                                                        budgets)


def test_padded_steps_make_one_sessions_drafts_cost_every_row():
    """Pad-and-stack (the transformers backend): one session's 5-token block makes all 16 rows of the step
    cost 5 tokens, so on a CPU curve the drafts a summed price would grant a lone good session lose."""
    cost = lambda n, s: 0.38 + 0.098 * n  # noqa: E731 - the 1.5B verifier on one core of this CPU, bf16
    demands = [Demand("good", [0.9] * 4, 4), *(Demand(i, [0.1] * 4, 4) for i in range(15))]
    summed, padded = grant_budgets(demands, cost), grant_budgets(demands, cost, padded=True)
    assert summed["good"] > 0 and set(padded.values()) == {0}
    assert goodput(demands, list(padded.values()), cost, padded=True) > goodput(demands, list(summed.values()),
                                                                                   cost, padded=True)
    # a step of one session pays only its own row: the good session drafts either way
    assert grant_budgets(demands[:1], cost, padded=True)["good"] > 0


def test_a_session_the_step_would_idle_for_is_granted_only_what_pays_for_the_wait():
    """Two sessions at 80% acceptance on a CPU-like curve: drafts pay for both when their blocks come at once.
    One whose block comes 0.1 s after its verdict (an LM drafting on a shared core) makes the step idle for it,
    so it drafts only if its block buys more than the wait costs everyone; a wait of a whole step, never. With
    many such sessions the grant searches levels of waits and stays within the brute force."""
    cost = lambda n, s: 0.2 + 0.02 * n  # noqa: E731
    quick = [Demand("a", [0.8] * 4, 4), Demand("b", [0.8] * 4, 4)]
    assert all(grant_budgets(quick, cost).values())
    late = [quick[0], Demand("b", [0.8] * 4, 4, wait_s=0.1)]
    grant = grant_budgets(late, cost)
    assert grant["a"] > 0 and grant["b"] == 0  # the lost tenth of a second is worth more than b's block
    assert grant_budgets([quick[0], Demand("b", [0.8] * 4, 4, wait_s=0.5)], cost)["b"] == 0
    assert goodput(late, [grant["a"], 0], cost) > goodput(late, [grant["a"], 4], cost)
    slow = [Demand("a", [0.8] * 4, 4, wait_s=0.25), Demand("b", [0.8] * 4, 4, wait_s=0.25)]  # both slower than
    assert waited(slow, [4, 0], hold_s=0.1) == 0.1 and waited(slow, [4, 4], hold_s=0.1) == 0.25  # the 0.1 s hold
    assert grant_budgets(slow, cost, hold_s=0.1) in ({"a": 4, "b": 0}, {"a": 0, "b": 4})  # both: idle for both
    rng = random.Random(7)  # more distinct waits than WAIT_LEVELS: rounded up to a level, still near the optimum
    demands = [Demand(f"s{i}", [rng.choice([0.5, 0.9])] * 2, 2, wait_s=rng.random() * 0.2) for i in range(9)]
    granted = grant_budgets(demands, cost)
    best, _ = _brute_force(demands, cost)
    assert goodput(demands, [granted[d.key] for d in demands], cost) >= 0.97 * best


def test_a_session_alone_is_granted_the_blocks_whose_drafting_pays_for_the_wait():
    """One LM session the verifier decodes at budget 0 (the real pair on a CPU, session 24's trace): a step costs
    ~0.30 s, and a block granted comes 0.01 s (its round trip) + 0.13 s per draft token (its drafting) after its
    verdict; its client wants at most 2. At 70% acceptance a block of 1 pays most (1.7 tokens in 0.45 s against 1
    in 0.30 s), one of 2 less (2.19 in 0.59 s). Priced at the turnaround of its last block of 3 (0.40 s) whatever
    the size, no block paid, and the session decoded alone."""
    cost = lambda n, s: 0.29 + 0.01 * n  # noqa: E731
    split = Demand("lm", [0.7] * 4, 2, wait_s=0.01, wait_per_token_s=0.13)
    assert [split.wait_for(g) for g in range(3)] == pytest.approx([0.0, 0.14, 0.27])
    assert [split.within(t) for t in (0.0, 0.14, 0.2, 0.27, 1.0)] == [0, 1, 1, 2, 2]
    assert grant_budgets([split], cost) == {"lm": 1}
    assert goodput([split], [1], cost) > goodput([split], [2], cost) > goodput([split], [0], cost)
    assert grant_budgets([Demand("lm", [0.7] * 4, 2, wait_s=0.40)], cost) == {"lm": 0}
    with pytest.raises(ValueError, match="wait_per_token_s"):
        Demand("lm", [0.7] * 4, 4, wait_per_token_s=-0.1)
    rng = random.Random(11)  # alone, the step holds for nobody else: exact whatever the engine's hold
    for _ in range(200):
        (demand,) = _random_demands(rng, 1, waits=True, drafting=True)
        curve, hold_s = COSTS[rng.choice(sorted(COSTS))], rng.choice([None, 0.005, 0.02])
        granted = grant_budgets([demand], curve, hold_s=hold_s)[demand.key]
        assert goodput([demand], [granted], curve, hold_s=hold_s) == pytest.approx(
            _brute_force([demand], curve, hold_s=hold_s)[0], rel=1e-9)


@pytest.mark.parametrize("alpha, gamma, pays", [
    (0.8, 3, False),  # E = 2.95 >= 2 tokens of its own, yet the missed step and the hold cost the others more
    (0.95, 6, True),  # E = 6.0: worth two steps and the hold
    (0.0, 2, False),
])
def test_a_late_block_must_pay_for_the_step_it_makes_the_others_take(alpha, gamma, pays):
    """The 2-session case seen on the real pair: an LM session drafting on a shared core misses the step it was
    granted for; the other session's step then runs alone (costing about what both rows would) and the engine held
    it 0.1 s first. Priced over the two steps, against both sessions decoding (brute arithmetic here)."""
    cost = lambda n, s: 0.2 + 0.02 * n  # noqa: E731 - seconds for n tokens
    demands = [Demand("late", [alpha] * 6, 6), Demand("other", [0.5] * 6, 6)]
    e = expected_tokens(demands[0].accept, gamma)
    granted = (2 + e) / (cost(1, 1) + 0.1 + cost(2 * (1 + gamma), 2))  # padded: both rows 1 + gamma long
    assert pays_a_missed_step(demands, [gamma, 0], 0, cost, padded=True, hold_s=0.1) == pays
    assert (granted >= 4 / (2 * cost(2, 2))) == pays
    assert pays_a_missed_step(demands[:1], [gamma], 0, cost, hold_s=0.1) == (gamma > 0)  # alone: misses nobody's


def test_grant_matches_brute_force_on_a_fitted_model():
    model = StepCostModel()
    for tokens, seconds in [(1, 0.03), (5, 0.05), (40, 0.21), (8, 0.065)]:
        model.observe(seconds, tokens, 1)
    demands = [Demand("a", [0.9, 0.8, 0.7, 0.6], 4), Demand("b", [0.6] * 4, 4), Demand("c", [0.2] * 4, 2)]
    granted = grant_budgets(demands, model.cost)
    best, vector = _brute_force(demands, model.cost)
    assert goodput(demands, [granted[d.key] for d in demands], model.cost) == pytest.approx(best)
    assert 0 < sum(vector) < 10  # a real trade-off, not an edge


@pytest.mark.parametrize("padded", [False, True], ids=["summed", "padded"])
def test_where_nothing_pays_without_a_wait_no_wait_level_is_priced(padded):
    """The bound: a grant at every session's cap priced with no idle grants nothing, so no wait level can (a wait
    lowers only a grant's goodput): each step size is priced once and no candidate after. Where drafts pay, the
    search over the waits still runs and matches the brute force."""
    calls = []

    def steep(n, s):
        calls.append(n)
        return COSTS["linear_steep"](n, s)

    waits = (0.002, 0.004, 0.006, 0.008)  # four wait levels
    demands = [Demand(f"s{i}", [0.3] * 4, 4, wait_s=w) for i, w in enumerate(waits)]
    assert grant_budgets(demands, steep, padded=padded, hold_s=0.005) == {d.key: 0 for d in demands}
    assert len(calls) == len(set(calls)) == (4 + 1 if padded else 16 + 1)  # T(K) for each K the grant can compute
    assert goodput(demands, [0] * 4, steep, padded=padded, hold_s=0.005) == pytest.approx(
        _brute_force(demands, steep, padded=padded, hold_s=0.005)[0])
    calls.clear()
    shallow = [Demand(f"s{i}", [0.9] * 4, 4, wait_s=w) for i, w in enumerate(waits)]
    granted = grant_budgets(shallow, COSTS["flat"], padded=padded, hold_s=0.005)
    assert goodput(shallow, [granted[d.key] for d in shallow], COSTS["flat"], padded=padded, hold_s=0.005) == \
        pytest.approx(_brute_force(shallow, COSTS["flat"], padded=padded, hold_s=0.005)[0])


def test_zero_when_drafts_cannot_pay():
    steep = COSTS["linear_steep"]  # a draft token costs as much as a whole plain step
    demands = [Demand(k, [0.3] * 6, 6) for k in "abcd"]
    assert grant_budgets(demands, steep) == dict.fromkeys("abcd", 0)
    # never accepted: nothing to buy even when tokens are free (ties go to less work)
    assert grant_budgets([Demand("a", [0.0] * 6, 6)], COSTS["flat"]) == {"a": 0}
    # the same sessions with good drafts on a shallow curve are granted tokens
    assert sum(grant_budgets([Demand(k, [0.9] * 6, 6) for k in "abcd"], COSTS["linear_shallow"]).values()) > 0


def test_flat_cost_grants_every_session_its_cap():
    demands = [Demand("a", [0.5] * 8, 8), Demand("b", [0.1] * 8, 3), Demand("c", [0.95] * 8, 0)]
    assert grant_budgets(demands, COSTS["flat"]) == {"a": 8, "b": 3, "c": 0}


def test_load_and_more_sessions_shrink_the_budget_on_a_cpu_curve():
    # one session on a steep-ish CPU curve drafts; with 8 such sessions the same drafts no longer pay
    cost = lambda n, s: 0.03 + 0.012 * n  # noqa: E731 - a 1-token step 42 ms, a 5-token step 90 ms
    one = grant_budgets([Demand(0, [0.8] * 6, 6)], cost)[0]
    eight = grant_budgets([Demand(i, [0.8] * 6, 6) for i in range(8)], cost)
    assert one > 0 and sum(eight.values()) < 8 * one


def test_slo_is_respected_when_it_can_be_met():
    cost = COSTS["linear_cpu"]
    demands = [Demand("fast", [0.95] * 6, 6), Demand("hard", [0.1] * 6, 6, tpot_slo_s=0.03)]
    free = grant_budgets([Demand(d.key, d.accept, d.cap) for d in demands], cost)
    assert not _meets_slos(demands, [free["fast"], free["hard"]], cost, Load())  # the goodput optimum misses it
    granted = grant_budgets(demands, cost)
    budgets = [granted["fast"], granted["hard"]]
    assert _meets_slos(demands, budgets, cost, Load())
    assert goodput(demands, budgets, cost) == pytest.approx(_brute_force(demands, cost)[0])


@pytest.mark.parametrize("padded", [False, True], ids=["summed", "padded"])
@pytest.mark.parametrize("curve", ["linear_cpu", "step", "linear_steep"])
def test_slos_match_brute_force(curve, padded):
    cost, rng = COSTS[curve], random.Random(curve + "slo")
    stretched = 0
    for _ in range(40):
        demands = _random_demands(rng, rng.randint(1, 3), slo=True)
        granted = grant_budgets(demands, cost, padded=padded)
        budgets = [granted[d.key] for d in demands]
        vectors = list(itertools.product(*(range(d.cap + 1) for d in demands)))
        if any(_meets_slos(demands, v, cost, Load(), padded=padded) for v in vectors):
            assert _meets_slos(demands, budgets, cost, Load(), padded=padded)
            assert goodput(demands, budgets, cost, padded=padded) == pytest.approx(
                _brute_force(demands, cost, padded=padded)[0], rel=1e-9)
        else:  # no vector meets every SLO: the grant misses them by the least common factor
            stretched += 1
            worst = lambda v: max(t / d.tpot_slo_s for d, t in  # noqa: E731
                                  zip(demands, _tpot(demands, v, cost, Load(), padded)) if d.tpot_slo_s is not None)
            assert worst(budgets) == pytest.approx(min(worst(v) for v in vectors), rel=1e-6)
    assert stretched  # the fallback was exercised


def test_demand_validation():
    with pytest.raises(ValueError):
        Demand("a", [0.5] * 2, 3)
    with pytest.raises(ValueError):
        Demand("a", [0.5] * 3, 3, tpot_slo_s=0.0)
    with pytest.raises(ValueError):
        Demand("a", [0.5, 1.2], 2)
    with pytest.raises(ValueError):
        Demand("a", [0.5] * 2, 2, wait_s=-0.1)


# ------------------------------------------------------------------------------------------ the fit
def test_fit_recovers_a_and_b_from_noisy_steps():
    rng, model = random.Random(0), StepCostModel()
    for _ in range(300):
        tokens, sessions = rng.randint(1, 64), rng.randint(1, 8)
        model.observe(0.05 + 0.003 * tokens + 0.001 * sessions + rng.gauss(0, 0.002), tokens, sessions)
    a, b, c, _ = model.coefficients
    assert a == pytest.approx(0.05, rel=0.1) and b == pytest.approx(0.003, rel=0.05) and c == pytest.approx(0.001, abs=5e-4)
    assert model.marginal(10) == pytest.approx(b)
    assert model.cost(10, 2) == pytest.approx(a + 10 * b + 2 * c)


def test_fit_follows_drift_and_never_goes_negative():
    rng, model = random.Random(1), StepCostModel()
    for slope in (0.004, 0.0005):  # the device got faster per token (e.g. the batch moved to a GPU)
        for _ in range(300):
            tokens = rng.randint(1, 32)
            model.observe(0.02 + slope * tokens + rng.gauss(0, 0.001), tokens, 1)
        assert model.coefficients[1] == pytest.approx(slope, rel=0.2)
    model = StepCostModel()
    for tokens in (1, 10, 20, 30):  # cost falling with tokens: noise, not a free lunch
        model.observe(0.05 - 0.001 * tokens, tokens, 1)
    assert model.coefficients[1] == 0.0 and model.cost(30, 1) >= 0.0


def test_fit_with_one_size_calls_it_all_fixed():
    model = StepCostModel()
    assert model.cost(5, 1) == 0.0  # nothing seen: the prior
    for _ in range(3):
        model.observe(0.1, 5, 1)
    assert model.cost(5, 1) == pytest.approx(0.1, rel=1e-3)
    assert model.coefficients[1] < 1e-4  # the split is unknown: the prior's slope holds


# ------------------------------------------------------------------------------------------ acceptance
def test_tracker_prior_and_per_position_rates():
    tracker = AcceptanceTracker(max_gamma=4, prior_alpha=0.6)
    assert tracker.rates() == pytest.approx([0.6] * 4)
    assert tracker.rates(prior_alpha=0.2) == pytest.approx([0.2] * 4)  # a new session: the server-wide rate
    for _ in range(200):
        tracker.update(4, 1)  # position 1 always accepted, position 2 always rejected
    rates = tracker.rates()
    assert rates[0] > 0.9 and rates[1] < 0.1
    assert tracker.expected_tokens(4) == pytest.approx(expected_tokens(rates, 4))


def test_tracker_follows_a_change_of_alpha():
    rng, tracker = random.Random(2), AcceptanceTracker(max_gamma=6, forget=0.95)

    def run(alpha: float, rounds: int) -> None:
        for _ in range(rounds):
            accepted = next((j for j in range(6) if rng.random() >= alpha), 6)
            tracker.update(6, accepted)

    run(0.9, 300)
    assert tracker.pooled() == pytest.approx(0.9, abs=0.05)
    run(0.2, 200)
    assert tracker.pooled() == pytest.approx(0.2, abs=0.07)
    assert tracker.rates()[0] == pytest.approx(0.2, abs=0.1)


def test_expected_tokens_table_steps_never_grow():
    table = expected_tokens_table([0.9, 0.5, 1.0, 0.7], 4)
    steps = [b - a for a, b in zip(table, table[1:])]
    assert steps == pytest.approx([0.9, 0.45, 0.45, 0.315]) and steps == sorted(steps, reverse=True)


# ------------------------------------------------------------------------------------------ client side
def test_client_takes_the_smaller_of_budget_and_its_best_gamma():
    accept = [0.8] * 8
    for budget in range(9):
        for draft_s in (0.0005, 0.005, 0.05):
            args = (accept, draft_s, (0.02, 0.002), 0.01)
            assert budgeted_gamma(budget, *args, max_gamma=8) == min(budget, choose_gamma(*args, 8))
    # a draft too slow for its verifier falls to 0 whatever the budget
    assert budgeted_gamma(8, accept, 1.0, (0.02, 0.002), 0.01, 8) == 0
    assert budgeted_gamma(0, accept, 0.0001, (0.02, 0.0), 0.01, 8) == 0


# ------------------------------------------------------------------------------------------ the budgeter
def _feed_steps(budgeter: DraftBudgeter, fixed_s: float, per_token_s: float) -> None:
    for _ in range(40):  # enough for the older steps' weight to decay
        for tokens in (1, 4, 8, 64, 2, 16):  # a prefill chunk and some blocks
            budgeter.on_step(fixed_s + per_token_s * tokens, 1, tokens)  # (compute_s, sessions, tokens)


def test_budgeter_grants_by_measured_cost_and_acceptance():
    registry = CollectorRegistry()
    budgeter = DraftBudgeter(max_gamma=8, metrics=BudgetMetrics(registry))
    budgeter.open("easy")
    budgeter.open("hard")
    budgeter.open("generate", max_gamma=0)
    for _ in range(50):
        budgeter.on_verdict("easy", 8, 8)
        budgeter.on_verdict("hard", 4, 0)
        budgeter.on_verdict("generate", 0, 0)
    _feed_steps(budgeter, 0.02, 0.0)  # flat: every session with any hope drafts its cap
    assert budgeter.budget_for("easy") == 8 and budgeter.budget_for("generate") == 0
    _feed_steps(budgeter, 0.02, 0.01)  # a draft token costs half a step
    # the gauge reads the fit at scrape time: no grant made since these steps, and it sees them
    assert registry.get_sample_value("specdec_verifier_step_cost_per_token_seconds") == pytest.approx(0.01, rel=0.05)
    assert budgeter.cost.coefficients[1] == pytest.approx(0.01, rel=0.05)
    easy, hard = budgeter.budget_for("easy"), budgeter.budget_for("hard")
    assert easy > 0 and hard == 0
    assert registry.get_sample_value("specdec_verifier_step_cost_per_token_seconds") == pytest.approx(
        budgeter.cost.coefficients[1])
    # a decode-only (Generate) session is never granted drafts, so its 0 is not a grant the histogram counts
    assert registry.get_sample_value("specdec_verifier_draft_budget_tokens_count") == 3
    assert registry.get_sample_value("specdec_verifier_draft_budget_tokens_bucket", {"le": "0.0"}) == 1


def test_budgeter_prices_prefill_tokens_apart_from_draft_tokens():
    """A prompt chunk's tokens cost a CPU a quarter of a verify block's (one long row, one efficient matrix
    product): a single slope would learn the cheap one and over-grant. The budgeter fits both and grants what
    the true curve's brute force grants."""
    fixed_s, block_token_s, prefill_token_s = 0.1, 0.02, 0.005
    budgeter = DraftBudgeter(max_gamma=8)
    for key in ("a", "b", "c", "d"):
        budgeter.open(key)
        for _ in range(50):
            budgeter.on_verdict(key, 4, 3)  # acceptance ~0.75 per position
    rng = random.Random(0)
    for _ in range(200):
        sessions, tokens = rng.randint(1, 4), rng.randint(1, 20)
        prefill = rng.choice([0, 0, 0, 256])  # now and then a chunk rides the step
        budgeter.on_step(fixed_s + block_token_s * tokens + prefill_token_s * prefill, sessions + (prefill > 0),
                         tokens + prefill, prefill)
    _, b, _, d = budgeter.cost.coefficients
    assert b == pytest.approx(block_token_s, rel=0.05) and d == pytest.approx(prefill_token_s, rel=0.05)
    demands = [Demand(k, budgeter._sessions[k].tracker.rates(budgeter.population.pooled()), 8) for k in "abcd"]
    for load in (Load(), Load(256, 1)):
        truth = grant_budgets(demands, lambda t, s: fixed_s + block_token_s * (t - load.tokens) + prefill_token_s * load.tokens, load)
        assert budgeter.grants(load) == truth
    one_slope = StepCostModel(prior=(0.0, 0.0, 0.0, 0.0))  # the same steps, prefill tokens counted as block tokens
    for _ in range(200):
        tokens, prefill = rng.randint(4, 20), rng.choice([0, 0, 0, 256])
        one_slope.observe(fixed_s + block_token_s * tokens + prefill_token_s * prefill, tokens + prefill, 4)
    assert one_slope.coefficients[1] < block_token_s / 2  # what the old fit believed a draft token cost


def test_budgeter_grants_once_per_step_and_respects_the_clients_limit():
    budgeter = DraftBudgeter(max_gamma=8)
    budgeter.open("a", max_gamma=3)
    _feed_steps(budgeter, 0.02, 0.0)
    assert budgeter.budget_for("a") == 3
    budgeter.on_verdict("a", 3, 0)  # within the step the grant holds
    assert budgeter.budget_for("a") == 3
    budgeter.close("a")
    assert budgeter.grants() == {}


def test_a_fast_verifier_remakes_its_grant_at_most_every_few_steps(monkeypatch):
    """Making a grant takes the event loop ~0.1-1 ms between steps: a fast verifier's steps (a few ms) reuse it for
    as many steps as keep that within GRANT_SHARE of their compute, and up to STEADY_BACKOFF times as many while it
    comes out unchanged and no draft is accepted; a slow one remakes it every step."""
    from types import SimpleNamespace

    import verifier_worker.budgeting as budgeting

    clock = itertools.count(0.0, 0.0005)  # every reading 0.5 ms on: each grant takes 0.5 ms
    monkeypatch.setattr(budgeting, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    made = []

    class Counting(DraftBudgeter):
        def grants(self, *args, **kwargs):
            made.append(1)
            return super().grants(*args, **kwargs)

    budgeter = Counting(max_gamma=4)
    budgeter.open("a")
    budgeter.budget_for("a")
    assert len(made) == 1

    def steps(n: int) -> None:
        for _ in range(n):
            budgeter.on_step(0.005, 1, 1)
            budgeter.budget_for("a")

    steps(5)  # 5 ms steps: 0.5 ms is 2% of 5 steps
    assert len(made) == 2
    steps(9)  # it came out as the one before: reused twice as long, then 4 times (STEADY_BACKOFF)
    assert len(made) == 2
    steps(1)
    assert len(made) == 3
    steps(19)
    assert len(made) == 3
    steps(1)
    assert len(made) == 4
    budgeter.on_verdict("a", 2, 1)  # an accepted draft: the grant may change, so it is remade as scheduled again
    steps(4)
    assert len(made) == 4
    steps(1)
    assert len(made) == 5
    budgeter.open("b")  # a new session: at once
    budgeter.budget_for("b")
    assert len(made) == 6
    for _ in range(3):  # 0.3 s steps: every step
        budgeter.on_step(0.3, 2, 2)
        budgeter.budget_for("a")
    assert len(made) == 9
    budgeter.on_step(0.005, 2, 2)  # a fast step again: the grant stands for a few steps
    budgeter.budget_for("a")
    assert len(made) == 9
    budgeter.arrives("a", 0.001, 0.0005)  # now slower than the hold, granted drafts: remade at once
    budgeter.budget_for("a")
    # still granted: the step its late block would make b take alone is priced by b's one-session steps (5 ms here),
    # so missing it costs little (priced by the two-session steps, 0.3 s, it was granted 0)
    assert len(made) == 10 and budgeter.budget_for("a") == 2
    budgeter.arrives("a", 0.0001, 0.0005)  # in time again: a relaxation, remade as scheduled
    budgeter.budget_for("a")
    assert len(made) == 10


def test_new_sessions_start_from_the_population_rate():
    budgeter = DraftBudgeter(max_gamma=6)
    _feed_steps(budgeter, 0.01, 0.004)
    for i in range(30):
        for _ in range(3):  # an opening and a round after it
            budgeter.on_verdict(f"old{i}", 6, 0)  # nobody's drafts are ever accepted here
    budgeter.open("new")
    assert budgeter.population.pooled() < 0.2
    assert budgeter.budget_for("new") == 0


def test_an_answers_opening_is_granted_from_the_openings_seen():
    """The real pair's LM drafter: an answer's first blocks were rejected in 12 and 8 of 16 answers, the later ones
    in ~1 of 10. Earlier sessions like that: a new session is granted nothing in its opening (its drafts are rejected
    there), and its opening's rejections do not take its later budget down with them."""
    budgeter = DraftBudgeter(max_gamma=6)
    _feed_steps(budgeter, 0.02, 0.006)  # a CPU-like curve: a draft token costs 30% of a one-token step
    for i in range(20):
        for r in range(10):
            budgeter.on_verdict(f"old{i}", 4, 0 if r < OPENING_ROUNDS else 4, offered=4)
        budgeter.close(f"old{i}")
    budgeter.open("new")
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("new") == 0
    budgeter.on_verdict("new", 4, 0, offered=4)  # an older client drafts anyway: rejected, as openings are
    budgeter.on_verdict("new", 0, 0)
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("new") >= 4  # past its opening: the rate of the rounds after the openings


def test_each_drafter_is_priced_by_its_own_sessions():
    """Two drafters on one verifier, one whose openings land and one whose openings are rejected: a new session of
    each is granted by its own drafter's sessions, not by a rate pooled over both (one population priced an LM's
    openings by an n-gram's beside it); an unnamed client starts from the prior."""
    budgeter = DraftBudgeter(max_gamma=6)
    _feed_steps(budgeter, 0.02, 0.006)
    for i in range(20):
        for name, accepted in (("good", 4), ("bad", 0)):
            budgeter.open(f"{name}{i}", drafter=name)
            for _ in range(OPENING_ROUNDS + 2):
                budgeter.on_verdict(f"{name}{i}", 4, accepted, offered=4)
            budgeter.close(f"{name}{i}")
    for name in ("good", "bad", None):
        budgeter.open(f"new-{name}", drafter=name)
    budgeter.on_step(0.03, 3, 3)
    assert budgeter.budget_for("new-good") >= 4 and budgeter.budget_for("new-bad") == 0
    assert budgeter.population_of("good").opening.pooled() > 0.8 > 0.2 > budgeter.population_of("bad").pooled()
    assert budgeter.population.opening.pooled() == budgeter.population.pooled() == 0.5  # nothing seen unnamed


def test_drafter_populations_are_bounded():
    budgeter = DraftBudgeter(max_gamma=4)
    budgeter.open("kept", drafter="lm")
    budgeter.on_verdict("kept", 4, 4, offered=4)
    budgeter.arrives("kept", 0.3, 0.1, "lm")
    for i in range(MAX_DRAFTERS + 10):  # a client cycling names
        budgeter.population_of(f"read{i}")  # reading makes no entry
        budgeter.open(f"s{i}", drafter=f"name{i}")
        budgeter.arrives(f"s{i}", 0.1, 0.1, f"name{i}")
    assert len(budgeter._drafters) == MAX_DRAFTERS and not any(str(k).startswith("read") for k in budgeter._drafters)
    assert budgeter._sessions["kept"].drafter.acceptance.opening.pooled() > 0.5  # an open session keeps its own
    budgeter.open("new", drafter="lm")  # an evicted drafter starts again, its turnaround with it
    budgeter.arrives("new", None, 0.1, "lm")
    assert budgeter._sessions["new"].wait_s == 0.0 and budgeter._drafters["name73"].turnaround_s == 0.1


def test_a_session_denied_drafts_gets_another_try():
    budgeter = DraftBudgeter(max_gamma=6)
    _feed_steps(budgeter, 0.02, 0.004)
    for _ in range(100):
        budgeter.on_verdict("peer", 6, 5)  # the population accepts well
    for _ in range(20):
        budgeter.on_verdict("s", 6, 0)  # this session's drafts were all rejected
    budgeter.on_step(0.03, 2, 2)
    assert budgeter.budget_for("s") == 0
    for _ in range(60):  # plain decoding rounds: its counts decay back toward the population's rate
        budgeter.on_verdict("s", 0, 0)
    budgeter.on_step(0.03, 2, 2)
    assert budgeter.budget_for("s") > 0


def test_a_session_still_prefilling_is_priced_as_load_not_as_a_block():
    budgeter = DraftBudgeter(max_gamma=4)
    _feed_steps(budgeter, 0.02, 0.004)
    for key in ("a", "b"):
        budgeter.open(key)
    for _ in range(20):
        budgeter.on_verdict("a", 4, 4)
    grant = budgeter.grants(Load(tokens=64, sessions=1), exclude={"b"})
    assert set(grant) == {"a"}  # b rides the step as its prompt chunk only
    assert budgeter.budget_for("a", 1, 64, prefilling={"b"}) == grant["a"]
    assert set(budgeter._grants) == {"a"}  # the step's grant left b out
    assert budgeter.budget_for("b", 1, 64, prefilling={"b"}) >= 0  # once answered, b asks for itself


def test_a_prompt_opening_beside_a_session_does_not_make_its_drafts_look_cheap():
    """A step's cost here is about its tokens (0.5 s each: a 2-core AVX2 CPU in fp32), so at 70% a token drafts
    cannot pay. A prompt queued beside the session is spent whatever is granted (its chunks run in steps of their own);
    weighed in, its seconds made the drafts' share look small, and a 256-token prompt opening beside the session got
    it a grant of several tokens (session 13's trace: grants of 5 and 7 while another request prefilled)."""
    budgeter = DraftBudgeter(max_gamma=8)
    for _ in range(5):
        for tokens in (1, 2, 4, 8):
            budgeter.on_step(0.5 * tokens, 1, tokens)
        budgeter.on_step(0.5 + 0.06 * 256, 2, 1 + 256, 256)
    for _ in range(30):
        budgeter.on_verdict("s", 4, 3)
    assert budgeter.grants(Load(tokens=0, sessions=0))["s"] == 0
    assert budgeter.grants(Load(tokens=256, sessions=1))["s"] == 0


def test_budget_a_lock_step_client_leaves_unused_counts_as_buying_nothing():
    """An n-gram client granted 4 that finds no match half the time: what a grant of 4 buys is 1 + 0.5 x its
    drafts' worth, and the tracker says so; a session denied drafts (offered 0) only decays."""
    matched, offered = AcceptanceTracker(max_gamma=4), AcceptanceTracker(max_gamma=4)
    for i in range(200):
        if i % 2:
            matched.update(4, 4)
            offered.update(4, 4, offered=4)
        else:  # nothing proposed
            matched.update(0, 0)
            offered.update(0, 0, offered=4)
    assert matched.expected_tokens(4) > 4.5  # blind to the empty rounds: every grant looks whole
    assert offered.expected_tokens(4) == pytest.approx(3.0, abs=0.15)  # 1 + half of 4
    denied = AcceptanceTracker(max_gamma=4)
    for _ in range(50):
        denied.update(4, 4)
    before = denied.expected_tokens(4)
    denied.update(0, 0, offered=0)
    assert denied.expected_tokens(4) == pytest.approx(before, rel=0.05)
