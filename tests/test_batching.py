"""Many sessions at once through the batching engine over real gRPC on 127.0.0.1:0 (tiny seeded pair, fp32):
each session's tokens equal the same request run alone, whatever it shares its steps with; a client that
cancels mid-session disturbs nobody; the cost fields add up; and the engine holds no KV once idle."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter, NgramDrafter
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec, models
from specdec.config import SamplingParams, VerifierLimits
from specdec.tiny import DEFAULT_TEXTS
from tests.stubs import FakeLM

CPU = torch.device("cpu")
LIMITS = VerifierLimits(max_batch_tokens=48)  # small: prompts are prefilled in chunks beside other sessions' blocks


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    draft_dir, verifier_dir = tiny_dirs
    tokenizer = models.load_tokenizer(str(verifier_dir))
    return (models.load_model(str(draft_dir), dtype=torch.float32, device=CPU),
            models.load_model(str(verifier_dir), dtype=torch.float32, device=CPU), tokenizer)


async def assert_idle(verifier) -> None:
    """Every session ended (the server releases just after its last message): no session and no KV held."""
    for _ in range(200):  # <= 2 s
        stats = verifier.servicer.engine.stats()
        if verifier.servicer.active_sessions == 0 and stats.sessions == 0:
            break
        await asyncio.sleep(0.01)
    stats = verifier.servicer.engine.stats()
    assert (stats.sessions, stats.kv_tokens, stats.kv_bytes, stats.queued) == (0, 0, 0, 0), stats


async def cancelled_midway(stub, prompt: list[int], rounds: int) -> int:
    """A raw Speculate stream that decodes `rounds` tokens, sends one more block and cancels without reading."""
    call = stub.Speculate(timeout=30)
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=prompt, params=pb.SamplingParams(max_new_tokens=64))))
    assert (await call.read()).HasField("opened")
    for _ in range(rounds):
        await call.write(pb.SpeculateRequest(proposal=pb.Proposal(draft_ids=[])))
        assert (await call.read()).HasField("verdict")
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(draft_ids=prompt[:3])))
    call.cancel()
    return rounds


async def test_concurrent_sessions_equal_their_solo_runs(tiny, start_verifier):
    """Different prompt lengths, gamma (0, n-gram with empty proposals, LM blocks of 2 and 5, Generate) and
    finish points (stop token, max tokens, client cancel), all at once vs each alone."""
    draft, target, tokenizer = tiny
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target), fingerprint=fingerprint,
                                    limits=LIMITS)
    info = await fetch_info(verifier.stub)
    stub = verifier.stub
    texts = [tokenizer(text)["input_ids"] for text in DEFAULT_TEXTS]
    prompts = [texts[0][:90], texts[1][:7], texts[2][:40], texts[3][:1], texts[4][:60] + texts[4][:60], texts[5][:25]]
    free = await generate_baseline(stub, prompts[5], SamplingParams(max_new_tokens=24))
    stop = SamplingParams(max_new_tokens=24, stop_token_ids=(free.token_ids[9],))  # ends early, inside a block
    requests = {
        "generate": lambda: generate_baseline(stub, prompts[0], SamplingParams(max_new_tokens=20)),
        "lm gamma 5": lambda: speculate(stub, LMDrafter(draft, "tiny"), prompts[1], SamplingParams(max_new_tokens=24), 5, info),
        "lm gamma 0": lambda: speculate(stub, LMDrafter(draft, "tiny"), prompts[2], SamplingParams(max_new_tokens=12), 0, info),
        "ngram gamma 3": lambda: speculate(stub, NgramDrafter(), prompts[4], SamplingParams(max_new_tokens=24), 3, info),
        "generate 1-token prompt": lambda: generate_baseline(stub, prompts[3], SamplingParams(max_new_tokens=6)),
        "lm gamma 2, stop token": lambda: speculate(stub, LMDrafter(draft, "tiny"), prompts[5], stop, 2, info),
    }
    alone = {name: await run() for name, run in requests.items()}
    assert all(max(r.batch_size) == 1 for r in alone.values())
    await assert_idle(verifier)

    *together, _ = await asyncio.gather(*(run() for run in requests.values()), cancelled_midway(stub, prompts[2], 3))
    for name, result in zip(requests, together):
        assert result.token_ids == alone[name].token_ids, name
        assert result.finish_reason == alone[name].finish_reason, name
    together = dict(zip(requests, together))
    assert max(b for r in together.values() for b in r.batch_size) >= 3  # the sessions really shared steps
    assert together["lm gamma 2, stop token"].finish_reason == "stop" and together["generate"].finish_reason == "length"
    assert 0 in together["ngram gamma 3"].proposed_per_round and together["ngram gamma 3"].accepted > 0
    assert 0 < together["lm gamma 5"].accepted < together["lm gamma 5"].proposed  # accepts and rollbacks
    await assert_idle(verifier)


async def test_cost_fields_add_up_to_the_engine_busy_time(start_verifier):
    """Per request, verifier_compute_s is its share of each step; over all requests the shares are exactly
    the engine's busy time, and service_s = queue_s + compute_s round by round."""
    verifier = await start_verifier(FakeLM(32), vocab_size=32)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=10)
    results = await asyncio.gather(
        *(generate_baseline(verifier.stub, [1, 2, 3 + i], params) for i in range(3)),
        *(speculate(verifier.stub, LMDrafter(FakeLM(32, noise=1.0), "noisy"), [4 + i] * (2 + i), params, 3, info)
          for i in range(3)),
    )
    await assert_idle(verifier)
    busy = verifier.servicer.engine.stats().busy_s
    assert sum(r.verifier_compute_s for r in results) == pytest.approx(busy, rel=1e-9)
    for r in results:
        assert len(r.compute_s) == len(r.queue_s) == len(r.batch_size) == len(r.service_s) > 0
        for service, queue, compute in zip(r.service_s, r.queue_s, r.compute_s):
            # Generate decodes ahead of its replies, so a reply can come sooner than its step took: queue 0
            assert queue == pytest.approx(max(0.0, service - compute), abs=1e-9)
        assert 0 < r.verifier_compute_s <= sum(r.compute_s) + r.prefill_compute_s
    assert max(b for r in results for b in r.batch_size) >= 2


async def test_limits_report_and_check_the_step_budget(start_verifier):
    verifier = await start_verifier(FakeLM(32), vocab_size=32, limits=VerifierLimits(max_batch_tokens=100))
    assert (await fetch_info(verifier.stub)).limits.max_batch_tokens == 100
    with pytest.raises(ValueError, match=r"max_batch_tokens \(8\) must hold one block of 1 \+ max_gamma \(17\)"):
        await start_verifier(FakeLM(32), vocab_size=32, limits=VerifierLimits(max_batch_tokens=8))


async def test_generate_stream_cancelled_mid_way_frees_its_session(start_verifier):
    verifier = await start_verifier(FakeLM(32), vocab_size=32)
    request = pb.GenerateRequest(prompt_ids=[1, 2, 3], params=codec.params_to_proto(SamplingParams(max_new_tokens=500)))
    call = verifier.stub.Generate(request, timeout=30)
    for _ in range(3):
        assert len((await call.read()).token_ids) == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    assert (await call.code()) == grpc.StatusCode.CANCELLED
    await assert_idle(verifier)


@pytest.mark.parametrize("route", ["packed", "padded"])
def test_a_long_prefill_chunk_does_not_pad_the_blocks_beside_it(tiny, route):
    """The transformers backend packs a step's rows into one sequence when that computes less (here), else runs
    long rows (prefill chunks) and short rows (verification blocks) as two padded forwards of one step; either
    way a block is never padded to a chunk's length, and each row's logits and KV are those of the row alone."""
    from verifier_worker.backends import SHORT_ROW, TransformersBackend
    from verifier_worker.kv import Row, batched_forward

    _, target, tokenizer = tiny
    ids = tokenizer(DEFAULT_TEXTS[0])["input_ids"] * 3
    backend = TransformersBackend(target)
    if route == "padded":
        backend.score_flops = backend.token_flops  # attention priced as dear as a token: packing never pays
    shapes = []
    hook = target.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                            with_kwargs=True)
    try:
        kvs = [backend.new_kv() for _ in range(3)]
        backend.forward([Row(kvs[1], ids[:8], False), Row(kvs[2], ids[:5], False)])  # cached prefixes
        shapes.clear()
        rows = [Row(kvs[0], ids[: SHORT_ROW + 20], False), Row(kvs[1], ids[8:12], True), Row(kvs[2], ids[5:7], True)]
        logits = backend.forward(rows)
    finally:
        hook.remove()
    expected = {"packed": [(1, SHORT_ROW + 26)], "padded": [(1, SHORT_ROW + 20), (2, 4)]}[route]
    assert sorted(shapes) == sorted(expected)  # packed: no padding at all; padded: the blocks to 4, not to the chunk
    assert logits[0] is None and [kv.length for kv in kvs] == [SHORT_ROW + 20, 12, 7]
    alone = [backend.new_kv(), backend.new_kv()]
    batched_forward(target, [Row(alone[0], ids[:8], False), Row(alone[1], ids[:5], False)])
    for kv, new, row_logits in zip(alone, (ids[8:12], ids[5:7]), logits[1:]):
        torch.testing.assert_close(batched_forward(target, [Row(kv, new, True)])[0], row_logits, rtol=1e-4, atol=1e-4)
    for kv, packed_kv in zip(alone, kvs[1:]):  # the KV each row cached, packed or padded, is its own
        torch.testing.assert_close(packed_kv.view(), kv.view(), rtol=1e-4, atol=1e-4)


def test_the_backend_packs_only_where_that_computes_less():
    """Rows of one length: padding wastes nothing, packing adds attention over every row's past. One long row
    beside 1-token rows: packing computes the sum. A long past beside few new tokens: packing's scores cost more
    than the padding it saves. The 1.5B's figures (2.6 GFLOPs a token, 6.1 kFLOPs a score per layer, 28 layers)."""
    from verifier_worker.backends import route_flops

    token, score = 2.6e9, 6.1e3 * 28

    def packs(rows):
        return route_flops(rows, True, token, score) < route_flops(rows, False, token, score)

    assert not packs([(1, 256)] * 4) and not packs([(5, 256)] * 4)
    assert packs([(5, 256), (1, 256), (1, 256), (1, 256)]) and packs([(9, 300)] + [(1, 300)] * 7)
    assert route_flops([(5, 256), (1, 256), (1, 256), (1, 256)], False, token, score) == 4 * 5 * (token + 261 * score)
    assert not packs([(2, 30000)] + [(1, 30000)] * 15)  # 17 tokens x 480k keys: the scores outweigh 15 padded tokens
