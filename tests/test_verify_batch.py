"""Batched verification (`sampling.verify_batch`) against the one-row reference (`verify_block`), and the engine
that uses it: ragged batches mixing greedy and sampling rows with their own params, fixed generators."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from specdec import sampling
from specdec.config import SamplingParams
from specdec.sampling import logits_to_probs, make_generator, sample, verify_batch, verify_block
from tests.stubs import FakeLM
from verifier_worker.engine import Engine


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    return rng.choice([
        SamplingParams(),  # greedy
        SamplingParams(temperature=rng.choice([0.5, 1.0, 1.7])),
        SamplingParams(temperature=0.9, top_k=rng.randint(1, vocab + 2)),  # k >= vocab: off
        SamplingParams(temperature=1.1, top_p=rng.random()),
        SamplingParams(temperature=0.8, top_k=rng.randint(1, vocab), top_p=rng.random()),
    ])


def random_batch(rng: random.Random, g: torch.Generator, greedy: bool | None):
    """B rows of gamma_b in 0..5: (drafts, target logits [gamma_b + 1, vocab], q or None, params) per row."""
    vocab = rng.choice([7, 50, 1000])
    rows = []
    for _ in range(rng.randint(1, 6)):
        gamma = rng.randint(0, 5)
        params = SamplingParams() if greedy else random_params(rng, vocab)
        if greedy is False and params.greedy:
            params = SamplingParams(temperature=1.3)
        logits = torch.randn(gamma + 1, vocab, generator=g) * 3  # [gamma + 1, vocab]
        if params.greedy:  # mostly the argmax, so rows accept some drafts and reject others
            argmax = logits.argmax(-1).tolist()
            drafts, q = [argmax[j] if rng.random() < 0.7 else rng.randrange(vocab) for j in range(gamma)], None
        else:
            q = logits_to_probs(logits[:gamma] + torch.randn(gamma, vocab, generator=g), params) if gamma else None
            drafts = sample(q, g).tolist() if gamma else []
        rows.append((drafts, logits, q, params))
    return rows


@pytest.mark.parametrize("group_bytes", [sampling.CPU_GROUP_BYTES, 1], ids=["groups", "row-by-row"])
@pytest.mark.parametrize("greedy", [True, False, None], ids=["greedy", "sampling", "mixed"])
def test_batched_verification_equals_the_one_row_reference(greedy, group_bytes, monkeypatch):
    """Random ragged batches: verify_batch gives each row what verify_block gives it alone with a generator in
    the same state, and leaves every generator in the same state (the next draws agree too); whether a CPU
    verifies the sampling rows all together or one group each."""
    monkeypatch.setattr(sampling, "CPU_GROUP_BYTES", group_bytes)
    rng, g = random.Random(1), torch.Generator().manual_seed(2)
    outcomes = set()
    for _ in range(60):
        rows = random_batch(rng, g, greedy)
        seeds = [rng.randrange(2**31) for _ in rows]
        solo = [make_generator(seed) for seed in seeds]
        batched = [make_generator(seed) for seed in seeds]
        for _ in range(2):  # twice with the same generators: their states after a batch must agree as well
            expected = [verify_block(torch.tensor(d, dtype=torch.long), q, logits, params, generator)
                        for (d, logits, q, params), generator in zip(rows, solo)]
            num_accepted, next_token = verify_batch(
                torch.tensor([t for d, *_ in rows for t in d], dtype=torch.long),  # [num_draft]
                [len(d) for d, *_ in rows],
                torch.cat([logits for _, logits, _, _ in rows]),  # [num_draft + B, vocab]
                [q for _, _, q, _ in rows], [params for *_, params in rows], batched)
            assert list(zip(num_accepted.tolist(), next_token.tolist())) == expected
            outcomes.update((n == len(d), len(d)) for (n, _), (d, *_) in zip(expected, rows))
    assert {(True, 3), (False, 3), (True, 0)} <= outcomes  # full accepts, rejections and plain steps all ran


def test_rows_of_one_batch_sharing_a_generator_draw_in_row_order():
    """Two rows on one generator (not what the engine sends, but allowed) draw as two verify_block calls in turn."""
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(3, 20, generator=g), torch.randn(1, 20, generator=g)]
    q = logits_to_probs(torch.randn(2, 20, generator=g), params)
    draft = sample(q, g)
    solo = make_generator(4)
    expected = [verify_block(draft, q, logits[0], params, solo), verify_block(draft[:0], None, logits[1], params, solo)]
    shared = make_generator(4)
    num_accepted, next_token = verify_batch(draft, [2, 0], torch.cat(logits), [q, None], [params] * 2, [shared, shared])
    assert list(zip(num_accepted.tolist(), next_token.tolist())) == expected


async def alone(model, prompt, params, drafts, q) -> list[int]:
    engine = Engine(model)
    session = engine.open(prompt, params)
    await engine.prefill(session)
    for draft in drafts:
        result, _ = await engine.verify(session, draft, q(draft) if q else None)
        if result.finish_reason:
            break
    engine.close(session)
    return session.tokens


async def test_seeded_sessions_commit_the_same_tokens_batched_or_alone():
    """Greedy and seeded sampling sessions (own temperature, top-k, top-p) verified in shared steps commit exactly
    what each commits on an engine of its own: the batch's verification draws from each session's generator."""
    model, vocab = FakeLM(32), 32
    uniform = lambda draft: torch.full((len(draft), vocab), 1 / vocab)  # noqa: E731 - q: any draft token possible
    sessions_spec = [
        ([1, 2, 3], SamplingParams(max_new_tokens=12), None),
        ([4, 5], SamplingParams(temperature=0.7, seed=1, max_new_tokens=12), uniform),
        ([6], SamplingParams(temperature=1.2, top_k=5, seed=2, max_new_tokens=12), uniform),
        ([7, 8, 9], SamplingParams(temperature=1.0, top_p=0.8, seed=3, max_new_tokens=12), uniform),
    ]
    drafts = [[3, 1, 4], [], [1, 5], [9, 2, 6, 5], [3]]
    engine = Engine(model, max_batch_tokens=64)
    sessions = [engine.open(prompt, params) for prompt, params, _ in sessions_spec]
    await asyncio.gather(*(engine.prefill(s) for s in sessions))

    batch_sizes = []

    async def rounds(session, q):
        for draft in drafts:
            result, cost = await engine.verify(session, draft, q(draft) if q else None)
            batch_sizes.append(cost.batch_sessions)
            if result.finish_reason:
                return

    await asyncio.gather(*(rounds(s, q) for s, (_, _, q) in zip(sessions, sessions_spec)))
    assert max(batch_sizes) == len(sessions)  # the first blocks arrive together: one step verifies them all
    for session, (prompt, params, q) in zip(sessions, sessions_spec):
        assert session.tokens == await alone(model, prompt, params, drafts, q)
        engine.close(session)


async def test_a_sessions_budget_caps_the_drafts_a_step_verifies():
    """`session.budget` (issue 18's per-session draft budget): a lock-step block or an async step verifies at
    most that many drafts; the rest are not verified, and greedy output stays the verifier's."""
    model = FakeLM(32)
    engine = Engine(model)
    session = engine.open([1, 2, 3], SamplingParams(max_new_tokens=8))
    await engine.prefill(session)
    session.budget = 2
    truth = await alone(model, [1, 2, 3], SamplingParams(max_new_tokens=8), [[]] * 8, None)
    result, _ = await engine.verify(session, truth[3:8], None)  # five correct drafts
    assert (result.gamma, result.num_accepted, result.committed) == (2, 2, tuple(truth[3:6]))
    session.budget = 0
    result, _ = await engine.verify(session, truth[6:8], None)
    assert (result.gamma, result.committed) == (0, (truth[6],))
    engine.close(session)
