"""The client session's modes and its units of work in flight (draft_worker/loop.py is the state machine).

`Mode`: lockstep, ahead and async are settings of one machine: how many blocks may await a verdict at once (0: the
verifier streams commits instead). `Job`: a drafting job. `Block`: a proposal awaiting its verdict.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from protos.specdec.v1 import specdec_pb2 as pb


@dataclass(frozen=True)
class Mode:
    wire: int  # the pb.SpeculationMode the verifier runs the session in
    max_in_flight: int  # blocks awaiting a verdict at once; 0: the verifier streams commits instead (async)

    @property
    def streams_commits(self) -> bool:
        return self.max_in_flight == 0

    @property
    def drafter_tracks_commits(self) -> bool:
        """Lock-step drafts through the drafter's own committed context (`get_candidates` / `commit`)."""
        return self.max_in_flight == 1


MODES = {"lockstep": Mode(pb.SPECULATION_MODE_LOCKSTEP, 1), "ahead": Mode(pb.SPECULATION_MODE_LOCKSTEP, 2),
         "async": Mode(pb.SPECULATION_MODE_ASYNC, 0)}


@dataclass
class Job:
    """A drafting job: propose on prompt + committed[:base] + guess, at the schedule's `gamma`."""
    task: asyncio.Future
    base: int
    guess: list[int]
    gamma: int
    assumes_first: bool  # ahead: the first drafted token is the guessed bonus token, claimed without q
    shadow: bool = False  # a shadow block (draft_worker/shadow.py): checked against the commits, never sent


@dataclass
class Block:
    """A proposal awaiting its verdict: it claims positions base.. with `claim` (`assumed` tokens, then draft)."""
    base: int
    claim: list[int]
    assumed: int
    sent_at: float
    draft_s: float
