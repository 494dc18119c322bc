"""Draft-side recovery: the verifier is killed mid-request and restarted on the same port; the client
re-opens the request with prompt + committed tokens and the greedy output equals an uninterrupted run."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import grpc
import pytest

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.recovery import with_recovery
from draft_worker.stream import refusal
from draft_worker.transport import (
    Backoff,
    ClientConfig,
    VerifierError,
    fetch_info,
    open_channel,
)
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.config import SamplingParams, VerifierLimits
from tests.stubs import fake_pair
from verifier_worker.listen import start_server
from verifier_worker.server import ModelInfo, VerifierServicer

VOCAB = 32
PARAMS = SamplingParams(max_new_tokens=60)
PROMPT = [3, 1, 4, 1, 5]
CONFIG = ClientConfig(timeout_s=20, backoff=Backoff(initial_s=0.05, max_s=0.5))


async def serve(port: int = 0):
    _, target = fake_pair(VOCAB)
    info = ModelInfo("fake-verifier", VOCAB, "fp-test", "float32", "cpu")
    return await start_server(VerifierServicer(target, info, VerifierLimits()), "127.0.0.1", port)


class SlowDrafter(LMDrafter):
    """LMDrafter that takes 10 ms a block and signals once `after` blocks were committed."""

    def __init__(self, model, after: int):
        super().__init__(model, "fake-draft")
        self.commits, self.after, self.reached = 0, after, threading.Event()

    def get_candidates(self, gamma):
        time.sleep(0.01)
        return super().get_candidates(gamma)

    def commit(self, num_accepted, next_token):
        super().commit(num_accepted, next_token)
        self.commits += 1
        if self.commits >= self.after:
            self.reached.set()


async def kill_and_restart(server, port: int, reached: threading.Event, down_s: float = 0.3):
    """Once `reached`, stop the verifier hard (its sessions are lost) and start a fresh one on the same port."""
    while not reached.is_set():
        await asyncio.sleep(0.005)
    await server.stop(None)
    await asyncio.sleep(down_s)  # clients reconnect into a closed port meanwhile
    return (await serve(port))[0]


@pytest.mark.parametrize("baseline", [False, True])
async def test_verifier_restart_mid_request_loses_nothing(baseline):
    draft, _ = fake_pair(VOCAB)
    server, port = await serve()
    async with open_channel(f"127.0.0.1:{port}", CONFIG) as channel:
        stub = pb_grpc.VerifierStub(channel)
        info = await fetch_info(stub)
        expected = (await generate_baseline(stub, PROMPT, PARAMS, CONFIG)).token_ids  # uninterrupted
        drafter = SlowDrafter(draft, after=5)
        if baseline:  # Generate has no drafter: kill once a few tokens streamed, by time
            asyncio.get_running_loop().call_later(0.02, drafter.reached.set)
            request = generate_baseline(stub, PROMPT, PARAMS, CONFIG)
        else:
            request = speculate(stub, drafter, PROMPT, PARAMS, 3, info, CONFIG, "fp-test")
        result, server = await asyncio.gather(request, kill_and_restart(server, port, drafter.reached))
    await server.stop(None)
    assert result.reconnects >= 1 and 0 < len(expected) == PARAMS.max_new_tokens
    assert result.token_ids == expected and result.finish_reason == "length"


async def test_a_verifier_that_stays_down_fails_within_the_deadline():
    server, port = await serve()
    await server.stop(None)
    config = ClientConfig(timeout_s=1.0, backoff=Backoff(initial_s=0.05, max_s=0.2))
    started = time.perf_counter()
    async with open_channel(f"127.0.0.1:{port}", config) as channel:
        with pytest.raises(VerifierError, match="UNAVAILABLE") as error:
            await generate_baseline(pb_grpc.VerifierStub(channel), PROMPT, PARAMS, config)
    assert error.value.code == "UNAVAILABLE" and time.perf_counter() - started < 2.0


async def test_reconnect_window_gives_up_before_the_deadline():
    """An interactive caller (serve-draft, generate) stops trying after reconnect_s, not at its long deadline."""
    server, port = await serve()
    await server.stop(None)
    config = ClientConfig(timeout_s=60.0, reconnect_s=0.5, backoff=Backoff(initial_s=0.05, max_s=0.2))
    started = time.perf_counter()
    async with open_channel(f"127.0.0.1:{port}", config) as channel:
        with pytest.raises(VerifierError, match="UNAVAILABLE"):
            await generate_baseline(pb_grpc.VerifierStub(channel), PROMPT, PARAMS, config)
    assert time.perf_counter() - started < 5.0  # far from the 60 s deadline


class _FailedCall:
    """A call whose final status is given: what refusal() reads after a write or a read failed."""

    def __init__(self, code, details):
        self._code, self._details = code, details

    async def code(self):
        return self._code

    async def details(self):
        return self._details


@pytest.mark.parametrize("code, details, expected", [
    ("INTERNAL", "Internal error from Core", "UNAVAILABLE"),  # grpcio's, as a write failed under a killed verifier
    ("INTERNAL", "the engine failed: CUDA error", "INTERNAL"),  # a verifier's own INTERNAL is its answer
    ("INVALID_ARGUMENT", "prompt has 9 tokens", "INVALID_ARGUMENT"),
])
async def test_a_broken_transport_is_retried_and_a_refusal_is_not(code, details, expected):
    error = await refusal(_FailedCall(getattr(grpc.StatusCode, code), details), RuntimeError("write failed"), "session")
    assert error.code == expected and details in str(error)
    attempts = []

    async def attempt(prompt_ids, params, config, result):
        attempts.append(prompt_ids)
        if len(attempts) == 1:
            raise error
        result.token_ids.extend([7] * params.max_new_tokens)

    config = ClientConfig(timeout_s=5, backoff=Backoff(initial_s=0.01, max_s=0.01))
    if expected == "UNAVAILABLE":
        result = await with_recovery(attempt, PROMPT, SamplingParams(max_new_tokens=3), config)
        assert len(attempts) == 2 and result.token_ids == [7, 7, 7] and result.reconnects == 1
    else:
        with pytest.raises(VerifierError, match=expected):
            await with_recovery(attempt, PROMPT, SamplingParams(max_new_tokens=3), config)
        assert len(attempts) == 1


def test_backoff_is_exponential_capped_and_jittered():
    backoff = Backoff(initial_s=0.1, max_s=1.0)
    delays = [backoff.delay(attempt, random.Random(attempt)) for attempt in range(8)]
    caps = [min(1.0, 0.1 * 2**a) for a in range(8)]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps))
    draws = [backoff.delay(5, random.Random(seed)) for seed in range(200)]
    assert max(draws) <= 1.0 and min(draws) < 0.1 and max(draws) > 0.9  # spread over [0, cap]: jitter


def test_bench_exits_non_zero_saying_how_many_requests_failed(tmp_path, monkeypatch, capsys):
    from orchestrator import bench, cli, report

    records = [{"config": "baseline", "pubid": "1", "status": "failed"}, {"config": "baseline", "pubid": "1", "status": "ok"},
               {"config": "ng g=4", "pubid": "1", "status": "failed"}, {"config": "ng g=4", "pubid": "1", "status": "failed"},
               {"config": "ng g=4", "pubid": "2", "status": "ok"}]
    (tmp_path / bench.REQUESTS).write_text("".join(json.dumps(r) + "\n" for r in records))

    async def fake_run(cfg, resume=False, progress=True):
        return tmp_path

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(cli, "_report", lambda run_dir: {"configurations": {}})
    assert report.failed_requests(tmp_path / bench.REQUESTS) == (1, 3)  # a retry that succeeded is not a failure
    assert cli.main(["bench", "--out", str(tmp_path)]) == 1
    assert "1 of 3 requests failed" in capsys.readouterr().err
    (tmp_path / bench.REQUESTS).write_text(json.dumps(records[-1]) + "\n")
    assert cli.main(["bench", "--out", str(tmp_path)]) == 0
