"""The engine on an accelerator (CUDA or MPS): lossless greedy and seeded sampling with the tiny pair.
Skipped cleanly where neither is present."""

from __future__ import annotations

import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.transport import fetch_info
from specdec import models
from specdec.config import SamplingParams

ACCELERATOR = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ACCELERATOR is None, reason="needs CUDA or MPS")]


@pytest.fixture(scope="module")
def tiny_on_device(tiny_dirs):
    draft_dir, verifier_dir = tiny_dirs
    device = models.resolve_device(ACCELERATOR)
    return (models.load_model(str(draft_dir), dtype=torch.float32, device=device),
            models.load_model(str(verifier_dir), dtype=torch.float32, device=device),
            models.load_tokenizer(str(verifier_dir)))


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=32),
                                    SamplingParams(temperature=0.9, seed=7, max_new_tokens=32),
                                    SamplingParams(temperature=0.9, top_k=20, seed=7, max_new_tokens=32)],
                         ids=["greedy", "dense", "sparse"])
async def test_speculative_on_accelerator(tiny_on_device, start_verifier, params):
    draft, target, tokenizer = tiny_on_device
    verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target))
    info = await fetch_info(verifier.stub)
    prompt = tokenizer("Insulin is a peptide hormone produced by the beta cells")["input_ids"]
    spec = await speculate(verifier.stub, LMDrafter(draft, "tiny-draft"), prompt, params, 4, info)
    again = await speculate(verifier.stub, LMDrafter(draft, "tiny-draft"), prompt, params, 4, info)
    assert spec.token_ids == again.token_ids and spec.new_tokens == 32
    if params.greedy:
        assert spec.token_ids == (await generate_baseline(verifier.stub, prompt, params)).token_ids
