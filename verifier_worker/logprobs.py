"""The prompt's log-probabilities, gathered from a session's prefill chunks (only when the request asks).

The engine's prefill feeds the prompt but its last token in chunks; the logits at prompt position j score
prompt token j + 1, so the chunks' logits, in order, score prompt tokens 1..n-1 (token 0 has none). The
math is specdec/sampling.py `token_logprobs`, the same that scores committed tokens.
"""

from __future__ import annotations

import torch

from specdec.config import SamplingParams
from specdec.sampling import token_logprobs


class PromptLogprobs:
    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids = prompt_ids
        self.params = params
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # token_logprobs per chunk
        self.scored = 0  # prompt tokens scored so far (from token 1)

    @property
    def wanted(self) -> bool:
        return self.params.prompt_logprobs is not None

    def add(self, chunk_logits: torch.Tensor) -> None:
        """Compute thread: chunk_logits [n, vocab] of the next n prefill positions."""
        n = chunk_logits.shape[0]
        targets = torch.tensor(self.prompt_ids[self.scored + 1 : self.scored + 1 + n])  # [n]
        self.parts.append(token_logprobs(chunk_logits, targets, self.params, self.params.prompt_logprobs))
        self.scored += n

    def joined(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(logprobs [n-1], top_ids [n-1, k], top_logprobs [n-1, k]) once prefilled; None when not asked."""
        if not self.wanted:
            return None
        k = self.params.prompt_logprobs
        parts = self.parts or [(torch.empty(0), torch.empty(0, k, dtype=torch.long), torch.empty(0, k))]
        return tuple(torch.cat([part[i] for part in parts]) for i in range(3))
