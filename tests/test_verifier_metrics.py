"""The verifier's Prometheus metrics: parsed with prometheus_client's own parser, the token counters move by
exactly one known request's tokens, a refusal is counted under its status code, the engine's step histograms fill."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import NgramDrafter
from draft_worker.transport import VerifierError, fetch_info
from specdec.config import SamplingParams, VerifierLimits
from tests.stubs import FakeLM


def scrape(servicer) -> dict[str, float]:
    text = generate_latest(servicer.metrics.registry).decode()
    return {(s.name + str(sorted(s.labels.items())) if s.labels else s.name): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_counters_move_by_one_requests_tokens(start_verifier):
    verifier = await start_verifier(FakeLM(vocab_size=32, seed=1), vocab_size=32, limits=VerifierLimits(max_new_tokens=40))
    info = await fetch_info(verifier.stub)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    await generate_baseline(verifier.stub, prompt, SamplingParams(max_new_tokens=5))
    before = scrape(verifier.servicer)
    result = await speculate(verifier.stub, NgramDrafter(), prompt, SamplingParams(max_new_tokens=23), 3, info)
    for _ in range(100):  # the stream ends when the server sees the client's half-close, just after the result
        if not verifier.servicer.active_sessions:
            break
        await asyncio.sleep(0.01)
    after = scrape(verifier.servicer)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert result.proposed > 0
    assert delta("specdec_verifier_tokens_committed_total") == result.new_tokens == 23
    assert delta("specdec_verifier_tokens_proposed_total") == result.proposed
    assert delta("specdec_verifier_tokens_accepted_total") == result.accepted
    assert delta("specdec_verifier_prompt_tokens_total") == len(prompt)
    assert delta("specdec_verifier_requests_total[('code', 'OK'), ('method', 'Speculate'), ('outcome', 'ok')]") == 1
    assert delta("specdec_verifier_step_compute_seconds_count") >= result.rounds
    assert delta("specdec_verifier_queue_seconds_count") == result.rounds + 1  # every verdict and the opening
    assert before["specdec_verifier_requests_total[('code', 'OK'), ('method', 'Generate'), ('outcome', 'ok')]"] == 1
    assert after["specdec_verifier_sessions_open"] == 0 and after["specdec_verifier_step_batch_sessions_sum"] >= 1

    with pytest.raises(VerifierError, match="INVALID_ARGUMENT"):
        await generate_baseline(verifier.stub, prompt, SamplingParams(max_new_tokens=400))
    refused = "specdec_verifier_requests_total[('code', 'INVALID_ARGUMENT'), ('method', 'Generate'), ('outcome', 'error')]"
    assert scrape(verifier.servicer)[refused] == 1
