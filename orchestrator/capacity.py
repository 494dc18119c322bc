"""The serving report of a bench run: TTFT/TPOT/ITL/E2E, goodput per configuration x load, and capacity.

Pure post-processing of requests.jsonl and run.json (the math is in orchestrator/serving.py). A load is an
arrival rate (open loop, `load:` in the config) or a concurrency level (closed loop). A *series* is one
configuration across loads (its name without the load suffix). Writes serving.csv/.json (one row per
configuration x load), capacity.csv (one row per series: its capacity at the run's SLO and that over
verifier-only's at the same emulated RTT, "users per verifier") and capacity.png.
"""

from __future__ import annotations

import math
import pathlib
import re

import pandas as pd

from orchestrator import serving

LOAD_SUFFIX = re.compile(r"( @[\d.e+-]+/s| x\d+)$")
SERVING_COLUMNS = {
    "config": "configuration", "load": "load", "completed": "ok", "failed": "failed",
    "request_throughput": "req/s", "request_goodput": "goodput (req/s)", "slo_attainment": "met SLO",
    "output_throughput": "output tok/s", "median_ttft_ms": "TTFT p50 (ms)", "p90_ttft_ms": "TTFT p90 (ms)",
    "median_tpot_ms": "TPOT p50 (ms)", "p90_tpot_ms": "TPOT p90 (ms)", "p99_tpot_ms": "TPOT p99 (ms)",
    "median_itl_ms": "ITL p50 (ms)", "p90_e2el_ms": "E2E p90 (ms)", "mean_acceptance_length": "acceptance length",
    "mean_slot_wait_ms": "wait for draft slot (ms)", "mean_verifier_queue_ms": "verifier queue (ms)",
    "mean_network_ms": "link (ms)", "late_arrivals": "late arrivals",
}
CAPACITY_COLUMNS = {
    "series": "configuration", "capacity": "capacity", "verifier_only_capacity": "verifier-only capacity",
    "users_per_verifier_ratio": "× verifier-only", "goodput_at_capacity": "goodput at capacity (req/s)",
    "p90_tpot_ms_at_capacity": "TPOT p90 at capacity (ms)",
}


def clean_record(row: dict) -> dict:
    """A DataFrame row as a record again: NaN (a field this record never had) dropped."""
    return {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}


def serving_table(records: pd.DataFrame, run: dict) -> pd.DataFrame:
    """One row per configuration (x load), in run order: serving.summarize of its measured requests."""
    cfg = run["config"]
    load = cfg.get("load") or {}
    slo = serving.Slo(**(cfg.get("slo") or {}))
    order = list(dict.fromkeys(run.get("configurations", []) + list(records["config"])))
    rows = []
    for name in order:
        g = [clean_record(r) for r in records[records["config"] == name].to_dict("records")]
        if not g:
            continue
        first = g[0]
        open_loop = first.get("rate") is not None
        kept = serving.measured(g, load.get("warmup", 0), load.get("cooldown", 0)) if open_loop else g
        rows.append({"config": name, "series": LOAD_SUFFIX.sub("", name), "drafter": first["drafter"],
                     "rtt_ms": float(first.get("rtt_ms", 0.0)), "load_kind": "rate" if open_loop else "sessions",
                     "load": float(first["rate"] if open_loop else first.get("sessions") or 1),
                     **serving.summarize(kept, slo)})
    return pd.DataFrame(rows)


def capacity_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per series: the capacity (serving.capacity over its loads), verifier-only's at the same RTT, the ratio."""
    rows = []
    for series, g in table.groupby("series", sort=False):
        cap, bounded = serving.capacity(list(zip(g["load"], g["slo_attainment"])))
        at = g[g["load"] == cap]
        rows.append({"series": series, "drafter": g["drafter"].iloc[0], "rtt_ms": g["rtt_ms"].iloc[0],
                     "load_kind": g["load_kind"].iloc[0], "capacity_value": cap, "bounded": bounded,
                     "capacity": "–" if cap is None else f"{'' if bounded else '≥ '}{cap:g}",
                     "goodput_at_capacity": at["request_goodput"].iloc[0] if len(at) else math.nan,
                     "p90_tpot_ms_at_capacity": at["p90_tpot_ms"].iloc[0] if len(at) else math.nan})
    caps = pd.DataFrame(rows)
    if caps.empty:
        return caps
    base = caps[caps["drafter"] == "baseline"].set_index("rtt_ms")
    caps["verifier_only_capacity"] = caps["rtt_ms"].map(base["capacity"]) if len(base) else "–"
    base_value = caps["rtt_ms"].map(base["capacity_value"]) if len(base) else pd.Series(math.nan, index=caps.index)
    caps["users_per_verifier_ratio"] = [
        c / b if c is not None and isinstance(b, (int, float)) and b and not math.isnan(b) else math.nan
        for c, b in zip(caps["capacity_value"], base_value)]
    return caps


def slo_text(run: dict) -> str:
    slo = run["config"].get("slo") or {}
    parts = [f"{k.removesuffix('_ms').upper()} ≤ {v:g} ms" for k, v in slo.items() if v is not None]
    need = f"≥ {serving.CAPACITY_ATTAINMENT:.0%} of requests"
    return f"{need} meet {' and '.join(parts)}" if parts else f"{need} complete (no `slo:` set)"


def render(records: pd.DataFrame, run: dict, run_dir: pathlib.Path) -> tuple[str, dict]:
    """Write serving.csv/.json, capacity.csv and capacity.png; -> (markdown, compact capacity per series)."""
    from orchestrator import plots
    from orchestrator.report import json_value, markdown_table

    table = serving_table(records, run)
    if table.empty:
        return "", {}
    table.to_csv(run_dir / "serving.csv", index=False)
    table.to_json(run_dir / "serving.json", orient="records", indent=1)
    caps = capacity_table(table)
    caps.to_csv(run_dir / "capacity.csv", index=False)
    unit = "req/s" if (table["load_kind"] == "rate").any() else "sessions"
    plots.capacity_plot(table, (run["config"].get("slo") or {}).get("tpot_ms"), unit, run_dir / "capacity.png")
    late = int(table["late_arrivals"].sum())
    text = (f"Capacity ({unit}) at the SLO: {slo_text(run)}\n\n" + markdown_table(caps, CAPACITY_COLUMNS)
            + "\n\nServing metrics per configuration and load:\n\n" + markdown_table(table, SERVING_COLUMNS))
    if late:
        text += f"\n\nWARNING: the load generator issued {late} requests late (> {1000 * serving.LATE_ARRIVAL_S:.0f} ms)"
    compact = {row["series"]: {"capacity": json_value(row["capacity_value"]), "bounded": bool(row["bounded"]),
                               "ratio": json_value(row["users_per_verifier_ratio"])} for row in caps.to_dict("records")}
    return text, {"unit": unit, "slo": slo_text(run), "series": compact}
