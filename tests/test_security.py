"""The exposed verifier: TLS, mutual TLS and token auth end to end on loopback, with certs made in the test;
per-client session limits, idle-session lifetime, and the refusal to listen publicly without protection."""

from __future__ import annotations

import asyncio
import dataclasses
import stat
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.transport import ClientConfig, VerifierError, fetch_info, load_client_config, open_channel
from orchestrator.launch import start_verifier as launch_verifier
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.config import SamplingParams, VerifierLimits
from specdec.tls import all_loopback, is_loopback, make_certs, read_token
from tests.stubs import CLI, ENV, fake_pair
from verifier_worker.auth import server_credentials
from verifier_worker.listen import start_server
from verifier_worker.server import ModelInfo, VerifierServicer

TOKEN = "s3cret-token-for-tests-0123456789"
PARAMS = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost"], token=True)


async def serve(certs=None, token=None, mutual=False, limits=VerifierLimits()):
    draft, target = fake_pair(vocab_size=32)
    info = ModelInfo("fake-verifier", 32, "fp-test", "float32", "cpu")
    servicer = VerifierServicer(target, info, limits)
    credentials = server_credentials(str(certs["server"]), str(certs["server_key"]),
                                     str(certs["ca"]) if mutual else None) if certs else None
    server, port = await start_server(servicer, "127.0.0.1", 0, credentials, token)
    return server, f"127.0.0.1:{port}", servicer, draft, target


async def released(servicer) -> None:
    """The server frees a session slot just after its last message; wait (bounded) until every slot is free."""
    for _ in range(200):
        if servicer.active_sessions == 0 and servicer.sessions_by_client == {}:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"sessions still held: {servicer.sessions_by_client}")


def tls_config(certs, token=None, client_cert=False, **kw) -> ClientConfig:
    return ClientConfig(timeout_s=10, info_timeout_s=5, auth_token=token, tls_root_certs=certs["ca"].read_bytes(),
                        tls_client_cert=certs["client"].read_bytes() if client_cert else None,
                        tls_client_key=certs["client_key"].read_bytes() if client_cert else None, **kw)


async def test_tls_and_token_end_to_end(certs):
    server, address, servicer, draft, target = await serve(certs, TOKEN)
    try:
        config = tls_config(certs, TOKEN)
        async with open_channel(address, config) as channel:
            stub = pb_grpc.VerifierStub(channel)
            info = await fetch_info(stub, config)
            baseline = await generate_baseline(stub, [1, 2, 3], PARAMS, config)
            spec = await speculate(stub, LMDrafter(draft, "d"), [1, 2, 3], PARAMS, 3, info, config, "fp-test")
        assert spec.token_ids == baseline.token_ids and spec.new_tokens == 12
        await released(servicer)
    finally:
        await server.stop(None)


@pytest.mark.parametrize("token, message", [(None, "missing auth token"), ("x" * 32, "wrong auth token")])
async def test_missing_or_wrong_token_is_unauthenticated_before_any_work(certs, token, message):
    server, address, servicer, draft, target = await serve(certs, TOKEN)
    try:
        config = tls_config(certs, token)
        async with open_channel(address, config) as channel:
            stub = pb_grpc.VerifierStub(channel)
            with pytest.raises(VerifierError, match=f"UNAUTHENTICATED: {message}"):
                await fetch_info(stub, config)
            with pytest.raises(VerifierError, match="UNAUTHENTICATED"):
                await generate_baseline(stub, [1, 2, 3], PARAMS, config)
            info = pb.InfoReply(vocab_size=32, limits=pb.Limits(max_gamma=16))
            with pytest.raises(VerifierError, match="UNAUTHENTICATED"):
                await speculate(stub, LMDrafter(draft, "d"), [1, 2, 3], PARAMS, 3, info, config)
            # the health service needs no token
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert target.forward_calls == 0 and servicer.active_sessions == 0  # no session, no model work
    finally:
        await server.stop(None)


async def test_plaintext_client_against_tls_server_fails_cleanly(certs):
    server, address, *_ = await serve(certs, TOKEN)
    try:
        config = ClientConfig(info_timeout_s=5, auth_token=TOKEN)  # no TLS
        async with open_channel(address, config) as channel:
            with pytest.raises(VerifierError, match="UNAVAILABLE"):
                await fetch_info(pb_grpc.VerifierStub(channel), config)
        other = make_certs(certs["ca"].parent / "other", ["127.0.0.1"])  # a CA the server's cert is not from
        config = tls_config(other, TOKEN)
        async with open_channel(address, config) as channel:
            with pytest.raises(VerifierError, match="UNAVAILABLE"):
                await fetch_info(pb_grpc.VerifierStub(channel), config)
    finally:
        await server.stop(None)


async def test_mutual_tls_requires_a_client_certificate(certs):
    server, address, *_ = await serve(certs, TOKEN, mutual=True)
    try:
        for with_cert, ok in ((False, False), (True, True)):
            config = tls_config(certs, TOKEN, client_cert=with_cert)
            async with open_channel(address, config) as channel:
                if ok:
                    assert (await fetch_info(pb_grpc.VerifierStub(channel), config)).vocab_size == 32
                else:
                    with pytest.raises(VerifierError, match="UNAVAILABLE"):
                        await fetch_info(pb_grpc.VerifierStub(channel), config)
    finally:
        await server.stop(None)


async def test_sessions_per_client_and_idle_lifetime():
    limits = VerifierLimits(max_sessions_per_client=1, idle_timeout_s=0.5)
    server, address, servicer, *_ = await serve(limits=limits)
    try:
        async with open_channel(address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            opening = pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=pb.SamplingParams(max_new_tokens=4)))
            first = stub.Speculate(timeout=10)
            await first.write(opening)
            assert (await first.read()).HasField("opened")
            second = stub.Speculate(timeout=10)
            await second.write(opening)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await second.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions open" in err.value.details()
            await asyncio.sleep(0.8)  # the first session now idles past its lifetime
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await first.read()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in err.value.details()
        await released(servicer)
    finally:
        await server.stop(None)


def test_tokens_certs_and_loopback(certs, tmp_path, monkeypatch):
    assert stat.S_IMODE(certs["server_key"].stat().st_mode) == 0o600 and stat.S_IMODE(certs["token"].stat().st_mode) == 0o600
    assert len(read_token(certs["token"])) >= 32
    monkeypatch.setenv("SPECDEC_AUTH_TOKEN", TOKEN)
    assert read_token(None) == TOKEN
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="shorter than 16"):
        read_token(tmp_path / "short")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("gpu-box.example.com")
    assert all_loopback(["127.0.0.1:50051", "[::1]:7", "localhost:8"])
    assert not all_loopback(["127.0.0.1:50051", "10.0.0.5:50051"]) and not all_loopback([])
    with pytest.raises(ValueError, match="go together"):
        load_client_config(client_cert=str(certs["client"]))
    assert "s3cret" not in repr(dataclasses.replace(ClientConfig(), auth_token=TOKEN))


@pytest.mark.slow
def test_cli_refuses_public_bind_without_protection_and_works_with_it(certs, tiny_dirs):
    draft, verifier = tiny_dirs
    done = subprocess.run([*CLI, "serve-verifier", "--model", str(verifier), "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1 and "refusing to listen on 0.0.0.0 without TLS and an auth token" in done.stderr
    insecure = launch_verifier(str(verifier), "fp32", "cpu", host="0.0.0.0", extra_args=("--insecure",), env=ENV)
    insecure.stop()
    assert "(--insecure)" in open(insecure.log_path).read()

    secure = launch_verifier(str(verifier), "fp32", "cpu", host="0.0.0.0", env=ENV, extra_args=(
        "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"]), "--auth-token-file", str(certs["token"])))
    try:
        port = secure.address.rpartition(":")[2]
        base = [*CLI, "generate", "--verifier", f"127.0.0.1:{port}", "--drafter", "ngram", "--prompt", "a b a b a",
                "--max-new-tokens", "4", "--timeout", "30", "--tls-ca", str(certs["ca"])]
        ok = subprocess.run([*base, "--auth-token-file", str(certs["token"])], capture_output=True, text=True, env=ENV, timeout=120)
        assert ok.returncode == 0, ok.stderr
        denied = subprocess.run(base, capture_output=True, text=True, env=ENV, timeout=120)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr and "Traceback" not in denied.stderr
    finally:
        secure.stop()


@pytest.mark.slow
def test_make_certs_command(tmp_path):
    done = subprocess.run([*CLI, "make-certs", "--host", "203.0.113.7", "--host", "gpu.example.com", "--out",
                           str(tmp_path), "--token"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key", "client.pem",
                                                   "client.key", "token.txt"}
    assert "--tls-ca" in done.stdout and read_token(tmp_path / "token.txt") not in done.stdout  # never printed


def test_health_command_says_serving_or_what_it_found(capsys):
    """`specdec health`: exit 0 and SERVING once the standard health check says so (no token needed); a verifier
    that says NOT_SERVING past --wait is one line naming the status, exit 1."""
    from concurrent import futures

    from grpc_health.v1 import health

    from orchestrator.cli import main

    server, servicer = grpc.server(futures.ThreadPoolExecutor(max_workers=2)), health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert main(["health", "--verifier", address, "--wait", "0"]) == 1
        assert f"verifier at {address} is not serving: NOT_SERVING" in capsys.readouterr().err
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert main(["health", "--verifier", address, "--wait", "0"]) == 0
        assert capsys.readouterr().out.strip() == f"{address} SERVING"
    finally:
        server.stop(None)
