"""What every drafter is to the client: the `Drafter` protocol, the `Candidates` it proposes, lock-step's
`CommittedContext` on top of `propose`, and `common_prefix` for syncing to a context. Imports nothing from the
rest of draft_worker, so each drafter module (drafters.py, suffix.py, llamacpp.py) can build on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specdec.config import SamplingParams


@dataclass(frozen=True)
class Candidates:
    draft_ids: list[int]  # [gamma]
    q: torch.Tensor | None  # [gamma, vocab] draft probs as the verifier decodes them; None when greedy
    dense_dtype: str = "fp16"  # the wire dtype q was rounded to, so encoding it is exact
    parents: list[int] | None = None  # a token tree (specdec/tree.py, draft_worker/trees.py): q is then per node


class Drafter(Protocol):
    name: str
    fingerprint: str  # of the tokenizer whose ids it drafts; sent to the verifier, which refuses a mismatch

    def start(self, prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None: ...

    def propose(self, context: list[int], gamma: int) -> Candidates: ...

    def get_candidates(self, gamma: int) -> Candidates: ...

    def commit(self, num_accepted: int, next_token: int | None) -> None: ...


class CommittedContext:
    """Lock-step on top of `propose`: the context is the committed tokens, and a verdict extends them."""

    def get_candidates(self, gamma: int) -> Candidates:
        candidates = self.propose(self.tokens, gamma)
        self._block = candidates.draft_ids
        return candidates

    def commit(self, num_accepted: int, next_token: int | None) -> None:
        self.tokens.extend(self._block[:num_accepted])
        if next_token is not None:
            self.tokens.append(next_token)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
