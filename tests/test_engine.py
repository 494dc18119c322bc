"""The batching engine without gRPC: its batched forward against solo forwards (tiny Qwen2 in fp32, and the
FakeLM that reads its prefix through the attention mask), per-session KV rollback and release, the token
budget, cost shares, and cancellation while a step is running."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from specdec import models
from specdec.config import SamplingParams
from specdec.lm import CachedLM
from tests.stubs import FakeLM, GatedLM, wait_for
from verifier_worker.budgeting import DraftBudgeter
from verifier_worker.engine import Engine
from verifier_worker.kv import Row, SessionKV, batched_forward, packed_forward

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_new_tokens=16)


ACCELERATOR = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None


@pytest.fixture(scope="module")
def tiny_verifier(tiny_dirs):
    return models.load_model(str(tiny_dirs[1]), dtype=torch.float32, device=CPU)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def solo_logits(model, prefix: list[int], block: list[int]) -> torch.Tensor:
    lm = CachedLM(model)
    if prefix:
        lm.forward(prefix)
    return lm.forward(block)  # [len(block), vocab]


@pytest.mark.parametrize("model_name", [
    "tiny-qwen2", "fake",
    pytest.param("tiny-qwen2-accelerator", marks=[pytest.mark.gpu, pytest.mark.skipif(ACCELERATOR is None, reason="needs CUDA or MPS")]),
])
@pytest.mark.parametrize("forward", [batched_forward, packed_forward], ids=["padded", "packed"])
def test_batched_forward_equals_solo_forward(model_name, forward, tiny_verifier, tiny_dirs):
    """Rows with different cache lengths (0 included) and block lengths, plus a prefill chunk without
    logits, in one forward, padded or packed (kv.py); then a second step after every row rolled back. Every row's
    logits equal its own solo forward's: fp32 within 1e-4 for the Qwen2 model (CPU or accelerator), exactly for
    FakeLM."""
    if model_name == "fake":
        model, vocab = FakeLM(32), 32
    else:
        device = models.resolve_device(ACCELERATOR) if model_name.endswith("accelerator") else CPU
        model = models.load_model(str(tiny_dirs[1]), dtype=torch.float32, device=device) if device != CPU else tiny_verifier
        vocab = models.model_vocab_size(model)
    prefixes = [random_ids(n, vocab, seed=n) for n in (0, 1, 7, 30)]
    kvs = [SessionKV() for _ in prefixes]
    batched_forward(model, [Row(kv, p, False) for kv, p in zip(kvs, prefixes) if p])
    assert [kv.length for kv in kvs] == [0, 1, 7, 30]
    prefill = SessionKV()
    for step, lengths in enumerate([(1, 5, 3, 17), (4, 1, 9, 2)]):
        blocks = [random_ids(n, vocab, seed=100 * step + n) for n in lengths]
        rows = [Row(kv, block, True) for kv, block in zip(kvs, blocks)] + [Row(prefill, random_ids(20, vocab, step), False)]
        logits = forward(model, rows)
        assert logits[-1] is None and prefill.length == 20 * (step + 1)
        for prefix, block, row_logits in zip(prefixes, blocks, logits):
            assert row_logits.shape == (len(block), vocab)
            torch.testing.assert_close(row_logits, solo_logits(model, prefix, block), atol=1e-4, rtol=0)
        for i, (kv, block) in enumerate(zip(kvs, blocks)):  # commit all but the last token of each block...
            prefixes[i] = prefixes[i] + block[:-1]
            kv.truncate(len(prefixes[i]))  # ...so the next step overwrites a rolled-back key


def test_session_kv_grows_rolls_back_and_frees():
    kv = SessionKV()
    assert kv.nbytes == 0 and kv.length == 0
    first = torch.randn(3, 2, 2, 10, 4)  # [layers, 2, kv_heads, n, head_dim]
    kv.append(first)
    assert kv.length == 10 and kv.buffer.shape[3] == 16 and kv.nbytes == 3 * 2 * 2 * 16 * 4 * 4
    kv.truncate(6)  # rollback: a length decrement, the buffer stays
    second = torch.randn(3, 2, 2, 12, 4)
    kv.append(second)  # grows past 16 by doubling, keeping the valid part
    assert kv.length == 18 and kv.buffer.shape[3] == 32
    torch.testing.assert_close(kv.view(), torch.cat([first[:, :, :, :6], second], dim=3))
    with pytest.raises(AssertionError):
        kv.truncate(19)
    kv.free()
    assert kv.nbytes == 0 and kv.length == 0


def greedy_continuation(model: FakeLM, prefix: list[int], n: int) -> list[int]:
    out = list(prefix)
    for _ in range(n):
        out.append(int(model._logits(out).argmax()))
    return out[len(prefix):]


async def run_alone(model, prompt: list[int], drafts: list[list[int]], params: SamplingParams = GREEDY) -> list[int]:
    """The tokens one session commits on an engine of its own, verifying `drafts` in turn."""
    engine = Engine(model)
    session = engine.open(prompt, params)
    await engine.prefill(session)
    for draft in drafts:
        result, cost = await engine.verify(session, draft, None)
        assert cost.batch_sessions == 1
        if result.finish_reason:
            break
    engine.close(session)
    return session.tokens


async def test_one_step_serves_every_session_and_splits_its_cost():
    model = FakeLM(32)
    engine = Engine(model, max_batch_tokens=64)
    prompts = [[1, 2, 3], [4], list(range(9)), [5, 5]]
    sessions = [engine.open(p, GREEDY) for p in prompts]
    await asyncio.gather(*(engine.prefill(s) for s in sessions))
    truth = greedy_continuation(model, prompts[0], 4)
    drafts = [truth[:2] + [(truth[2] + 1) % 32], [], [7, 7, 7, 7, 7], [1]]  # gamma 3 (one rejection), 0, 5, 1
    steps = engine.stats().steps
    replies = await asyncio.gather(*(engine.verify(s, d, None) for s, d in zip(sessions, drafts)))
    assert engine.stats().steps == steps + 1  # all four in one forward
    assert replies[0][0].num_accepted == 2 and replies[0][0].next_token == truth[2]
    costs = [cost for _, cost in replies]
    assert {c.batch_sessions for c in costs} == {4} and {c.batch_tokens for c in costs} == {1 + 4 + 1 + 6 + 2 - 1}
    assert sum(c.share_s for c in costs) == pytest.approx(costs[0].compute_s)
    assert costs[2].share_s == pytest.approx(costs[0].compute_s * 6 / 13)  # 6 of the step's 13 tokens
    assert {c.prefill_tokens for c in costs} == {0}  # no prompt chunk rode in it
    for session, prompt, draft in zip(sessions, prompts, drafts):
        assert session.tokens == await run_alone(model, prompt, [draft])
        engine.close(session)
    assert engine.stats().kv_bytes == 0 and engine.stats().sessions == 0


@pytest.mark.parametrize("pads", [True, False])
async def test_long_prompt_is_chunked_and_does_not_stall_others(pads):
    """A packing backend (llama.cpp) runs a prompt chunk beside other sessions' rows; a padding one (transformers)
    runs them in steps of their own, in turn (each row would cost the chunk's length)."""
    model = FakeLM(32)
    engine = Engine(model, max_batch_tokens=8)
    engine.pads_rows = pads  # the scheduling alone: FakeLM runs either way
    short = engine.open([1, 2], SamplingParams(max_new_tokens=6))
    await engine.prefill(short)
    long = engine.open(list(range(30)) * 2, GREEDY)  # 59 tokens to cache in chunks of at most 8
    prefill = asyncio.create_task(engine.prefill(long))
    decoding = engine.decode(short)
    waited = []  # the prompt tokens of the chunk steps each decoding step waited through (padding)
    for _ in range(6):  # the short session decodes a token in every step (padding: every other one)
        result, cost = await decoding.next()
        if pads:  # its own step carried no chunk, but it may have waited through one
            assert (cost.batch_sessions, cost.steps, cost.batch_tokens) == (1, 1, 1)
            waited.append(cost.prefill_tokens)
        else:  # beside a chunk of the prompt
            assert (cost.batch_sessions, cost.steps) == (2, 1) and cost.batch_tokens <= 8 and cost.prefill_tokens
    assert result.finish_reason == "length" and not prefill.done()  # the short session finished first
    assert not pads or (8 in waited and set(waited) <= {0, 8})  # chunks of 8 ran between its steps
    cost = await prefill
    assert cost.steps >= 59 / 8 and long.kv.length == 59
    await engine.verify(long, [3, 4], None)
    assert long.tokens == await run_alone(model, list(range(30)) * 2, [[3, 4]])
    assert short.tokens == await run_alone(model, [1, 2], [[]] * 6, SamplingParams(max_new_tokens=6))


async def test_cancel_mid_step_and_while_queued_leaves_the_others_unchanged():
    model = GatedLM(32)
    model.gate.set()
    engine = Engine(model, max_batch_tokens=12)
    prompts = {"a": [1, 2, 3], "b": [4, 5], "c": [6], "d": [7, 8, 9, 10]}
    sessions = {name: engine.open(p, GREEDY) for name, p in prompts.items()}
    await asyncio.gather(*(engine.prefill(s) for s in sessions.values()))
    drafts = {"a": [3, 1], "b": [2, 2, 2], "c": [], "d": [9] * 8}  # d's 9 tokens do not fit beside the others
    model.gate.clear()
    model.entered.clear()
    tasks = {name: asyncio.create_task(engine.verify(s, drafts[name], None)) for name, s in sessions.items()}
    await wait_for(model.entered)  # a, b, c are in the running step; d waits in the queue
    assert engine.stats().queued == 1
    for name in ("b", "d"):  # b is cancelled mid-step, d while queued
        tasks[name].cancel()
        engine.close(sessions[name])
    assert engine.stats().queued == 0 and sessions["d"].kv.nbytes == 0
    assert sessions["b"].kv.nbytes > 0 and engine.stats().sessions == 3  # still used by the running step
    model.gate.set()
    await asyncio.gather(tasks["a"], tasks["c"])
    assert sessions["b"].kv.nbytes == 0 and engine.stats().sessions == 2
    for name in ("a", "c"):
        assert sessions[name].tokens == await run_alone(model, prompts[name], [drafts[name]])
        engine.close(sessions[name])
    stats = engine.stats()
    assert (stats.sessions, stats.kv_tokens, stats.kv_bytes, stats.queued) == (0, 0, 0, 0)


async def test_a_thousand_sessions_leave_no_kv_held():
    """Sessions of every kind and ending (length, stop token, client gone after prefill, cancelled at any
    point, chunked prefills), 50 at a time: once idle, the engine holds no KV and no session."""
    model = FakeLM(32)
    engine = Engine(model, max_batch_tokens=16)
    work_items = 0

    async def one(i: int) -> None:
        nonlocal work_items
        params = SamplingParams(max_new_tokens=1 + i % 4, stop_token_ids=(i % 32,) if i % 5 == 0 else ())
        session = engine.open([i % 32] * (1 + i % 23), params)
        try:
            work_items += 1
            await engine.prefill(session)
            if i % 7 == 0:
                return
            decoding = engine.decode(session) if i % 2 else None
            result = None
            while result is None or result.finish_reason is None:
                work_items += 1
                result, _ = await (decoding.next() if decoding else engine.verify(session, [i % 32] * (i % 5), None))
        finally:
            engine.close(session)

    loop = asyncio.get_running_loop()
    for start in range(0, 1000, 50):
        tasks = [asyncio.create_task(one(i)) for i in range(start, start + 50)]
        for i in range(start, start + 50, 6):
            loop.call_later(0.001 * (i % 4), tasks[i - start].cancel)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(o is None or isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
    stats = engine.stats()
    assert (stats.sessions, stats.kv_tokens, stats.kv_bytes, stats.queued) == (0, 0, 0, 0)
    assert 0 < stats.steps < work_items / 2  # batched: several sessions per step


class SlowLM(FakeLM):
    """A FakeLM whose every forward takes `step_s`, like a real model's step."""

    def __init__(self, vocab_size: int, step_s: float):
        super().__init__(vocab_size)
        self.step_s = step_s

    def forward(self, *args, **kwargs):
        threading.Event().wait(self.step_s)
        return super().forward(*args, **kwargs)


@pytest.mark.slow  # ~2 s of deliberately slow steps
async def test_lock_step_sessions_that_arrive_apart_still_share_every_step():
    """Three Speculate-like sessions answer each verdict after 1, 4 and 7 ms (their round trip): the engine
    waits for the last step's sessions (bounded) instead of splitting them into alternating steps."""
    model = SlowLM(32, step_s=0.2)
    engine = Engine(model, batch_wait_s=0.2)  # capped at a quarter of a step: 50 ms
    sessions = [engine.open([1, 2, 3 + i], GREEDY) for i in range(3)]
    await asyncio.gather(*(engine.prefill(s) for s in sessions))
    batch_sizes: list[int] = []

    async def client(session, delay_s: float) -> None:
        for _ in range(4):
            await asyncio.sleep(delay_s)
            _, cost = await engine.verify(session, [], None)
            batch_sizes.append(cost.batch_sessions)

    await asyncio.gather(*(client(s, d) for s, d in zip(sessions, (0.001, 0.004, 0.007))))
    assert batch_sizes == [3] * 12
    for session in sessions:
        assert session.tokens == await run_alone(FakeLM(32), session.tokens[:3], [[]] * 4)
        engine.close(session)


async def test_the_engine_tells_the_budgeter_which_sessions_miss_steps():
    """A lock-step session's blocks that carry drafts come some time after its verdict (drafting and the round trip;
    the first is not counted, its drafting may include the draft model's prefill of the prompt). One slower than the
    engine's wait for the last step's sessions (here 0 s) misses steps when it drafts, and the budgeter is told; a
    session sending plain blocks is not, however long it takes."""
    budgeter = DraftBudgeter(max_gamma=4)
    engine = Engine(FakeLM(32), batch_wait_s=0.0, budgeter=budgeter)
    drafting, plain = engine.open([1, 2, 3], GREEDY), engine.open([4, 5, 6], GREEDY)
    await asyncio.gather(engine.prefill(drafting), engine.prefill(plain))
    for _ in range(3):
        await asyncio.sleep(0.001)  # any gap between a verdict and the next block
        await asyncio.gather(engine.verify(drafting, [7], None), engine.verify(plain, [], None))
    assert drafting.drafted_blocks == 3 and drafting.turnaround_s > 0 and plain.turnaround_s is None
    assert budgeter._sessions[drafting].slow and not budgeter._sessions[plain].slow
    assert budgeter._sessions[drafting].wait_s == drafting.turnaround_s and budgeter.hold_s == 0.0  # its wait: none
    engine.close(drafting)
    engine.close(plain)


async def test_a_failing_grant_leaves_the_session_decoding_and_the_engine_running():
    """A budgeter that raises (a bug in a grant) is logged and grants 0: the step's verdicts still arrive, and
    the engine keeps stepping. Before, the error ended the engine's loop and every session waited forever."""
    class Broken(DraftBudgeter):
        def budget_for(self, *args, **kwargs):
            raise KeyError("a grant's bug")

    engine = Engine(FakeLM(32), budgeter=Broken(max_gamma=4))
    session = engine.open([1, 2, 3], GREEDY)
    await engine.prefill(session)
    result, _ = await asyncio.wait_for(engine.verify(session, [7], None), 30)
    assert session.budget == 0 and result.committed
    result, _ = await asyncio.wait_for(engine.verify(session, [], None), 30)
    assert len(result.committed) == 1
    engine.close(session)


async def test_a_session_whose_outcome_cannot_be_applied_fails_alone():
    """An exception while the event loop applies one session's outcome fails that session's work only: the
    engine goes on, and the other sessions of the step get their verdicts and later steps."""
    model = FakeLM(32)
    engine = Engine(model, max_batch_tokens=64)
    broken, fine = engine.open([1, 2, 3], GREEDY), engine.open([4, 5], GREEDY)
    await asyncio.gather(engine.prefill(broken), engine.prefill(fine))

    def commit(*_):
        raise RuntimeError("cannot apply")

    broken.commit = commit
    replies = await asyncio.wait_for(asyncio.gather(engine.verify(broken, [7], None), engine.verify(fine, [7], None),
                                                    return_exceptions=True), 30)  # without the guard: a hang
    assert isinstance(replies[0], RuntimeError) and replies[1][0].next_token is not None
    result, _ = await asyncio.wait_for(engine.verify(fine, [], None), 30)  # the engine still steps
    assert len(fine.generated()) == len(replies[1][0].committed) + len(result.committed)


async def test_a_block_riding_with_a_prompt_chunk_says_so():
    """StepCost.prefill_tokens: the client takes no block cost from such a step (draft_worker/loop.py `_block_s`)."""
    model = FakeLM(32)
    engine = Engine(model, max_batch_tokens=64)
    engine.pads_rows = False  # a packing backend's scheduling: a padding one runs prompt chunks apart
    old = engine.open([1, 2, 3], GREEDY)
    await engine.prefill(old)
    new = engine.open(list(range(20)), GREEDY)
    (_, cost), _ = await asyncio.gather(engine.verify(old, [4, 5], None), engine.prefill(new))
    assert cost.prefill_tokens == 19 and cost.batch_tokens == 3 + 19  # the prompt but its last token


async def test_a_block_that_waited_through_a_prompt_chunks_step_says_so():
    """A padding backend runs prompt chunks and blocks in separate steps, so a block queued behind a prompt chunk
    waits for that step: its service time is the prompt's (2.6 s of 2.97 on the real pair at 2 sessions), and the
    client must not price its block size by it (a draft token at 0.67 s made a 2-session n-gram schedule give up)."""
    model = FakeLM(32)
    engine = Engine(model, max_batch_tokens=64)
    engine.pads_rows = True
    old = engine.open([1, 2, 3], GREEDY)
    await engine.prefill(old)
    new = engine.open(list(range(20)), GREEDY)
    _, (_, cost) = await asyncio.gather(engine.prefill(new), engine.verify(old, [4, 5], None))
    assert cost.batch_tokens == 3 and cost.steps == 1  # its own step carried only the block
    assert cost.prefill_tokens == 19  # the step it waited through carried the prompt
    _, cost = await engine.verify(old, [6], None)
    assert cost.prefill_tokens == 0  # nothing ahead of it this time
