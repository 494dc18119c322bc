"""`specdec bench` and `specdec report` as a user runs them: tiny seeded models, real PubMedQA prompts.

The default path end to end: a local Ray, the verifier started as a Ray actor, draft workers as actors.
Greedy fp32 speculative output must equal the baseline on every prompt. Setup errors end in one line.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from orchestrator.launch import start_verifier
from specdec.tls import make_certs
from tests.stubs import CLI, ENV

pytestmark = pytest.mark.slow  # `specdec bench` in a subprocess, over a local Ray cluster


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "bench", "--no-progress", *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def write_config(path, tiny, pubmedqa_path, draft_budget: bool = True, **extra) -> None:
    """draft_budget False: the fixed gammas as they are (alone, the tiny LM's blocks do not repay their turnaround
    against the tiny verifier's steps, and the budget grants them nothing: no drafts to measure)."""
    draft, verifier = tiny
    config = {
        "verifier": {"model": str(verifier), "dtype": "fp32", "device": "cpu", "threads": 1,
                     "draft_budget": draft_budget},
        "drafts": [{"name": "tiny", "kind": "lm", "model": str(draft), "gamma": [2, 3, "adaptive"]},
                   {"name": "ngram", "kind": "ngram", "gamma": 3}],
        "max_new_tokens": 16,
        "dataset": {"source": str(pubmedqa_path), "num_prompts": 3, "max_prompt_tokens": 200},
        "concurrency": {"draft_workers": 1, "draft_threads": 1},
        "ray": {"num_cpus": 2},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))


def test_bench_end_to_end_on_tiny_models(tiny_dirs, pubmedqa_path, tmp_path):
    write_config(tmp_path / "bench.yaml", tiny_dirs, pubmedqa_path, draft_budget=False)
    run_dir = tmp_path / "run"
    done = bench("--config", str(tmp_path / "bench.yaml"), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last["configurations"]) == {"baseline", "tiny g=2", "tiny g=3", "tiny g=adaptive", "ngram g=3"}
    assert "| configuration | latency p50 (ms/token) | throughput p50 (tok/s) | speedup (paired p50) | acceptance |" in done.stdout

    records = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 3 and all(r["status"] == "ok" and r["new_tokens"] == 16 for r in records)
    assert all(r["prompt_truncated"] and r["prompt_tokens"] <= 200 for r in records)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["prompts"] == 3 and run["prompts_truncated"] == 3 and run["verifier"]["dtype"] == "float32"

    rows = {row["config"]: row for row in json.loads((run_dir / "summary.json").read_text())}
    for name, row in rows.items():
        assert row["disagree_requests"] == 0.0 and row["differing_token_share"] == 0.0, name  # lossless in fp32
        assert row["rouge_l_vs_baseline"] == 1.0
        assert row["accuracy"] == row["accuracy_baseline"] and row["accuracy_gap"] == 0.0  # the quality gap, exactly
    assert all(r["final_decision"] in ("yes", "no", "maybe") and "decision" in r for r in records)
    assert "PubMedQA accuracy | baseline accuracy" in done.stdout
    for name in ("tiny g=2", "tiny g=3", "tiny g=adaptive"):
        row = rows[name]
        assert 0 < row["acceptance_rate"] <= 1 and row["mean_acceptance_length"] >= 1
        assert row["leviathan_bound"] > 0 and row["bytes_per_token"] > 0 and row["draft_ms_per_drafted_token"] > 0
        assert row["alpha"] >= row["acceptance_rate"]  # alpha ignores drafts after a rejection
    assert rows["tiny g=2"]["mean_gamma"] <= 2 and rows["tiny g=3"]["mean_gamma"] <= 3
    for png in ("latency", "throughput", "speedup", "acceptance", "gamma_sweep", "network_share"):
        assert (run_dir / f"{png}.png").stat().st_size > 10_000, png

    (run_dir / "summary.md").unlink()
    report = subprocess.run([*CLI, "report", str(run_dir)], capture_output=True, text=True, env=ENV, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (run_dir / "summary.md").exists() and json.loads(report.stdout.strip().splitlines()[-1]) == last

    again = bench("--config", str(tmp_path / "bench.yaml"), "--out", str(run_dir), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((run_dir / "requests.jsonl").read_text().splitlines()) == 15  # everything was already done


def test_setup_errors_are_one_line(tiny_dirs, pubmedqa_path, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("drafts: [{name: x, kind: ngram, gama: 3}]\n")
    done = bench("--config", str(bad))
    assert done.returncode == 1 and "drafts.0.gama: unknown key" in done.stderr and "Traceback" not in done.stderr

    write_config(tmp_path / "ok.yaml", tiny_dirs, tmp_path / "missing.jsonl")
    done = bench("--config", str(tmp_path / "ok.yaml"), "--out", str(tmp_path / "r1"), timeout=120)
    assert done.returncode == 1 and "PubMedQA file not found" in done.stderr and "Traceback" not in done.stderr

    write_config(tmp_path / "ok.yaml", tiny_dirs, pubmedqa_path)
    done = bench("--config", str(tmp_path / "ok.yaml"), "--verifier", "127.0.0.1:1", "--out", str(tmp_path / "r2"))
    assert done.returncode == 1 and "cannot reach the verifier at 127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr

    done = subprocess.run([*CLI, "report", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1 and "not a bench run folder" in done.stderr


def test_bench_against_a_running_secured_verifier(tiny_dirs, pubmedqa_path, tmp_path):
    """--verifier HOST:PORT: the user's own `specdec serve-verifier` on a public address with TLS and a token
    (as on a GPU box), reached through the emulated WAN link."""
    certs = make_certs(tmp_path / "certs", ["127.0.0.1"], token=True)
    security = {"tls_ca": str(certs["ca"]), "auth_token_file": str(certs["token"])}
    write_config(tmp_path / "bench.yaml", tiny_dirs, pubmedqa_path, security=security, prompt_format="chat",
                 drafts=[{"name": "tiny", "kind": "lm", "model": str(tiny_dirs[0]), "gamma": 2}])
    verifier = start_verifier(str(tiny_dirs[1]), "fp32", "cpu", host="0.0.0.0", env=ENV, extra_args=(
        "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"]), "--auth-token-file", str(certs["token"]),
        "--no-draft-budget"))  # the block's round trip is measured (with a budget, the verifier decodes it alone)
    address = "127.0.0.1:" + verifier.address.rpartition(":")[2]
    try:
        done = bench("--config", str(tmp_path / "bench.yaml"), "--verifier", address, "--prompts", "2",
                     "--emulate-rtt-ms", "20", "--out", str(tmp_path / "run"))
        write_config(tmp_path / "no-token.yaml", tiny_dirs, pubmedqa_path, security={"tls_ca": str(certs["ca"])})
        denied = bench("--config", str(tmp_path / "no-token.yaml"), "--verifier", address, "--out", str(tmp_path / "r2"))
    finally:
        verifier.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["config"]: row for row in json.loads((tmp_path / "run/summary.json").read_text())}
    assert set(rows) == {"baseline rtt=20ms", "tiny g=2 rtt=20ms"}
    assert rows["tiny g=2 rtt=20ms"]["round_trip_ms_p50"] >= 20 and rows["tiny g=2 rtt=20ms"]["disagree_requests"] == 0
    assert rows["tiny g=2 rtt=20ms"]["accuracy_gap"] == 0.0  # chat-formatted prompts, scored the same way
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr and "Traceback" not in denied.stderr


def test_concurrency_sweep_on_tiny_models_is_lossless_at_every_level(tiny_dirs, pubmedqa_path, tmp_path):
    write_config(tmp_path / "bench.yaml", tiny_dirs, pubmedqa_path,
                 drafts=[{"name": "tiny", "kind": "lm", "model": str(tiny_dirs[0]), "gamma": 3},
                         {"name": "ngram", "kind": "ngram", "gamma": 3}],
                 concurrency={"draft_workers": 1, "draft_threads": 1, "sessions": [1, 3]})
    run_dir = tmp_path / "run"
    done = bench("--config", str(tmp_path / "bench.yaml"), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["config"]: row for row in json.loads((run_dir / "summary.json").read_text())}
    assert set(rows) == {f"{c} x{n}" for c in ("baseline", "tiny g=3", "ngram g=3") for n in (1, 3)}
    for name, row in rows.items():  # batched sessions are lossless too: every level equals its baseline
        assert row["requests_ok"] == 3 and row["disagree_requests"] == 0.0, name
    assert rows["baseline x3"]["batch_size_p50"] >= 2  # three sessions in flight did share engine steps
    assert (run_dir / "concurrency.png").stat().st_size > 0
    cpus = json.loads((run_dir / "run.json").read_text())["cpus"]
    if cpus["verifier"]:  # a machine with 2+ cores: the roles got disjoint cores
        assert not set(cpus["verifier"]) & set(cpus["draft"])


def test_mode_and_rtt_sweep_on_tiny_models_is_lossless_in_every_mode(tiny_dirs, pubmedqa_path, tmp_path):
    """Issue 10's sweep in small: every mode at two RTTs, each beside the baseline at its own RTT. Greedy fp32:
    every configuration must equal its baseline token for token. (Exercises the modes once draft_worker.client
    runs them; before that, client.speculate accepts `mode` and runs lock-step.)"""
    write_config(tmp_path / "bench.yaml", tiny_dirs, pubmedqa_path, max_new_tokens=12, mode=["lockstep", "ahead", "async"],
                 rtt_ms=[0, 20], draft_budget=False, drafts=[{"name": "tiny", "kind": "lm", "model": str(tiny_dirs[0]), "gamma": 3}])
    run_dir = tmp_path / "run"
    done = bench("--config", str(tmp_path / "bench.yaml"), "--prompts", "2", "--out", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["config"]: row for row in json.loads((run_dir / "summary.json").read_text())}
    modes = {"tiny g=3": "lockstep", "tiny g=3 ahead": "ahead", "tiny g=3 async": "async"}
    assert set(rows) == {"baseline", "baseline rtt=20ms"} | {f"{c}{r}" for c in modes for r in ("", " rtt=20ms")}
    for name, row in rows.items():
        assert row["requests_ok"] == 2 and row["disagree_requests"] == 0.0 and row["differing_token_share"] == 0.0, name
        assert row["mode"] == modes.get(name.removesuffix(" rtt=20ms"), "lockstep"), name
    assert rows["tiny g=3 rtt=20ms"]["round_trip_ms_p50"] >= 20
    assert "Which mode won, per RTT" in done.stdout
    winners = (run_dir / "mode_winners.csv").read_text().splitlines()
    assert len(winners) == 3 and all(w.startswith("tiny,") for w in winners[1:])  # a header, then one row per RTT
    assert (run_dir / "rtt.png").stat().st_size > 10_000
