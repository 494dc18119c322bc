"""Where a session's acceptance estimate starts (issue 18, specdec/acceptance.py): its drafter's rate at each draft
position, not one pooled rate for every position; and an answer's opening kept apart for shadow blocks too.

- The pure estimator: a session with no evidence reads its drafter's rates by position; one whose own blocks do
  worse than its drafter's moves every position down with it (an odds ratio), one that does better up.
- The budgeter: the real pair's LM alone on a CPU (its blocks land at position 1 ~0.9 of the time, at position 2
  ~0.84, ~0.74 pooled over every position) is granted blocks of 2, which pay there above ~0.77; at the pooled rate
  everywhere it was granted 1 (session 25's trace: 0.93 of a fixed gamma 2).
- A shadow block drafted in the answer's opening tells the opening's rate, on the verifier's side and the client's:
  counted as the session's own, one rejected at position 2 held an LM to blocks of 1 for 8 rounds.
"""

from __future__ import annotations

import pytest

from draft_worker.gamma import AutoGamma, new_history
from specdec.acceptance import OPENING_ROUNDS, AcceptanceTracker, DrafterAcceptance
from verifier_worker.budgeting import DraftBudgeter

# accepted draft tokens of 50 blocks of 4: position 1 accepted in 45 (0.9), 2 in 38 of those (0.84), 3 in 23 of 38
# (0.61), 4 in 9 of 23 (0.39); pooled over every position reached 115 / 156 = 0.74
LM_BLOCKS = [0] * 5 + [1] * 7 + [2] * 15 + [3] * 14 + [4] * 9


def _population(blocks: list[int] = LM_BLOCKS, repeats: int = 4) -> DrafterAcceptance:
    population = DrafterAcceptance(16, forget=1.0)  # no decay: the rates are the counts
    for _ in range(repeats):
        for accepted in blocks:
            population.update(4, accepted)
    return population


def test_a_session_with_no_evidence_reads_its_drafters_rates_by_position():
    population = _population()
    rates = population.session_rates(AcceptanceTracker(16), OPENING_ROUNDS)
    assert rates[:4] == pytest.approx(population.body.rates()[:4])
    assert rates[0] == pytest.approx(0.9, abs=0.02) and rates[1] == pytest.approx(0.84, abs=0.02)
    assert rates[3] == pytest.approx(0.39, abs=0.03)
    assert population.pooled() == pytest.approx(0.74, abs=0.01)  # what every position read before


@pytest.mark.parametrize("accepted, direction", [(0, -1), (4, 1)])
def test_a_session_unlike_its_drafter_moves_every_position_with_it(accepted, direction):
    population = _population()
    tracker = AcceptanceTracker(16)
    for _ in range(6):
        tracker.update(4, accepted)  # every block rejected outright, or accepted whole
    fresh = population.session_rates(AcceptanceTracker(16), OPENING_ROUNDS)
    moved = population.session_rates(tracker, OPENING_ROUNDS)
    for position in range(8):  # reached or not, every position moves the session's way
        assert direction * (moved[position] - fresh[position]) > 0.01
    assert all(0 < rate < 1 for rate in moved)


def _lm_alone(blocks: list[int]) -> int:
    """The first grant of a new LM session alone after 40 earlier ones with these blocks: 0.28 s steps + 0.01 s a
    token, 0.125 s of drafting a draft token and a 3 ms round trip, its client wanting 3 (session 25's figures)."""
    budgeter = DraftBudgeter(max_gamma=16)
    for tokens in (1, 2, 3, 4, 5) * 20:
        budgeter.on_step(0.27 + 0.01 * tokens, 1, tokens)
    for i in range(40):
        budgeter.open(i, drafter="lm")
        for _ in range(OPENING_ROUNDS):
            budgeter.on_verdict(i, 0, 0)
        for accepted in blocks[i % len(blocks):] + blocks[: i % len(blocks)]:
            budgeter.on_verdict(i, 4, accepted, 4)
        budgeter.close(i)
    budgeter.open("new", drafter="lm")
    budgeter.decodes_at_zero("new")
    budgeter.wants("new", 3)
    for _ in range(OPENING_ROUNDS):
        budgeter.on_verdict("new", 0, 0)
    budgeter.arrives("new", 0.253, 0.1, "lm", 0.003, 0.125)
    return budgeter.budget_for("new")


def test_an_lm_alone_is_granted_the_block_its_drafters_positions_pay_for():
    assert _lm_alone(LM_BLOCKS) == 2
    # a drafter at ~0.7 at every position: a block of 2 does not pay
    even = [0] * 15 + [1] * 10 + [2] * 8 + [3] * 5 + [4] * 12  # 0.70 / 0.71 / 0.68 / 0.71 by position
    assert _lm_alone(even) == 1


def test_a_shadow_block_of_the_answers_opening_is_not_the_sessions_own():
    budgeter = DraftBudgeter(max_gamma=16)
    budgeter.open("s", drafter="lm")
    opening = budgeter.population_of("lm").opening
    budgeter.on_verdict("s", 0, 0)  # its first round, decoded alone
    budgeter.on_shadow("s", 2, 1, 2)  # drafted at its first commit, rejected at position 2: decided a round later
    budgeter.on_verdict("s", 0, 0)
    budgeter.on_verdict("s", 0, 0)  # the opening is over
    budgeter.on_shadow("s", 2, 1, 2)  # decided now, drafted 2 rounds ago: in the opening still
    assert sum(budgeter._sessions["s"].tracker._reached) == 0 and sum(opening._reached) == pytest.approx(4, abs=0.01)
    budgeter.on_verdict("s", 0, 0)
    budgeter.on_shadow("s", 2, 1, 2)  # drafted after the opening: the session's own
    assert budgeter._sessions["s"].tracker._reached[:2] == [1, 1]


def test_the_clients_schedule_keeps_its_openings_shadow_blocks_apart_too():
    schedule = AutoGamma(history=new_history())
    assert schedule.opens_at(1) and schedule.opens_at(OPENING_ROUNDS) and not schedule.opens_at(OPENING_ROUNDS + 1)
    assert not AutoGamma().opens_at(1)  # without a history there is no opening to price apart
