"""Speculating without waiting on the network: lock-step with drafting ahead, and async mode.

Lock-step (client.py) drafts a block, sends it, and waits a round trip for its verdict while the verifier
waits for the next block. Two ways to overlap, both exact (see verifier_worker/session.py for the argument):

- **ahead**: while block k's verdict is in flight, draft block k+1 on the guess that block k is accepted
  whole and that the bonus token is the draft's own next token; send it at once, claiming that prefix
  (`assumed_ids`), so the verifier has it the moment it answers block k. At most two blocks are in flight.
  A block whose guess turns out false is answered `stale` without compute, and the client has already
  drafted the next one from the real commit.
- **async**: the verifier decodes every engine step on its own and streams each commit; the client drafts
  continuously ahead of the committed stream, on top of its own earlier guesses (up to `lookahead` tokens
  past what it knows is committed), sends every chunk as a claim, and resyncs on every commit that
  diverges from its guess. The verifier verifies whatever usable draft has arrived when a step starts
  (at most `max_block` tokens) and never waits for one, so a slow or silent draft costs nothing. A chunk
  the verifier will have committed past by the time it arrives (`_Link`: one round trip of its steps) is
  kept as a guess but not sent, and one that could not land whatever it drafts is not drafted: with a fast
  verifier and a long link every claim would arrive too late, checking it would only steal the verifier's
  time, and drafting it the draft machine's (on a shared box, the verifier's too).

Positions count generated tokens of this stream (the prompt it was opened with excluded).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import grpc

from draft_worker.client import (
    _read,
    end_stream,
    _record_cost,
    _refusal,
    _timed,
    open_request,
    proposal_request,
    record_opened,
)
from draft_worker.drafters import Candidates, Drafter
from draft_worker.gamma import ema
from draft_worker.transport import ClientConfig, VerifierError
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import FINISH_STOP, SamplingParams
from specdec.metrics import GenerationResult


@dataclass
class _Block:
    """A proposal in flight: it claims positions base.. with `claim` (assumed tokens, then its draft)."""

    base: int
    claim: list[int]
    assumed: int
    sent_at: float
    draft_s: float


@dataclass
class _Draft:
    """A drafting job: propose on prompt + committed[:base] + guess."""

    task: asyncio.Task
    base: int
    guess: list[int]


class _Link:
    """Where the verifier will be when a claim sent now arrives: the commits seen are half a round trip old,
    and the claim takes another half, so it is about one round trip of commits past the last one seen.

    rtt_s: the opening's round trip minus the verifier's prefill; s_per_token: an EMA of the verifier's time
    between two commits (its own clock, so replies that arrive bunched do not skew it) per committed token.
    A claim that ends before that point would only be checked and dropped.
    """

    def __init__(self, rtt_s: float):
        self.rtt_s, self.s_per_token = rtt_s, None

    def on_commit(self, tokens: int, service_s: float) -> None:
        if tokens:
            self.s_per_token = ema(self.s_per_token, service_s / tokens, 0.2)

    def verifier_position(self, committed: int) -> float:
        return committed if not self.s_per_token else committed + self.rtt_s / self.s_per_token


def _draft(drafter: Drafter, context: list[int], n: int, base: int, guess: list[int]) -> _Draft:
    # drafting is compute: off the event loop, so replies keep being read while it runs
    return _Draft(asyncio.ensure_future(asyncio.to_thread(_timed, drafter.propose, context, n)), base, guess)


def _live(sent: _Block, committed: list[int]) -> bool:
    """The block's claim still agrees with the commit, and its assumed part is not yet all committed past."""
    done = len(committed) - sent.base
    return 0 <= done <= sent.assumed and committed[sent.base :] == sent.claim[:done]


def _still_holds(committed: list[int], known: list[int], base: int, claim: list[int], assumed: int) -> bool:
    """The claim's committed positions hold its tokens, and its assumed ones are committed or guessed."""
    covered = committed[base:]
    return base <= len(committed) and claim[: len(covered)] == covered and known[base : base + assumed] == claim[:assumed]


async def _open(call, drafter, prompt_ids, params, fingerprint, info, result, gamma, mode, max_block=0):
    """Write the opening, draft the first block while the verifier prefills, read `opened`.
    -> (Candidates, draft seconds, the opening's round trip minus the verifier's prefill)"""
    opening = open_request(drafter, prompt_ids, params, fingerprint, mode, max_block)
    await call.write(opening)
    result.bytes_sent += opening.ByteSize()
    drafter.start(prompt_ids, params, info.vocab_size)
    first = asyncio.to_thread(_timed, drafter.propose, prompt_ids, min(gamma, params.max_new_tokens - 1))
    sent_at = time.perf_counter()

    async def opened():
        reply = await _read(call)
        return reply, time.perf_counter() - sent_at - reply.opened.service_s

    (candidates, draft_s), (reply, link_s) = await asyncio.gather(first, opened())
    record_opened(result, reply)
    result.draft_s += draft_s
    return candidates, draft_s, max(0.0, link_s)


async def _send(call, result, params, candidates: Candidates, skip: int, base: int, assumed: list[int]) -> list[int]:
    """Write a claim: `assumed`, then the candidates' draft from index `skip`. -> the draft ids sent."""
    draft_ids = candidates.draft_ids[skip:]
    if not draft_ids and assumed:  # nothing left to verify
        return []
    q = None if candidates.q is None else candidates.q[skip:]
    request = proposal_request(draft_ids, q, params, candidates.dense_dtype, base, assumed)
    try:
        await call.write(request)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        # the verifier ended the stream meanwhile (its last reply, or a refusal): reading tells which
        return []
    result.bytes_sent += request.ByteSize()
    return draft_ids


def _commit(result: GenerationResult, committed: list[int], new: list[int], finished: bool, reason, on_commit, start,
            logprobs: pb.TokenLogprobs | None = None) -> bool:
    """Record committed tokens; True when the request ends here (finished, or on_commit asked to stop)."""
    committed.extend(new)
    result.token_ids.extend(new)
    if logprobs is not None:
        result.logprobs.extend(codec.logprobs_from_proto(logprobs))  # H6 (logprobs)
    result.record_chunk(time.perf_counter(), len(new))
    if result.rounds == 0:
        result.ttft_s = time.perf_counter() - start
    result.rounds += 1
    if finished:
        result.finish_reason = codec.finish_from_proto(reason)
    if on_commit is not None and on_commit(new) and not finished:
        result.finish_reason = FINISH_STOP
    return bool(result.finish_reason)


async def speculate_ahead(stub, drafter: Drafter, prompt_ids: list[int], params: SamplingParams, gamma, schedule,
                          info: pb.InfoReply, config: ClientConfig, fingerprint: str, result: GenerationResult,
                          on_commit) -> None:
    """Lock-step with drafting ahead, on one Speculate stream, extending `result`."""
    start = time.perf_counter()
    call = stub.Speculate(timeout=config.timeout_s, metadata=config.metadata)
    committed: list[int] = []
    in_flight: deque[_Block] = deque()
    drafting: _Draft | None = None
    reading: asyncio.Task | None = None
    try:
        block = schedule.gamma if schedule else gamma
        candidates, draft_s, _ = await _open(call, drafter, prompt_ids, params, fingerprint, info, result, block,
                                             pb.SPECULATION_MODE_LOCKSTEP)
        while True:
            live = [sent for sent in in_flight if _live(sent, committed)]
            if not live and drafting is None:  # nothing usable in flight: a block from the real commit
                if candidates is None:
                    block = schedule.gamma if schedule else gamma
                    candidates, draft_s = await asyncio.to_thread(
                        _timed, drafter.propose, [*prompt_ids, *committed], min(block, params.max_new_tokens - len(committed) - 1))
                    result.draft_s += draft_s
                draft = await _send(call, result, params, candidates, 0, len(committed), [])
                in_flight.append(_Block(len(committed), draft, 0, time.perf_counter(), draft_s))
                live = [in_flight[-1]]
                result.gamma_per_round.append(block)
                candidates = None
            if drafting is None and len(in_flight) == 1 and live:  # the next block, on the guess that this one passes
                block = schedule.gamma if schedule else gamma
                last = in_flight[-1]
                guess = last.claim[len(committed) - last.base :]
                n = min(block + 1, params.max_new_tokens - len(committed) - len(guess) - 1)
                if n >= 2:
                    drafting = _draft(drafter, [*prompt_ids, *committed, *guess], n, len(committed), guess)
            if reading is None and in_flight:
                reading = asyncio.ensure_future(_read(call))
            done, _ = await asyncio.wait({t for t in (reading, drafting and drafting.task) if t},
                                         return_when=asyncio.FIRST_COMPLETED)
            if drafting is not None and drafting.task in done:
                (candidates, draft_s), job, drafting = drafting.task.result(), drafting, None
                result.draft_s += draft_s
                assumed = [*job.guess, *candidates.draft_ids[:1]]  # the guessed bonus token is assumed too
                claim = [*assumed, *candidates.draft_ids[1:]]
                known = [*committed, *(in_flight[-1].claim[len(committed) - in_flight[-1].base :] if in_flight else [])]
                if len(claim) > len(assumed) and _still_holds(committed, known, job.base, claim, len(job.guess)) \
                        and len(committed) - job.base <= len(assumed) and len(in_flight) < 2:
                    await _send(call, result, params, candidates, 1, job.base, assumed)
                    in_flight.append(_Block(job.base, claim, len(assumed), time.perf_counter(), draft_s))
                    result.gamma_per_round.append(block)
                candidates = None
            if reading in done:
                reply, reading = reading.result(), None
                result.bytes_received += reply.ByteSize()
                verdict, sent = reply.verdict, in_flight.popleft()
                if verdict.stale:
                    result.stale += 1
                else:
                    verified = sent.claim[len(committed) - sent.base :]
                    next_token = [verdict.next_token] if verdict.HasField("next_token") else []
                    result.rtt_s.append(time.perf_counter() - sent.sent_at)
                    result.proposed_per_round.append(len(verified))
                    result.accepted_per_round.append(verdict.num_accepted)
                    _record_cost(result, verdict.service_s, verdict.cost)
                    if schedule:
                        schedule.update(len(verified), verdict.num_accepted, draft_s=sent.draft_s,
                                        service_s=verdict.service_s, rtt_s=max(0.0, result.rtt_s[-1] - verdict.service_s))
                    if _commit(result, committed, [*verified[: verdict.num_accepted], *next_token], verdict.finished,
                               verdict.finish_reason, on_commit, start, verdict.logprobs):
                        break
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
        raise await _refusal(call, exc, "session") from None
    finally:
        await _stop(call, reading, drafting)


async def _stop(call, reading: asyncio.Task | None, drafting: _Draft | None) -> None:
    """End the stream; a drafting job still running is waited for (a thread cannot be cancelled, and the
    draft model must be free for the next request)."""
    if reading is not None:
        reading.cancel()
    await end_stream(call)
    if drafting is not None:
        await asyncio.wait({drafting.task})


async def speculate_async(stub, drafter: Drafter, prompt_ids: list[int], params: SamplingParams, gamma, schedule,
                          info: pb.InfoReply, config: ClientConfig, fingerprint: str, result: GenerationResult,
                          on_commit) -> None:
    """Async mode on one Speculate stream, extending `result`: draft continuously, apply every commit."""
    start = time.perf_counter()
    block = max(1, schedule.gamma if schedule else gamma)
    lookahead = 2 * block + 1  # the next block is on the verifier before it finishes this one
    call = stub.Speculate(timeout=config.timeout_s, metadata=config.metadata)
    committed: list[int] = []
    guess: list[int] = []  # what this client proposed past the commit and still believes
    drafting: _Draft | None = None
    reading: asyncio.Task | None = None
    try:
        candidates, _, link_s = await _open(call, drafter, prompt_ids, params, fingerprint, info, result, block,
                                            pb.SPECULATION_MODE_ASYNC, max_block=block)
        link = _Link(link_s)
        guess = await _send(call, result, params, candidates, 0, 0, [])
        while True:
            room = min(lookahead - len(guess), params.max_new_tokens - len(committed) - len(guess) - 1, block)
            if drafting is None and room > 0:
                if len(committed) + len(guess) + room > link.verifier_position(len(committed)):
                    drafting = _draft(drafter, [*prompt_ids, *committed, *guess], room, len(committed), list(guess))
                elif reading is None:  # too late on arrival whatever it drafts: save the compute, wait for a commit
                    result.unsent += 1
            if reading is None:
                reading = asyncio.ensure_future(_read(call))
            done, _ = await asyncio.wait({t for t in (reading, drafting and drafting.task) if t},
                                         return_when=asyncio.FIRST_COMPLETED)
            if drafting is not None and drafting.task in done:
                (candidates, draft_s), job, drafting = drafting.task.result(), drafting, None
                result.draft_s += draft_s
                claim = [*job.guess, *candidates.draft_ids]
                if candidates.draft_ids and _still_holds(committed, [*committed, *guess], job.base, claim, len(job.guess)):
                    skip = len(committed) - job.base  # claimed positions committed meanwhile
                    assumed = job.guess[skip:]
                    first = max(0, skip - len(job.guess))  # the first draft token not yet committed
                    draft = candidates.draft_ids[first:]
                    if job.base + len(claim) > link.verifier_position(len(committed)):
                        draft = await _send(call, result, params, candidates, first, len(committed), assumed)
                    else:  # all of it committed by the time it would arrive: kept as a guess, not sent
                        result.unsent += 1
                    guess = [*assumed, *draft]
                    result.gamma_per_round.append(len(draft))
                # else a commit diverged from the guess it was drafted on: the next draft starts from the new state
            if reading in done:
                reply, reading = reading.result(), None
                result.bytes_received += reply.ByteSize()
                commit = reply.commit
                if reply.WhichOneof("kind") != "commit" or commit.base_len != len(committed):
                    raise VerifierError(f"async session out of step: expected a commit at {len(committed)}, got "
                                        f"{reply.WhichOneof('kind')} at {commit.base_len}", "INTERNAL")
                new = list(commit.token_ids)
                link.on_commit(len(new), commit.service_s)
                guess = guess[len(new):] if guess[: len(new)] == new else []  # resync on a divergent commit
                result.proposed_per_round.append(commit.verified)
                result.accepted_per_round.append(commit.num_accepted)
                result.stale = commit.stale
                _record_cost(result, commit.service_s, commit.cost)
                if _commit(result, committed, new, commit.finished, commit.finish_reason, on_commit, start,
                           commit.logprobs):  # H6 (logprobs)
                    break
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
        raise await _refusal(call, exc, "session") from None
    finally:
        await _stop(call, reading, drafting)
