"""A causal LM with its own KV cache: feed new tokens, read logits, roll back on rejection.

Used by the verifier (one per session) and by the LM drafter; it knows nothing about speculation.
Invariant kept by the callers: the cache holds every committed token but the last, which is fed next.
"""

from __future__ import annotations

import torch


class CachedLM:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = None  # created by the model on the first forward (a transformers DynamicCache)
        self.length = 0  # tokens whose keys/values are in the cache

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Append token_ids to the cache. -> logits [len(token_ids), vocab] fp32."""
        assert token_ids, "forward needs at least one token"
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.length += len(token_ids)
        return out.logits[0].float()  # [n, vocab]

    def crop(self, length: int) -> None:
        """Keep the first `length` cached tokens (rollback after a rejection)."""
        assert 0 <= length <= self.length, (length, self.length)
        if length < self.length:
            # transformers >= 4.x: a negative argument drops that many tokens (5.x refuses positive ones)
            self.cache.crop(length - self.length)
            self.length = length
