"""The planner checked against the run it was fitted to: the same arrivals, the same rates, the same SLO.

A bench run's capacity is read off a coarse grid of rates from short runs (a few dozen arrivals each), while
`specdec plan` bisects over long simulated runs; comparing those two numbers mixes the planner's error with
the grid's and with the short run's transient. Here the simulator replays exactly what the run measured:
per configuration and rate, the run's own seeded arrival times, its warm-up and cool-down cut, its draft
slots, and the link its rounds measured (not the configured RTT: the delay proxy and framing add a few ms). Per rate it gives the measured and the predicted SLO attainment (and draft time per
token, which shows whether the draft-core contention model holds); per configuration, the capacity both
read off that grid the same way: the rate where attainment crosses serving.CAPACITY_ATTAINMENT, linearly
interpolated between the last rate that met it and the first that did not ("≥ R" when none missed).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd

from orchestrator import openloop, planner, serving


def crossing(points: list[tuple[float, float]], threshold: float = serving.CAPACITY_ATTAINMENT) -> tuple[float | None, bool]:
    """(capacity, bounded) from (rate, attainment): the interpolated rate where attainment first falls below
    `threshold`; None when the lowest rate already misses; (the highest rate, False) when none misses."""
    points = sorted(points)
    for j, (rate, att) in enumerate(points):
        if not att >= threshold:
            if j == 0:
                return None, True
            r0, a0 = points[j - 1]
            return r0 + (a0 - threshold) / (a0 - att) * (rate - r0) if a0 > att else r0, True
    return (points[-1][0] if points else None), False


def _draft_ms_per_token(records: list[dict]) -> float:
    proposed = sum(r.get("proposed", 0) for r in records if r.get("status") == "ok")
    return 1000 * sum(r.get("draft_s", 0.0) for r in records if r.get("status") == "ok") / proposed if proposed else math.nan


def _link_s(records: list[dict], configured_s: float) -> float:
    """The link a round really met: the median of (round trip - verifier service) over the records' rounds
    (the report's rtt_measured_ms: the emulated delay plus framing and the delay proxy's own hop), or the
    configured RTT when no round was timed (verifier-only streams without rounds)."""
    gaps = [t - s for r in records if r.get("status") == "ok" for t, s in zip(r.get("rtt_s") or [], r.get("service_s") or [])]
    return float(np.median(gaps)) if gaps else configured_s


def validate(records: list[dict], run: dict, works: list[planner.Workload], cost: planner.StepCostFn, slo: serving.Slo,
             slots: int | None, series_name) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per configuration x RTT x rate: measured vs predicted attainment and draft ms/token;
    per configuration x RTT: measured vs predicted capacity on the run's grid, and the error)."""
    load = SimpleNamespace(**run["config"]["load"])
    by_name = {w.name: w for w in works}
    groups: dict[tuple[str, float, float], list[dict]] = {}
    for r in records:
        if r.get("rate") is not None:
            groups.setdefault((series_name(r["config"]), float(r.get("rtt_ms") or 0.0), float(r["rate"])), []).append(r)
    rows = []
    for (name, rtt, rate), got in sorted(groups.items(), key=lambda kv: (list(by_name).index(kv[0][0])
                                                                        if kv[0][0] in by_name else 0, kv[0][1], kv[0][2])):
        if name not in by_name:
            continue
        kept = serving.measured(got, load.warmup, load.cooldown)
        times = openloop.arrivals(load, rate, run["prompts"])
        link_s = _link_s(got, rtt / 1000)
        sim = serving.measured(planner.simulate(by_name[name], cost, times, link_s, slots), load.warmup, load.cooldown)
        rows.append({"configuration": name, "rtt_ms": rtt, "link_ms": 1000 * link_s, "rate": rate,
                     "measured_attainment": serving.summarize(kept, slo)["slo_attainment"],
                     "predicted_attainment": serving.summarize(sim, slo)["slo_attainment"],
                     "measured_p90_tpot_ms": serving.summarize(kept, slo)["p90_tpot_ms"],
                     "predicted_p90_tpot_ms": serving.summarize(sim, slo)["p90_tpot_ms"],
                     "measured_draft_ms_per_token": _draft_ms_per_token(kept),
                     "predicted_draft_ms_per_token": _draft_ms_per_token(sim)})
    per_rate = pd.DataFrame(rows)
    caps = []
    for (name, rtt), g in (per_rate.groupby(["configuration", "rtt_ms"], sort=False) if len(per_rate) else []):
        got, got_bounded = crossing(list(zip(g["rate"], g["measured_attainment"])))
        want, want_bounded = crossing(list(zip(g["rate"], g["predicted_attainment"])))
        comparable = got_bounded and want_bounded and got and want is not None
        caps.append({"configuration": name, "rtt_ms": rtt, "measured_capacity": _text(got, got_bounded),
                     "predicted_capacity": _text(want, want_bounded),
                     "error": want / got - 1 if comparable else None})
    return per_rate, pd.DataFrame(caps)


def _text(value: float | None, bounded: bool) -> str:
    return "below the lowest rate" if value is None else f"{'' if bounded else '≥ '}{value:.3g}"
