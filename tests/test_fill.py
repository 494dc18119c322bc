"""What a grant costs the step is what its client sends (`Demand.fill`): an n-gram client with no match sends none of
its grant, so the verifier prices a grant by the draft tokens it expects to compute, not by the budget. The pure
grant against a brute force, and the budgeter learning a drafter's fill from its lock-step and shadow blocks."""

from __future__ import annotations

import itertools
import random

import pytest

from specdec.budget import Demand, Load, goodput, grant_budgets
from verifier_worker.budgeting import DraftBudgeter

pytestmark = pytest.mark.usefixtures("free_grants")  # a grant is remade at every step, however slow this machine

AFFINE = {  # (batch tokens, batch sessions) -> step seconds: the curves where the greedy prefix is exact
    "flat": lambda n, s: 0.02,
    "linear_shallow": lambda n, s: 0.02 + 0.0005 * n,
    "linear_cpu": lambda n, s: 0.01 + 0.004 * n + 0.002 * s,
    "linear_steep": lambda n, s: 0.001 + 0.01 * n,
}


def _demand(rng: random.Random, key: str, waits: bool) -> Demand:
    cap = rng.randint(0, 5)
    accept = [rng.choice([0.1, 0.5, 0.9, rng.random()]) for _ in range(6)]
    # a client sends a token only where it has one, and a token it did not send is no accepted one: alpha_j <= fill_j
    fill = [rng.choice([a, 1.0, a + (1 - a) * rng.random()]) for a in accept[:cap]]
    fill = [max(f, 1e-3) for f in fill]
    return Demand(key, accept, cap, wait_s=rng.choice([0.0, 0.002, 0.01]) if waits else 0.0, fill=fill)


@pytest.mark.parametrize("waits", [False, True], ids=["at-once", "waited-for"])
@pytest.mark.parametrize("curve", sorted(AFFINE))
def test_grant_priced_by_what_clients_send_matches_brute_force(curve, waits):
    """For a fixed cost, the best budgets take the draft tokens that buy the most per token sent (a fractional
    knapsack, each session's tokens in order); with T affine, goodput's best is such a prefix (Dinkelbach: every token
    whose gain per token sent exceeds b x G*), so the greedy over prefixes is exact there."""
    cost, rng = AFFINE[curve], random.Random(curve)
    for _ in range(60):
        demands = [_demand(rng, f"s{i}", waits) for i in range(rng.randint(1, 3))]
        load = Load(tokens=rng.choice([0, 16]), sessions=rng.choice([0, 1]))
        granted = grant_budgets(demands, cost, load)
        budgets = [granted[d.key] for d in demands]
        vectors = itertools.product(*(range(d.cap + 1) for d in demands))
        best = max(goodput(demands, v, cost, load) for v in vectors)
        assert goodput(demands, budgets, cost, load) == pytest.approx(best, rel=1e-9), (demands, budgets)


def test_a_grant_left_unsent_costs_the_step_nothing():
    """Two sessions whose grants buy the same (position 1 half the time, the rest whole): one whose client sends
    every block and is rejected half the time, one whose client has a match half the time and sends nothing
    otherwise. On a CPU-like curve (a draft token costs 1.5x the step's fixed part) the first is not worth its
    drafts (goodput 100 -> 84 tokens/s at 4); the second's cost half as much and pay (100 -> 130)."""
    cost = lambda n, s: 0.004 + 0.006 * n  # noqa: E731
    accept = [0.5, 0.95, 0.95, 0.95]
    sends_all, sends_half = Demand("all", accept, 4), Demand("half", accept, 4, fill=[0.5, 1.0, 1.0, 1.0])
    assert sends_half.sent(4) == pytest.approx(2.0) and sends_all.sent(4) == 4
    assert grant_budgets([sends_all], cost)["all"] == 0
    assert grant_budgets([sends_half], cost)["half"] == 4
    with pytest.raises(ValueError, match="fill"):
        Demand("bad", accept, 4, fill=[0.0, 1.0])


def _fed(sends_when_missed: bool) -> DraftBudgeter:
    """A budgeter whose lock-step session, granted 4, is accepted whole half the time and fails at position 1
    otherwise: by a rejected block of 4, or by sending nothing (an n-gram with no match)."""
    budgeter = DraftBudgeter(max_gamma=4)
    budgeter.open("s", max_gamma=4, drafter="ngram")
    for step in range(60):
        for tokens in range(1, 6):  # a CPU-like curve: a draft token costs 1.5x the step's fixed part
            budgeter.on_step(0.004 + 0.006 * tokens, sessions=1, tokens=tokens)
        if step % 2:
            budgeter.on_verdict("s", 4, 4, offered=4)
        else:
            budgeter.on_verdict("s", 4 if sends_when_missed else 0, 0, offered=4)
    return budgeter


def test_the_budgeter_learns_what_a_drafters_clients_send_of_a_grant():
    sends, skips = _fed(sends_when_missed=True), _fed(sends_when_missed=False)
    assert sends.population_of("ngram").body.rates()[0] == pytest.approx(skips.population_of("ngram").body.rates()[0])
    assert sends._seen("ngram").fill.rates()[0] > 0.95
    assert skips._seen("ngram").fill.rates()[0] == pytest.approx(0.5, abs=0.05)
    # shadow blocks say it too: drafted 0 of 4
    before = skips._seen("ngram").fill.rates()[0]
    skips.on_shadow("s", 0, 0, 4)
    assert skips._seen("ngram").fill.rates()[0] < before
    # the same acceptance (E(4) ~ 3), half the cost: the blocks of the session that sends nothing when it has
    # nothing pay (~3 tokens in a step of ~3 tokens' cost), the other's do not (in one of 5)
    assert sends.grants()["s"] == 0
    assert skips.grants()["s"] == 4
