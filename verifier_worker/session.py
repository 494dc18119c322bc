"""One verifier session as the engine holds it: its KV memory, the committed tokens, its own generator,
the draft tokens proposed beyond its commit, and the commit of one verified block.

No gRPC and no model here. The engine's compute thread runs the batched forward (which appends each block
to its session's KV) and the verification (`sampling.verify_batch`, with this session's generator), and
returns each block's outcome, (num_accepted, next_token); `commit` applies it on the event loop: tokens,
finish, `ahead`, and the KV rollback. So every field here changes on the event loop only, and the compute
thread never reads one that the loop changes while a step runs (see engine.py). The verifier-only
baseline is the same path with empty blocks (gamma = 0).

Claims. A proposal may say which committed length it extends (`Claim.base_len`) and which tokens it assumes
before its draft (`assumed`, no q). Lock-step (`remainder`): it is usable when the assumed tokens are exactly
the ones committed since base_len (the verdict of the block before it accepted them all); the draft tokens
beyond the commit are verified, otherwise it is stale and costs nothing. Async (`offer`, `take_ahead`): the
session keeps `ahead`, draft tokens (with their q rows) for the positions after its commit. A claim must
agree with every committed position it covers, and its assumed tokens past the commit must already be in
`ahead`; its draft tokens then replace `ahead` from their first position on. Every engine step verifies the
head of `ahead` (or decodes alone when it is empty), and what it commits is matched against `ahead`: the
matching head is dropped, a mismatch clears it.

Why the output keeps the verifier's distribution (async and drafting ahead). A step verifies draft tokens
x_{c+1..} at positions past the commit c. The draft sampled each x_i from q(. | x_{<i}) with its own
randomness, independent of the verifier's; the verifier picks which proposal's tokens to use by the committed
positions alone (equality with tokens it has already committed) and by arrival order, never by the values
it is about to verify. So, given the committed prefix, x_{c+1} is distributed as the q row that travels with
it, and `verify_sampling` (accept with min(1, p/q), else draw from the residual) commits a token distributed
as p(. | prefix); then, given that x_{c+1} was accepted, x_{c+2} ~ q(. | prefix, x_{c+1}), and so on (the
standard argument, Leviathan et al. 2023, applied from any prefix). A step with no usable draft draws from p
itself. Greedy commits are argmax p(. | prefix) either way, so greedy output is token-identical to the
verifier alone. The one assumption: when a proposal arrives does not depend on the values the draft sampled
(true when drafting time does not depend on them, as for an LM drafter or the n-gram lookup).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from specdec.config import FINISH_LENGTH, FINISH_STOP, MAX_GAMMA, SamplingParams
from specdec.context import SuffixIndex
from specdec.sampling import make_generator
from specdec.tree import kept_block_rows
from verifier_worker.kv import SessionKV
from verifier_worker.logprobs import Logprobs, PromptLogprobs


@dataclass(frozen=True)
class RoundResult:
    num_accepted: int  # leading draft tokens committed
    next_token: int | None  # recovered or bonus token, None when generation ended inside the block
    finish_reason: str | None  # None while generating
    committed: tuple[int, ...] = ()  # every token the round committed
    base_len: int = 0  # generated tokens before them
    gamma: int = 0  # draft tokens verified
    logprobs: tuple | None = None  # sampling.token_logprobs of `committed`, when the session asked
    path: tuple[int, ...] | None = None  # a tree block's accepted nodes, root down (None: a chain)


@dataclass(frozen=True)
class Claim:
    """A checked proposal: draft_ids (with q rows) after `assumed`, claiming generated positions base_len.."""

    draft_ids: list[int]  # [gamma]
    q: torch.Tensor | None  # [gamma, vocab] or None (greedy)
    base_len: int | None = None  # None: extends the commit as it is when the claim is used
    assumed: tuple[int, ...] = ()
    parents: list[int] | None = None  # a token tree (specdec/tree.py): each draft node's parent; None = chain


class VerifierSession:
    """Invariant: the KV cache holds every committed token but the last, which opens the next block."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, kv: SessionKV, client: str = "",
                 device: torch.device | str = "cpu", max_block: int = MAX_GAMMA):
        assert prompt_ids, "a session needs a prompt"
        self.client = client  # the peer address that opened it, for the server's per-client limit
        self.drafter: str | None = None  # lock-step: what its client drafts with (OpenSession.client_model_id)
        self.kv = kv  # empty; the engine's model side made it
        self.device = torch.device(device)
        self.params = params
        self.tokens = list(prompt_ids)
        # how much of its text repeats: where its next block starts (issue 18); kept only where a draft budget reads
        # it (the engine's `open`): 11 ms of the event loop for a 4096-token prompt
        self.suffix: SuffixIndex | None = None
        self.prompt_len = len(prompt_ids)
        self.num_generated = 0
        self.finish_reason: str | None = None
        self.generator = make_generator(params.seed, self.device)
        self._stop = set(params.stop_token_ids)
        self.max_block = max_block  # async: most draft tokens one step verifies
        self.budget: int | None = None  # most draft tokens one step verifies, any mode (None: no cap; issue 18)
        self.ahead: list[tuple[int, torch.Tensor | None]] = []  # async: (token, q row [vocab]) after the commit
        self.stale = 0  # claims dropped because their prefix was not committed
        # lock-step with server_decodes (the server sets it): after each answer the engine itself queues the next
        # step while `specdec.budget.verifiers_turn(budget, decode_alone)` holds; decode_alone: the steps its
        # client's last proposal asked the verifier to decode on its own that are still to run
        self.server_decodes = False
        self.decode_alone = 0
        # and the budget granted with each of its answers not yet replied, oldest first (`answer_budget`)
        self.granted: deque[int | None] = deque()
        self.steps = 0  # engine steps this session rode in (counted by the engine)
        # lock-step: when its last verdict was handed back (None: its next block is in), and an EMA of how long its
        # next block then took to come when it carried drafts (drafting and the round trip): one slower than the
        # engine's wait for the last step's sessions misses steps when it drafts (DraftBudgeter.arrives)
        self.answered_at: float | None = None
        # and whether that answer was a step the verifier ran on its own (server_decodes): the block after it is no
        # sample of its turnaround (`block_arrived`)
        self.answered_alone = False
        self.turnaround_s: float | None = None  # how long after its verdict a block with drafts comes (an EMA)
        self.round_trip_s: float | None = None  # of that, what its client's drafting leaves: the round trip
        self.draft_s_per_token: float | None = None  # and its drafting per draft token, as its client says (`said`)
        self.said_draft_s: float | None = None  # the client's word with its latest proposal (None: unsaid)
        self.drafted_blocks = 0
        self.prompt_logprobs = PromptLogprobs(self.tokens[:], params)  # the prompt's, when asked (echo)

    def block_arrived(self, now: float, drafted: int) -> None:
        """Its next block came, `now`, carrying `drafted` draft tokens: learn how long after its verdict, from blocks
        that carry drafts (a plain decoding step, the client's or the verifier's own, comes at once and says nothing
        of its drafting), and split it into its client's drafting (its word, `said_draft_s`, at most all the time
        the block took) and the rest, so a block of another size is priced too (`DraftBudgeter.arrives`).

        Not sampled: its first block (its drafting may include the draft model's prefill of the prompt), and the first
        after the verifier's turn, which may wait on a shadow block its client's drafter was busy with meanwhile
        (draft_worker/loop.py) and on the draft model catching up on the tokens committed without it. Sampled, one
        LM block that came 0.41 s past its 0.2 s of drafting priced every block of that session, and of the sessions
        after it (its drafter's latest turnaround), above what it pays: granted 0 for the rest of their answers, they
        sent no block to measure again (those requests ran at `Generate`'s pace; session 25, run EL)."""
        if self.answered_at is not None and drafted:
            took = now - self.answered_at
            if self.drafted_blocks and not self.answered_alone:
                per_token = min(self.said_draft_s or 0.0, took / drafted)
                self.turnaround_s = _ema(self.turnaround_s, took)
                self.draft_s_per_token = _ema(self.draft_s_per_token, per_token)
                self.round_trip_s = _ema(self.round_trip_s, took - drafted * per_token)
            self.drafted_blocks += 1
        self.answered_at = None

    def answer_budget(self) -> int | None:
        """The budget to say in the reply to its oldest answer not yet replied: the one granted with that answer.
        With server_decodes the engine queues the verifier's next step as it answers and may run it, and grant
        again, before the server's coroutine replies to the answer before (a busy event loop): a reply saying the
        latest budget instead handed the client its turn while the engine still held the verifier's, and its proposal
        met a Commit ("session out of step"). Otherwise the latest grant, which nothing moves before the reply."""
        return self.granted.popleft() if self.granted else self.budget

    def generated(self, start: int = 0) -> list[int]:
        return self.tokens[self.prompt_len + start :]

    def _agrees(self, claim: Claim, base: int) -> bool:
        """Every committed position the claim covers holds the claimed token."""
        full = [*claim.assumed, *claim.draft_ids]
        covered = self.generated(base)[: len(full)]
        return base <= self.num_generated and full[: len(covered)] == covered

    def remainder(self, claim: Claim) -> tuple[list[int], torch.Tensor | None, list[int] | None] | None:
        """Lock-step: the draft tokens past the commit (their q rows, a tree's parents), or None when the claim is
        stale."""
        if claim.base_len is None:
            return claim.draft_ids, claim.q, claim.parents
        done = self.num_generated - claim.base_len  # claimed positions already committed
        assumed, full = len(claim.assumed), len(claim.assumed) + len(claim.draft_ids)
        if not self._agrees(claim, claim.base_len) or not (done == assumed or assumed < done < full):
            self.stale += 1
            return None
        skip = done - len(claim.assumed)
        if claim.parents is not None and skip:  # a tree cannot be cut at a committed position: verify it whole or not
            self.stale += 1
            return None
        return claim.draft_ids[skip:], None if claim.q is None else claim.q[skip:], claim.parents

    def offer(self, claim: Claim, max_ahead: int) -> bool:
        """Async: merge a claim into `ahead`. False when it is stale (dropped)."""
        base = self.num_generated if claim.base_len is None else claim.base_len
        start = base + len(claim.assumed)  # position of the first draft token
        ahead_ids = [token for token, _ in self.ahead]
        known = [*self.generated(base), *ahead_ids] if base <= self.num_generated else []
        if not self._agrees(claim, base) or known[: len(claim.assumed)] != list(claim.assumed):
            self.stale += 1
            return False
        first = max(start, self.num_generated)  # the first draft position past the commit
        skip = first - start
        rows = [None] * len(claim.draft_ids) if claim.q is None else list(claim.q)
        new = list(zip(claim.draft_ids[skip:], rows[skip:]))
        self.ahead = (self.ahead[: first - self.num_generated] + new)[:max_ahead]
        return True

    def take_ahead(self) -> tuple[list[int], torch.Tensor | None]:
        """Async: the draft tokens the next step verifies: the head of `ahead`, within max_new_tokens."""
        head = self.ahead[: max(0, min(self.max_block, self.remaining - 1))]
        draft_ids = [token for token, _ in head]
        if not head or head[0][1] is None:
            return draft_ids, None
        return draft_ids, torch.stack([row for _, row in head])  # [gamma, vocab]

    def _drop_committed(self, committed: list[int]) -> None:
        """Async: the head of `ahead` that the step committed goes; anything after a mismatch goes too."""
        ahead_ids = [token for token, _ in self.ahead[: len(committed)]]
        self.ahead = self.ahead[len(committed) :] if ahead_ids == committed else []

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - self.num_generated

    @property
    def prompt_to_cache(self) -> list[int]:
        """What prefill caches: every prompt token but the last, which opens the first block."""
        return self.tokens[:-1]

    def block(self, draft_ids: list[int]) -> list[int]:
        """The tokens one verification feeds: [last committed token] + draft."""
        return [self.tokens[-1], *draft_ids]

    def commit(self, draft_ids: list[int], num_accepted: int, next_token: int,
               logprobs: Logprobs | None = None, path: list[int] | None = None) -> RoundResult:
        """Apply one verified block's outcome: commit the accepted drafts and the next token (up to a stop token
        or max_new_tokens), drop what `ahead` no longer extends, and roll the KV back to the committed tokens.

        draft_ids: the gamma tokens the block verified (the engine's forward cached all of `block(draft_ids)`);
        num_accepted, next_token: `verify_batch`'s outcome for them (the recovered or the bonus token);
        logprobs: those tokens' log-probabilities when the request asked (`token_logprobs`, accepted then next);
        path: for a token tree, the accepted nodes (num_accepted of them, `tree.verify_tree`): the KV keeps the
        root's and the path's keys only (`kept_block_rows`), so it holds exactly the committed tokens.
        """
        assert self.finish_reason is None, "session already finished"
        if path is not None:
            assert len(path) == num_accepted
            self.kv.keep(len(self.tokens) - 1, kept_block_rows(path))  # the block began at the last committed token
        accepted_ids = draft_ids[:num_accepted] if path is None else [draft_ids[i] for i in path]
        committed = [*accepted_ids, next_token]
        # generation ends at the first stop token or at max_new_tokens, even inside the block
        for i, token in enumerate(committed[: self.remaining]):
            if token in self._stop:
                committed, self.finish_reason = committed[: i + 1], FINISH_STOP
                break
        if self.finish_reason is None and len(committed) >= self.remaining:
            committed, self.finish_reason = committed[: self.remaining], FINISH_LENGTH
        base_len = self.num_generated
        self.tokens.extend(committed)
        if self.suffix is not None:
            self.suffix.extend(committed)
        self.num_generated += len(committed)
        self._drop_committed(committed)
        self.kv.truncate(len(self.tokens) - 1)  # a length decrement: the rejected keys are overwritten later
        accepted = min(num_accepted, len(committed))
        if logprobs is not None:  # of the tokens committed (a stop or max_new_tokens may cut the block)
            logprobs = tuple(part[: len(committed)] for part in logprobs)
        return RoundResult(
            num_accepted=accepted,
            next_token=committed[-1] if len(committed) > accepted else None,
            finish_reason=self.finish_reason,
            committed=tuple(committed),
            base_len=base_len,
            gamma=len(draft_ids),
            logprobs=logprobs,
            path=None if path is None else tuple(path[:accepted]),
        )


def _ema(mean: float | None, sample: float) -> float:
    """A turnaround's running mean: the latest sample weighs 0.3 (the first is taken whole)."""
    return sample if mean is None else 0.7 * mean + 0.3 * sample
