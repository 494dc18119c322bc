"""The client's own best gamma caps its grants (issue 18; OpenSession.wants, Proposal.wants, ShadowVerdict.wants).

A client's blocks carry min(budget, its own gamma). Granted more, the budget priced draft tokens that never came and
chose the other sessions' grants around them (2 LM sessions on a CPU: grants of 9-16 where the client sent 2-5), and
the unused budget counted as misses at its last positions. So every proposal and shadow verdict says the client's
own gamma, and the verifier grants it at most max(1, that).

- The pure budgeter: the grant stays within what the client said; 0 counts as 1; unsaid (an older client) lifts it;
  a decode-only session stays at 0.
- The wire: what an opening, a proposal (lock-step, async) and a shadow verdict say reaches the budgeter; an older
  client's messages say nothing.
- A real client says its schedule's gamma in every message (async: lookahead(gamma), all it drafts ahead), and its
  grants stay within it, lossless.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import LMDrafter
from draft_worker.gamma import FixedGamma
from draft_worker.transport import fetch_info
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import SamplingParams
from tests.stubs import FakeLM, GatedLM
from tests.test_budget import _feed_steps
from tests.test_budget_wiring import FixedBudgeter, _use
from tests.test_errors import wait_for_no_sessions
from tests.test_server_decodes import LONG, _opened_in_the_verifiers_turn
from verifier_worker.budgeting import DraftBudgeter

pytestmark = pytest.mark.usefixtures("free_grants")


def _easy_budgeter() -> DraftBudgeter:
    """Flat step cost, every draft accepted: each session's grant is its cap."""
    budgeter = DraftBudgeter(max_gamma=8)
    budgeter.open("s")
    budgeter.open("generate", max_gamma=0)
    _feed_steps(budgeter, 0.02, 0.0)
    for _ in range(30):
        budgeter.on_verdict("s", 8, 8)
    return budgeter


@pytest.mark.parametrize("wants, granted", [(None, 8), (3, 3), (0, 1), (1, 1), (8, 8), (40, 8)])
def test_a_session_is_granted_no_more_than_its_client_wants(wants, granted):
    budgeter = _easy_budgeter()
    assert budgeter.budget_for("s") == 8
    budgeter.wants("s", wants)
    budgeter.wants("generate", 5)
    budgeter.on_step(0.02, 2, 2)
    assert budgeter.budget_for("s") == granted
    assert budgeter.budget_for("generate") == 0


def test_a_block_as_long_as_its_clients_own_gamma_is_no_miss_past_it():
    """The LM's client chose 2 where the grant, made on its last word, offered 3: both drafts accepted. Its own
    gamma said with the block, position 3 is its choice and no miss; unsaid (an older client), the grant bought
    nothing there and it is one. Every block so counted took the LM's rate from ~0.85 to ~0.7."""
    def rates(wants):
        budgeter = DraftBudgeter(max_gamma=8)
        budgeter.open("lm")
        for _ in range(30):
            budgeter.wants("lm", wants)
            budgeter.on_verdict("lm", 2, 2, 3)
        return budgeter._rates_of(budgeter._sessions["lm"]), budgeter.population_of(None).pooled()

    (said, said_pooled), (unsaid, unsaid_pooled) = rates(2), rates(None)
    assert said[0] > 0.9 and said[1] > 0.9 and said_pooled > 0.9
    assert unsaid[2] < 0.3 and unsaid_pooled < said_pooled - 0.2


def test_a_new_word_remakes_a_standing_grant():
    """A fast verifier reuses a grant for a few steps (GRANT_SHARE): a client's new gamma must not wait for that."""
    budgeter = _easy_budgeter()
    assert budgeter.budget_for("s") == 8
    budgeter.wants("s", 2)  # no step between: only the word can remake it
    assert budgeter.budget_for("s") == 2
    budgeter.wants("s", None)
    assert budgeter.budget_for("s") == 8


def test_a_word_the_standing_grant_does_not_reach_keeps_it(monkeypatch):
    """An n-gram's word changes every few commits: only a cap the standing grant exceeds, or one that held it back,
    remakes it at once (`DraftBudgeter._binds`); any other stays the best grant until its scheduled remake."""
    budgeter = DraftBudgeter(max_gamma=8)
    budgeter.open("s")
    _feed_steps(budgeter, 0.02, 0.002)
    for _ in range(30):
        budgeter.on_verdict("s", 8, 4)  # 4 accepted, the 5th never: the best block is 4 of its cap of 8
    assert budgeter.budget_for("s") == 4
    made, grants = [], budgeter.grants
    monkeypatch.setattr(budgeter, "grants", lambda *a, **k: made.append(1) or grants(*a, **k))
    budgeter.wants("s", 6)  # 8 -> 6, above the grant
    budgeter.wants("s", None)  # 6 -> 8
    assert budgeter.budget_for("s") == 4 and made == []
    budgeter.wants("s", 3)  # below the grant: at once
    assert budgeter.budget_for("s") == 3 and len(made) == 1
    budgeter.wants("s", 6)  # the cap of 3 held it back: at once
    assert budgeter.budget_for("s") == 4 and len(made) == 2


class WantsBudgeter(FixedBudgeter):
    """Grants every session the most it may have (its cap, within `budget`), and records every word its client said."""

    def __init__(self, said: threading.Event | None = None, words: int = 1, **kwargs):
        super().__init__(16, **kwargs)
        self.said: list[int | None] = []
        self.caps: list[int] = []  # the session's cap after each word
        self.event, self.words = said or threading.Event(), words  # set once `words` words are in

    def wants(self, key, gamma):
        self.said.append(gamma)
        super().wants(key, gamma)
        self.caps.append(self._sessions[key].cap)
        if len(self.said) >= self.words:
            self.event.set()

    def grants(self, load=None, exclude=()):
        return {key: min(self.budget, s.cap) for key, s in self._sessions.items()}


async def test_a_proposals_word_reaches_the_budgeter_and_an_older_clients_says_nothing(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, WantsBudgeter(max_gamma=16))
    call = verifier.stub.Speculate()
    params = codec.params_to_proto(SamplingParams(max_new_tokens=12))
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=params)))
    assert (await call.read()).opened.draft_budget == 16
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=0, draft_ids=[3], wants=2)))
    verdict = (await call.read()).verdict
    assert verdict.draft_budget == 2  # the next grant is within the word
    base = verdict.num_accepted + verdict.HasField("next_token")
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=base, draft_ids=[3])))  # an older client
    assert (await call.read()).verdict.draft_budget == 16
    assert budgeter.said == [2, None]
    call.cancel()


async def test_an_async_chunks_word_reaches_the_budgeter_stale_or_not(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, WantsBudgeter(max_gamma=16))
    call = verifier.stub.Speculate()
    params = codec.params_to_proto(SamplingParams(max_new_tokens=LONG))
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=params,
                                                             mode=pb.SPECULATION_MODE_ASYNC)))
    assert (await call.read()).opened.draft_budget == 16
    await call.write(pb.SpeculateRequest(proposal=pb.Proposal(base_len=0, draft_ids=[3], wants=2)))
    budgets = []  # commits already on their way when the word arrived carry the grant before it
    for _ in range(LONG):  # bounded: the session ends after LONG tokens
        commit = (await call.read()).commit
        budgets.append(commit.draft_budget)
        if commit.draft_budget == 2 or commit.finished:
            break
    assert budgets[-1] == 2 and set(budgets[:-1]) <= {16}  # the grants after the word are within it
    assert budgeter.said == [2] and budgeter.caps == [2]
    call.cancel()


async def test_a_shadow_verdicts_word_lifts_the_cap_in_the_verifiers_turn(start_verifier):
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, WantsBudgeter(max_gamma=16))
    budgeter.budget = 0
    call = await _opened_in_the_verifiers_turn(verifier, max_new_tokens=12)
    await call.write(pb.SpeculateRequest(shadow=pb.ShadowVerdict(drafted=3, accepted=1, gamma=4, wants=5)))
    await call.done_writing()  # the verifier takes all it was sent before it ends the stream, finished or not
    for _ in range(11):  # tokens 2..11, then the end
        if await call.read() is grpc.aio.EOF:
            break
    assert await call.code() == grpc.StatusCode.OK
    assert budgeter.said == [5] and budgeter.caps == [5]


async def test_an_async_session_that_sends_no_chunk_is_granted_within_its_openings_word(start_verifier):
    """Before OpenSession.wants, an async session that had not sent a chunk was priced at max_gamma (16): with
    padding, a demand that never came (an LM's client at gamma 0 sends nothing)."""
    verifier = await start_verifier(FakeLM(32, seed=5), vocab_size=32, budget=True)
    budgeter = _use(verifier, WantsBudgeter(max_gamma=16))
    call = verifier.stub.Speculate()
    params = codec.params_to_proto(SamplingParams(max_new_tokens=8))
    await call.write(pb.SpeculateRequest(open=pb.OpenSession(prompt_ids=[1, 2], params=params, wants=1,
                                                             mode=pb.SPECULATION_MODE_ASYNC)))
    assert (await call.read()).opened.draft_budget == 1
    budgets = []
    for _ in range(8):  # bounded: the verifier decodes the 8 tokens on its own
        commit = (await call.read()).commit
        budgets.append(commit.draft_budget)
        if commit.finished:
            break
    assert budgets and set(budgets) == {1} and budgeter.said == [1]
    call.cancel()


@pytest.mark.parametrize("mode", ["lockstep", "async"])
async def test_a_real_client_says_its_gamma_and_is_granted_within_it(start_verifier, mode):
    # its steps after the first two wait for the client's word after its opening's: an async session then has a chunk
    # in by the time it steps on, however busy the machine
    target = GatedLM(32, seed=5, free=2, wait_s=30)
    verifier = await start_verifier(target, vocab_size=32, budget=True)
    budgeter = _use(verifier, WantsBudgeter(max_gamma=16, said=target.gate, words=2))  # the opening's, then a block's
    info = await fetch_info(verifier.stub)
    params = SamplingParams(max_new_tokens=24)
    target.gate.set()  # Generate's steps need no word
    baseline = await generate_baseline(verifier.stub, [1, 2, 3], params)
    target.reset()
    draft = FakeLM(32, seed=5)  # the same model apart from the gate: a perfect draft
    spec = await speculate(verifier.stub, LMDrafter(draft, "same"), [1, 2, 3], params, FixedGamma(3, 16), info,
                           mode=mode)
    await wait_for_no_sessions(verifier)
    assert spec.token_ids == baseline.token_ids
    wants = 3 if mode == "lockstep" else 7  # async: all it drafts past the commit at gamma 3, lookahead(3)
    assert spec.proposed > 0 and budgeter.said and set(budgeter.said) == {wants}
    assert set(spec.budget_per_round) == {wants}  # its opening says it: the first grant is within it too
