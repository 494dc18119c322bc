"""Log-probabilities the verifier reports when a request asks: of the tokens each step commits, and of the
prompt, gathered from a session's prefill chunks. Computed on the compute thread (`block_logprobs`,
`PromptLogprobs.score`), applied to the session on the event loop like every other outcome.

The engine's prefill feeds the prompt but its last token in chunks; the logits at prompt position j score
prompt token j + 1, so the chunks' logits, in order, score prompt tokens 1..n-1 (token 0 has none). The
math is specdec/sampling.py `token_logprobs`, the same that scores committed tokens.
"""

from __future__ import annotations

import torch

from specdec.config import SamplingParams
from specdec.sampling import token_logprobs


Logprobs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (logprobs [n], top_ids [n, k], top_logprobs [n, k])


def block_logprobs(target_logits: torch.Tensor, draft_ids: list[int], num_accepted: int, next_token: int,
                   params: SamplingParams) -> Logprobs | None:
    """Of a verified block's committed tokens, the accepted drafts then the recovered or bonus token: row i of
    target_logits [gamma + 1, vocab] scores committed token i. None when the request did not ask."""
    if params.logprobs is None:
        return None
    committed = torch.tensor([*draft_ids[:num_accepted], next_token])  # [num_accepted + 1]
    return token_logprobs(target_logits[: num_accepted + 1], committed, params, params.logprobs)


class PromptLogprobs:
    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids = prompt_ids
        self.params = params
        self.parts: list[Logprobs] = []  # token_logprobs per chunk
        self.scored = 0  # prompt tokens scored so far (from token 1)

    @property
    def wanted(self) -> bool:
        return self.params.prompt_logprobs is not None

    def score(self, chunk_logits: torch.Tensor) -> Logprobs:
        """Compute thread: the logprobs of the prompt tokens that chunk_logits [n, vocab], the next n prefill
        positions, score (the session's next chunk is not computed before this one is added)."""
        targets = torch.tensor(self.prompt_ids[self.scored + 1 : self.scored + 1 + chunk_logits.shape[0]])  # [n]
        return token_logprobs(chunk_logits, targets, self.params, self.params.prompt_logprobs)

    def add(self, part: Logprobs) -> None:
        """Event loop: the next chunk's scores."""
        self.parts.append(part)
        self.scored += part[0].shape[0]

    def joined(self) -> Logprobs | None:
        """(logprobs [n-1], top_ids [n-1, k], top_logprobs [n-1, k]) once prefilled; None when not asked."""
        if not self.wanted:
            return None
        k = self.params.prompt_logprobs
        parts = self.parts or [(torch.empty(0), torch.empty(0, k, dtype=torch.long), torch.empty(0, k))]
        return tuple(torch.cat([part[i] for part in parts]) for i in range(3))
