"""Issue 18: a lock-step session at draft budget 0 is decoded by the verifier on its own (OpenSession.server_decodes),
one Commit per engine step and no round trip between two tokens, until a reply grants a budget again.

- The CLI's client in lock-step under a budget of 0: greedy equals verifier-only, and it sends no proposal at all
  (`opened` granted 0: the verifier's turn starts with the first token); every token arrives in a commit.
- Under budgets that switch between 0 and 3 at random every step (the turn passes back and forth): greedy equals
  verifier-only, and the client sends fewer proposals than it gets replies. The chi-square test of
  test_budget_wiring.py runs lock-step under the same random budgets, so sampling is covered there.
- Raw streams: the verifier says it honours the request; a proposal during its turn ends the stream with
  FAILED_PRECONDITION; a client that half-closes during its turn ends the session (nothing left open).
- A client whose own gamma is 0 under a budget above 0 hands the turn over itself (Proposal.decode_alone): the
  verifier decodes that many steps and then waits; the client's schedule prices gamma 0 without the round trip.
- A verifier that does not echo it (an older one) gets empty proposals: test_budget_wiring's stub.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.gamma import AutoGamma, RttGamma
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import SamplingParams, VerifierLimits
from specdec.gamma import choose_gamma
from tests.stubs import FakeLM, fake_pair
from verifier_worker.budgeting import DraftBudgeter
from verifier_worker.engine import Engine
from tests.test_budget_wiring import FixedBudgeter, RandomBudgeter, _use

LONG = VerifierLimits().max_new_tokens  # a session long enough never to finish while a test acts on it


async def test_at_budget_zero_lockstep_sends_no_proposal_and_equals_verifier_only(start_verifier):
    draft, target = fake_pair(vocab_size=32, noise=1.0)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    _use(verifier, FixedBudgeter(0, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=20)
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    spec = await speculate(verifier.stub, LMDrafter(draft, "d"), [1, 2, 3], params, AutoGamma(), info, mode="lockstep")
    assert spec.token_ids == baseline.token_ids
    assert spec.gamma_per_round == []  # the block drafted during the prefill was dropped: `opened` granted 0
    assert spec.rounds == 20 and spec.proposed == 0 and spec.rtt_s == []


@pytest.mark.parametrize("seed", [0, 1])
async def test_the_turn_passes_back_and_forth_and_greedy_stays_verifier_only(start_verifier, seed):
    draft, target = fake_pair(vocab_size=32, noise=0.5)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    _use(verifier, RandomBudgeter(seed, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=40)
    prompts = [[1, 2, 3], [7, 7, 7, 7], list(range(12))]
    baselines = [await generate_baseline(verifier.stub, p, params) for p in prompts]
    results = await asyncio.gather(*(speculate(verifier.stub, LMDrafter(draft, "d"), p, params, AutoGamma(2), info,
                                               mode="lockstep") for p in prompts))
    for spec, baseline in zip(results, baselines):
        assert spec.token_ids == baseline.token_ids
        assert 1 <= len(spec.gamma_per_round) < spec.rounds  # some tokens came without a proposal
    assert sum(r.proposed for r in results) > 0  # and some blocks carried drafts


class ScriptedBudgeter(DraftBudgeter):
    """Grants the budgets of a script, one a step (its last one from then on)."""

    def __init__(self, script: list[int], **kwargs):
        super().__init__(**kwargs)
        self.script = script

    def budget_for(self, key, *args, **kwargs) -> int:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


async def test_each_reply_says_the_budget_granted_with_its_own_answer():
    """The engine queues the verifier's next step as it answers and may run it, and grant again, before the server
    replies to the answer before (a busy event loop). A reply saying the latest grant handed the client its turn while
    the engine still held the verifier's: its proposal met a Commit ("session out of step", seen in 1 of ~10 runs of
    the chi-square test beside other work). Here the server is as late as it gets: it replies after all three."""
    engine = Engine(FakeLM(32), batch_wait_s=0.0, budgeter=ScriptedBudgeter([0, 0, 3], max_gamma=4))
    session = engine.open([1, 2, 3], SamplingParams(max_new_tokens=16))
    session.server_decodes = True
    await engine.prefill(session)  # granted 0: the verifier's turn, its step queued with the answer
    await engine.verifiers_step(session)  # granted 0 again: another one queued
    await engine.verifiers_step(session)  # granted 3: the client's turn
    assert engine.verifiers_step(session) is None and session.budget == 3
    assert [session.answer_budget() for _ in range(3)] == [0, 0, 3]  # opened, commit, commit: each its own
    assert session.answer_budget() == 3  # nothing left unreplied: the latest grant (a stale verdict's)
    engine.close(session)


async def _opened_in_the_verifiers_turn(verifier, max_new_tokens: int = LONG):
    """A raw lock-step stream asking for server_decodes under a budget of 0: its turn starts after the prefill."""
    call = verifier.stub.Speculate()
    params = SamplingParams(max_new_tokens=max_new_tokens)
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=codec.params_to_proto(params),
                                                             server_decodes=True)))
    opened = (await call.read()).opened
    assert opened.server_decodes and opened.draft_budget == 0
    for base_len in (0, 1):  # the verifier's turn from the first token: it decodes without a proposal
        commit = (await call.read()).commit
        assert commit.base_len == base_len and len(commit.token_ids) == 1 and commit.verified == 0
        assert commit.draft_budget == 0 and not commit.finished
    return call


async def test_a_proposal_during_the_verifiers_turn_is_a_clear_error(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    _use(verifier, FixedBudgeter(0, max_gamma=16))
    call = await _opened_in_the_verifiers_turn(verifier)
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=2)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        for _ in range(LONG):
            assert (await call.read()).WhichOneof("kind") == "commit"
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "budget of 0" in err.value.details()


async def test_a_client_that_leaves_during_the_verifiers_turn_ends_its_session(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    _use(verifier, FixedBudgeter(0, max_gamma=16))
    call = await _opened_in_the_verifiers_turn(verifier)
    await call.done_writing()
    commits = 0
    while (reply := await call.read()) is not grpc.aio.EOF:
        assert not reply.commit.finished  # ended by the client, long before max_new_tokens
        commits += 1
    assert commits < LONG - 2
    assert verifier.servicer.active_sessions == 0 and verifier.servicer.engine.stats().queued == 0  # its step dropped


async def test_the_request_is_honoured_only_in_lockstep_with_a_budget(start_verifier):
    """Async already decodes on its own; without a budgeter the budget is never 0."""
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, limits=VerifierLimits(draft_budget=False))
    params = codec.params_to_proto(SamplingParams(max_new_tokens=4))
    for mode in (pb.SPECULATION_MODE_LOCKSTEP, pb.SPECULATION_MODE_ASYNC):
        call = verifier.stub.Speculate()
        await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=params, mode=mode,
                                                                 server_decodes=True)))
        assert not (await call.read()).opened.server_decodes
        call.cancel()


async def test_a_proposal_asking_decode_alone_gets_that_many_commits_then_the_turn_back(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    _use(verifier, FixedBudgeter(2, max_gamma=16))
    params = SamplingParams(max_new_tokens=20)
    expected = (await generate_baseline(verifier.stub, [1, 2], params)).token_ids
    call = verifier.stub.Speculate()
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=codec.params_to_proto(params),
                                                             server_decodes=True)))
    assert (await call.read()).opened.server_decodes
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=0, decode_alone=3)))
    assert (await call.read()).verdict.next_token == expected[0]
    commits = [(await call.read()).commit for _ in range(3)]
    assert [c.token_ids[0] for c in commits] == expected[1:4] and commits[-1].draft_budget == 2
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=4, draft_ids=expected[4:6])))  # its turn again
    verdict = (await call.read()).verdict
    assert verdict.num_accepted == 2 and verdict.next_token == expected[6]
    call.cancel()


async def test_a_client_that_never_drafts_hands_the_whole_request_over(start_verifier):
    """Fixed gamma 0 under a budget of 2: one (empty) proposal asks the verifier to decode the rest alone."""
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    _use(verifier, FixedBudgeter(2, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=16)
    baseline = await generate_baseline(verifier.stub, [4, 5], params)
    spec = await speculate(verifier.stub, LMDrafter(FakeLM(32, seed=5), "d"), [4, 5], params, 0, info, mode="lockstep")
    assert spec.token_ids == baseline.token_ids and len(spec.gamma_per_round) == 1 and spec.rounds == 16


def test_decoding_alone_prices_gamma_zero_without_the_round_trip():
    """A fast verifier (3 ms a step) 100 ms away, acceptance 0.8, a 0.5 ms draft token: a block beats a lock-step
    decoding round trip (~4.3 tokens per ~0.11 s against 1 per 0.103 s), but not the verifier decoding alone (1
    per 3 ms); with no link a block beats that too (1.8 tokens per 4 ms)."""
    accept, verify_s = [0.8] * 16, (0.003, 0.0005)
    assert choose_gamma(accept, 0.0005, verify_s, 0.100, 16) > 0
    assert choose_gamma(accept, 0.0005, verify_s, 0.100, 16, decode_alone=True) == 0
    assert choose_gamma(accept, 0.0005, verify_s, 0.0, 16, decode_alone=True) > 0


def test_the_schedule_says_when_it_next_probes():
    schedule = RttGamma(gamma=4, probe_every=8)
    schedule.update(4, 0, draft_s=1.0, service_s=0.01, rtt_s=0.0)  # its first draft time is the prefill's: skipped
    seen = []
    for _ in range(40):
        before = schedule.rounds_to_probe()
        schedule.update(1, 0, draft_s=1.0, service_s=0.01, rtt_s=0.0)  # a draft far too slow: it chooses 0
        seen.append((before, schedule.gamma))
    assert sum(gamma > 0 for _, gamma in seen) >= 4 and max(before for before, _ in seen) > 1
    assert all((before == 1) == (gamma > 0) for before, gamma in seen)  # each probe came when it said it would


def test_a_probe_stands_until_a_block_goes_out():
    """Lock-step with decode_alone: the client asks the verifier to decode rounds_to_probe() steps alone, and its
    turn comes a reply after the probe fires (the proposal's own verdict is one of the updates). A probe that
    lasted one update was gone by then, every time: the session never drafted again (the real pair's LM drafter,
    rejected on its first two blocks, decoded the remaining 30 tokens alone at 1 session)."""
    schedule = _fell_to_zero(0.010, 0.0005)
    for _ in range(schedule.rounds_to_probe() + 3):  # the verdict, the steps alone, and a turn that came late
        schedule.update(0, 0, draft_s=0.0, service_s=0.003, rtt_s=0.010)
    assert schedule.gamma == 1  # the probe still stands
    schedule.update(1, 1, draft_s=0.0005, service_s=0.0035, rtt_s=0.010)  # it went out
    assert schedule.gamma == 0 and schedule.rounds_to_probe() > 1


def _fell_to_zero(rtt_s: float, draft_s: float, decode_alone: bool = True) -> RttGamma:
    """A schedule that measured a 3 ms verifier step, `rtt_s` away, and poor acceptance: it chose gamma 0."""
    schedule = RttGamma(gamma=2)
    schedule.decode_alone = decode_alone
    schedule.update(2, 0, draft_s=2 * draft_s, service_s=0.003, rtt_s=rtt_s)  # the prefill's draft time: skipped
    for _ in range(6):
        schedule.update(2, 0, draft_s=2 * draft_s, service_s=0.0035, rtt_s=rtt_s)
    for _ in range(3):
        schedule.update(0, 0, draft_s=0.0, service_s=0.003, rtt_s=rtt_s)
    return schedule


def test_probes_cost_at_most_their_share_when_the_verifier_decodes_alone():
    assert _fell_to_zero(0.0, 0.0005, decode_alone=False).rounds_to_probe() <= 16  # the usual 1, 2, 4 ... 16 rounds
    near = _fell_to_zero(0.010, 0.0005)  # a probe costs ~11 ms where a step takes 3: one in ~70 rounds at most
    assert near.gamma == 0 and 16 < near.rounds_to_probe() <= 80
    # 100 ms away even a draft accepted always (17 tokens a block) cannot beat 3 ms a token: never probe
    assert _fell_to_zero(0.100, 0.0005).rounds_to_probe() is None


def test_before_any_draft_time_it_stops_when_even_free_drafts_could_not_pay():
    """An n-gram with no match sends empty blocks, so its draft time stays unknown; 100 ms from a 3 ms verifier,
    even free drafts accepted always lose to the verifier alone: gamma 0 after the first verdict, never probed."""
    far = RttGamma(gamma=4)
    far.decode_alone = True
    far.update(0, 0, draft_s=0.0, service_s=0.003, rtt_s=0.100)
    assert far.draft_s is None and far.gamma == 0 and far.rounds_to_probe() is None
    near = RttGamma(gamma=4)  # one box: drafting may pay, so it keeps its gamma until it has measured a draft
    near.decode_alone = True
    near.update(0, 0, draft_s=0.0, service_s=0.003, rtt_s=0.0005)
    assert near.gamma == 4
