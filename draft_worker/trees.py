"""Token-tree producers: drafters that propose several continuations at once, in specdec/tree.py's form
(tokens [n], parents [n] with -1 for the root, q [n, vocab] under sampling). `propose_tree` is what the client
loop calls for a drafter built with `tree_nodes` (DrafterSpec): the tree goes on the wire as Proposal.parents.

`suffix_tree` grows the suffix drafter's tree best-first (as EAGLE-2 expands the most probable leaves): the
node added next is the candidate with the highest product of frequencies along its path, each node offering
its `top_k` most frequent continuations, until `max_nodes` or no candidate reaches the drafter's `min_prob`
(the node limit replaces the chain's cap by match length).
Its candidates are deterministic given the context, so under sampling each node's q is one-hot on its token
(distinct siblings: exact by tree.verify_tree_sampling's argument).

`lm_tree` branches the LM drafter at the first position: `top_k` children of the root, then a chain under each
child (the most likely child's chain takes the nodes left over). Greedy: the top-k tokens, argmax chains.
Sampling: the children are drawn *without replacement* from the draft's d (child k's q is d with the earlier
children removed, renormalized: `tree.without_replacement`), and each chain samples its tokens from d given its
path (q = d). Both are the laws verify_tree_sampling's argument needs; every q is wire-rounded before the draft
samples from it, so the verifier decodes exactly the law the token was drawn from.
"""

from __future__ import annotations

import heapq

import torch

from draft_worker.drafters import LMDrafter
from draft_worker.proposer import Candidates
from draft_worker.suffix import SuffixDrafter
from specdec import codec
from specdec.sampling import logits_to_probs, sample
from specdec.tree import without_replacement

Tree = tuple[list[int], list[int], torch.Tensor | None]  # tokens [n], parents [n], q [n, vocab] or None (greedy)


def suffix_tree(drafter: SuffixDrafter, context: list[int], max_nodes: int, top_k: int = 3) -> Tree:
    """The suffix drafter's top branches after `context`, at most max_nodes nodes, parents before children."""
    drafter._sync(context)
    depth, min_prob = drafter.config.depth, drafter.config.min_prob
    tokens: list[int] = []
    parents: list[int] = []
    heap: list[tuple[float, int, int, int, list[int]]] = []  # (-confidence, order, parent, token, tail)
    order = 0

    def offer(parent: int, tail: list[int], confidence: float) -> None:
        nonlocal order
        _, counts = drafter.continuations(tail)
        total = sum(counts.values())
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]  # most frequent, then lowest id
        for token, count in ranked:
            if confidence * count / total >= min_prob:
                heapq.heappush(heap, (-confidence * count / total, order, parent, token, tail))
                order += 1

    lock = drafter.cache.lock if drafter.cache is not None else None
    if lock is not None:
        lock.acquire()
    try:
        offer(-1, list(context[-depth:]), 1.0)
        while heap and len(tokens) < max_nodes:
            negative_confidence, _, parent, token, tail = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            offer(len(tokens) - 1, (tail + [token])[-depth:], -negative_confidence)
    finally:
        if lock is not None:
            lock.release()
    q = None if drafter.params.greedy or not tokens else codec.one_hot_probs(tokens, drafter.vocab_size)
    return tokens, parents, q


def lm_tree(drafter: LMDrafter, context: list[int], max_nodes: int, top_k: int = 2) -> Tree:
    """The LM drafter's tree after `context`: top_k children of the root, a chain under each; at most max_nodes."""
    params, dense = drafter.params, drafter.dense_dtype
    if max_nodes <= 0:
        return [], [], None
    d = None if params.greedy else codec.wire_round(logits_to_probs(drafter.next_logits(context), params), params, dense)
    k = min(top_k, max_nodes)
    children: list[int] = []
    rows: list[torch.Tensor] = []
    if d is None:
        children = drafter.next_logits(context).topk(k).indices.tolist()
    else:
        for _ in range(k):
            if float(d[children].sum()) >= float(d.sum()):  # no mass left outside the children drawn
                break
            q = codec.wire_round(without_replacement(d, children), params, dense)  # [vocab]
            children.append(int(sample(q, drafter.generator)))
            rows.append(q)
    tokens, parents = list(children), [-1] * len(children)
    spare = max_nodes - len(children)
    lengths = [spare // len(children)] * len(children)
    lengths[0] += spare - sum(lengths)  # the first (most likely) child's chain takes the rest
    for i, (child, length) in enumerate(zip(children, lengths)):
        chain = drafter.propose([*context, child], length)
        parent = i
        for token in chain.draft_ids:
            tokens.append(token)
            parents.append(parent)
            parent = len(tokens) - 1
        if chain.q is not None:
            rows.extend(chain.q)
    return tokens, parents, None if d is None else torch.stack(rows)  # q [n, vocab]


def propose_tree(drafter, context: list[int], max_nodes: int) -> Candidates:
    """A tree-producing drafter's proposal after `context` (prompt + committed), as Candidates with parents."""
    if isinstance(drafter, SuffixDrafter):
        tokens, parents, q = suffix_tree(drafter, context, max_nodes)
    elif isinstance(drafter, LMDrafter):
        tokens, parents, q = lm_tree(drafter, context, max_nodes)
    else:
        raise ValueError(f"drafter {drafter.name!r} does not produce token trees (the lm and suffix drafters do)")
    return Candidates(tokens, q, getattr(drafter, "dense_dtype", "fp16"), parents)
