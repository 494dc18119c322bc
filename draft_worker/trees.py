"""Token-tree producers: drafters that propose several continuations at once, in specdec/tree.py's form
(tokens [n], parents [n] with -1 for the root, q [n, vocab] under sampling). Not yet on the wire.

`suffix_tree` grows the suffix drafter's tree best-first (as EAGLE-2 expands the most probable leaves): the
node added next is the candidate with the highest product of frequencies along its path, each node offering
its `top_k` most frequent continuations, until `max_nodes` or no candidate reaches the drafter's `min_prob`
(the node limit replaces the chain's cap by match length).
Its candidates are deterministic given the context, so under sampling each node's q is one-hot on its token
(distinct siblings: exact by tree.verify_tree_sampling's argument).
"""

from __future__ import annotations

import heapq

import torch

from draft_worker.suffix import SuffixDrafter
from specdec import codec

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
