"""Shadow blocks (issue 18): while the verifier decodes a session on its own (lock-step in its turn, async at a draft
budget of 0), a client whose drafting is cheap keeps drafting blocks it does not send, checks each against the
tokens the verifier then commits, and reports how it fared (pb.ShadowVerdict). Greedy, that is exactly the verdict
the block would have got; sampling, it is P(draft == sampled), at most the true acceptance.

Why: a session granted a budget of 0 drafts nothing, so neither its verifier's acceptance estimate
(specdec.budget.AcceptanceTracker) nor its own schedule (draft_worker.gamma.RttGamma) learns anything new, and
decay alone takes them back to their priors only slowly. An n-gram draft's acceptance comes in bursts (none while the
answer says something new, most while it quotes its prompt), so an estimate pinned low by the answer's first blocks
missed every later burst: at 2 sessions on a CPU the budget fell to 0 after one or two rejections and stayed there,
1.0x Generate where a fixed gamma 2 reached 1.2x. Shadow blocks cost the verifier nothing; they are drafted only when
they cost the client little (`worth_shadowing`), since a budget granted meanwhile waits for the drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

from draft_worker.proposer import common_prefix
from protos.specdec.v1 import specdec_pb2 as pb

SHADOW_SHARE = 0.1  # the most of a verifier step a shadow block may take to draft


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

    def request(self, accepted: int) -> pb.SpeculateRequest:
        return pb.SpeculateRequest(shadow=pb.ShadowVerdict(drafted=len(self.draft_ids), accepted=accepted,
                                                           gamma=self.gamma))


def worth_shadowing(gamma: int, draft_s_per_token: float, step_s: float) -> bool:
    """Draft a shadow block of `gamma` only if it takes at most SHADOW_SHARE of a verifier step (`step_s`, the time
    between two commits): the drafter is busy meanwhile, and a budget granted then waits for it. An unmeasured draft
    (0.0) is tried once, which measures it; an n-gram or suffix lookup always passes, an LM on a CPU rarely does."""
    return gamma > 0 and gamma * draft_s_per_token <= SHADOW_SHARE * step_s
