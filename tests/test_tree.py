"""Issue 21: token-tree math (specdec/tree.py) on hand-built tensors.

Malformed trees are refused with a clear message; masks and positions; greedy path selection (branches that
share a prefix, no branch accepted); a chain reduces to sampling.py's verify_greedy / verify_sampling, token
for token; and multi-candidate rejection sampling keeps the verifier's distribution (chi-square on the joint
law of the first two committed tokens, children drawn with and without replacement).
"""

from __future__ import annotations

import pytest
import torch

from specdec import tree
from specdec.config import SamplingParams
from specdec.sampling import make_generator, sample, verify_greedy, verify_sampling
from tests.stubs import chi_square_p_value

T = torch.tensor


def one_hot_logits(ids: list[int], vocab: int = 8) -> torch.Tensor:
    """logits [len(ids), vocab] whose argmax in row i is ids[i]."""
    logits = torch.zeros(len(ids), vocab)
    logits[torch.arange(len(ids)), T(ids)] = 5.0
    return logits


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("tokens, parents, match", [
    ([1, 2, 3], [-1, 0, 5], "node 2's parent 5 is out of range"),
    ([1, 2], [-1, -2], "node 1's parent -2 is out of range"),
    ([1, 2], [-1, 1], "node 1's parent 1 is not an earlier node"),  # a self-loop
    ([1, 2, 3], [2, 0, 1], "node 0's parent 2 is not an earlier node"),  # a cycle 0 -> 2 -> 1 -> 0
    ([1, 2, 3], [-1, 2, 0], "node 1's parent 2 is not an earlier node"),  # a forward reference
    ([1, 2, 3, 4, 5], [-1, 0, 0, 1, 1], "5 nodes, over the limit of 4"),
    ([1, 9], [-1, 0], "tree token 1 = 9 is outside the vocabulary"),
    ([1, 2], [-1], "one parent per token"),
])
def test_malformed_trees_are_refused(tokens, parents, match):
    with pytest.raises(ValueError, match=match):
        tree.validate_tree(T(tokens), T(parents), max_nodes=4, vocab_size=8)


def test_a_valid_tree_passes_and_q_must_fit():
    tree.validate_tree(T([1, 2, 3]), T([-1, -1, 0]), max_nodes=3, vocab_size=8, q=torch.zeros(3, 8))
    tree.validate_tree(T([], dtype=torch.long), T([], dtype=torch.long), max_nodes=3, vocab_size=8)
    with pytest.raises(ValueError, match=r"shape \(2, 8\), expected \[3, 8\]"):
        tree.validate_tree(T([1, 2, 3]), T([-1, -1, 0]), max_nodes=3, vocab_size=8, q=torch.zeros(2, 8))


# ------------------------------------------------------------------------------------- mask, positions
def test_block_mask_and_positions():
    parents = T([-1, -1, 0, 0, 3])  # root -> {0, 1}; 0 -> {2, 3}; 3 -> 4
    mask = tree.block_mask(parents)  # rows/cols: root, nodes 0..4
    expected = T([[1, 0, 0, 0, 0, 0],
                  [1, 1, 0, 0, 0, 0],
                  [1, 0, 1, 0, 0, 0],
                  [1, 1, 0, 1, 0, 0],
                  [1, 1, 0, 0, 1, 0],
                  [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert tree.block_positions(parents).tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.path_to(4, parents) == [0, 3, 4] and tree.kept_block_rows([0, 3, 4]) == [0, 1, 4, 5]
    chain = T([-1, 0, 1, 2])
    assert torch.equal(tree.block_mask(chain), torch.ones(5, 5, dtype=torch.bool).tril())
    assert tree.block_positions(chain).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- greedy
def test_greedy_keeps_the_longest_path_matching_the_argmax():
    # root -> a(0)=1, b(1)=2; a -> c(2)=3; b -> d(3)=4, e(4)=5; e -> f(5)=6
    tokens, parents = T([1, 2, 3, 4, 5, 6]), T([-1, -1, 0, 1, 1, 4])
    # argmax after root 2, after a 3, after b 5, after c 0, after d 0, after e 6, after f 7
    logits = one_hot_logits([2, 3, 5, 0, 0, 6, 7])
    assert tree.verify_tree_greedy(tokens, parents, logits) == ([1, 4, 5], 7)  # b, e, f and the bonus token
    logits = one_hot_logits([1, 3, 5, 0, 0, 6, 7])  # the root picks a: a then c, then the recovered token
    assert tree.verify_tree_greedy(tokens, parents, logits) == ([0, 2], 0)
    logits = one_hot_logits([7, 3, 5, 0, 0, 6, 7])  # no branch accepted
    assert tree.verify_tree_greedy(tokens, parents, logits) == ([], 7)
    assert tree.verify_tree_greedy(T([], dtype=torch.long), T([], dtype=torch.long), one_hot_logits([4])) == ([], 4)


def test_greedy_with_branches_sharing_a_prefix_takes_the_deeper_one():
    # two root children with the same token 1 (a producer that did not merge them): 0 -> 2 (=3); 1 -> 3 (=4) -> 4 (=5)
    tokens, parents = T([1, 1, 3, 4, 5]), T([-1, -1, 0, 1, 3])
    logits = one_hot_logits([1, 4, 4, 0, 5, 6])  # after either 1: 4; so the path is 1 (node 1), 4, 5
    assert tree.verify_tree_greedy(tokens, parents, logits) == ([1, 3, 4], 6)
    logits = one_hot_logits([1, 3, 3, 0, 5, 6])  # after either 1: 3: only node 0's branch continues
    assert tree.verify_tree_greedy(tokens, parents, logits) == ([0, 2], 0)
    logits = one_hot_logits([1, 7, 7, 0, 5, 6])  # both prefixes accepted, nothing below: the first, then 7
    assert tree.verify_tree_greedy(tokens, parents, logits) == ([0], 7)


# ----------------------------------------------------------------------------------- chain equivalence
def test_a_chain_reduces_to_the_chain_verifiers():
    g = torch.Generator().manual_seed(0)
    vocab = 6
    for trial in range(200):
        gamma = trial % 5
        chain = torch.arange(gamma) - 1  # [-1, 0, 1, ...]
        draft = torch.randint(vocab, (gamma,), generator=g)
        logits = torch.randn(gamma + 1, vocab, generator=g) * 2
        if trial % 2:  # make some drafts right, so that accepts happen
            draft = logits[:gamma].argmax(-1)
            draft[gamma // 2 :] = torch.randint(vocab, (gamma - gamma // 2,), generator=g)
        path, next_token = tree.verify_tree_greedy(draft, chain, logits)
        assert (len(path), next_token) == verify_greedy(draft, logits) and path == list(range(len(path)))
        q = torch.softmax(torch.randn(gamma, vocab, generator=g), -1)
        draft = sample(q, g) if gamma else draft
        p = torch.softmax(logits, -1)
        expected = verify_sampling(draft, q, p, make_generator(trial))
        path, next_token = tree.verify_tree_sampling(draft, chain, q, p, make_generator(trial))
        assert (len(path), next_token) == expected
    params = SamplingParams(temperature=0.7)
    assert tree.verify_tree(draft, chain, q, logits, params, make_generator(1))[1] == \
        verify_sampling(draft, q, torch.softmax(logits / 0.7, -1), make_generator(1))[1]


# ------------------------------------------------------------------------------------------- sampling
VOCAB = 4
_g = torch.Generator().manual_seed(7)
P0 = torch.softmax(torch.randn(VOCAB, generator=_g) * 1.5, -1)  # [vocab] target after the root
P1 = torch.softmax(torch.randn(VOCAB, VOCAB, generator=_g) * 1.5, -1)  # [vocab, vocab] target after token x
D0 = torch.softmax(torch.randn(VOCAB, generator=_g) * 1.5, -1)  # the draft's, far from the target
D1 = torch.softmax(torch.randn(VOCAB, VOCAB, generator=_g) * 1.5, -1)
P2 = torch.full((VOCAB,), 1 / VOCAB)  # after depth-2 nodes (not measured)


def draw_children(d: torch.Tensor, k: int, replacement: bool, g: torch.Generator) -> tuple[list[int], list[torch.Tensor]]:
    """k sibling tokens drawn from d [vocab] and the q [vocab] each was drawn from."""
    tokens, qs = [], []
    for _ in range(k):
        q = tree.without_replacement(d, tokens) if not replacement else d
        tokens.append(int(sample(q, g)))
        qs.append(q)
    return tokens, qs


def random_tree(replacement: bool, g: torch.Generator):
    """Three root children from D0, each with two children from D1[its token]: (tokens, parents, q, p)."""
    tokens, parents, qs, rows = [], [], [], [P0]
    for x, q in zip(*draw_children(D0, 3, replacement, g)):
        tokens.append(x), parents.append(-1), qs.append(q), rows.append(P1[x])
    for parent in range(3):
        for y, q in zip(*draw_children(D1[tokens[parent]], 2, replacement, g)):
            tokens.append(y), parents.append(parent), qs.append(q), rows.append(P2)
    # reorder nothing: parents (0..2) come before their children (3..8)
    return T(tokens), T(parents), torch.stack(qs), torch.stack(rows)


@pytest.mark.parametrize("replacement", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["with-replacement", "without-replacement"])
def test_tree_sampling_keeps_the_verifiers_distribution(replacement):
    """The joint law of the first two committed tokens equals the target's, P0(a) P1[a](b), and differs
    from the draft's; the tree's branches were actually used (accepts beyond the first child)."""
    drafts, verifier = make_generator(1), make_generator(2)
    cells, later_children = [], 0
    for _ in range(4000):
        tokens, parents, q, p = random_tree(replacement, drafts)
        tree.validate_tree(tokens, parents, max_nodes=9, vocab_size=VOCAB, q=q)
        path, next_token = tree.verify_tree_sampling(tokens, parents, q, p, verifier)
        later_children += bool(path) and path[0] != 0
        committed = [*(int(tokens[i]) for i in path), next_token]
        if len(committed) < 2:
            committed.append(int(sample(P1[committed[0]], verifier)))
        cells.append(committed[0] * VOCAB + committed[1])
    counts = torch.bincount(T(cells), minlength=VOCAB**2)
    assert chi_square_p_value(counts, (P0[:, None] * P1).flatten()) > 1e-4
    assert chi_square_p_value(counts, (D0[:, None] * D1).flatten()) < 1e-6
    assert later_children > 200


def test_without_replacement_renormalizes_the_rest():
    d = T([0.5, 0.25, 0.25, 0.0])
    torch.testing.assert_close(tree.without_replacement(d, [0]), T([0.0, 0.5, 0.5, 0.0]))
    torch.testing.assert_close(tree.without_replacement(d, []), d)
