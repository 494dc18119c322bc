"""Issue 21: token trees over real gRPC on 127.0.0.1:0, end to end (drafter -> Proposal.parents -> engine ->
Verdict.accepted_nodes -> client commit).

Greedy trees from the LM and suffix drafters give the verifier-only output; sampling through tree verification
keeps the verifier's distribution (chi-square, 6-token vocabulary, two children drawn without replacement); a
malformed tree gets INVALID_ARGUMENT while another session on the same verifier finishes untouched.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.suffix import SuffixDrafter
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import SamplingParams, VerifierLimits
from specdec.sampling import logits_to_probs
from tests.stubs import FakeLM, chi_square_p_value, fake_pair


def tree_drafter(drafter, nodes: int):
    drafter.tree_nodes = nodes
    return drafter


@pytest.mark.parametrize("kind", ["lm", "suffix"])
async def test_greedy_trees_over_grpc_give_the_verifiers_output(start_verifier, kind):
    draft, target = fake_pair()
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=40)
    prompt = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2]
    baseline = await generate_baseline(verifier.stub, prompt, params)
    drafter = LMDrafter(draft, "draft") if kind == "lm" else SuffixDrafter(None)
    spec = await speculate(verifier.stub, tree_drafter(drafter, 6), prompt, params, 4, info, mode="lockstep")
    assert spec.token_ids == baseline.token_ids
    assert spec.proposed > 0 and spec.rounds < len(spec.token_ids)  # trees were verified, and some accepted


@pytest.mark.slow  # 12 s; test_tree checks the tree sampler in process
async def test_sampling_through_trees_keeps_the_verifiers_distribution(start_verifier):
    vocab, prompt = 6, [1, 2]
    target, draft = FakeLM(vocab, seed=0, scale=1.0), FakeLM(vocab, seed=0, scale=1.0, noise=2.0)
    verifier = await start_verifier(target, vocab_size=vocab, limits=VerifierLimits(max_sessions_per_client=64))
    info = await fetch_info(verifier.stub)

    def joint(model) -> torch.Tensor:  # [vocab * vocab]: P(t1, t2) under the model's sampling distribution
        params = SamplingParams(temperature=1.0)
        p1 = logits_to_probs(model._logits(prompt), params)
        return torch.cat([p1[a] * logits_to_probs(model._logits([*prompt, a]), params) for a in range(vocab)])

    async def one(seed: int) -> int:
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=2)
        drafter = tree_drafter(LMDrafter(draft, "noisy-draft"), 4)  # two children of the root, a chain under each
        result = await speculate(verifier.stub, drafter, prompt, params, 2, info, mode="lockstep")
        return result.token_ids[0] * vocab + result.token_ids[1]

    cells: list[int] = []
    for batch in range(30):  # 30 x 50 = 1500 sessions
        cells += await asyncio.gather(*(one(batch * 50 + i) for i in range(50)))
    counts = torch.bincount(torch.tensor(cells), minlength=vocab * vocab)
    assert chi_square_p_value(counts, joint(target)) > 1e-4
    assert chi_square_p_value(counts, joint(draft)) < 1e-6  # the test can tell the two apart


@pytest.mark.parametrize("parents, match", [
    ([-1, 5], "parent 5 is out of range"),
    ([1, -1], "is not an earlier node"),  # a forward reference
    ([-1, 0, 1, 0, 0, 0, 0, 0, 0], "9 draft tokens, over this verifier's max_gamma of 8"),  # more nodes than allowed
])
async def test_a_malformed_tree_is_refused_and_other_work_goes_on(start_verifier, parents, match):
    _, target = fake_pair()
    verifier = await start_verifier(target, vocab_size=32, limits=VerifierLimits(max_gamma=8))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=20)
    baseline = await generate_baseline(verifier.stub, [3, 4, 5], params)
    other = asyncio.create_task(speculate(verifier.stub, tree_drafter(LMDrafter(fake_pair()[0], "d"), 5), [3, 4, 5],
                                          params, 4, info, mode="lockstep"))
    call = verifier.stub.Speculate(timeout=30)
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=codec.params_to_proto(params))))
    assert (await call.read()).WhichOneof("kind") == "opened"
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(draft_ids=[7] * len(parents), parents=parents)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in refused.value.details()
    assert (await other).token_ids == baseline.token_ids


def test_the_bench_and_the_drafter_spec_carry_the_tree_setting():
    from draft_worker.drafters import DrafterSpec, build_drafter
    from orchestrator.config import expand, from_dict

    config = from_dict({"drafts": [{"name": "sfx", "kind": "suffix", "tree": {"max_nodes": 6}, "mode": "lockstep"}]})
    spec = [s for s in expand(config) if s.drafter == "suffix"][0]
    assert spec.tree_nodes == 6 and spec.drafter_spec.tree_nodes == 6 and "tree=6" in spec.name
    assert build_drafter(spec.drafter_spec).tree_nodes == 6
    with pytest.raises(ValueError, match="n-gram drafter proposes chains"):
        build_drafter(DrafterSpec(kind="ngram", tree_nodes=4))


async def test_trees_are_lockstep_only(start_verifier):
    """An async session's tree gets INVALID_ARGUMENT from the verifier; the client refuses trees in other modes."""
    _, target = fake_pair()
    verifier = await start_verifier(target, vocab_size=32)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=1000)  # the session cannot finish before the proposal is read
    call = verifier.stub.Speculate(timeout=30)
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=codec.params_to_proto(params),
                                                             mode=pb.SPECULATION_MODE_ASYNC)))
    assert (await call.read()).WhichOneof("kind") == "opened"
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(draft_ids=[7, 8], parents=[-1, -1])))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        for _ in range(params.max_new_tokens + 1):  # commits stream until the proposal is read
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token trees" in refused.value.details()
    with pytest.raises(ValueError, match="lockstep mode only"):
        await speculate(verifier.stub, tree_drafter(SuffixDrafter(None), 4), [1, 2], params, 4, info, mode="ahead")


async def test_greedy_lm_trees_with_the_tiny_pair(start_verifier, tiny_dirs):
    """The tiny seeded Qwen2 pair: the LM drafter's trees commit the verifier-only tokens, accepting some nodes."""
    from specdec import models

    draft = models.load_model(str(tiny_dirs[0]), dtype=torch.float32, device=torch.device("cpu"))
    target = models.load_model(str(tiny_dirs[1]), dtype=torch.float32, device=torch.device("cpu"))
    verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=32)
    prompt = [5, 17, 42, 8, 99, 3, 17, 42]
    baseline = await generate_baseline(verifier.stub, prompt, params)
    spec = await speculate(verifier.stub, tree_drafter(LMDrafter(draft, "tiny-draft"), 6), prompt, params, 4, info,
                           mode="lockstep")
    assert spec.token_ids == baseline.token_ids and spec.accepted > 0
