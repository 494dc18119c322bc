"""Issue 10: speculating without waiting on the network (draft_worker/loop.py, verifier_worker/session.py).

Drafting ahead and async mode keep greedy output token-identical to verifier-only, with the tiny seeded pair
at emulated round trips of 0 and 30 ms; sampling through either mode keeps the verifier's distribution (a
chi-square test on a 4-token vocabulary); in async mode the verifier never waits for the draft: with a draft
that proposes garbage, nothing, or arrives late, every engine step of the session decodes or verifies (counted,
not timed) and the output equals Generate's. Stale claims are dropped without compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import grpc
import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.delay import DelayProxy
from draft_worker.drafters import Candidates, LMDrafter, NgramDrafter
from draft_worker import loop as loop_module
from draft_worker.gamma import PROBE_COMMITS, FixedGamma, Link as _Link
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec, models
from specdec.config import SamplingParams, VerifierLimits
from specdec.sampling import logits_to_probs
from specdec.tiny import DEFAULT_TEXTS
from tests.stubs import FakeLM, chi_square_p_value, fake_pair

CPU = torch.device("cpu")


class SlowLM(FakeLM):
    """A FakeLM whose every forward takes `delay_s` longer: a verifier slow enough that drafts arrive in time."""

    def __init__(self, *args, delay_s: float = 0.005, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s

    def forward(self, *args, **kwargs):
        time.sleep(self.delay_s)
        return super().forward(*args, **kwargs)


@contextlib.asynccontextmanager
async def link(verifier, rtt_ms: float):
    """A stub to the verifier, through a userspace delay proxy when rtt_ms > 0."""
    async with contextlib.AsyncExitStack() as stack:
        address = verifier.address
        if rtt_ms:
            address = (await stack.enter_async_context(DelayProxy(address, rtt_ms))).address
        channel = grpc.aio.insecure_channel(address)
        stack.push_async_callback(channel.close)
        yield pb_grpc.VerifierStub(channel)


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    draft_dir, verifier_dir = tiny_dirs
    return (models.load_model(str(draft_dir), dtype=torch.float32, device=CPU),
            models.load_model(str(verifier_dir), dtype=torch.float32, device=CPU),
            models.load_tokenizer(str(verifier_dir)))


@pytest.mark.parametrize("rtt_ms", [0, pytest.param(30, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["ahead", "async"])
async def test_greedy_is_token_identical_to_verifier_only(tiny, start_verifier, mode, rtt_ms):
    draft, target, tokenizer = tiny
    verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target))
    params = SamplingParams(max_new_tokens=32)
    prompts = [tokenizer(text)["input_ids"] for text in [*DEFAULT_TEXTS[:2], "The"]]
    stale = used = 0
    async with link(verifier, rtt_ms) as stub:
        info = await fetch_info(stub)
        for prompt in prompts:
            baseline = await generate_baseline(stub, prompt, params)
            for drafter in (LMDrafter(draft, "tiny-draft"), NgramDrafter()):
                spec = await speculate(stub, drafter, prompt, params, 3, info, mode=mode)
                assert spec.token_ids == baseline.token_ids, (mode, rtt_ms, drafter.name)
                assert spec.finish_reason == "length" and spec.mode == mode
                stale, used = stale + spec.stale, used + spec.proposed
    if mode == "ahead":  # drafts were verified, not only decoded around, at any machine speed
        assert used > 0
        assert stale > 0  # blocks were drafted ahead, and the ones whose guess failed were answered stale
    # async verifies only the drafts that arrive before the verifier's step, which no machine speed
    # guarantees (over a link to this fast in-process verifier it may rightly withhold every claim as too
    # late): that it uses drafts at all is tests/test_client_loop.py's deterministic stub test


@pytest.mark.parametrize("mode", ["ahead", "async"])
async def test_a_perfect_draft_is_used_in_every_mode(start_verifier, mode):
    """Draft = verifier: drafting ahead never goes stale, and every mode accepts every token it verifies."""
    target = SlowLM(32, seed=5, delay_s=0.01)
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=40)
    baseline = await generate_baseline(verifier.stub, [1, 2], params)
    spec = await speculate(verifier.stub, LMDrafter(FakeLM(32, seed=5), "same"), [1, 2], params, 4, info, mode=mode)
    assert spec.token_ids == baseline.token_ids
    # every draft token verified is accepted; how many async verifies depends on the machine's speed (drafts
    # arriving before the verifier's steps), so only lock-step with drafting ahead guarantees a count
    assert spec.accepted == spec.proposed
    if mode == "async":  # and over a 30 ms link (3 verifier steps)
        async with link(verifier, 30) as stub:
            spec = await speculate(stub, LMDrafter(FakeLM(32, seed=5), "same"), [1, 2], params, 4, info, mode=mode)
        assert spec.token_ids == baseline.token_ids
        assert spec.accepted == spec.proposed
    if mode == "ahead":
        assert spec.accepted > 20
        assert spec.stale == 0 and spec.rounds == 8  # 8 blocks of 4 + bonus, each guessed right


@pytest.mark.slow  # 2,000 sessions per mode
@pytest.mark.parametrize("mode", ["ahead", "async"])
async def test_sampling_keeps_the_verifiers_distribution(start_verifier, mode):
    """The joint law of the first three tokens, 2,000 sessions (50 at a time) through the mode, equals the
    verifier's and clearly differs from the draft's. The verifier is slowed so that drafts are likely used:
    async then verifies the remainders of proposals whose first tokens matched the verifier's own decodes."""
    vocab, prompt, n = 4, [1, 2], 3
    target = SlowLM(vocab, seed=0, scale=1.0, delay_s=0.004)
    draft = FakeLM(vocab, seed=0, scale=1.0, noise=2.0)
    verifier = await start_verifier(target, vocab_size=vocab, limits=VerifierLimits(max_sessions_per_client=64))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(temperature=1.0)

    def joint(model, prefix: list[int], depth: int) -> torch.Tensor:  # [vocab ** depth]
        p = logits_to_probs(model._logits(prefix), params)
        if depth == 1:
            return p
        return torch.cat([p[a] * joint(model, [*prefix, a], depth - 1) for a in range(vocab)])

    async def one(seed: int) -> tuple[int, int, int]:
        result = await speculate(verifier.stub, LMDrafter(draft, "noisy"), prompt,
                                 SamplingParams(temperature=1.0, seed=seed, max_new_tokens=n + 1), 1, info, mode=mode)
        t = result.token_ids
        return (t[0] * vocab + t[1]) * vocab + t[2], result.proposed, result.accepted

    cells, proposed, accepted = [], 0, 0
    for batch in range(40):
        for cell, p, a in await asyncio.gather(*(one(batch * 50 + i) for i in range(50))):
            cells.append(cell)
            proposed, accepted = proposed + p, accepted + a
    # only what the mode guarantees at any machine speed: drafting ahead verifies every session's first block,
    # so drafts were verified, both ways; async verifies only the drafts that arrive before the verifier's
    # step, and how many do depends on the machine's speed (a slow one verified 164, not > 300)
    if mode == "ahead":
        assert proposed > 300 and 0 < accepted < proposed
    else:
        assert accepted <= proposed
    counts = torch.bincount(torch.tensor(cells), minlength=vocab**n)
    assert chi_square_p_value(counts, joint(target, prompt, n)) > 1e-4
    assert chi_square_p_value(counts, joint(draft, prompt, n)) < 1e-6


class GarbageDrafter(NgramDrafter):
    """Proposes random tokens."""

    def propose(self, context: list[int], gamma: int) -> Candidates:
        rng = random.Random(len(context))
        draft_ids = [rng.randrange(self.vocab_size) for _ in range(gamma)]
        return Candidates(draft_ids, None)


class SilentDrafter(NgramDrafter):
    """Proposes nothing, ever."""

    def propose(self, context: list[int], gamma: int) -> Candidates:
        return Candidates([], None)


class LateDrafter(LMDrafter):
    """A real draft, but every proposal takes 40 ms: always behind a verifier that steps in a few ms."""

    def propose(self, context: list[int], gamma: int) -> Candidates:
        time.sleep(0.04)
        return super().propose(context, gamma)


@pytest.mark.parametrize("kind", ["garbage", "silent", "late"])
async def test_async_verifier_never_waits_for_the_draft(start_verifier, kind):
    draft, target = fake_pair(vocab_size=32, noise=1.0)
    target = SlowLM(32, seed=0, delay_s=0.003)
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    engine = verifier.servicer.engine
    params = SamplingParams(max_new_tokens=30)
    drafter = {"garbage": GarbageDrafter(), "silent": SilentDrafter(), "late": LateDrafter(draft, "late")}[kind]
    baseline = await generate_baseline(verifier.stub, [3, 1, 4], params)
    before = engine.steps
    spec = await speculate(verifier.stub, drafter, [3, 1, 4], params, 4, info, mode="async")
    assert spec.token_ids == baseline.token_ids
    # one prefill step, then one commit per engine step: the engine never stepped without this session,
    # so it never waited for a proposal
    assert spec.rounds == engine.steps - before - 1
    assert sum(spec.batch_size) == spec.rounds  # alone in every step
    if kind == "garbage":  # its first token never matches the verifier's own decode: every claim is dropped
        assert len(spec.gamma_per_round) > 10 and spec.accepted == 0 and spec.rounds == 30
    if kind == "silent":
        assert spec.proposed == 0 and spec.rounds == 30  # the verifier decoded every token itself


async def _raw_session(stub, mode: int, prompt: list[int], params: SamplingParams):
    call = stub.Speculate()
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=prompt, params=codec.params_to_proto(params),
                                                             mode=mode)))
    assert (await call.read()).WhichOneof("kind") == "opened"
    return call


async def test_lockstep_answers_a_false_claim_stale_without_compute(start_verifier):
    _, target = fake_pair()
    verifier = await start_verifier(target, vocab_size=32)
    engine = verifier.servicer.engine
    params = SamplingParams(max_new_tokens=8)
    expected = (await generate_baseline(verifier.stub, [5, 6], params)).token_ids
    call = await _raw_session(verifier.stub, pb.SPECULATION_MODE_LOCKSTEP, [5, 6], params)
    before = engine.steps
    wrong = (expected[0] + 1) % 32
    for claim in ({"base_len": 0, "assumed_ids": [wrong], "draft_ids": [1]},  # assumes a token not committed
                  {"base_len": 3, "draft_ids": [1]}):  # extends a commit that does not exist
        await call.write(pb.SpeculateRequest(proposal=pb.Proposal(**claim)))
        verdict = (await call.read()).verdict
        assert verdict.stale and not verdict.HasField("next_token") and engine.steps == before
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=0, draft_ids=expected[:2])))
    verdict = (await call.read()).verdict
    assert not verdict.stale and verdict.num_accepted == 2 and verdict.next_token == expected[2]
    # a claim whose assumed tokens are exactly the commit: only its draft is verified
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=1, assumed_ids=expected[1:3], draft_ids=[expected[3]])))
    verdict = (await call.read()).verdict
    assert verdict.num_accepted == 1 and verdict.next_token == expected[4]
    assert verifier.servicer.metrics.stale._value.get() == 2
    call.cancel()


async def test_async_drops_stale_claims_and_refuses_malformed_ones(start_verifier):
    _, target = fake_pair()
    target = SlowLM(32, seed=0, delay_s=0.01)
    verifier = await start_verifier(target, vocab_size=32, limits=VerifierLimits(max_gamma=4))
    params = SamplingParams(max_new_tokens=12)
    expected = (await generate_baseline(verifier.stub, [5, 6], params)).token_ids
    call = await _raw_session(verifier.stub, pb.SPECULATION_MODE_ASYNC, [5, 6], params)
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=50, draft_ids=[1, 2])))  # beyond the commit
    got, stale = [], 0
    while True:
        commit = (await call.read()).commit
        assert commit.base_len == len(got)
        got += commit.token_ids
        stale = commit.stale
        if commit.finished:
            break
    assert got == expected and stale == 1

    call = await _raw_session(verifier.stub, pb.SPECULATION_MODE_ASYNC, [5, 6], params)
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=0, assumed_ids=[1] * 10, draft_ids=[1])))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        while True:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "assumes 10 tokens, over this verifier's limit of 9" in refused.value.details()


def test_drafters_sync_to_any_context():
    """`propose` crops the LM's cache to the prefix it shares with the context: drafting ahead on a guess
    and resyncing after a divergent commit give the same drafts as drafting from scratch."""
    params = SamplingParams(max_new_tokens=64)
    model = FakeLM(32, seed=3)
    drafter, fresh = LMDrafter(model, "d"), LMDrafter(model, "fresh")
    drafter.start([1, 2, 3], params, 32)
    ahead = drafter.propose([1, 2, 3, 7, 8], 4).draft_ids  # on a guess
    calls = model.forward_calls
    resynced = drafter.propose([1, 2, 3, 7, 9], 3).draft_ids  # the commit diverged at the last token
    assert model.forward_calls - calls == 3  # [9] then 2 more: the shared prefix was not evaluated again
    for context, got in (([1, 2, 3, 7, 8], ahead), ([1, 2, 3, 7, 9], resynced)):
        fresh.start(context, params, 32)
        assert fresh.propose(context, len(got)).draft_ids == got
    assert NgramDrafter.lookup([4, 5, 6, 4, 5], 2, 3, 1) == [6, 4]


def test_async_client_predicts_where_the_verifier_will_be():
    """A claim is sent only if it reaches past where the verifier will be when it arrives: one round trip of
    commits past the last commit seen, timed by the verifier's own clock (the commits' service_s)."""
    link = _Link(rtt_s=0.030)
    assert link.verifier_position(5) == 5  # no commit timed yet: send everything
    for _ in range(20):
        link.on_commit(1, 0.003)  # a fast verifier: one token per 3 ms
    assert link.verifier_position(5) == pytest.approx(15)  # 30 ms of 3 ms steps past the 5 seen
    link.on_commit(0, 0.5)  # a step that committed nothing (cannot happen, but must not divide by zero)
    for _ in range(40):
        link.on_commit(3, 0.060)  # a slow verifier that accepts drafts: 20 ms per token
    assert link.verifier_position(5) == pytest.approx(6.5, abs=0.01)


def test_async_client_drafts_no_chunk_its_drafting_would_make_late():
    """A chunk is drafted only if it still lands once drafted: its drafting time counts. A draft slower a token
    than the verifier's steps never gets ahead of them, so it drafts nothing but a probe every PROBE_COMMITS
    commits (which measures its drafting time again), and never one that could not land even drafted at once."""
    link = _Link(rtt_s=0.0)
    for _ in range(20):
        link.on_commit(1, 0.009)  # 9 ms a token
    assert link.worth_drafting(5, end=8, lead_s=3 * 0.001)  # 1 ms a token: lands 0.33 tokens past the commit
    assert link.drafted_at == 5
    assert not link.worth_drafting(6, end=9, lead_s=3 * 0.010)  # 10 ms a token: the verifier passes it first
    assert not link.worth_drafting(4 + PROBE_COMMITS, end=7 + PROBE_COMMITS, lead_s=0.030)
    assert link.worth_drafting(5 + PROBE_COMMITS, end=8 + PROBE_COMMITS, lead_s=0.030)  # the probe
    assert link.drafted_at == 5 + PROBE_COMMITS
    assert not link.worth_drafting(6 + PROBE_COMMITS, end=9 + PROBE_COMMITS, lead_s=0.030)  # the next waits again
    link = _Link(rtt_s=0.100)  # 11 commits per round trip: nothing within 3 tokens lands, probe or not
    for _ in range(20):
        link.on_commit(1, 0.009)
    assert not link.worth_drafting(100, end=103, lead_s=0.0)


class ChargedGamma(FixedGamma):
    """A fixed gamma that records what every update charges it: (draft tokens verified, draft seconds)."""

    def __init__(self, gamma: int, max_gamma: int):
        super().__init__(gamma, max_gamma)
        self.charged: list[tuple[int, float]] = []

    def update(self, proposed: int, accepted: int, *, draft_s: float, **_) -> None:
        self.charged.append((proposed, draft_s))


class SlowLMDrafter(LMDrafter):
    def propose(self, context: list[int], gamma: int):
        time.sleep(0.002 * gamma)  # a draft that takes time, so what each chunk cost is measured
        return super().propose(context, gamma)


async def test_async_charges_every_chunk_since_the_last_verified_draft(start_verifier, monkeypatch):
    """Async: a chunk a commit contradicts or passes is never verified, yet it was drafted. The next commit that
    verifies a draft is charged all the drafting since the last one, so a drafter whose chunks mostly go unverified
    looks as dear as it is (4 LM sessions of the tiny pair: 6-14 of ~180 tokens drafted a level were verified).
    Every chunk here is booked at 1 ms a token (`timed` patched: the charge is exact, whatever this machine's load):
    charged by the last chunk's time a token, as before, a commit costs exactly its verified tokens' 1 ms; charged
    the chunks since the last verified draft, one that follows a chunk drafted on a wrong guess costs more (and
    its verified tokens may have been charged before it, with an earlier commit: only the sum is conserved)."""
    timed, drafted = loop_module.timed, []

    def booked(fn, *args):
        candidates, _ = timed(fn, *args)
        drafted.append(len(candidates.draft_ids))
        return candidates, 0.001 * len(candidates.draft_ids)

    monkeypatch.setattr(loop_module, "timed", booked)
    draft, _ = fake_pair(vocab_size=32, noise=0.5)
    verifier = await start_verifier(SlowLM(32, seed=0, delay_s=0.015), vocab_size=32)  # fake_pair's target, slower
    params = SamplingParams(max_new_tokens=24)
    schedule = ChargedGamma(2, 8)
    async with link(verifier, 0) as stub:
        info = await fetch_info(stub)
        baseline = await generate_baseline(stub, [1, 2], params)
        spec = await speculate(stub, SlowLMDrafter(draft, "lm"), [1, 2], params, schedule, info, mode="async")
    assert spec.token_ids == baseline.token_ids
    verified = [(n, s) for n, s in schedule.charged if n]
    assert any(s > 0.001 * n + 1e-9 for n, s in verified)  # the unverified chunks before it too
    assert sum(s for _, s in verified) <= 0.001 * sum(drafted[1:]) + 1e-9  # none twice (the opening's apart)


async def test_async_client_withholds_claims_that_would_arrive_too_late(start_verifier):
    """A verifier stepping in ~3 ms behind a 100 ms link commits ~30 tokens per round trip, more than the
    client's 2 gamma + 1 lookahead: past the opening, no claim could land, so the client neither drafts nor
    sends them (`unsent`), and the output is still Generate's."""
    target = SlowLM(32, seed=0, delay_s=0.003)
    verifier = await start_verifier(target, vocab_size=32)
    params = SamplingParams(max_new_tokens=40)
    async with link(verifier, 100) as stub:
        info = await fetch_info(stub)
        baseline = await generate_baseline(stub, [1, 2], params)
        spec = await speculate(stub, GarbageDrafter(), [1, 2], params, 3, info, mode="async")
    assert spec.token_ids == baseline.token_ids
    assert spec.unsent > 0
