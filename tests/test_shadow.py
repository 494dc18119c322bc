"""Shadow blocks (issue 18, draft_worker/shadow.py): while the verifier decodes a session on its own, a client whose
drafting is cheap drafts blocks it does not send and reports how they fared against the commits (pb.ShadowVerdict),
so a session denied drafts is granted them again when its drafts start to land, at no verifier compute.

- The pure parts: when the commits decide a shadow block, and when one is worth drafting.
- The budgeter: a session pinned at budget 0 by early rejections is granted drafts again after shadow blocks that
  land (decay alone, the same number of rounds, does not), and not after shadow blocks that miss.
- The client under a budget held at 0, lock-step and async: greedy equals verifier-only, no proposal is sent, and
  every shadow verdict the verifier counted is exact (a draft equal to the target: all accepted).
- Raw streams: the verifier says it takes them; one in the verifier's turn is counted and the stream goes on; a
  malformed one ends the stream with INVALID_ARGUMENT.
- A block's service time from a step that carried a prompt chunk is not taken as what the block costs.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from prometheus_client import CollectorRegistry

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import Candidates, LMDrafter, NgramDrafter
from draft_worker.gamma import AutoGamma, FixedGamma, Link, RttGamma
from draft_worker.shadow import HELD_MISSES, OWN_CORES_SHARE, SHADOW_SHARE, ShadowBlock, Shadows, drafting_here, \
    sessions_drafting_here, shadow_every
from draft_worker.transport import ClientConfig, fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.acceptance import OPENING_ROUNDS
from specdec.config import SamplingParams, VerifierLimits
from specdec.gamma import expected_tokens_table
from tests.stubs import FakeLM, GatedLM, fake_pair
from tests.test_budget import _feed_steps
from tests.test_budget_wiring import FixedBudgeter, _use
from tests.test_errors import wait_for_no_sessions
from tests.test_server_decodes import LONG, _opened_in_the_verifiers_turn
from verifier_worker.budgeting import BudgetMetrics, DraftBudgeter
from verifier_worker.session import VerifierSession

pytestmark = pytest.mark.usefixtures("free_grants")  # a grant is remade at every step, however slow this machine


# ---------------------------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("committed, expected", [
    ([5, 6], None),  # its first two tokens landed, the third is not committed yet
    ([5, 6, 7, 8, 9], 3),  # all of it committed
    ([5, 9], 1),  # the second one missed
    ([4], 0),  # the first one missed
    ([], None),
])
def test_a_shadow_block_is_decided_by_the_commits(committed, expected):
    block = ShadowBlock(base=2, draft_ids=(5, 6, 7), gamma=4)
    assert block.outcome([1, 1, *committed]) == expected


def test_shadow_blocks_back_off_after_misses_and_come_every_commit_once_one_lands():
    shadows, schedule = Shadows(taken=True, last_base=10), FixedGamma(2, 8)  # a lookup: every commit (shadow_every)

    def due(committed: int) -> bool:
        return shadows.due(True, schedule, 100, committed, 0.0, 0.0)

    assert due(11)
    for missed, (late, on_time) in enumerate([(11, 12), (13, 14), (13, 14)], start=1):  # 2, 4, then still 4 commits
        shadows.block = ShadowBlock(base=0, draft_ids=(5,), gamma=2)
        assert shadows.decided([4])[1] == 0 and shadows.misses == missed
        assert not due(late) and due(on_time)
    shadows.block = ShadowBlock(base=0, draft_ids=(5,), gamma=2)
    assert shadows.decided([5, 6])[1] == 1 and shadows.misses == 0 and due(11)  # it landed: every commit again


def test_an_empty_shadow_block_is_a_miss_at_once():
    """A drafter that found nothing (an n-gram with no match) bought nothing with a grant of gamma."""
    block = ShadowBlock(base=3, draft_ids=(), gamma=2)
    assert block.outcome([1, 2, 3]) == 0
    shadows = Shadows(held=[(1, 0, 2)] * HELD_MISSES)  # held in full: this one goes, with them
    assert shadows.report(block, 0, None) == (pb.SpeculateRequest(shadow=pb.ShadowVerdict(
        drafted=0, accepted=0, gamma=2, before=[pb.ShadowCount(drafted=1, accepted=0, gamma=2)] * HELD_MISSES)),
        HELD_MISSES + 1)


def test_shadow_blocks_take_at_most_their_share_of_the_session():
    assert shadow_every(4, 0.0, 0.0) == 1  # not measured yet: tried at once
    assert shadow_every(4, 1e-4, 0.3) == 1  # an n-gram lookup against a CPU verifier step: every commit
    assert shadow_every(2, SHADOW_SHARE * 0.3 / 2, 0.3) == 1  # exactly its share
    assert shadow_every(1, 0.08, 0.3) == 3  # an LM on a CPU: 80 ms a block, 30 ms its share of a step
    assert shadow_every(4, 0.05, 0.3) == 7  # 0.2 s of drafting per 2.1 s of steps
    assert shadow_every(0, 0.0, 1.0) is None and shadow_every(1, 0.08, 0.0) is None  # no block; no step measured
    assert shadow_every(4, 0.1, 0.35, OWN_CORES_SHARE) == 3  # an LM on a core of its own: every 3rd commit, not 12th


def test_a_drafter_on_cores_of_its_own_drafts_shadow_blocks_more_often():
    """On the verifier's cores a shadow block's drafting slows the verifier's steps: SHADOW_SHARE. On cores of its
    own, alone, it slows nothing but a grant that comes meanwhile, and its verdicts are how a drafter granted nothing
    is learnt (the real pair's LM alone: 1-2 shadow blocks a request at SHADOW_SHARE, granted 0 for 7 requests)."""
    schedule = FixedGamma(4, 8)

    def first_due(shared_cores: bool, shared: bool = False) -> int:
        shadows = Shadows(taken=True, shared_cores=shared_cores, drafted=True, last_base=0)
        return next(c for c in range(1, 100) if shadows.due(True, schedule, 100, c, 0.1, 0.35, shared))

    assert first_due(False) == 3 and first_due(True) == 12
    assert first_due(False, shared=True) == 12  # beside other sessions, whose drafts likely share its cores


def test_the_sessions_open_in_one_process_share_one_shadow_share_of_its_cores():
    """A session's shadow blocks take at most a share of the cores it drafts on, and every session open in the process
    drafts on them: 16 LM sessions at a tenth each kept the drafting core busy through the whole decode. So each takes
    share / sessions open here. A lookup's block costs nothing beside a step: every commit, however many sessions."""
    schedule = FixedGamma(4, 8)

    def first_due(peers: int, draft_s_per_token: float = 0.1) -> int:
        shadows = Shadows(taken=True, drafted=True, last_base=0)
        return next(c for c in range(1, 400) if shadows.due(True, schedule, 400, c, draft_s_per_token, 0.35, True,
                                                             peers))

    assert first_due(1) == 12 and first_due(4) == 46  # 0.4 s a block against 0.1 x 0.35 s, then a quarter of that
    assert first_due(16, draft_s_per_token=1e-5) == 1  # an n-gram's lookup
    assert sessions_drafting_here() == 1  # none open: the one asking
    with drafting_here(), drafting_here():
        assert sessions_drafting_here() == 2
    assert sessions_drafting_here() == 1


async def test_a_client_session_counts_itself_open_in_its_process_while_it_runs(start_verifier):
    """What `Shadows.due` divides the share by: two sessions speculating at once in this process each see 2 (their
    first drafts wait for each other, so both are open then), and none is counted once they are done."""
    both = threading.Barrier(2, timeout=30)
    seen = []

    class Watching(LMDrafter):
        def propose(self, context: list[int], gamma: int):
            if not getattr(self, "met", False):  # its first draft
                both.wait()  # in the drafting thread: the event loop runs on meanwhile
                self.met = True
                seen.append(sessions_drafting_here())
                both.wait()  # neither leaves its draft, and so its session, before both have counted
            return super().propose(context, gamma)

    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32)
    info = await fetch_info(verifier.stub)
    await asyncio.gather(*(speculate(verifier.stub, Watching(FakeLM(32, seed=5), "same"), [1, 2, 3],
                                     SamplingParams(max_new_tokens=16), FixedGamma(2, 8), info) for _ in range(2)))
    assert seen == [2, 2] and sessions_drafting_here() == 1


# ---------------------------------------------------------------------------------------------------- the budgeter
def _pinned_at_zero() -> DraftBudgeter:
    budgeter = DraftBudgeter(max_gamma=6)
    _feed_steps(budgeter, 0.02, 0.006)  # a CPU-like curve: a draft token costs 30% of a one-token step
    for _ in range(20):
        budgeter.on_verdict("s", 4, 0)  # the answer's first blocks were all rejected
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("s") == 0
    return budgeter


def test_shadow_blocks_that_land_bring_the_budget_back_and_decay_alone_does_not():
    landed, decayed = _pinned_at_zero(), _pinned_at_zero()
    for _ in range(8):
        landed.on_shadow("s", 4, 4, 4)  # the client's drafts now match what the verifier commits
        decayed.on_verdict("s", 0, 0)  # a plain decoding round: counts decay, nothing is learnt
    for budgeter in (landed, decayed):
        budgeter.on_step(0.03, 1, 1)
    assert landed.budget_for("s") >= 2
    assert decayed.budget_for("s") == 0
    assert landed.population.pooled() > decayed.population.pooled()  # its drafter's too: new sessions' prior


def test_a_drafter_granted_nothing_learns_from_its_shadow_blocks_and_its_next_session_is_granted():
    """A drafter whose sessions are granted 0 from their opening sends no real block: its population (the prior
    of its next sessions) learns only from shadow blocks. Before, it stayed at the 0.5 prior, and the real pair's LM
    drafter alone was granted 0 at every step (0.95x `Generate`, where a fixed gamma 2 read 1.31x). Another
    drafter's population does not move."""
    budgeter = DraftBudgeter(max_gamma=4)
    _feed_steps(budgeter, 0.3, 0.1)  # a CPU-like curve: a draft token costs a third of a one-token step
    budgeter.open("first", drafter="lm")
    budgeter.arrives("first", 0.38, 0.1, "lm")  # its blocks come 0.38 s after a verdict: more than a step
    budgeter.decodes_at_zero("first")  # alone, the verifier decodes it without a round trip: it pays that
    assert budgeter.budget_for("first") == 0  # at the prior 0.5 no block pays for its turnaround
    for _ in range(OPENING_ROUNDS + 30):
        budgeter.on_verdict("first", 0, 0)  # the verifier decodes it on its own
        budgeter.on_shadow("first", 2, 2, 2)  # and the blocks its client drafted meanwhile land
        budgeter.on_step(0.4, 1, 1)
    budgeter.close("first")
    assert budgeter.population_of("lm").pooled() > 0.8
    assert budgeter.population_of("ngram").pooled() == budgeter.population.pooled() == 0.5
    budgeter.open("next", drafter="lm")
    budgeter.decodes_at_zero("next")
    for _ in range(OPENING_ROUNDS):
        budgeter.on_verdict("next", 0, 0)
    budgeter.on_step(0.4, 1, 1)
    assert budgeter.budget_for("next") >= 2  # its turnaround stands (the drafter's last), its rate is learnt


def test_shadow_blocks_that_miss_keep_the_budget_at_zero():
    budgeter = _pinned_at_zero()
    for _ in range(30):
        budgeter.on_shadow("s", 4, 0, 4)
        budgeter.on_shadow("s", 0, 0, 4)  # or found nothing to draft
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("s") == 0
    budgeter.on_shadow("gone", 4, 4, 4)  # a session it does not know (closed meanwhile) is ignored
    assert "gone" not in budgeter._sessions


def _granted_on_shadows(bought: int, mode: str = "lockstep") -> tuple[DraftBudgeter, list[int]]:
    """A session whose shadow blocks all land (its estimate high) and whose granted blocks then land `bought` of
    their tokens: -> the budgeter and the budgets it granted, round by round. async: a step verifies the drafts
    that arrived (here all it was granted), and its verdict says nothing of a grant (offered 0)."""
    budgeter = DraftBudgeter(max_gamma=6, metrics=BudgetMetrics(CollectorRegistry()))
    _feed_steps(budgeter, 0.02, 0.02)  # a draft token costs as much as the step's fixed part
    budgets = []
    for _ in range(60):
        for _ in range(2):
            budgeter.on_shadow("s", 4, 4, 4)
        budgeter.on_step(0.04, 1, 1)
        budget = budgeter.budget_for("s")
        budgets.append(budget)
        if budget:
            budgeter.on_verdict("s", budget, min(bought, budget), offered=budget if mode == "lockstep" else 0)
        else:  # the engine's plain decoding step
            budgeter.on_verdict("s", 0, 0)
    return budgeter, budgets


@pytest.mark.parametrize("mode", ["lockstep", "async"])
def test_grants_are_scaled_by_what_granted_blocks_bought(mode):
    """Evidence comes in bursts and a grant follows it: an n-gram's shadow blocks landed 68% of the time at position
    1 where the blocks granted on their strength landed 37%. What the grants bought against what they promised
    scales the next grants, so grants that do not deliver stop; grants that deliver as promised keep it at 1."""
    kept, kept_budgets = _granted_on_shadows(bought=6, mode=mode)
    assert kept.calibration() == 1.0 and kept_budgets[-20:] == [6] * 20
    cut, cut_budgets = _granted_on_shadows(bought=0, mode=mode)
    assert cut.calibration() < 0.6 and max(cut_budgets[:3]) > 0 and cut_budgets[-20:] == [0] * 20
    assert cut.metrics.calibration._value.get() == pytest.approx(cut.calibration())


def test_a_drafters_calibration_scales_only_its_own_sessions():
    """One server-wide ratio scaled an LM's grants by an n-gram's bursts beside it: each drafter's sessions are
    scaled by what that drafter's grants bought, and the gauge reads the ratio over every drafter."""
    budgeter, _ = _granted_on_shadows(bought=0)  # an unnamed drafter whose grants bought nothing
    budgeter.open("lm", drafter="lm")
    for _ in range(OPENING_ROUNDS + 4):
        budgeter.on_verdict("lm", 0, 0)  # its opening, decoded plainly, and the commits that decide a shadow block
    for _ in range(8):
        budgeter.on_shadow("lm", 4, 4, 4)  # its shadow blocks landed, like the unnamed session's
    budgeter.on_step(0.06, 2, 2)  # the curve _granted_on_shadows fed: 0.02 s + 0.02 s a token
    assert budgeter.calibration("lm") == 1.0 and budgeter.calibration() < 0.6
    assert budgeter.budget_for("lm") >= 4 and budgeter.budget_for("s") == 0
    for _ in range(20):  # the lm's grants buy what they promise
        budget = budgeter.budget_for("lm")
        assert budget >= 4
        budgeter.on_verdict("lm", budget, budget, offered=budget)
        budgeter.on_step(0.02 + 0.02 * (budget + 2), 2, budget + 2)
    assert budgeter.calibration() < budgeter.metrics.calibration._value.get() < 1.0  # over every drafter


# ---------------------------------------------------------------------------------------------------- the client
class RecordingBudgeter(FixedBudgeter):
    def __init__(self, budget: int, **kwargs):
        super().__init__(budget, **kwargs)
        self.shadows: list[tuple[int, int, int]] = []

    def on_shadow(self, key, drafted: int, accepted: int, gamma: int) -> None:
        self.shadows.append((drafted, accepted, gamma))
        super().on_shadow(key, drafted, accepted, gamma)


@pytest.mark.parametrize("mode", ["lockstep", "async"])
async def test_under_budget_zero_the_client_reports_exact_shadow_blocks_and_stays_lossless(start_verifier, mode):
    target = FakeLM(32, seed=5)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    budgeter = _use(verifier, RecordingBudgeter(0, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=24)
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    spec = await speculate(verifier.stub, LMDrafter(target, "same"), [1, 2, 3], params, AutoGamma(3), info, mode=mode)
    assert spec.token_ids == baseline.token_ids
    assert spec.proposed == 0 and spec.shadows > 0
    await wait_for_no_sessions(verifier)  # the client does not wait for the verifier to read its last writes
    assert len(budgeter.shadows) == spec.shadows  # every one reached the verifier, none was refused or lost
    assert all(drafted == accepted == gamma > 0 for drafted, accepted, gamma in budgeter.shadows)  # a perfect draft
    assert verifier.servicer.budgeter.metrics.shadows._value.get() == spec.shadows


class CountingDrafter(LMDrafter):
    def __init__(self, model, name: str):
        super().__init__(model, name)
        self.proposed = 0

    def propose(self, context: list[int], gamma: int):
        self.proposed += gamma > 0
        return super().propose(context, gamma)


class FirstBlockBudgeter(RecordingBudgeter):
    """Grants drafts until the first block with a draft token is verified, then none."""

    def on_verdict(self, key, proposed: int, accepted: int, offered: int = 0) -> None:
        super().on_verdict(key, proposed, accepted, offered)
        if proposed:
            self.budget, self._grants = 0, None


@pytest.mark.parametrize("mode", ["lockstep", "async"])
@pytest.mark.parametrize("first_budget", [0, 2])
async def test_on_the_verifiers_cores_a_session_never_granted_drafts_never_drafts(start_verifier, monkeypatch, mode,
                                                                                  first_budget):
    """One box (ClientConfig.shared_cores): a shadow block's drafting takes the verifier's cores (and an LM's first one
    its prefill of the prompt), so a session granted no draft from its opening never runs its drafter; once it drafted
    a block it sent, shadow blocks keep its estimate alive as on a machine of its own.

    Async, granted drafts: the verifier model's steps after the first two wait until chunks have put two draft tokens
    into the session's `ahead` (a wrapped `VerifierSession.offer`), so the engine cannot decode all its tokens alone
    first (it failed ~1 in 15 so). A stale chunk does not open the gate: the client drafts again from the commit the
    gate holds it at, since its `Link` takes the verifier for a slow one and sends every chunk it may draft (against
    these ~1 ms steps it would rightly send none, and wait for a commit the gate holds)."""
    target = GatedLM(32, seed=5, free=2, wait_s=30)
    offer = VerifierSession.offer

    def offer_and_open(session, claim, max_ahead):
        merged = offer(session, claim, max_ahead)
        if len(session.ahead) >= 2:  # the held step commits the first (it decodes alone), the next step verifies more
            target.gate.set()
        return merged

    verifier = await start_verifier(target, vocab_size=32, budget=True)
    budgeter = _use(verifier, FirstBlockBudgeter(first_budget, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=24)
    target.gate.set()  # Generate's steps, a lock-step session's and one never granted a draft need no chunk
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    if mode == "async" and first_budget:
        target.reset()
        monkeypatch.setattr(VerifierSession, "offer", offer_and_open)
        monkeypatch.setattr(Link, "on_commit", lambda link, tokens, service_s: setattr(link, "s_per_token", 1.0))
    drafter = CountingDrafter(FakeLM(32, seed=5), "same")  # the target apart from the gate: a perfect draft
    spec = await speculate(verifier.stub, drafter, [1, 2, 3], params, AutoGamma(3), info, mode=mode,
                           config=ClientConfig(shared_cores=True))
    assert spec.token_ids == baseline.token_ids
    await wait_for_no_sessions(verifier)
    assert len(budgeter.shadows) == spec.shadows
    if first_budget == 0:
        assert spec.proposed == spec.shadows == drafter.proposed == 0
    else:
        assert spec.proposed > 0 and spec.shadows > 0


def test_misses_are_held_back_a_few_to_a_message_and_a_hit_takes_them_at_once():
    """Misses change no grant while the verifier decodes alone at budget 0, and each message costs a fast verifier's
    event loop: HELD_MISSES are held, the next goes with them; a block that landed goes at once with those before it;
    `flush` sends what is held (before a proposal). Every verdict goes once, in the order it was decided."""
    shadows, sent = Shadows(), []

    def report(accepted: int, drafted: int = 2):
        message = shadows.report(ShadowBlock(base=0, draft_ids=(7,) * drafted, gamma=2), accepted, 3)
        if message is not None:
            request, blocks = message
            sent.append([(b.drafted, b.accepted) for b in request.shadow.before] +
                        [(request.shadow.drafted, request.shadow.accepted)])
            assert blocks == len(sent[-1]) and request.shadow.wants == 3
        return message

    assert [report(0, drafted) for drafted in (2, 0, 1)] == [None] * HELD_MISSES  # empty blocks are misses too
    assert report(0) is not None and sent == [[(2, 0), (0, 0), (1, 0), (2, 0)]]
    assert report(0) is None and report(1) is not None and sent[-1] == [(2, 0), (2, 1)]  # a hit: at once
    assert report(2) is not None and sent[-1] == [(2, 2)]
    assert shadows.flush(3) is None  # nothing held
    report(0), report(0)
    request, blocks = shadows.flush(None)
    assert blocks == 2 and [(request.shadow.before[0].accepted, request.shadow.accepted)] == [(0, 0)]
    assert not request.shadow.HasField("wants") and shadows.held == [] and shadows.flush(None) is None


def test_beside_other_sessions_hits_are_held_too():
    """When the verifier's last step carried other sessions (`shared`), a block that landed is held like a miss:
    4 n-gram sessions of the tiny pair sent 200 shadow messages a pass where they now send 71. Alone, a hit goes
    at once (it may open a grant: 1.14x `Generate` at 1 session)."""
    shadows = Shadows()
    block = ShadowBlock(base=0, draft_ids=(7, 7), gamma=2)
    assert [shadows.report(block, accepted, 2, shared=True) for accepted in (2, 0, 1)] == [None] * HELD_MISSES
    request, blocks = shadows.report(block, 2, 2, shared=True)  # the fourth takes them
    assert blocks == HELD_MISSES + 1 and [b.accepted for b in request.shadow.before] == [2, 0, 1]
    assert shadows.report(block, 2, 2, shared=False) is not None  # alone again: at once


class EmptyDrafter(NgramDrafter):
    """An n-gram drafter that never finds a match: every shadow block is an empty miss, decided at once."""

    def propose(self, context: list[int], gamma: int) -> Candidates:
        return Candidates([], None)


class GrantsOnceHeld(RecordingBudgeter):
    """Grants 0 until the client holds a missed shadow block (`held`, set from the client's side), then `then` at the
    next verdict; records the shadow verdicts and the proposals' verdicts in the order the verifier took them."""

    def __init__(self, then: int, held: threading.Event, **kwargs):
        super().__init__(0, **kwargs)
        self.then, self.held, self.events, self.at_grant = then, held, [], None

    def on_shadow(self, key, drafted: int, accepted: int, gamma: int) -> None:
        self.events.append("shadow")
        super().on_shadow(key, drafted, accepted, gamma)

    def on_verdict(self, key, proposed: int, accepted: int, offered: int = 0) -> None:
        super().on_verdict(key, proposed, accepted, offered)
        if self.at_grant is None and self.held.is_set():
            self.budget, self._grants, self.at_grant = self.then, None, len(self.shadows)
        if offered:
            self.events.append("proposal")


async def test_held_misses_reach_the_verifier_before_the_sessions_next_proposal(start_verifier, monkeypatch):
    """A grant ends the verifier's turn: the client's next proposal (an empty block asking to decode alone included)
    carries nothing of its shadow blocks, so the misses it held go in a message before it."""
    held = threading.Event()
    report = Shadows.report

    def holding(self, block, accepted, wants, shared=False):
        message = report(self, block, accepted, wants, shared)
        if self.held:
            held.set()
        return message

    monkeypatch.setattr(Shadows, "report", holding)
    target = FakeLM(32, seed=5)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    budgeter = _use(verifier, GrantsOnceHeld(then=2, held=held, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=64)
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    spec = await speculate(verifier.stub, EmptyDrafter(), [1, 2, 3], params, FixedGamma(2, 16), info)
    assert spec.token_ids == baseline.token_ids
    await wait_for_no_sessions(verifier)
    assert budgeter.at_grant == 0 and "proposal" in budgeter.events  # nothing reported before the grant; then a turn
    first = budgeter.events.index("proposal")
    assert 1 <= budgeter.events[:first].count("shadow") <= HELD_MISSES  # every held one, before it
    assert len(budgeter.shadows) == spec.shadows


class GatedDrafter(LMDrafter):
    """Drafting a block (a shadow block: the client's own gamma is 0) blocks on `gate` once `entered` is set."""

    def __init__(self, model, name: str):
        super().__init__(model, name)
        self.entered, self.gate = threading.Event(), threading.Event()

    def propose(self, context: list[int], gamma: int):
        if gamma > 0:
            self.entered.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().propose(context, gamma)


class HoldingBudgeter(FixedBudgeter):
    def __init__(self, budget: int, **kwargs):
        super().__init__(budget, **kwargs)
        self.held = threading.Event()

    def hold(self, key, grants: int) -> None:
        super().hold(key, grants)
        self.held.set()


async def test_an_empty_block_does_not_wait_for_a_shadow_block_being_drafted(start_verifier):
    """The client's own gamma is 0 and the verifier grants drafts: its empty block (decode_alone) goes at once, even
    while its drafter is busy with a shadow block (an LM's takes ~0.1 s a token on a shared CPU core, and the verifier
    holds its next step for this block). The gate keeps the shadow block drafting until the verifier has the block."""
    draft, target = fake_pair(vocab_size=32, noise=0.5)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    budgeter = _use(verifier, HoldingBudgeter(0, max_gamma=16))
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=LONG // 8)
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    drafter = GatedDrafter(draft, "d")
    request = asyncio.ensure_future(speculate(verifier.stub, drafter, [1, 2, 3], params, FixedGamma(0, 16), info))
    try:
        assert await asyncio.to_thread(drafter.entered.wait, 30)  # a shadow block is being drafted, and stays so
        budgeter.budget = 2  # the next commit grants drafts: the verifier's turn ends and it waits for a block
        assert await asyncio.to_thread(budgeter.held.wait, 30)  # the empty block asking it to decode alone came
    finally:
        drafter.gate.set()
    spec = await request
    assert spec.token_ids == baseline.token_ids and spec.proposed == 0


# ---------------------------------------------------------------------------------------------------- raw streams
async def test_the_verifier_counts_a_shadow_verdict_in_its_turn_and_goes_on(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, RecordingBudgeter(0, max_gamma=16))
    call = await _opened_in_the_verifiers_turn(verifier, max_new_tokens=12)
    await call.write(pb.SpeculateRequest(shadow=pb.ShadowVerdict(drafted=3, accepted=1, gamma=4)))
    commits = [(await call.read()).commit for _ in range(10)]  # tokens 2..11: the session goes on to the end
    assert commits[-1].finished and [c.base_len for c in commits] == list(range(2, 12))
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF and await call.code() == grpc.StatusCode.OK  # all it was sent is read
    assert budgeter.shadows == [(3, 1, 4)]


@pytest.mark.parametrize("shadow, message", [
    (pb.ShadowVerdict(drafted=3, accepted=4, gamma=4), "accepted <= drafted <= gamma"),
    (pb.ShadowVerdict(drafted=5, accepted=0, gamma=4), "accepted <= drafted <= gamma"),
    (pb.ShadowVerdict(drafted=0, accepted=0, gamma=0), "gamma must be in [1, 16]"),
    (pb.ShadowVerdict(drafted=1, accepted=0, gamma=17), "gamma must be in [1, 16]"),
    (pb.ShadowVerdict(drafted=1, accepted=0, gamma=2, before=[pb.ShadowCount(drafted=3, accepted=4, gamma=4)]),
     "before[0]: need accepted <= drafted <= gamma"),
    (pb.ShadowVerdict(drafted=1, accepted=0, gamma=2, before=[pb.ShadowCount(drafted=1, accepted=0, gamma=2)] * 17),
     "at most 16 earlier verdicts"),
])
async def test_a_malformed_shadow_verdict_is_a_clear_error(start_verifier, shadow, message):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    _use(verifier, FixedBudgeter(0, max_gamma=16))
    call = await _opened_in_the_verifiers_turn(verifier)
    await call.write(pb.SpeculateRequest(shadow=shadow))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        for _ in range(LONG):
            assert (await call.read()).WhichOneof("kind") == "commit"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


async def test_only_a_verifier_with_a_budget_takes_them(start_verifier):
    params = codec.params_to_proto(SamplingParams(max_new_tokens=2))
    for budget, takes in ((True, True), (False, False)):
        verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=budget,
                                        limits=VerifierLimits(draft_budget=budget))
        call = verifier.stub.Speculate()
        await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=params)))
        assert (await call.read()).opened.takes_shadows is takes
        call.cancel()


# ---------------------------------------------------------------------------------------------------- service samples
def test_a_service_time_that_is_no_sample_of_a_block_is_left_out():
    """The first block often rides with another session's prefill (2.9 s for a 0.3 s step on the CPU pair); taken as
    the price of 4 draft tokens, it made gamma 0 look best for good (a size never chosen again is never re-measured)."""
    schedule = RttGamma(gamma=4, max_gamma=8)
    schedule.update(4, 0, draft_s=0.001, service_s=None, rtt_s=0.0)
    for _ in range(3):
        schedule.update(0, 0, draft_s=0.0, service_s=0.3, rtt_s=0.0)
    assert schedule.verify_cost() == pytest.approx((0.3, 0.0))


# ---------------------------------------------------------------------------------------------------- the grant's pricing
def test_a_session_decoding_alone_is_priced_as_drafting_nothing_for_those_grants():
    """Proposal.decode_alone = n: its next n grants cannot buy drafts from it; priced as drafting, it lifted a padded
    step's ceiling for every session (n-gram auto at 4 sessions: 0.88x Generate, 0.98x once held)."""
    budgeter = DraftBudgeter(max_gamma=6)
    _feed_steps(budgeter, 0.02, 0.002)
    for _ in range(20):
        budgeter.on_verdict("s", 4, 4)
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("s") > 0
    budgeter.hold("s", 2)
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("s") == 0  # after the block that asked
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("s") == 0  # after its first step alone
    budgeter.on_step(0.03, 1, 1)
    assert budgeter.budget_for("s") > 0  # after its last: its turn again


def test_unused_grants_count_as_misses_in_the_rate_new_sessions_start_from():
    budgeter = DraftBudgeter(max_gamma=6)
    for _ in range(200):
        budgeter.on_verdict("s", 0, 0, offered=3)  # granted 3, drafted nothing (an n-gram with no match)
        budgeter.on_verdict("s", 0, 0)  # a plain decoding step: says nothing
    assert budgeter.population.pooled() < 0.1


def test_a_margin_grants_nothing_when_drafts_promise_less():
    from specdec.budget import Demand, grant_budgets, predicted_gain
    demands = [Demand("a", [0.3] * 4, 4), Demand("b", [0.0] * 4, 4)]

    def step(tokens, sessions):
        return 0.1 + 0.01 * tokens
    grant = grant_budgets(demands, step)
    gain = predicted_gain(demands, [grant["a"], grant["b"]], step)
    assert grant["a"] > 0 and 1.0 < gain < 1.1
    assert grant_budgets(demands, step, min_gain=0.1) == {"a": 0, "b": 0}
    assert grant_budgets(demands, step, min_gain=(gain - 1) / 2) == grant
    slo = [Demand("a", [0.3] * 4, 4, tpot_slo_s=0.1)]  # decoding alone would miss its target: the margin yields
    assert grant_budgets(slo, step, min_gain=0.5)["a"] > 0


@pytest.mark.parametrize("rate, sessions, granted", [
    (0.4, 2, False),  # E(6) ~ 1.7 tokens: not the 2 that two steps of decoding commit
    (0.9, 2, True),  # E(6) ~ 5: pays for the step it misses
    (0.4, 1, True),  # alone, nobody's step is missed: the usual grant
])
def test_a_session_that_misses_steps_is_granted_only_a_block_that_pays_for_one(rate, sessions, granted):
    budgeter = DraftBudgeter(max_gamma=6)
    _feed_steps(budgeter, 0.02, 0.0005)  # drafts nearly free to verify: any acceptance pays, missing a step aside
    keys = ["slow", "other"][:sessions]
    for i in range(40):  # the first draft token accepted `rate` of the time; 0.4: only it, 0.9: the whole block
        for key in keys:
            landed = (i % 10) < 10 * rate
            budgeter.on_verdict(key, 6, (1 if rate < 0.5 else 6) if landed else 0, offered=6)
    budgeter.arrives("slow", 0.0005, 0.001)
    assert budgeter.budget_for("slow") > 0
    budgeter.arrives("slow", 0.002, 0.001)  # its blocks come after the step starts (an LM on a shared CPU core)
    budget = budgeter.budget_for("slow")
    assert (budget > 0) == granted
    accept = budgeter._sessions["slow"].tracker.rates(budgeter.population.pooled())
    if sessions > 1:  # beside others, what it is granted pays for the step it misses
        assert budget == 0 or expected_tokens_table(accept, budget)[budget] >= 2


def test_a_new_session_starts_from_the_turnaround_measured_with_its_drafter():
    """The engine skips a session's first drafted block, so a new lock-step session is unmeasured; it starts from
    the latest turnaround of sessions drafting with the same drafter (OpenSession.client_model_id), not from 0.
    Async and Generate sessions (drafter None) never wait on the client, whatever a lock-step one measured."""
    budgeter = DraftBudgeter(max_gamma=6)
    for key in ("measured", "new lm", "new ngram", "async"):
        budgeter.open(key)
    budgeter.arrives("measured", 0.3, 0.1, "qwen-0.5b")
    budgeter.arrives("new lm", None, 0.1, "qwen-0.5b")
    budgeter.arrives("new ngram", None, 0.1, "ngram")
    budgeter.arrives("async", None, 0.1, None)
    sessions = budgeter._sessions
    assert (sessions["new lm"].wait_s, sessions["new lm"].slow) == (0.3, True)
    assert (sessions["new ngram"].wait_s, sessions["new ngram"].slow) == (0.0, False)
    assert (sessions["async"].wait_s, sessions["async"].slow) == (0.0, False)
    budgeter.arrives("new lm", 0.02, 0.1, "qwen-0.5b")  # its own measurement replaces the prior, and is the next one
    budgeter.arrives("later", None, 0.1, "qwen-0.5b")
    assert not sessions["new lm"].slow and budgeter._drafters["qwen-0.5b"].turnaround_s == 0.02
