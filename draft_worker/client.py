"""The draft worker's gRPC client: drives one Speculate session (or a verifier-only Generate) end to end.

Drafts locally, sends only the new draft tokens (and q when sampling), applies each verdict, and records
what every round cost: client round trip, verifier service time, payload bytes both ways. A verifier that
goes away mid-request is reconnected to (recovery.py); any refusal is raised as a VerifierError carrying
the verifier's own status code and message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from draft_worker.drafters import AdaptiveGamma, Drafter
from draft_worker.recovery import with_recovery
from draft_worker.transport import ClientConfig, VerifierError
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec
from specdec.config import FINISH_STOP, SPEC_MODES, SamplingParams
from specdec.metrics import GenerationResult

log = logging.getLogger(__name__)
# called with the ids each verdict (or decoding step) commits; returning True ends the request there, as a
# stop (a stop string in the decoded text): the verifier's stream is closed and finish_reason is "stop"
OnCommit = Callable[[list[int]], bool | None]
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
    mode: str = "lockstep",
    result: GenerationResult | None = None,  # H6 (logprobs): filled as it runs (recovery.with_recovery)
) -> GenerationResult:
    """Generate with speculative decoding over Speculate streams (one, unless the verifier goes away and the
    request is re-opened). Raises VerifierError on a refusal.

    `gamma` is a fixed block size or a schedule (AdaptiveGamma, RttGamma), updated after every verdict.
    `mode` (specdec.config.SPEC_MODES): lockstep, ahead (drafting the next block while a verdict is in flight)
    or async (the verifier steps on its own; see draft_worker/overlap.py). `on_commit` sees every verdict's
    committed ids as they arrive (streaming) and may end the request early.
    """
    from draft_worker import overlap

    if mode not in SPEC_MODES:
        raise ValueError(f"mode must be one of {', '.join(SPEC_MODES)}, got {mode!r}")
    schedule = None if isinstance(gamma, int) else gamma
    first = schedule.gamma if schedule else gamma
    if not 0 <= first <= info.limits.max_gamma:
        raise ValueError(f"gamma must be in [0, {info.limits.max_gamma}] for this verifier, got {first}")
    if schedule:
        schedule.max_gamma = min(schedule.max_gamma, info.limits.max_gamma)
    once = {"lockstep": _speculate_once, "ahead": overlap.speculate_ahead, "async": overlap.speculate_async}[mode]

    async def attempt(prompt_ids, params, config, result):
        result.mode = mode
        await once(stub, drafter, prompt_ids, params, gamma, schedule, info, config, tokenizer_fingerprint, result,
                   on_commit)

    return await with_recovery(attempt, prompt_ids, params, config, result)


def open_request(drafter: Drafter, prompt_ids: list[int], params: SamplingParams, tokenizer_fingerprint: str,
                 mode: int = pb.SPECULATION_MODE_LOCKSTEP, max_block: int = 0) -> pb.SpeculateRequest:
    return pb.SpeculateRequest(
        open=pb.OpenSession(prompt_ids=prompt_ids, params=codec.params_to_proto(params),
                            tokenizer_fingerprint=tokenizer_fingerprint, client_model_id=drafter.name, mode=mode,
                            max_block=max_block))


def record_opened(result: GenerationResult, reply: pb.SpeculateReply) -> None:
    result.prefill_service_s += reply.opened.service_s
    result.prefill_compute_s += reply.opened.cost.compute_s
    result.verifier_compute_s += reply.opened.cost.share_s
    result.bytes_received += reply.ByteSize()
    record_prompt_logprobs(result, reply.opened.prompt_logprobs)  # H6 (logprobs)


def record_prompt_logprobs(result: GenerationResult, msg: pb.TokenLogprobs) -> None:
    """H6 (logprobs): the prompt's logprobs, from the first opening only (a re-opened prompt has our tokens)."""
    if not result.prompt_logprobs:
        result.prompt_logprobs = codec.logprobs_from_proto(msg)


def proposal_request(draft_ids: list[int], q, params: SamplingParams, dense_dtype: str, base_len: int | None = None,
                     assumed_ids: list[int] = ()) -> pb.SpeculateRequest:
    probs = codec.encode_probs(q, params, dense_dtype) if q is not None and len(draft_ids) else {}
    return pb.SpeculateRequest(proposal=pb.Proposal(draft_ids=draft_ids, base_len=base_len, assumed_ids=assumed_ids,
                                                    **probs))


async def _speculate_once(stub, drafter: Drafter, prompt_ids: list[int], params: SamplingParams,
                          gamma: int | AdaptiveGamma, schedule: AdaptiveGamma | None, info: pb.InfoReply,
                          config: ClientConfig, tokenizer_fingerprint: str, result: GenerationResult,
                          on_commit: OnCommit | None) -> None:
    """One Speculate stream, extending `result` with every token committed before it ends."""
    start = time.perf_counter()
    generated = 0  # tokens committed on this stream
    call = stub.Speculate(timeout=config.timeout_s, metadata=config.metadata)
    try:
        opening = open_request(drafter, prompt_ids, params, tokenizer_fingerprint)
        await call.write(opening)
        result.bytes_sent += opening.ByteSize()
        drafter.start(prompt_ids, params, info.vocab_size)
        opened = False
        while True:
            remaining = params.max_new_tokens - generated
            block = schedule.gamma if schedule else gamma
            # drafting is compute: off the event loop, so other sessions in this process keep moving
            drafting = asyncio.to_thread(_timed, drafter.get_candidates, min(block, remaining - 1))
            if not opened:
                # the first block is drafted while the verifier prefills, but nothing more is written until
                # `opened` arrives: a refusal then reaches us as the verifier's own status, whereas a write
                # that races the server's abort makes grpcio report INTERNAL "Internal error from Core"
                (candidates, draft_s), reply = await asyncio.gather(drafting, _read(call))
                opened = True
                record_opened(result, reply)
            else:
                candidates, draft_s = await drafting
            result.draft_s += draft_s
            result.gamma_per_round.append(block)
            request = proposal_request(candidates.draft_ids, candidates.q, params, candidates.dense_dtype)
            t_sent = time.perf_counter()
            await call.write(request)
            result.bytes_sent += request.ByteSize()
            reply = await _read(call)
            result.rtt_s.append(time.perf_counter() - t_sent)
            result.bytes_received += reply.ByteSize()
            verdict = reply.verdict
            next_token = verdict.next_token if verdict.HasField("next_token") else None
            drafter.commit(verdict.num_accepted, next_token)
            if schedule:
                schedule.update(len(candidates.draft_ids), verdict.num_accepted, draft_s=draft_s,
                                service_s=verdict.service_s, rtt_s=max(0.0, result.rtt_s[-1] - verdict.service_s))
            committed = [*candidates.draft_ids[: verdict.num_accepted], *([] if next_token is None else [next_token])]
            result.token_ids.extend(committed)
            result.logprobs.extend(codec.logprobs_from_proto(verdict.logprobs))  # H6 (logprobs)
            result.record_chunk(time.perf_counter(), len(committed))
            generated += len(committed)
            if result.rounds == 0:
                result.ttft_s = time.perf_counter() - start
            result.rounds += 1
            result.proposed_per_round.append(len(candidates.draft_ids))
            result.accepted_per_round.append(verdict.num_accepted)
            _record_cost(result, verdict.service_s, verdict.cost)
            if verdict.finished:
                result.finish_reason = codec.finish_from_proto(verdict.finish_reason)
            if on_commit is not None and on_commit(committed) and not verdict.finished:
                result.finish_reason = FINISH_STOP
            if result.finish_reason:
                break
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
        # InvalidStateError: the verifier ended the stream while this side was still writing
        raise await _refusal(call, exc, "session") from None
    finally:
        await end_stream(call)


async def end_stream(call) -> None:
    """Half-close a Speculate stream whose result is in (or abandoned): the verifier, which keeps the stream
    open until then, ends it with OK. Not waited for; a write that raced the verifier's end is harmless, since
    the verifier never ends a stream before the client says it is done writing (or a short bound passes)."""
    if not call.done():
        try:
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            call.cancel()


async def _refusal(call, exc: BaseException, what: str) -> VerifierError:
    """The verifier's own status for a call that failed: the call's final status when it has one, which is
    what the server sent even when the failure surfaced on a write, else the error's."""
    code, details = (exc.code(), exc.details()) if isinstance(exc, grpc.aio.AioRpcError) else (None, str(exc))
    try:
        code, details = await asyncio.wait_for(call.code(), 5.0), await call.details()
    except (asyncio.TimeoutError, grpc.aio.AioRpcError):
        pass
    name = code.name if code is not None else "UNKNOWN"
    return VerifierError(f"verifier refused the {what}: {name}: {details}", name)


def _timed(fn, *args):
    """(fn(*args), seconds it took): drafting time measured in the drafting thread itself."""
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def _record_cost(result: GenerationResult, service_s: float, cost: pb.StepCost) -> None:
    """One round's verifier time: service (queue + compute), the step's compute and batch, this request's share."""
    result.service_s.append(service_s)
    result.compute_s.append(cost.compute_s)
    result.queue_s.append(cost.queue_s)
    result.batch_size.append(cost.batch_sessions)
    result.batch_tokens.append(cost.batch_tokens)
    result.verifier_compute_s += cost.share_s


async def _read(call) -> pb.SpeculateReply:
    reply = await call.read()
    if reply is grpc.aio.EOF:
        code = await call.code()
        raise VerifierError(f"verifier ended the session early: {code.name}: {await call.details()}", code.name)
    return reply


async def generate_baseline(
    stub: pb_grpc.VerifierStub, prompt_ids: list[int], params: SamplingParams, config: ClientConfig = ClientConfig(),
    on_commit: OnCommit | None = None, result: GenerationResult | None = None,  # H6 (logprobs): as in speculate
) -> GenerationResult:
    """Verifier-only generation (the baseline every speedup is measured against), re-opened like `speculate`
    when the verifier goes away; `on_commit` as in speculate."""

    async def attempt(prompt_ids, params, config, result):
        await _generate_once(stub, prompt_ids, params, config, result, on_commit)

    return await with_recovery(attempt, prompt_ids, params, config, result)


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
            result.logprobs.extend(codec.logprobs_from_proto(reply.logprobs))  # H6 (logprobs)
            record_prompt_logprobs(result, reply.prompt_logprobs)  # H6 (logprobs)
            result.record_chunk(time.perf_counter(), len(reply.token_ids))
            _record_cost(result, reply.service_s, reply.cost)
            result.bytes_received += reply.ByteSize()
            if reply.finished:
                result.finish_reason = codec.finish_from_proto(reply.finish_reason)
            if on_commit is not None and on_commit(list(reply.token_ids)) and not reply.finished:
                result.finish_reason = FINISH_STOP
                break
    except grpc.aio.AioRpcError as exc:
        raise await _refusal(call, exc, "request") from None
    finally:
        if not call.done():
            call.cancel()  # ended early by on_commit: the verifier frees the session
