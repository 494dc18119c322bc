"""A causal LM with its own KV cache: feed new tokens, read logits, roll back on rejection.

Used by the verifier (one per session) and by the LM drafter; it knows nothing about speculation.
Invariant kept by the callers: the cache holds every committed token but the last, which is fed next.
"""

from __future__ import annotations

import inspect

import torch


def cache_argument(model: torch.nn.Module) -> str:
    """transformers >= 5.24 names the KV-cache argument and output `cache`; earlier ones `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class CachedLM:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = None  # created by the model on the first forward (a transformers DynamicCache)
        self._cache_name = cache_argument(model)
        self.length = 0  # tokens whose keys/values are in the cache

    @torch.inference_mode()
    def forward(self, token_ids: list[int], num_logits: int = 0) -> torch.Tensor:
        """Append token_ids to the cache. -> logits [n, vocab] fp32 for the last num_logits tokens (0 = all).

        Skipping unused rows matters: a 400-token prefill's full logits over a 151,936-token vocabulary
        cost ~10% of the forward and ~240 MB.
        """
        assert token_ids, "forward needs at least one token"
        n = len(token_ids)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        # positions as an index tensor, not an int: HF slices hidden states with it, and an int slice of a
        # multi-token batch is a strided view that makes torch.matmul copy the whole LM head (~0.4 s on CPU)
        keep = torch.arange(n - num_logits, n, device=self.device) if 0 < num_logits < n else 0
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=keep, **{self._cache_name: self.cache})
        self.cache = getattr(out, self._cache_name)
        self.length += n
        return out.logits[0].float()  # [n or num_logits, vocab]

    def crop(self, length: int) -> None:
        """Keep the first `length` cached tokens (rollback after a rejection)."""
        assert 0 <= length <= self.length, (length, self.length)
        if length < self.length:
            # transformers >= 4.x: a negative argument drops that many tokens (5.x refuses positive ones)
            self.cache.crop(length - self.length)
            self.length = length
