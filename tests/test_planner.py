"""The capacity planner's simulator on cases computed by hand, and its inputs from a bench run's records."""

from __future__ import annotations

import json

import pytest

from orchestrator import plan, planner, serving
from orchestrator.serving import Slo, request_metrics

R, S, D = 0.050, 0.010, 0.002  # round trip, step time, draft time per token (s)


def constant(tokens: int, sessions: int) -> float:
    return S


def test_one_speculative_session_matches_the_hand_computation():
    # 10 tokens, gamma 2, every draft accepted: the prefill brings token 1 (one round trip and a step), then
    # 3 rounds of (draft 2 tokens, round trip, step) bring 3 tokens each
    work = planner.Workload("spec", gamma=2, traces=((2,),), draft_s_per_token=D, new_tokens=10, prefill_s=0.0)
    rec = planner.simulate(work, constant, [0.0], R)[0]
    m = request_metrics(rec)
    round_s = 2 * D + R + S
    assert m.ttft_ms == pytest.approx(1000 * (R + S), abs=1e-9)
    assert m.e2el_ms == pytest.approx(1000 * (R + S + 3 * round_s), abs=1e-9)
    assert m.tpot_ms == pytest.approx(1000 * 3 * round_s / 9, abs=1e-9)
    assert rec["chunk_tokens"] == [1, 3, 3, 3] and rec["rounds"] == 3 and rec["accepted"] == 6


def test_verifier_only_streams_a_token_per_step_and_partial_acceptance_counts_rounds():
    base = planner.Workload("base", gamma=0, traces=(), draft_s_per_token=0.0, new_tokens=10, prefill_s=0.03)
    m = request_metrics(planner.simulate(base, constant, [0.0], R)[0])
    assert m.ttft_ms == pytest.approx(1000 * (R + S + 0.03), abs=1e-9)  # the prefill adds its own time
    assert m.tpot_ms == pytest.approx(1000 * S, abs=1e-9)  # Generate: no round trip between tokens
    # gamma 3, accepting 1 then 3 (cycled): rounds commit 2, 4, then 2 (2 tokens left: a block of 1 draft token)
    work = planner.Workload("spec", gamma=3, traces=((1, 3),), draft_s_per_token=D, new_tokens=9, prefill_s=0.0)
    rec = planner.simulate(work, constant, [0.0], R)[0]
    assert rec["chunk_tokens"] == [1, 2, 4, 2] and rec["proposed"] == 3 + 3 + 1  # 2 left: gamma = min(3, 2 - 1)
    assert rec["wall_s"] == pytest.approx(R + S + 2 * (3 * D + R + S) + (D + R + S), abs=1e-12)


def test_batching_shares_steps_and_slots_queue_requests():
    def per_step(tokens: int, sessions: int) -> float:
        return 0.001  # a step costs the same whatever it carries

    base = planner.Workload("base", gamma=0, traces=(), draft_s_per_token=0.0, new_tokens=4, prefill_s=0.0)
    # A's prefill starts alone (the verifier was idle); B's waits for it, then every step carries both
    a, b = planner.simulate(base, per_step, [0.0, 0.0], 0.0)
    assert (a["wall_s"], b["wall_s"]) == pytest.approx((0.004, 0.005)) and b["wait_s"] == 0.0
    a, b = planner.simulate(base, per_step, [0.0, 0.0], 0.0, slots=1)  # one draft slot: B waits for A to finish
    assert (a["wall_s"], b["wait_s"], b["wall_s"]) == pytest.approx((0.004, 0.004, 0.004))


def test_capacity_search_brackets_the_slo():
    base = planner.Workload("base", gamma=0, traces=(), draft_s_per_token=0.0, new_tokens=16, prefill_s=0.0)
    slo = Slo(tpot_ms=5.0)
    cap = planner.capacity(base, lambda t, n: 0.002 + 0.001 * t, 0.0, slo, requests=100)
    at = planner.attainment(base, lambda t, n: 0.002 + 0.001 * t, cap, 0.0, slo, requests=100)
    above = planner.attainment(base, lambda t, n: 0.002 + 0.001 * t, 1.5 * cap, 0.0, slo, requests=100)
    assert cap > 0 and at["slo_attainment"] >= 0.9 and above["slo_attainment"] < 0.9
    assert planner.capacity(base, constant, 0.0, Slo(tpot_ms=1.0)) == 0.0  # even one request misses


def test_inputs_from_records_and_a_step_cost_file(tmp_path):
    records = [{"config": "baseline @1/s", "drafter": "baseline", "draft_name": "verifier-only", "gamma": 0,
                "mode": "lockstep", "status": "ok", "new_tokens": 8, "prefill_compute_s": 0.02, "proposed": 0,
                "accepted_per_round": [], "draft_s": 0.0, "compute_s": [0.011, 0.013], "batch_tokens": [1, 3],
                "batch_size": [1, 3]},
               {"config": "ngram g=4 @1/s", "drafter": "ngram", "draft_name": "ngram", "gamma": 4, "mode": "lockstep",
                "status": "ok", "new_tokens": 8, "prefill_compute_s": 0.04, "proposed": 8, "accepted_per_round": [2, 1],
                "draft_s": 0.004, "compute_s": [0.015, 0.019], "batch_tokens": [5, 9], "batch_size": [1, 1]},
               {"config": "ngram g=4 @2/s", "status": "failed", "drafter": "ngram"}]
    works = {w.name: w for w in plan.workloads(records)}
    assert set(works) == {"baseline", "ngram g=4"}
    ngram = works["ngram g=4"]
    assert ngram.gamma == 4 and ngram.traces == ((2, 1),) and ngram.draft_s_per_token == pytest.approx(0.0005)
    assert ngram.new_tokens == 8 and ngram.prefill_s == pytest.approx(0.03)  # median over the run's prefills
    generate_records = [dict(records[0], prefill_compute_s=0.0), *records[1:]]  # as Generate records it: none
    assert plan.workloads(generate_records)[0].prefill_s == pytest.approx(0.04)  # not a free prompt in the median
    fit = plan.fit_step_cost(records)
    assert fit(5, 1) == pytest.approx(0.015) and fit(1, 1) == pytest.approx(0.011)  # 10 ms + 1 ms per token
    table = tmp_path / "gpu.csv"
    table.write_text("tokens,step_ms\n1,10\n9,14\n")
    cost = plan.load_step_costs(table)
    assert cost(5, 3) == pytest.approx(0.012) and cost(17, 1) == pytest.approx(0.018)  # interpolated, extrapolated
    yaml_file = tmp_path / "gpu.yaml"
    yaml_file.write_text(json.dumps({"step_ms": {"1": 10, "9": 14}}))
    assert plan.load_step_costs(yaml_file)(5, 1) == pytest.approx(0.012)


def test_draft_slots_held_at_once_slow_each_draft_by_the_fitted_slope():
    work = planner.Workload("spec", gamma=2, traces=((2,),), draft_s_per_token=D, new_tokens=4, prefill_s=0.0,
                            draft_s_per_token_per_session=0.001)
    both = planner.simulate(work, constant, [0.0, 0.0], R, slots=2)  # one round each, drafted while both hold slots
    assert [r["draft_s"] for r in both] == pytest.approx([2 * (D + 0.001)] * 2)
    own = planner.simulate(work, constant, [0.0, 0.0], R)  # every user drafts on their own machine: no contention
    assert [r["draft_s"] for r in own] == pytest.approx([2 * D] * 2)


def test_draft_contention_is_fitted_to_requests_in_flight_and_prefill_steps_are_left_out_of_the_step_cost():
    def req(start: float, end: float, per_token_s: float, **steps) -> dict:
        return {"config": "ng g=4 @1/s", "drafter": "ngram", "gamma": 4, "status": "ok", "started_at": start,
                "finished_at": end, "proposed": 10, "draft_s": 10 * per_token_s, "new_tokens": 8,
                "accepted_per_round": [1], "proposed_per_round": [4, 4], **steps}

    # alone: 1 ms per token; two fully overlapping (2 in flight): 3 ms -> 1 ms uncontended + 2 ms per other request
    records = [req(0, 1, 0.001), req(2, 3, 0.003), req(2, 3, 0.003), req(5, 6, 0.001)]
    assert plan.draft_contention(records) == pytest.approx((0.001, 0.002))
    (work,) = plan.workloads(records)
    assert (work.draft_s_per_token, work.draft_s_per_token_per_session) == pytest.approx((0.001, 0.002))
    # decode steps on a line (10 ms + 1 ms per token), and one step that also carried a 200-token prompt
    records[0].update(compute_s=[0.011, 0.015, 0.5], batch_tokens=[1, 5, 205], batch_size=[1, 1, 1])
    records[1].update(compute_s=[0.019], batch_tokens=[9], batch_size=[2])
    assert plan.fit_step_cost(records)(5, 1) == pytest.approx(0.015)


def test_capacity_on_a_grid_is_read_where_attainment_crosses_90_percent():
    from orchestrator.validate import crossing

    assert crossing([(8, 0.95), (4, 1.0), (16, 0.5)]) == (pytest.approx(8 + 8 * 0.05 / 0.45), True)
    assert crossing([(4, 0.8), (8, 1.0)]) == (None, True)  # the lowest rate already misses
    assert crossing([(4, 1.0), (8, 0.92)]) == (8, False)  # none missed: at least the top rate


def test_the_verifier_waits_a_quarter_step_for_the_last_steps_sessions_as_the_engine_does():
    # A's prefill runs 0-10 ms; B's prompt arrives at 1 ms and waits. A's next block comes back 0.5 ms after the
    # step (drafting, no link): the engine holds B's prefill for it (at most a quarter step), so both ride in
    # the step 10.5-20.5 ms; without that wait B would run alone 10-20 ms and A's block 20-30 ms
    work = planner.Workload("spec", gamma=1, traces=((1,),), draft_s_per_token=0.0005, new_tokens=3, prefill_s=0.0)
    a, b = planner.simulate(work, constant, [0.0, 0.001], 0.0)
    assert a["chunk_times_s"] == pytest.approx([0.010, 0.0205]) and a["chunk_tokens"] == [1, 2]
    a, b = planner.simulate(work, constant, [0.0, 0.001], 0.0, batch_wait_s=0.0)
    assert a["chunk_times_s"] == pytest.approx([0.010, 0.030])


def test_a_prompts_stall_is_read_from_the_steps_that_carried_one_when_the_prefill_was_not_timed():
    rec = {"config": "baseline @1/s", "drafter": "baseline", "gamma": 0, "status": "ok", "new_tokens": 8,
           "prefill_compute_s": 0.0, "compute_s": [0.01, 0.01, 0.51, 0.01], "batch_tokens": [2, 2, 258, 2],
           "batch_size": [2, 2, 2, 2]}  # the third step also prefilled a 256-token prompt
    (work,) = plan.workloads([rec])
    assert work.prefill_s == pytest.approx(0.5)
