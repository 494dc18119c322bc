"""The RTT-aware gamma: the expected-tokens formula, the choice of gamma, and RttGamma learning it online."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from draft_worker.gamma import RttGamma, new_history
from specdec.acceptance import OPENING_ROUNDS
from specdec.gamma import choose_gamma, expected_tokens

RTTS = [0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.95])
@pytest.mark.parametrize("gamma", [0, 1, 4, 9])
def test_expected_tokens_matches_geometric_closed_form(alpha, gamma):
    assert expected_tokens([alpha] * gamma, gamma) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))


def test_expected_tokens_by_position():
    # accepted prefix length L: P(L >= i) = prod_{j<=i} accept[j-1]; E = 1 + sum_i P(L >= i)
    assert expected_tokens([0.9, 0.5, 0.2], 3) == pytest.approx(1 + 0.9 + 0.45 + 0.09)
    assert expected_tokens([0.9, 0.5, 0.2], 1) == pytest.approx(1.9)  # later positions do not count
    with pytest.raises(ValueError):
        expected_tokens([0.9], 2)


def _simulated_rate(accept: list[float], gamma: int, draft_s: float, verify_s: tuple[float, float], rtt_s: float,
                    rounds: int, rng: np.random.Generator) -> float:
    """Committed tokens per second of `rounds` simulated lock-step rounds at gamma."""
    accepted_at = rng.random((rounds, gamma)) < np.asarray(accept[:gamma])  # [rounds, gamma]
    accepted = np.cumprod(accepted_at, axis=1).sum(axis=1)  # [rounds] leading accepted tokens
    seconds = rounds * (gamma * draft_s + verify_s[0] + gamma * verify_s[1] + rtt_s)
    return float((accepted + 1).sum()) / seconds


@pytest.mark.parametrize(("accept", "draft_s", "verify_s", "rtt_s"), [
    ([0.8] * 10, 0.005, (0.03, 0.01), 0.05),  # CPU verifier: cost grows with the block
    ([0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], 0.003, (0.015, 0.0), 0.02),  # GPU: flat
    ([0.6] * 10, 0.01, (0.02, 0.005), 0.0),  # loopback, a weak drafter
    ([0.95] * 10, 0.002, (0.01, 0.0), 0.1),  # far, a strong drafter
])
def test_choose_gamma_agrees_with_simulated_rounds(accept, draft_s, verify_s, rtt_s):
    rng = np.random.default_rng(0)
    rates = [_simulated_rate(accept, g, draft_s, verify_s, rtt_s, 100_000, rng) for g in range(11)]
    best = choose_gamma(accept, draft_s, verify_s, rtt_s, 10)
    # the simulation's best matches, up to Monte-Carlo noise (~0.3% at 1e5 rounds) where two gammas are close
    assert rates[best] >= max(rates) * 0.99
    assert best == int(np.argmax(rates)) or abs(rates[best] - max(rates)) < 0.01 * max(rates)
    # and the choice is not trivially flat: the worst gamma is clearly worse
    assert min(rates) < 0.9 * rates[best]


@pytest.mark.parametrize(("accept", "draft_s", "verify_s"), [
    ([0.8] * 16, 0.005, (0.03, 0.01)),
    ([0.7] * 16, 0.02, (0.02, 0.005)),
    ([0.95 - 0.05 * i for i in range(16)], 0.003, (0.015, 0.0)),
])
def test_best_gamma_grows_with_the_round_trip(accept, draft_s, verify_s):
    gammas = [choose_gamma(accept, draft_s, verify_s, rtt_s, 16) for rtt_s in RTTS]
    assert gammas == sorted(gammas)
    assert gammas[-1] > gammas[0]  # it does move


def test_gamma_extremes():
    # every draft accepted and drafting free: the longest block, on a flat and on a per-token verifier
    assert choose_gamma([1.0] * 8, 0.0, (0.02, 0.0), 0.0, 8) == 8
    assert choose_gamma([1.0] * 8, 0.0, (0.02, 0.01), 0.05, 8) == 8
    assert choose_gamma([0.999] * 8, 0.0, (0.02, 0.0), 0.05, 8) == 8
    # nothing is ever accepted: plain decoding, however long the round trip (ties -> the smaller gamma)
    for rtt_s in RTTS:
        assert choose_gamma([0.0] * 8, 0.0, (0.02, 0.0), rtt_s, 8) == 0
        assert choose_gamma([0.0] * 8, 0.01, (0.02, 0.005), rtt_s, 8) == 0
    assert choose_gamma([1.0] * 8, 0.0, (0.02, 0.0), 0.0, 3) == 3  # max_gamma caps it


class Process:
    """A lock-step session: Bernoulli(alpha) acceptance per position, fixed draft, verify and network times."""

    def __init__(self, alpha: float, draft_s: float, verify_s: tuple[float, float], rtt_s: float, seed: int = 0):
        self.alpha, self.draft_s, self.verify_s, self.rtt_s = alpha, draft_s, verify_s, rtt_s
        self.rng = random.Random(seed)

    def run(self, schedule: RttGamma, rounds: int) -> list[int]:
        used = []
        for _ in range(rounds):
            gamma = schedule.gamma
            used.append(gamma)
            accepted = 0
            while accepted < gamma and self.rng.random() < self.alpha:
                accepted += 1
            schedule.update(gamma, accepted, draft_s=gamma * self.draft_s,
                            service_s=self.verify_s[0] + gamma * self.verify_s[1], rtt_s=self.rtt_s)
        return used

    def best(self, max_gamma: int) -> int:
        return choose_gamma([self.alpha] * max_gamma, self.draft_s, self.verify_s, self.rtt_s, max_gamma)

    def efficiency(self, gamma: int) -> float:
        """True committed tokens/s at gamma, as a fraction of the best gamma's."""
        def rate(g: int) -> float:
            seconds = g * self.draft_s + self.verify_s[0] + g * self.verify_s[1] + self.rtt_s
            return expected_tokens([self.alpha] * g, g) / seconds
        return rate(gamma) / rate(self.best(gamma + 16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rtt_gamma_converges_and_follows_the_round_trip(seed):
    # near: the best gamma is 2 (3 within 0.4%, 0 at 72%); far: 5 (4 and 6 within 2%, 2 at 85%)
    process = Process(alpha=0.8, draft_s=0.005, verify_s=(0.03, 0.01), rtt_s=0.01, seed=seed)
    schedule = RttGamma(max_gamma=12)
    near = process.best(12)
    process.run(schedule, 200)
    used = process.run(schedule, 200)
    assert Counter(used).most_common(1)[0][0] in (near, near + 1)
    assert np.mean([process.efficiency(g) for g in used]) > 0.98
    assert min(process.efficiency(g) for g in used) > 0.9
    assert schedule.accept_rates()[:2] == pytest.approx([0.8] * 2, abs=0.1)  # the positions it keeps reaching
    assert schedule.verify_cost() == pytest.approx((0.03, 0.01), abs=1e-9)
    assert schedule.draft_s == pytest.approx(0.005)
    assert schedule.rtt_s == pytest.approx(0.01)

    process.rtt_s = 0.1  # the link gets slower mid-run
    far = process.best(12)
    assert far >= near + 3
    process.run(schedule, 100)
    used_far = process.run(schedule, 200)
    assert abs(Counter(used_far).most_common(1)[0][0] - far) <= 1
    assert np.mean([process.efficiency(g) for g in used_far]) > 0.97
    assert min(process.efficiency(g) for g in used_far) > 0.9
    assert np.median(used_far) >= np.median(used) + 2


def test_rtt_gamma_starts_sane_and_falls_to_plain_decoding_but_comes_back():
    process = Process(alpha=0.0, draft_s=0.005, verify_s=(0.03, 0.01), rtt_s=0.05)
    schedule = RttGamma(gamma=4, max_gamma=8, probe_every=10)
    used = process.run(schedule, 60)
    assert used[0] == 4
    tail = used[30:]
    assert tail.count(0) >= 0.8 * len(tail)  # plain decoding, mostly
    assert 1 in tail  # with a probe now and then
    process.alpha = 0.95  # the drafter is good again (the text turned predictable)
    used = process.run(schedule, 150)
    assert used[-1] >= 3


def test_rtt_gamma_respects_its_bounds():
    with pytest.raises(ValueError):
        RttGamma(gamma=5, max_gamma=4)
    schedule = RttGamma(gamma=4, max_gamma=16, min_gamma=1)
    schedule.max_gamma = 3  # the client lowers it to the verifier's limit
    for _ in range(20):  # nothing accepted: 0 were it not for min_gamma
        schedule.update(schedule.gamma, 0, draft_s=0.01 * schedule.gamma, service_s=0.03, rtt_s=0.2)
        assert 1 <= schedule.gamma <= 3
    assert len(schedule.accept_rates()) == 3
    schedule.update(0, 0, draft_s=0.0, service_s=0.03, rtt_s=0.2)  # nothing drafted (the request's last token)
    assert schedule.draft_s == pytest.approx(0.01)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rtt_gamma_ignores_the_draft_prefill_in_its_first_block(seed):
    # the real pair's first block took 1.3 s: the 0.5B draft's prefill of a PubMedQA abstract plus 3 tokens;
    # taken as 0.43 s per token, it made drafting look dearer than a 0.46 s verifier step and gamma fell to 0
    process = Process(alpha=0.7, draft_s=0.03, verify_s=(0.46, 0.013), rtt_s=0.05, seed=seed)
    schedule = RttGamma(gamma=3, max_gamma=8)
    schedule.update(3, 2, draft_s=1.3, service_s=0.5, rtt_s=0.05)
    assert schedule.draft_s is None and schedule.gamma == 3  # nothing known of the draft's speed yet
    used = process.run(schedule, 130)
    assert schedule.draft_s == pytest.approx(0.03)
    assert min(used) >= 2
    assert np.mean([process.efficiency(g) for g in used[:50]]) > 0.95
    assert np.mean([process.efficiency(g) for g in used[-50:]]) > 0.97


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rtt_gamma_recovers_from_a_bad_start(seed):
    # the real pair often rejects the first blocks of an answer, then accepts most of the rest: with a probe
    # only every 16 rounds the schedule sat at gamma 0 for 16 of a 32-token request's rounds (0.84x)
    process = Process(alpha=0.0, draft_s=0.1, verify_s=(0.46, 0.01), rtt_s=0.05, seed=seed)
    schedule = RttGamma(gamma=4, max_gamma=8)
    used = process.run(schedule, 2)
    process.alpha = 0.7
    used += process.run(schedule, 30)
    zeros = "".join("0" if g == 0 else "x" for g in used)
    assert "000" not in zeros  # probes at once, then after 2, 4, ... rounds
    assert np.mean([process.efficiency(g) for g in used[-10:]]) > 0.9  # gamma 0 would be 0.65


def test_a_shared_history_is_where_a_request_starts():
    history = new_history()
    for seed in range(3):  # earlier requests of the drafter in this process, ~80% accepted
        Process(alpha=0.8, draft_s=0.13, verify_s=(0.27, 0.015), rtt_s=0.001, seed=seed).run(RttGamma(history=history), 30)
    assert history.pooled() > 0.7
    started = RttGamma(history=history)
    assert started.accept_rates() == history.opening_rates()  # its opening: the earlier openings
    for _ in range(OPENING_ROUNDS):
        started.update(0, 0, draft_s=0.0, service_s=0.27, rtt_s=0.001)
    assert started.accept_rates()[0] > 0.7 and RttGamma().accept_rates()[0] == 0.5  # then the history's rate
    rejected = new_history()
    for _ in range(20):
        rejected.update(4, 0)
    assert RttGamma(history=rejected).accept_rates()[0] < 0.2
    shadowed = RttGamma(history=(seen := new_history()))
    shadowed.observe(3, 3)  # a shadow block (draft_worker/shadow.py) counts as well
    assert seen.pooled() > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_history_shortens_a_bad_start(seed):
    """The real pair's LM drafter on a CPU verifier: it pays above ~60% acceptance, is accepted ~80% of the time, and
    an answer's first two blocks are often rejected. From the 0.5 prior that start takes a request to gamma 0 for
    many of its rounds; from the drafter's history it is back sooner."""
    history = new_history()
    for earlier in range(3):
        Process(alpha=0.8, draft_s=0.13, verify_s=(0.27, 0.015), rtt_s=0.001, seed=100 + earlier).run(
            RttGamma(history=history), 30)

    def zeros(schedule: RttGamma) -> int:
        process = Process(alpha=0.0, draft_s=0.13, verify_s=(0.27, 0.015), rtt_s=0.001, seed=seed)
        used = process.run(schedule, 2)
        process.alpha = 0.8
        return (used + process.run(schedule, 20)).count(0)

    assert zeros(RttGamma(history=history)) < zeros(RttGamma())


def _openings_rejected_then_accepted(requests: int = 6):
    """A drafter's history: requests whose opening blocks were all rejected and whose later blocks were accepted 80%
    (an LM draft at 0.13 s a token against 0.3 s steps)."""
    history = new_history()
    for seed in range(requests):
        process = Process(alpha=0.0, draft_s=0.13, verify_s=(0.27, 0.015), rtt_s=0.001, seed=seed)
        schedule = RttGamma(history=history)
        schedule.decode_alone = True
        process.run(schedule, OPENING_ROUNDS)
        process.alpha = 0.8
        process.run(schedule, 20)
    return history


def test_an_answers_opening_is_priced_by_earlier_openings():
    """The real pair's LM drafter on a CPU verifier pays above ~60% acceptance. Its answers' first two blocks were
    rejected in 12 and 8 of 16 answers and the rest accepted ~80%: counted as the request's own acceptance, those
    two rejections took it to gamma 0 for 9-12 rounds. With the openings kept apart they take it nowhere."""
    history = _openings_rejected_then_accepted()  # earlier requests like that
    assert history.opening_rates()[0] < 0.3 and history.pooled() > 0.7
    schedule = RttGamma(history=history)
    schedule.decode_alone = True
    process = Process(alpha=0.0, draft_s=0.13, verify_s=(0.27, 0.015), rtt_s=0.001, seed=99)
    assert schedule.accept_rates()[0] < 0.3  # its opening: the earlier openings' rate
    assert schedule.draft_s == history.draft_s  # and the earlier requests' draft time
    process.run(schedule, 1)
    assert schedule.gamma <= 1  # so the opening's second block is chosen, not drafted at the first one's gamma
    process.run(schedule, OPENING_ROUNDS - 1)
    assert schedule.accept_rates()[0] > 0.7 and schedule.gamma >= 2  # then the rest's rate: drafting


def test_a_plain_decoding_choice_in_the_opening_stands_for_the_opening_alone():
    """Openings rejected, the rest accepted ~80%: a request that chooses gamma 0 in its opening asks the verifier to
    decode alone only to the opening's end, not to its next probe (10 rounds alone past the opening, measured)."""
    history = _openings_rejected_then_accepted()
    schedule = RttGamma(history=history)
    schedule.decode_alone = True
    Process(alpha=0.0, draft_s=0.13, verify_s=(0.27, 0.015), rtt_s=0.001, seed=99).run(schedule, 1)
    assert schedule.gamma == 0 and schedule.rounds_to_probe() == OPENING_ROUNDS - 1
    steady = RttGamma()  # no history, no opening: gamma 0 is held to the next probe as before
    steady.decode_alone = True
    for _ in range(12):
        steady.update(1, 0, draft_s=0.13, service_s=0.285, rtt_s=0.001)
    steady.update(0, 0, draft_s=0.0, service_s=0.27, rtt_s=0.001)
    assert steady.gamma == 0 and steady.rounds_to_probe() > OPENING_ROUNDS


def test_neighbouring_block_sizes_do_not_price_a_plain_step():
    """The real pair's verifier served blocks of 2 in 0.285 s and one of 3 in 0.334 s (an 8% outlier): a line through
    them priced a plain decoding step at 0.19 s, below every step seen; drafting looked hopeless and the session
    decoded alone for 19 rounds. Neighbouring sizes are priced flat, and only a measured plain step makes a drafter
    hopeless (which ends its probes)."""
    schedule = RttGamma()
    schedule.decode_alone = True
    for proposed, accepted, service_s in ((2, 0, 0.285), (2, 2, 0.285), (3, 2, 0.334)):
        schedule.update(proposed, accepted, draft_s=0.15 * proposed, service_s=service_s, rtt_s=0.002)
    assert schedule.verify_cost() == pytest.approx((0.3095, 0.0))
    assert schedule.gamma > 0
    schedule.update(5, 5, draft_s=0.75, service_s=0.36, rtt_s=0.002)  # a size further off: a slope
    assert schedule.verify_cost()[1] > 0.01

    slow = RttGamma()  # a drafter far too slow for its verifier: 1 s a token against 0.3 s steps
    slow.decode_alone = True
    for proposed in (2, 2, 4):
        slow.update(proposed, proposed, draft_s=1.0 * proposed, service_s=0.29 + 0.01 * proposed, rtt_s=0.002)
    assert slow.gamma == 0 and slow.rounds_to_probe() is not None  # extrapolated: it will look again
    slow.update(0, 0, draft_s=0.0, service_s=0.29, rtt_s=0.002)  # the verifier decoded alone: measured
    assert slow.gamma == 0 and slow.rounds_to_probe() is None


def test_schedules_of_one_draft_side_share_its_history():
    from draft_worker.service import gamma_schedule

    history = new_history()
    first, second = gamma_schedule("auto", history=history), gamma_schedule("rtt", history=history)
    for _ in range(3):
        first.observe(4, 4)
    assert second.accept_rates()[0] > 0.6 and gamma_schedule("auto").accept_rates()[0] == 0.5


def _replay_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "scripts" / "replay_gamma.py"
    spec = importlib.util.spec_from_file_location("replay_gamma", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_replay_prices_each_block_from_the_recorded_agreements():
    """scripts/replay_gamma.py (how the schedule's prior was chosen): a block of gamma from position t accepts the
    recorded run of agreements from t, cut to gamma; the n-gram offers its lookup; a request's seconds add up."""
    import argparse

    from draft_worker.gamma import FixedGamma
    from verifier_worker.budgeting import DraftBudgeter

    replay = _replay_script()
    row = {"prompt": [1, 2, 3], "answer": [7, 8, 9, 7, 8, 9, 5], "agree": [1, 1, 0, 1, 1, 1, 0]}
    assert [accepted for _, accepted in replay.blocks(row, "lm")] == [2, 1, 0, 3, 2, 1, 0]
    # the n-gram after "1 2 3 7 8 9 7": no earlier "8 9 7" or "9 7", the latest earlier "7" is followed by 8 9 7;
    # the answer goes on 8 9 5
    assert replay.blocks(row, "ngram")[4] == (3, 2)
    args = argparse.Namespace(draft_ms=100.0, step_ms=200.0, token_ms=10.0, prefill_s=1.0, rtt_ms=0.0,
                              max_new_tokens=7, drafter="lm", draft_step_ms=0.0, one_draft_core=False)
    budgeter = replay.unbudgeted(DraftBudgeter(max_gamma=16))
    # gamma 2 from t = 1: accepts 1 (commits 2), from t = 3: 2 (3), from t = 6: the last token, a block of 1 (1 + 0)
    seconds = replay.session(replay.blocks(row, "lm"), FixedGamma(2, 16), budgeter, "k", args)
    assert seconds == pytest.approx(1.0 + 2 * (0.2 + 0.2 + 0.03) + (0.1 + 0.2 + 0.02))


def test_the_replay_shares_each_step_between_the_sessions_open():
    """`--sessions 2`: two requests open together: one step prefills both, then every step carries both rows (one
    fixed cost, a token cost for every row's tokens) after the longer of the two clients' drafting, or with
    --one-draft-core (every client on one core, as measure_budget.py --pin) after their sum."""
    import argparse

    from draft_worker.gamma import FixedGamma
    from verifier_worker.budgeting import DraftBudgeter

    replay = _replay_script()
    row = {"prompt": [1, 2, 3], "answer": [7, 8, 9, 7, 8, 9, 5], "agree": [1, 1, 0, 1, 1, 1, 0]}
    offers = replay.blocks(row, "lm")
    for one_core, drafting in ((False, 0.2 + 0.2 + 0.1), (True, 0.4 + 0.4 + 0.2)):
        args = argparse.Namespace(draft_ms=100.0, step_ms=200.0, token_ms=10.0, prefill_s=1.0, rtt_ms=0.0,
                                  max_new_tokens=7, drafter="lm", draft_step_ms=0.0, one_draft_core=one_core)
        requests = [(offers, lambda: FixedGamma(2, 16), key, 3) for key in ("a", "b")]
        seconds = replay.shared(requests, replay.unbudgeted(DraftBudgeter(max_gamma=16)), args, sessions=2)
        # prefills 2 x 1 s; blocks of 2 from t = 1 and t = 3 (3 tokens a row), then a block of 1 (2 tokens a row)
        assert seconds == pytest.approx(2.0 + drafting + 2 * (0.2 + 0.06) + (0.2 + 0.04))
    args.one_draft_core = False
    alone = replay.session(offers, FixedGamma(2, 16), replay.unbudgeted(DraftBudgeter(max_gamma=16)), "c", args)
    requests = [(offers, lambda: FixedGamma(2, 16), key, 3) for key in ("a", "b", "c")]
    # two at a time: the third opens as the first two end, its prefill a step of its own, then it decodes alone
    assert replay.shared(requests, replay.unbudgeted(DraftBudgeter(max_gamma=16)), args, sessions=2) == \
        pytest.approx(2.0 + 0.5 + 2 * 0.26 + 0.24 + alone)


def test_an_async_chunk_spends_the_probe_standing():
    """A probe stands until a block goes out; async, that is the chunk drafted at it, whose tokens may never be
    verified (a commit contradicts its guess or passes it): left standing, a probe kept a slow LM drafting at every
    commit. After chunk_drafted the next update falls back to the gamma chosen, 0."""
    schedule = RttGamma(gamma=1, max_gamma=8)
    for _ in range(3):  # a draft as slow a token as the verifier's whole step, never accepted: gamma 0
        schedule.update(1, 0, draft_s=0.5, service_s=0.01, rtt_s=0.0)
    gammas = []
    for _ in range(6):
        schedule.update(0, 0, draft_s=0.0, service_s=0.01, rtt_s=0.0)  # commits verifying no draft
        gammas.append(schedule.gamma)
        if schedule.gamma:
            schedule.chunk_drafted()
            assert schedule.gamma == 0  # at once: the next chunk before the next commit is not drafted at the probe
    assert gammas[0] == 1 and gammas.count(1) <= 3  # probes after 1, 2, 4 rounds, each spent by its chunk
    assert 0 in gammas[1:]
    standing = RttGamma(gamma=1, max_gamma=8)  # the same without chunk_drafted: the probe stands while none verifies
    for _ in range(3):
        standing.update(1, 0, draft_s=0.5, service_s=0.01, rtt_s=0.0)
    for _ in range(6):
        standing.update(0, 0, draft_s=0.0, service_s=0.01, rtt_s=0.0)
    assert standing.gamma == 1


def test_an_async_chunks_drafting_time_is_the_least_a_draft_token_costs():
    """Async, a chunk's own drafting time prices a draft token when no verdict has (nor a history): a draft slower a
    token than the verifier's whole step falls to gamma 0 at the next commit, where without it the gamma stood at 4
    for want of a draft time. A verdict's price above it wins; a history's draft time below it (another load's) does
    not hide it."""
    def commits(schedule, n=3):
        for _ in range(n):  # commits verifying no draft
            schedule.update(0, 0, draft_s=0.0, service_s=0.005, rtt_s=0.0)

    unknown = RttGamma(gamma=4, max_gamma=8)
    commits(unknown)
    assert unknown.gamma == 4 and unknown.draft_s is None  # kept for want of a draft time
    slow = RttGamma(gamma=4, max_gamma=8)
    slow.drafted(0.020)  # 20 ms a token against 5 ms steps
    commits(slow)
    assert slow._draft_cost() == pytest.approx(0.020) and slow._chosen == 0
    slow.update(2, 2, draft_s=0.0, service_s=0.005, rtt_s=0.0)  # the first verified sample: the prefill's, skipped
    slow.update(2, 2, draft_s=0.080, service_s=0.005, rtt_s=0.0)  # 2 verified tokens for 80 ms of chunks
    assert slow._draft_cost() == pytest.approx(0.040)  # the verdicts' price, above the drafting time
    fast = RttGamma(gamma=4, max_gamma=8)
    fast.drafted(0.0001)  # an n-gram's lookup: drafting stays worth it
    commits(fast, 1)
    assert fast.gamma > 0
    history = new_history()
    history.draft_s = 0.001  # priced at another load, where chunks were verified
    stale = RttGamma(gamma=4, max_gamma=8, history=history)
    commits(stale, 1)
    assert stale.gamma > 0
    stale.drafted(0.020)
    commits(stale, 1)
    assert stale._chosen == 0 and history.draft_s == 0.001  # the history keeps its own price
    assert history.drafting_s == pytest.approx(0.020)  # and the drafting time, where its next request starts
    assert RttGamma(gamma=4, max_gamma=8, history=history)._draft_cost() == pytest.approx(0.020)


def test_a_request_that_opens_at_gamma_0_on_a_drafting_speed_still_probes():
    """An async request fell to 0 on its chunks' drafting speed, and its history recorded that opening: the next
    request opens at 0 and must still probe (its history holds that drafting speed, where the next one's starts).
    Without it, it kept gamma 0 for want of a draft time, never drafted, and so never measured one: 0 for good."""
    history = new_history()
    first = RttGamma(gamma=4, max_gamma=8, history=history)
    first.drafted(0.020)
    first.update(0, 0, draft_s=0.0, service_s=0.005, rtt_s=0.0)
    assert first.gamma == 0 and history.opening_gamma == 0 and history.drafting_s == pytest.approx(0.020)
    assert history.draft_s is None  # no verdict priced a draft
    second = RttGamma(gamma=4, max_gamma=8, history=history)
    gammas = []
    for _ in range(8):
        second.update(0, 0, draft_s=0.0, service_s=0.005, rtt_s=0.0)
        gammas.append(second.gamma)
    assert second._chosen == 0 and 1 in gammas  # it still chooses 0, and probes 1


def test_a_request_drafts_its_first_block_at_the_gamma_the_last_opening_chose():
    """With a history, a new request's first block (drafted while the verifier prefills, before any verdict) takes
    the gamma its drafter's latest request chose at its first round; without one, or before any, its own start."""
    history = new_history()
    assert RttGamma(history=history).gamma == 4
    for request in range(3):
        schedule = RttGamma(history=history, max_gamma=8)
        assert schedule.gamma == (4 if request < 2 else 0)
        for _ in range(3):  # a draft as slow a token as the verifier's whole step, never accepted: gamma 0
            schedule.update(1, 0, draft_s=0.5, service_s=0.01, rtt_s=0.0)
        # the first request's first round had no draft time to choose by (its draft's prefill): it kept its gamma
        assert history.opening_gamma == (None if request == 0 else 0)
    quick = new_history()
    quick.draft_s = 0.0001  # its earlier requests' draft time
    RttGamma(gamma=1, history=quick, max_gamma=8).update(1, 1, draft_s=0.0001, service_s=0.01, rtt_s=0.0)
    assert quick.opening_gamma > 1  # a free draft accepted whole: a longer block; within a lower limit, that limit
    assert RttGamma(history=quick).gamma == quick.opening_gamma and RttGamma(1, 2, history=quick).gamma == 2
    assert RttGamma(max_gamma=8).gamma == 4


def test_a_request_at_gamma_0_probes_where_its_drafters_last_one_had_backed_off_to():
    """A drafter that does not pay: its requests open at 0, and each probed after 1, 2, 4, 8 rounds anew (an LM's first
    probe in an answer costs its prefill of the prompt). The next request probes where the last one, still at 0, had
    backed off to; after a request that drafted, from 1 again."""
    def commits(schedule, n):
        gammas = []
        for _ in range(n):
            schedule.update(0, 0, draft_s=0.0, service_s=0.005, rtt_s=0.0)
            gammas.append(schedule.gamma)
            schedule.chunk_drafted()  # async: the probe's chunk spends it
        return gammas

    history = new_history()
    first = RttGamma(gamma=4, max_gamma=8, history=history, probe_every=16)
    first.drafted(0.020)  # too slow to pay against 5 ms steps
    commits(first, 40)
    assert history.opening_gamma == 0 and history.probe_interval == 16
    second = RttGamma(gamma=4, max_gamma=8, history=history, probe_every=16)
    gammas = commits(second, 20)
    assert gammas[:16] == [0] * 16 and 1 in gammas[16:]  # not at the 2nd, 5th, 10th commits
    history.probe_interval = None  # as a request that drafted leaves it
    third = RttGamma(gamma=4, max_gamma=8, history=history, probe_every=16)
    assert 1 in commits(third, 3)
