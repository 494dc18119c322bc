"""What a lock-step client tells the verifier about its next turns (issue 18), as plain functions of its state:

- `wants`: its own best gamma (Proposal.wants, ShadowVerdict.wants), which caps the verifier's grants to it;
- `decode_alone`: how many steps the verifier should decode on its own after a block (Proposal.decode_alone).

draft_worker/loop.py (the session's state machine) calls them for every block and shadow verdict it sends.
"""

from __future__ import annotations

import math

from specdec.config import lookahead


def wants(schedule, streams_commits: bool, tree: bool) -> int | None:
    """Proposal.wants, the verifier's cap on this session's grants: the most draft tokens one step could verify of it
    at the schedule's own gamma (async: all it drafts ahead, lookahead(gamma); a tree, or a schedule that does not
    say it: None)."""
    if tree or not getattr(schedule, "says", True):
        return None
    return lookahead(schedule.gamma) if streams_commits else schedule.gamma


def decode_alone(schedule, block_gamma: int, drafted: int, left: int, step_s: float, rtt_s: float | None) -> int:
    """Steps the verifier should decode on its own after a block of `block_gamma` carrying `drafted` draft tokens,
    under a budget above 0, with `left` tokens to go. When the client's own gamma is 0: until its schedule next probes
    a gamma (a fixed gamma 0: the rest of the request). When its drafter found nothing (an n-gram with no match): the
    steps its last round trip took (`rtt_s`, service included, over `step_s`, the verifier's step; 0 before either is
    measured). An empty block costs a round trip for one token, and the next block may find nothing either: a lookup
    drafter's misses came in runs of 6-8 blocks, each a 25 ms round trip where the tiny pair's verifier steps in 6 ms
    (0.46-0.80x `Generate`)."""
    if block_gamma > 0:
        if drafted or not (step_s > 0 and rtt_s):
            return 0
        return min(left, max(1, math.ceil(rtt_s / step_s - 1e-9)))
    rounds_to_probe = getattr(schedule, "rounds_to_probe", lambda: None)()  # None: never, as a fixed gamma 0
    return min(left if rounds_to_probe is None else rounds_to_probe, left)
