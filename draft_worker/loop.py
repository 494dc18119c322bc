"""One client session of speculative decoding, whatever the mode: a state machine over one Speculate stream.

The mode (specdec.config.SPEC_MODES) is a setting of the same machine (`Mode`), exact in every mode (see
verifier_worker/session.py for the argument):

- **lockstep**: one block in flight. Draft a block from the commit, send it, wait a round trip for its verdict.
- **ahead**: up to two blocks in flight. While block k's verdict is in flight, draft block k+1 on the guess
  that block k is accepted whole and that the bonus token is the draft's own next token; send it at once,
  claiming that prefix (`assumed_ids`), so the verifier has it the moment it answers block k. A block whose
  guess turns out false is answered `stale` without compute, and the next block is drafted from the commit.
- **async**: the verifier decodes every engine step on its own and streams each commit; the client drafts
  continuously ahead of the committed stream, on top of its own earlier guesses (up to `lookahead(gamma)`
  tokens past what it knows is committed), sends every chunk as a claim, and resyncs on every commit that
  diverges from its guess. The verifier verifies whatever usable draft has arrived when a step starts and
  never waits for one. A chunk the verifier will have committed past by the time it arrives (`Link`) is kept
  as a guess but not sent, and one its own drafting time would make late is not drafted (`Link.worth_drafting`).

Events: the opening's reply, "draft finished", "verdict arrived" (lockstep, ahead) and "commit arrived"
(async). After each, named predicates decide what starts next: a block from the commit, a block on the
guess, an async chunk; a read when a reply is due. The gamma schedule is read for every block or chunk
drafted and updated from every verdict or commit, in every mode. One drafting job runs at a time.

The verifier's draft budget (issue 18): every opening, verdict and commit may carry the most draft tokens the
next block may hold (`draft_budget`; unset from an older verifier). A block or chunk carries at most min(budget, the
schedule's gamma) (`gamma`), and a draft that finishes after the budget fell is cut to it; with `--gamma auto`
(AutoGamma) the schedule's gamma is the client's own best one, which every proposal and shadow verdict says
(Proposal.wants, draft_worker/turns.py). Budget 0: async sends nothing and the verifier decodes; lock-step asks the
verifier to decode on its own too (OpenSession.server_decodes): after any reply granting 0, `opened` too, it is the
verifier's turn (`server_turn`), it streams a Commit per step, and the client sends its next block after the first
reply granting more. A client whose own gamma is 0, or whose drafter found nothing, hands the turn over itself: its
empty block asks the verifier to decode `decode_alone` steps on its own (turns.py). An older verifier gets empty
proposals, one decoded token a round.

Positions count generated tokens of this stream (the prompt it was opened with excluded). A claim is the
tokens from position `base`: first ones assumed (already proposed, or a guessed bonus token: no q), then
draft tokens. The stream plumbing is draft_worker/stream.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from draft_worker import turns
from draft_worker.drafters import Candidates, Drafter
from draft_worker.gamma import Link
from draft_worker.modes import MODES, Block, Job
from draft_worker.shadow import ShadowBlock, Shadows, drafting_here, sessions_drafting_here
from draft_worker.stream import CALL_ERRORS, SpeculateStream, block_s, expect, open_request, proposal_request, \
    record_committed, record_opened, record_round, timed
from draft_worker.transport import VerifierError
from draft_worker.trees import propose_tree
from protos.specdec.v1 import specdec_pb2 as pb
from specdec.budget import verifiers_turn
from specdec.config import FINISH_STOP, SamplingParams, lookahead

# called with the ids each verdict (or commit) commits; returning True ends the request there, as a stop
OnCommit = Callable[[list[int]], bool | None]


class ClientSession:
    """One Speculate stream, extending `result` with every token committed before it ends."""

    def __init__(self, stream: SpeculateStream, drafter: Drafter, prompt_ids: list[int], params: SamplingParams,
                 schedule, mode: str, vocab_size: int, fingerprint: str, on_commit: OnCommit | None):
        self.stream, self.result = stream, stream.result
        self.drafter, self.prompt_ids, self.params = drafter, prompt_ids, params
        self.schedule, self.mode = schedule, MODES[mode]
        self.vocab_size, self.fingerprint, self.on_commit = vocab_size, fingerprint, on_commit
        self.tree_nodes = getattr(drafter, "tree_nodes", 0)  # > 0: every block is a token tree (draft_worker/trees.py)
        if self.tree_nodes and mode != "lockstep":
            raise ValueError(f"token trees (tree_nodes = {self.tree_nodes}) run in lockstep mode only, not {mode!r}")
        self.committed: list[int] = []
        self.guess: list[int] = []  # tokens past the commit this client proposed (or drafted) and still believes
        self.in_flight: deque[Block] = deque()
        self.drafting: Job | None = None
        self.reading: asyncio.Future | None = None
        self.link = Link(0.0)
        self.budget: int | None = None  # the verifier's latest draft budget; None: it grants none
        self.server_decodes = False  # lock-step: the verifier decodes on its own at budget 0 (said in `opened`)
        self.server_turn = False  # it is doing so now: the client reads its commits and sends nothing
        self.alone = 0  # steps the verifier still decodes on its own because the last block asked it (decode_alone)
        self.shadows = Shadows(shared_cores=stream.shared_cores)  # drafted while the verifier decodes alone (shadow.py)
        self.draft_s_per_token = 0.0  # of the last job after the first that ran the drafter
        self.unverified_s = 0.0  # async: drafting since the last commit that verified a draft, charged to the next
        self.prefill_job: Job | None = None  # the first that ran the drafter: its time holds the draft's prefill
        self.finished = False
        self.start = time.perf_counter()

    async def run(self) -> None:
        try:
            with drafting_here():  # its drafter shares this process's cores with the other sessions open here
                await self._open()
                while not self.finished:
                    self._start_drafting()
                    self._start_reading()
                    await self._next_event()
        except CALL_ERRORS as exc:
            raise await self.stream.refusal(exc) from None
        finally:
            await self._stop()

    # --- what to start next ---------------------------------------------------------------------------------

    @property
    def gamma(self) -> int:
        """The draft tokens of the next block or chunk: the schedule's gamma within the verifier's budget."""
        return self.schedule.gamma if self.budget is None else min(self.schedule.gamma, self.budget)

    @property
    def _left(self) -> int:
        """Tokens still to generate on this stream."""
        return self.params.max_new_tokens - len(self.committed)

    def _live(self, block: Block) -> bool:
        """The block's claim still agrees with the commit, and its assumed part is not yet all committed past."""
        done = len(self.committed) - block.base
        return 0 <= done <= block.assumed and self.committed[block.base :] == block.claim[:done]

    def _needs_block_from_commit(self) -> bool:
        """Lockstep/ahead: no block in flight can still be verified, so the session waits for a new one."""
        return (not self.mode.streams_commits and not self.server_turn
                and not any(self._live(block) for block in self.in_flight))

    def _may_draft_on_guess(self) -> bool:
        """Ahead: the one block in flight is live and there is room for a guessed bonus token and a draft."""
        return (self.mode.max_in_flight > 1 and len(self.in_flight) == 1 and self._live(self.in_flight[0])
                and self._on_guess_size() >= 2)

    def _on_guess_size(self) -> int:
        return min(self.gamma + 1, self._left - len(self.guess) - 1)

    def _chunk_size(self) -> int:
        """Async: draft tokens the next chunk may carry past the guess (0: none)."""
        gamma = self.gamma
        return min(lookahead(gamma) - len(self.guess), self._left - len(self.guess) - 1, gamma)

    def _arrives_in_time(self, end: int) -> bool:
        """A claim ending at position `end` reaches the verifier before it commits past it (lockstep/ahead:
        always, the verifier waits for proposals)."""
        return not self.mode.streams_commits or end > self.link.verifier_position(len(self.committed))

    def _awaited(self, job: Job) -> bool:
        """Lockstep/ahead: a block drafted from the commit is the one the session waits for, even if empty (a
        plain decoding round)."""
        return not self.mode.streams_commits and not job.guess and not job.assumes_first

    def _room_in_flight(self) -> bool:
        return self.mode.streams_commits or sum(map(self._live, self.in_flight)) < self.mode.max_in_flight

    def _start_drafting(self) -> None:
        empty, shadows = self._empty_block_due(), self.shadows
        if empty and self.drafting is not None and self.drafting.shadow and shadows.set_aside is None:
            shadows.set_aside, self.drafting = self.drafting, None  # an empty block needs no drafter: it goes at once
        if self.drafting is not None or (shadows.set_aside is not None and not empty):
            return
        if self._needs_block_from_commit():
            self._draft(min(self.gamma, self._left - 1), guess=[])
        elif self._may_draft_on_guess():
            self._draft(self._on_guess_size(), guess=list(self.guess), assumes_first=True)
        elif self.mode.streams_commits and (n := self._chunk_size()) > 0:
            if self.link.worth_drafting(len(self.committed), len(self.committed) + len(self.guess) + n,
                                        n * self.draft_s_per_token):
                self._draft(n, guess=list(self.guess))
                getattr(self.schedule, "chunk_drafted", lambda: None)()
            elif self.reading is None:  # too late on arrival whatever it drafts: save the compute, wait for a commit
                self.result.unsent += 1
        elif not self.tree_nodes and shadows.due(self.server_turn or (self.mode.streams_commits and self.budget == 0),
                                                 self.schedule, self._left, len(self.committed),
                                                 self.draft_s_per_token, self.link.s_per_token or 0.0, self._shared,
                                                 sessions_drafting_here()):
            self._draft(shadows.size(self.schedule, self._left), guess=[], shadow=True)

    @property
    def _shared(self) -> bool:
        """The verifier's last step carried other sessions too."""
        return (self.result.batch_size or [1])[-1] > 1

    def _empty_block_due(self) -> bool:
        """Lockstep/ahead: the block the session waits for carries no draft (the client's own gamma is 0, or the
        budget): it is sent at once, not after a shadow block the drafter is busy with (an LM's takes ~0.1 s a
        token on a shared CPU core, and the verifier holds its next step for this block)."""
        return self._needs_block_from_commit() and min(self.gamma, self._left - 1) <= 0 and not self.tree_nodes

    def _start_reading(self) -> None:
        if self.reading is None and (self.mode.streams_commits or self.in_flight or self.server_turn):
            self.reading = asyncio.ensure_future(self.stream.read())

    def _draft(self, n: int, guess: list[int], assumes_first: bool = False, shadow: bool = False) -> None:
        # drafting is compute: off the event loop, so replies keep being read while it runs
        if shadow:  # on a copy of the commit: commits arriving meanwhile do not move it
            self.shadows.last_base = len(self.committed)
            work = (self.drafter.propose, [*self.prompt_ids, *self.committed], n)
        elif self.tree_nodes:  # lock-step: a tree from the commit, at most max_gamma nodes (the verifier's limit)
            nodes = min(self.tree_nodes, self.schedule.max_gamma) if n > 0 else 0
            work = (propose_tree, self.drafter, [*self.prompt_ids, *self.committed], nodes)
        elif self.mode.drafter_tracks_commits:
            work = (self.drafter.get_candidates, n)
        else:
            work = (self.drafter.propose, [*self.prompt_ids, *self.committed, *guess], n)
        runs = n > 0 or shadow or bool(self.tree_nodes)
        if not runs:  # an empty block: nothing to draft, no thread
            task = asyncio.get_running_loop().create_future()
            task.set_result((Candidates([], None), 0.0))
        else:
            task = asyncio.ensure_future(asyncio.to_thread(timed, *work))
        self.drafting = Job(task, len(self.committed), guess, n if shadow else self.gamma, assumes_first, shadow)
        self.prefill_job = self.prefill_job or (self.drafting if runs else None)  # the opening's, or the first after
        self.shadows.drafted |= n > 0 and not shadow

    async def _next_event(self) -> None:
        jobs = (self.drafting, self.shadows.set_aside)
        waiting = {t for t in (self.reading, *(job and job.task for job in jobs)) if t is not None}
        assert waiting, "a session always drafts or awaits a reply"
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if self.shadows.set_aside is not None and self.shadows.set_aside.task in done:
            job, self.shadows.set_aside = self.shadows.set_aside, None
            await self._draft_finished(job, *job.task.result())
        if self.drafting is not None and self.drafting.task in done:
            job, self.drafting = self.drafting, None
            await self._draft_finished(job, *job.task.result())
        if self.reading is not None and self.reading in done:
            reply, self.reading = self.reading.result(), None
            if self.mode.streams_commits or self.server_turn:
                self._commit_arrived(reply)
                self.alone = max(0, self.alone - 1)
            else:
                self._verdict_arrived(reply)
            stale = reply.WhichOneof("kind") == "verdict" and reply.verdict.stale  # the verifier keeps waiting then
            self.server_turn = (self.server_decodes and not stale and not self.finished
                                and verifiers_turn(self.budget, self.alone))  # the verifier's rule, same replies
        await self._shadow_decided()

    # --- events ---------------------------------------------------------------------------------------------

    async def _open(self) -> None:
        """Write the opening, draft the first block while the verifier prefills, read `opened`. Nothing more is
        written until `opened` arrives: a refusal then reaches us as the verifier's own status, whereas a write
        that races the server's abort makes grpcio report INTERNAL "Internal error from Core". A verifier on this
        machine's cores (ClientConfig.shared_cores) prefills alone: the first block is drafted after `opened`
        (one box, 2 cores, real pair: time to first token 2.8 s instead of 3.5-5.1 s, against 2.1 s without a draft).
        """
        # the most draft tokens a block or chunk of this session carries: the verifier's budget never exceeds it
        await self.stream.open(open_request(self.drafter.name, self.prompt_ids, self.params, self.fingerprint,
                                            self.mode.wire, self.schedule.max_gamma,
                                            getattr(self.schedule, "tpot_slo_ms", 0.0),
                                            server_decodes=self.mode.max_in_flight == 1, wants=self._wants()))
        sent_at = time.perf_counter()
        if self.stream.shared_cores:
            self._opened(await self.stream.read(), sent_at)
        self.drafter.start(self.prompt_ids, self.params, self.vocab_size)
        if not self.server_turn:  # granted 0 from the start: the verifier decodes the first tokens on its own
            self._draft(min(self.gamma, self._left - 1), guess=[])
        if not self.stream.shared_cores:
            self._opened(await self.stream.read(), sent_at)

    def _opened(self, reply: pb.SpeculateReply, sent_at: float) -> None:
        record_opened(self.result, reply)
        self._budget_arrived(reply.opened)
        self.server_decodes = self.mode.max_in_flight == 1 and reply.opened.server_decodes
        self.shadows.taken = reply.opened.takes_shadows
        self.server_turn = self.server_decodes and verifiers_turn(self.budget, 0)  # the rule, for `opened`
        if self.server_decodes and hasattr(self.schedule, "decode_alone"):  # gamma 0 now costs no round trip
            self.schedule.decode_alone = True
        self.link = Link(max(0.0, time.perf_counter() - sent_at - reply.opened.service_s))

    def _claim_holds(self, base: int, claim: list[int], guessed: int) -> bool:
        """The claim's committed positions hold its tokens, and its first `guessed` tokens are committed or
        still guessed."""
        covered = self.committed[base:]
        known = [*self.committed, *self.guess]
        return claim[: len(covered)] == covered and known[base : base + guessed] == claim[:guessed]

    async def _draft_finished(self, job: Job, candidates: Candidates, draft_s: float) -> None:
        """Send what the job drafted as a claim from the commit, if it still holds and is wanted."""
        self.result.draft_s += draft_s
        if job.shadow:
            if candidates.draft_ids:
                self.draft_s_per_token = draft_s / len(candidates.draft_ids)
            self.shadows.block = ShadowBlock(job.base, tuple(candidates.draft_ids[: job.gamma]), job.gamma, draft_s)
            return await self._shadow_decided()
        if self.server_decodes and (self.server_turn or job.base != len(self.committed)):
            return  # the opening's block when `opened` granted 0: the verifier decodes on its own meanwhile
        drafted = candidates.draft_ids
        if self.budget is not None:  # the budget fell while it drafted (the first block: drafted before it was known)
            drafted = drafted[: self.budget + job.assumes_first]  # ahead: the guessed bonus token is no draft token
        if drafted and job is not self.prefill_job:  # whose time includes the draft model's prefill of the prompt
            self.draft_s_per_token, self.unverified_s = draft_s / len(drafted), self.unverified_s + draft_s
            if self.mode.streams_commits:
                getattr(self.schedule, "drafted", lambda _: None)(self.draft_s_per_token)
        claim = [*job.guess, *drafted]
        assumed = len(job.guess) + job.assumes_first
        done = len(self.committed) - job.base  # claimed positions committed meanwhile
        if not self._claim_holds(job.base, claim, len(job.guess)):
            return  # a commit diverged from the guess it was drafted on: the next draft starts from the new state
        if not (self._awaited(job) or len(claim) > max(assumed, done) and self._room_in_flight()):
            self.result.unsent += self.mode.streams_commits and done >= len(claim) > len(job.guess)  # all committed
            return
        self.guess = claim[done:]
        if not self._arrives_in_time(job.base + len(claim)):
            self.result.unsent += 1  # all of it committed by the time it would arrive: kept as a guess, not sent
            return
        skip = max(done, assumed) - len(job.guess)  # the first draft token to send
        q = None if candidates.q is None else candidates.q[skip : len(drafted)]
        assert candidates.parents is None or skip == 0, "a tree is sent whole (lock-step)"
        self.alone, wants = self._decode_alone(job, len(drafted) - skip), self._wants()
        request = proposal_request(drafted[skip:], q, self.params, candidates.dense_dtype, len(self.committed),
                                   claim[done:assumed],
                                   None if candidates.parents is None else candidates.parents[: len(drafted)],
                                   self.alone, wants, self.draft_s_per_token or None)
        await self._send_shadows(self.shadows.flush(wants))  # the misses held back go first
        sent_at = time.perf_counter()
        await self.stream.send(request)  # a failed write: the verifier ended the stream, and reading tells why
        self.result.gamma_per_round.append(job.gamma)
        if not self.mode.streams_commits:
            self.in_flight.append(Block(len(self.committed), claim[done:], max(0, assumed - done), sent_at, draft_s))

    async def _shadow_decided(self) -> None:
        """Report the shadow block once the commits decide it, to the verifier and to the schedule."""
        decided = None if self.finished else self.shadows.decided(self.committed)
        if decided is None:
            return
        shadow, accepted = decided
        if hasattr(self.schedule, "observe"):
            self.schedule.observe(len(shadow.draft_ids), accepted, shadow.draft_s,
                                  opening=self.schedule.opens_at(shadow.base))
        await self._send_shadows(self.shadows.report(shadow, accepted, self._wants(), self._shared))

    async def _send_shadows(self, message: tuple[pb.SpeculateRequest, int] | None) -> None:
        if message is not None:
            await self.stream.send(message[0])
            self.result.shadows += message[1]  # the blocks it reports

    def _wants(self) -> int | None:
        return turns.wants(self.schedule, self.mode.streams_commits, bool(self.tree_nodes))

    def _decode_alone(self, job: Job, drafted: int) -> int:
        """Steps the verifier should decode on its own after this block (draft_worker/turns.py)."""
        if not self.server_decodes or self.budget == 0:  # budget 0: the verifier decodes anyway
            return 0
        step_s = self.link.s_per_token or (self.result.compute_s or [0.0])[-1]  # its own steps, or a verdict's
        rtt_s = (self.result.rtt_s or [None])[-1]
        return turns.decode_alone(self.schedule, job.gamma, drafted, self._left, step_s, rtt_s)

    def _verdict_arrived(self, reply: pb.SpeculateReply) -> None:
        expect(reply, "verdict")
        verdict, sent = reply.verdict, self.in_flight.popleft()
        self._budget_arrived(verdict)
        if verdict.stale:
            self.result.stale += 1
            return
        rtt_s = time.perf_counter() - sent.sent_at
        verified = sent.claim[len(self.committed) - sent.base :]  # its draft tokens past the commit
        next_token = verdict.next_token if verdict.HasField("next_token") else None
        self.result.rtt_s.append(rtt_s)
        record_round(self.result, len(verified), verdict.num_accepted, verdict.service_s, verdict.cost)
        self.schedule.update(len(verified), verdict.num_accepted, draft_s=sent.draft_s, service_s=block_s(verdict),
                             rtt_s=max(0.0, rtt_s - verdict.service_s))
        if verdict.accepted_nodes:  # a tree's accepted path (trees: the drafter syncs to the context it is given)
            accepted = [verified[i] for i in verdict.accepted_nodes]
        else:
            accepted = verified[: verdict.num_accepted]
            if self.mode.drafter_tracks_commits and not self.tree_nodes:
                self.drafter.commit(verdict.num_accepted, next_token)
        new = [*accepted, *([] if next_token is None else [next_token])]
        self._committed(new, verdict.finished, verdict.finish_reason, verdict.logprobs)

    def _commit_arrived(self, reply: pb.SpeculateReply) -> None:
        commit = reply.commit
        if reply.WhichOneof("kind") != "commit" or commit.base_len != len(self.committed):
            raise VerifierError(f"async session out of step: expected a commit at {len(self.committed)}, got "
                                f"{reply.WhichOneof('kind')} at {commit.base_len}", "INTERNAL")
        new = list(commit.token_ids)
        self._budget_arrived(commit)
        self.link.on_commit(len(new), commit.service_s)
        self.result.stale = commit.stale
        record_round(self.result, commit.verified, commit.num_accepted, commit.service_s, commit.cost)
        # async: no round trip in a step's cost (the verifier never waits on the link; lock-step's own decoding steps
        # leave the estimate as it is), and every chunk drafted since the last verified draft in this one's (a chunk a
        # commit contradicts or passes is never verified: 4 tiny LM sessions had 6-14 of ~180 drafted tokens verified)
        rtt_s = 0.0 if self.mode.streams_commits else getattr(self.schedule, "rtt_s", None) or 0.0
        draft_s, self.unverified_s = (self.unverified_s, 0.0) if commit.verified else (0.0, self.unverified_s)
        self.schedule.update(commit.verified, commit.num_accepted, draft_s=draft_s, service_s=block_s(commit), rtt_s=rtt_s)
        if self.mode.drafter_tracks_commits and not self.tree_nodes:  # lock-step: the verifier decoded on its own
            for token in new:
                self.drafter.commit(0, token)
        self._committed(new, commit.finished, commit.finish_reason, commit.logprobs)

    def _budget_arrived(self, reply: pb.SessionOpened | pb.Verdict | pb.Commit) -> None:
        if reply.HasField("draft_budget"):
            self.budget = reply.draft_budget
            self.result.budget_per_round.append(reply.draft_budget)

    def _committed(self, new: list[int], finished: bool, reason: int, logprobs: pb.TokenLogprobs) -> None:
        """Record committed tokens (and their log-probabilities, when the request asked: before on_commit, which
        may read them); the session ends when the verifier finished it or on_commit asks to stop."""
        self.committed.extend(new)
        self.guess = self.guess[len(new) :] if self.guess[: len(new)] == new else []  # resync on a divergent commit
        record_committed(self.result, new, finished, reason, logprobs, self.start)
        if self.on_commit is not None and self.on_commit(new) and not finished:
            self.result.finish_reason = FINISH_STOP
        self.finished = bool(self.result.finish_reason)

    async def _stop(self) -> None:
        """End the stream; a drafting job still running is waited for (a thread cannot be cancelled, and the
        draft model must be free for the next request)."""
        if self.reading is not None:
            self.reading.cancel()
        await self.stream.end()
        jobs = {job.task for job in (self.drafting, self.shadows.set_aside) if job is not None}
        if jobs:
            await asyncio.wait(jobs)

