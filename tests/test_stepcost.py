"""The measured step cost (specdec/stepcost.py, `StepCostTable`): medians per token count where steps were seen,
the affine fit's slope beyond them, prefill priced by the fit, old samples dropped; and the grant it makes on
the CPU curve measured on the real pair, which a line fitted to the same steps gets wrong."""

from __future__ import annotations

import random

import pytest

from specdec.budget import Demand, StepCostModel, StepCostTable, goodput, grant_budgets

# one core, the 1.5B verifier in bf16: computed tokens of a step -> seconds (README, scripts/measure_batching.py)
CPU = {1: 0.400, 4: 0.409, 8: 0.451, 12: 0.529, 16: 0.624, 24: 0.908, 48: 1.350}


def cpu_curve(tokens: int, sessions: int = 1) -> float:
    counts = sorted(CPU)
    for lo, hi in zip(counts, counts[1:]):
        if lo <= tokens <= hi:
            return CPU[lo] + (CPU[hi] - CPU[lo]) * (tokens - lo) / (hi - lo)
    return CPU[48] + 0.018 * (tokens - 48)


def test_medians_where_seen_interpolated_between_and_the_slope_beyond():
    rng, table = random.Random(0), StepCostTable()
    for _ in range(10):
        for tokens in (4, 8, 12):
            table.observe(cpu_curve(tokens) * rng.uniform(0.98, 1.02), tokens, 4)
    table.observe(10 * CPU[8], 8, 4)  # a stall (another tenant, a GC pause): the median does not move
    assert table.cost(8, 4) == pytest.approx(CPU[8], rel=0.02)
    assert table.cost(10, 4) == pytest.approx((table.cost(8, 4) + table.cost(12, 4)) / 2)
    slope = table.coefficients[1]
    assert slope > 0 and table.cost(20, 4) == pytest.approx(table.cost(12, 4) + 8 * slope)
    assert table.cost(2, 4) == pytest.approx(max(0.0, table.cost(4, 4) - 2 * slope))
    assert table.marginal(8, 4) == pytest.approx(table.cost(9, 4) - table.cost(8, 4))


def test_prefill_steps_stay_out_of_the_table_and_are_priced_by_the_fit():
    table = StepCostTable()
    assert table.cost(4, 1) == 0.0  # nothing seen: the fit's prior
    for _ in range(5):
        table.observe(0.4, 4, 4)
        table.observe(2.0, 4, 5, prefill_tokens=128)
    assert table.medians() == {4: pytest.approx(0.4)}
    per_prefill_token = table.coefficients[3]
    assert per_prefill_token > 0
    assert table.cost(4, 5, prefill_tokens=100) == pytest.approx(0.4 + 100 * per_prefill_token)


def test_old_samples_age_out():
    table = StepCostTable(max_age=20)
    for _ in range(10):
        table.observe(0.4, 4, 4)
    for _ in range(30):  # the contexts grew: the same tokens now cost more
        table.observe(0.5, 4, 4)
        table.observe(0.7, 8, 4)
    assert table.cost(4, 4) == pytest.approx(0.5) and table.cost(8, 4) == pytest.approx(0.7)
    for _ in range(25):
        table.observe(0.9, 16, 4)
    assert set(table.medians()) == {16}  # 4 and 8 not seen for 25 steps: the fit's slope prices them now


@pytest.mark.parametrize("sessions", [2, 4, 8, 16])
def test_the_grant_on_measured_steps_is_the_grant_on_the_true_curve(sessions):
    """Sessions of n-gram-like acceptance on the measured CPU curve: fed the steps the engine sees (mostly plain
    decoding, some blocks of 1-3 drafts), the table prices every ceiling as the curve does (within noise), so the
    padded grant's goodput is the true optimum's."""
    rng = random.Random(sessions)
    table = StepCostTable()
    for _ in range(60):
        g = rng.choice([0, 0, 0, 1, 2, 3])
        tokens = sessions * (1 + g)
        seconds = cpu_curve(tokens) * rng.uniform(0.99, 1.01)
        table.observe(seconds, tokens, sessions)
    demands = [Demand(i, [0.6, 0.5, 0.45, 0.4], 4) for i in range(sessions)]
    truth = grant_budgets(demands, cpu_curve, padded=True)
    measured = grant_budgets(demands, table.cost, padded=True)
    budgets = lambda grant: [grant[d.key] for d in demands]  # noqa: E731
    assert goodput(demands, budgets(measured), cpu_curve, padded=True) == pytest.approx(
        goodput(demands, budgets(truth), cpu_curve, padded=True), rel=0.01)


def test_a_line_through_the_cpu_curve_misprices_the_choice_the_table_gets_right():
    table, line = StepCostTable(), StepCostModel()
    for _ in range(10):
        for tokens in (4, 8, 12, 16):  # 4 sessions at gamma 0..3
            table.observe(cpu_curve(tokens), tokens, 4)
            line.observe(cpu_curve(tokens), tokens, 4)
    errors = {n: line.cost(n, 4) / cpu_curve(n) - 1 for n in (4, 8, 12, 16)}
    assert max(abs(e) for e in errors.values()) > 0.03  # the line is off somewhere by more than 3%
    assert all(table.cost(n, 4) == pytest.approx(cpu_curve(n)) for n in errors)


# one core of an AMX CPU (Intel Xeon, 2 vCPU, amx_bf16), the 1.5B verifier in bf16: (sessions, tokens) -> seconds, from a
# sweep's steps (docs/results.md, session 29). Rows of one token each run padded; a row with drafts makes the step
# pack every session's past into one attention, so at 16 sessions a single draft token costs half a step more.
AMX = {(8, 8): 0.413, (8, 17): 0.522, (8, 22): 0.547, (8, 25): 0.610, (8, 33): 0.695, (8, 49): 0.844,
       (16, 16): 0.442, (16, 17): 0.662, (16, 22): 0.692, (16, 27): 0.695, (16, 35): 0.910, (16, 45): 1.021}


def amx_curve(tokens: int, sessions: int) -> float:
    seen = sorted(n for s, n in AMX if s == sessions)
    if tokens <= seen[0]:
        return AMX[sessions, seen[0]]
    lo = max(n for n in seen if n < tokens)
    hi = min((n for n in seen if n >= tokens), default=None)
    if hi is None:
        return AMX[sessions, lo] + 0.011 * (tokens - lo)
    return AMX[sessions, hi] if lo == seen[0] else (  # any draft at all pays the packed route's jump
        AMX[sessions, lo] + (AMX[sessions, hi] - AMX[sessions, lo]) * (tokens - lo) / (hi - lo))


def test_each_session_count_is_priced_by_its_own_steps_and_no_step_below_the_fastest_seen_of_fewer_tokens():
    """A verifier that served 8 sessions, then 16: the 8-session steps of 17-49 tokens say nothing of the 16-session
    ones (where any draft costs the packed route's jump), one 16-session step of 17 tokens, seen once, is enough to
    price every larger 16-session step at least as dear, and the wave's tail (15, 14, ... sessions, not seen yet) is
    priced as the same drafts over 16 sessions."""
    table = StepCostTable()
    for _ in range(5):
        for n in (8, 17, 22, 25, 33, 49):
            table.observe(amx_curve(n, 8), n, 8)
    for _ in range(5):
        table.observe(amx_curve(16, 16), 16, 16)
    assert table.cost(22, 8) == pytest.approx(AMX[8, 22])  # its own steps
    assert table.cost(16, 16) == pytest.approx(AMX[16, 16])
    table.observe(amx_curve(17, 16), 17, 16)  # one step with a draft token at 16 sessions
    assert all(table.cost(n, 16) >= AMX[16, 17] for n in range(17, 40))
    assert table.cost(12, 12) == pytest.approx(AMX[16, 16])  # no draft: 4 rows fewer than 16 sessions' plain step
    assert table.cost(13, 12) >= AMX[16, 17]  # one draft: the jump
    assert table.cost(13, 6) == pytest.approx(table.cost(15, 8))  # none above 6 but 8 and 16: the nearest
    demands = [Demand(i, [0.55, 0.6, 0.65, 0.7], 4) for i in range(16)]  # an n-gram's rates
    assert grant_budgets(demands, amx_curve) == {i: 0 for i in range(16)}  # the true curve: no draft pays
    for n in (16, 15, 12):
        assert grant_budgets(demands[:n], table.cost) == {i: 0 for i in range(n)}, n
