"""The verifier engine's work items (engine.py queues them, step.py computes them) and `Decoding`, the handle of a
session that decodes in every step (Generate, async Speculate). Owned by the engine's event loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from verifier_worker.accounting import StepCost
from verifier_worker.session import RoundResult, VerifierSession


@dataclass(eq=False)
class Work:
    """One item of the engine's queue: a prefill (the prompt's rest, fed in chunks) or a block to verify."""

    session: VerifierSession
    tokens: list[int]  # still to feed: the prompt's rest (prefill), or the block (set when a step takes it)
    future: asyncio.Future
    draft_ids: list[int] | None = None  # None for a prefill; a block's drafts, set when a step takes it
    q: torch.Tensor | None = None  # their draft probs [gamma, vocab], or None (greedy)
    parents: list[int] | None = None  # a token tree's parents (specdec/tree.py), set with draft_ids; None: a chain
    proposed: tuple[list[int], torch.Tensor | None, list[int] | None] | None = None  # lock-step: drafts, q, parents
    decoding: bool = False  # Generate, async: queue the next decoding step after this one
    verifiers: bool = False  # lock-step, server_decodes: a step the engine queued itself in the verifier's turn
    next: Work | None = None  # that next step
    cost: StepCost = field(default_factory=StepCost)

    @property
    def is_prefill(self) -> bool:
        return self.draft_ids is None


class Decoding:
    """Generate's side of a session that decodes one token in every engine step until it finishes."""

    def __init__(self, work: Work):
        self._work = work

    async def next(self) -> tuple[RoundResult, StepCost]:
        work = self._work
        result = await work.future
        self._work = work.next
        return result

    def cancel(self) -> None:
        """Cancel the step `next` awaits (or will): it raises CancelledError there."""
        if self._work is not None:
            self._work.future.cancel()


def resolve(future: asyncio.Future, result=None, exception: Exception | None = None) -> None:
    """Settle a work item's future with its result or its exception, unless its awaiter was cancelled."""
    if future.done():  # its awaiter was cancelled
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
