"""The benchmark's concurrency sweep and core pinning: expansion, per-level pairing, the plot (no Ray)."""

from __future__ import annotations

import json
import os

import pytest

from orchestrator import config as bench_config
from orchestrator import report
from orchestrator.placement import pin_cores

DRAFTS = [{"name": "ng", "kind": "ngram", "gamma": 4}]


def test_sessions_sweep_expands_every_configuration_at_every_level():
    cfg = bench_config.from_dict({"drafts": DRAFTS, "concurrency": {"sessions": [1, 4]}})
    assert [s.name for s in bench_config.expand(cfg)] == ["baseline x1", "ng g=4 x1", "baseline x4", "ng g=4 x4"]
    single = bench_config.from_dict({"drafts": DRAFTS, "concurrency": {"draft_workers": 2, "sessions_per_worker": 3}})
    assert single.concurrency.levels() == [6] and [s.name for s in bench_config.expand(single)] == ["baseline", "ng g=4"]
    with pytest.raises(bench_config.ConfigError, match="sessions must be >= 1"):
        bench_config.from_dict({"drafts": DRAFTS, "concurrency": {"sessions": [0, 2]}})


def test_cores_are_pinned_disjoint_for_a_local_run():
    available = sorted(os.sched_getaffinity(0))
    auto = bench_config.from_dict({"drafts": DRAFTS})
    verifier, draft = pin_cores(auto)
    if len(available) >= 2:
        assert verifier and draft and not set(verifier) & set(draft) and sorted(verifier + draft) == available
    assert pin_cores(bench_config.override(auto, cpus="shared")) == (None, None)
    external = bench_config.override(auto, **{"verifier.address": "127.0.0.1:1"})
    assert pin_cores(external) == (None, None)  # not our verifier: nothing to pin it to
    explicit = bench_config.from_dict({"drafts": DRAFTS, "cpus": {"verifier": available[:1], "draft": available[:1]}})
    assert pin_cores(explicit) == (available[:1], available[:1])
    with pytest.raises(ValueError, match="not available: \\[100000\\]"):
        pin_cores(bench_config.from_dict({"drafts": DRAFTS, "cpus": {"verifier": [100000], "draft": [0]}}))


def _record(config: str, drafter: str, sessions: int, pubid: str, wall_s: float, start: float) -> dict:
    return {"config": config, "drafter": drafter, "draft_name": drafter, "gamma": 4 if drafter == "ngram" else 0,
            "rtt_ms": 0.0, "sessions": sessions, "pubid": pubid, "prompt_truncated": False, "status": "ok",
            "token_ids": [1] * 10, "text": "a b", "new_tokens": 10, "wall_s": wall_s, "tokens_per_s": 10 / wall_s,
            "ttft_s": 0.1, "service_s": [0.1], "prefill_service_s": 0.0, "started_at": start, "finished_at": start + wall_s,
            "proposed": 0, "rounds": 0, "accepted": 0}


def test_each_level_is_paired_with_the_baseline_at_that_level(tmp_path):
    records = []
    for level, base_wall, spec_wall in ((1, 2.0, 1.0), (4, 4.0, 1.0)):
        for i, pubid in enumerate(("a", "b", "c", "d")):
            start = i * (base_wall if level == 1 else 0)  # x1 runs one at a time; x4 all at once
            records.append(_record(f"baseline x{level}", "baseline", level, pubid, base_wall, start))
            records.append(_record(f"ng g=4 x{level}", "ngram", level, pubid, spec_wall, 100 + start / 2))
    run = {"config": {"prices": {"verifier_per_hour": 0, "draft_per_hour": 0},
                      "concurrency": {"draft_workers": 1, "sessions_per_worker": 1}},
           "configurations": [r["config"] for r in records[:4]]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = report.summarize(report.load_records(tmp_path / "requests.jsonl"), run).set_index("config")
    assert summary.loc["ng g=4 x1", "speedup_paired_p50"] == pytest.approx(2.0)
    assert summary.loc["ng g=4 x4", "speedup_paired_p50"] == pytest.approx(4.0)  # not 2.0 or a mix of levels
    assert summary.loc["baseline x1", "aggregate_tok_s"] == pytest.approx(40 / 8.0)  # 4 x 10 tokens over 8 s
    assert summary.loc["baseline x4", "aggregate_tok_s"] == pytest.approx(40 / 4.0)  # 4 x 10 tokens over 4 s
    report.render(tmp_path)
    assert (tmp_path / "concurrency.png").stat().st_size > 0
