"""Open-loop `specdec bench` on the tiny pair through the CLI, then `specdec plan` on its run folder."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.stubs import CLI, ENV
from tests.test_bench_tiny import bench, write_config

pytestmark = pytest.mark.slow  # `specdec bench` in a subprocess, over a local Ray cluster


def test_open_loop_run_at_two_rates_records_every_request_and_reports_capacity(tiny_dirs, pubmedqa_path, tmp_path):
    write_config(tmp_path / "bench.yaml", tiny_dirs, pubmedqa_path, max_new_tokens=8,
                 drafts=[{"name": "ngram", "kind": "ngram", "gamma": 3}],
                 concurrency={"draft_workers": 1, "draft_threads": 1, "sessions": 2},
                 load={"rates": [2, 8], "requests": 5, "warmup": 1, "seed": 1}, slo={"tpot_ms": 5000, "ttft_ms": 10000})
    run_dir = tmp_path / "run"
    done = bench("--config", str(tmp_path / "bench.yaml"), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    names = ["baseline @2/s", "ngram g=3 @2/s", "baseline @8/s", "ngram g=3 @8/s"]
    for name in names:  # every arrival recorded once, with its schedule
        mine = [r for r in records if r["config"] == name]
        assert sorted(r["request"] for r in mine) == list(range(5)) and all(r["status"] == "ok" for r in mine), name
        assert all(r["wait_s"] >= 0 and r["rate"] in (2, 8) and len(r["chunk_times_s"]) >= 1 for r in mine)
    # the loose SLO is met at both rates: capacity at least the top rate swept, for both configurations
    assert "Capacity (req/s) at the SLO" in done.stdout and "| ngram g=3 | ≥ 8 |" in done.stdout
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["capacity"]["series"]["ngram g=3"] == {"capacity": 8.0, "bounded": False, "ratio": 1.0}
    serving = {row["config"]: row for row in json.loads((run_dir / "serving.json").read_text())}
    assert serving["ngram g=3 @8/s"]["completed"] == 4 and serving["ngram g=3 @8/s"]["mean_tpot_ms"] > 0  # 1 warm-up left out
    assert (run_dir / "capacity.png").stat().st_size > 10_000

    planned = subprocess.run([*CLI, "plan", "--from", str(run_dir), "--rtt-ms", "0,50", "--requests", "40"],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert planned.returncode == 0, planned.stderr[-3000:]
    rows = json.loads(planned.stdout.strip().splitlines()[-1])["rows"]
    assert {(r["configuration"], r["rtt_ms"]) for r in rows} == {(c, t) for c in ("baseline", "ngram g=3") for t in (0, 50)}
    assert all(r["predicted_capacity"] > 0 for r in rows)
    # the validation replays the run's own arrivals: one row per configuration x rate, both measured and predicted
    out = json.loads(planned.stdout.strip().splitlines()[-1])
    assert {(r["configuration"], r["rate"]) for r in out["validation_per_rate"]} == {
        (c, rate) for c in ("baseline", "ngram g=3") for rate in (2.0, 8.0)}
    assert all(r["measured_attainment"] >= 0 and r["predicted_attainment"] >= 0 for r in out["validation_per_rate"])
    assert "Validation: the run's own arrivals replayed" in planned.stdout
