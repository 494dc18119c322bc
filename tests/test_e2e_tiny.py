"""End to end with tiny seeded random models (two sizes, one vocabulary) over real gRPC on 127.0.0.1:0:
speculative greedy output == verifier-only greedy output, token for token, for the LM and n-gram drafters."""

from __future__ import annotations

import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter, NgramDrafter
from draft_worker.transport import fetch_info
from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import load_items
from specdec.tiny import DEFAULT_TEXTS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    draft_dir, verifier_dir = tiny_dirs
    return (
        models.load_model(str(draft_dir), dtype=torch.float32, device=CPU),
        models.load_model(str(verifier_dir), dtype=torch.float32, device=CPU),
        models.load_tokenizer(str(verifier_dir)),
    )


@pytest.fixture(params=["texts", pytest.param("pubmedqa", marks=pytest.mark.slow)])
def prompts(request, tiny) -> list[list[int]]:
    """Prompt ids: the tiny pair's own texts, or three PubMedQA prompts (skipped, saying why, without the file)."""
    tokenizer = tiny[2]
    if request.param == "pubmedqa":
        texts = [item.prompt for item in load_items(request.getfixturevalue("pubmedqa_path"))[:3]]
    else:
        texts = [*DEFAULT_TEXTS[:2], "The"]
    return [tokenizer(text)["input_ids"][:300] for text in texts]


async def _serve(start_verifier, tiny):
    _, target, tokenizer = tiny
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target), fingerprint=fingerprint)
    return verifier, await fetch_info(verifier.stub), fingerprint


@pytest.mark.parametrize("gamma", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
async def test_greedy_lm_drafter_is_lossless(tiny, prompts, start_verifier, gamma):
    draft, _, _ = tiny
    verifier, info, fingerprint = await _serve(start_verifier, tiny)
    params = SamplingParams(max_new_tokens=40)
    accepted = proposed = 0
    for prompt in prompts:
        baseline = await generate_baseline(verifier.stub, prompt, params)
        spec = await speculate(verifier.stub, LMDrafter(draft, "tiny-draft"), prompt, params, gamma, info,
                               tokenizer_fingerprint=fingerprint)
        assert spec.token_ids == baseline.token_ids
        accepted, proposed = accepted + spec.accepted, proposed + spec.proposed
    assert 0 < accepted < proposed  # both accepts and rejections (rollback) happened


async def test_greedy_ngram_drafter_is_lossless(tiny, prompts, start_verifier):
    verifier, info, fingerprint = await _serve(start_verifier, tiny)
    params = SamplingParams(max_new_tokens=40)
    accepted = 0
    for prompt in prompts:
        baseline = await generate_baseline(verifier.stub, prompt, params)
        for gamma in (2, 5):
            spec = await speculate(verifier.stub, NgramDrafter(), prompt, params, gamma, info, tokenizer_fingerprint=fingerprint)
            assert spec.token_ids == baseline.token_ids
            accepted += spec.accepted
    assert accepted > 0


async def test_stop_at_eos_matches_baseline(tiny, start_verifier):
    draft, _, tokenizer = tiny
    verifier, info, fingerprint = await _serve(start_verifier, tiny)
    free = await generate_baseline(verifier.stub, [5, 6, 7], SamplingParams(max_new_tokens=60))
    stop = free.token_ids[7]  # some token that does occur, so generation ends early
    params = SamplingParams(max_new_tokens=60, stop_token_ids=(stop,))
    baseline = await generate_baseline(verifier.stub, [5, 6, 7], params)
    spec = await speculate(verifier.stub, LMDrafter(draft, "tiny-draft"), [5, 6, 7], params, 4, info)
    assert spec.token_ids == baseline.token_ids and spec.token_ids[-1] == stop and spec.finish_reason == "stop"


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.8, seed=3, max_new_tokens=30),  # dense fp16 probabilities
     SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=4, max_new_tokens=30)],  # sparse
    ids=["dense", "sparse"],
)
async def test_seeded_sampling_is_reproducible(tiny, start_verifier, params):
    draft, _, _ = tiny
    verifier, info, _ = await _serve(start_verifier, tiny)
    runs = [await speculate(verifier.stub, LMDrafter(draft, "tiny-draft"), [5, 6, 7, 8], params, 4, info) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].new_tokens == 30
    assert runs[0].accepted > 0
    other = await speculate(verifier.stub, LMDrafter(draft, "tiny-draft"), [5, 6, 7, 8],
                            SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                           seed=params.seed + 100, max_new_tokens=30), 4, info)
    assert other.token_ids != runs[0].token_ids
