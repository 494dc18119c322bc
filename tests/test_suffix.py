"""Issue 21: the suffix drafter (draft_worker/suffix.py).

The index: matches and frequencies by hand, incremental append/rollback equal to a batch build, the shared
cache bounded over 10,000 requests with exact accounting; drafting: length follows confidence, the cache
carries outputs across sessions, q is a valid distribution the draft samples from (a chi-square test through
exact verification); the CLI and bench config take it; greedy output through the tiny pair equals verifier-only.
"""

from __future__ import annotations

import random

import pytest
import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import DrafterSpec, DraftModels, build_drafter
from draft_worker.suffix import SuffixCache, SuffixConfig, SuffixDrafter, SuffixIndex, longest_match
from draft_worker.transport import fetch_info
from orchestrator import cli
from orchestrator import config as bench_config
from specdec import models
from specdec.config import SamplingParams
from specdec.sampling import make_generator, sample, verify_sampling
from specdec.tiny import DEFAULT_TEXTS
from tests.stubs import chi_square_p_value

GREEDY = SamplingParams()


def batch_index(tokens: list[int], depth: int, start: int = 1) -> dict[int, dict[int, int]]:
    index = SuffixIndex(depth)
    for i in range(start, len(tokens)):
        index.add(tokens, i)
    return index.nodes


def merged(*indexes: SuffixIndex) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    for index in indexes:
        for key, node in index.nodes.items():
            slot = out.setdefault(key, {})
            for token, count in node.items():
                slot[token] = slot.get(token, 0) + count
    return out


def drafter(prompt: list[int], cache: SuffixCache | None = None, params: SamplingParams = GREEDY, vocab: int = 32,
            **config) -> SuffixDrafter:
    d = SuffixDrafter(cache, SuffixConfig(**config))
    d.start(prompt, params, vocab)
    return d


# ------------------------------------------------------------------------------------------------- the index
def test_longest_match_and_its_frequencies():
    tokens = [1, 2, 3, 1, 2, 4, 1, 2]
    index = SuffixIndex(8)
    for i in range(1, len(tokens)):
        index.add(tokens, i)
    assert longest_match([index], tokens, 8) == (2, {3: 1, 4: 1})  # "1 2" recurs; "4 1 2" has no follower yet
    assert longest_match([index], [9, 3], 8) == (1, {1: 1})  # only "3" matches
    assert longest_match([index], [9], 8) == (0, {})
    assert longest_match([index], [5, 2], 8) == (1, {3: 1, 4: 1})
    # two indexes answer as one: their counts add
    other = SuffixIndex(8)
    for i in range(1, 4):
        other.add([7, 1, 2, 4], i)
    assert longest_match([index, other], [0, 1, 2], 8) == (2, {3: 1, 4: 2})
    assert longest_match([index, other], [7, 1, 2], 8) == (3, {4: 1})


def test_incremental_sync_equals_a_batch_build():
    """Random contexts that extend, diverge and shrink: the drafter's indexes always equal a batch build."""
    rng = random.Random(0)
    cache = SuffixCache(10_000, depth=5)
    prompt = [rng.randrange(6) for _ in range(30)]
    d = drafter(prompt, cache, depth=5)
    context = list(prompt)
    for _ in range(200):
        cut = rng.randrange(len(prompt) - 3, len(context) + 1)  # sometimes into the prompt
        context = context[:cut] + [rng.randrange(6) for _ in range(rng.randrange(0, 8))]
        d.propose(context, 3)
        assert merged(d.prompt_index, cache.index) == batch_index(context, 5)
        assert cache.size == sum(len(e.tokens) for e in cache.entries.values())
    assert d.boundary < len(prompt)  # the context did leave the prompt


def test_a_session_evicted_from_a_small_cache_keeps_matching_its_own_output():
    cache = SuffixCache(12, depth=4)
    d = drafter([1, 2, 3], cache, depth=4)
    loop = [10, 11, 12, 13, 14]
    context = [1, 2, 3, *loop]
    assert d.propose(context, 3).draft_ids == [] and d.publishing  # the output is in the cache, not yet repeated
    context += loop * 2  # 18 tokens: over the cache's 12, so its own entry is evicted
    assert d.propose(context, 3).draft_ids == [10, 11, 12] and not d.publishing and not cache.entries
    assert cache.size == 0 and not cache.index.nodes
    assert d.output_index.nodes == batch_index(context, 4, start=3)  # the private index took over, exactly
    context = context[:-2] + [7]  # and syncs incrementally from then on
    d.propose(context, 3)
    assert d.output_index.nodes == batch_index(context, 4, start=3)


@pytest.mark.slow  # ~3 s
def test_the_cache_stays_under_its_bound_over_10000_requests():
    rng = random.Random(1)
    bound, depth = 1500, 4
    cache = SuffixCache(bound, depth)
    phrases = [[rng.randrange(50) for _ in range(5)] for _ in range(20)]
    most = 0
    for request in range(10_000):
        d = drafter([rng.randrange(50) for _ in range(4)], cache, vocab=50, depth=depth)
        context = list(d.tokens)
        for _ in range(2):
            context += rng.choice(phrases)
            d.propose(context, 4)
        assert cache.size <= bound and len(cache.index) <= depth * cache.size
        most = max(most, cache.size)
    assert most > bound - 30  # it filled up, and evicted from then on
    live = sum(len(e.tokens) - e.counted_from for e in cache.entries.values())
    assert len(cache.entries) < 10_000 and cache.size == sum(len(e.tokens) for e in cache.entries.values())
    # exact accounting: the index is the batch build of exactly what the live entries hold
    rebuilt = SuffixIndex(depth)
    for e in cache.entries.values():
        for i in range(e.counted_from, len(e.tokens)):
            rebuilt.add(e.tokens, i)
    assert cache.index.nodes == rebuilt.nodes and live > 0


# ------------------------------------------------------------------------------------------------- drafting
def test_draft_length_follows_confidence():
    loop = [1, 2, 3, 4, 5, 6, 7, 8]
    d = drafter(loop * 3, None)
    assert d.propose(loop * 3, 6).draft_ids == [1, 2, 3, 4, 5, 6]  # predictable: drafts the whole gamma
    assert d.propose(loop * 3, 20).draft_ids == (loop * 2)[:16]  # capped by the match length (depth 16)
    ambiguous = [9, 1, 9, 2, 9, 3, 9, 4, 9]  # after 9: four continuations, each 1/4
    assert drafter(ambiguous, min_prob=0.3).propose(ambiguous, 4).draft_ids == []
    assert drafter(ambiguous, min_prob=0.2).propose(ambiguous, 4).draft_ids == [1]  # most frequent, lowest id
    # a one-token match drafts at most ceil(1 x spec_factor) tokens
    assert drafter([5, 6, 7, 5], spec_factor=1.0).propose([5, 6, 7, 5], 4).draft_ids == [6]
    assert drafter([5, 6, 7, 5], spec_factor=2.0).propose([5, 6, 7, 5], 4).draft_ids == [6, 7]


def test_the_cache_carries_outputs_to_later_sessions_and_takes_back_rollbacks():
    cache = SuffixCache(1000, depth=16)
    answer = [20, 21, 22, 23, 24, 25]
    first = drafter([1, 2, 3], cache)
    first.propose([1, 2, 3, *answer], 4)  # its output so far goes into the cache
    first.propose([1, 2, 3, *answer, 26, 27], 4)
    later = drafter([7, 8, 20], cache)
    assert later.propose([7, 8, 20], 8).draft_ids == [21]  # a one-token match: one token
    assert later.propose([7, 8, 20, 21, 22], 8).draft_ids == [23, 24, 25]
    first.propose([1, 2, 3, 20, 99], 4)  # a divergent context: its tail is taken back from the cache
    assert later.propose([7, 8, 20, 21, 22], 8).draft_ids == []
    assert drafter([20, 21], None).propose([20, 21], 4).draft_ids == []  # without the cache nothing matches


def test_build_drafter_shares_one_cache_per_process():
    models_ = DraftModels()
    spec = DrafterSpec(kind="suffix", suffix_cache_tokens=500)
    a, b = build_drafter(spec, models_, "fp"), build_drafter(spec, models_, "fp")
    assert a.cache is b.cache and a.cache.max_tokens == 500 and a.fingerprint == "fp"
    assert build_drafter(spec, models_, "other").cache is not a.cache  # another tokenizer, another cache
    assert build_drafter(DrafterSpec(kind="suffix", suffix_cache_tokens=0), models_, "fp").propose  # no cache: fine
    with pytest.raises(ValueError, match="min_prob"):
        build_drafter(DrafterSpec(kind="suffix", suffix_min_prob=2.0), models_, "fp")


def test_cli_and_bench_config_take_the_suffix_drafter():
    args = cli.build_parser().parse_args(["generate", "--verifier", "h:1", "--drafter", "suffix", "--prompt", "x",
                                          "--suffix-cache-tokens", "100", "--suffix-min-prob", "0.2"])
    spec = cli._drafter_spec(args)
    assert (spec.kind, spec.suffix_cache_tokens, spec.suffix_min_prob) == ("suffix", 100, 0.2)
    assert cli._drafter_spec(cli.build_parser().parse_args(
        ["generate", "--verifier", "h:1", "--drafter", "ngram", "--prompt", "x"])).kind == "ngram"
    cfg = bench_config.from_dict({"drafts": [{"name": "sfx", "kind": "suffix"}]})
    assert [s.drafter_spec.kind for s in bench_config.expand(cfg) if s.drafter != "baseline"] == ["suffix"]


def test_sampling_q_is_the_frequencies_and_keeps_the_verifiers_distribution():
    """q is the continuation frequencies; the draft is drawn from it; and exact verification of those drafts
    commits tokens distributed as the target (the joint law of the first two, chi-square)."""
    vocab = 5
    context = [0, 1, 0, 1, 0, 3, 0, 1, 0, 4, 0]  # after "0": 1 x3, 3 x1, 4 x1
    params = SamplingParams(temperature=1.0, seed=11)
    d = drafter(context, None, params, vocab=vocab, min_prob=0.0, spec_factor=2.0)
    candidates = d.propose(context, 1)
    torch.testing.assert_close(candidates.q[0], torch.tensor([0.0, 0.6, 0.0, 0.2, 0.2]), atol=1e-3, rtol=0)  # fp16
    g = torch.Generator().manual_seed(0)
    p0 = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)  # [vocab] target at the first position
    p1 = torch.softmax(torch.randn(vocab, vocab, generator=g) * 1.5, -1)  # [vocab, vocab] given the first token
    joint = (p0[:, None] * p1).flatten()  # [vocab ** 2]
    verifier = make_generator(5)
    cells, drafted = [], torch.zeros(vocab, dtype=torch.long)
    for _ in range(3000):
        candidates = d.propose(context, 2)
        ids = candidates.draft_ids
        assert ids and candidates.q.shape == (len(ids), vocab) and torch.allclose(candidates.q.sum(-1), torch.ones(len(ids)))
        assert all(float(candidates.q[i, t]) > 0 for i, t in enumerate(ids))
        drafted[ids[0]] += 1
        rows = torch.stack([p0, p1[ids[0]], p0])[: len(ids) + 1]  # row i scores the token after draft i - 1
        accepted, next_token = verify_sampling(torch.tensor(ids), candidates.q, rows, verifier)
        committed = [*ids[:accepted], next_token]
        if len(committed) < 2:
            committed.append(int(sample(p1[committed[0]], verifier)))
        cells.append(committed[0] * vocab + committed[1])
    assert chi_square_p_value(drafted, torch.tensor([0.0, 0.6, 0.0, 0.2, 0.2])) > 1e-4  # drawn from q
    counts = torch.bincount(torch.tensor(cells), minlength=vocab**2)
    assert chi_square_p_value(counts, joint) > 1e-4


# ------------------------------------------------------------------------------------------- tiny pair e2e
async def test_greedy_suffix_drafter_is_lossless(tiny_dirs, start_verifier):
    """Greedy through the real client and verifier: identical to verifier-only, cold and with a warm cache."""
    _, verifier_dir = tiny_dirs
    target = models.load_model(str(verifier_dir), dtype=torch.float32, device=torch.device("cpu"))
    tokenizer = models.load_tokenizer(str(verifier_dir))
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target), fingerprint=fingerprint)
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=40)
    draft_models, spec = DraftModels(), DrafterSpec(kind="suffix")
    prompts = [tokenizer(text)["input_ids"][:300] for text in [*DEFAULT_TEXTS[:2], "The"]]
    accepted = {}
    for warm in (False, True):
        accepted[warm] = 0
        for prompt in prompts:
            baseline = await generate_baseline(verifier.stub, prompt, params)
            for gamma in (2, 5):
                spec_result = await speculate(verifier.stub, build_drafter(spec, draft_models, fingerprint), prompt,
                                              params, gamma, info, tokenizer_fingerprint=fingerprint)
                assert spec_result.token_ids == baseline.token_ids, (warm, gamma)
                accepted[warm] += spec_result.accepted
    assert accepted[True] > 0 and accepted[True] >= accepted[False]


# -------------------------------------------------------------------------------------------- tree producer
def test_suffix_tree_offers_the_top_branches_within_its_node_limit():
    from draft_worker.trees import suffix_tree
    from specdec import tree

    text = [9, 1, 5, 6, 9, 1, 5, 6, 9, 2, 7, 8, 9]  # after 9: 1 (x2) then 5 6 9, or 2 (x1) then 7 8
    d = drafter(text, min_prob=0.1)
    tokens, parents, q = suffix_tree(d, text, max_nodes=6)
    # best-first by the product of frequencies: 1 5 6 9 (2/3 each), then 2 (1/3, offered first) and the
    # continuation after "5 6 9" (1 or 2, 1/2 x 2/3 = 1/3 each)
    assert (tokens, parents, q) == ([1, 5, 6, 9, 2, 1], [-1, 0, 1, 2, -1, 3], None)
    tree.validate_tree(torch.tensor(tokens), torch.tensor(parents), max_nodes=6, vocab_size=32)
    assert suffix_tree(d, text, max_nodes=3)[:2] == ([1, 5, 6], [-1, 0, 1])
    assert suffix_tree(drafter(text, min_prob=0.5), text, max_nodes=6)[:2] == ([1, 5, 6, 9], [-1, 0, 1, 2])
    # the verifier takes the second branch: the tree keeps 2 (and the bonus token) where the chain keeps nothing
    logits = torch.zeros(len(tokens) + 1, 32)
    logits[0, 2] = logits[5, 7] = 1.0  # after the root: 2; after node 4 (the 2): 7
    assert tree.verify_tree_greedy(torch.tensor(tokens), torch.tensor(parents), logits) == ([4], 7)
    assert d.propose(text, 6).draft_ids == [1]  # the chain (capped by its 1-token match): rejected
    sampled = drafter(text, params=SamplingParams(temperature=1.0, seed=0))
    tokens, parents, q = suffix_tree(sampled, text, max_nodes=4)
    assert torch.equal(q, torch.nn.functional.one_hot(torch.tensor(tokens), 32).float())
