"""The verifier's engine: owns the model, every session's KV memory and the one compute thread, and runs
all sessions' pending work as one batched forward per step (continuous batching).

Work items: a session's prefill (the prompt but its last token, cut into chunks), a verification block
[last committed token] + gamma draft tokens with gamma per session (gamma = 0 is a plain decoding step),
and the decoding steps of `Generate` and of async Speculate sessions, which re-enter the queue after every
step until the session ends. A decoding step's block is made when the step takes it: [last committed token]
+ the head of the session's `ahead` drafts (session.py), so an async session verifies whatever usable draft
has arrived by then and decodes alone otherwise; it never waits for one.

One step: take pending work in FIFO order up to `max_batch_tokens` (counted as the forward computes it,
padding included: sessions x longest row), a prefill taking only the chunk that fits (a padding backend
runs prompt chunks and blocks in separate steps, the kind at the queue's head first), and a block taking
its draft tokens (`_take_drafts`: the client's proposal, or the head of `ahead`, capped by the session's
`budget`); run ONE forward over all of it (`kv.packed_forward` or `kv.batched_forward`, pad-and-stack,
whichever computes less: backends.py; see kv.py for the KV design and why) and verify every block in ONE
call (`sampling.verify_batch`, each session's own generator); then, back on the event loop, apply each
block's outcome to its session (`session.commit`: tokens, finish, `ahead`, KV rollback) and resolve its
awaitable. Work taken from the front and put back
at the end (an unfinished prefill, the next decoding step) makes it round-robin: every session gets a
turn, and a long prompt delays the others by at most one step of the budget.

Lock-step clients: a Speculate session sends its next block one round trip (plus its drafting) after its
verdict, so sessions that shared a step arrive a little apart. Starting a step with whoever arrived first
would split them into alternating steps of one session each, and batching would never happen. So once
work is pending, the engine waits for the sessions that rode in the last step and have not yet sent their
next block, at most min(batch_wait_s, a quarter of the last step's compute): a bounded tax on the others,
none at all when everyone has arrived, whoever is late (an LM drafting on a CPU: the budgeter, told its
turnaround, grants it drafts only when a block pays for the step it will miss: `arrives`; one that still misses
it is `late`). A lock-step session the verifier decodes on its own (`session.server_decodes`, while granted 0 or
asked to decode alone) is queued by the engine as it applies the answer before, as Generate's next step is, so no
step waits for the server to queue it (`verifiers_step`).

Threads (vLLM's `update_from_output`): one owner of session state, the event loop. The compute thread
(`step.run_step`) runs the forward, which appends each row's new keys to its session's KV, and the verification,
and returns per-row outcomes (num_accepted, next_token); it changes nothing else. The event loop schedules,
offers drafts, commits (`_finish`), truncates and frees KV, but never a session's KV while the step that
uses it runs: steps run one at a time and `_finish` runs after the step, and `close` frees a session in
the running batch only when that step is over, so a client that cancels mid-step disturbs nobody else.

Draft budget (issue 18): the event loop feeds a `DraftBudgeter` (budgeting.py) every step's cost (its tokens as
the backend computed them, `pads_rows`) and every block's outcome, and after applying a step's outcomes grants each
answered session the most draft tokens its next block may carry (`session.budget`, one grant for the whole step;
the servicer sends it in the reply). `_take_drafts` verifies no more: a lock-step proposal's extra drafts are
dropped and counted (`budgeter.dropped`), an async session's stay in `ahead` for a later step.

Cost accounting: every step's wall time (forward + verification) is the step's `compute_s`, and each work
item's `share_s` is compute_s x its tokens / the step's tokens (padding excluded), so the shares of one
step add up to its compute time and a request's verifier cost stays honest at any concurrency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from specdec.budget import verifiers_turn
from specdec.config import MAX_GAMMA, SamplingParams, VerifierLimits
from specdec.context import SuffixIndex
from verifier_worker.backends import Backend, NoRoom, as_backend
from verifier_worker.accounting import EngineStats, StepCost
from verifier_worker.budgeting import DraftBudgeter
from verifier_worker.step import run_step
from verifier_worker.session import RoundResult, VerifierSession
from verifier_worker.work import Decoding, Work, resolve

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: torch.nn.Module | Backend, max_batch_tokens: int = 512,
                 batch_wait_s: float = VerifierLimits.batch_wait_s,
                 on_step: Callable[[float, int, int], None] | None = None, budgeter: DraftBudgeter | None = None):
        """`model`: a transformers module or a backend (backends.py: the model side, forward and KV memory).
        `on_step(compute_s, sessions, tokens)` is called on the event loop after every step (metrics).
        `budgeter`: grants each session's draft budget after every step (None: no cap, as before issue 18)."""
        assert max_batch_tokens >= 1 and batch_wait_s >= 0
        self.backend = as_backend(model)  # issue 20: the one seam between the engine and the model
        self.on_step = on_step
        self.budgeter = budgeter
        self.pads_rows = getattr(self.backend, "pads_rows", False)
        if budgeter is not None:  # the grant prices what this backend computes, from where each block starts
            budgeter.padded, budgeter.context = self.pads_rows, lambda session: None if session.suffix is None else session.suffix.bucket
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_s
        self.device = self.backend.device
        self._sessions: set[VerifierSession] = set()  # open; a closed session is one no longer in it
        self._kv_reserved: dict[VerifierSession, int] = {}  # longest KV each open session may reach (bounded backends)
        self._queue: deque[Work] = deque()
        self._turns: dict[VerifierSession, deque[asyncio.Future]] = {}  # the verifier's own steps, for `verifiers_step`
        self._running: list[tuple[Work, int]] = []  # the batch of the step in flight
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verifier-compute")
        self._task: asyncio.Task | None = None
        self._expected: set[VerifierSession] = set()  # rode in the last step; their next block is on its way
        self._drafting: set[VerifierSession] = set()  # of those, answered a verdict with a draft budget > 0
        self._arrived = asyncio.Event()  # set by every submission
        self._last_compute_s = 0.0
        self.steps = 0
        self.busy_s = 0.0

    # ------------------------------------------------------------------------------ sessions and work
    def open(self, prompt_ids: list[int], params: SamplingParams, client: str = "", max_block: int = MAX_GAMMA,
             max_gamma: int | None = None, tpot_slo_s: float | None = None, drafter: str | None = None) -> VerifierSession:
        """A new session; `max_block`: most `ahead` draft tokens one of its decoding steps verifies (async).
        Its KV handle comes from the backend (backends.py), the only place one is made. For the budgeter:
        `max_gamma` the most its blocks may ever carry (None: the budgeter's limit; 0: Generate, decode only),
        `tpot_slo_s` its latency target (None: the budgeter's default), `drafter` its client's drafter name.
        Raises NoRoom when the backend's fixed KV cache cannot hold this session's longest KV beside every
        open session's (admission control: a step never runs out of cells, so no step fails for it)."""
        need = len(prompt_ids) + params.max_new_tokens + max(max_block, MAX_GAMMA)  # prompt, output, one block
        capacity = getattr(self.backend, "kv_capacity_tokens", None)
        if capacity is not None and need > capacity - sum(self._kv_reserved.values()):
            free = capacity - sum(self._kv_reserved.values())
            room = ", more than all of it" if need > capacity else f", and {free} are free beside the open sessions; retry later"
            raise NoRoom(f"the verifier's KV cache holds {capacity} tokens; this session may need {need} (prompt + "
                         f"max_new_tokens + a block of {max(max_block, MAX_GAMMA)}){room}, or raise the verifier's --n-ctx")
        session = VerifierSession(prompt_ids, params, self.backend.new_kv(), client, self.device, max_block)
        self._sessions.add(session)
        if capacity is not None:
            self._kv_reserved[session] = need
        if self.budgeter is not None:
            self.budgeter.open(session, max_gamma, tpot_slo_s, drafter)
            if max_gamma != 0:  # it may be granted drafts (None: up to max_gamma): its grants read where blocks start
                session.suffix = SuffixIndex(prompt_ids)
        return session

    def close(self, session: VerifierSession) -> None:
        """End a session: drop its queued work and free its KV (after the running step, if it is in it:
        `_finish` frees it then and drops that step's outcome for it)."""
        self._sessions.discard(session)
        self._kv_reserved.pop(session, None)  # its cells are cleared before the next step decodes (backend)
        self._expected.discard(session)
        self._drafting.discard(session)
        self._turns.pop(session, None)
        if self.budgeter is not None:
            self.budgeter.close(session)
        for work in [w for w in self._queue if w.session is session]:
            self._queue.remove(work)
            work.future.cancel()
        if not any(work.session is session for work, _ in self._running):
            session.kv.free()

    async def prefill(self, session: VerifierSession) -> StepCost:
        """Cache the prompt (in chunks, over as many steps as the budget needs)."""
        if not session.prompt_to_cache:
            return StepCost()
        _, cost = await self._submit(Work(session, session.prompt_to_cache, self._future())).future
        return cost

    async def verify(self, session: VerifierSession, draft_ids: list[int], q: torch.Tensor | None,
                     parents: list[int] | None = None) -> tuple[RoundResult, StepCost]:
        """Verify one block (gamma = len(draft_ids), 0 allowed) in the next step with room for it; with `parents`,
        draft_ids are a token tree's nodes (specdec/tree.py, validated by the caller)."""
        return await self.submit(session, draft_ids, q, parents)

    def submit(self, session: VerifierSession, draft_ids: list[int], q: torch.Tensor | None,
               parents: list[int] | None = None, decode_alone: int = 0) -> asyncio.Future:
        """`verify`, queued now (not when awaited). decode_alone: the steps its proposal asks the verifier to decode
        the session on its own after this block (`session.server_decodes` only; see `verifiers_step`)."""
        session.decode_alone = max(0, decode_alone)
        return self._submit(Work(session, [], self._future(), [], proposed=(draft_ids, q, parents))).future

    def verifiers_step(self, session: VerifierSession) -> asyncio.Future | None:
        """Lock-step with `session.server_decodes`: the step the engine queued itself after the answer just awaited
        (its prefill, a block's verdict, or its own last step), while `verifiers_turn(budget, decode_alone)` holds;
        None: the client's turn. The engine queues it as it applies that answer, like Generate's next step, so the
        next step neither waits for the server's coroutine to queue it nor misses it (0.4-0.7 ms a step at 4 sessions
        of the tiny pair; on one CPU core that work then overlaps the step and shares its GIL, on a GPU it overlaps
        the kernels); await them in order, one after each answer."""
        turns = self._turns.get(session)
        return turns.popleft() if turns else None

    def decode(self, session: VerifierSession) -> Decoding:
        """Decode (or verify the session's `ahead` drafts) in every step from now on until the session
        finishes (Generate, async Speculate)."""
        return Decoding(self._submit(self._decode_work(session)))

    def stats(self) -> EngineStats:
        sessions = self._sessions | {work.session for work, _ in self._running}
        return EngineStats(
            sessions=len(sessions),
            kv_tokens=sum(s.kv.length for s in sessions),
            kv_bytes=sum(s.kv.nbytes for s in sessions),
            queued=len(self._queue),
            steps=self.steps,
            busy_s=self.busy_s,
        )

    def queued_tokens(self) -> int:
        """Tokens waiting for a step (prefill rests and blocks): the load a router balances on (InfoReply.load)."""
        return sum(len(work.tokens) for work in self._queue)

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def _decode_work(self, session: VerifierSession) -> Work:
        return Work(session, [], self._future(), [], decoding=True)

    def _submit(self, work: Work) -> Work:
        assert work.session in self._sessions, "work for a closed session"
        work.session.block_arrived(time.perf_counter(), len(work.proposed[0]) if work.proposed else 0)
        self._queue.append(work)
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return work

    # ------------------------------------------------------------------------------------------ steps
    async def _run(self) -> None:
        """Run steps while there is work; a later submission starts a new run."""
        loop = asyncio.get_running_loop()
        while (await self._gather()) and (batch := self._take_batch()):
            if self.budgeter is not None:  # drafted past the wait: the grant cost the session a step
                for session in self._drafting - {work.session for work, _ in batch}:
                    self.budgeter.late(session, session.budget or 0)
            self._expected, self._drafting = set(), set()  # refilled by _finish from this step's answers
            self._running = batch
            started = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self._compute, run_step, self.backend, batch)
            except Exception as exc:  # noqa: BLE001 - every session of the step gets the error
                log.exception("engine step failed (%d sessions)", len(batch))
                outcomes = [exc] * len(batch)
            compute_s = time.perf_counter() - started
            self.steps += 1
            self.busy_s += compute_s
            self._last_compute_s = compute_s
            if self.on_step is not None:
                self.on_step(compute_s, len(batch), sum(n for _, n in batch))
            if self.budgeter is not None:
                prefill = sum(n for work, n in batch if work.is_prefill)
                rows = [n for work, n in batch if not work.is_prefill]  # verify and decode rows' tokens
                # a padding backend computes every row at the longest row's length: fit what it computes
                computed = len(rows) * max(rows, default=0) if self.pads_rows else sum(rows)
                self.budgeter.on_step(compute_s, len(batch), computed + prefill, prefill)
            self._finish(batch, outcomes, compute_s)

    async def _gather(self) -> bool:
        """Wait (bounded) for the last step's sessions to send their next block; False when nothing is pending."""
        deadline = time.perf_counter() + self._wait_s()
        while self._queue and self._expected - {work.session for work in self._queue}:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return bool(self._queue)

    def _wait_s(self) -> float:
        """How long a step waits for the last step's lock-step sessions: min(batch_wait_s, a quarter of its compute)."""
        return min(self.batch_wait_s, self._last_compute_s / 4)

    def _take_batch(self) -> list[tuple[Work, int]]:
        """(work, tokens it feeds this step), FIFO, while sessions x longest row fits the budget. A padding backend
        never mixes prompt chunks with blocks: each row would be computed at the chunk's length (three 1-token rows
        beside a 128-token chunk cost 4 x 128 tokens, and a new session's 192-token prompt 4x its own cost while
        others decode), so a step takes the kind at the head of the queue and the other kind waits a step."""
        batch: list[tuple[Work, int]] = []
        longest = 0
        kind, other = self._queue[0].is_prefill if self._queue else None, []
        while self._queue:
            work = self._queue[0]
            if self.pads_rows and work.is_prefill != kind:
                other.append(self._queue.popleft())
                continue
            if not work.is_prefill:
                self._take_drafts(work)
            n = len(work.tokens)
            if work.is_prefill:  # a prefill takes the chunk that fits beside the rows already taken
                n = min(n, self.max_batch_tokens // (len(batch) + 1))
                if n < 1 or (len(batch) + 1) * max(longest, n) > self.max_batch_tokens:
                    break
            elif (len(batch) + 1) * max(longest, n) > self.max_batch_tokens and batch:
                break  # the first item always goes, so no work waits forever
            self._queue.popleft()
            batch.append((work, n))
            longest = max(longest, n)
        self._queue.extendleft(reversed(other))  # where they were, ahead of what did not fit
        return batch

    def _take_drafts(self, work: Work) -> None:
        """Choose the draft tokens a block verifies, each time a step takes it: the client's proposal (lock-step)
        or the drafts that arrived up to now (decoding: the head of `ahead`), at most the session's `budget`.
        The one place a step's rows get their drafts (issue 18's controller sets `budget`). A tree counts by its
        nodes; over budget it keeps its first `budget` nodes, still a tree since parents come before children."""
        session = work.session
        draft_ids, q, parents = (*session.take_ahead(), None) if work.proposed is None else work.proposed
        if session.budget is not None and len(draft_ids) > session.budget:
            if work.proposed is not None and self.budgeter is not None:  # lock-step: the extras are dropped
                self.budgeter.dropped(len(draft_ids) - session.budget)
            draft_ids, q = draft_ids[: session.budget], None if q is None else q[: session.budget]
            parents = None if parents is None else parents[: session.budget]
        work.draft_ids, work.q, work.parents, work.tokens = draft_ids, q, parents, session.block(draft_ids)

    def _finish(self, batch: list[tuple[Work, int]], outcomes: list, compute_s: float) -> None:
        """Event loop: account the step, commit each block's outcome to its session (the one place a session's
        tokens and KV length change), resolve or requeue each work item, free what closed meanwhile."""
        batch_tokens = sum(n for _, n in batch)
        prefill_tokens = sum(n for work, n in batch if work.is_prefill)
        self._running = []
        if prefill_tokens:  # blocks that waited through a prompt's step: their service time is the prompt's, not theirs
            for work in self._queue:
                if not work.is_prefill:
                    work.cost.prefill_tokens += prefill_tokens
        answered: list[tuple[Work, RoundResult | None]] = []  # resolved after the step's budget grant
        for (work, n), outcome in zip(batch, outcomes):
            work.cost.add(compute_s, n, len(batch), batch_tokens, prefill_tokens)
            session = work.session
            session.steps += 1
            if session not in self._sessions:  # closed while the step ran: drop its outcome
                session.kv.free()
                work.future.cancel()
            elif isinstance(outcome, Exception):
                resolve(work.future, exception=outcome)
            elif work.is_prefill and len(work.tokens) > n:
                if outcome is not None:
                    session.prompt_logprobs.add(outcome)
                work.tokens = work.tokens[n:]
                self._queue.append(work)  # the rest of the prompt, after everyone already waiting
            else:
                if work.is_prefill and outcome is not None:
                    session.prompt_logprobs.add(outcome)
                try:
                    result = None if work.is_prefill else session.commit(work.draft_ids, *outcome)
                except Exception as exc:  # noqa: BLE001 - only this session fails; the engine runs on
                    log.exception("applying a step's outcome failed")
                    resolve(work.future, exception=exc)
                    continue
                if result is not None and self.budgeter is not None:
                    # lock-step: its grant; the verifier's own steps in its turn were offered none
                    offered = (session.budget or 0) if work.proposed is not None and not work.verifiers else 0
                    self.budgeter.on_verdict(session, len(work.draft_ids), result.num_accepted, offered)
                if work.verifiers:  # one of the steps its client's last proposal asked the verifier to decode
                    session.decode_alone = max(0, session.decode_alone - 1)
                if work.decoding and result.finish_reason is None:
                    work.next = self._submit(self._decode_work(session))
                elif not work.decoding and (result is None or result.finish_reason is None):
                    self._expected.add(session)  # a Speculate session: its next block follows this answer
                    session.answered_at, session.answered_alone = time.perf_counter(), work.verifiers
                answered.append((work, result))
        self._grant([work.session for work, _ in answered])
        for work, result in answered:  # the verifier's turn goes on: its next step queued now, granted 0 or held
            session = work.session
            if session.server_decodes and not work.decoding and (result is None or result.finish_reason is None) \
                    and verifiers_turn(session.budget, session.decode_alone):
                step = self._submit(Work(session, [], self._future(), [], proposed=([], None, None), verifiers=True))
                self._turns.setdefault(session, deque()).append(step.future)
        # of those, the ones that answer a verdict granting drafts: drafting their next block within it
        self._drafting = {work.session for work, result in answered if result is not None and work.session.budget
                          and work.session in self._expected}
        for work, result in answered:
            resolve(work.future, (result, work.cost))

    def _grant(self, sessions: list[VerifierSession]) -> None:
        """Event loop, after a step's outcomes are applied and before any is resolved: each answered session's
        budget for its next block, from one grant for the whole step. The load beside it: the prefills queued."""
        if self.budgeter is None:
            return
        prefills = [work for work in self._queue if work.is_prefill]
        queued_tokens = sum(min(len(work.tokens), self.max_batch_tokens) for work in prefills)
        prefilling = {work.session for work in prefills}
        wait_s = self._wait_s()
        for session in sessions:  # the next step idles for its block, and one slower than the wait misses it
            self.budgeter.arrives(session, session.turnaround_s, wait_s, session.drafter, session.round_trip_s,
                                  session.draft_s_per_token or 0.0)
        for session in sessions:
            try:
                session.budget = self.budgeter.budget_for(session, len(prefills), queued_tokens, prefilling)
            except Exception:  # noqa: BLE001 - a failing grant must not stop the engine: that session decodes
                log.exception("draft budget failed")
                session.budget = 0
            if session.server_decodes:  # its turn follows this grant: the reply to this answer says it
                session.granted.append(session.budget)

