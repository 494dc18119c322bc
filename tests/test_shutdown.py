"""Graceful shutdown: health NOT_SERVING, new sessions UNAVAILABLE, sessions in flight finish within the drain
timeout (or are cut at it), and SIGTERM on the real command exits 0 without a traceback."""

from __future__ import annotations

import asyncio
import pathlib
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_worker.client import generate_baseline
from draft_worker.transport import ClientConfig, VerifierError, open_channel
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.config import SamplingParams
from tests.stubs import ENV, FakeLM
from tests.test_errors import LIMITS, TIMEOUT_S, VOCAB, open_request, proposal_request
from verifier_worker.listen import drain, start_server
from verifier_worker.server import ModelInfo, VerifierServicer

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def serve():
    servicer = VerifierServicer(FakeLM(VOCAB), ModelInfo("fake-verifier", VOCAB, "fp-test", "float32", "cpu"), LIMITS)
    server, port = await start_server(servicer, "127.0.0.1", 0)
    return server, servicer, f"127.0.0.1:{port}"


async def open_session(stub) -> grpc.aio.StreamStreamCall:
    call = stub.Speculate(timeout=TIMEOUT_S)
    await call.write(open_request())
    assert (await call.read()).HasField("opened")
    return call


async def test_drain_finishes_sessions_in_flight_and_refuses_new_ones():
    server, servicer, address = await serve()
    async with open_channel(address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        call = await open_session(stub)
        draining = asyncio.create_task(drain(server, servicer, timeout_s=5))
        await asyncio.sleep(0.1)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        assert health.status == NOT_SERVING
        with pytest.raises(VerifierError, match="UNAVAILABLE: verifier is shutting down") as error:
            # a client retries UNAVAILABLE (the verifier may come back) until its deadline, then gives up
            await generate_baseline(stub, [1, 2], SamplingParams(max_new_tokens=2), ClientConfig(timeout_s=0.5))
        assert error.value.code == "UNAVAILABLE"
        tokens = 0
        while True:  # the session in flight runs to its end while the server drains
            await call.write(proposal_request([]))
            verdict = (await call.read()).verdict
            tokens += 1
            if verdict.finished:
                break
        assert await call.read() is grpc.aio.EOF and await call.code() == grpc.StatusCode.OK and tokens == 8
        assert await asyncio.wait_for(draining, TIMEOUT_S) == 0  # nobody cut


async def test_drain_cuts_what_is_left_at_its_timeout():
    server, servicer, address = await serve()
    async with open_channel(address) as channel:
        call = await open_session(pb_grpc.VerifierStub(channel))  # and then idles
        assert await asyncio.wait_for(drain(server, servicer, timeout_s=0.3), TIMEOUT_S) == 1
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
        assert servicer.active_sessions == 0


@pytest.mark.slow
def test_sigterm_drains_the_real_command(tiny_dirs):
    from orchestrator.launch import start_verifier

    _, verifier_dir = tiny_dirs
    proc = start_verifier(str(verifier_dir), "fp32", "cpu", env=ENV, extra_args=("--drain-timeout", "10"))

    async def session_across_sigterm() -> int:
        async with open_channel(proc.address) as channel:
            call = await open_session(pb_grpc.VerifierStub(channel))
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            for n in range(1, 20):
                await call.write(proposal_request([]))
                if (await call.read()).verdict.finished:
                    return n
            return -1

    try:
        assert asyncio.run(session_across_sigterm()) == 8
        assert proc.proc.wait(timeout=30) == 0
    finally:
        proc.stop()
    log = pathlib.Path(proc.log_path).read_text()
    assert "Traceback" not in log and "draining 1 session" in log, log

