"""The draft worker's gRPC client: drives one Speculate session (or a verifier-only Generate) end to end.

Drafts locally, sends only the new draft tokens (and q when sampling), applies each verdict or commit, and
records what every round cost: client round trip, verifier service time, payload bytes both ways. The session
loop is draft_worker/loop.py (every mode), its stream plumbing draft_worker/stream.py. A verifier that goes
away mid-request is reconnected to (recovery.py); any refusal is raised as a VerifierError carrying the
verifier's own status code and message.
"""

from __future__ import annotations

import logging
import time

import grpc

from draft_worker.drafters import AdaptiveGamma, Drafter
from draft_worker.gamma import FixedGamma
from draft_worker.loop import ClientSession, OnCommit
from draft_worker.recovery import with_recovery
from draft_worker.stream import SpeculateStream, record_cost, record_prompt_logprobs, refusal
from draft_worker.transport import ClientConfig
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec
from specdec.config import DEFAULT_MODE, FINISH_STOP, SPEC_MODES, SamplingParams
from specdec.metrics import GenerationResult

log = logging.getLogger(__name__)
__all__ = ["OnCommit", "Schedule", "generate_baseline", "speculate"]
Schedule = AdaptiveGamma  # or draft_worker.gamma.RttGamma: anything with `gamma`, `max_gamma` and `update`


async def speculate(
    stub: pb_grpc.VerifierStub,
    drafter: Drafter,
    prompt_ids: list[int],
    params: SamplingParams,
    gamma: int | Schedule,
    info: pb.InfoReply,
    config: ClientConfig = ClientConfig(),
    tokenizer_fingerprint: str = "",
    on_commit: OnCommit | None = None,
    mode: str = DEFAULT_MODE,
    result: GenerationResult | None = None,
) -> GenerationResult:
    """Generate with speculative decoding over Speculate streams (one, unless the verifier goes away and the
    request is re-opened). Raises VerifierError on a refusal.

    `gamma` is a fixed block size or a schedule (AdaptiveGamma, RttGamma), read for every block (async: every
    chunk) and updated after every verdict (async: every commit). `mode` (specdec.config.SPEC_MODES): lockstep,
    ahead (drafting the next block while a verdict is in flight) or async (the verifier steps on its own); see
    draft_worker/loop.py. `on_commit` sees every verdict's committed ids as they arrive (streaming) and may end
    the request early.
    """
    if mode not in SPEC_MODES:
        raise ValueError(f"mode must be one of {', '.join(SPEC_MODES)}, got {mode!r}")
    if isinstance(gamma, int) and not 0 <= gamma <= info.limits.max_gamma:
        raise ValueError(f"gamma must be in [0, {info.limits.max_gamma}] for this verifier, got {gamma}")
    schedule = FixedGamma(gamma, gamma) if isinstance(gamma, int) else gamma
    # a schedule adapts within the verifier's limit, its first block included (--max-gamma 0: it decodes only)
    schedule.max_gamma = min(schedule.max_gamma, info.limits.max_gamma)
    schedule.gamma = min(schedule.gamma, schedule.max_gamma)
    if hasattr(schedule, "min_gamma"):
        schedule.min_gamma = min(schedule.min_gamma, schedule.max_gamma)

    async def attempt(prompt_ids, params, config, result):
        result.mode = mode
        session = ClientSession(SpeculateStream(stub, config, result), drafter, prompt_ids, params, schedule, mode,
                                info.vocab_size, tokenizer_fingerprint, on_commit)
        await session.run()

    return await with_recovery(attempt, prompt_ids, params, config, result, route=stub)  # a router.Route: one replica per attempt


async def generate_baseline(
    stub: pb_grpc.VerifierStub, prompt_ids: list[int], params: SamplingParams, config: ClientConfig = ClientConfig(),
    on_commit: OnCommit | None = None, result: GenerationResult | None = None,  # filled as it runs, as in speculate
) -> GenerationResult:
    """Verifier-only generation (the baseline every speedup is measured against), re-opened like `speculate`
    when the verifier goes away; `on_commit` as in speculate."""

    async def attempt(prompt_ids, params, config, result):
        await _generate_once(stub, prompt_ids, params, config, result, on_commit)

    return await with_recovery(attempt, prompt_ids, params, config, result, route=stub)  # as in speculate


async def _generate_once(stub, prompt_ids: list[int], params: SamplingParams, config: ClientConfig,
                         result: GenerationResult, on_commit: OnCommit | None) -> None:
    request = pb.GenerateRequest(prompt_ids=prompt_ids, params=codec.params_to_proto(params))
    result.bytes_sent += request.ByteSize()
    start = time.perf_counter()
    call = stub.Generate(request, timeout=config.timeout_s, metadata=config.metadata)
    try:
        async for reply in call:
            if not result.token_ids:
                result.ttft_s = time.perf_counter() - start
            result.token_ids.extend(reply.token_ids)
            result.logprobs.extend(codec.logprobs_from_proto(reply.logprobs))
            record_prompt_logprobs(result, reply.prompt_logprobs)
            result.record_chunk(time.perf_counter(), len(reply.token_ids))
            record_cost(result, reply.service_s, reply.cost)
            result.bytes_received += reply.ByteSize()
            if reply.finished:
                result.finish_reason = codec.finish_from_proto(reply.finish_reason)
            if on_commit is not None and on_commit(list(reply.token_ids)) and not reply.finished:
                result.finish_reason = FINISH_STOP
                break
    except grpc.aio.AioRpcError as exc:
        raise await refusal(call, exc, "request") from None
    finally:
        if not call.done():
            call.cancel()  # ended early by on_commit: the verifier frees the session
