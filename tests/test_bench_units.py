"""Benchmark building blocks without Ray or models: config validation, prompts, metric math, gamma, delay, the
per-RTT mode table and the RTT plot."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import threading
import time

import pytest

from draft_worker.delay import DelayProxy, DelayProxyProcess
from draft_worker.drafters import AdaptiveGamma
from orchestrator import config as bench_config
from orchestrator.report import acceptance_by_position, disagreement, leviathan_bound
from specdec import pubmedqa
from specdec.config import SPEC_MODES

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_example_and_default_configs_load_and_expand():
    example = bench_config.load(REPO / "configs/pubmedqa.yaml")
    names = [s.name for s in bench_config.expand(example)]
    assert names == ["baseline", "baseline rtt=20ms", "baseline rtt=50ms", "qwen-0.5b g=1", "qwen-0.5b g=2",
                     "qwen-0.5b g=3", "qwen-0.5b g=4", "qwen-0.5b g=adaptive", "ngram g=4", "qwen-0.5b-wan g=3 rtt=20ms",
                     "qwen-0.5b-wan g=3 rtt=50ms"]
    default = bench_config.load(None)
    assert [s.drafter for s in bench_config.expand(default)][:2] == ["baseline", "lm"]
    # 2 drafts x 3 modes x 5 RTTs, the baseline at each RTT, and 1 (real pair) or 2 (tiny) gamma-rtt drafts in
    # lock-step; the tiny run also has 2 gamma-auto drafts in every mode (issue 18)
    for name, rtt_drafts, auto_drafts in (("rtt.yaml", 1, 0), ("rtt-tiny.yaml", 2, 2)):
        specs = bench_config.expand(bench_config.load(REPO / "configs" / name))
        assert len(specs) == 5 + 2 * 3 * 5 + rtt_drafts * 5 + auto_drafts * 3 * 5, name
        assert {s.mode for s in specs if s.gamma == "rtt"} == {"lockstep"}
        assert [s.rtt_ms for s in specs if s.drafter == "baseline"] == [0, 10, 25, 50, 100]
        swept = {s.draft_name for s in specs if s.drafter != "baseline" and s.gamma not in ("rtt", "auto")}
        assert len(swept) == 2
        assert {(s.draft_name, s.mode, s.rtt_ms) for s in specs if s.draft_name in swept} == {
            (d, m, r) for d in swept for m in SPEC_MODES for r in (0, 10, 25, 50, 100)}


def test_mode_and_rtt_sweeps_expand_with_a_baseline_at_every_rtt():
    cfg = bench_config.from_dict({"drafts": [
        {"name": "lm", "kind": "lm", "model": "m", "gamma": [3, "rtt"], "mode": ["lockstep", "async"], "rtt_ms": [0, 50]},
        {"name": "ng", "kind": "ngram", "rtt_ms": 25}]})  # no mode: the run's (lockstep)
    names = [s.name for s in bench_config.expand(cfg)]
    assert names == ["baseline", "baseline rtt=25ms", "baseline rtt=50ms",
                     "lm g=3", "lm g=3 async", "lm g=rtt", "lm g=rtt async",
                     "lm g=3 rtt=50ms", "lm g=3 async rtt=50ms", "lm g=rtt rtt=50ms", "lm g=rtt async rtt=50ms",
                     "ng g=4 rtt=25ms"]
    swept = bench_config.override(cfg, mode=["ahead", "async"], **{"concurrency.sessions": [1, 2]})
    specs = bench_config.expand(swept)
    assert [s.name for s in specs if s.draft_name == "ng"] == ["ng g=4 ahead rtt=25ms x1", "ng g=4 async rtt=25ms x1",
                                                               "ng g=4 ahead rtt=25ms x2", "ng g=4 async rtt=25ms x2"]
    assert [(s.rtt_ms, s.sessions) for s in specs if s.drafter == "baseline"] == [(r, n) for n in (1, 2) for r in (0, 25, 50)]
    assert {s.mode for s in specs if s.draft_name == "lm"} == {"lockstep", "async"}  # its own key wins over the run's
    run_wide = bench_config.from_dict({"drafts": [{"name": "ng", "kind": "ngram"}], "rtt_ms": [0, 10], "mode": "ahead"})
    assert [s.name for s in bench_config.expand(run_wide)] == ["baseline", "baseline rtt=10ms", "ng g=4 ahead",
                                                              "ng g=4 ahead rtt=10ms"]


@pytest.mark.parametrize("data, message", [
    ({"drafts": [{"name": "n", "kind": "ngram"}], "max_new_token": 3}, "max_new_token: unknown key"),
    ({"drafts": [{"name": "n", "kind": "ngram", "gama": 3}]}, "drafts.0.gama: unknown key"),
    ({"drafts": [{"name": "n", "kind": "ngram", "gamma": 0}]}, "gamma must be an integer in [1, 64], 'adaptive', 'rtt' or 'auto'"),
    ({"drafts": [{"name": "n", "kind": "ngram", "mode": ["lockstep", "asnyc"]}]},
     "drafts.0.mode: Value error, mode must be one of lockstep, ahead, async, got 'asnyc'"),
    ({"drafts": [{"name": "n", "kind": "ngram"}], "mode": "pipelined"}, "mode: Value error, mode must be one of"),
    ({"drafts": [{"name": "n", "kind": "ngram"}], "rtt_ms": [10, -1]}, "rtt_ms must be >= 0"),
    ({"drafts": [{"name": "n", "kind": "ngram", "gamma": [2, "adaptiv"]}]}, "got 'adaptiv'"),
    ({"drafts": [{"name": "n", "kind": "lm"}]}, "an lm drafter needs a model"),
    ({"drafts": [{"name": "n", "kind": "transformer"}]}, "drafts.0.kind"),
    ({"drafts": []}, "list at least one draft"),
    ({"drafts": [{"name": "n", "kind": "ngram"}, {"name": "n", "kind": "ngram"}]}, "share a name: n g=4"),
    ({"drafts": [{"name": "n", "kind": "ngram"}], "sampling": {"top_p": 2}}, "sampling.top_p"),
    ({"drafts": [{"name": "n", "kind": "ngram"}], "dataset": {"num_prompts": 0}}, "dataset.num_prompts"),
    ([1, 2], "must be a mapping"),
    ({"drafts": [{"name": "n", "kind": "ngram"}], "security": {"server_cert": "c.pem"}}, "go together"),
    ({"drafts": [{"name": "n", "kind": "ngram"}], "security": {"server_cert": "c", "server_key": "k"}}, "set security.tls_ca"),
    ({"drafts": [{"name": "n", "kind": "ngram", "rtt_ms": [0, -5]}]}, "rtt_ms must be >= 0"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(bench_config.ConfigError) as err:
        bench_config.from_dict(data)
    assert message in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(bench_config.ConfigError, match="cannot read config"):
        bench_config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("drafts: [\n")
    with pytest.raises(bench_config.ConfigError, match="not valid YAML"):
        bench_config.load(bad)


def test_overrides_are_validated_and_rtt_sweeps_expand():
    cfg = bench_config.from_dict({"drafts": [{"name": "d", "kind": "lm", "model": "m", "gamma": [2, 3], "rtt_ms": [0, 50]}]})
    cfg = bench_config.override(cfg, **{"verifier.address": "h:1", "rtt_ms": 20.0, "dataset.num_prompts": None})
    assert cfg.verifier.address == "h:1" and cfg.rtt_ms == 20.0 and cfg.dataset.num_prompts == 20
    names = [s.name for s in bench_config.expand(cfg)]  # the run's rtt_ms is no draft's: no baseline there
    assert names == ["baseline", "baseline rtt=50ms", "d g=2", "d g=3", "d g=2 rtt=50ms", "d g=3 rtt=50ms"]
    with pytest.raises(bench_config.ConfigError, match="dataset.num_prompts"):
        bench_config.override(cfg, **{"dataset.num_prompts": 0})
    params = cfg.sampling_params(5, stop_token_ids=(7,))
    assert params.seed == 5 and params.stop_token_ids == () and params.max_new_tokens == 64


def test_prompt_truncation_cuts_the_abstract_only():
    item = pubmedqa.Item("1", "Does aspirin help?", ("alpha beta gamma delta " * 50,), "yes")

    def tokenize(text):
        return text.split(" ")

    full, truncated = pubmedqa.encode(item, tokenize, 10_000)
    assert not truncated and full == tokenize(item.prompt)
    cut, truncated = pubmedqa.encode(item, tokenize, 40)
    assert truncated and len(cut) == 40
    assert cut[:4] == tokenize("Question: Does aspirin help?\nContext: ")[:4] and cut[-1] == tokenize("\nAnswer:")[-1]
    with pytest.raises(ValueError, match="question alone"):
        pubmedqa.encode(item, tokenize, 3)


def test_select_is_seeded_and_bounded():
    items = [pubmedqa.Item(str(i), "q", ("c",), "") for i in range(10)]
    assert pubmedqa.select(items, 3, None) == items[:3]
    assert pubmedqa.select(items, 3, 1) == pubmedqa.select(items, 3, 1) != pubmedqa.select(items, 3, 2)
    with pytest.raises(ValueError, match="asked for 11 prompts"):
        pubmedqa.select(items, 11, 0)


def test_hub_loading_fails_offline_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot load qiaojin/PubMedQA"):
        pubmedqa.load_hub()


def test_acceptance_by_position_and_disagreement():
    # two rounds of 4 drafts accepting 2, one round of 2 accepting 2, one round proposing nothing
    assert acceptance_by_position([[4, 4], [2, 0]], [[2, 2], [2, 0]]) == [1.0, 1.0, 0.0, 0.0]
    assert acceptance_by_position([[3]], [[1]]) == [1.0, 0.0, 0.0]
    assert disagreement([1, 2, 3], [1, 2, 3]) == (None, 0)
    assert disagreement([1, 9, 3, 4], [1, 2, 3]) == (1, 2)


def test_leviathan_bound():
    assert leviathan_bound(1.0, 4, 0.0) == 5.0
    assert leviathan_bound(0.0, 4, 0.0) == 1.0
    assert leviathan_bound(0.5, 2, 0.25) == pytest.approx((1 - 0.5**3) / 0.5 / 1.5)


def test_adaptive_gamma_is_hfs_heuristic():
    schedule = AdaptiveGamma(gamma=4, max_gamma=7)
    schedule.update(4, 4)
    assert schedule.gamma == 6
    schedule.update(6, 6)
    assert schedule.gamma == 7  # capped
    schedule.update(7, 3)
    assert schedule.gamma == 6
    schedule.update(0, 0)  # nothing drafted: unchanged
    assert schedule.gamma == 6
    for _ in range(10):
        schedule.update(1, 0)
    assert schedule.gamma == 1


async def test_delay_proxy_adds_the_round_trip():
    async def echo(reader, writer):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream = "127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    async with DelayProxy(upstream, rtt_ms=60) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address.split(":"))
        for payload in (b"ping", b"pong" * 1000):
            start = time.perf_counter()
            writer.write(payload)
            got = b""
            while len(got) < len(payload):
                got += await reader.read(65536)
            assert got == payload
            assert time.perf_counter() - start >= 0.06  # a lower bound: never flaky on a slow machine
        writer.close()
    server.close()
    with pytest.raises(ValueError, match=">= 0 ms"):
        DelayProxy(upstream, -1)


def _bytes_arrive_while_the_loop_is_busy(proxy_class, wait_s: float) -> bool:
    """Through a proxy started on this event loop, send 4 bytes to a plain-socket upstream and keep the loop busy
    (a drafter's work) until the upstream has them or wait_s passed: whether they arrived meanwhile."""
    received = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        def serve():
            with contextlib.suppress(OSError):  # closed unaccepted when the proxy never forwarded
                conn, _ = upstream.accept()
                with conn:
                    if conn.recv(16):
                        received.set()

        threading.Thread(target=serve, daemon=True).start()

        async def main():
            async with proxy_class("127.0.0.1:%d" % upstream.getsockname()[1], 10) as proxy:
                host, port = proxy.address.split(":")
                with socket.create_connection((host, int(port))) as conn:
                    conn.sendall(b"ping")
                    return received.wait(timeout=wait_s)  # blocks this loop, as a draft on it would

        return asyncio.run(main())


def test_a_delay_proxy_in_its_own_process_delivers_while_the_callers_loop_is_busy():
    """The benches' emulated link must not slow down with the drafting beside it (draft_worker/delay.py): on the
    caller's loop, nothing is forwarded while the loop is held; in its own process, the bytes arrive meanwhile."""
    assert _bytes_arrive_while_the_loop_is_busy(DelayProxyProcess, wait_s=60)
    assert not _bytes_arrive_while_the_loop_is_busy(DelayProxy, wait_s=0.5)
    with pytest.raises(ValueError, match=">= 0 ms"):
        DelayProxyProcess("127.0.0.1:1", -1)


def test_runs_over_the_verifiers_limits_are_refused_before_any_request():
    from orchestrator.checks import BenchError, check_limits
    from protos.specdec.v1 import specdec_pb2 as pb

    limits = pb.Limits(max_gamma=4, max_new_tokens=64, max_sessions=8, max_sessions_per_client=4)
    cfg = bench_config.from_dict({"drafts": [{"name": "d", "kind": "ngram", "gamma": [2, 4, "adaptive"]}]})
    check_limits(cfg, bench_config.expand(cfg), limits)  # within every limit: no error
    too_much = bench_config.from_dict({"drafts": [{"name": "d", "kind": "ngram", "gamma": 5}], "max_new_tokens": 65,
                                       "concurrency": {"draft_workers": 5}})
    with pytest.raises(BenchError) as err:
        check_limits(too_much, bench_config.expand(too_much), limits)
    assert "gamma 5 is over the verifier's max_gamma 4" in str(err.value)
    assert "max_new_tokens 65" in str(err.value) and "5 sessions is over the verifier's limit of 4" in str(err.value)


def test_resume_refuses_a_changed_config(tmp_path):
    import dataclasses
    import json

    from orchestrator.checks import BenchError, check_resume

    cfg = bench_config.from_dict({"drafts": [{"name": "d", "kind": "ngram"}], "output_dir": str(tmp_path)})
    check_resume(tmp_path, cfg)  # no run.json yet: nothing to compare
    (tmp_path / "run.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
    check_resume(tmp_path, bench_config.override(cfg, **{"concurrency.draft_workers": 3}))  # how, not what: allowed
    with pytest.raises(BenchError, match="changed sampling, max_new_tokens"):
        check_resume(tmp_path, bench_config.override(cfg, **{"sampling.temperature": 0.7, "max_new_tokens": 32}))


def test_the_sweeps_full_load_decoding_counts_only_the_stretches_where_every_session_was_decoding():
    """scripts/measure_budget.py's full-load decode tok/s: the tokens committed while all N sessions had their first
    token and had not ended, over those stretches. A wave's opening prefills, a refill's prefill and the tail, where
    requests that speculation sped up have ended, are left out; each stretch's first commit too, its last counted."""
    import importlib.util
    import math

    spec = importlib.util.spec_from_file_location("measure_budget", REPO / "scripts" / "measure_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def request(start: float, first: float, last: float) -> tuple[float, list[float], list[int]]:
        times = [float(t) for t in range(int(first), int(last) + 1)]  # a token a second from its first
        return start, times, [1] * len(times)

    # 2 sessions: A decodes 2-5 s, B 3-8 s, C takes A's slot at 5 s and decodes 7-8 s after its prefill
    spans = [request(0, 2, 5), request(0, 3, 8), request(5, 2, 3)]
    # both decoding in 3-5 s (A and B: 2 tokens each) and 7-8 s (B and C: 1 each): 6 tokens in 3 s
    assert module.full_load_decoding(spans, 2) == pytest.approx(2.0)
    # one wave whose second request runs on alone: only the 1-3 s both decoded count, not B's 6 s alone
    assert module.full_load_decoding([request(0, 1, 3), request(0, 1, 9)], 2) == pytest.approx(2.0)
    assert math.isnan(module.full_load_decoding(spans, 3))  # never 3 at once
