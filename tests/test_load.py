"""Memory and load (slow): the verifier's RSS under the memory attacks of issue 11, and 32 concurrent sessions
plus a churn of cancelled ones for a bounded time with RSS flat after warm-up and no request lost.

Each test prints the figures the README's reliability table quotes."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_worker.client import speculate
from draft_worker.drafters import LMDrafter
from draft_worker.transport import ClientConfig, fetch_info, open_channel
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams, VerifierLimits
from tests.stubs import ENV
from tests.test_errors import open_request, proposal_request
from verifier_worker.listen import start_server
from verifier_worker.server import ModelInfo, VerifierServicer

pytestmark = pytest.mark.slow
MiB = 2**20
TOKEN = "load-test-token-0123456789abcdef"


class PeakRSS:
    """Samples a process's RSS every 10 ms in a thread; .peak after stop()."""

    def __init__(self, pid: int):
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def huge_generate_request(stop_ids: int) -> bytes:
    """GenerateRequest{prompt_ids: [1], params: {max_new_tokens: 1, stop_token_ids: [1] * stop_ids}}, built as
    bytes (a Python list of 57 M ints would take half a GiB on the attacking side)."""
    params = _varint(5 << 3) + _varint(1) + _field(6, b"\x01" * stop_ids)
    return _field(1, b"\x01") + _field(2, params)


async def _flood(address: str, method: str, body: bytes, n: int, metadata=()) -> list[grpc.StatusCode]:
    """n concurrent calls of `body` (raw bytes) to Info (unary) or Generate (server streaming) -> their status codes."""
    options = [("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        kind = "unary_unary" if method == "Info" else "unary_stream"
        rpc = getattr(channel, kind)(f"/specdec.v1.Verifier/{method}")

        async def one():
            try:
                call = rpc(body, timeout=60, metadata=metadata)
                if method == "Info":
                    await call
                else:
                    async for _ in call:
                        pass
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        return await asyncio.gather(*(one() for _ in range(n)))


async def _health_latency(address: str) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        started = time.perf_counter()
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return time.perf_counter() - started


def test_memory_under_attack(tiny_dirs, tmp_path):
    _, verifier_dir = tiny_dirs
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc = start_verifier(str(verifier_dir), "fp32", "cpu", env=ENV, extra_args=("--auth-token-file", str(token_file)))
    try:
        server = psutil.Process(proc.proc.pid)
        asyncio.run(_health_latency(proc.address))
        idle = server.memory_info().rss
        body = os.urandom(60 * MiB)

        async def attack():
            flood = asyncio.gather(
                _flood(proc.address, "Info", body, 32),  # 32 x 60 MiB without a token
                _flood(proc.address, "Generate", huge_generate_request(57 * MiB), 3,  # 3 x 57 MiB with the token
                       metadata=(("authorization", f"Bearer {TOKEN}"),)))
            await asyncio.sleep(0.2)
            latency = await _health_latency(proc.address)  # health answers while the flood is on
            return await flood, latency

        with PeakRSS(proc.proc.pid) as rss:
            (anonymous, authenticated), health_s = asyncio.run(attack())
        after = server.memory_info().rss
    finally:
        proc.stop()
    assert set(anonymous) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}, anonymous
    assert set(authenticated) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, authenticated  # over the model's message limit
    growth = (rss.peak - idle) / MiB
    print(f"attack: idle RSS {idle / MiB:.0f} MiB, peak {rss.peak / MiB:.0f} MiB (+{growth:.0f} MiB), after "
          f"{after / MiB:.0f} MiB; health answered in {health_s * 1000:.0f} ms; 35 calls, ~2 GiB sent")
    assert growth < 64 and health_s < 1.0


def test_32_sessions_and_a_churn_of_cancelled_ones_hold_flat_memory(tiny_dirs):
    draft_dir, verifier_dir = tiny_dirs
    cpu = torch.device("cpu")
    draft = models.load_model(str(draft_dir), dtype=torch.float32, device=cpu)
    target = models.load_model(str(verifier_dir), dtype=torch.float32, device=cpu)
    vocab = models.model_vocab_size(target)
    limits = VerifierLimits(max_sessions=64, max_sessions_per_client=64, max_new_tokens=32)
    duration_s, warmup_s = float(os.environ.get("SPECDEC_LOAD_S", "40")), 10.0
    counts = {"sessions": 0, "cancelled": 0, "lost": 0}
    samples: list[tuple[float, int]] = []

    async def run():
        servicer = VerifierServicer(target, ModelInfo("tiny", vocab, "fp", "float32", "cpu"), limits)
        server, port = await start_server(servicer, "127.0.0.1", 0)
        config = ClientConfig(timeout_s=120)
        stop_at = time.perf_counter() + duration_s
        async with open_channel(f"127.0.0.1:{port}", config) as channel:
            stub = pb_grpc.VerifierStub(channel)
            info = await fetch_info(stub)

            async def sessions(seed: int):
                rng = random.Random(seed)
                while time.perf_counter() < stop_at:
                    prompt = [rng.randrange(vocab) for _ in range(rng.randint(4, 40))]
                    params = SamplingParams(max_new_tokens=16)
                    try:
                        result = await speculate(stub, LMDrafter(draft, "tiny"), prompt, params, 4, info, config)
                        assert len(result.token_ids) == 16
                        counts["sessions"] += 1
                    except Exception:  # noqa: BLE001 - counted: a lost request fails the test
                        counts["lost"] += 1

            async def churn():
                rng = random.Random(99)
                while time.perf_counter() < stop_at:
                    call = stub.Speculate(timeout=30)
                    await call.write(open_request(prompt_ids=[rng.randrange(vocab) for _ in range(8)]))
                    await call.read()
                    for _ in range(rng.randint(0, 3)):
                        await call.write(proposal_request([]))
                        await call.read()
                    call.cancel()
                    counts["cancelled"] += 1

            async def sample():
                started = time.perf_counter()
                while time.perf_counter() < stop_at:
                    samples.append((time.perf_counter() - started, psutil.Process().memory_info().rss))
                    await asyncio.sleep(1.0)

            await asyncio.gather(*(sessions(i) for i in range(32)), churn(), sample())
            for _ in range(500):
                if servicer.active_sessions == 0:
                    break
                await asyncio.sleep(0.01)
            held = servicer.active_sessions, servicer.engine.stats().kv_bytes
        await server.stop(None)
        return held

    held = asyncio.run(run())
    steady = [rss for t, rss in samples if t >= warmup_s]
    growth = (steady[-1] - steady[0]) / MiB
    print(f"load: 32 concurrent sessions for {duration_s:g} s: {counts['sessions']} sessions done, "
          f"{counts['cancelled']} cancelled mid-session, {counts['lost']} lost; RSS after warm-up "
          f"{steady[0] / MiB:.0f} -> {steady[-1] / MiB:.0f} MiB ({growth:+.1f} MiB), peak {max(steady) / MiB:.0f} MiB")
    assert counts["lost"] == 0 and counts["sessions"] >= 32 and counts["cancelled"] > 0
    assert held == (0, 0)  # every slot and every KV buffer given back
    assert growth < 32, f"RSS grew {growth:.1f} MiB after warm-up"
