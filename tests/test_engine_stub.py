"""Speculative sessions over real gRPC on 127.0.0.1:0 with deterministic fake models: protocol and rollback."""

from __future__ import annotations

import asyncio

import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter, NgramDrafter
from draft_worker.transport import fetch_info
from specdec.config import SamplingParams, VerifierLimits
from specdec.sampling import logits_to_probs
from tests.stubs import FakeLM, chi_square_p_value, fake_pair

PROMPTS = [[1, 2, 3, 4, 5], [7], [3, 3, 3, 9, 3, 3, 3, 9, 3, 3], list(range(20))]


@pytest.mark.parametrize("gamma", [0, 1, 3, 6])
async def test_greedy_lm_drafter_matches_baseline(start_verifier, gamma):
    draft, target = fake_pair(vocab_size=32, noise=1.0)
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=24)
    for prompt in PROMPTS:
        baseline = await generate_baseline(verifier.stub, prompt, params)
        spec = await speculate(verifier.stub, LMDrafter(draft, "fake-draft"), prompt, params, gamma, info)
        assert spec.token_ids == baseline.token_ids
        assert spec.new_tokens == 24 and spec.finish_reason == "length"
        assert spec.proposed == sum(spec.proposed_per_round)
        assert len(spec.rtt_s) == spec.rounds == len(spec.service_s)
    if gamma:
        assert 0 < spec.accepted < spec.proposed  # the stub pair disagrees sometimes: rollback was exercised


async def test_perfect_draft_accepts_everything(start_verifier):
    target = FakeLM(32, seed=5)
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=20)
    spec = await speculate(verifier.stub, LMDrafter(FakeLM(32, seed=5), "same"), [1, 2], params, 4, info)
    assert spec.acceptance_rate == 1.0
    assert spec.rounds == 4  # 4 blocks of 4 accepted + 1 bonus = 20 tokens
    assert spec.mean_acceptance_length == 5.0


async def test_ngram_drafter_matches_baseline(start_verifier):
    _, target = fake_pair()
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=30)
    for prompt in PROMPTS:
        baseline = await generate_baseline(verifier.stub, prompt, params)
        spec = await speculate(verifier.stub, NgramDrafter(), prompt, params, 4, info)
        assert spec.token_ids == baseline.token_ids


async def test_stop_token_ends_generation_inside_a_block(start_verifier):
    _, target = fake_pair()
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    free = await generate_baseline(verifier.stub, [1, 2, 3], SamplingParams(max_new_tokens=30))
    stop = free.token_ids[10]
    first = free.token_ids.index(stop)
    params = SamplingParams(max_new_tokens=30, stop_token_ids=(stop,))
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    spec = await speculate(verifier.stub, LMDrafter(FakeLM(32, seed=0), "same"), [1, 2, 3], params, 5, info)
    assert baseline.token_ids == free.token_ids[: first + 1]
    assert spec.token_ids == baseline.token_ids and spec.finish_reason == "stop"


# 12 s each: the full run's; the fast tier's chi-square tests run the codec and verify_block in process (test_sampling)
@pytest.mark.parametrize("top_k, dense_dtype", [
    pytest.param(0, "fp16", id="dense-fp16", marks=pytest.mark.slow),
    pytest.param(0, "fp32", id="dense-fp32", marks=pytest.mark.slow),
    pytest.param(3, "fp16", id="sparse", marks=pytest.mark.slow),
    pytest.param(0, None, id="verifier-only", marks=pytest.mark.slow),
])
async def test_sampling_over_grpc_preserves_the_verifiers_distribution(start_verifier, top_k, dense_dtype):
    """The whole pipeline (drafter, codec, server, batching engine, rollback) on a 6-token vocabulary, 50
    sessions at a time sharing engine steps: the joint law of the first two generated tokens equals the
    verifier's, and differs clearly from the draft's. dense_dtype None: verifier-only Generate."""
    vocab, prompt = 6, [1, 2]
    target, draft = FakeLM(vocab, seed=0, scale=1.0), FakeLM(vocab, seed=0, scale=1.0, noise=2.0)
    verifier = await start_verifier(target, vocab_size=vocab, limits=VerifierLimits(max_sessions_per_client=64))
    info = await fetch_info(verifier.stub)

    def joint(model) -> torch.Tensor:  # [vocab * vocab]: P(t1, t2) under the model's sampling distribution
        params = SamplingParams(temperature=1.0, top_k=top_k)
        p1 = logits_to_probs(model._logits(prompt), params)
        return torch.cat([p1[a] * logits_to_probs(model._logits([*prompt, a]), params) for a in range(vocab)])

    async def one(seed: int) -> tuple[int, int]:
        params = SamplingParams(temperature=1.0, top_k=top_k, seed=seed, max_new_tokens=2)
        if dense_dtype is None:
            result = await generate_baseline(verifier.stub, prompt, params)
        else:
            result = await speculate(verifier.stub, LMDrafter(draft, "noisy-draft", dense_dtype), prompt, params, 2, info)
        return result.token_ids[0] * vocab + result.token_ids[1], max(result.batch_size)

    cells: list[int] = []
    batch_sizes: list[int] = []
    for batch in range(40):  # 40 x 50 = 2000 sessions, 50 in flight at a time
        for cell, batch_size in await asyncio.gather(*(one(batch * 50 + i) for i in range(50))):
            cells.append(cell)
            batch_sizes.append(batch_size)
    assert sum(b >= 2 for b in batch_sizes) > len(batch_sizes) / 2  # most sessions shared a step with others
    counts = torch.bincount(torch.tensor(cells), minlength=vocab * vocab)
    assert chi_square_p_value(counts, joint(target)) > 1e-4
    assert chi_square_p_value(counts, joint(draft)) < 1e-6  # the test can tell the two apart


@pytest.mark.parametrize("dense_dtype", ["fp16", "fp32"])
def test_lm_drafter_samples_from_what_travels(dense_dtype):
    """The drafter rounds q to the wire dtype before sampling, and the client encodes at that dtype."""
    from protos.specdec.v1 import specdec_pb2 as pb
    from specdec import codec

    params = SamplingParams(temperature=1.0, seed=1, max_new_tokens=8)
    drafter = LMDrafter(FakeLM(32, seed=0), "draft", dense_dtype)
    drafter.start([1, 2, 3], params, 32)
    candidates = drafter.get_candidates(3)
    assert candidates.dense_dtype == dense_dtype
    fields = codec.encode_probs(candidates.q, params, candidates.dense_dtype)
    assert fields["dense"].dtype == codec.DENSE_DTYPES[dense_dtype]
    decoded = codec.decode_probs(pb.Proposal(draft_ids=candidates.draft_ids, **fields), params, 32)
    assert torch.equal(decoded, candidates.q / candidates.q.sum(dim=-1, keepdim=True))
    assert torch.equal(candidates.q.half().float(), candidates.q) == (dense_dtype == "fp16")
