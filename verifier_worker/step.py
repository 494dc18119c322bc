"""The verifier's compute thread: one engine step's forward over its batch, then every block's verification.

verifier_worker/engine.py schedules the steps and owns every session's state on its event loop; `run_step` runs
on its one compute thread and changes nothing but the KV the forward appends to and the sessions' generators.
A work item (work.Work) is read for its session, tokens, drafts (draft_ids, q, parents) and kind.
"""

from __future__ import annotations

import torch

from specdec.sampling import verify_batch
from specdec.tree import kept_block_rows, verify_tree
from verifier_worker.backends import Backend
from verifier_worker.kv import Row
from verifier_worker.logprobs import Logprobs, block_logprobs
from verifier_worker.work import Work


def run_step(backend: Backend, batch: list[tuple[Work, int]]) -> list[tuple | None]:
    """Compute thread: one forward over the batch, then every block's verification in one call.

    -> per work item its outcome: (num_accepted, next_token, logprobs or None) for a chain's block, plus the
    accepted path for a tree's (verified one row at a time with `tree.verify_tree`); for a prefill
    chunk, the prompt logprobs it scores when the request asked for them, else None. Reads the work items
    and the sessions' KV, params and generators, which the event loop leaves alone while a step runs;
    changes nothing but the KV the forward appends to and the generators' states.
    """
    # a prefill chunk keeps its logits only when the session asked for the prompt's logprobs (echo)
    rows = [Row(work.session.kv, work.tokens[:n], not work.is_prefill or work.session.prompt_logprobs.wanted,
                work.parents) for work, n in batch]
    logits = backend.forward(rows)  # the only model call (backends.py)
    prompt_scores = [work.session.prompt_logprobs.score(row_logits) if work.is_prefill and row_logits is not None
                     else None for (work, _), row_logits in zip(batch, logits)]
    trees = {id(work): verify_tree_block(work, row_logits) for (work, _), row_logits in zip(batch, logits)
             if work.parents is not None}
    blocks = [(work, row_logits) for (work, _), row_logits in zip(batch, logits)
              if not work.is_prefill and work.parents is None]
    if not blocks:
        return [trees.get(id(work), score) for (work, _), score in zip(batch, prompt_scores)]
    num_accepted, next_token = verify_batch(
        torch.tensor([t for work, _ in blocks for t in work.draft_ids], dtype=torch.long, device=backend.device),
        [len(work.draft_ids) for work, _ in blocks],
        torch.cat([row_logits for _, row_logits in blocks]),  # [num_draft + blocks, vocab]
        [work.q for work, _ in blocks],
        [work.session.params for work, _ in blocks],
        [work.session.generator for work, _ in blocks],
    )
    outcomes = iter([(accepted, token, block_logprobs(row_logits, work.draft_ids, accepted, token, work.session.params))
                     for (work, row_logits), accepted, token
                     in zip(blocks, num_accepted.tolist(), next_token.tolist())])  # the step's one host sync
    return [score if work.is_prefill else trees[id(work)] if id(work) in trees else next(outcomes)
            for (work, _), score in zip(batch, prompt_scores)]


def verify_tree_block(work: Work, target_logits: torch.Tensor) -> tuple[int, int, Logprobs | None, list[int]]:
    """Compute thread: one tree block's outcome, (len(path), next_token, logprobs or None, path)."""
    session = work.session
    tokens = torch.tensor(work.draft_ids, dtype=torch.long, device=target_logits.device)  # [n]
    parents = torch.tensor(work.parents, dtype=torch.long, device=target_logits.device)  # [n]
    q = None if work.q is None else work.q.to(target_logits.device)  # [n, vocab], decoded on the host
    path, next_token = verify_tree(tokens, parents, q, target_logits, session.params, session.generator)
    logprobs = block_logprobs(target_logits[kept_block_rows(path)], [work.draft_ids[i] for i in path], len(path),
                              next_token, session.params)  # row d of the kept rows scores the path's token d
    return len(path), next_token, logprobs, path

