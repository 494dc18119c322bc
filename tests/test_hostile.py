"""Hostile input over real gRPC: corrupt bytes, oversized fields and messages, tiny temperatures, callers
without a token, and one host over IPv4 and IPv6. Every answer is a deliberate status code, and the verifier
keeps serving."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from google.protobuf.message import DecodeError

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import Candidates, LMDrafter
from draft_worker.transport import ClientConfig, VerifierError, fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec
from specdec.config import MAX_STOP_TOKEN_IDS, SAMPLING_EPS, SamplingParams, VerifierLimits
from tests.stubs import FakeLM, fake_pair
from tests.test_errors import (
    GREEDY,
    INVALID,
    LIMITS,
    TIMEOUT_S,
    VOCAB,
    assert_status,
    good_session,
    open_request,
    proposal_request,
    speculate_error,
    wait_for_no_sessions,
)
from verifier_worker.auth import ThrottledWarning
from verifier_worker.listen import start_server
from verifier_worker.server import ModelInfo, VerifierServicer
from verifier_worker.validation import LOOPBACK, client_host

CORRUPT = b"\x0a\xff\xff\xff\xff\xff"  # field 1, length-delimited, with a broken length varint
METHOD = "/specdec.v1.Verifier/"


@pytest.fixture
async def verifier(start_verifier):
    return await start_verifier(FakeLM(VOCAB, seed=0), vocab_size=VOCAB, limits=LIMITS)


def raw(channel: grpc.aio.Channel, name: str, kind: str):
    """A multicallable that sends and receives bytes as they are (no protobuf on the client side)."""
    return getattr(channel, kind)(METHOD + name)


async def raw_error(channel, name: str, kind: str, *messages: bytes, metadata=()) -> grpc.aio.AioRpcError:
    """The status ending a call that sends `messages` as raw bytes (fails if the call succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        if kind == "unary_unary":
            await raw(channel, name, kind)(messages[0], timeout=TIMEOUT_S, metadata=metadata)
        elif kind == "unary_stream":
            async for _ in raw(channel, name, kind)(messages[0], timeout=TIMEOUT_S, metadata=metadata):
                pass
        else:
            call = raw(channel, name, kind)(timeout=TIMEOUT_S, metadata=metadata)
            for message in messages:
                await call.write(message)
                await call.read()
            await call.done_writing()
            await call.read()
    return error.value


async def test_corrupt_bytes_are_invalid_argument_on_every_rpc(verifier):
    with pytest.raises(DecodeError):
        pb.SpeculateRequest.FromString(CORRUPT)
    for name, kind in (("Info", "unary_unary"), ("Generate", "unary_stream"), ("Speculate", "stream_stream")):
        assert_status(await raw_error(verifier.channel, name, kind, CORRUPT), INVALID, "not a valid protobuf message")
    # mid-session: a good open, then corrupt bytes in place of a proposal
    error = await raw_error(verifier.channel, "Speculate", "stream_stream", open_request().SerializeToString(), CORRUPT)
    assert_status(error, INVALID, "not a valid protobuf message")
    await wait_for_no_sessions(verifier)
    await good_session(verifier)


SPARSE_TOO_LONG = proposal_request([1], sparse=pb.SparseProbs(rows=[pb.SparseRow(ids=[1] * 33, probs=[0.03] * 33)]))


@pytest.mark.parametrize("request_, message", [
    (open_request(stop_token_ids=[1] * 10_000), f"stop_token_ids has 10000 ids, over the limit of {MAX_STOP_TOKEN_IDS}"),
    (open_request(prompt_ids=[1] * 5_000), "prompt has 5000 tokens, over this verifier's limit of 8"),
    (open_request(stop_token_ids=[-1]), "stop_token_ids[0] = -1 is outside"),
])
async def test_oversized_or_bad_open_fields_are_refused(verifier, request_, message):
    started = time.perf_counter()
    assert_status(await speculate_error(verifier.stub, request_), INVALID, message)
    assert time.perf_counter() - started < 2
    await good_session(verifier)


async def test_oversized_sparse_row_is_refused_before_its_ids_are_read(verifier):
    error = await speculate_error(verifier.stub, open_request(temperature=1.0), SPARSE_TOO_LONG)
    assert_status(error, INVALID, "sparse row 0 has 33 ids and 33 probs (between 1 and the vocabulary's 32")
    await good_session(verifier)


async def test_message_limit_is_what_the_model_needs(verifier):
    info = await fetch_info(verifier.stub)
    needed = LIMITS.message_bytes(VOCAB)
    assert info.limits.max_message_bytes == needed < 100_000  # gamma 4 x vocab 32 x 4 bytes + ids + headroom
    request = pb.GenerateRequest(prompt_ids=[1] * needed, params=pb.SamplingParams(max_new_tokens=1))  # > needed bytes
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in verifier.stub.Generate(request, timeout=TIMEOUT_S):
            pass
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await good_session(verifier)


def test_tiny_temperature_is_greedy_on_both_sides():
    assert SamplingParams(temperature=1e-38).greedy and SamplingParams(temperature=SAMPLING_EPS / 2).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy
    wire = codec.params_from_proto(codec.params_to_proto(SamplingParams(temperature=1e-38)))
    assert wire.greedy  # what the verifier decodes decides greedy the same way


async def test_tiny_temperature_generates_the_greedy_tokens(verifier):
    async def tokens(temperature: float) -> list[int]:
        params = codec.params_to_proto(SamplingParams(temperature=temperature, max_new_tokens=12))
        request = pb.GenerateRequest(prompt_ids=[3, 4], params=params)
        return [t async for reply in verifier.stub.Generate(request, timeout=TIMEOUT_S) for t in reply.token_ids]

    greedy = await tokens(0.0)
    assert await tokens(1e-38) == greedy and len(set(greedy)) > 1  # not the all-id-0 garbage of 1/T overflow


@pytest.mark.parametrize("peer, host", [
    ("ipv4:10.0.0.5:5678", "10.0.0.5"),
    ("ipv6:[::ffff:10.0.0.5]:5678", "10.0.0.5"),
    ("ipv6:[2001:db8::1]:443", "2001:db8::1"),
    ("ipv4:127.0.0.1:1", LOOPBACK),
    ("ipv4:127.0.1.1:1", LOOPBACK),
    ("ipv6:[::1]:2", LOOPBACK),
    ("ipv6:%5B::ffff:127.0.0.1%5D:3", LOOPBACK),  # as grpc writes it
    ("unix:/tmp/sock", "unix:/tmp/sock"),
])
def test_client_host_is_one_key_per_machine(peer, host):
    assert client_host(peer) == host


async def test_one_host_over_ipv4_and_ipv6_shares_its_limit():
    info = ModelInfo("fake-verifier", VOCAB, "fp-test", "float32", "cpu")
    servicer = VerifierServicer(FakeLM(VOCAB), info, VerifierLimits(max_sessions_per_client=1))
    try:
        server, port = await start_server(servicer, "::", 0)
    except (OSError, RuntimeError):
        pytest.skip("this machine cannot bind an IPv6 dual-stack port")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as v4, grpc.aio.insecure_channel(f"[::1]:{port}") as v6:
            first = pb_grpc.VerifierStub(v4).Speculate(timeout=TIMEOUT_S)
            await first.write(open_request())
            assert (await first.read()).HasField("opened")
            error = await speculate_error(pb_grpc.VerifierStub(v6), open_request())
            assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{LOOPBACK} already has 1 sessions open")
            first.cancel()
    finally:
        await server.stop(None)


async def test_unauthenticated_bodies_are_never_parsed():
    info = ModelInfo("fake-verifier", VOCAB, "fp-test", "float32", "cpu")
    servicer = VerifierServicer(FakeLM(VOCAB), info, LIMITS)
    server, port = await start_server(servicer, "127.0.0.1", 0, token="t" * 32)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name, kind in (("Info", "unary_unary"), ("Generate", "unary_stream"), ("Speculate", "stream_stream")):
                error = await raw_error(channel, name, kind, CORRUPT)  # corrupt, yet UNAUTHENTICATED, not UNKNOWN
                assert_status(error, grpc.StatusCode.UNAUTHENTICATED, "missing auth token")
            error = await raw_error(channel, "Info", "unary_unary", CORRUPT, metadata=(("authorization", "Bearer " + "t" * 32),))
            assert_status(error, INVALID, "not a valid protobuf message")
    finally:
        await server.stop(None)


def test_wrong_token_warnings_are_throttled(caplog):
    warn = ThrottledWarning(interval_s=0.2)
    with caplog.at_level(logging.WARNING, logger="verifier_worker.auth"):
        for _ in range(50):
            warn("rejected a call to %s with a wrong auth token", "/x")
        assert len(caplog.records) == 1
        time.sleep(0.25)
        warn("rejected a call to %s with a wrong auth token", "/x")
    assert len(caplog.records) == 2 and "and 49 more like it" in caplog.records[1].getMessage()


class OutOfVocabDrafter(LMDrafter):
    """Proposes an id the verifier does not have after `good` good blocks: a refusal in mid-session."""

    def __init__(self, model, good: int):
        super().__init__(model, "bad-draft")
        self.good = good

    def get_candidates(self, gamma):
        candidates = super().get_candidates(gamma)
        if self.good:
            self.good -= 1
            return candidates
        return Candidates([VOCAB + 5], None)


@pytest.mark.parametrize("when", ["open", "mid-session", "generate"])
async def test_clients_always_report_the_servers_own_status(verifier, when):
    """grpcio can turn a refusal into INTERNAL 'Internal error from Core' when the client writes while the server
    aborts; the client never does, so every run reports the server's status and message."""
    info = await fetch_info(verifier.stub)
    draft, _ = fake_pair(VOCAB)
    config = ClientConfig(timeout_s=TIMEOUT_S)
    for _ in range(20):
        with pytest.raises(VerifierError) as error:
            if when == "generate":
                await generate_baseline(verifier.stub, [1] * 9, GREEDY, config)
            elif when == "open":
                await speculate(verifier.stub, LMDrafter(draft, "d"), [1] * 9, GREEDY, 3, info, config)
            else:
                await speculate(verifier.stub, OutOfVocabDrafter(draft, good=2), [1, 2], GREEDY, 3, info, config)
        message = "draft_ids[0] = 37 is outside" if when == "mid-session" else "prompt has 9 tokens"
        assert error.value.code == "INVALID_ARGUMENT" and message in str(error.value), str(error.value)
    await wait_for_no_sessions(verifier)
