"""The llama.cpp verifier backend on the tiny verifier written as an fp32 GGUF: batched rows equal solo rows,
rollback equals a fresh evaluation, sequences are freed and reused, greedy speculation over gRPC equals the
backend's own verifier-only output, sampling keeps its distribution (χ² through the engine, many sessions
per step), and without llama-cpp-python `--backend llama.cpp` fails with one line saying how to install it."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import grpc
import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec, models
from specdec.config import SamplingParams
from specdec.sampling import logits_to_probs
from specdec.tiny import DEFAULT_TEXTS, write_gguf
from tests.stubs import chi_square_p_value
from tests.test_batching import assert_idle
from verifier_worker.engine import Engine
from verifier_worker.kv import Row

CPU = torch.device("cpu")
VOCAB = 512
needs_llamacpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed: pip install -e '.[llamacpp]' with the README's CMAKE_ARGS",
)


@pytest.fixture(scope="module")
def backend(tiny_dirs, tmp_path_factory):
    from verifier_worker.llamacpp_backend import LlamaCppBackend, LlamaCppConfig

    gguf = write_gguf(tiny_dirs[1], tmp_path_factory.mktemp("gguf") / "tiny-verifier.gguf")
    backend = LlamaCppBackend(str(gguf), LlamaCppConfig(n_ctx=4096, n_seq_max=64, n_threads=1))
    yield backend
    backend.close()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh(backend, chunks: list[list[int]]) -> torch.Tensor:
    """Logits of the last chunk on a new sequence fed `chunks` one forward each."""
    kv = backend.new_kv()
    try:
        for chunk in chunks:
            logits = backend.forward([Row(kv, chunk, True)])[0]
        return logits
    finally:
        kv.free()


@needs_llamacpp
def test_batched_rows_equal_solo_rows(backend):
    """Rows of different cached lengths (0 included) and block lengths, plus a prefill chunk without logits,
    in one llama_decode; then a second step after every row rolled back. Each row's logits equal its own
    forward on a fresh sequence (fp32 GGUF: other kernels and batch shapes round differently, within 1e-3)."""
    assert backend.vocab_size == VOCAB
    prefixes = [random_ids(n, seed=n) for n in (0, 1, 7, 30)]
    kvs = [backend.new_kv() for _ in prefixes]
    assert backend.forward([Row(kv, p, False) for kv, p in zip(kvs, prefixes) if p]) == [None, None, None]
    prefill = backend.new_kv()
    for step, lengths in enumerate([(1, 5, 3, 17), (4, 1, 9, 2)]):
        blocks = [random_ids(n, seed=100 * step + n) for n in lengths]
        rows = [Row(kv, block, True) for kv, block in zip(kvs, blocks)] + [Row(prefill, random_ids(20, step), False)]
        logits = backend.forward(rows)
        assert logits[-1] is None and prefill.length == 20 * (step + 1)
        for prefix, block, row_logits in zip(prefixes, blocks, logits):
            assert row_logits.shape == (len(block), VOCAB)
            solo = fresh(backend, [prefix, block] if prefix else [block])
            torch.testing.assert_close(row_logits, solo, atol=1e-3, rtol=0)
            assert torch.equal(row_logits.argmax(-1), solo.argmax(-1))
        for i, (kv, block) in enumerate(zip(kvs, blocks)):  # commit all but the last token of each block...
            prefixes[i] = prefixes[i] + block[:-1]
            kv.truncate(len(prefixes[i]))  # ...so the next step writes over a rolled-back position
    for kv in [*kvs, prefill]:
        kv.free()


@needs_llamacpp
def test_rollback_equals_a_fresh_evaluation_and_frees_the_tail(backend):
    from llama_cpp import llama_get_memory, llama_memory_seq_pos_max

    memory = llama_get_memory(backend._ctx)
    prompt, block = random_ids(12, seed=1), random_ids(6, seed=2)  # [last committed] + 5 drafts
    kv = backend.new_kv()
    backend.forward([Row(kv, prompt, False)])
    backend.forward([Row(kv, block, True)])
    assert kv.length == 18 and kv.nbytes == 18 * backend.bytes_per_token
    kv.truncate(12 + 3)  # two drafts accepted: the block's first three tokens stay cached
    nxt = [7, *random_ids(3, seed=3)]  # the recovered token opens the next block
    logits = backend.forward([Row(kv, nxt, True)])[0]
    assert llama_memory_seq_pos_max(memory, kv.seq_id) == 12 + 3 + 4 - 1  # the rejected tail is gone
    expected = fresh(backend, [prompt + block[:3], nxt])  # the committed tokens evaluated from scratch
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    seq_id = kv.seq_id
    kv.free()
    assert kv.nbytes == 0
    other = backend.new_kv()  # the freed id serves the next session, empty
    assert other.seq_id == seq_id and llama_memory_seq_pos_max(memory, seq_id) == 18  # cleared lazily...
    torch.testing.assert_close(backend.forward([Row(other, nxt, True)])[0], fresh(backend, [nxt]), atol=1e-3, rtol=0)
    assert llama_memory_seq_pos_max(memory, seq_id) == 3  # ...by the next decode, before it runs
    other.free()


@needs_llamacpp
async def test_greedy_speculation_equals_its_verifier_only_output(backend, tiny_dirs, start_verifier):
    """Over gRPC, tiny torch draft and llama.cpp verifier: speculative output == verifier-only output."""
    tokenizer = models.load_tokenizer(str(tiny_dirs[1]))
    draft = models.load_model(str(tiny_dirs[0]), dtype=torch.float32, device=CPU)
    verifier = await start_verifier(backend, vocab_size=VOCAB)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=32)
    accepted = proposed = 0
    for text in [*DEFAULT_TEXTS[:2], "The"]:
        prompt = tokenizer(text)["input_ids"][:200]
        baseline = await generate_baseline(verifier.stub, prompt, params)
        for gamma in (1, 4):
            spec = await speculate(verifier.stub, LMDrafter(draft, "tiny-draft"), prompt, params, gamma, info)
            assert spec.token_ids == baseline.token_ids
            accepted, proposed = accepted + spec.accepted, proposed + spec.proposed
    assert 0 < accepted < proposed  # both accepts and rejections (rollback) happened
    await assert_idle(verifier)  # every session's sequence was freed


@needs_llamacpp
async def test_sampling_through_the_llamacpp_engine_keeps_the_verifiers_distribution(backend):
    """Top-k 3, two draft tokens from a fixed q per position, 720 sessions, 48 per step: the joint law of the
    first two committed tokens equals llama.cpp's own p(t1) p(t2 | t1) and differs from q's."""
    top_k = 3
    params = SamplingParams(temperature=1.0, top_k=top_k, max_new_tokens=2)
    prompt = random_ids(10, seed=5)
    p1 = logits_to_probs(fresh(backend, [prompt])[-1], params)  # [vocab]
    support = p1.nonzero().flatten().tolist()
    joint = torch.zeros(VOCAB, VOCAB)  # [t1, t2]
    for a in support:
        joint[a] = p1[a] * logits_to_probs(fresh(backend, [prompt, [a]])[-1], params)
    # q: uniform over the verifier's top-3 and two tokens outside it (so rejections happen)
    q = torch.zeros(VOCAB)
    q[support + [t for t in range(VOCAB) if t not in support][:2]] = 0.2
    engine = Engine(backend, max_batch_tokens=512)
    counts = torch.zeros(VOCAB * VOCAB)

    async def one(seed: int) -> None:
        session = engine.open(prompt, SamplingParams(temperature=1.0, top_k=top_k, max_new_tokens=2, seed=seed))
        await engine.prefill(session)
        g = torch.Generator().manual_seed(10_000 + seed)
        draft = torch.multinomial(q, 2, replacement=True, generator=g).tolist()
        await engine.verify(session, draft, torch.stack([q, q]))  # [gamma, vocab]
        while session.finish_reason is None:  # the first draft was rejected: t2 from a plain step
            await engine.verify(session, [], None)
        t1, t2 = session.generated()
        counts[t1 * VOCAB + t2] += 1
        engine.close(session)

    for start in range(0, 720, 48):
        await asyncio.gather(*(one(seed) for seed in range(start, start + 48)))
    assert engine.stats().kv_bytes == 0
    assert chi_square_p_value(counts, joint.flatten()) > 1e-4
    q_joint = (q[:, None] * q[None, :]).flatten()
    assert chi_square_p_value(counts, q_joint) < 1e-6  # the test can tell the two apart


async def generate_status(stub, prompt: list[int], params: SamplingParams) -> tuple[grpc.StatusCode, str, int]:
    """(status, details, tokens) of one raw Generate call (no client retries)."""
    tokens = 0
    call = stub.Generate(pb.GenerateRequest(prompt_ids=prompt, params=codec.params_to_proto(params)), timeout=120)
    try:
        async for reply in call:
            tokens += len(reply.token_ids)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details(), tokens
    return grpc.StatusCode.OK, "", tokens


@needs_llamacpp
async def test_a_full_kv_cache_refuses_new_sessions_and_never_fails_a_step(backend, start_verifier):
    """n_ctx 256 cells; four concurrent Generates that may each need 20 + 64 + 16 = 100 cells: two are
    admitted and finish, two are refused with RESOURCE_EXHAUSTED naming --n-ctx (without admission control
    all four run and llama_decode runs out of cells, failing every session of the step). A session that could
    never fit is refused too; once the cache is free again, a session is admitted."""
    from verifier_worker.llamacpp_backend import LlamaCppBackend, LlamaCppConfig

    small = LlamaCppBackend(str(backend.path), LlamaCppConfig(n_ctx=256, n_seq_max=8, n_threads=1))
    try:
        verifier = await start_verifier(small, vocab_size=VOCAB)
        params = SamplingParams(max_new_tokens=64)
        results = await asyncio.gather(*(generate_status(verifier.stub, random_ids(20, seed), params) for seed in range(4)))
        codes = sorted((code.name, tokens) for code, _, tokens in results)
        assert codes == [("OK", 64), ("OK", 64), ("RESOURCE_EXHAUSTED", 0), ("RESOURCE_EXHAUSTED", 0)], results
        assert all("--n-ctx" in details and "retry later" in details for code, details, _ in results if code.name != "OK")
        code, details, _ = await generate_status(verifier.stub, random_ids(20, 9), SamplingParams(max_new_tokens=300))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "more than all of it" in details, details
        await assert_idle(verifier)
        assert (await generate_status(verifier.stub, random_ids(20, 10), params))[0] == grpc.StatusCode.OK
    finally:
        small.close()


@needs_llamacpp
def test_serve_loads_a_gguf_with_its_own_tokenizers_fingerprint(backend, tmp_path, monkeypatch):
    """Info for --backend llama.cpp: the GGUF's vocabulary width and the fingerprint of the tokenizer
    transformers reads from the same file (what a draft loaded from it sends), so the pair check passes."""
    import argparse

    from transformers import AutoTokenizer

    from specdec.config import VerifierLimits
    from verifier_worker.serve import _load_llamacpp

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    gguf = backend.path
    args = argparse.Namespace(model=str(gguf), n_ctx=256, threads=1)
    served, info = _load_llamacpp(args, VerifierLimits(max_sessions=4, max_batch_tokens=64))
    try:
        direct = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        assert info.tokenizer_fingerprint == models.tokenizer_fingerprint(direct)
        assert info.vocab_size == served.vocab_size == VOCAB and info.dtype.startswith("gguf qwen2")
        assert (served.config.n_seq_max, served.config.n_batch, served.config.n_ctx) == (4, 512, 256)
    finally:
        served.close()


def test_backend_llamacpp_without_the_extra_fails_with_an_install_line(monkeypatch, capsys):
    """llama_cpp made unimportable: serve-verifier exits 1 with one line naming the extra and CMAKE_ARGS."""
    from verifier_worker.serve import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    assert main(["--model", "x.gguf", "--backend", "llama.cpp", "--port", "0"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdec: error: --backend llama.cpp:"), lines
    assert "pip install 'specdec[llamacpp]'" in lines[0] and "CMAKE_ARGS" in lines[0]
