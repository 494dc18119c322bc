"""The orchestrator over a local Ray (num_cpus=2) against a stub verifier whose answers are known by construction.

The stub accepts exactly 2 of every proposal of 4 and commits token 7 after it, charges fixed service
times, goes away once for one prompt (UNAVAILABLE: the client re-opens it) and fails another always (INTERNAL:
retried once by the bench, then recorded as failed).
So every metric below has an exact expected value.
"""

from __future__ import annotations

import json
import os
import statistics

import grpc
import pytest
import ray
import torch

from orchestrator import bench, report
from orchestrator import config as bench_config
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import VerifierLimits
from verifier_worker.listen import start_server

pytestmark = pytest.mark.slow  # a local Ray cluster

# The client drafts min(gamma, tokens left - 1): 9 rounds of 4 proposed / 2 accepted / +1 (27 tokens), one of
# 3 / 2 / +1 (30), one of 0 / 0 / +1 (31): 31 tokens in 11 rounds, 20 of 39 drafts accepted.
MAX_NEW = 31
PROPOSED, ACCEPTED = [4] * 9 + [3, 0], [2] * 10 + [0]
PREFILL_S, ROUND_S, TOKEN_S = 0.002, 0.003, 0.001
QUESTIONS = ["Is aspirin useful?", "Does FLAKY fail once?", "Does BROKEN always fail?", "Are statins safe?"]


class StubVerifier(pb_grpc.VerifierServicer):
    def __init__(self, model_id: str, vocab_size: int, fingerprint: str, tokenizer):
        self.info = pb.InfoReply(model_id=model_id, vocab_size=vocab_size, tokenizer_fingerprint=fingerprint,
                                 dtype="float32", device="cpu", server_version="stub",
                                 limits=pb.Limits(max_gamma=16, max_prompt_tokens=4096, max_new_tokens=1024,
                                                  max_sessions=64, max_message_bytes=2**26))
        self.tokenizer = tokenizer
        self.limits = VerifierLimits()  # what start_server configures the channel with
        self.flaky_seen: set[str] = set()

    async def _maybe_fail(self, prompt_ids, context, kind: str) -> None:
        text = self.tokenizer.decode(list(prompt_ids))
        if "BROKEN" in text:
            await context.abort(grpc.StatusCode.INTERNAL, "stub: this prompt always fails")
        if "FLAKY" in text and (kind, text) not in self.flaky_seen:
            self.flaky_seen.add((kind, text))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "stub: first try fails")

    async def Info(self, request, context):
        return self.info

    async def Generate(self, request, context):
        await self._maybe_fail(request.prompt_ids, context, "generate")
        for i in range(request.params.max_new_tokens):
            yield pb.GenerateReply(token_ids=[10 + i % 50], service_s=TOKEN_S,
                                   finished=i == request.params.max_new_tokens - 1, finish_reason=pb.FINISH_REASON_LENGTH)

    async def Speculate(self, request_iterator, context):
        committed, max_new = 0, None
        async for request in request_iterator:
            if request.WhichOneof("kind") == "open":
                await self._maybe_fail(request.open.prompt_ids, context, "speculate")
                max_new = request.open.params.max_new_tokens
                yield pb.SpeculateReply(opened=pb.SessionOpened(session_id="s", service_s=PREFILL_S))
                continue
            accepted = min(2, len(request.proposal.draft_ids))
            committed += accepted + 1
            yield pb.SpeculateReply(verdict=pb.Verdict(num_accepted=accepted, next_token=7, service_s=ROUND_S,
                                                       finished=committed >= max_new, finish_reason=pb.FINISH_REASON_LENGTH))
            if committed >= max_new:
                return


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, resources={"draft": 2, "verifier": 1}, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_dataset(path) -> None:
    with path.open("w") as f:
        for i, question in enumerate(QUESTIONS):
            row = {"pubid": 1000 + i, "question": question, "final_decision": "yes",
                   "context": {"contexts": [f"Background sentence number {i}.", "Results were significant."]}}
            f.write(json.dumps(row) + "\n")


async def test_bench_over_ray_with_a_stub_verifier(local_ray, tiny_dirs, tmp_path):
    draft_dir, verifier_dir = tiny_dirs
    tokenizer = models.load_tokenizer(str(verifier_dir))
    vocab = models.model_vocab_size(models.load_model(str(draft_dir), dtype=torch.float32, device=torch.device("cpu")))
    servicer = StubVerifier(str(verifier_dir), vocab, models.tokenizer_fingerprint(tokenizer), tokenizer)
    server, port = await start_server(servicer, "127.0.0.1", 0)
    write_dataset(tmp_path / "pubmedqa.jsonl")
    cfg = bench_config.from_dict({
        "verifier": {"address": f"127.0.0.1:{port}"},
        "drafts": [{"name": "tiny", "kind": "lm", "model": str(draft_dir), "gamma": 4, "rtt_ms": [0, 30]}],
        "max_new_tokens": MAX_NEW, "dataset": {"source": str(tmp_path / "pubmedqa.jsonl"), "num_prompts": 4, "seed": None},
        "concurrency": {"draft_workers": 2, "draft_threads": 1}, "prices": {"verifier_per_hour": 3.6, "draft_per_hour": 0.36},
        "output_dir": str(tmp_path / "run"),
    })
    try:
        run_dir = await bench.run(cfg, progress=False)
    finally:
        await server.stop(None)

    records = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 4  # 4 configurations (the baseline at 0 and 30 ms) x 4 prompts, each once: none dropped
    by_key = {(r["config"], r["pubid"]): r for r in records}
    for config in ("baseline", "tiny g=4", "baseline rtt=30ms", "tiny g=4 rtt=30ms"):
        flaky = by_key[(config, "1001")]  # UNAVAILABLE on its first Generate and its first Speculate only
        assert flaky["status"] == "ok" and flaky["attempts"] == 1 and flaky["reconnects"] == (0 if "rtt" in config else 1)
        broken = by_key[(config, "1002")]
        assert broken["status"] == "failed" and broken["attempts"] == 2 and "always fails" in broken["error"]
    spec = by_key[("tiny g=4", "1000")]
    assert spec["new_tokens"] == MAX_NEW and spec["rounds"] == 11 and spec["text"]
    assert spec["proposed_per_round"] == PROPOSED and spec["accepted_per_round"] == ACCEPTED

    tables, compact = report.render(run_dir)
    for name in ("summary.csv", "summary.json", "summary.md", "latency.png", "throughput.png", "speedup.png",
                 "acceptance.png", "network_share.png"):
        assert (run_dir / name).stat().st_size > 0, name
    rows = {row["config"]: row for row in json.loads((run_dir / "summary.json").read_text())}
    base, lm, wan = rows["baseline"], rows["tiny g=4"], rows["tiny g=4 rtt=30ms"]
    for row in rows.values():
        assert (row["requests_ok"], row["requests_failed"]) == (3, 1)
    for row in (lm, wan):
        assert row["acceptance_rate"] == pytest.approx(20 / 39)
        assert row["acceptance_by_position"] == [1.0, 1.0, 0.0, 0.0]
        assert row["mean_acceptance_length"] == pytest.approx(MAX_NEW / 11)
        assert row["mean_gamma"] == 4.0  # every block at gamma 4, as the client records it (gamma_per_round)
        assert row["mean_drafted"] == pytest.approx(3.9)  # 39 drafts over the 10 rounds that drafted
        assert row["verifier_busy_s_per_token"] == pytest.approx((PREFILL_S + 11 * ROUND_S) / MAX_NEW)
        assert row["verifier_busy_vs_baseline"] == pytest.approx((PREFILL_S + 11 * ROUND_S) / MAX_NEW / TOKEN_S)
        assert row["bytes_sent_per_token"] > 0 and row["bytes_received_per_round"] > 0
        assert row["alpha"] == pytest.approx(20 / 30)  # 20 accepted, 10 rounds ended by a rejection
        # c = draft time per drafted token / the baseline's time per token, both from the records; the bound
        # is Leviathan's (1 - alpha^(gamma + 1)) / ((1 - alpha)(gamma c + 1)) with alpha = 2/3, gamma = 3.9
        ok = [r for r in records if r["config"] == row["config"] and r["status"] == "ok"]
        base_name = "baseline rtt=30ms" if row is wan else "baseline"  # each is paired with the baseline at its RTT
        c = sum(r["draft_s"] for r in ok) / (3 * 39) / statistics.median(
            by_key[(base_name, r["pubid"])]["wall_s"] / MAX_NEW for r in ok)
        assert row["leviathan_c"] == pytest.approx(c) and c > 0
        assert row["leviathan_bound"] == pytest.approx((1 - (2 / 3) ** 4.9) / (1 / 3) / (3.9 * c + 1))
        assert row["speedup_paired_p50"] > 0
        assert row["disagree_requests"] == 1.0  # the stub's tokens differ from its own baseline by construction
    assert base["verifier_busy_s_per_token"] == pytest.approx(TOKEN_S)
    assert base["speedup_paired_p50"] == 1.0 and base["disagree_requests"] == 0.0 and base["rouge_l_vs_baseline"] == 1.0
    # cost = verifier $/h x busy s + draft $/h x wall s (one session per worker), per query
    lm_records = [r for r in records if r["config"] == "tiny g=4" and r["status"] == "ok"]
    costs = sorted((3.6 * (PREFILL_S + 11 * ROUND_S) + 0.36 * r["wall_s"]) / 3600 for r in lm_records)
    assert lm["cost_per_query_usd"] == pytest.approx(costs[1])
    # the stub reports 3 ms of service without spending it, so round trip - service = link - 3 ms
    assert wan["rtt_configured_ms"] == 30.0 and wan["round_trip_ms_p50"] >= 30.0
    assert wan["rtt_measured_ms"] >= 30.0 - 1000 * ROUND_S and lm["rtt_measured_ms"] < 30.0 - 1000 * ROUND_S
    assert "| tiny g=4 rtt=30ms |" in tables and compact["configurations"]["tiny g=4"]["acceptance_rate"] == pytest.approx(20 / 39)

    # --resume only reruns what failed; the broken prompt fails again and is recorded again
    server, port = await start_server(servicer, "127.0.0.1", port)
    try:
        await bench.run(cfg, resume=True, progress=False)
    finally:
        await server.stop(None)
    lines = (run_dir / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 16 + 4 and all(json.loads(line)["pubid"] == "1002" for line in lines[16:])
    assert report.failed_requests(run_dir / "requests.jsonl") == (4, 16)  # what `specdec bench` exits 1 with
    with pytest.raises(bench.BenchError, match="already holds results"):
        await bench.run(cfg, progress=False)


async def test_setup_errors_are_clear(local_ray, tmp_path):
    cfg = bench_config.from_dict({"verifier": {"address": "127.0.0.1:1"}, "drafts": [{"name": "n", "kind": "ngram"}],
                                  "dataset": {"source": str(tmp_path / "none.jsonl")}})
    with pytest.raises(bench.BenchError, match="PubMedQA file not found"):
        await bench.run(cfg, progress=False)
    write_dataset(tmp_path / "d.jsonl")
    cfg = bench_config.override(cfg, **{"dataset.source": str(tmp_path / "d.jsonl"), "dataset.num_prompts": 2})
    with pytest.raises(bench.BenchError, match="cannot reach the verifier at 127.0.0.1:1"):
        await bench.run(cfg, progress=False)
    with pytest.raises(bench.BenchError, match="offers 2 of the `draft` resource, this run needs 5"):
        await bench.run(bench_config.override(cfg, **{"concurrency.draft_workers": 5}), progress=False)
