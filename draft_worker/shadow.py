"""Shadow blocks (issue 18): while the verifier decodes a session on its own (lock-step in its turn, async at a draft
budget of 0), a client keeps drafting blocks it does not send (at most SHADOW_SHARE of its time), checks each against
the tokens the verifier then commits, and reports how it fared (pb.ShadowVerdict). Greedy, that is exactly the verdict
the block would have got; sampling, it is P(draft == sampled), at most the true acceptance.

Why: a session granted a budget of 0 drafts nothing, so neither its verifier's acceptance estimate
(specdec.budget.AcceptanceTracker) nor its own schedule (draft_worker.gamma.RttGamma) learns anything new, and
decay alone takes them back to their priors only slowly. An n-gram draft's acceptance comes in bursts (none while the
answer says something new, most while it quotes its prompt), so an estimate pinned low by the answer's first blocks
missed every later burst: at 2 sessions on a CPU the budget fell to 0 after one or two rejections and stayed there,
1.0x Generate where a fixed gamma 2 reached 1.2x. An LM drafter meets the same: rejected on the answer's first two
blocks at 1-2 sessions, it decoded the other 30 tokens alone where a fixed gamma 3 was accepted 70% of the time.
Shadow blocks cost the verifier no compute; the client drafts them at most OWN_CORES_SHARE of its time
(`shadow_every`: every commit for a lookup, every few for an LM on a CPU), since a budget granted meanwhile waits for
the drafter. Their verdicts are also all the verifier learns of a drafter it grants nothing (its population, the
prior of its next sessions: verifier_worker/budgeting.py). At a tenth of a step (SHADOW_SHARE, as on the verifier's
cores), the real pair's LM drafter alone drafted 1-2 a request and its first 7 requests were granted 0 (0.99x
`Generate`, where a fixed gamma 2 read 1.23x); at half, 1.20x (fixed gamma 2: 1.37x; docs/results.md, session 22).
Each verdict message costs a fast verifier's event loop, so misses ride in fours (`Shadows.report`,
ShadowVerdict.before).

Except on the verifier's own cores (one box, ClientConfig.shared_cores): there a shadow's drafting takes the cores
the verifier's steps run on (so at most SHADOW_SHARE of a step), and an LM's first draft of a session carries its
prefill of the prompt (the real pair's 0.5B in fp32 on a 2-core AVX2 CPU: 5.3 s, ten of the verifier's steps), which
only verified blocks can repay.
So there a session drafts shadow blocks only once it has drafted a block it sent: one the verifier granted no draft
from its opening on (its measured step costs say none pays, verifier_worker/warmup.py) never starts its draft
model. On that CPU the LM's four shadow blocks and its prefill each roughly doubled the verifier steps they overlapped,
and `generate` with the LM ran 0.73-0.81x `--baseline`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field

from draft_worker.modes import Job
from draft_worker.proposer import common_prefix
from protos.specdec.v1 import specdec_pb2 as pb

SHADOW_SHARE = 0.1  # the most of a verifier step a shadow block may take to draft, on the verifier's own cores
OWN_CORES_SHARE = 0.5  # the same where the drafter has cores of its own (see `Shadows.due`)
MISS_BACKOFF = 2  # after shadow blocks missing in a row, the next comes up to 2 ** MISS_BACKOFF times as many commits later
HELD_MISSES = 3  # missed shadow blocks (any, beside other sessions) held back to ride a later message with the next

_lock = threading.Lock()
_drafting_here = 0  # client sessions open in this process (`drafting_here`)


@contextlib.contextmanager
def drafting_here():
    """Counts a client session as open in this process while it runs (draft_worker/loop.py): the sessions of one
    process draft on the same cores, so their shadow blocks share one share of those cores' time (`Shadows.due`)."""
    global _drafting_here
    with _lock:
        _drafting_here += 1
    try:
        yield
    finally:
        with _lock:
            _drafting_here -= 1


def sessions_drafting_here() -> int:
    """Client sessions open in this process now (at least 1 for the one asking)."""
    return max(1, _drafting_here)


@dataclass(frozen=True)
class ShadowBlock:
    """A block drafted from position `base` for a block of `gamma` (a drafter may find fewer) in `draft_s`, not sent."""

    base: int
    draft_ids: tuple[int, ...]
    gamma: int
    draft_s: float = 0.0  # what drafting it took

    def outcome(self, committed: list[int]) -> int | None:
        """Its accepted draft tokens, once the committed tokens decide them (a mismatch, or all of them committed);
        None while they do not yet."""
        seen = committed[self.base : self.base + len(self.draft_ids)]  # [<= len(draft_ids)]
        matched = common_prefix(list(self.draft_ids), seen)
        return matched if matched < len(seen) or matched == len(self.draft_ids) else None


def shadow_every(gamma: int, draft_s_per_token: float, step_s: float, share: float = SHADOW_SHARE) -> int | None:
    """Commits between two shadow blocks of `gamma`, so that drafting them takes at most `share` of the session's
    time (`step_s`: the verifier's time between two commits): one per commit when a block takes at most that share
    of a step (an n-gram or suffix lookup), one every ceil(block / (share x step)) commits otherwise (an LM on a
    CPU: a one-token block of ~80 ms against 0.3 s steps, every 3rd commit). The drafter is busy meanwhile and a
    budget granted then waits for it, hence the share; what it drafts also catches an LM's cache up with the
    commits, which its next real block would otherwise pay. An unmeasured draft (0.0) is tried at once, which
    measures it; None: no shadow (gamma 0, or a step not yet measured)."""
    block_s = gamma * draft_s_per_token
    if gamma <= 0 or (block_s > 0 and step_s <= 0):
        return None
    return max(1, math.ceil(block_s / (share * step_s) - 1e-9)) if block_s > 0 else 1


@dataclass
class Shadows:
    """One client session's shadow blocks (draft_worker/loop.py asks it when to draft one and what it came to)."""

    taken: bool = False  # the verifier counts shadow verdicts (said in `opened`)
    shared_cores: bool = False  # the verifier computes on this machine's cores (ClientConfig.shared_cores)
    drafted: bool = False  # the session started drafting a block to send (with a draft token): its drafter runs
    block: ShadowBlock | None = None  # drafted while the verifier decodes alone, awaiting the commits
    set_aside: Job | None = None  # a shadow block's drafting, set aside while an empty block went out
    last_base: int = -1  # the commit the last shadow block was drafted from (one per commit at most)
    misses: int = 0  # shadow blocks in a row whose first token missed (empty ones included)
    held: list[tuple[int, int, int]] = field(default_factory=list)  # (drafted, accepted, gamma) of misses not yet sent

    @staticmethod
    def size(schedule, left: int) -> int:
        """The next shadow block's draft tokens: the schedule's gamma (at least 1), within the stream's tokens left."""
        return min(max(1, schedule.gamma), schedule.max_gamma, left - 1)

    def due(self, alone: bool, schedule, left: int, committed: int, draft_s_per_token: float, step_s: float,
            shared: bool = False, peers: int = 1) -> bool:
        """The verifier decodes on its own (`alone`: lock-step in its turn, async at budget 0), and enough commits
        passed since the last shadow block for this one to take at most its share of the session's time
        (shadow_every), times 2, then 4 after blocks that missed in a row (MISS_BACKOFF; back to 1 once one lands):
        each is a message the verifier's event loop reads, and beside a fast verifier they cost (4 sessions of the
        tiny pair, 8 ms steps, an n-gram's 20 a request: 0.94x `Generate`, 0.97x without any; halving them moved the
        ratios within their spread, docs/results.md run AX), while a run of misses says the next will likely miss too
        (an n-gram between the passages it quotes). On the verifier's own cores,
        only once the session drafted a block it sent (see the module docstring). At most OWN_CORES_SHARE of a step
        only on cores of its own and alone (`shared`: the verifier's last step carried other sessions too, likely
        drafting on the same cores): 8 LM sessions drafting on one core at half a step each drafted 7 shadow blocks
        a request (2.8 at SHADOW_SHARE), and the verifier's steps on the other core of that 2-vCPU machine took
        424 ms where `Generate`'s took 384 (0.98x `Generate`, 1.02x before), all granted 0 either way. The share is
        the cores', not each session's: `peers` sessions open in this process (`sessions_drafting_here`, this one
        included) draft on the same cores, so each takes share / peers. Per session, 16 LM sessions at a tenth each
        drafted 52-72 shadow blocks of the 0.5B in a 16 s decode, the drafting core busy throughout; divided, none
        at 8 or 16 sessions. On the 2-vCPU box neither moved the throughput measurably (1.00-1.01x `Generate`,
        granted 0, two A/B passes: docs/results.md, session 23), so the gain is the drafting machine's time."""
        if not (self.taken and alone and self.block is None and self.set_aside is None and left > 1
                and (self.drafted or not self.shared_cores)):
            return False
        share = (SHADOW_SHARE if self.shared_cores or shared else OWN_CORES_SHARE) / max(1, peers)
        every = shadow_every(self.size(schedule, left), draft_s_per_token, step_s, share)
        return every is not None and committed - self.last_base >= every * 2 ** min(self.misses, MISS_BACKOFF)

    def decided(self, committed: list[int]) -> tuple[ShadowBlock, int] | None:
        """(the pending block, its accepted draft tokens) once the commits decide it, clearing it; None before."""
        accepted = None if self.block is None else self.block.outcome(committed)
        if accepted is None:
            return None
        block, self.block = self.block, None
        self.misses = 0 if accepted else self.misses + 1
        return block, accepted

    def report(self, block: ShadowBlock, accepted: int, wants: int | None,
               shared: bool = False) -> tuple[pb.SpeculateRequest, int] | None:
        """(the message that reports `block` now, with every verdict held before it; the blocks it reports), or None:
        held back. A miss is held while fewer than HELD_MISSES are: each message costs a fast verifier's event loop
        about 0.3 ms (4 n-gram sessions of the tiny pair: 3% more verifier CPU a token than `Generate` with one a
        block, 0.5% without any), and a miss changes no grant while the verifier decodes the session alone at budget
        0. A block that landed goes at once with those before it, it may open a grant, unless the verifier's steps
        carry other sessions too (`shared`: the last reply's step did): then its time is theirs as well, and a grant
        that opens a few blocks later costs little where drafts barely pay (4 sessions: half the shadow blocks
        landed, and grants were worth about nothing, docs/results.md session 16). The order stays the client's,
        and every held verdict goes before the session's next proposal (`flush`). `wants`: the client's own best
        gamma now (None: unsaid)."""
        verdict = (len(block.draft_ids), accepted, block.gamma)
        if (not accepted or shared) and len(self.held) < HELD_MISSES:
            self.held.append(verdict)
            return None
        return self._message(verdict, wants)

    def flush(self, wants: int | None) -> tuple[pb.SpeculateRequest, int] | None:
        """The held verdicts as one message (the latest with the rest before it), or None if none are held: sent
        before a proposal, so the verifier's estimate has every block before it prices the next grant."""
        return self._message(self.held.pop(), wants) if self.held else None

    def _message(self, verdict: tuple[int, int, int], wants: int | None) -> tuple[pb.SpeculateRequest, int]:
        before, self.held = self.held, []
        drafted, accepted, gamma = verdict
        return pb.SpeculateRequest(shadow=pb.ShadowVerdict(
            drafted=drafted, accepted=accepted, gamma=gamma, wants=wants,
            before=[pb.ShadowCount(drafted=d, accepted=a, gamma=g) for d, a, g in before])), len(before) + 1
