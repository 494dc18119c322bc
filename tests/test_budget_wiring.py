"""Issue 18, wired: the verifier's draft budget travels in every opening, verdict and commit, every client mode
obeys it, and the engine never verifies more draft tokens than it granted.

- A stub verifier over real gRPC grants a fixed budget (0 or 2) in every reply and records every proposal's
  size: a perfect drafter at fixed gamma 4 or `--gamma auto` never sends more, in every mode; budget 0 means
  empty lock-step proposals and no async proposals at all (the stub then decodes on its own).
- The real servicer with a budgeter that grants 2: a raw lock-step proposal of 5 perfect draft tokens gets 2
  verified (3 dropped and counted in the over-budget metric) and its verdict says the budget.
- The real budgeter end to end with `--gamma auto`, several sessions at once: greedy equals verifier-only, and a
  budgeter that grants a random budget every step keeps the verifier's distribution (chi-square), which
  exercises the client's and the engine's cuts in every mode.
"""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.gamma import AutoGamma
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec
from specdec.budget import StepCostModel
from specdec.config import SPEC_MODES, SamplingParams, VerifierLimits
from specdec.sampling import logits_to_probs
from tests.stubs import FakeLM, chi_square_p_value, fake_pair, stream_inbox
from tests.test_client_loop import VOCAB, PerfectDrafter, token_at
from verifier_worker.budgeting import DraftBudgeter
from verifier_worker.server import MAX_DRAFTER_NAME

MAX_NEW = 24


class BudgetVerifier(pb_grpc.VerifierServicer):
    """Grants `budget` in every reply; answers each proposal at once, accepting the drafts that match `token_at`
    (async: one commit per proposal, or a plain decoding step when none comes for 50 ms)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.sizes: list[int] = []  # draft tokens of every proposal received

    async def Speculate(self, request_iterator, context):
        inbox, reader = stream_inbox(request_iterator)
        try:
            async_mode = (await inbox.get()).open.mode == pb.SPECULATION_MODE_ASYNC
            yield pb.SpeculateReply(opened=pb.SessionOpened(session_id="s", draft_budget=self.budget))
            committed = 0
            while committed < MAX_NEW:
                try:
                    proposal = (await asyncio.wait_for(inbox.get(), 0.05 if async_mode else 30)).proposal
                    self.sizes.append(len(proposal.draft_ids))
                except asyncio.TimeoutError:
                    proposal = pb.Proposal(base_len=committed)
                start = (proposal.base_len if proposal.HasField("base_len") else committed) + len(proposal.assumed_ids)
                if start > committed and not async_mode:
                    yield pb.SpeculateReply(verdict=pb.Verdict(stale=True, draft_budget=self.budget))
                    continue
                draft = list(proposal.draft_ids[committed - start :]) if start <= committed else []
                accepted = next((i for i, t in enumerate(draft) if t != token_at(committed + i)), len(draft))
                new = [token_at(committed + i) for i in range(min(accepted + 1, MAX_NEW - committed))]
                base, committed = committed, committed + len(new)
                kwargs = dict(finished=committed >= MAX_NEW, service_s=0.01, draft_budget=self.budget,
                              finish_reason=pb.FINISH_REASON_LENGTH if committed >= MAX_NEW else 0)
                if async_mode:
                    yield pb.SpeculateReply(commit=pb.Commit(base_len=base, token_ids=new, verified=len(draft),
                                                             num_accepted=accepted, **kwargs))
                else:
                    yield pb.SpeculateReply(verdict=pb.Verdict(num_accepted=min(accepted, len(new)),
                                                               next_token=new[-1] if len(new) > accepted else None,
                                                               **kwargs))
        finally:
            reader.cancel()


async def _stub_server(servicer):
    server = grpc.aio.server()
    pb_grpc.add_VerifierServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.mark.parametrize("schedule", ["fixed", "auto"])
@pytest.mark.parametrize("budget", [0, 2])
@pytest.mark.parametrize("mode", SPEC_MODES)
async def test_every_mode_obeys_the_verifiers_budget(mode, budget, schedule):
    servicer = BudgetVerifier(budget)
    server, channel = await _stub_server(servicer)
    info = pb.InfoReply(vocab_size=VOCAB, limits=pb.Limits(max_gamma=16, max_new_tokens=1024))
    gamma = 4 if schedule == "fixed" else AutoGamma(4)
    try:
        result = await asyncio.wait_for(speculate(pb_grpc.VerifierStub(channel), PerfectDrafter(), [1, 2, 3],
                                                  SamplingParams(max_new_tokens=MAX_NEW), gamma, info, mode=mode), 60)
    finally:
        await channel.close()
        await server.stop(None)
    assert result.token_ids == [token_at(i) for i in range(MAX_NEW)]
    assert result.budget_per_round == [budget] * (result.rounds + 1)  # the opening's, then every reply's
    sent = servicer.sizes
    assert all(size <= budget for size in sent), sent
    if budget == 0 and mode == "async":
        assert sent == []  # nothing to send: the verifier decodes
    elif budget == 0:
        assert len(sent) == result.rounds == MAX_NEW  # empty proposals: one decoded token a round
    elif mode != "async":  # a perfect draft: every lock-step block uses its whole budget
        assert max(sent) == budget and result.accepted == result.proposed > 0


class FixedBudgeter(DraftBudgeter):
    """Grants every session the same budget."""

    def __init__(self, budget: int, **kwargs):
        super().__init__(**kwargs)
        self.budget = budget

    def grants(self, load=None, exclude=()):
        return {key: min(self.budget, s.max_gamma) for key, s in self._sessions.items()}


class RandomBudgeter(DraftBudgeter):
    """Grants every session a random budget in [0, 3] every step (seeded; independent of any draft token)."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rng = random.Random(seed)

    def grants(self, load=None, exclude=()):
        return {key: min(self.rng.randrange(4), s.max_gamma) for key, s in self._sessions.items()}


def _use(verifier, budgeter: DraftBudgeter) -> DraftBudgeter:
    """Put `budgeter` in the running servicer (before any session opens), with the servicer's metrics."""
    budgeter.metrics = verifier.servicer.budgeter.metrics
    verifier.servicer.budgeter = verifier.servicer.engine.budgeter = budgeter
    return budgeter


async def test_the_verifier_verifies_no_more_than_it_granted(start_verifier):
    target = FakeLM(32, seed=5)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    budgeter = _use(verifier, FixedBudgeter(2, max_gamma=16))
    params = SamplingParams(max_new_tokens=12)
    expected = (await generate_baseline(verifier.stub, [1, 2], params)).token_ids
    call = verifier.stub.Speculate()
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=codec.params_to_proto(params))))
    assert (await call.read()).opened.draft_budget == 2
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=0, draft_ids=expected[:5])))  # perfect, 5 long
    verdict = (await call.read()).verdict
    assert verdict.num_accepted == 2 and verdict.next_token == expected[2] and verdict.draft_budget == 2
    assert budgeter.metrics.over_budget._value.get() == 3  # dropped unverified, counted, not an error
    call.cancel()


async def test_an_older_client_is_still_served_and_no_budget_means_none_sent(start_verifier):
    """A verifier with the budget off sends none (the field stays unset) and verifies every draft token."""
    target = FakeLM(32, seed=5)
    verifier = await start_verifier(target, vocab_size=32, limits=VerifierLimits(draft_budget=False))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=20)
    spec = await speculate(verifier.stub, LMDrafter(FakeLM(32, seed=5), "same"), [1, 2], params, 4, info)
    assert spec.budget_per_round == [] and spec.rounds == 4 and spec.accepted == 16


@pytest.mark.parametrize("max_gamma", [0, 2])
async def test_auto_starts_within_a_verifier_limit_below_its_first_gamma(start_verifier, max_gamma):
    """`--gamma auto` opens at gamma 4; a verifier whose --max-gamma is lower (0: decode only) serves it within its
    limit (it used to be refused before the first block: "gamma must be in [0, 0]")."""
    draft, target = fake_pair(vocab_size=32, noise=0.0)
    verifier = await start_verifier(target, vocab_size=32, limits=VerifierLimits(max_gamma=max_gamma), budget=True)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=12)
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    spec = await speculate(verifier.stub, LMDrafter(draft, "d"), [1, 2, 3], params, AutoGamma(), info)
    assert spec.token_ids == baseline.token_ids
    assert max(spec.proposed_per_round) <= max_gamma and (spec.proposed > 0) == (max_gamma > 0)
    with pytest.raises(ValueError, match="gamma must be in"):  # a fixed gamma is the user's word: refused
        await speculate(verifier.stub, LMDrafter(draft, "d"), [1, 2, 3], params, max_gamma + 1, info)


@pytest.mark.parametrize("mode", SPEC_MODES)
async def test_greedy_auto_at_several_sessions_is_verifier_only(start_verifier, mode):
    draft, target = fake_pair(vocab_size=32, noise=1.0)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=24)
    prompts = [[1, 2, 3, 4, 5], [7], [3, 3, 3, 9, 3, 3], list(range(20))]
    baselines = [await generate_baseline(verifier.stub, p, params) for p in prompts]
    results = await asyncio.gather(*(speculate(verifier.stub, LMDrafter(draft, "d"), p, params, AutoGamma(), info,
                                               mode=mode) for p in prompts))
    for spec, baseline in zip(results, baselines):
        assert spec.token_ids == baseline.token_ids
        assert spec.budget_per_round and max(spec.budget_per_round) <= info.limits.max_gamma
    assert max(max(r.batch_size) for r in results) >= 2  # sessions shared steps


@pytest.mark.slow  # 10-12 s a mode
@pytest.mark.parametrize("mode", SPEC_MODES)
async def test_sampling_with_auto_under_random_budgets_keeps_the_verifiers_distribution(start_verifier, mode):
    """1,000 sessions, 50 at a time, `--gamma auto` under a budget drawn at random every step: the joint law of
    the first two tokens equals the verifier's and differs from the draft's."""
    vocab, prompt = 6, [1, 2]
    target, draft = FakeLM(vocab, seed=0, scale=1.0), FakeLM(vocab, seed=0, scale=1.0, noise=2.0)
    verifier = await start_verifier(target, vocab_size=vocab, limits=VerifierLimits(max_sessions_per_client=64), budget=True)
    _use(verifier, RandomBudgeter(max_gamma=16))
    info = await fetch_info(verifier.stub)

    def joint(model) -> torch.Tensor:  # [vocab * vocab]
        params = SamplingParams(temperature=1.0)
        p1 = logits_to_probs(model._logits(prompt), params)
        return torch.cat([p1[a] * logits_to_probs(model._logits([*prompt, a]), params) for a in range(vocab)])

    async def one(seed: int) -> tuple[int, int]:
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=3)
        result = await speculate(verifier.stub, LMDrafter(draft, "noisy"), prompt, params, AutoGamma(2), info, mode=mode)
        return result.token_ids[0] * vocab + result.token_ids[1], result.proposed

    cells, proposed = [], 0
    for batch in range(20):
        for cell, p in await asyncio.gather(*(one(batch * 50 + i) for i in range(50))):
            cells.append(cell)
            proposed += p
    if mode != "async":  # async verifies drafts only when they arrive in time (machine speed)
        assert proposed > 100
    counts = torch.bincount(torch.tensor(cells), minlength=vocab * vocab)
    assert chi_square_p_value(counts, joint(target)) > 1e-4
    assert chi_square_p_value(counts, joint(draft)) < 1e-6


class RecordingBudgeter(DraftBudgeter):
    """Records what every session opened with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.opened: list[tuple[int | None, float | None, str | None]] = []

    def open(self, key, max_gamma=None, tpot_slo_s=None, drafter=None):
        self.opened.append((max_gamma, tpot_slo_s, drafter))
        super().open(key, max_gamma, tpot_slo_s, drafter)


async def test_a_requests_latency_target_limit_and_drafter_reach_the_budgeter(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, RecordingBudgeter(max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=4)
    await speculate(verifier.stub, LMDrafter(FakeLM(32, seed=5), "same"), [1, 2], params,
                    AutoGamma(2, max_gamma=6, tpot_slo_ms=5.0), info)
    await speculate(verifier.stub, LMDrafter(FakeLM(32, seed=5), "x" * 500), [1, 2], params, AutoGamma(2), info,
                    mode="async")
    await generate_baseline(verifier.stub, [1, 2], params)
    assert budgeter.opened[0] == (6, pytest.approx(0.005), "same")
    assert budgeter.opened[1][2] == "x" * MAX_DRAFTER_NAME  # every mode; a long name cut to the server's limit
    assert budgeter.opened[2] == (0, None, None)  # Generate: decode only


def test_the_bench_reports_the_mean_granted_budget():
    import pandas as pd

    from orchestrator.cli import _gamma
    from orchestrator.report import _mean_budget

    assert _mean_budget(pd.DataFrame({"budget_per_round": [[0, 2], [4]]})) == 2.0
    assert math.isnan(_mean_budget(pd.DataFrame({"budget_per_round": [[], []]})))  # a verifier that grants none
    assert _gamma("auto") == "auto"


class StepRecordingBudgeter(DraftBudgeter):
    """Records what the engine feeds the cost fit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps: list[tuple[int, int, int]] = []  # (sessions, tokens, prefill tokens)

    def on_step(self, compute_s, sessions, tokens, prefill_tokens=0):
        self.steps.append((sessions, tokens, prefill_tokens))
        super().on_step(compute_s, sessions, tokens, prefill_tokens)


@pytest.mark.parametrize("pads", [True, False])
async def test_the_cost_fit_sees_the_tokens_the_backend_computes(pads):
    """A padding backend (transformers) computes a step of a 5-token block and three 1-token rows as 4 x 5
    tokens: the fit and the grant are told so; a packing backend's (llama.cpp) cost is the sum."""
    from verifier_worker.backends import TransformersBackend
    from verifier_worker.engine import Engine

    backend = TransformersBackend(FakeLM(32))
    backend.pads_rows = pads
    budgeter = StepRecordingBudgeter(max_gamma=8)
    engine = Engine(backend, max_batch_tokens=64, budgeter=budgeter)
    assert budgeter.padded is pads
    sessions = [engine.open([1, 2, 3], SamplingParams(max_new_tokens=8)) for _ in range(4)]
    await asyncio.gather(*(engine.prefill(s) for s in sessions))
    budgeter.steps.clear()
    await asyncio.gather(*(engine.verify(s, d, None) for s, d in zip(sessions, [[5, 6, 7, 8], [], [], []])))
    assert budgeter.steps == [(4, 4 * 5 if pads else 5 + 3, 0)]


async def test_a_session_whose_drafts_miss_the_step_is_granted_fewer():
    """Two lock-step sessions granted drafts; one sends its next block at once, the other only after the
    engine's batch wait ran out: the engine tells the budgeter it was late, and its expected tokens fall."""
    from verifier_worker.engine import Engine

    # a flat step cost (slopes pinned by the prior), so the grant depends on acceptance alone, not on timings
    budgeter = DraftBudgeter(max_gamma=4, cost=StepCostModel(prior_steps=1e9))
    engine = Engine(FakeLM(32), max_batch_tokens=64, batch_wait_s=0.0, budgeter=budgeter)
    prompt_tokens = [1, 2, 3]
    on_time, slow = (engine.open(prompt_tokens, SamplingParams(max_new_tokens=16)) for _ in range(2))
    await asyncio.gather(engine.prefill(on_time), engine.prefill(slow))
    await asyncio.gather(engine.verify(on_time, [], None), engine.verify(slow, [], None))
    assert on_time.budget > 0 and slow.budget > 0  # the prior's grant on a fresh fit
    before = budgeter._sessions[slow].tracker.expected_tokens(4)
    await engine.verify(on_time, [], None)  # a step starts without `slow` (no wait): it was late
    assert budgeter._sessions[slow].tracker.expected_tokens(4) < before
    assert budgeter._sessions[on_time].tracker.expected_tokens(4) <= before  # its own empty block: offered, unused
    await engine.verify(slow, [], None)
