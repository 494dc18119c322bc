"""Property-based fuzzing (hypothesis) of every message and stream ordering against the real server on the tiny
Qwen2 pair: every answer is a deliberate status code, never UNKNOWN, INTERNAL or a hang, and a canary session
still gives the verifier's greedy output afterwards. The fast tier tries a bounded number of examples; the
`slow` one many more."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.transport import ClientConfig, fetch_info, open_channel
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams, VerifierLimits
from verifier_worker.listen import start_server
from verifier_worker.server import ModelInfo, VerifierServicer

LIMITS = VerifierLimits(max_gamma=4, max_prompt_tokens=16, max_new_tokens=8, max_sessions=8, idle_timeout_s=5)
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
CALL_TIMEOUT_S = 10  # a hang fails the example at this deadline (DEADLINE_EXCEEDED is not deliberate here)
TRIED = {"inputs": 0}  # examples run, reported by the test (README's reliability table)


class Fuzzed:
    """A real verifier on the tiny pair in its own event loop, which every example runs in."""

    def __init__(self, tiny_dirs):
        draft_dir, verifier_dir = tiny_dirs
        cpu = torch.device("cpu")
        self.draft = models.load_model(str(draft_dir), dtype=torch.float32, device=cpu)
        target = models.load_model(str(verifier_dir), dtype=torch.float32, device=cpu)
        self.vocab = models.model_vocab_size(target)
        self.loop = asyncio.new_event_loop()
        info = ModelInfo("tiny-verifier", self.vocab, "fp-tiny", "float32", "cpu")
        self.servicer = VerifierServicer(target, info, LIMITS)
        self.server, port = self.run(start_server(self.servicer, "127.0.0.1", 0))
        self.channel = self.run(self._channel(f"127.0.0.1:{port}"))

    @staticmethod
    async def _channel(address: str) -> grpc.aio.Channel:  # created inside the loop it will run in
        return open_channel(address)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self):
        self.run(self.channel.close())
        self.run(self.server.stop(None))
        self.loop.close()


@pytest.fixture(scope="module")
def fuzzed(tiny_dirs):
    target = Fuzzed(tiny_dirs)
    yield target
    target.close()


# ------------------------------------------------------------------------------------------------ strategies
VOCAB_GUESS = 600  # ids around the tiny vocabulary's edge (its size is checked in the test)
ids = st.lists(st.integers(-3, VOCAB_GUESS), max_size=20)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1e-38, 1e-5, 1.0]))
params = st.builds(pb.SamplingParams, temperature=floats, top_k=st.integers(0, 2**32 - 1), top_p=floats,
                   max_new_tokens=st.integers(0, 12), stop_token_ids=st.lists(st.integers(-2, VOCAB_GUESS), max_size=70),
                   seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
opening = st.builds(pb.OpenSession, prompt_ids=ids, params=params, tokenizer_fingerprint=st.sampled_from(["", "fp-tiny", "x"]),
                    client_model_id=st.text(max_size=8), mode=st.sampled_from([pb.SPECULATION_MODE_LOCKSTEP,
                                                                               pb.SPECULATION_MODE_ASYNC]))
sparse = st.builds(pb.SparseProbs, rows=st.lists(st.builds(pb.SparseRow, ids=ids, probs=st.lists(floats, max_size=20)), max_size=5))
dense = st.builds(pb.DenseProbs, dtype=st.integers(0, 3), vocab_size=st.integers(0, 2 * VOCAB_GUESS),
                  data=st.binary(max_size=4 * 5 * VOCAB_GUESS))
proposal = st.one_of(st.builds(pb.Proposal, draft_ids=st.lists(st.integers(-3, VOCAB_GUESS), max_size=6)),
                     st.builds(pb.Proposal, draft_ids=st.lists(st.integers(-3, VOCAB_GUESS), max_size=6), sparse=sparse),
                     st.builds(pb.Proposal, draft_ids=st.lists(st.integers(-3, VOCAB_GUESS), max_size=6), dense=dense))
message = st.one_of(st.builds(pb.SpeculateRequest, open=opening).map(pb.SpeculateRequest.SerializeToString),
                    st.builds(pb.SpeculateRequest, proposal=proposal).map(pb.SpeculateRequest.SerializeToString),
                    st.binary(max_size=64))  # raw bytes: usually corrupt, sometimes a valid message by chance
step = st.one_of(message, st.sampled_from(["half-close", "cancel"]))
stream = st.lists(step, min_size=1, max_size=5)
unary = st.tuples(st.sampled_from(["Info", "Generate"]),
                  st.one_of(st.binary(max_size=64), st.builds(pb.GenerateRequest, prompt_ids=ids, params=params)
                            .map(pb.GenerateRequest.SerializeToString)))


# ------------------------------------------------------------------------------------------------ one example
async def play_stream(channel, steps) -> grpc.StatusCode:
    """Play one Speculate stream as raw bytes, reading the reply to every message; -> its final status."""
    call = channel.stream_stream("/specdec.v1.Verifier/Speculate")(timeout=CALL_TIMEOUT_S)
    try:
        for item in steps:
            if item == "cancel":
                call.cancel()
                return grpc.StatusCode.OK  # our own cancellation: nothing for the server to answer
            if item == "half-close":
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
                break
            await call.write(item)
            if await call.read() is grpc.aio.EOF:
                break
        else:
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass
    return await call.code()


async def play_unary(channel, method: str, body: bytes) -> grpc.StatusCode:
    kind = "unary_unary" if method == "Info" else "unary_stream"
    call = getattr(channel, kind)(f"/specdec.v1.Verifier/{method}")(body, timeout=CALL_TIMEOUT_S)
    try:
        if method == "Info":
            await call
        else:
            async for _ in call:
                pass
    except grpc.aio.AioRpcError:
        pass
    return await call.code()


def check(fuzzed: Fuzzed, play) -> None:
    TRIED["inputs"] += 1
    code = fuzzed.run(asyncio.wait_for(play, CALL_TIMEOUT_S + 5))
    assert code in DELIBERATE, code


def canary(fuzzed: Fuzzed) -> None:
    """After the fuzzing: no session is left, and a good session gives the verifier's greedy output."""
    async def run():
        for _ in range(500):  # the server frees a slot just after a stream ends
            if fuzzed.servicer.active_sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert fuzzed.servicer.active_sessions == 0 and fuzzed.servicer.sessions_by_client == {}
        stub = pb_grpc.VerifierStub(fuzzed.channel)
        info = await fetch_info(stub)
        params = SamplingParams(max_new_tokens=8)
        config = ClientConfig(timeout_s=30)
        expected = await generate_baseline(stub, [1, 2, 3], params, config)
        spec = await speculate(stub, LMDrafter(fuzzed.draft, "tiny-draft"), [1, 2, 3], params, 3, info, config)
        assert spec.token_ids == expected.token_ids and len(expected.token_ids) == 8
    fuzzed.run(run())


def fuzz(fuzzed: Fuzzed, examples: int) -> None:
    assert fuzzed.vocab < VOCAB_GUESS, "ids must reach past the tiny vocabulary"
    common = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(stream)
    def streams(steps):
        check(fuzzed, play_stream(fuzzed.channel, steps))

    @common
    @given(unary)
    def unaries(call):
        check(fuzzed, play_unary(fuzzed.channel, *call))

    streams()
    unaries()
    canary(fuzzed)


def test_fuzz_every_message_and_ordering(fuzzed):
    fuzz(fuzzed, examples=40)


@pytest.mark.slow
def test_fuzz_every_message_and_ordering_longer(fuzzed):
    before = TRIED["inputs"]
    fuzz(fuzzed, examples=600)
    print(f"fuzz: {TRIED['inputs'] - before} inputs tried, every answer deliberate, canary ok")
