"""Issue 21: token trees in the verifier's engine, with the tiny seeded verifier (no gRPC here).

Tree masks reduce to today's causal tensors on a chain; greedy trees (branches sharing a prefix, trees where no
branch is accepted) commit exactly the verifier-only tokens; the KV after a tree step holds exactly the accepted
path (the next step's logits equal a fresh forward over the committed tokens); a tree over the session's budget
is pruned to its first nodes.
"""

from __future__ import annotations

import pytest
import torch

from specdec import models
from specdec.config import SamplingParams
from verifier_worker.engine import Engine
from verifier_worker.kv import Row, SessionKV, batched_forward, packed_forward, packed_inputs, padded_inputs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def verifier(tiny_dirs):
    return models.load_model(str(tiny_dirs[1]), dtype=torch.float32, device=CPU)


def test_a_chain_tree_gives_todays_tensors():
    lengths, new = [3, 0, 5], [[1, 2, 3], [4], [5, 6]]
    chain = [[-1, 0], None, [-1]]  # row 0: root + 2 nodes in a chain; row 2: root + 1 node
    for got, want in zip(padded_inputs(lengths, new, CPU, chain), padded_inputs(lengths, new, CPU)):
        assert torch.equal(got, want)
    _, positions, mask = padded_inputs(lengths, new, CPU, [[-1, -1], None, None])  # root -> {0, 1}: siblings
    assert positions[0].tolist() == [3, 4, 4]
    assert mask[0, 0, :3, 5:].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]  # keys after L_max = 5


def test_a_packed_tree_row_sees_what_its_padded_row_sees(verifier):
    """kv.packed_forward: a chain's parents give the causal tensors; a tree row beside a chain row and a row with no
    past scores, and caches, what the padded route does (its own past and its ancestors only)."""
    lengths, new = [3, 0, 5], [[1, 2, 3], [4], [5, 6]]
    chain = [[-1, 0], None, [-1]]
    for got, want in zip(packed_inputs(lengths, new, CPU, chain), packed_inputs(lengths, new, CPU)):
        assert torch.equal(got, want)
    _, positions, mask = packed_inputs(lengths, new, CPU, [[-1, -1], None, None])  # root -> {0, 1}: siblings
    assert positions[0].tolist() == [3, 4, 4, 0, 5, 6]
    assert mask[0, 0, :3, :8].int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]] * 3  # its 3 past keys, no one else's
    assert mask[0, 0, :3, 8:].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]]
    vocab = models.model_vocab_size(verifier)
    prefixes = [[(7 * i + 3) % vocab for i in range(n)] for n in (6, 0, 11)]
    blocks, parents = [[5, 9, 2, 8], [4], [1, 3]], [[-1, -1, 0], None, None]  # root -> {a, b}, a -> c
    routes = {}
    for name, forward in [("padded", batched_forward), ("packed", packed_forward)]:
        kvs = [SessionKV() for _ in prefixes]
        batched_forward(verifier, [Row(kv, p, False) for kv, p in zip(kvs, prefixes) if p])
        logits = forward(verifier, [Row(kv, b, True, ps) for kv, b, ps in zip(kvs, blocks, parents)])
        routes[name] = logits, [kv.view() for kv in kvs]
    for got, want in zip(routes["packed"][0] + routes["packed"][1], routes["padded"][0] + routes["padded"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


async def verifier_only(model, prompt: list[int], n: int) -> list[int]:
    engine = Engine(model)
    session = engine.open(prompt, SamplingParams(max_new_tokens=n))
    await engine.prefill(session)
    while session.finish_reason is None:
        await engine.verify(session, [], None)
    engine.close(session)
    return session.generated()


def trees_from(truth: list[int], vocab: int) -> list[tuple[list[int], list[int]]]:
    """Trees around the verifier's own continuation `truth`: (tokens, parents)."""
    wrong = [(t + 1) % vocab for t in truth]
    return [
        # root -> {wrong0, truth0}; truth0 -> {wrong1, truth1 -> truth2}: branches share the prefix truth0
        ([wrong[0], truth[0], wrong[1], truth[1], truth[2]], [-1, -1, 1, 1, 3]),
        ([wrong[0], (wrong[0] + 1) % vocab, wrong[1]], [-1, -1, 0]),  # no branch is accepted
        ([truth[0], truth[1], wrong[2], truth[2], truth[3]], [-1, 0, 1, 1, 3]),  # deeper than a sibling's leaf
        ([truth[0]], [-1]),  # a one-node tree
    ]


async def test_greedy_trees_commit_the_verifiers_tokens(verifier):
    vocab = models.model_vocab_size(verifier)
    prompt, n = [5, 17, 42, 8, 99, 3], 24
    truth = await verifier_only(verifier, prompt, n + 8)
    engine = Engine(verifier)
    session = engine.open(prompt, SamplingParams(max_new_tokens=n))
    await engine.prefill(session)
    accepted = []
    for round_index in range(n):
        if session.finish_reason is not None:
            break
        done = session.num_generated
        tokens, parents = trees_from(truth[done:], vocab)[round_index % 4]
        result, _ = await engine.verify(session, tokens, None, parents)
        accepted.append(result.num_accepted)
        assert result.committed[:-1] == tuple(tokens[i] for i in result.path)
    engine.close(session)
    assert session.generated() == truth[:n]
    assert accepted[:4] == [3, 0, 4, 1]


async def test_the_kv_after_a_tree_step_holds_exactly_the_accepted_path(verifier):
    vocab = models.model_vocab_size(verifier)
    prompt = [7, 1, 30, 2, 64]
    truth = await verifier_only(verifier, prompt, 8)
    engine = Engine(verifier)
    session = engine.open(prompt, SamplingParams(max_new_tokens=8))
    await engine.prefill(session)
    tokens, parents = trees_from(truth, vocab)[0]  # keeps the root, truth0, truth1, truth2 out of 6 block rows
    result, _ = await engine.verify(session, tokens, None, parents)
    assert result.path == (1, 3, 4) and session.kv.length == len(session.tokens) - 1
    # the next step over the compacted KV scores what a fresh forward over the committed tokens scores
    step = batched_forward(verifier, [Row(session.kv, [session.tokens[-1]], True)])[0]  # [1, vocab]
    fresh = batched_forward(verifier, [Row(SessionKV(), list(session.tokens), True)])[0][-1:]
    torch.testing.assert_close(step, fresh, rtol=1e-4, atol=1e-4)
    engine.close(session)


async def test_a_tree_over_budget_keeps_its_first_nodes(verifier):
    vocab = models.model_vocab_size(verifier)
    prompt = [9, 4, 4, 11]
    truth = await verifier_only(verifier, prompt, 8)
    engine = Engine(verifier)
    session = engine.open(prompt, SamplingParams(max_new_tokens=8))
    await engine.prefill(session)
    session.budget = 2  # of [wrong0, truth0, wrong1, truth1, truth2]: wrong0 and truth0 only
    tokens, parents = trees_from(truth, vocab)[0]
    result, _ = await engine.verify(session, tokens, None, parents)
    assert (result.gamma, result.path, result.committed) == (2, (1,), tuple(truth[:2]))
    engine.close(session)
