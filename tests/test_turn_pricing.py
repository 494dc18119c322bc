"""A lock-step session the verifier decodes on its own at budget 0 (server_decodes) pays its turnaround for every
grant of drafts, even alone (issue 18): the grant prices it. And a lookup drafter that found nothing hands the turn
back for a round trip's steps (`decode_alone`), not one token a round trip.

- The pure budgeter: alone, a session whose drafts would repay its step but not its 36 ms turnaround against 6 ms
  steps is granted nothing once the verifier decodes it at 0; one whose blocks repay both still is.
- The wire: a lock-step opening asking for server_decodes reaches the budgeter; an async one does not.
- The client: an empty block (its drafter found nothing) under a budget asks the verifier to decode alone for the
  steps of its round trip; greedy output is still the verifier's own.
- The turnaround's split: each proposal says its drafting per token, the verifier prices a block of g at the round
  trip + g x that (an LM alone is granted the small block that pays), and refuses a word that is not seconds.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import NgramDrafter
from draft_worker.gamma import FixedGamma
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec.config import SamplingParams, VerifierLimits
from tests.stubs import FakeLM
from tests.test_budget_wiring import FixedBudgeter, _use
from tests.test_errors import wait_for_no_sessions
from verifier_worker.budgeting import DraftBudgeter
from verifier_worker.validation import check_proposal

pytestmark = pytest.mark.usefixtures("free_grants")


# accepted draft tokens of 125 blocks of 4 at a rate of 0.6 per position: 50 x 0, 30 x 1, 18 x 2, 11 x 3, 16 x 4
BLOCKS = [0] * 50 + [1] * 30 + [2] * 18 + [3] * 11 + [4] * 16


def _alone(at_zero: bool, blocks: list[int] = BLOCKS) -> int:
    """The grant of one session with these verdicts, 6 ms steps (+0.1 ms a token) and a 36 ms turnaround."""
    budgeter = DraftBudgeter(max_gamma=16)
    budgeter.open("s")
    if at_zero:
        budgeter.decodes_at_zero("s")
    for _ in range(20):
        for tokens in (1, 2, 3, 5, 9, 17):
            budgeter.on_step(0.006 + 0.0001 * tokens, 1, tokens)
    for accepted in blocks:
        budgeter.on_verdict("s", 4, accepted)
    budgeter.arrives("s", 0.036, 0.01)
    budgeter.on_step(0.006, 1, 1)
    return budgeter.budget_for("s")


def test_alone_a_grant_is_priced_with_the_turnaround_when_the_verifier_decodes_at_zero():
    """At 0.6 a block commits at most 2.5 tokens: in 6.x ms it beats decoding alone (1 token in 6.1 ms), in 6.x + 36 ms
    it does not. Accepted whole, a block of 16 commits 17 tokens in 36 + 7.7 ms where decoding alone commits 7."""
    assert _alone(at_zero=False) > 0
    assert _alone(at_zero=True) == 0
    assert _alone(at_zero=True, blocks=[4] * 125) == 16


class ZeroBudgeter(FixedBudgeter):
    """Grants `budget` to every session; records the sessions the verifier decodes at 0 and every proposal's hold."""

    def __init__(self, budget: int, **kwargs):
        super().__init__(budget, **kwargs)
        self.at_zero: list[object] = []
        self.holds: list[int] = []

    def decodes_at_zero(self, key) -> None:
        self.at_zero.append(key)
        super().decodes_at_zero(key)

    def hold(self, key, grants: int) -> None:
        self.holds.append(grants)
        super().hold(key, grants)


@pytest.mark.parametrize("mode, at_zero", [("lockstep", 1), ("async", 0)])
async def test_a_session_the_verifier_decodes_at_zero_reaches_the_budgeter(start_verifier, mode, at_zero):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, ZeroBudgeter(2, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=8)
    await speculate(verifier.stub, NgramDrafter(), [1, 2, 3], params, FixedGamma(2, 16), info, mode=mode)
    await wait_for_no_sessions(verifier)
    assert len(budgeter.at_zero) == at_zero


async def test_an_empty_block_hands_the_turn_over_for_a_round_trips_steps(start_verifier):
    """An n-gram finds nothing in a prompt without repeats until the answer repeats itself: under a budget of 2 its
    first blocks are empty. The first asks for 0 steps alone (no round trip measured yet); once a round trip and a
    step are measured, an empty block asks for at least one (the old client asked none for a block of gamma 2)."""
    target = FakeLM(32, seed=5)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    budgeter = _use(verifier, ZeroBudgeter(2, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=40)
    prompt = list(range(1, 20))  # no token repeats: nothing for an n-gram to match at first
    baseline = await generate_baseline(verifier.stub, prompt, params)
    spec = await speculate(verifier.stub, NgramDrafter(), prompt, params, FixedGamma(2, 16), info)
    await wait_for_no_sessions(verifier)
    assert spec.token_ids == baseline.token_ids
    assert any(h >= 1 for h in budgeter.holds), (budgeter.holds, spec.proposed_per_round)


def test_an_lm_alone_is_priced_by_the_drafting_of_the_block_it_is_granted():
    """The real pair's LM alone on a CPU (session 24's trace): 0.3 s steps, 70% acceptance, its client wanting 2,
    its last blocks of 3 coming 0.40 s after their verdicts, 0.13 s a token of which its drafting. Priced at 0.40 s
    whatever the size, no block paid and the verifier decoded it alone; split, a block of 1 comes in 0.14 s and pays."""
    def grant(round_trip_s, per_token_s):
        budgeter = DraftBudgeter(max_gamma=16)
        budgeter.open("lm")
        budgeter.decodes_at_zero("lm")
        budgeter.wants("lm", 2)
        for _ in range(20):
            for tokens in (1, 2, 3, 4):
                budgeter.on_step(0.29 + 0.01 * tokens, 1, tokens)
        for accepted in [0, 2, 2, 1, 0, 2, 2, 1, 0, 2] * 10:  # 70% at the first position, ~70% at the second
            budgeter.on_verdict("lm", 2, accepted, 2)
        budgeter.arrives("lm", 0.40, 0.1, None, round_trip_s, per_token_s)
        budgeter.on_step(0.30, 1, 1)
        return budgeter.budget_for("lm")

    assert grant(None, 0.0) == 0  # an older client: the whole turnaround for every size
    assert grant(0.01, 0.13) >= 1


async def test_the_block_after_the_verifiers_turn_is_no_sample_of_the_turnaround():
    """Its client's drafter may still be busy with a shadow block when the turn comes back (and an LM drafter catches
    up on the tokens committed without it): that block's turnaround is not the session's. The blocks after it are."""
    from tests.test_server_decodes import ScriptedBudgeter
    from verifier_worker.engine import Engine

    engine = Engine(FakeLM(32), batch_wait_s=0.0, budgeter=ScriptedBudgeter([2, 0, 2], max_gamma=4))
    session = engine.open([1, 2, 3], SamplingParams(max_new_tokens=16))
    session.server_decodes = True
    await engine.prefill(session)  # granted 2: the client's turn
    await engine.verify(session, [7, 8], None)  # its first drafted block (never a sample); granted 0
    await engine.verifiers_step(session)  # the verifier's turn; granted 2: the client's again
    await asyncio.sleep(0.05)  # its drafter finishing a shadow block
    await engine.verify(session, [7, 8], None)
    assert session.drafted_blocks == 2 and session.turnaround_s is None
    await engine.verify(session, [7, 8], None)  # a block of its own turn
    assert session.turnaround_s is not None
    engine.close(session)


def test_a_drafters_turnaround_stands_in_unless_more_of_its_sessions_were_open_then():
    """A new lock-step session starts from its drafter's latest turnaround, unless it was measured with more of the
    drafter's sessions open: two LM sessions drafting on one core wait on each other, and that wait priced a lone one
    after them at a wait no block pays; granted 0, it never measured its own, nor did the next one."""
    budgeter = DraftBudgeter(max_gamma=16)
    waits = lambda key: (budgeter._sessions[key].wait_s, budgeter._sessions[key].wait_per_token_s)  # noqa: E731
    budgeter.open("a", drafter="lm")
    budgeter.open("b", drafter="lm")
    budgeter.arrives("a", 0.8, 0.1, "lm", 0.4, 0.2)  # measured while b drafted on the same core
    budgeter.arrives("b", None, 0.1, "lm")  # not yet measured: a's stands in
    assert waits("b") == (0.4, 0.2)
    budgeter.close("a")
    budgeter.close("b")
    budgeter.open("alone", drafter="lm")
    budgeter.arrives("alone", None, 0.1, "lm")
    assert waits("alone") == (0.0, 0.0)  # unmeasured: it is granted blocks and measures its own
    budgeter.open("beside", drafter="lm")
    budgeter.arrives("beside", None, 0.1, "lm")
    assert waits("beside") == (0.4, 0.2)  # two open again
    budgeter.open("third", drafter="lm")
    budgeter.arrives("third", None, 0.1, "lm")
    assert waits("third") == (0.4, 0.2)  # more open than then: a core no less loaded (no less a wait)


class SlowNgram(NgramDrafter):
    """An n-gram drafter that takes at least DRAFT_S a draft token (a sleep never returns early)."""

    DRAFT_S = 0.005

    def propose(self, context, gamma):
        candidates = super().propose(context, gamma)
        time.sleep(self.DRAFT_S * len(candidates.draft_ids))
        return candidates


class SplitRecorder(FixedBudgeter):
    """Grants 2; records every split turnaround the engine hands it (round trip, drafting per token)."""

    def __init__(self, **kwargs):
        super().__init__(2, **kwargs)
        self.splits: list[tuple[float, float, float]] = []

    def arrives(self, key, turnaround_s, wait_s, drafter=None, round_trip_s=None, per_token_s=0.0):
        if turnaround_s is not None and round_trip_s is not None:
            self.splits.append((turnaround_s, round_trip_s, per_token_s))
        super().arrives(key, turnaround_s, wait_s, drafter, round_trip_s, per_token_s)


async def test_a_lock_step_client_says_its_drafting_and_the_verifier_splits_its_turnaround(start_verifier):
    """Each proposal says its drafter's seconds a token (Proposal.draft_s_per_token); the verifier takes that part
    of the time a block took to come as drafting and the rest as the round trip. Greedy output is unchanged."""
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, SplitRecorder(max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=40)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2, 3]  # repeats: the n-gram drafts from the start
    baseline = await generate_baseline(verifier.stub, prompt, params)
    spec = await speculate(verifier.stub, SlowNgram(), prompt, params, FixedGamma(2, 16), info)
    await wait_for_no_sessions(verifier)
    assert spec.token_ids == baseline.token_ids
    assert budgeter.splits, spec.proposed_per_round
    for turnaround_s, round_trip_s, per_token_s in budgeter.splits:
        assert per_token_s >= SlowNgram.DRAFT_S * 0.99 and round_trip_s >= 0
        assert per_token_s <= turnaround_s


def test_a_proposal_must_say_a_drafting_time_that_is_a_number_of_seconds():
    limits = VerifierLimits()
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="draft_s_per_token must be a finite number >= 0"):
            check_proposal(pb.Proposal(draft_ids=[1], draft_s_per_token=bad), SamplingParams(), limits, 32)
    claim = check_proposal(pb.Proposal(draft_ids=[1], draft_s_per_token=0.0), SamplingParams(), limits, 32)
    assert claim.draft_ids == [1]
