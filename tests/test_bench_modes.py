"""Session modes in the benchmark and the CLI, without Ray or models: pairing each configuration with the baseline
at its own RTT, the per-RTT "which mode won" table, mean gamma, rtt.png, and the --mode/--gamma flags."""

from __future__ import annotations

import json
import math

import pytest

from draft_worker import client
from draft_worker.drafters import AdaptiveGamma, DrafterSpec, DraftModels
from draft_worker.router import Router
from draft_worker.service import DraftService, gamma_schedule
from orchestrator import cli, report
from orchestrator import config as bench_config
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import tiny
from specdec.config import DEFAULT_MODE, SamplingParams
from specdec.metrics import GenerationResult

TOKENS = 4
RUN = {"config": {"prices": {"verifier_per_hour": 0, "draft_per_hour": 0},
                  "concurrency": {"draft_workers": 1, "sessions_per_worker": 1}}}
# wall seconds per request of each (mode, rtt): lock-step wins on loopback, async at 50 ms; Generate is 1 s / 2 s
WALL = {("lockstep", 0): 0.5, ("ahead", 0): 0.8, ("async", 0): 1.0,
        ("lockstep", 50): 2.0, ("ahead", 50): 1.0, ("async", 50): 0.5}
BASE_WALL = {0: 1.0, 50: 2.0}


def _request(config: str, mode: str | None, rtt_ms: float, pubid: str, wall_s: float, **extra) -> dict:
    """One requests.jsonl record as bench.run_configuration writes it (mode None: a run from before modes)."""
    drafting = not config.startswith("baseline")
    result = GenerationResult(token_ids=list(range(TOKENS)), wall_s=wall_s, ttft_s=0.05, finish_reason="length",
                              rounds=2 if drafting else 0, proposed_per_round=[3, 1] if drafting else [],
                              accepted_per_round=[2, 0] if drafting else [], rtt_s=[0.01, 0.01] if drafting else [],
                              service_s=[0.004, 0.004] if drafting else [0.001] * TOKENS)
    rec = {**result.to_dict(), **extra, "config": config, "drafter": "ngram" if drafting else "baseline",
           "draft_name": "ng" if drafting else "verifier-only", "gamma": 3 if drafting else 0, "rtt_ms": float(rtt_ms),
           "sessions": 1, "pubid": pubid, "prompt_truncated": False, "status": "ok", "started_at": 0.0,
           "finished_at": wall_s}
    return rec if mode is None else {**rec, "mode": mode}


def _sweep_records() -> list[dict]:
    records = []
    for rtt, wall in BASE_WALL.items():
        records += [_request(f"baseline{f' rtt={rtt}ms' if rtt else ''}", "lockstep", rtt, p, wall) for p in "abc"]
    for (mode, rtt), wall in WALL.items():
        name = "ng g=3" + (f" {mode}" if mode != "lockstep" else "") + (f" rtt={rtt}ms" if rtt else "")
        # async: the gamma of each block as the client records it, and no per-round round trips (a commit stream)
        extra = {"gamma_per_round": [4, 5], "rtt_s": []} if mode == "async" else {}
        records += [_request(name, mode, rtt, p, wall, **extra) for p in "abc"]
    return records


def _write_run(path, records: list[dict]) -> None:
    (path / "run.json").write_text(json.dumps(RUN))
    (path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow  # renders the report and its plots (~3 s)
def test_each_configuration_is_paired_with_the_baseline_at_its_rtt_and_the_winner_table(tmp_path):
    _write_run(tmp_path, _sweep_records())
    summary = report.summarize(report.load_records(tmp_path / "requests.jsonl"), RUN)
    rows = summary.set_index("config")
    # base s/token over spec s/token: at 50 ms against Generate at 50 ms (2 s), not at 0 ms (which would give 2.0)
    assert rows.loc["ng g=3 async rtt=50ms", "speedup_paired_p50"] == pytest.approx(4.0)
    assert rows.loc["ng g=3", "speedup_paired_p50"] == pytest.approx(2.0)
    assert math.isnan(rows.loc["ng g=3 async", "rtt_measured_ms"])  # no round trip to pair service times with
    assert rows.loc["ng g=3", "rtt_measured_ms"] == pytest.approx(6.0)  # 10 ms round trip - 4 ms service
    assert rows.loc["ng g=3 ahead rtt=50ms", "mode"] == "ahead" and rows.loc["baseline rtt=50ms", "mode"] == "lockstep"
    assert rows.loc["ng g=3 async", "mean_gamma"] == pytest.approx(4.5)  # gamma_per_round, not the 2.0 proposed
    assert rows.loc["ng g=3 async", "mean_drafted"] == pytest.approx(2.0)  # what the Leviathan bound takes
    assert rows.loc["ng g=3", "mean_gamma"] == pytest.approx(2.0)  # gamma_per_round empty: (3 + 1) / 2 rounds

    winners = report.mode_winners(summary).set_index("rtt_ms")
    assert list(winners.index) == [0, 50]
    assert winners.loc[0, ["best_mode", "best_config", "runner_up_mode"]].tolist() == ["lockstep", "ng g=3", "ahead"]
    assert winners.loc[0, "throughput_tok_s_p50"] == pytest.approx(TOKENS / 0.5)
    assert winners.loc[0, "vs_generate"] == pytest.approx(2.0) and winners.loc[0, "vs_runner_up"] == pytest.approx(0.8 / 0.5)
    assert winners.loc[50, ["best_mode", "runner_up_mode"]].tolist() == ["async", "ahead"]
    assert winners.loc[50, "vs_generate"] == pytest.approx(4.0) and winners.loc[50, "vs_runner_up"] == pytest.approx(2.0)

    tables, _ = report.render(tmp_path)
    assert "| ng | 50 | 1 | async | ng g=3 async rtt=50ms | 8 | 4 | ahead | 2 |" in tables
    assert tables == (tmp_path / "summary.md").read_text().rstrip("\n")
    assert "| configuration | mode | sessions |" in tables
    assert (tmp_path / "mode_winners.csv").read_text().count("\n") == 3  # a header and one row per RTT
    assert (tmp_path / "rtt.png").stat().st_size > 10_000


@pytest.mark.slow  # renders the report (~3 s)
def test_no_rtt_sweep_no_rtt_plot_and_a_run_from_before_modes_still_reports(tmp_path):
    _write_run(tmp_path, [r for r in _sweep_records() if r["rtt_ms"] == 0])
    report.render(tmp_path)
    assert not (tmp_path / "rtt.png").exists() and (tmp_path / "mode_winners.csv").exists()

    old = tmp_path / "old"  # one baseline, at the run's rtt_ms, and no mode in the records: all lock-step
    old.mkdir()
    _write_run(old, [_request("baseline", None, 0, p, 1.0) for p in "abc"]
               + [_request("ng g=3 rtt=50ms", None, 50, p, 2.0) for p in "abc"])
    summary = report.summarize(report.load_records(old / "requests.jsonl"), RUN).set_index("config")
    assert summary.loc["ng g=3 rtt=50ms", "speedup_paired_p50"] == pytest.approx(0.5)  # against that one baseline
    assert set(summary["mode"]) == {"lockstep"} and report.mode_winners(summary.reset_index()).empty
    report.render(old)
    assert not (old / "mode_winners.csv").exists()


def test_generate_and_bench_take_mode_and_gamma_rtt():
    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--verifier", "h:1", "--drafter", "ngram", "--prompt", "x",
                              "--mode", "async", "--gamma", "rtt"])
    assert (args.mode, args.gamma) == ("async", "rtt")
    # one default mode for the library, the CLI and the bench (specdec.config.DEFAULT_MODE; issue 17)
    assert parser.parse_args(["serve-draft", "--verifier", "h:1", "--drafter", "ngram"]).mode == DEFAULT_MODE
    assert parser.parse_args(["generate", "--verifier", "h:1", "--drafter", "ngram", "--prompt", "x"]).mode == DEFAULT_MODE
    assert bench_config.RunSpec("ngram").mode == bench_config.BenchConfig().mode == DEFAULT_MODE
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--verifier", "h:1", "--drafter", "ngram", "--prompt", "x", "--mode", "eager"])
    bench = parser.parse_args(["bench", "--mode", "lockstep", "async", "--emulate-rtt-ms", "0", "25"])
    cfg = bench_config.override(bench_config.from_dict({"drafts": [{"name": "ng", "kind": "ngram"}]}),
                                mode=cli._sweep(bench.mode), rtt_ms=cli._sweep(bench.emulate_rtt_ms))
    assert [s.name for s in bench_config.expand(cfg)] == ["baseline", "baseline rtt=25ms", "ng g=4", "ng g=4 async",
                                                         "ng g=4 rtt=25ms", "ng g=4 async rtt=25ms"]
    assert cli._sweep(None) is None and cli._sweep(["ahead"]) == "ahead"


async def test_the_draft_service_passes_its_mode_and_a_fresh_gamma_schedule(monkeypatch):
    calls = []

    async def speculate(stub, drafter, prompt_ids, params, gamma, info, config, fingerprint, on_commit=None, **kw):
        calls.append((gamma, kw))
        return GenerationResult(token_ids=[])

    monkeypatch.setattr(client, "speculate", speculate)
    service = DraftService(Router(["127.0.0.1:1"]), pb.InfoReply(), None, "fp", DrafterSpec(kind="ngram"), "adaptive",
                           client.ClientConfig(), DraftModels(), mode="ahead")
    await service.run([1, 2], SamplingParams())
    await service.run([1, 2], SamplingParams())
    (first, kw), (second, _) = calls
    assert isinstance(first, AdaptiveGamma) and first is not second and kw == {"mode": "ahead", "result": None}
    assert gamma_schedule(3) == 3 and gamma_schedule("5") == 5


def test_gamma_rtt_is_the_rtt_schedule():
    gamma = pytest.importorskip("draft_worker.gamma", reason="draft_worker/gamma.py (RttGamma) lands with issue 10")
    schedule = gamma_schedule("rtt")
    assert isinstance(schedule, gamma.RttGamma) and schedule is not gamma_schedule("rtt")


def test_python_m_specdec_tiny_writes_the_pair(tiny_dirs, capsys):
    draft, verifier = tiny_dirs
    tiny.main([str(draft.parent)])  # already built there: kept, not rebuilt
    assert capsys.readouterr().out.split() == ["draft:", str(draft), "verifier:", str(verifier)]
    assert (verifier / "config.json").exists() and (draft / "tokenizer.json").exists()


def test_interleaved_order_runs_prompt_by_prompt_and_warms_up_once():
    from orchestrator.bench import Prompt, schedule

    specs = bench_config.expand(bench_config.from_dict({"drafts": [{"name": "ng", "kind": "ngram"}], "rtt_ms": [0, 50]}))
    prompts = [Prompt(i, f"p{i}", [1, 2], False, "yes") for i in range(3)]
    names = [s.name for s in specs]
    grouped = [(s.name, [p.pubid for p in todo], warm) for s, todo, warm in schedule(specs, prompts, set(), "grouped")]
    assert grouped == [(n, ["p0", "p1", "p2"], True) for n in names]
    done = {("ng g=4", "p0")}  # a resumed run skips what is done
    interleaved = [(s.name, [p.pubid for p in todo], warm) for s, todo, warm in schedule(specs, prompts, done, "interleaved")]
    assert [(n, pid) for n, [pid], _ in interleaved] == [(n, p.pubid) for p in prompts for n in names if (n, p.pubid) not in done]
    warmed = [n for n, _, warm in interleaved if warm]
    assert sorted(warmed) == sorted(names) and warmed.index("ng g=4") > warmed.index("ng g=4 rtt=50ms")  # once each, before its first prompt
    with pytest.raises(ValueError):
        bench_config.from_dict({"drafts": [], "order": "random"})
