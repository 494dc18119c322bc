"""The verifier's replies to a Speculate stream's work: a verdict on a lock-step block, a commit of a step the
verifier ran on its own; and the limits its Info announces. Plain functions from the engine's result
(verifier_worker/session.py) and the server's config to the wire."""

from __future__ import annotations

from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import VerifierLimits
from verifier_worker.session import VerifierSession


def verdict_reply(result, cost: pb.StepCost, service_s: float, round_index: int, budget: int | None) -> pb.Verdict:
    """A lock-step block's verdict: accepted tokens, the next (recovered or bonus) token, the next draft budget."""
    verdict = pb.Verdict(
        num_accepted=result.num_accepted,
        finished=result.finish_reason is not None,
        finish_reason=codec.finish_to_proto(result.finish_reason),
        service_s=service_s,
        round=round_index,
        cost=cost,
        logprobs=codec.logprobs_to_proto(result.logprobs),
        draft_budget=budget,
    )
    if result.next_token is not None:
        verdict.next_token = result.next_token
    if result.path is not None:
        verdict.accepted_nodes.extend(result.path)
    return verdict


def commit_reply(result, cost: pb.StepCost, service_s: float, session: VerifierSession) -> pb.Commit:
    """What one step the verifier ran on its own committed (async; lock-step while it decodes alone)."""
    return pb.Commit(base_len=result.base_len, token_ids=result.committed, verified=result.gamma,
                     num_accepted=result.num_accepted, finished=result.finish_reason is not None,
                     finish_reason=codec.finish_to_proto(result.finish_reason), service_s=service_s,
                     cost=cost, stale=session.stale,
                     logprobs=codec.logprobs_to_proto(result.logprobs), draft_budget=session.answer_budget())


def limits_reply(limits: VerifierLimits, vocab_size: int) -> pb.Limits:
    """What Info tells clients of this verifier's limits (a client keeps its blocks and messages within them)."""
    return pb.Limits(max_gamma=limits.max_gamma, max_prompt_tokens=limits.max_prompt_tokens,
                     max_new_tokens=limits.max_new_tokens, max_sessions=limits.max_sessions,
                     max_message_bytes=limits.message_bytes(vocab_size),
                     max_sessions_per_client=limits.max_sessions_per_client, idle_timeout_s=limits.idle_timeout_s,
                     max_batch_tokens=limits.max_batch_tokens)
