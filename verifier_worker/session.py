"""One verifier session as the engine holds it: its KV memory, the committed tokens, its own generator,
and the verification of one block given the logits the engine's batched forward produced for it.

No gRPC and no model here: the engine batches the forwards and calls `verify` on its compute thread. The
verifier-only baseline is the same path with empty blocks (gamma = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specdec.config import FINISH_LENGTH, FINISH_STOP, SamplingParams
from specdec.sampling import make_generator, verify_block
from verifier_worker.kv import SessionKV


@dataclass(frozen=True)
class RoundResult:
    num_accepted: int  # leading draft tokens committed
    next_token: int | None  # recovered or bonus token, None when generation ended inside the block
    finish_reason: str | None  # None while generating


class VerifierSession:
    """Invariant: the KV cache holds every committed token but the last, which opens the next block."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, client: str = "", device: torch.device | str = "cpu"):
        assert prompt_ids, "a session needs a prompt"
        self.client = client  # the peer address that opened it, for the server's per-client limit
        self.kv = SessionKV()
        self.device = torch.device(device)
        self.params = params
        self.tokens = list(prompt_ids)
        self.num_generated = 0
        self.finish_reason: str | None = None
        self.closed = False  # set by the engine when the session ends; its work is dropped
        self.generator = make_generator(params.seed, self.device)
        self._stop = set(params.stop_token_ids)

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - self.num_generated

    @property
    def prompt_to_cache(self) -> list[int]:
        """What prefill caches: every prompt token but the last, which opens the first block."""
        return self.tokens[:-1]

    def block(self, draft_ids: list[int]) -> list[int]:
        """The tokens one verification feeds: [last committed token] + draft."""
        return [self.tokens[-1], *draft_ids]

    def verify(self, target_logits: torch.Tensor, draft_ids: list[int], q: torch.Tensor | None) -> RoundResult:
        """Accept a prefix of the draft, commit, and roll the KV cache back to the committed tokens.

        target_logits: [gamma + 1, vocab] for `block(draft_ids)`, already cached by the engine's forward;
        draft_ids: gamma tokens (0 = one plain decoding step); q: draft probs [gamma, vocab] or None (greedy).
        """
        assert self.finish_reason is None, "session already finished"
        draft = torch.tensor(draft_ids, dtype=torch.long, device=self.device)  # [gamma]
        q = None if q is None else q.to(self.device)
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
        self.kv.truncate(len(self.tokens) - 1)
        accepted = min(num_accepted, len(committed))
        return RoundResult(
            num_accepted=accepted,
            next_token=committed[-1] if len(committed) > accepted else None,
            finish_reason=self.finish_reason,
        )
