"""Serving metrics, goodput, capacity and Poisson arrivals on synthetic records with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.serving import Slo, capacity, measured, poisson_arrivals, request_metrics, summarize


def rec(chunks: list[float], tokens: list[int], wait: float = 0.0, request: int = 0, **extra) -> dict:
    """An ok record whose replies arrived at `chunks` (s from its start) committing `tokens` each."""
    return {"status": "ok", "chunk_times_s": chunks, "chunk_tokens": tokens, "new_tokens": sum(tokens),
            "wall_s": chunks[-1], "ttft_s": chunks[0], "wait_s": wait, "request": request, **extra}


def test_ttft_tpot_itl_e2e_of_one_request():
    # 0.1 s waiting for a slot; first token at 0.2 s; then 3 tokens at 0.5 s and 4 more at 0.6 s: 8 tokens
    m = request_metrics(rec([0.2, 0.5, 0.6], [1, 3, 4], wait=0.1))
    assert m.ttft_ms == pytest.approx(300) and m.e2el_ms == pytest.approx(700)
    assert m.tpot_ms == pytest.approx((700 - 300) / 7)  # (E2E - TTFT) / (N - 1)
    assert m.itl_ms == pytest.approx((300, 100))  # per chunk, not per token
    assert m.meets(Slo(ttft_ms=301, tpot_ms=60)) and not m.meets(Slo(tpot_ms=57)) and not m.meets(Slo(ttft_ms=299))


def test_one_token_requests_have_no_tpot_and_failed_requests_count_against_goodput():
    one = request_metrics(rec([0.05], [1]))
    assert one.tpot_ms is None and one.itl_ms == () and one.meets(Slo(ttft_ms=100, tpot_ms=1))
    failed = {"status": "failed", "request": 3}
    records = [rec([0.1, 0.3], [1, 2], started_at=0.0, finished_at=0.3, request=0),  # TPOT 100 ms
               rec([0.05], [1], started_at=0.5, finished_at=0.55, request=1),  # one token: no TPOT
               rec([0.1, 0.9], [1, 2], started_at=1.0, finished_at=1.9, request=2),  # TPOT 400 ms
               failed]
    s = summarize(records, Slo(tpot_ms=150), duration_s=2.0)
    assert s["completed"] == 3 and s["failed"] == 1 and s["total_output_tokens"] == 7
    assert s["mean_tpot_ms"] == pytest.approx(250) and s["median_tpot_ms"] == pytest.approx(250)  # the 1-token one left out
    assert s["slo_attainment"] == pytest.approx(2 / 4)  # the failed one and the slow one missed
    assert s["request_goodput"] == pytest.approx(2 / 2.0) and s["request_throughput"] == pytest.approx(3 / 2.0)
    assert s["output_throughput"] == pytest.approx(7 / 2.0)
    assert s["mean_ttft_ms"] == pytest.approx((100 + 50 + 100) / 3) and s["mean_itl_ms"] == pytest.approx((200 + 800) / 2)
    assert summarize(records, Slo(tpot_ms=150))["duration"] == pytest.approx(1.9)  # first arrival to last finish


def test_percentiles_acceptance_length_and_queueing():
    records = [rec([0.01 * (i + 1), 0.5], [1, 1], request=i, rounds=2, proposed=8, accepted=3,
                   queue_s=[0.001, 0.002], network_s=0.01, dispatch_lag_s=0.02 if i == 7 else 0.0) for i in range(100)]
    s = summarize(records, Slo())
    ttfts = [10.0 * (i + 1) for i in range(100)]
    assert s["p90_ttft_ms"] == pytest.approx(np.percentile(ttfts, 90)) and s["p99_ttft_ms"] == pytest.approx(np.percentile(ttfts, 99))
    assert s["mean_acceptance_length"] == pytest.approx(1 + 3 / 2)  # AIPerf: 1 + accepted / rounds
    assert s["mean_verifier_queue_ms"] == pytest.approx(3) and s["mean_network_ms"] == pytest.approx(10)
    assert s["late_arrivals"] == 1 and s["max_dispatch_lag_ms"] == pytest.approx(20)
    assert s["slo_attainment"] == 1.0  # no SLO: every completed request meets it
    assert [r["request"] for r in measured(list(reversed(records)), warmup=2, cooldown=3)] == list(range(2, 97))


def test_capacity_is_the_highest_load_where_90_percent_meet_the_slo():
    assert capacity([(1, 1.0), (2, 0.95), (4, 0.9), (8, 0.89)]) == (4, True)  # 0.90 is enough, 0.89 is not
    assert capacity([(4, 0.5), (1, 1.0), (2, 0.91)]) == (2, True)  # sorted by load
    assert capacity([(1, 1.0), (2, 0.5), (4, 0.95)]) == (1, True)  # a lucky higher load does not count
    assert capacity([(1, 0.5), (2, 1.0)]) == (None, True)
    assert capacity([(1, 1.0), (2, 1.0)]) == (2, False)  # never missed: at least 2
    assert capacity([(1, 1.0), (2, math.nan)]) == (1, True)


def test_poisson_arrivals_are_seeded_and_have_the_right_rate():
    assert poisson_arrivals(2.0, seed=7, count=50) == poisson_arrivals(2.0, seed=7, count=50)
    assert poisson_arrivals(2.0, seed=7, count=50) != poisson_arrivals(2.0, seed=8, count=50)
    rate, n = 4.0, 20000
    times = np.asarray(poisson_arrivals(rate, seed=1, count=n))
    gaps = np.diff(times, prepend=0.0)
    assert (gaps > 0).all() and abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(n)  # 4 sigma
    assert abs(gaps.std() - 1 / rate) < 0.05 / rate  # exponential: std == mean
    counts = [len(poisson_arrivals(rate, seed=s, duration_s=10.0)) for s in range(200)]  # Poisson(40) counts
    assert abs(np.mean(counts) - 40) < 4 * math.sqrt(40 / 200) and abs(np.var(counts) - 40) < 12
    window = poisson_arrivals(rate, seed=3, duration_s=5.0)
    assert window == poisson_arrivals(rate, seed=3, count=len(window)) and max(window) < 5.0
    with pytest.raises(ValueError):
        poisson_arrivals(0, seed=1, count=3)
