"""The draft side's gRPC plumbing: one Speculate stream (open, send, read, end) and what each reply cost.

Every session mode (draft_worker/loop.py) and verifier-only generation (client.py) go through here: the
messages a client writes, the bytes they moved, the verifier's refusal mapped to a VerifierError that carries
the verifier's own status code and message, and the cost records of every reply. Imports nothing else from
draft_worker but transport, so nothing here can import back.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from draft_worker.transport import ClientConfig, VerifierError
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec
from specdec.config import SamplingParams
from specdec.metrics import GenerationResult

# a stream's call failed: a refusal, or the verifier ended the stream while this side was still writing
CALL_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)
# grpcio's own status for an operation that failed under the call (a write as the peer died): not the verifier's
# answer, which always carries its message, so it counts as the verifier going away (UNAVAILABLE: retried)
CORE_ERROR = "Internal error from Core"


def open_request(client_model_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer_fingerprint: str,
                 mode: int = pb.SPECULATION_MODE_LOCKSTEP, max_block: int = 0,
                 tpot_slo_ms: float = 0.0, server_decodes: bool = False,
                 wants: int | None = None) -> pb.SpeculateRequest:
    """A session's opening; wants: the client's own best gamma now, as `proposal_request`'s (None: unsaid)."""
    return pb.SpeculateRequest(
        open=pb.OpenSession(prompt_ids=prompt_ids, params=codec.params_to_proto(params),
                            tokenizer_fingerprint=tokenizer_fingerprint, client_model_id=client_model_id, mode=mode,
                            max_block=max_block, tpot_slo_ms=tpot_slo_ms, server_decodes=server_decodes,
                            wants=wants))


def proposal_request(draft_ids: list[int], q, params: SamplingParams, dense_dtype: str, base_len: int | None = None,
                     assumed_ids: list[int] = (), parents: list[int] | None = None,
                     decode_alone: int = 0, wants: int | None = None,
                     draft_s_per_token: float | None = None) -> pb.SpeculateRequest:
    """A claim: `assumed_ids` (no q), then `draft_ids` with their q rows [len(draft_ids), vocab] when sampling;
    with `parents`, draft_ids are a token tree's nodes (specdec/tree.py); decode_alone: steps the verifier then
    decodes on its own (lock-step with server_decodes); wants: the client's own best gamma (None: unsaid);
    draft_s_per_token: its drafter's seconds per draft token as measured (None: not yet)."""
    probs = codec.encode_probs(q, params, dense_dtype) if q is not None and len(draft_ids) else {}
    return pb.SpeculateRequest(proposal=pb.Proposal(draft_ids=draft_ids, base_len=base_len, assumed_ids=assumed_ids,
                                                    parents=parents or (), decode_alone=decode_alone, wants=wants,
                                                    draft_s_per_token=draft_s_per_token, **probs))


def record_opened(result: GenerationResult, reply: pb.SpeculateReply) -> None:
    result.prefill_service_s += reply.opened.service_s
    result.prefill_compute_s += reply.opened.cost.compute_s
    result.verifier_compute_s += reply.opened.cost.share_s
    record_prompt_logprobs(result, reply.opened.prompt_logprobs)


def record_prompt_logprobs(result: GenerationResult, msg: pb.TokenLogprobs) -> None:
    """The prompt's log-probabilities (echo), from the first opening only: a re-opened prompt holds our tokens."""
    if not result.prompt_logprobs:
        result.prompt_logprobs = codec.logprobs_from_proto(msg)


def record_cost(result: GenerationResult, service_s: float, cost: pb.StepCost) -> None:
    """One reply's verifier time: service (queue + compute), the step's compute and batch, this request's share."""
    result.service_s.append(service_s)
    result.compute_s.append(cost.compute_s)
    result.queue_s.append(cost.queue_s)
    result.batch_size.append(cost.batch_sessions)
    result.batch_tokens.append(cost.batch_tokens)
    result.verifier_compute_s += cost.share_s


def record_round(result: GenerationResult, verified: int, accepted: int, service_s: float, cost: pb.StepCost) -> None:
    """One verdict or commit: the draft tokens it verified, how many it accepted, and its verifier time."""
    result.proposed_per_round.append(verified)
    result.accepted_per_round.append(accepted)
    record_cost(result, service_s, cost)


def record_committed(result: GenerationResult, new: list[int], finished: bool, reason: int,
                     logprobs: pb.TokenLogprobs, start: float) -> None:
    """Tokens a verdict or commit committed, their log-probabilities (when the request asked), the time to the first,
    and the finish reason the verifier said (the request's `start`: its perf_counter when it began)."""
    result.token_ids.extend(new)
    result.logprobs.extend(codec.logprobs_from_proto(logprobs))
    result.record_chunk(time.perf_counter(), len(new))
    if result.rounds == 0:
        result.ttft_s = time.perf_counter() - start
    result.rounds += 1
    if finished:
        result.finish_reason = codec.finish_from_proto(reason)


async def refusal(call, exc: BaseException, what: str) -> VerifierError:
    """The verifier's own status for a call that failed: the call's final status when it has one, which is
    what the server sent even when the failure surfaced on a write, else the error's. grpcio's INTERNAL
    "Internal error from Core" is no verifier's answer (a write failed as the connection went): UNAVAILABLE."""
    code, details = (exc.code(), exc.details()) if isinstance(exc, grpc.aio.AioRpcError) else (None, str(exc))
    try:
        code, details = await asyncio.wait_for(call.code(), 5.0), await call.details()
    except (asyncio.TimeoutError, grpc.aio.AioRpcError):
        pass
    if code == grpc.StatusCode.INTERNAL and details == CORE_ERROR:  # no server sends this: the transport broke
        return VerifierError(f"the {what}'s stream to the verifier broke (grpc: {details})", "UNAVAILABLE")
    name = code.name if code is not None else "UNKNOWN"
    return VerifierError(f"verifier refused the {what}: {name}: {details}", name)


def block_s(reply: pb.Verdict | pb.Commit) -> float | None:
    """The reply's service time as a sample of what a block of its size costs; None when its step carried a prompt
    chunk, or it waited through a step that did (another session's prefill: a 5-token block riding with 200 prompt
    tokens takes the prefill's time, and one queued behind a padding backend's prompt step waits for all of it)."""
    return None if reply.cost.prefill_tokens else reply.service_s


def expect(reply: pb.SpeculateReply, kind: str) -> None:
    if reply.WhichOneof("kind") != kind:
        raise VerifierError(f"session out of step: expected a {kind}, got {reply.WhichOneof('kind')}", "INTERNAL")


def timed(fn, *args):
    """(fn(*args), seconds it took): drafting time measured in the drafting thread itself."""
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


class SpeculateStream:
    """One Speculate call, counting the bytes it moves into `result`."""

    def __init__(self, stub: pb_grpc.VerifierStub, config: ClientConfig, result: GenerationResult):
        self.call = stub.Speculate(timeout=config.timeout_s, metadata=config.metadata)
        self.result = result
        self.shared_cores = config.shared_cores

    async def open(self, opening: pb.SpeculateRequest) -> None:
        await self.call.write(opening)
        self.result.bytes_sent += opening.ByteSize()

    async def send(self, request: pb.SpeculateRequest) -> bool:
        """Write a proposal; False when the verifier ended the stream meanwhile (its last reply, or a refusal:
        reading tells which)."""
        try:
            await self.call.write(request)
        except CALL_ERRORS:
            return False
        self.result.bytes_sent += request.ByteSize()
        return True

    async def read(self) -> pb.SpeculateReply:
        reply = await self.call.read()
        if reply is grpc.aio.EOF:
            code = await self.call.code()
            raise VerifierError(f"verifier ended the session early: {code.name}: {await self.call.details()}",
                                code.name)
        self.result.bytes_received += reply.ByteSize()
        return reply

    async def refusal(self, exc: BaseException) -> VerifierError:
        return await refusal(self.call, exc, "session")

    async def end(self) -> None:
        """Half-close the stream once its result is in (or abandoned): the verifier, which keeps the stream
        open until then, ends it with OK. Not waited for; a write that raced the verifier's end is harmless,
        since the verifier never ends a stream before the client says it is done writing (or a short bound
        passes)."""
        if not self.call.done():
            try:
                await self.call.done_writing()
            except CALL_ERRORS:
                self.call.cancel()
