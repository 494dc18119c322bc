"""Token trees: several candidate continuations verified in one forward, the longest accepted path kept.

Pure tensor math, no models or wire (SpecInfer, Miao et al. 2024; Sequoia; EAGLE-2). A tree of n draft
nodes is `tokens` [n] and `parents` [n]: parents[i] is an earlier node (parents[i] < i) or -1, the root,
which is the last committed token (the one the verifier feeds next). A chain is parents = [-1, 0, 1, ...].
Under sampling each node also carries q[i] [vocab], the distribution its token was drawn from *given its
path and its earlier siblings* (see `verify_tree_sampling`).

The verifier feeds the block [root, node 0, ..., node n-1]: block row 0 is the root, row i + 1 is node i.
`block_mask` and `block_positions` say what each block row attends to and where it sits; the target logits
come back as [n + 1, vocab] in block order: row 0 scores the token after the root, row i + 1 the token after
node i. After verification the verifier keeps the KV of the root and the accepted path only
(`kept_block_rows`). Notation as in sampling.py: p the target distribution, q the draft's.
"""

from __future__ import annotations

import torch

from specdec.config import SamplingParams
from specdec.sampling import logits_to_probs, sample


def validate_tree(tokens: torch.Tensor, parents: torch.Tensor, max_nodes: int, vocab_size: int,
                  q: torch.Tensor | None = None) -> None:
    """Raise ValueError (a message fit for INVALID_ARGUMENT) unless tokens [n] and parents [n] form a tree of at
    most max_nodes nodes in topological order, with ids in the vocabulary and, if given, q [n, vocab]."""
    n = tokens.shape[0]
    if tokens.dim() != 1 or parents.shape != (n,):
        raise ValueError(f"a tree needs one parent per token: got {tuple(tokens.shape)} tokens and "
                         f"{tuple(parents.shape)} parents")
    if n > max_nodes:
        raise ValueError(f"the tree has {n} nodes, over the limit of {max_nodes}")
    bad = torch.nonzero((tokens < 0) | (tokens >= vocab_size)).flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"tree token {i} = {int(tokens[i])} is outside the vocabulary [0, {vocab_size})")
    bad = torch.nonzero((parents < -1) | (parents >= n)).flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"node {i}'s parent {int(parents[i])} is out of range: a parent is -1 (the root) or a "
                         f"node index below {n}")
    bad = torch.nonzero(parents >= torch.arange(n)).flatten()
    if len(bad):  # a parent at or after its child is a self-loop, a cycle or a forward reference
        i = int(bad[0])
        raise ValueError(f"node {i}'s parent {int(parents[i])} is not an earlier node: nodes must come after their "
                         f"parents (no cycles or forward references)")
    if q is not None and q.shape != (n, vocab_size):
        raise ValueError(f"tree probabilities have shape {tuple(q.shape)}, expected [{n}, {vocab_size}]")


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """mask [n, n] bool: mask[i, j] = node j is node i or one of its ancestors (the root excluded)."""
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool)  # [n, n]
    for i in range(n):  # parents come first, so row parents[i] is complete when row i copies it
        if parents[i] >= 0:
            mask[i] |= mask[int(parents[i])]
    return mask


def depths(parents: torch.Tensor) -> torch.Tensor:
    """[n] depth of each node: 1 for a child of the root."""
    return ancestor_mask(parents).sum(dim=1)


def block_mask(parents: torch.Tensor) -> torch.Tensor:
    """[n + 1, n + 1] bool, True = attend, over the block [root, nodes]: every row sees the root, a node sees
    its ancestors and itself. A chain gives the causal (lower-triangular) mask."""
    n = parents.shape[0]
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = ancestor_mask(parents)
    return mask


def block_positions(parents: torch.Tensor) -> torch.Tensor:
    """[n + 1] position offsets of the block's rows from the root's: 0 for the root, a node's depth for it."""
    return torch.cat([torch.zeros(1, dtype=torch.long), depths(parents)])


def path_to(node: int, parents: torch.Tensor) -> list[int]:
    """The nodes from the root's child down to `node` (empty for -1, the root)."""
    path = []
    while node >= 0:
        path.append(node)
        node = int(parents[node])
    return path[::-1]


def kept_block_rows(path: list[int]) -> list[int]:
    """Block rows whose KV stays after verification, in order: the root, then the accepted path's nodes."""
    return [0, *(i + 1 for i in path)]


def verify_tree_greedy(tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """The longest root-to-node path whose every token is the verifier's argmax after its parent.

    tokens, parents: [n]; target_logits: [n + 1, vocab] in block order. Returns (path, next_token): the
    accepted nodes from the root down and the verifier's token after the path's last node (the bonus token
    at a leaf, the recovered token otherwise). Ties between equally deep paths go to the lowest node index.
    On a chain this is `sampling.verify_greedy`: len(path) = num_accepted.
    """
    n = tokens.shape[0]
    target_ids = target_logits.argmax(dim=-1)  # [n + 1]
    if n == 0:
        return [], int(target_ids[0])
    matches = tokens == target_ids[parents + 1]  # [n]: node i is the argmax after its parent (row parent + 1)
    ancestors = ancestor_mask(parents)  # [n, n]
    on_path = ~(ancestors & ~matches[None, :]).any(dim=1)  # [n]: every node from the root to i matches
    depth = ancestors.sum(dim=1) * on_path  # [n], 0 off an accepted path
    best = int(depth.argmax())  # the first of the deepest
    if not on_path[best]:
        return [], int(target_ids[0])
    return path_to(best, parents), int(target_ids[best + 1])


def verify_tree_sampling(tokens: torch.Tensor, parents: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                         generator: torch.Generator) -> tuple[list[int], int]:
    """Multi-candidate rejection sampling down the tree (SpecInfer's scheme): exact for the verifier's p.

    tokens, parents: [n]; q: [n, vocab], q[i] the law node i's token was drawn from; p: [n + 1, vocab] target
    probs in block order. At a node (first the root) with target p' = p[its row], try its children c in order:
    accept c with probability min(1, p'(x_c) / q[c](x_c)), and on acceptance descend to c; on rejection set
    p' = norm(max(0, p' - q[c])) and try the next child. When every child is rejected, draw the recovered token
    from the last p'; at a node without children, draw the bonus token from p[its row].

    Why the output is distributed as p (by induction over the candidates at one node, then over depth):
    let X ~ r be a candidate and p' the current target. Accepting X with prob min(1, p'(X)/r(X)) gives
    P(accept, X = x) = min(r(x), p'(x)), so P(reject) = 1 - sum min(r, p') = sum max(0, p' - r) =: beta. If,
    given a rejection, what follows outputs a token distributed as max(0, p' - r) / beta (the new p'), the
    token out of this step has law min(r, p') + max(0, p' - r) = p'. It does, by induction on the number of
    remaining children, provided each next candidate, given everything before it, is distributed as the q it
    is checked against; with no children left the token is drawn from p' itself. So the first accepted token
    (or the recovered one) has law p[node's row]; conditioned on it, the same holds one level down, because
    each node's children were drafted given its path. Which q a node carries:
    - children drawn *with replacement* (i.i.d.) from the draft's d at the parent: q[c] = d for every child;
    - drawn *without replacement*: q[c] = d with the earlier siblings' tokens removed, renormalized (the law of
      the k-th draw given the first k - 1; `without_replacement`). A rejected token x has p'(x) = 0 after the
      update (rejection needs p'(x) < q(x)), so a repeat would be rejected surely: drawing without replacement
      wastes no candidate (Jeon et al. 2024, "recursive rejection sampling");
    - deterministic candidates (distinct top tokens): q[c] one-hot on c's token.
    The number of children may depend on the draws before (a stopping rule): the induction needs only the law
    of the next candidate given the past. A node with q[c](x_c) = 0 is never accepted (no division by zero).

    One uniform per node is drawn up front in node order, so on a chain this consumes the generator exactly as
    `sampling.verify_sampling` does and returns the same tokens for the same seed.
    """
    n = tokens.shape[0]
    r = torch.rand(n, generator=generator, device=p.device)  # [n]
    children: list[list[int]] = [[] for _ in range(n + 1)]  # by block row: children[0] are the root's
    for i, parent in enumerate(parents.tolist()):
        children[parent + 1].append(i)
    path: list[int] = []
    row = 0  # block row of the node whose children are being tried
    while True:
        if not children[row]:
            return path, int(sample(p[row], generator))  # a leaf (or no draft at all): the bonus token
        target = p[row]  # [vocab] p'
        for c in children[row]:
            x = int(tokens[c])
            q_x, p_x = q[c, x], target[x]
            if q_x > 0 and r[c] * q_x < p_x:  # r < p'/q without dividing
                path.append(c)
                row = c + 1
                break
            residual = (target - q[c]).clamp(min=0)  # [vocab]
            total = residual.sum()
            # p' <= q everywhere only when p' == q up to rounding, where a rejection is vanishingly rare: keep p'
            target = residual / total if total > 0 else target
        else:
            return path, int(sample(target, generator))  # every child rejected: the recovered token


def without_replacement(d: torch.Tensor, earlier: list[int]) -> torch.Tensor:
    """The law [vocab] of the next sibling drawn from d [vocab] without replacement after tokens `earlier`."""
    q = d.clone()
    q[earlier] = 0
    return q / q.sum()


def verify_tree(tokens: torch.Tensor, parents: torch.Tensor, q: torch.Tensor | None, target_logits: torch.Tensor,
                params: SamplingParams, generator: torch.Generator) -> tuple[list[int], int]:
    """Verify one tree (n may be 0: a plain decoding step). Greedy when temperature is 0. -> (path, next_token)"""
    if params.greedy:
        return verify_tree_greedy(tokens, parents, target_logits)
    p = logits_to_probs(target_logits, params)  # [n + 1, vocab]
    if q is None:
        assert tokens.shape[0] == 0, "sampling needs the draft probabilities"
        q = p[:0]  # [0, vocab]
    return verify_tree_sampling(tokens, parents, q, p, generator)
