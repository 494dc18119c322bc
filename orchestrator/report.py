"""Turn a run's requests.jsonl into per-configuration metrics, tables and plots (`specdec report RUN_DIR`).

Pure post-processing: everything is recomputed from the per-request records and run.json, so a finished
or interrupted run can be re-rendered at any time. Metric names and definitions are in the README.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import warnings

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
HEADLINE_COLUMNS = {  # the first table: configuration, latency, throughput, speedup, acceptance
    "config": "configuration",
    "latency_ms_per_token_p50": "latency p50 (ms/token)",
    "throughput_tok_s_p50": "throughput p50 (tok/s)",
    "speedup_paired_p50": "speedup (paired p50)",
    "acceptance_rate": "acceptance",
}
DETAIL_COLUMNS = {
    "config": "configuration",
    "mode": "mode",
    "sessions": "sessions",
    "requests_ok": "ok",
    "requests_failed": "failed",
    "latency_ms_per_token_p95": "latency p95 (ms/token)",
    "ttft_s_p50": "TTFT p50 (s)",
    "aggregate_tok_s": "aggregate tok/s",
    "speedup_p50_vs_p50": "speedup (p50 vs p50)",
    "mean_acceptance_length": "tokens/round",
    "mean_gamma": "mean γ",
    "mean_budget": "mean budget",  # issue 18: the verifier's mean granted draft budget (blank: none granted)
    "disagree_requests": "requests ≠ baseline",
    "differing_token_share": "tokens ≠ baseline",
    "rouge_l_vs_baseline": "ROUGE-L vs baseline",
    "accuracy": "PubMedQA accuracy",
    "accuracy_baseline": "baseline accuracy",
    "rtt_measured_ms": "RTT measured (ms)",
    "network_share_p50": "network share",
    "bytes_per_token": "bytes/token (both ways)",
    "verifier_busy_s_per_token": "verifier compute s/token",
    "verifier_busy_vs_baseline": "verifier compute vs baseline",
    "batch_size_p50": "batch p50 (sessions)",
    "cost_per_query_usd": "cost/query (USD)",
    "leviathan_bound": "Leviathan bound",
    "achieved_over_bound": "achieved/bound",
}
WINNER_COLUMNS = {  # per (draft, RTT, level): which mode won and by how much (`mode_winners`)
    "draft_name": "draft",
    "rtt_ms": "RTT (ms)",
    "sessions": "sessions",
    "best_mode": "best mode",
    "best_config": "its configuration",
    "throughput_tok_s_p50": "throughput p50 (tok/s)",
    "vs_generate": "× Generate at this RTT",
    "runner_up_mode": "runner-up mode",
    "vs_runner_up": "× runner-up",
}


def complete_lines(path: pathlib.Path) -> bytes:
    """The file's bytes up to its last newline: every record is written with its newline, so anything after
    it is a record cut short by a crash mid-write, which is dropped (with a warning)."""
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        log.warning("%s: dropping a partial last line (the run was interrupted mid-write)", path)
    return whole


def read_records(path: pathlib.Path) -> list[dict]:
    """Every complete line of requests.jsonl; a partial last line (a crash mid-write) is skipped."""
    rows = []
    for i, line in enumerate(complete_lines(path).decode().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def load_records(path: pathlib.Path) -> pd.DataFrame:
    """The latest record per (config, pubid): a retried or resumed request counts once."""
    rows = read_records(path)
    if not rows:
        raise ValueError(f"{path} has no records")
    frame = pd.DataFrame(rows)
    keys = ["config", "pubid"] + (["request"] if "request" in frame else [])  # open loop: a prompt can recur
    return frame.drop_duplicates(keys, keep="last").reset_index(drop=True)


def acceptance_by_position(proposed: list[list[int]], accepted: list[list[int]]) -> list[float]:
    """P(draft position i accepted | proposed), i = 1..max gamma, pooled over every round of every request."""
    width = max((p for rounds in proposed for p in rounds), default=0)
    offered, taken = np.zeros(width), np.zeros(width)
    for p_rounds, a_rounds in zip(proposed, accepted):
        for p, a in zip(p_rounds, a_rounds):
            offered[:p] += 1
            taken[:a] += 1
    return [float(t / o) if o else float("nan") for t, o in zip(taken, offered)]


def disagreement(ids: list[int], base: list[int]) -> tuple[int | None, int]:
    """(first position where the two differ or None, number of differing positions over the longer one)."""
    n = max(len(ids), len(base))
    diff = [i for i in range(n) if i >= len(ids) or i >= len(base) or ids[i] != base[i]]
    return (diff[0] if diff else None), len(diff)


def per_token_alpha(proposed: list[list[int]], accepted: list[list[int]]) -> float:
    """Leviathan's alpha, the chance each draft token is accepted given its prefix was, estimated as
    accepted / (accepted + rejections): every round stops at its first rejection, if any. This is not
    accepted / proposed, which also counts the tokens after a rejection that were never judged."""
    taken = sum(a for rounds in accepted for a in rounds)
    rejections = sum(1 for p_rounds, a_rounds in zip(proposed, accepted) for p, a in zip(p_rounds, a_rounds) if a < p)
    return taken / (taken + rejections) if taken + rejections else float("nan")


def leviathan_bound(alpha: float, gamma: float, c: float) -> float:
    """Expected walltime improvement (Leviathan et al. 2023, Thm 3.8): (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
    if gamma <= 0 or math.isnan(alpha):
        return float("nan")
    tokens_per_round = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens_per_round / (gamma * c + 1)


def _rouge_l(texts: list[str], refs: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(ref, text)["rougeL"].fmeasure for text, ref in zip(texts, refs)]
    return float(np.mean(scores)) if scores else float("nan")


def _verifier_busy_s(ok: pd.DataFrame) -> pd.Series:
    """Verifier seconds each request cost: its share of every engine step it rode in (the step's compute split
    by tokens across the batch), so it stays right at any concurrency. Runs from before the batching engine
    carry only service time (queue + compute), which overstates it above one session in flight."""
    if "verifier_compute_s" in ok and (ok["verifier_compute_s"] > 0).any():
        return ok["verifier_compute_s"]
    return ok["service_s"].map(sum) + ok["prefill_service_s"]


def mean_gamma(ok: pd.DataFrame) -> float:
    """The mean gamma of the blocks drafted: the schedule's gamma per block as the client records it
    (gamma_per_round; a block cut short by max_new_tokens counts at its gamma), or in runs from before that
    record, the tokens proposed per round that proposed any."""
    used = ok["gamma_per_round"] if "gamma_per_round" in ok else [None] * len(ok)
    per_block = [u if isinstance(u, list) and u else p for u, p in zip(used, ok["proposed_per_round"])]
    gammas = [g for blocks in per_block for g in blocks if g]
    return float(np.mean(gammas)) if gammas else 0.0


def _mean_budget(ok: pd.DataFrame) -> float:
    """The mean draft budget the verifier granted over every reply (issue 18); NaN when it granted none."""
    budgets = [b for per_request in ok.get("budget_per_round", []) if isinstance(per_request, list) for b in per_request]
    return float(np.mean(budgets)) if budgets else float("nan")


def _pooled(per_request) -> np.ndarray:
    """Every request's per-round values in one array, NaN-padded so percentiles of none are NaN, not an error."""
    return np.concatenate([np.asarray(v, float) for v in per_request] + [np.array([np.nan])])


def _link_s(ok: pd.DataFrame) -> np.ndarray:
    """Round trip minus verifier service per round, for the requests that time both per round (lock-step and
    ahead; async sessions stream commits, with no round trip to pair each step's service time with)."""
    return _pooled(np.asarray(r, float) - np.asarray(s, float) for r, s in zip(ok["rtt_s"], ok["service_s"]) if len(r) == len(s))


def _config_row(g: pd.DataFrame, base: pd.DataFrame | None, prices: dict, sessions_per_worker: float) -> dict:
    ok = g[g["status"] == "ok"]
    first = g.iloc[0]
    row = {"config": first["config"], "drafter": first["drafter"], "draft_name": first["draft_name"],
           "gamma": first["gamma"], "mode": first["mode"], "rtt_configured_ms": float(first["rtt_ms"]),
           "sessions": first.get("sessions"),
           "requests_ok": len(ok), "requests_failed": int((g["status"] != "ok").sum()),
           "prompts_truncated": int(g["prompt_truncated"].sum())}
    if ok.empty:
        return row
    tokens = ok["new_tokens"].astype(float)
    s_per_token = ok["wall_s"] / tokens
    busy = _verifier_busy_s(ok)
    row.update({
        "latency_ms_per_token_p50": 1000 * np.nanpercentile(s_per_token, 50), "latency_ms_per_token_p95": 1000 * np.nanpercentile(s_per_token, 95),
        "ttft_s_p50": np.nanpercentile(ok["ttft_s"], 50), "ttft_s_p95": np.nanpercentile(ok["ttft_s"], 95),
        "throughput_tok_s_p50": np.nanpercentile(ok["tokens_per_s"], 50), "throughput_tok_s_p95": np.nanpercentile(ok["tokens_per_s"], 95),
        "aggregate_tok_s": tokens.sum() / (ok["finished_at"].max() - ok["started_at"].min()),
        "new_tokens_mean": tokens.mean(),
        "accuracy": ok["correct"].astype(float).mean() if "correct" in ok else float("nan"),
        "verifier_busy_s_per_token": np.nanpercentile(busy / tokens, 50),
        "batch_size_p50": np.nanpercentile(_pooled(ok["batch_size"]), 50) if "batch_size" in ok else float("nan"),
        "cost_per_query_usd": np.nanpercentile((prices["verifier_per_hour"] * busy
                                    + prices["draft_per_hour"] * ok["wall_s"] / sessions_per_worker) / 3600, 50),
    })
    proposed = ok["proposed"].sum()
    rounds = ok["rounds"].sum()
    if rounds:
        rtt, service = _pooled(ok["rtt_s"]), _pooled(ok["service_s"])
        drafting_rounds = sum(sum(1 for p in r if p) for r in ok["proposed_per_round"])
        sent, received = ok["bytes_sent"].sum(), ok["bytes_received"].sum()
        row.update({
            "acceptance_rate": ok["accepted"].sum() / proposed if proposed else float("nan"),
            "alpha": per_token_alpha(list(ok["proposed_per_round"]), list(ok["accepted_per_round"])),
            "mean_acceptance_length": tokens.sum() / rounds,
            "mean_gamma": mean_gamma(ok),
            "mean_budget": _mean_budget(ok),
            "mean_drafted": proposed / drafting_rounds if drafting_rounds else 0.0,  # tokens per round that drafted
            "stale_per_request": ok["stale"].mean() if "stale" in ok else float("nan"),  # claims dropped (ahead, async)
            "acceptance_by_position": acceptance_by_position(list(ok["proposed_per_round"]), list(ok["accepted_per_round"])),
            "round_trip_ms_p50": 1000 * np.nanpercentile(rtt, 50), "verifier_service_ms_p50": 1000 * np.nanpercentile(service, 50),
            "rtt_measured_ms": 1000 * np.nanpercentile(_link_s(ok), 50),
            "network_share_p50": np.nanpercentile(ok["network_share"], 50),
            "bytes_sent_per_round": sent / rounds, "bytes_received_per_round": received / rounds,
            "bytes_sent_per_token": sent / tokens.sum(), "bytes_received_per_token": received / tokens.sum(),
            "bytes_per_token": (sent + received) / tokens.sum(),
            "draft_ms_per_drafted_token": 1000 * ok["draft_s"].sum() / proposed if proposed else 0.0,
        })
    if base is not None:
        paired = ok.merge(base[base["status"] == "ok"], on="pubid", suffixes=("", "_base"))
        if not paired.empty:
            base_s_per_token = paired["wall_s_base"] / paired["new_tokens_base"]
            ratios = base_s_per_token / (paired["wall_s"] / paired["new_tokens"])
            diffs = [disagreement(a, b) for a, b in zip(paired["token_ids"], paired["token_ids_base"])]
            firsts = [f for f, _ in diffs if f is not None]
            base_ok = base[(base["status"] == "ok") & base["pubid"].isin(paired["pubid"])]
            base_busy = _verifier_busy_s(base_ok) / base_ok["new_tokens"]
            row.update({
                "speedup_paired_p50": np.nanpercentile(ratios, 50),
                "speedup_p50_vs_p50": np.nanpercentile(base_s_per_token, 50) / np.nanpercentile(paired["wall_s"] / paired["new_tokens"], 50),
                "disagree_requests": len(firsts) / len(paired),
                "first_divergence_p50": np.nanpercentile(firsts, 50) if firsts else None,
                "differing_token_share": sum(n for _, n in diffs) / sum(max(len(a), len(b)) for a, b in
                                                                      zip(paired["token_ids"], paired["token_ids_base"])),
                "rouge_l_vs_baseline": _rouge_l(list(paired["text"]), list(paired["text_base"])),
                # the quality gap: accuracy on the same prompts, this configuration minus the baseline
                "accuracy_baseline": paired["correct_base"].astype(float).mean() if "correct" in paired else float("nan"),
                "accuracy_gap": ((paired["correct"].astype(float) - paired["correct_base"].astype(float)).mean()
                                 if "correct" in paired else float("nan")),
                "verifier_busy_vs_baseline": row["verifier_busy_s_per_token"] / np.nanpercentile(base_busy, 50),
            })
            if "acceptance_rate" in row:
                c = row["draft_ms_per_drafted_token"] / 1000 / np.nanpercentile(base_s_per_token, 50)  # draft step / target step
                row["leviathan_c"] = c
                row["leviathan_bound"] = leviathan_bound(row["alpha"], row["mean_drafted"], c)
                row["achieved_over_bound"] = row["speedup_paired_p50"] / row["leviathan_bound"]
    return row


def summarize(records: pd.DataFrame, run: dict) -> pd.DataFrame:
    """One row per configuration, in the order they ran (a metric with no data is NaN)."""
    with warnings.catch_warnings():  # nanpercentile warns on an all-NaN column; NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)
        return _summarize(records, run)


def _summarize(records: pd.DataFrame, run: dict) -> pd.DataFrame:
    prices = run["config"]["prices"]
    concurrency = run["config"]["concurrency"]
    if "sessions" not in records:  # a run from before concurrency sweeps
        records = records.assign(sessions=concurrency["draft_workers"] * concurrency["sessions_per_worker"])
    if "mode" not in records:  # a run from before session modes: every session was lock-step
        records = records.assign(mode="lockstep")
    base_rows = records[records["drafter"] == "baseline"]
    order = list(dict.fromkeys(run.get("configurations", []) + list(records["config"])))
    rows = []
    for name in order:
        g = records[records["config"] == name]
        if g.empty:
            continue
        # each configuration is compared with the baseline at its level and RTT (a run from before per-RTT
        # baselines has one per level, at the run's rtt_ms: that one)
        level, rtt = g["sessions"].iloc[0], g["rtt_ms"].iloc[0]
        at_level = base_rows[base_rows["sessions"] == level]
        base = at_level[at_level["rtt_ms"] == rtt]
        base = base if not base.empty else at_level
        rows.append(_config_row(g, base if not base.empty else None, prices, level / concurrency["draft_workers"]))
    return pd.DataFrame(rows)


def mode_winners(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (draft, RTT, concurrency level) run in two or more modes: the mode whose best configuration (over
    gamma) had the highest tok/s p50, that tok/s over the baseline's (Generate) at the same RTT and level, and
    over the runner-up mode's best. Empty when no draft ran in more than one mode."""
    if "throughput_tok_s_p50" not in summary:
        return pd.DataFrame()
    measured = summary[summary["throughput_tok_s_p50"].notna()]
    base = measured[measured["drafter"] == "baseline"]
    rows = []
    keys = ["draft_name", "rtt_configured_ms", "sessions"]
    for (draft, rtt, sessions), g in measured[measured["drafter"] != "baseline"].groupby(keys, sort=False, dropna=False):
        best = g.sort_values("throughput_tok_s_p50", ascending=False, kind="stable").drop_duplicates("mode")
        if len(best) < 2:
            continue
        top, runner_up = best.iloc[0], best.iloc[1]
        tok_s = top["throughput_tok_s_p50"]
        generate = base[(base["rtt_configured_ms"] == rtt) & (base["sessions"] == sessions)]["throughput_tok_s_p50"]
        generate_tok_s = generate.iloc[0] if len(generate) else float("nan")
        rows.append({"draft_name": draft, "rtt_ms": rtt, "sessions": sessions, "best_mode": top["mode"],
                     "best_config": top["config"], "throughput_tok_s_p50": tok_s, "generate_tok_s_p50": generate_tok_s,
                     "vs_generate": tok_s / generate_tok_s, "runner_up_mode": runner_up["mode"],
                     "vs_runner_up": tok_s / runner_up["throughput_tok_s_p50"]})
    return pd.DataFrame(rows)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(summary: pd.DataFrame, columns: dict[str, str]) -> str:
    cols = [c for c in columns if c in summary.columns]
    lines = ["| " + " | ".join(columns[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in summary.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def json_value(value):
    """NaN (no data) becomes null, so summary.json is strict JSON; numpy scalars become Python ones."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def compact(summary: pd.DataFrame, run_dir: pathlib.Path) -> dict:
    """The last stdout line: the headline numbers per configuration."""
    keys = ("throughput_tok_s_p50", "speedup_paired_p50", "acceptance_rate", "requests_failed")
    configs = {row["config"]: {k: json_value(row[k]) for k in keys if k in row} for row in summary.to_dict("records")}
    return {"run_dir": str(run_dir), "configurations": configs}


def render(run_dir: str | pathlib.Path) -> tuple[str, dict]:
    """Write summary.csv/.json/.md, mode_winners.csv (when modes were swept), the serving and capacity tables
    (orchestrator/capacity.py) and the plots into run_dir; returns (markdown tables, compact summary)."""
    from orchestrator import capacity, plots, pool

    run_dir = pathlib.Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    requests = load_records(run_dir / "requests.jsonl")
    summary = summarize(requests, run)
    records = [{k: json_value(v) for k, v in row.items()} for row in summary.to_dict("records")]
    (run_dir / "summary.json").write_text(json.dumps(records, indent=1, default=str))
    flat = summary.copy()
    if "acceptance_by_position" in flat:
        flat["acceptance_by_position"] = flat["acceptance_by_position"].map(
            lambda v: json.dumps([round(x, 4) for x in v]) if isinstance(v, list) else "")
    flat.to_csv(run_dir / "summary.csv", index=False)
    tables = markdown_table(summary, HEADLINE_COLUMNS) + "\n\n" + markdown_table(summary, DETAIL_COLUMNS)
    winners = mode_winners(summary)
    if not winners.empty:
        winners.to_csv(run_dir / "mode_winners.csv", index=False)
        tables += "\n\nWhich mode won, per RTT (tok/s p50):\n\n" + markdown_table(winners, WINNER_COLUMNS)
    serving_text, capacities = capacity.render(requests, run, run_dir)
    tables += "\n\n" + serving_text if serving_text else ""
    (run_dir / "summary.md").write_text(tables + "\n")
    plots.render_all(summary, run_dir)
    out = {**compact(summary, run_dir), "capacity": capacities}
    replicas = pool.replica_rows(read_records(run_dir / "requests.jsonl"))  # where each session ran (pool.py)
    if len({r["replica"] for r in replicas}) > 1:
        out["replicas"] = replicas
        tables += "\n\nVerifier replicas:\n\n" + markdown_table(pd.DataFrame(replicas), {k: k for k in replicas[0]})
    return tables, out


def failed_requests(path: pathlib.Path) -> tuple[int, int]:
    """(requests that never succeeded, all requests) of a run folder's requests.jsonl, resumes included."""
    records = read_records(path) if path.exists() else []
    keys = {(r["config"], r["pubid"]) for r in records}
    return len(keys - finished_keys(path)), len(keys)


def finished_keys(path: pathlib.Path) -> set[tuple[str, str]]:
    """(config, pubid) of the requests that already succeeded in an earlier run."""
    return {(r["config"], r["pubid"]) for r in read_records(path) if r["status"] == "ok"} if path.exists() else set()
