"""What the verifier's draft budgeter (budgeting.py) keeps between two grants: per drafter name, the sessions that
drafted with it (their acceptance, what their grants bought, their latest turnaround), and per open session, its
estimate, limits and the client's latest word. Plain records: `DraftBudgeter` is the one that changes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.acceptance import AcceptanceTracker, Calibration, DrafterAcceptance
from specdec.context import ContextRates


@dataclass
class DrafterState:
    """The sessions that drafted with one drafter name: their acceptance (openings apart: the prior of a new session),
    what their grants bought (the scale of their estimates) and their latest lock-step turnaround (where a new
    session's starts)."""

    acceptance: DrafterAcceptance
    calibration: Calibration = field(default_factory=Calibration)
    context: ContextRates = field(default_factory=ContextRates)  # its rates by position per suffix bucket
    turnaround_s: float | None = None  # None: none measured yet
    split: tuple[float | None, float] = (None, 0.0)  # with it, (round trip, drafting per token): `arrives`
    measured_open: int = 0  # and its sessions open when it was measured
    open: int = 0  # its sessions open now


@dataclass
class SessionState:
    """One open session, as the budgeter prices it."""

    tracker: AcceptanceTracker
    max_gamma: int  # min(the server's max_gamma, the client's request)
    tpot_slo_s: float | None
    held: int = 0  # grants still to come at which it drafts nothing whatever it is granted (decode_alone)
    promised: float = 0.0  # accepted draft tokens its next verified block is expected to buy (uncalibrated)
    wait_s: float = 0.0  # how long after its verdict its block comes when it is granted drafts (arrives)
    wait_per_token_s: float = 0.0  # and per draft token in it, its client's drafting (0: within wait_s)
    slow: bool = False  # its blocks come after the next step has started (arrives): a block costs it a step
    rounds: int = 0  # verdicts so far (plain decoding steps included): the first OPENING_ROUNDS are its opening
    drafter: DrafterState | None = None  # its drafter's sessions (open)
    wants: int | None = None  # the client's own best gamma, as it last said (`DraftBudgeter.wants`; None: unsaid)
    at_zero: bool = False  # the verifier decodes it on its own at budget 0: a grant costs its turnaround even alone
    bucket: int | None = None  # its tokens' suffix bucket at its latest grant (specdec/context.py; None: not known)

    @property
    def cap(self) -> int:
        """The most it may be granted: the limits of the server and the opening, and its client's latest word."""
        return self.max_gamma if self.wants is None else min(self.max_gamma, max(1, self.wants))
