"""What the engine's steps cost, as the engine accounts it and the wire reports it: `StepCost` per work item
(its step's wall time, its token share of it, the batch it rode in) and `EngineStats` for the whole engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCost:
    """What the step(s) one work item rode in cost; summed over the steps of a chunked prefill."""

    compute_s: float = 0.0  # wall time of the step(s): the whole batch's forward + verification
    share_s: float = 0.0  # this work's part of compute_s, by its share of each step's tokens
    batch_sessions: int = 0  # sessions in the step (the largest, over several steps)
    batch_tokens: int = 0  # tokens the step(s) computed for all sessions, padding excluded
    steps: int = 0
    prefill_tokens: int = 0  # of prompt chunks (any session's) in the step(s), or in steps that ran while it waited

    def add(self, compute_s: float, tokens: int, batch_sessions: int, batch_tokens: int, prefill_tokens: int = 0) -> None:
        self.compute_s += compute_s
        self.share_s += compute_s * tokens / batch_tokens
        self.batch_sessions = max(self.batch_sessions, batch_sessions)
        self.batch_tokens += batch_tokens
        self.steps += 1
        self.prefill_tokens += prefill_tokens

    def plus(self, other: StepCost) -> StepCost:
        return StepCost(self.compute_s + other.compute_s, self.share_s + other.share_s,
                        max(self.batch_sessions, other.batch_sessions), self.batch_tokens + other.batch_tokens,
                        self.steps + other.steps, self.prefill_tokens + other.prefill_tokens)


@dataclass(frozen=True)
class EngineStats:
    sessions: int  # open sessions, plus closed ones a running step still uses
    kv_tokens: int  # tokens cached over all sessions
    kv_bytes: int  # bytes of KV buffers allocated over all sessions
    queued: int  # work items waiting for a step
    steps: int  # steps run since the engine started
    busy_s: float  # their total compute time
