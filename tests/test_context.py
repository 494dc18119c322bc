"""specdec/context.py: where a session's next block starts (its text's repeated suffix), and the draft budget reading a
drafter's first-position rate there (verifier_worker/budgeting.py)."""

from __future__ import annotations

import random

import pytest

from specdec.context import CONTEXT_PRIOR, MAX_SUFFIX, ContextRates, SuffixIndex
from verifier_worker.budgeting import DraftBudgeter


def suffix_bucket(tokens: list[int]) -> int:
    """The reference: the longest suffix (<= MAX_SUFFIX) of `tokens` that occurs earlier in them, by brute force."""
    best = 0
    for n in range(1, min(MAX_SUFFIX, len(tokens) - 1) + 1):
        suffix = tokens[-n:]
        if not any(tokens[i : i + n] == suffix for i in range(len(tokens) - n)):
            break
        best = n
    return best


def test_the_index_keeps_the_longest_repeated_suffix_as_tokens_come():
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]  # a small vocabulary: many repeats
        index, i = SuffixIndex(tokens[:1]), 1
        assert index.bucket == suffix_bucket(tokens[:1])
        while i < len(tokens):  # a block commits one token or several
            n = rng.randrange(1, 4)
            index.extend(tokens[i : i + n])
            i = min(len(tokens), i + n)
            assert index.bucket == suffix_bucket(tokens[:i]), tokens[:i]
    assert SuffixIndex([5, 6, 7]).bucket == 0  # nothing repeats
    assert SuffixIndex([5, 6, 7, 9, 5, 6]).bucket == 2  # "5 6" occurred before
    assert SuffixIndex([5, 6, 7, 5, 6, 7, 5, 6, 7]).bucket == MAX_SUFFIX  # capped


def test_context_rates_start_at_the_sessions_rate_and_learn_each_bucket_and_position_apart():
    rates = ContextRates()
    assert rates.rates(2, [0.4, 0.6]) == pytest.approx([0.4, 0.6])
    for _ in range(40):
        rates.add(0, proposed=2, accepted=0)  # rejected at position 1: position 2 never reached
        rates.add(3, proposed=2, accepted=2)
        rates.add(1, proposed=3, accepted=1)  # lands at position 1, rejected at 2
    zero, one, three = (rates.rates(b, [0.4, 0.6, 0.5]) for b in (0, 1, 3))
    assert zero[0] < 0.1 and zero[1:] == pytest.approx([0.6, 0.5])  # no evidence past position 1
    assert three[0] > 0.9 and three[1] > 0.9 and three[2] == pytest.approx(0.5)
    assert one[0] > 0.9 and one[1] < 0.1
    assert rates.rates(2, [0.4, 0.6]) == pytest.approx([0.4, 0.6])  # no evidence there
    offered = ContextRates()
    offered.add(2, proposed=1, accepted=1, offered=3)  # budget left unused: a miss at position 2, as a grant sees it
    prior = CONTEXT_PRIOR
    assert offered.rates(2, [0.0, 1.0, 0.5]) == pytest.approx([1 / (1 + prior), prior / (1 + prior), 0.5])


FIXED_S, TOKEN_S = 0.1, 0.12  # a draft token costs more than a step's share: one pays above ~0.6 at position 1


def _step(budgeter: DraftBudgeter, tokens: int = 1) -> None:
    budgeter.on_step(FIXED_S + TOKEN_S * tokens, 1, tokens)


def test_a_block_starting_where_the_text_repeats_is_granted_by_that_buckets_rate():
    """A drafter whose blocks landed where its session's text repeated (bucket 3) and missed where it was new (bucket
    0), half of them each: two new sessions with the same estimate (half land) are granted by where their next
    block starts, drafts where the text repeats and none where it is new; without the verifier's view of the text
    both read the same half, which does not pay here."""
    buckets = {"learn": 3, "quoting": 3, "new": 0}
    budgeter = DraftBudgeter(max_gamma=8)
    budgeter.context = buckets.get
    budgeter.open("learn", drafter="ngram")
    for i in range(60):  # each verdict counts in the bucket its block started in (the latest grant's)
        buckets["learn"] = 3 if i % 2 else 0
        for tokens in (1, 2, 3, 5):
            _step(budgeter, tokens)  # also a fresh grant at the next budget_for
        budgeter.budget_for("learn")
        budgeter.on_verdict("learn", 2, 2 if i % 2 else 0)
    budgeter.close("learn")
    for key in ("quoting", "new"):
        budgeter.open(key, drafter="ngram")
        for _ in range(2):  # past the answer's opening (its rounds are priced by the openings)
            budgeter.on_verdict(key, 0, 0)
    _step(budgeter)
    assert budgeter.budget_for("quoting") > 0 and budgeter.budget_for("new") == 0
    budgeter.context = None
    _step(budgeter)
    assert budgeter.budget_for("quoting") == budgeter.budget_for("new") == 0


async def test_the_engine_keeps_the_index_of_the_sessions_a_grant_may_draft_for():
    """Wired: a session that may be granted drafts gets the index of its prompt, its commits extend it and the
    budgeter reads its bucket; a `Generate` session (max_gamma 0), or any session of a verifier without a budget,
    keeps none (11 ms of the event loop for a 4096-token prompt, for nothing)."""
    from tests.stubs import FakeLM
    from specdec.config import SamplingParams
    from verifier_worker.engine import Engine

    budgeter = DraftBudgeter(max_gamma=4)
    engine = Engine(FakeLM(32), max_batch_tokens=64, batch_wait_s=0.0, budgeter=budgeter)
    prompt = [1, 2, 3, 1, 2]
    drafting = engine.open(prompt, SamplingParams(max_new_tokens=8))
    generate = engine.open(prompt, SamplingParams(max_new_tokens=8), max_gamma=0)
    assert generate.suffix is None and budgeter.context(generate) is None
    assert drafting.suffix.bucket == budgeter.context(drafting) == 2  # "1 2" occurred before
    await engine.prefill(drafting)
    await engine.verify(drafting, [], None)
    assert len(drafting.tokens) > len(prompt)
    assert drafting.suffix.bucket == suffix_bucket(drafting.tokens)
    plain = Engine(FakeLM(32), max_batch_tokens=64, batch_wait_s=0.0)
    assert plain.open(prompt, SamplingParams(max_new_tokens=8)).suffix is None


def test_a_block_whose_later_positions_land_where_the_text_repeats_is_granted_more_there():
    """The same at the second position: a drafter's blocks landed 2 of 2 where its session's text repeated (bucket 3)
    and 1 of 2 where a repeat had just begun (bucket 1). Two new sessions with the same estimate, one in each: the
    one quoting is granted a longer block; with the first position alone read by bucket, both would be priced
    alike past it."""
    buckets = {"learn": 3, "quoting": 3, "begun": 1}
    budgeter = DraftBudgeter(max_gamma=8)
    budgeter.context = buckets.get
    budgeter.open("learn", drafter="ngram")
    for i in range(60):
        buckets["learn"] = 3 if i % 2 else 1
        for tokens in (1, 2, 3, 5):
            _step(budgeter, tokens)
        budgeter.budget_for("learn")
        budgeter.on_verdict("learn", 2, 2 if i % 2 else 1)
    budgeter.close("learn")
    for key in ("quoting", "begun"):
        budgeter.open(key, drafter="ngram")
        for _ in range(2):  # past the answer's opening
            budgeter.on_verdict(key, 0, 0)
    _step(budgeter)
    assert budgeter.budget_for("quoting") > budgeter.budget_for("begun") > 0
