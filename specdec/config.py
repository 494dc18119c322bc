"""Frozen configuration shared by both workers: sampling parameters and verifier limits.

Plain data, validated once where it enters (the CLI or the RPC boundary); knows nothing about gRPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_STOP = "stop"  # a stop token was committed
SAMPLING_EPS = 1e-5  # a temperature below this is greedy (vLLM's _SAMPLING_EPS): 1/T would overflow the logits
MAX_STOP_TOKEN_IDS = 64  # stop_token_ids a request may carry
# how a Speculate session overlaps drafting with the network and the verifier (draft_worker/client.py):
# lockstep: one block in flight; ahead: lock-step, drafting block k+1 while block k's verdict is in flight;
# async: the verifier decodes every step and verifies whatever usable draft has arrived by then
SPEC_MODES = ("lockstep", "ahead", "async")
# the default of the library (draft_worker.client.speculate, DraftService), the CLI (generate, serve-draft) and
# the benchmark: lock-step verifies only what the client proposed, so it costs the verifier the least per
# committed token; async is the mode for a fast verifier behind a long link (README, "Over a network")
DEFAULT_MODE = "lockstep"

# The one size limit every block derives from: the most draft tokens one verification takes. It is the
# verifier's default limit (VerifierLimits.max_gamma, sent to clients in Info) and the ceiling of every gamma
# schedule (a client lowers it to its verifier's limit); an async session's per-step block defaults to it.
MAX_GAMMA = 16
MAX_HELD_SHADOWS = 16  # earlier shadow verdicts one ShadowVerdict may carry (`before`; a client holds a few misses)


def lookahead(gamma: int) -> int:
    """Async: the most draft tokens a session keeps past its commit, for blocks of `gamma`: this block, the
    bonus position after it, and the next block, so the next block is on the verifier before it finishes this
    one. The verifier keeps as many per session (lookahead(max_gamma))."""
    return 2 * gamma + 1
MAX_LOGPROBS = 20  # most top alternatives a request may ask for per token (OpenAI's and vLLM's limit)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or anything below SAMPLING_EPS) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 (or 0) = off
    seed: int | None = None
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    # log-probabilities from the verifier (specdec/sampling.py `token_logprobs`), as in vLLM's SamplingParams:
    # None = off (nothing extra on the wire); k >= 0 = each committed token's, and k alternatives per token
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for the prompt's tokens, from the prefill (the first has none)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS  # both sides decide greedy here, so they always agree

    @property
    def truncated(self) -> bool:
        """True when top-k/top-p cut the distribution, so draft probabilities travel sparsely."""
        return self.top_k > 0 or 0.0 < self.top_p < 1.0

    def validate(self, max_new_tokens_limit: int | None = None) -> None:
        """Raise ValueError with a user-facing message if any field is out of range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1] (0 or 1 = off), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} is over this verifier's limit of {max_new_tokens_limit}"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids, over the limit of {MAX_STOP_TOKEN_IDS}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] (alternatives per token), got {k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass(frozen=True)
class VerifierLimits:
    max_gamma: int = MAX_GAMMA
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 1024
    max_sessions: int = 64
    max_message_bytes: int = 0  # 0 = what the model needs (`message_bytes`); a dense fp32 block of 16 x 151,936 is ~9.7 MB
    max_sessions_per_client: int = 32  # sessions open at once from one client address (half of max_sessions)
    idle_timeout_s: float = 120.0  # a session that receives nothing for this long is closed
    max_batch_tokens: int = 512  # token budget of one engine step: sessions x longest row, padding included
    # most a step waits for lock-step sessions of the last step (also <= 1/4 of a step, so a GPU's 20 ms steps wait
    # <= 5 ms): a session that misses a step waits a whole one, so on a CPU's 0.5 s steps 25 ms cost 4-8% of 4-8
    # n-gram sessions' rounds (issue 18's sweep: mean 3.7 of 4 sessions per step at 25 ms, 3.9 at 200 ms)
    batch_wait_s: float = 0.1
    draft_budget: bool = True  # issue 18: grant every session a draft budget per step (verifier_worker/budgeting.py)
    tpot_slo_ms: float = 0.0  # issue 18: default per-session target of verifier ms per token for the budget (0: none)
    draft_min_gain: float = 0.0  # issue 18: grant drafts only when they promise this much more goodput than none

    def message_bytes(self, vocab_size: int) -> int:
        """The largest request this verifier accepts: max_message_bytes, or by default what the model needs.

        A proposal's probabilities travel as at most max_gamma x vocab x 4 bytes (dense fp32; the sparse form is
        only used when smaller); an opening carries at most max_prompt_tokens + MAX_STOP_TOKEN_IDS varints of
        <= 5 bytes. Every larger message is refused by gRPC before the server holds it.
        """
        if self.max_message_bytes:
            return self.max_message_bytes
        ids = (self.max_prompt_tokens + MAX_STOP_TOKEN_IDS + self.max_gamma) * 5
        return self.max_gamma * vocab_size * 4 + ids + 64 * 1024  # + headroom for tags and small fields

    def validate(self) -> None:
        """Raise ValueError with a user-facing message if the limits cannot work together."""
        if self.tpot_slo_ms < 0:
            raise ValueError(f"tpot_slo_ms must be >= 0 (0: no target), got {self.tpot_slo_ms}")
        if not 0 <= self.draft_min_gain <= 1:
            raise ValueError(f"draft_min_gain must be in [0, 1], got {self.draft_min_gain}")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError(f"batch wait must be in [0, 10] s, got {self.batch_wait_s}")
        if self.max_batch_tokens < self.max_gamma + 1:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must hold one block of 1 + max_gamma "
                f"({self.max_gamma + 1}) tokens"
            )
