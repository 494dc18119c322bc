"""`specdec plan`: the planner's inputs from a bench run, its capacity table, and the check against the run.

Measured inputs (orchestrator/planner.py simulates with them):
- the verifier's step-cost curve: a least-squares fit of compute_s = a + b x batch_tokens + c x batch_size over
  every round the run recorded (each round records the engine step it rode in), or a file of step times for
  another device (`--step-costs`): CSV `tokens,step_ms` or YAML `{step_ms: {tokens: ms}, prefill_ms: ms,
  source: "where the figures come from"}`, piecewise linear in tokens, extended linearly past its ends;
- per configuration (its name less load and RTT): the acceptance traces (accepted per round of every request),
  draft seconds per drafted token as a line in the requests sharing the draft worker (draft_contention: a
  least-squares fit of each request's draft_s / proposed against how many requests of its configuration
  were in flight, on average, while it ran), tokens per request; the prefill's verifier time (the run's
  median, or the file's prefill_ms, or the curve at the median prompt length);
- an RTT per scenario (`--rtt-ms 10,50,100`), the SLO, and the draft slots (the run's; 0 = every user
  drafts on their own machine, no contention).
When the run was open-loop, orchestrator/validate.py replays its own arrivals and prints the measured
capacity beside the predicted one on the run's grid of rates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import re

import numpy as np
import yaml

from orchestrator import planner, serving, validate

RTT_SUFFIX = re.compile(r" rtt=[\d.]+ms")
MIN_CELL = 3  # recorded steps a (sessions, tokens) pair needs before its median stands for it


def series_name(config: str) -> str:
    from orchestrator.capacity import LOAD_SUFFIX

    return RTT_SUFFIX.sub("", LOAD_SUFFIX.sub("", config))


def workloads(records: list[dict]) -> list[planner.Workload]:
    """One Workload per configuration (across loads and RTTs) with completed requests, in run order."""
    ok = [r for r in records if r.get("status") == "ok"]
    # Generate's records carry no prefill time (0): a median over them too read half the run as free prompts
    recorded = [r["prefill_compute_s"] for r in ok if r.get("prefill_compute_s")]
    prefill_s = float(np.median(recorded)) if recorded else 0.0
    if not prefill_s:  # not recorded: what a step that carried a prompt cost over the decode steps' median
        prefill_s = prompt_step_excess_s(ok)
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(series_name(r["config"]), []).append(r)
    out = []
    for name, g in groups.items():
        spec = g[0]["drafter"] != "baseline"
        gamma = g[0]["gamma"] if isinstance(g[0]["gamma"], int) else round(
            np.mean([x for r in g for x in r.get("gamma_per_round") or r.get("proposed_per_round") or [0]]))
        d1, per_session = draft_contention(g)
        out.append(planner.Workload(
            name, gamma=int(gamma) if spec else 0, traces=tuple(tuple(r.get("accepted_per_round") or ()) for r in g) if spec else (),
            draft_s_per_token=d1, draft_s_per_token_per_session=per_session,
            new_tokens=int(np.median([r["new_tokens"] for r in g])), prefill_s=prefill_s))
    return out


def in_flight(r: dict, group: list[dict]) -> float:
    """How many requests of r's configuration (r included) were in flight on average while r ran."""
    start, end = r.get("started_at"), r.get("finished_at")
    if start is None or end is None or end <= start:
        return 1.0
    overlap = sum(max(0.0, min(end, o["finished_at"]) - max(start, o["started_at"])) for o in group
                  if o is not r and o["config"] == r["config"] and o.get("started_at") is not None and o.get("finished_at") is not None)
    return 1.0 + overlap / (end - start)


def prompt_step_excess_s(ok: list[dict]) -> float:
    """Median compute_s of the recorded steps that carried a prompt (more tokens than sessions x the largest
    block) less the median decode step's: the stall a prompt puts on every session of its step (the engine
    pads every row of a step to its longest, so a prompt beside 7 decoding rows costs 8 prompts' compute)."""
    block = 1 + max((p for r in ok for p in r.get("proposed_per_round") or []), default=0)
    steps = [(c, t > n * block) for r in ok for c, t, n in zip(r.get("compute_s") or [], r.get("batch_tokens") or [],
                                                                  r.get("batch_size") or [])]
    prompt, decode = [c for c, p in steps if p], [c for c, p in steps if not p]
    return max(0.0, float(np.median(prompt) - np.median(decode))) if prompt and decode else 0.0


def draft_contention(group: list[dict]) -> tuple[float, float]:
    """(uncontended draft s/token, s/token added per other request in flight): a least-squares line through
    (in_flight, draft_s / proposed) over the requests that drafted; the slope is clipped at 0 and the
    intercept at the smallest observed per-token time. Flat (slope 0) when every request ran alike."""
    points = [(in_flight(r, group), r.get("draft_s", 0.0) / r["proposed"]) for r in group if r.get("proposed")]
    if not points:
        return 0.0, 0.0
    x, y = (np.asarray(col, float) for col in zip(*points))
    if len(points) < 3 or np.ptp(x) < 0.5:
        return float(y.mean()), 0.0
    slope, intercept = np.polyfit(x - 1, y, 1)
    slope = max(0.0, float(slope))
    return (max(float(y.min()), float(intercept)) if slope else float(y.mean())), slope


def fit_step_cost(records: list[dict]) -> planner.StepCostFn:
    """The verifier's step time from the recorded decode steps: the median compute_s of each (sessions, tokens)
    seen at least MIN_CELL times, interpolated in tokens at that many sessions (the engine's cost is far from
    linear: rows of one token take a cheaper path, and extra tokens per row cost little); elsewhere, and for
    the slope past a table's ends, the least-squares line a + b x tokens + c x sessions (never below 0).
    A step that also carried a prompt (more tokens than its sessions' largest blocks could hold) is left
    out: a prompt's cost is the planner's prefill_s."""
    ok = [r for r in records if r.get("status") == "ok"]
    block = 1 + max((p for r in ok for p in r.get("proposed_per_round") or []), default=0)  # largest gamma + 1
    every = [(c, t, n) for r in ok
             for c, t, n in zip(r.get("compute_s") or [], r.get("batch_tokens") or [], r.get("batch_size") or [])]
    rows = [(c, t, n) for c, t, n in every if t <= n * block]
    rows = rows if len(rows) >= 2 else every
    if len(rows) < 2:
        raise ValueError("the run recorded no engine steps (compute_s, batch_tokens, batch_size) to fit a step cost to")
    y, tokens, sessions = (np.asarray(col, float) for col in zip(*rows))
    design = np.column_stack([np.ones_like(y), tokens, sessions])
    if np.linalg.matrix_rank(design) < 3:
        design = design[:, :2]  # one batch size throughout: the sessions term is not identifiable
    a, b, c = (np.linalg.lstsq(design, y, rcond=None)[0].tolist() + [0.0])[:3]

    def line(t: float, n: float) -> float:
        return a + b * t + c * n

    cells: dict[int, dict[int, list[float]]] = {}
    for cost_s, t, n in rows:
        cells.setdefault(int(n), {}).setdefault(int(t), []).append(cost_s)
    table = {n: sorted((t, float(np.median(v))) for t, v in by_t.items() if len(v) >= MIN_CELL) for n, by_t in cells.items()}
    table = {n: points for n, points in table.items() if points}

    def cost(t: int, n: int) -> float:
        points = table.get(n)
        if not points:
            return max(0.0, line(t, n))
        ts, cs = zip(*points)
        if t > ts[-1]:
            return max(0.0, cs[-1] + line(t, n) - line(ts[-1], n))
        if t < ts[0]:
            return max(0.0, cs[0] + line(t, n) - line(ts[0], n))
        return float(np.interp(t, ts, cs))
    return cost


def load_step_costs(path: pathlib.Path) -> planner.StepCostFn:
    """A step-cost file (CSV tokens,step_ms or YAML step_ms: {tokens: ms}) as a piecewise-linear curve."""
    points = _step_table(path)
    xs, ys = zip(*sorted(points.items()))
    if len(xs) < 2:
        raise ValueError(f"{path}: give step times at two or more token counts")

    def cost(t: int, n: int) -> float:
        if t > xs[-1]:  # linear past the ends, along the last segment
            return ys[-1] + (t - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(np.interp(t, xs, ys))
    return cost


def _step_table(path: pathlib.Path) -> dict[float, float]:
    text = pathlib.Path(path).read_text()
    if pathlib.Path(path).suffix == ".csv":
        return {float(row["tokens"]): float(row["step_ms"]) / 1000 for row in csv.DictReader(text.splitlines())}
    data = yaml.safe_load(text) or {}
    return {float(k): float(v) / 1000 for k, v in (data.get("step_ms") or {}).items()}


def _file_prefill_s(path: pathlib.Path) -> float | None:
    if pathlib.Path(path).suffix == ".csv":
        return None
    value = (yaml.safe_load(pathlib.Path(path).read_text()) or {}).get("prefill_ms")
    return None if value is None else float(value) / 1000


def plan(run_dir: pathlib.Path, rtts_ms: list[float], slo: serving.Slo, step_costs: pathlib.Path | None = None,
         slots: int | None = None, requests: int = 200, seed: int = 0) -> tuple[str, dict]:
    """The predicted capacity of every configuration of the run at every RTT -> (markdown, JSON-able dict)."""
    from orchestrator.capacity import clean_record
    from orchestrator.report import load_records, markdown_table

    run = json.loads((run_dir / "run.json").read_text())
    records = [clean_record(r) for r in load_records(run_dir / "requests.jsonl").to_dict("records")]
    if slots is None:
        sessions = run["config"]["concurrency"].get("sessions")
        slots = (max(sessions) if isinstance(sessions, list) else sessions) or (
            run["config"]["concurrency"]["draft_workers"] * run["config"]["concurrency"]["sessions_per_worker"])
    works = workloads(records)
    if step_costs is not None:
        cost = load_step_costs(step_costs)
        prompt = float(np.median([r["prompt_tokens"] for r in records if r.get("status") == "ok"]))
        prefill = _file_prefill_s(step_costs)
        works = [dataclasses.replace(w, prefill_s=cost(prompt, 1) if prefill is None else prefill) for w in works]
    else:
        cost = fit_step_cost(records)
    measured = _measured(records, run)
    rows = []
    for rtt in rtts_ms:
        caps = {w.name: planner.capacity(w, cost, rtt / 1000, slo, requests, seed, slots or None) for w in works}
        base = caps.get("baseline", math.nan)
        for w in works:
            got = measured.get((w.name, rtt))
            rows.append({"configuration": w.name, "rtt_ms": rtt, "predicted_capacity": caps[w.name],
                         "x_verifier_only": caps[w.name] / base if base else math.nan, "measured_capacity": got,
                         "error": caps[w.name] / got - 1 if got else None})
    import pandas as pd

    table = pd.DataFrame(rows)
    source = str(step_costs) if step_costs else f"fitted to {run_dir}'s engine steps"
    target = " and ".join(f"{k.removesuffix('_ms').upper()} ≤ {v:g} ms" for k, v in dataclasses.asdict(slo).items() if v)
    text = (f"Predicted capacity (req/s): {serving.CAPACITY_ATTAINMENT:.0%} meeting {target or 'no SLO'}; step costs {source}; "
            f"draft slots {slots or 'unlimited'}; {requests} simulated arrivals per rate:\n\n"
            + markdown_table(table, {c: c.replace('_', ' ') for c in table}))
    if slots and slo.ttft_ms is None:  # a queue for a draft slot only shows in TTFT: nothing would bound capacity
        text += "\n\nWARNING: draft slots are limited but no TTFT target is set, so waiting for a slot counts against nothing; give --slo-ttft-ms"
    out = {"slo": dataclasses.asdict(slo), "step_costs": source, "slots": slots or None,
           "rows": _rows(table)}
    if any(r.get("rate") is not None for r in records) and step_costs is None:
        per_rate, checked = validate.validate(records, run, works, cost, slo, slots or None, series_name)
        text += ("\n\nValidation: the run's own arrivals replayed (same rates, seed, warm-up/cool-down, draft slots); "
                 "capacity = where attainment crosses 90%, interpolated on the run's grid:\n\n"
                 + markdown_table(checked, {c: c.replace('_', ' ') for c in checked})
                 + "\n\nPer rate:\n\n" + markdown_table(per_rate, {c: c.replace('_', ' ') for c in per_rate}))
        out["validation"], out["validation_per_rate"] = _rows(checked), _rows(per_rate)
    return text, out


def _rows(table) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in table.to_dict("records")]


def _measured(records: list[dict], run: dict) -> dict[tuple[str, float], float]:
    """(configuration, RTT) -> the capacity an open-loop run measured there (bounded ones only)."""
    import pandas as pd

    from orchestrator.capacity import capacity_table, serving_table

    if not any(r.get("rate") is not None for r in records):
        return {}
    caps = capacity_table(serving_table(pd.DataFrame(records), run))
    return {(RTT_SUFFIX.sub("", s), rtt): v for s, rtt, v, bounded in
            zip(caps["series"], caps["rtt_ms"], caps["capacity_value"], caps["bounded"]) if v is not None and bounded}


def command(args) -> dict:
    """`specdec plan` (orchestrator/cli.py parses its arguments): print the plan, return its compact summary."""
    from orchestrator.serving import Slo
    from specdec.errors import UserError, user_errors

    if not (args.run_dir / "requests.jsonl").exists() or not (args.run_dir / "run.json").exists():
        raise UserError(f"{args.run_dir} is not a bench run folder (no requests.jsonl and run.json)")
    run_slo = json.loads((args.run_dir / "run.json").read_text())["config"].get("slo") or {}
    slo = Slo(ttft_ms=args.slo_ttft_ms or run_slo.get("ttft_ms"), tpot_ms=args.slo_tpot_ms or run_slo.get("tpot_ms"))
    with user_errors(f"cannot plan from {args.run_dir}", ValueError, OSError, KeyError):
        text, out = plan(args.run_dir, args.rtt_ms, slo, args.step_costs, args.slots, args.requests, args.seed)
    print(text)
    return out
