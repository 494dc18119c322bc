"""One verifier session: the prompt's KV cache, the committed tokens, and one verification per round.

No gRPC here: the server validates messages and calls `prefill` / `verify` off the event loop. The
verifier-only baseline is the same loop with empty proposals, so both paths share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.config import FINISH_LENGTH, FINISH_STOP, SamplingParams
from specdec.lm import CachedLM
from specdec.sampling import make_generator, verify_block


@dataclass(frozen=True)
class RoundResult:
    num_accepted: int  # leading draft tokens committed
    next_token: int | None  # recovered or bonus token, None when generation ended inside the block
    finish_reason: str | None  # None while generating


class VerifierSession:
    def __init__(self, model: torch.nn.Module, prompt_ids: list[int], params: SamplingParams, client: str = ""):
        assert prompt_ids, "a session needs a prompt"
        self.client = client  # the peer address that opened it, for the server's per-client limit
        self.lm = CachedLM(model)
        self.params = params
        self.tokens = list(prompt_ids)
        self.num_generated = 0
        self.finish_reason: str | None = None
        self.generator = make_generator(params.seed, self.lm.device)
        self._stop = set(params.stop_token_ids)

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - self.num_generated

    def prefill(self) -> None:
        """Cache every prompt token but the last, which opens the first block."""
        if len(self.tokens) > 1:
            self.lm.forward(self.tokens[:-1], num_logits=1)  # the logits are not needed

    def verify(self, draft_ids: list[int], q: torch.Tensor | None) -> RoundResult:
        """Score [last committed token] + draft in one forward, accept a prefix, commit, roll back the rest.

        draft_ids: gamma tokens (0 = one plain decoding step); q: draft probs [gamma, vocab] or None (greedy).
        """
        assert self.finish_reason is None, "session already finished"
        target_logits = self.lm.forward([self.tokens[-1], *draft_ids])  # [gamma + 1, vocab]
        draft = torch.tensor(draft_ids, dtype=torch.long, device=self.lm.device)  # [gamma]
        q = None if q is None else q.to(self.lm.device)
        num_accepted, next_token = verify_block(draft, q, target_logits, self.params, self.generator)
        committed = [*draft_ids[:num_accepted], next_token]
        # generation ends at the first stop token or at max_new_tokens, even inside the block
        for i, token in enumerate(committed[: self.remaining]):
            if token in self._stop:
                committed, self.finish_reason = committed[: i + 1], FINISH_STOP
                break
        if self.finish_reason is None and len(committed) >= self.remaining:
            committed, self.finish_reason = committed[: self.remaining], FINISH_LENGTH
        self.tokens.extend(committed)
        self.num_generated += len(committed)
        self.lm.crop(len(self.tokens) - 1)
        accepted = min(num_accepted, len(committed))
        return RoundResult(
            num_accepted=accepted,
            next_token=committed[-1] if len(committed) > accepted else None,
            finish_reason=self.finish_reason,
        )
