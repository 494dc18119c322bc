"""Bad requests over real gRPC get the right status code and an actionable message, and only their own stream
ends: after each one (and alongside one) a good session still runs on the same verifier."""

from __future__ import annotations

import asyncio
import contextlib
import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from draft_worker.client import speculate
from draft_worker.drafters import LMDrafter
from draft_worker.transport import ClientConfig, fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import SamplingParams, VerifierLimits
from tests.stubs import FakeLM, GatedLM, fake_pair, wait_for

VOCAB = 32
TIMEOUT_S = 10
LIMITS = VerifierLimits(max_gamma=4, max_prompt_tokens=8, max_new_tokens=64)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
GREEDY = SamplingParams(max_new_tokens=8)
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=8)


@pytest.fixture
async def verifier(start_verifier):
    return await start_verifier(FakeLM(VOCAB, seed=0), vocab_size=VOCAB, limits=LIMITS)


def open_request(prompt_ids=(1, 2, 3), fingerprint: str = "", client: str = "", **params) -> pb.SpeculateRequest:
    msg = pb.SamplingParams(max_new_tokens=8, **params)
    return pb.SpeculateRequest(
        open=pb.OpenSession(prompt_ids=list(prompt_ids), params=msg, tokenizer_fingerprint=fingerprint, client_model_id=client)
    )


def proposal_request(draft_ids, **probs) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(proposal=pb.Proposal(draft_ids=draft_ids, **probs))


async def speculate_error(stub, *requests: pb.SpeculateRequest) -> grpc.aio.AioRpcError:
    """Send requests on one Speculate stream and return the error that ends it (fails if none does).

    Each request's reply is read before the next write, as the client does: a write that races the
    server's abort makes grpcio report INTERNAL instead of the server's status."""
    call = stub.Speculate(timeout=TIMEOUT_S)
    try:
        for request in requests:
            await call.write(request)
            if await call.read() is grpc.aio.EOF:  # one reply per request; a refusal raises here
                break
        else:
            await call.done_writing()
            await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc
    pytest.fail(f"the stream ended with {await call.code()} instead of an error")


async def wait_for_no_sessions(verifier) -> None:
    for _ in range(200):  # <= 2 s
        if verifier.servicer.active_sessions == 0:
            return
        await asyncio.sleep(0.01)
    assert verifier.servicer.active_sessions == 0


async def good_session(verifier, params: SamplingParams = SamplingParams(temperature=0.8, seed=3, max_new_tokens=12)):
    """A normal speculative session on the same verifier; it must still work."""
    info = await fetch_info(verifier.stub)
    draft, _ = fake_pair(VOCAB)
    result = await speculate(
        verifier.stub, LMDrafter(draft, "fake-draft"), [4, 5, 6], params, 3, info, ClientConfig(timeout_s=TIMEOUT_S)
    )
    assert len(result.token_ids) == params.max_new_tokens and result.finish_reason == "length"


def assert_status(error: grpc.aio.AioRpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    for fragment in fragments:
        assert fragment in error.details(), (fragment, error.details())


# ------------------------------------------------------------------------------------------ the opening message
BAD_OPENS = {
    "empty prompt": (dict(prompt_ids=[]), "prompt_ids is empty"),
    "prompt too long": (dict(prompt_ids=list(range(9))), "prompt has 9 tokens, over this verifier's limit of 8"),
    "prompt id out of vocab": (dict(prompt_ids=[1, 32]), "prompt_ids[1] = 32 is outside the verifier's vocabulary [0, 32)"),
    "negative prompt id": (dict(prompt_ids=[-1]), "prompt_ids[0] = -1 is outside"),
    "negative temperature": (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
    "NaN temperature": (dict(temperature=math.nan), "temperature must be a finite number >= 0, got nan"),
    "top_p over 1": (dict(temperature=1.0, top_p=1.5), "top_p must be in [0, 1] (0 or 1 = off), got 1.5"),
    "negative top_p": (dict(temperature=1.0, top_p=-0.5), "top_p must be in [0, 1]"),
    "max_new_tokens 0": (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    "max_new_tokens over limit": (dict(max_new_tokens=65), "max_new_tokens 65 is over this verifier's limit of 64"),
    "stop id out of vocab": (dict(stop_token_ids=[40]), "stop_token_ids[0] = 40 is outside the verifier's vocabulary"),
}


@pytest.mark.parametrize("case", BAD_OPENS)
async def test_bad_open_is_invalid_argument(verifier, case):
    fields, message = BAD_OPENS[case]
    fields = dict(fields)
    prompt_ids = fields.pop("prompt_ids", [1, 2, 3])
    request = open_request(prompt_ids)
    request.open.params.MergeFrom(pb.SamplingParams(**fields))
    if "max_new_tokens" in fields:
        request.open.params.max_new_tokens = fields["max_new_tokens"]
    error = await speculate_error(verifier.stub, request, proposal_request([]))
    assert_status(error, INVALID, message)
    await wait_for_no_sessions(verifier)
    await good_session(verifier)


async def test_first_message_must_be_open(verifier):
    error = await speculate_error(verifier.stub, proposal_request([1, 2]))
    assert_status(error, PRECONDITION, "first message of a Speculate stream must be `open`")
    await good_session(verifier)


async def test_second_open_is_refused(verifier):
    error = await speculate_error(verifier.stub, open_request(), open_request())
    assert_status(error, PRECONDITION, "already open")
    await wait_for_no_sessions(verifier)
    await good_session(verifier)


async def test_tokenizer_mismatch_names_both_models(start_verifier):
    verifier = await start_verifier(FakeLM(VOCAB), vocab_size=VOCAB, fingerprint="fp-verifier", limits=LIMITS)
    error = await speculate_error(verifier.stub, open_request(fingerprint="fp-other", client="my-draft-model"))
    assert_status(error, PRECONDITION, "tokenizer mismatch", "my-draft-model", "fake-verifier")
    # the matching fingerprint (and an empty one, which skips the check) open fine
    for fingerprint in ("fp-verifier", ""):
        call = verifier.stub.Speculate(timeout=TIMEOUT_S)
        await call.write(open_request(fingerprint=fingerprint))
        assert (await call.read()).WhichOneof("kind") == "opened"
        call.cancel()
    await wait_for_no_sessions(verifier)


# ------------------------------------------------------------------------------------------------- proposals
def dense_probs(values, vocab_size: int = VOCAB) -> dict:
    data = np.asarray(values, dtype=np.float16).tobytes()
    return {"dense": pb.DenseProbs(dtype=pb.PROB_DTYPE_FLOAT16, vocab_size=vocab_size, data=data)}


def sparse_probs(ids, probs) -> dict:
    return {"sparse": pb.SparseProbs(rows=[pb.SparseRow(ids=ids, probs=probs)])}


UNIFORM = [1 / VOCAB] * VOCAB
BAD_PROPOSALS = {
    "draft id out of vocab": ({}, proposal_request([1, 40]), "draft_ids[1] = 40 is outside the verifier's vocabulary [0, 32)"),
    "gamma over max_gamma": ({}, proposal_request([1] * 5), "5 draft tokens, over this verifier's max_gamma of 4"),
    "sampling without probs": (dict(temperature=1.0), proposal_request([1, 2]), "needs the draft probabilities"),
    "NaN probs": (dict(temperature=1.0), proposal_request([1], **sparse_probs([1, 2], [math.nan, 1.0])), "NaN"),
    "negative probs": (dict(temperature=1.0), proposal_request([1], **sparse_probs([1, 2], [-0.5, 1.5])), "negative"),
    "dense wrong length": (
        dict(temperature=1.0),
        proposal_request([1, 2], **dense_probs(UNIFORM)),
        "dense probabilities hold 64 bytes, expected 128 for [2, 32]",
    ),
    "dense wrong vocab": (
        dict(temperature=1.0),
        proposal_request([1], **dense_probs(UNIFORM + UNIFORM, vocab_size=64)),
        "vocab_size 64, the verifier's is 32",
    ),
}


@pytest.mark.parametrize("case", BAD_PROPOSALS)
async def test_bad_proposal_is_invalid_argument(verifier, case):
    params, proposal, message = BAD_PROPOSALS[case]
    error = await speculate_error(verifier.stub, open_request(**params), proposal)
    assert_status(error, INVALID, message)
    await wait_for_no_sessions(verifier)  # the session that was open released its slot
    await good_session(verifier)


async def test_bad_session_next_to_a_good_one(verifier):
    good = [good_session(verifier, SamplingParams(temperature=t, seed=1, max_new_tokens=24)) for t in (0.0, 1.0)]
    bad = speculate_error(verifier.stub, open_request(temperature=1.0), proposal_request([1, 2]))
    *_, error = await asyncio.wait_for(asyncio.gather(*good, bad), TIMEOUT_S)
    assert_status(error, INVALID, "needs the draft probabilities")
    await wait_for_no_sessions(verifier)


# ------------------------------------------------------------------------------------------- sessions, Generate
async def test_too_many_sessions_is_resource_exhausted(start_verifier):
    verifier = await start_verifier(FakeLM(VOCAB), vocab_size=VOCAB, limits=VerifierLimits(max_sessions=1))
    first = verifier.stub.Speculate(timeout=TIMEOUT_S)
    await first.write(open_request())
    assert (await first.read()).WhichOneof("kind") == "opened"
    error = await speculate_error(verifier.stub, open_request())
    assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 1 concurrent sessions", "retry later")
    request = pb.GenerateRequest(prompt_ids=[1], params=codec.params_to_proto(GREEDY))
    with pytest.raises(grpc.aio.AioRpcError) as generate_error:
        async for _ in verifier.stub.Generate(request, timeout=TIMEOUT_S):
            pass
    assert generate_error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the first session is unaffected: finish it with plain decoding steps
    for _ in range(GREEDY.max_new_tokens):  # one token per empty proposal
        await first.write(proposal_request([]))
        if (await first.read()).verdict.finished:
            break
    assert await first.read() is grpc.aio.EOF and await first.code() == grpc.StatusCode.OK
    await wait_for_no_sessions(verifier)
    await good_session(verifier)


async def test_cancelled_session_frees_its_slot(start_verifier):
    verifier = await start_verifier(FakeLM(VOCAB), vocab_size=VOCAB, limits=VerifierLimits(max_sessions=1))
    call = verifier.stub.Speculate(timeout=TIMEOUT_S)
    await call.write(open_request(temperature=1.0))
    assert (await call.read()).WhichOneof("kind") == "opened"
    await call.write(proposal_request([]))  # mid-session: one round done
    assert (await call.read()).WhichOneof("kind") == "verdict"
    assert verifier.servicer.active_sessions == 1
    call.cancel()
    await wait_for_no_sessions(verifier)
    await good_session(verifier)  # max_sessions = 1: only possible if the slot came back


async def test_client_closing_early_frees_its_slot(verifier):
    call = verifier.stub.Speculate(timeout=TIMEOUT_S)
    await call.write(open_request())
    assert (await call.read()).WhichOneof("kind") == "opened"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    await wait_for_no_sessions(verifier)


ASYNC_REFUSALS = {  # what an async session's client may not send mid-session: (message, status, fragment)
    "a second open": (open_request(), PRECONDITION, "already open"),
    "a bad proposal": (proposal_request([1, 40]), INVALID, "draft_ids[1] = 40 is outside"),
    "a malformed shadow verdict": (pb.SpeculateRequest(shadow=pb.ShadowVerdict(gamma=9, drafted=1)), INVALID,
                                   "gamma must be in [1, 4]"),
    "its side closed": (None, grpc.StatusCode.OK, ""),
}


@pytest.mark.parametrize("case", ASYNC_REFUSALS)
async def test_async_session_ends_on_what_its_client_sends(start_verifier, case):
    """Async: the handler streams commits while another task takes the client's messages. A message it may not send
    ends its own stream with its status, and a client closing its side ends the session, while a step is still in
    flight (a CPU verifier's take seconds); the slot comes back."""
    model = GatedLM(VOCAB)
    model.gate.set()
    verifier = await start_verifier(model, vocab_size=VOCAB,
                                    limits=VerifierLimits(max_gamma=4, max_new_tokens=1000, max_sessions=1))
    request, code, fragment = ASYNC_REFUSALS[case]
    call = verifier.stub.Speculate(timeout=TIMEOUT_S)
    params = pb.SamplingParams(max_new_tokens=1000)
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=params,
                                                             mode=pb.SPECULATION_MODE_ASYNC)))
    assert (await call.read()).WhichOneof("kind") == "opened"
    model.gate.clear()
    model.entered.clear()
    try:
        await wait_for(model.entered)  # a step is in flight, and none finishes until the gate opens
        await (call.write(request) if request is not None else call.done_writing())
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (reply := await call.read()) is not grpc.aio.EOF:  # the commits of the steps before the gate
                assert reply.commit.token_ids and not reply.commit.finished
        assert await call.code() == code and fragment in await call.details(), (await call.code(), await call.details())
    finally:
        model.gate.set()
    await wait_for_no_sessions(verifier)
    await good_session(verifier)  # max_sessions = 1: only possible if the slot came back


async def test_a_failure_taking_an_async_chunk_ends_only_its_stream(start_verifier, monkeypatch):
    """A bug in the task that takes an async session's chunks ends that stream with INTERNAL and its message (never a
    hang: the handler awaits the engine's step, which the task cancels), and the verifier serves on."""
    from verifier_worker.session import VerifierSession

    def broken(self, claim, max_ahead):
        raise RuntimeError("offer broke")

    monkeypatch.setattr(VerifierSession, "offer", broken)
    model = GatedLM(VOCAB)
    model.gate.set()
    verifier = await start_verifier(model, vocab_size=VOCAB, limits=VerifierLimits(max_gamma=4, max_new_tokens=1000))
    call = verifier.stub.Speculate(timeout=TIMEOUT_S)
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=pb.SamplingParams(max_new_tokens=1000),
                                                             mode=pb.SPECULATION_MODE_ASYNC)))
    assert (await call.read()).WhichOneof("kind") == "opened"
    model.gate.clear()
    model.entered.clear()
    try:
        await wait_for(model.entered)  # the session cannot finish before the chunk is taken
        await call.write(proposal_request([1, 2]))
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass
        assert await call.code() == grpc.StatusCode.INTERNAL and "offer broke" in await call.details()
    finally:
        model.gate.set()
    await wait_for_no_sessions(verifier)
    await good_session(verifier)


@pytest.mark.parametrize(
    "prompt_ids, params, message",
    [
        ([], GREEDY, "prompt_ids is empty"),
        ([1, 99], GREEDY, "prompt_ids[1] = 99 is outside"),
        ([1], SamplingParams(temperature=-2.0), "temperature must be a finite number >= 0"),
        ([1], SamplingParams(max_new_tokens=1000), "over this verifier's limit of 64"),
    ],
)
async def test_bad_generate_is_invalid_argument(verifier, prompt_ids, params, message):
    request = pb.GenerateRequest(prompt_ids=prompt_ids, params=codec.params_to_proto(params))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in verifier.stub.Generate(request, timeout=TIMEOUT_S):
            pass
    assert_status(error.value, INVALID, message)
    await good_session(verifier)


async def test_generate_with_sampling(verifier):
    """Verifier-only sampling: every step is a block with no draft (gamma = 0, no q)."""
    params = SamplingParams(temperature=1.0, top_k=8, seed=5, max_new_tokens=10)
    request = pb.GenerateRequest(prompt_ids=[1, 2], params=codec.params_to_proto(params))
    tokens = [t async for reply in verifier.stub.Generate(request, timeout=TIMEOUT_S) for t in reply.token_ids]
    again = [t async for reply in verifier.stub.Generate(request, timeout=TIMEOUT_S) for t in reply.token_ids]
    assert len(tokens) == 10 and tokens == again  # seeded: reproducible


# ---------------------------------------------------------------------------------------- health, reflection
async def test_health_reports_serving(verifier):
    health = health_pb2_grpc.HealthStub(verifier.channel)
    for service in ("", "specdec.v1.Verifier"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT_S)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_verifier(verifier):
    stub = reflection_pb2_grpc.ServerReflectionStub(verifier.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S)
    replies = [reply async for reply in call]
    names = {service.name for service in replies[0].list_services_response.service}
    assert {"specdec.v1.Verifier", "grpc.health.v1.Health"} <= names
