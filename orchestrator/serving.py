"""Serving metrics in the field's terms, from per-request records: pure math, no Ray, no models.

Definitions follow `vllm bench serve`, guidellm and AIPerf, and so do the JSON keys:
- TTFT (`ttft_ms`): from the request's arrival to its first committed token. In an open-loop run the
  arrival is the scheduled Poisson time, so waiting for a free draft slot (`wait_s`) counts, as a user
  would feel it; in a closed loop the request arrives when a slot takes it (`wait_s` = 0).
- E2E latency (`e2el_ms`): arrival to the last token.
- TPOT (`tpot_ms`) = (E2E - TTFT) / (N - 1): undefined for a one-token request, which is left out of
  the TPOT figures (and cannot miss a TPOT target).
- ITL (`itl_ms`): the gap between consecutive replies that committed tokens (`chunk_times_s`); a
  speculative verdict commits several tokens at once, so ITL and TPOT differ and both are given.
- throughput: completed requests (`request_throughput`) and output tokens (`output_throughput`) per
  second of the measured window (first measured arrival to last measured finish).
- goodput (`request_goodput`): requests per second that completed AND met every SLO; a failed request
  counts against it. `slo_attainment` is the share of measured requests (failed ones included) that did.
- capacity: the highest load (arrival rate, or concurrency in a closed loop) at which at least
  `CAPACITY_ATTAINMENT` of requests meet the SLO, with every lower load swept meeting it too.
- mean acceptance length (AIPerf): 1 + accepted / rounds, over the rounds of the requests that drafted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CAPACITY_ATTAINMENT = 0.9  # share of requests that must meet the SLO at a load for it to count as served
LATE_ARRIVAL_S = 0.005  # a request the load generator issued this much after its scheduled time is "late"
PERCENTILES = (("median", 50), ("p90", 90), ("p99", 99))


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None


def poisson_arrivals(rate: float, seed: int, count: int | None = None, duration_s: float | None = None) -> list[float]:
    """Arrival times (s from the start) of a Poisson process at `rate` requests/s: exponential gaps from a
    generator seeded by `seed`, so every configuration measured at this rate sees the same arrivals.
    `count` arrivals, or every arrival before `duration_s`."""
    if rate <= 0:
        raise ValueError(f"an arrival rate must be > 0 requests/s, got {rate}")
    if (count is None) == (duration_s is None):
        raise ValueError("give either a number of requests or a duration")
    rng = np.random.default_rng(seed)
    if count is not None:
        return np.cumsum(rng.exponential(1 / rate, count)).tolist()
    times: list[float] = []
    t = rng.exponential(1 / rate)
    while t < duration_s:
        times.append(float(t))
        t += rng.exponential(1 / rate)
    return times


@dataclass(frozen=True)
class RequestMetrics:
    ok: bool
    ttft_ms: float = math.nan
    tpot_ms: float | None = None  # None: a one-token request
    e2el_ms: float = math.nan
    itl_ms: tuple[float, ...] = ()
    output_tokens: int = 0

    def meets(self, slo: Slo) -> bool:
        if not self.ok:
            return False
        if slo.ttft_ms is not None and not self.ttft_ms <= slo.ttft_ms:
            return False
        return slo.tpot_ms is None or self.tpot_ms is None or self.tpot_ms <= slo.tpot_ms


def request_metrics(record: dict) -> RequestMetrics:
    """TTFT, TPOT, ITL and E2E of one requests.jsonl record (`wait_s`: arrival to start, 0 if absent)."""
    if record.get("status") != "ok":
        return RequestMetrics(ok=False)
    wait = float(record.get("wait_s") or 0.0)
    chunks = list(record.get("chunk_times_s") or [])
    first = chunks[0] if chunks else float(record.get("ttft_s", 0.0))
    n = int(record.get("new_tokens", len(record.get("token_ids", []))))
    ttft = wait + first
    e2el = wait + float(record["wall_s"])
    tpot = (e2el - ttft) / (n - 1) if n > 1 else None
    itl = tuple(1000 * (b - a) for a, b in zip(chunks, chunks[1:]))
    return RequestMetrics(True, 1000 * ttft, None if tpot is None else 1000 * tpot, 1000 * e2el, itl, n)


def _stats(name: str, values: list[float]) -> dict:
    arr = np.asarray(values, float)
    out = {f"mean_{name}": float(arr.mean()) if arr.size else math.nan}
    for label, q in PERCENTILES:
        out[f"{label}_{name}"] = float(np.percentile(arr, q)) if arr.size else math.nan
    return out


def _window_s(records: list[dict]) -> float:
    """First measured arrival to last measured finish (s); arrival = scheduled_at when the run scheduled it."""
    starts = [r.get("scheduled_at", r.get("started_at")) for r in records]
    ends = [r.get("finished_at") for r in records]
    starts, ends = [s for s in starts if s is not None], [e for e in ends if e is not None]
    return max(ends) - min(starts) if starts and ends and max(ends) > min(starts) else math.nan


def measured(records: list[dict], warmup: int, cooldown: int) -> list[dict]:
    """The records in arrival order (`request` index, else as given), less the first `warmup` and last `cooldown`."""
    ordered = sorted(records, key=lambda r: r.get("request", 0)) if all("request" in r for r in records) else list(records)
    return ordered[warmup: len(ordered) - cooldown if cooldown else None]


def summarize(records: list[dict], slo: Slo, duration_s: float | None = None) -> dict:
    """The serving figures of one configuration at one load (records: its measured requests)."""
    per = [request_metrics(r) for r in records]
    ok = [m for m in per if m.ok]
    duration = duration_s if duration_s is not None else _window_s(records)
    tokens = sum(m.output_tokens for m in ok)
    good = sum(m.meets(slo) for m in per)
    out = {"completed": len(ok), "failed": len(per) - len(ok), "total_output_tokens": tokens, "duration": duration,
           "request_throughput": len(ok) / duration if duration > 0 else math.nan,
           "output_throughput": tokens / duration if duration > 0 else math.nan,
           "request_goodput": good / duration if duration > 0 else math.nan,
           "slo_attainment": good / len(per) if per else math.nan}
    out.update(_stats("ttft_ms", [m.ttft_ms for m in ok]))
    out.update(_stats("tpot_ms", [m.tpot_ms for m in ok if m.tpot_ms is not None]))
    out.update(_stats("itl_ms", [x for m in ok for x in m.itl_ms]))
    out.update(_stats("e2el_ms", [m.e2el_ms for m in ok]))
    done = [r for r in records if r.get("status") == "ok"]
    rounds = sum(int(r.get("rounds", 0)) for r in done if r.get("proposed"))
    accepted = sum(int(r.get("accepted", 0)) for r in done if r.get("proposed"))
    out["mean_acceptance_length"] = 1 + accepted / rounds if rounds else math.nan
    out.update(queueing(records))
    return out


def queueing(records: list[dict]) -> dict:
    """Where a request waited, mean ms per request: for a draft slot (`wait_s`), in the verifier's queue
    (sum of its rounds' `queue_s`), on the link (`network_s`); and the load generator's late issues."""
    done = [r for r in records if r.get("status") == "ok"]

    def mean(values) -> float:
        values = list(values)
        return 1000 * float(np.mean(values)) if values else math.nan

    lags = [r["dispatch_lag_s"] for r in records if r.get("dispatch_lag_s") is not None]
    return {"mean_slot_wait_ms": mean(float(r.get("wait_s") or 0.0) for r in done),
            "mean_verifier_queue_ms": mean(sum(r.get("queue_s") or []) for r in done),
            "mean_network_ms": mean(float(r.get("network_s") or 0.0) for r in done),
            "late_arrivals": sum(lag > LATE_ARRIVAL_S for lag in lags),
            "max_dispatch_lag_ms": 1000 * max(lags) if lags else math.nan}


def capacity(points: list[tuple[float, float]], threshold: float = CAPACITY_ATTAINMENT) -> tuple[float | None, bool]:
    """(capacity, bounded) from (load, SLO attainment) points: the highest load whose attainment and every
    lower load's is >= threshold (None if the lowest misses); bounded is False when no swept load missed, so
    the true capacity may be higher than the largest load swept."""
    best = None
    for load, attainment in sorted(points):
        if not attainment >= threshold:  # NaN (nothing measured) misses too
            return best, True
        best = load
    return best, False
