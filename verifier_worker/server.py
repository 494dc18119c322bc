"""The verifier worker: a grpc.aio server in front of the batching engine that owns the big model.

Each Speculate stream is one session with its own KV cache in the engine. The servicer validates every
message (validation.py: bounded before it is read, big proposals decoded off the event loop), hands the work (prefill, a verification block, Generate's decoding steps) to
the engine, which batches all sessions' work into one forward per step, and answers with the result and
what its step cost. Anything a client can send wrongly is answered with a status code and a message, and
only that stream ends; a stream that ends early drops its session's work and KV without disturbing others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health

from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec
from specdec.config import SamplingParams, VerifierLimits, lookahead
from verifier_worker.backends import NoRoom
from verifier_worker.budgeting import DraftBudgeter
from verifier_worker.accounting import StepCost
from verifier_worker.engine import Engine
from verifier_worker.metrics import BudgetMetrics, VerifierMetrics, tracked
from verifier_worker.replies import commit_reply, limits_reply, verdict_reply
from verifier_worker.session import VerifierSession
from verifier_worker.validation import (
    INBOX_SIZE,
    CorruptMessage,
    Ended,
    Refusal,
    check_open,
    check_proposal_off_loop,
    check_shadow,
    client_host,
    said_draft_time,
    said_gamma,
    until_half_closed,
)

log = logging.getLogger(__name__)
SERVER_VERSION = "specdec/1"
MAX_DRAFTER_NAME = 128  # characters of OpenSession.client_model_id kept (a key of the engine's turnaround priors)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    vocab_size: int
    tokenizer_fingerprint: str
    dtype: str
    device: str


class VerifierServicer(pb_grpc.VerifierServicer):
    def __init__(self, model: torch.nn.Module, info: ModelInfo, limits: VerifierLimits = VerifierLimits(),
                 metrics: VerifierMetrics | None = None):
        limits.validate()
        self.info = info
        self.limits = limits
        self.sessions_by_client: dict[str, int] = {}  # open sessions per client host
        self.metrics = metrics or VerifierMetrics()
        self.metrics.sessions_open.set_function(lambda: self.active_sessions)
        # issue 18: every session's draft budget, granted by the engine after each step and sent in each reply
        self.budgeter = DraftBudgeter(limits.max_gamma, tpot_slo_s=limits.tpot_slo_ms / 1e3 or None,
                                      metrics=BudgetMetrics(self.metrics.registry),
                                      min_gain=limits.draft_min_gain) if limits.draft_budget else None
        self.engine = Engine(model, limits.max_batch_tokens, limits.batch_wait_s, on_step=self.metrics.step,
                             budgeter=self.budgeter)
        self.draining = False  # set on shutdown: new sessions are refused with UNAVAILABLE
        self.health: health.aio.HealthServicer | None = None  # set by start_server

    @property
    def active_sessions(self) -> int:
        return sum(self.sessions_by_client.values())

    async def _run(self, context, work):
        """Await engine work; a failure there ends this stream with INTERNAL (the engine logged it)."""
        try:
            return await work
        except Exception as exc:  # noqa: BLE001 - reported to the client
            await context.abort(grpc.StatusCode.INTERNAL, f"verifier compute failed: {exc!r}")

    async def _intact(self, context, request):
        """The request, unless it arrived corrupt: then this call ends with INVALID_ARGUMENT."""
        if isinstance(request, CorruptMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.status)
        return request

    async def Info(self, request, context):
        await self._intact(context, request)
        info = self.info
        return pb.InfoReply(model_id=info.model_id, vocab_size=info.vocab_size, dtype=info.dtype, device=info.device,
                            tokenizer_fingerprint=info.tokenizer_fingerprint, server_version=SERVER_VERSION,
                            limits=limits_reply(self.limits, info.vocab_size),
                            # what a router over replicas balances on (draft_worker/router.py)
                            load=pb.Load(sessions=self.active_sessions, queued_tokens=self.engine.queued_tokens(),
                                         draining=self.draining))

    async def _new_session(self, context, prompt_ids, params_msg, max_block: int = 0,
                           tpot_slo_ms: float = 0.0, drafter: str | None = None) -> VerifierSession:
        """Validate a session's opening request and take a session slot (released by the caller). max_block: the
        most draft tokens its blocks may carry (0: Generate, decode only); tpot_slo_ms: its latency target;
        drafter: the client's drafter name (the budget's population)."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "verifier is shutting down; retry on another or after its restart")
        try:
            prompt_ids, params = check_open(prompt_ids, params_msg, self.limits, self.info.vocab_size)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.active_sessions >= self.limits.max_sessions:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"verifier is at its limit of {self.limits.max_sessions} concurrent sessions; retry later",
            )
        client = client_host(context.peer())
        if self.sessions_by_client.get(client, 0) >= self.limits.max_sessions_per_client:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{client} already has {self.limits.max_sessions_per_client} sessions open, this verifier's limit per client",
            )
        try:
            session = self.engine.open(prompt_ids, params, client, max_block, max_gamma=max_block,
                                       tpot_slo_s=tpot_slo_ms / 1e3 if tpot_slo_ms > 0 else None, drafter=drafter)
        except NoRoom as exc:  # a backend with a fixed KV cache (llama.cpp's n_ctx) is full: admission control
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self.sessions_by_client[client] = self.sessions_by_client.get(client, 0) + 1  # freed by the caller's _release
        return session

    def _release(self, session: VerifierSession) -> None:
        self.engine.close(session)  # drops its pending work; its KV is freed now or after the running step
        self.sessions_by_client[session.client] -= 1
        if not self.sessions_by_client[session.client]:
            del self.sessions_by_client[session.client]

    async def _next(self, context, inbox: asyncio.Queue):
        """The next (request, arrival time) of a Speculate stream; closes a session left idle too long."""
        try:
            request, arrived = await asyncio.wait_for(inbox.get(), self.limits.idle_timeout_s)
        except asyncio.TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"session idle for {self.limits.idle_timeout_s:g} s (this verifier's idle_timeout_s); closed",
            )
        return await self._intact(context, request), arrived

    @tracked("Speculate")
    async def Speculate(self, request_iterator, context):
        # bounded, so a client that floods proposals is held back by HTTP/2 flow control
        inbox: asyncio.Queue = asyncio.Queue(maxsize=INBOX_SIZE)

        async def read_requests():  # timestamps arrivals, so service time includes queueing
            try:
                async for request in request_iterator:
                    await inbox.put((request, time.perf_counter()))
            except Exception as exc:  # noqa: BLE001 - a broken stream (cancelled, reset) ends the session
                log.info("Speculate stream read failed: %r", exc)
            await inbox.put((None, time.perf_counter()))

        reader = asyncio.create_task(read_requests())
        session = None
        try:
            request, arrived = await self._next(context, inbox)
            if request is None:
                return
            if request.WhichOneof("kind") != "open":
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the first message of a Speculate stream must be `open` (prompt and sampling parameters)",
                )
            opening = request.open
            if opening.tokenizer_fingerprint and opening.tokenizer_fingerprint != self.info.tokenizer_fingerprint:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"tokenizer mismatch: draft model {opening.client_model_id or '(unnamed)'} and verifier model "
                    f"{self.info.model_id} do not share a tokenizer; speculative decoding needs the same vocabulary",
                )
            drafter = opening.client_model_id[:MAX_DRAFTER_NAME]
            session = await self._new_session(context, opening.prompt_ids, opening.params,
                                              min(opening.max_block or self.limits.max_gamma, self.limits.max_gamma),
                                              opening.tpot_slo_ms, drafter)
            if self.budgeter is not None and (word := said_gamma(opening)) is not None:  # before the prefill's grant
                self.budgeter.wants(session, word)
            prompt_tokens = len(session.tokens)
            self.metrics.prompt_tokens.inc(prompt_tokens)
            async_mode = opening.mode == pb.SPECULATION_MODE_ASYNC
            if not async_mode:  # its blocks come a turnaround after each verdict: the engine keys its prior by this
                session.drafter = drafter
            server_decodes = opening.server_decodes and not async_mode and self.budgeter is not None
            if server_decodes:  # before the prefill's step grants its first budget
                self.budgeter.decodes_at_zero(session)
                session.server_decodes = True
            cost = await self._run(context, self.engine.prefill(session))
            service_s = time.perf_counter() - arrived
            # granted 0 from the start: the verifier's turn begins with the first token, queued with the prefill's answer
            first = self.engine.verifiers_step(session)
            yield pb.SpeculateReply(
                opened=pb.SessionOpened(
                    session_id=uuid.uuid4().hex,
                    prompt_tokens=prompt_tokens,
                    service_s=service_s,
                    cost=self._cost(cost, service_s),
                    prompt_logprobs=codec.logprobs_to_proto(session.prompt_logprobs.joined()),
                    draft_budget=session.answer_budget(),  # None (unset) without a budgeter
                    server_decodes=server_decodes,
                    takes_shadows=self.budgeter is not None,
                )
            )
            rounds = (self._async(context, inbox, session) if async_mode
                      else self._lockstep(context, inbox, session, first))
            async with contextlib.aclosing(rounds):
                async for reply in rounds:
                    yield reply
        finally:
            reader.cancel()
            if session is not None:
                self._release(session)

    async def _lockstep(self, context, inbox: asyncio.Queue, session: VerifierSession,
                        pending: asyncio.Future | None = None):
        """One verdict per proposal: verify what lies past the commit, or answer `stale` without compute.

        session.server_decodes (the client asked, OpenSession.server_decodes): while the session's draft budget is 0,
        and for the `decode_alone` steps its last proposal asked, the verifier decodes it on its own as it does
        Generate, one Commit per step, with no round trip between two tokens; the turn goes back to the client
        with the first reply that grants a budget above 0 once decode_alone is spent. The engine queues each such
        step as it applies the answer before it (`Engine.verifiers_step`), so it rides the very next step; `pending`
        is the first such step when `opened` granted 0 already (a client gone meanwhile: Engine.close drops it)."""
        last = time.perf_counter()
        for round_index in range(1, 2 * self.limits.max_new_tokens + 1):  # stale answers take rounds too
            if pending is not None:
                if await self._client_left(context, inbox, session):
                    return
                result, cost = await self._run(context, pending)
                now = time.perf_counter()
                reply = pb.SpeculateReply(commit=commit_reply(result, self._cost(cost, now - last), now - last, session))
            else:
                request, arrived = await self._next(context, inbox)
                while await self._shadow(context, session, request):  # counted; a proposal is still due
                    request, arrived = await self._next(context, inbox)
                if request is None:  # the client closed its side before the session finished
                    return
                if request.WhichOneof("kind") != "proposal":
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this stream's session is already open")
                claim = await self._check_proposal(context, request.proposal, session.params,
                                                   trees=getattr(self.engine.backend, "supports_trees", False))
                alone, session.said_draft_s = request.proposal.decode_alone, said_draft_time(request.proposal)
                if self.budgeter is not None:  # its word: grants priced as no drafts until it decoded alone, its gamma
                    self.budgeter.hold(session, alone)
                    self.budgeter.wants(session, said_gamma(request.proposal))
                rest = session.remainder(claim)
                if rest is None:  # its assumed prefix was not committed: the client knows, from the verdict before
                    self.metrics.stale.inc()
                    yield pb.SpeculateReply(verdict=pb.Verdict(stale=True, round=round_index, draft_budget=session.budget,
                                                               service_s=time.perf_counter() - arrived))
                    continue
                result, cost = await self._run(context, self.engine.submit(session, *rest, decode_alone=alone))
                now = time.perf_counter()
                reply = pb.SpeculateReply(verdict=verdict_reply(result, self._cost(cost, now - arrived), now - arrived, round_index,
                                                                       session.answer_budget()))
            last = now
            self.metrics.verdict(result.gamma, result.num_accepted, len(result.committed))
            pending = self.engine.verifiers_step(session)  # the engine queued it as it answered (server_decodes)
            yield reply
            if result.finish_reason is not None:
                await until_half_closed(inbox, lambda r: self._shadow(context, session, r))
                return
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"session sent {2 * self.limits.max_new_tokens} proposals without finishing; closed")

    async def _shadow(self, context, session: VerifierSession, request: pb.SpeculateRequest | None) -> bool:
        """True if `request` is a shadow verdict (pb.ShadowVerdict), now counted into the session's acceptance; a
        malformed one ends the stream with INVALID_ARGUMENT. Taken in any turn, in both modes."""
        if request is None or request.WhichOneof("kind") != "shadow":
            return False
        try:
            check_shadow(request.shadow, self.limits)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.budgeter is not None:  # the blocks it held back first, in the order the client decided them
            for block in [*request.shadow.before, request.shadow]:
                self.budgeter.on_shadow(session, block.drafted, block.accepted, block.gamma)
            self.budgeter.wants(session, said_gamma(request.shadow))
        return True

    async def _client_left(self, context, inbox: asyncio.Queue, session: VerifierSession) -> bool:
        """While the verifier decodes a lock-step session on its own: True when the client closed its side (the
        session ends, its queued step is dropped); a proposal now is a protocol error (it is not its turn)."""
        while not inbox.empty():
            request, _ = inbox.get_nowait()
            if request is None:
                return True
            if not await self._shadow(context, session, await self._intact(context, request)):
                break
        else:
            return False
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            "a proposal while the verifier decodes this session on its own (server_decodes: its last "
                            "reply granted a draft budget of 0, or decode_alone steps remain): send the next one after a "
                            "reply grants a budget above 0 with decode_alone spent")

    async def _async(self, context, inbox: asyncio.Queue, session: VerifierSession):
        """The engine decodes (or verifies the drafts that arrived) in every step and each step's commit is
        streamed at once; proposals only feed the session's `ahead` drafts, offered by `_feed` as they arrive.
        No step waits for the client. The handler awaits the engine's step alone, as Generate does: one pass of
        the event loop a step. Waiting on the step and the inbox together took a task and two more passes a step."""
        decoding = self.engine.decode(session)
        feeder = asyncio.create_task(self._feed(inbox, session, decoding))  # done: the client's side ended it
        last = time.perf_counter()
        try:
            while True:
                try:
                    result, cost = await self._run(context, decoding.next())
                except asyncio.CancelledError:
                    if not feeder.done():  # the call itself was cancelled
                        raise
                if feeder.done():
                    ended = feeder.result()
                    if ended.code is None:  # the client closed its side before the session finished
                        return
                    await context.abort(ended.code, ended.message)
                now = time.perf_counter()
                self.metrics.verdict(result.gamma, result.num_accepted, len(result.committed))
                yield pb.SpeculateReply(commit=commit_reply(result, self._cost(cost, now - last), now - last, session))
                last = now
                if result.finish_reason is not None:
                    if not feeder.done():  # else it took the client's half-close (or a message it may not send)
                        feeder.cancel()  # what it had not taken stays in the inbox: counted, not lost
                        await until_half_closed(inbox, lambda r: self._shadow(context, session, r))
                    return
        finally:
            feeder.cancel()

    async def _feed(self, inbox: asyncio.Queue, session: VerifierSession, decoding) -> Ended:
        """Async: each chunk offered to the session as it arrives, until the client's side ends the session (its
        side closed, or a message it may not send): that is returned, and the step the handler awaits cancelled, so
        the handler ends the stream, as only the call's own task may."""
        refusal, max_ahead = Refusal(), lookahead(self.limits.max_gamma)  # as far as any client drafts ahead
        try:
            while True:
                request, _ = await inbox.get()
                if request is None:
                    raise Ended(None, "")
                request = await self._intact(refusal, request)
                if await self._shadow(refusal, session, request):
                    continue
                if request.WhichOneof("kind") != "proposal":
                    await refusal.abort(grpc.StatusCode.FAILED_PRECONDITION, "this stream's session is already open")
                claim = await self._check_proposal(refusal, request.proposal, session.params, trees=False)
                if self.budgeter is not None:  # a stale chunk's word holds too: the client's gamma now
                    self.budgeter.wants(session, said_gamma(request.proposal))
                if not session.offer(claim, max_ahead):
                    self.metrics.stale.inc()
        except Ended as end:
            ended = end
        except Exception as exc:  # noqa: BLE001 - a bug here ends this stream, not the server
            log.exception("reading an async session's chunks failed")
            ended = Ended(grpc.StatusCode.INTERNAL, f"reading the stream failed: {exc!r}")
        decoding.cancel()  # the task is done before the handler wakes: it returns in this same step
        return ended

    def _cost(self, cost: StepCost, service_s: float) -> pb.StepCost:
        """What a reply's step(s) cost, for the client; the wait for them goes to the queue histogram."""
        queue_s = max(0.0, service_s - cost.compute_s)
        self.metrics.queue.observe(queue_s)
        return pb.StepCost(compute_s=cost.compute_s, queue_s=queue_s, batch_sessions=cost.batch_sessions,
                           batch_tokens=cost.batch_tokens, share_s=cost.share_s, steps=cost.steps,
                           prefill_tokens=cost.prefill_tokens)

    async def _check_proposal(self, context, proposal: pb.Proposal, params: SamplingParams, trees: bool):
        """The proposal's claim; a malformed one (a malformed tree included) ends the stream with INVALID_ARGUMENT."""
        try:
            return await check_proposal_off_loop(proposal, params, self.limits, self.info.vocab_size, trees)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    @tracked("Generate")
    async def Generate(self, request, context):
        arrived = time.perf_counter()
        request = await self._intact(context, request)
        session = await self._new_session(context, request.prompt_ids, request.params)
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        try:
            prefill = await self._run(context, self.engine.prefill(session))
            decoding = self.engine.decode(session)  # one token in every engine step until it finishes
            result = None
            prompt_logprobs = codec.logprobs_to_proto(session.prompt_logprobs.joined())
            while result is None or result.finish_reason is None:
                result, cost = await self._run(context, decoding.next())
                if prefill is not None:  # the first reply also carries the prefill
                    cost, prefill = prefill.plus(cost), None
                now = time.perf_counter()
                yield pb.GenerateReply(
                    token_ids=[result.next_token],
                    finished=result.finish_reason is not None,
                    finish_reason=codec.finish_to_proto(result.finish_reason),
                    service_s=now - arrived,
                    cost=self._cost(cost, now - arrived),
                    logprobs=codec.logprobs_to_proto(result.logprobs),
                    prompt_logprobs=prompt_logprobs,  # on the first reply only
                )
                prompt_logprobs = None
                self.metrics.committed.inc()
                arrived = now
        finally:
            self._release(session)
