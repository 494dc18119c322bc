"""The sampling math on hand-built tensors: logits -> probs, greedy and exact speculative verification.

The convergence tests follow vLLM's tests/v1/sample/test_rejection_sampler.py: whatever the draft
distribution q, the tokens speculative sampling commits must be distributed as the target p. They use a
chi-square test (p-value from torch.special.gammaincc, so no scipy), and show that the same check
rejects deliberately wrong samplers, so it can fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import SamplingParams
from specdec.sampling import logits_to_probs, make_generator, sample, verify_block, verify_greedy, verify_sampling
from tests.stubs import chi_square_p_value

MIN_P_VALUE = 1e-4  # the seeded tests are deterministic; this only sets how far off a sampler may be


def first_token_counts(verify, p: torch.Tensor, q: torch.Tensor, trials: int, seed: int) -> torch.Tensor:
    """Counts [vocab] of the first committed token: the draft x ~ q[0] if accepted, else the recovered token."""
    generator = make_generator(seed)
    gamma, vocab = q.shape
    draft = sample(q.expand(trials, gamma, vocab).contiguous(), generator)  # [trials, gamma]
    counts = torch.zeros(vocab, dtype=torch.long)
    for draft_ids in draft:  # [gamma]
        num_accepted, next_token = verify(draft_ids, q, p, generator)
        counts[int(draft_ids[0]) if num_accepted > 0 else next_token] += 1
    return counts


# target p and draft q, [vocab] each; the first case has q = 0 where p > 0 and p = 0 where q > 0
CASES = {
    "disjoint-zeros": ([0.35, 0.05, 0.25, 0.10, 0.25, 0.00], [0.00, 0.40, 0.05, 0.30, 0.05, 0.20]),
    "p-on-one-token-q-never-drafts": ([0.0, 0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]),
    "random": tuple(torch.softmax(torch.randn(2, 7, generator=torch.Generator().manual_seed(3)) * 2, -1).tolist()),
}


# ---------------------------------------------------------------------------------------------- logits_to_probs
def test_temperature_scales_logits():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) * 3  # [3, vocab]
    for temperature in (0.3, 1.0, 2.5):
        probs = logits_to_probs(logits, SamplingParams(temperature=temperature))
        torch.testing.assert_close(probs, torch.softmax(logits / temperature, dim=-1))
        assert probs.dtype == torch.float32


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))  # distinct values: no ties
    for k in (1, 3, 19):
        probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=k))
        assert ((probs > 0).sum(dim=-1) == k).all()
        top = logits.topk(k, dim=-1).indices  # [4, k]
        assert (probs.gather(-1, top) > 0).all()
        expected = torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top)).softmax(-1)
        torch.testing.assert_close(probs, expected)
    # k >= vocab is a no-op
    torch.testing.assert_close(logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=50)), logits.softmax(-1))


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.05, [0.5]),  # the top-1 is always kept, even when it alone exceeds top_p
        (0.5, [0.5]),  # 0.5 already reaches 0.5
        (0.7, [0.5, 0.3]),  # 0.5 < 0.7, 0.5 + 0.3 reaches it
        (0.85, [0.5, 0.3, 0.15]),
        (0.99, [0.5, 0.3, 0.15, 0.05]),
        (1.0, [0.5, 0.3, 0.15, 0.05]),  # off
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    order = [2, 0, 3, 1]  # token ids of the probabilities 0.5, 0.3, 0.15, 0.05: not sorted by id
    probs = torch.zeros(4)
    probs[order] = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = logits_to_probs(probs.log()[None], SamplingParams(temperature=1.0, top_p=top_p))[0]
    expected = torch.zeros(4)
    expected[order[: len(kept)]] = torch.tensor(kept) / sum(kept)
    torch.testing.assert_close(out, expected)


def test_top_k_then_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()[None]  # [1, 4]
    # top-p alone: 0.4 + 0.3 = 0.7 < 0.75, so three tokens survive
    assert int((logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.75)) > 0).sum()) == 3
    # top-k = 3 first renormalises to 4/9, 3/9, 2/9: 7/9 >= 0.75 already, so only two survive
    both = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.75))[0]
    torch.testing.assert_close(both, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_rows_sum_to_one():
    logits = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(2)) * 4  # [..., vocab]
    for params in (
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.5, top_k=7, top_p=0.9),
    ):
        probs = logits_to_probs(logits, params)
        assert probs.shape == logits.shape and (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))


# ------------------------------------------------------------------------------------------------ verify_greedy
def argmax_logits(token_ids: list[int], vocab: int = 8) -> torch.Tensor:
    """Logits [len, vocab] whose row i has its argmax at token_ids[i]."""
    logits = torch.randn(len(token_ids), vocab, generator=torch.Generator().manual_seed(len(token_ids)))
    logits[torch.arange(len(token_ids)), token_ids] = 10.0
    return logits


@pytest.mark.parametrize(
    "draft, target, expected",
    [
        ([1, 2, 3], [1, 2, 3, 4], (3, 4)),  # all accepted: bonus = argmax of the last row
        ([5, 2, 3], [1, 2, 3, 4], (0, 1)),  # first rejected: recovered = argmax of row 0
        ([1, 2, 6, 4], [1, 2, 3, 4, 5], (2, 3)),  # mismatch in the middle; the later match does not count
        ([], [7], (0, 7)),  # gamma = 0: a plain decoding step
    ],
)
def test_verify_greedy(draft, target, expected):
    draft_ids, logits = torch.tensor(draft, dtype=torch.long), argmax_logits(target)
    assert verify_greedy(draft_ids, logits) == expected
    assert verify_block(draft_ids, None, logits, SamplingParams(), make_generator(0)) == expected  # temperature 0


# ---------------------------------------------------------------------------------------------- verify_sampling
def test_draft_token_with_zero_draft_prob_is_never_accepted():
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0]])  # the draft could not have sampled token 0 or 3
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    generator = make_generator(0)
    for _ in range(200):
        for token in (0, 3):  # p(x) > 0 = q(x)
            num_accepted, recovered = verify_sampling(torch.tensor([token]), q, p, generator)
            assert num_accepted == 0 and recovered in (0, 3)  # drawn from max(0, p - q): tokens 0 and 3
    # 0/0: neither model gives the token any mass
    num_accepted, recovered = verify_sampling(torch.tensor([0]), q, torch.tensor([[0.0, 0.0, 1.0, 0.0]] * 2), generator)
    assert (num_accepted, recovered) == (0, 2)


def test_equal_distributions_always_accept_and_bonus_follows_last_row():
    generator = make_generator(1)
    p = torch.softmax(torch.randn(5, 10, generator=generator) * 2, -1)  # [gamma + 1, vocab]
    q = p[:4].clone()  # [gamma, vocab]
    bonus = torch.zeros(10, dtype=torch.long)
    for _ in range(3000):
        draft = sample(q, generator)  # [gamma]
        num_accepted, next_token = verify_sampling(draft, q, p, generator)
        assert num_accepted == 4
        bonus[next_token] += 1
    assert chi_square_p_value(bonus, p[4]) > MIN_P_VALUE


def test_seeded_verification_is_reproducible():
    p = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(4)), -1)
    q = torch.softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(5)), -1)

    def run(seed):
        generator = make_generator(seed)
        return [verify_sampling(sample(q, generator), q, p, generator) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sampling_step_without_a_draft():
    """gamma = 0 under sampling (verifier-only Generate, an n-gram miss): one token drawn from p, no q."""
    p = torch.tensor([0.2, 0.3, 0.5, 0.0])  # [vocab]
    logits = p.log()[None]  # [1, vocab]: softmax at temperature 1 gives p back
    params = SamplingParams(temperature=1.0, seed=0)
    generator = make_generator(0)
    counts = torch.zeros(4, dtype=torch.long)
    for _ in range(3000):
        num_accepted, token = verify_block(torch.tensor([], dtype=torch.long), None, logits, params, generator)
        assert num_accepted == 0
        counts[token] += 1
    assert counts[3] == 0 and chi_square_p_value(counts, p) > MIN_P_VALUE


# ----------------------------------------------------------------------------------------- convergence to p
@pytest.mark.parametrize("case", ["disjoint-zeros", pytest.param("p-on-one-token-q-never-drafts", marks=pytest.mark.slow),
                                  pytest.param("random", marks=pytest.mark.slow)])
def test_first_committed_token_is_distributed_as_target(case):
    p_row, q_row = (torch.tensor(row) for row in CASES[case])
    p = torch.stack([p_row, torch.full_like(p_row, 1 / len(p_row))])  # [gamma + 1 = 2, vocab]; row 1: bonus
    counts = first_token_counts(verify_sampling, p, q_row[None], trials=20_000, seed=10)
    assert chi_square_p_value(counts, p_row) > MIN_P_VALUE, counts
    tv = 0.5 * (counts / counts.sum() - p_row).abs().sum()
    assert tv < 0.015, tv


def accept_everything(draft_ids, q, p, generator):
    return len(draft_ids), int(sample(p[len(draft_ids)], generator))


def recover_from_target(draft_ids, q, p, generator):
    """Right acceptance, wrong recovery: draws from p instead of max(0, p - q) after a rejection."""
    num_accepted, _ = verify_sampling(draft_ids, q, p, generator)
    return num_accepted, int(sample(p[num_accepted], generator))


@pytest.mark.parametrize("wrong", [accept_everything, pytest.param(recover_from_target, marks=pytest.mark.slow)])
def test_convergence_check_catches_a_wrong_sampler(wrong):
    p_row, q_row = (torch.tensor(row) for row in CASES["random"])
    p = torch.stack([p_row, p_row])
    counts = first_token_counts(wrong, p, q_row[None], trials=20_000, seed=10)
    assert chi_square_p_value(counts, p_row) < MIN_P_VALUE


@pytest.mark.slow
def test_every_position_of_a_generation_is_distributed_as_target():
    """gamma = 3 blocks over a target whose distribution depends on the absolute position t only:
    generating 5 tokens by rounds (draft 3 from q_t, verify, commit, repeat), token t must follow p_t.
    Positions 1-4 mix accepted, recovered and bonus tokens from different rounds."""
    gamma, length, vocab, trials = 3, 5, 6, 10_000
    g = torch.Generator().manual_seed(11)
    p_table = torch.softmax(torch.randn(length + gamma, vocab, generator=g) * 1.5, -1)  # [position, vocab]
    q_table = torch.softmax(torch.randn(length + gamma, vocab, generator=g) * 1.5, -1)
    q_table[:, 0] = 0.0  # the draft never proposes token 0, which the target likes at some positions
    q_table /= q_table.sum(-1, keepdim=True)
    generator = make_generator(12)
    counts = torch.zeros(length, vocab, dtype=torch.long)
    for _ in range(trials):
        tokens: list[int] = []
        for _round in range(length):  # each round commits >= 1 token
            t = len(tokens)
            q = q_table[t : t + gamma]  # [gamma, vocab]
            draft = sample(q, generator)  # [gamma]
            num_accepted, next_token = verify_sampling(draft, q, p_table[t : t + gamma + 1], generator)
            tokens += [*draft[:num_accepted].tolist(), next_token]
            if len(tokens) >= length:
                break
        counts[torch.arange(length), torch.tensor(tokens[:length])] += 1
    for t in range(length):
        assert chi_square_p_value(counts[t], p_table[t]) > MIN_P_VALUE, (t, counts[t])


# ------------------------------------------------------------------------------------------------- verify_block
def leviathan_outcomes(draft: list[int], q: list[list[float]], p: list[list[float]]) -> dict[tuple[int, int], float]:
    """The exact law of (num_accepted, next_token) for a fixed draft, in plain Python from Leviathan et al.'s
    Algorithm 1: x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), in order; the first rejection,
    at i, draws from norm(max(0, p_i - q_i)); after gamma accepts the bonus is drawn from p_gamma."""
    law: dict[tuple[int, int], float] = {}
    reach = 1.0  # P(x_0 .. x_{i-1} all accepted)
    for i, x in enumerate(draft):
        accept = min(1.0, p[i][x] / q[i][x]) if q[i][x] > 0 else 0.0
        residual = [max(0.0, p_v - q_v) for p_v, q_v in zip(p[i], q[i])]
        for token, weight in enumerate(residual):
            if weight > 0 and accept < 1:
                law[(i, token)] = reach * (1 - accept) * weight / sum(residual)
        reach *= accept
    for token, p_v in enumerate(p[len(draft)]):
        if p_v > 0:
            law[(len(draft), token)] = reach * p_v
    return law


def truncated(full: list[float], keep: int) -> list[float]:
    """full renormalised over its `keep` largest entries: what top-k/top-p must leave when they cut there."""
    kept = sorted(range(len(full)), key=lambda i: -full[i])[:keep]
    return [v / sum(full[i] for i in kept) if i in kept else 0.0 for i, v in enumerate(full)]


# Each case: params, target rows before the params' truncation [gamma + 1][vocab], the truncated target p
# they must give (known by construction), draft rows q [gamma][vocab], and a fixed draft. The target logits
# are temperature * log(row), so logits_to_probs at that temperature gives the row back before any cut.
FULL = [0.05, 0.40, 0.01, 0.30, 0.20, 0.03, 0.006, 0.004]  # top-4 sums to 0.95, top-3 to 0.90
VERIFY_BLOCK_CASES = {
    # accept x_0 = 1 with 0.2 / 0.5, then x_1 = 0 always (p > q); q = 0 on token 3, where p is 0.3
    "t=1": (SamplingParams(temperature=1.0),
            [[0.1, 0.2, 0.4, 0.3], [0.6, 0.1, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], None,
            [[0.3, 0.5, 0.2, 0.0], [0.3, 0.3, 0.2, 0.2]], [1, 0]),
    "t=0.6": (SamplingParams(temperature=0.6),
              [[0.5, 0.1, 0.1, 0.3], [0.05, 0.05, 0.1, 0.8], [0.7, 0.1, 0.1, 0.1]], None,
              [[0.2, 0.2, 0.2, 0.4], [0.1, 0.6, 0.2, 0.1]], [3, 1]),
    # top-k = 4 keeps 0.40/0.30/0.20/0.05 (/0.95); top-p = 0.9 then drops 0.05, whose mass above is 0.947
    "top-k=4,top-p=0.9": (SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
                          [FULL, FULL[::-1]], [truncated(FULL, 3), truncated(FULL[::-1], 3)],
                          [[0.0, 0.3, 0.0, 0.1, 0.5, 0.1, 0.0, 0.0]], [4]),
}


@pytest.mark.parametrize("case", VERIFY_BLOCK_CASES)
def test_verify_block_follows_leviathans_rule(case):
    """verify_block (what the verifier runs) on hand-built logits against the exact law of the plain-Python
    reference above: the acceptance rates, the recovered tokens and the bonus token all at once."""
    params, rows, p_expected, q_rows, draft = VERIFY_BLOCK_CASES[case]
    p_expected = p_expected or rows
    target_logits = params.temperature * torch.tensor(rows).log()  # [gamma + 1, vocab]
    q, draft_ids = torch.tensor(q_rows), torch.tensor(draft)  # [gamma, vocab], [gamma]
    torch.testing.assert_close(logits_to_probs(target_logits, params), torch.tensor(p_expected))
    vocab, trials = len(rows[0]), 4_000
    law = torch.zeros(len(rows), vocab, dtype=torch.float64)  # [gamma + 1, vocab]
    for (num_accepted, token), probability in leviathan_outcomes(draft, q_rows, p_expected).items():
        law[num_accepted, token] = probability
    assert float(law.sum()) == pytest.approx(1.0)
    generator = make_generator(16)
    counts = torch.zeros(len(rows), vocab, dtype=torch.long)
    for _ in range(trials):
        num_accepted, next_token = verify_block(draft_ids, q, target_logits, params, generator)
        counts[num_accepted, next_token] += 1
    assert chi_square_p_value(counts.flatten(), law.flatten()) > MIN_P_VALUE, (counts, law)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=4, top_p=0.9),  # sparse on the wire
                                    SamplingParams(temperature=1.2)])  # full vocabulary: dense fp16 on the wire
def test_workers_pipeline_converges_to_target(params):
    """As the workers do it: the draft samples from the wire-rounded q, which travels through the codec; the
    verifier decodes it and runs verify_block on its own logits. The first committed token must follow the
    target p, known by construction (temperature * log of a fixed distribution, cut as top-k/top-p must)."""
    vocab, trials = 8, 6_000
    g = torch.Generator().manual_seed(13)
    full = torch.tensor([FULL, FULL[::-1]])  # [gamma + 1, vocab]
    target_logits = params.temperature * full.log()
    p = torch.tensor(truncated(FULL, 3)) if params.truncated else full[0]  # [vocab]
    draft_logits = torch.randn(1, vocab, generator=g) * 2  # [gamma, vocab]
    q_wire = codec.wire_round(logits_to_probs(draft_logits, params), params)  # [gamma, vocab]
    proposal = pb.Proposal(draft_ids=[0], **codec.encode_probs(q_wire, params))
    assert proposal.WhichOneof("probs") == ("sparse" if params.truncated else "dense")
    q = codec.decode_probs(pb.Proposal.FromString(proposal.SerializeToString()), params, vocab)
    if params.truncated:
        assert not torch.equal(p > 0, q[0] > 0)  # the supports really differ
    generator = make_generator(14)
    draft = sample(q_wire.expand(trials, 1, vocab).contiguous(), generator)  # [trials, gamma]
    counts = torch.zeros(vocab, dtype=torch.long)
    for x in draft:  # [gamma]
        num_accepted, next_token = verify_block(x, q, target_logits, params, generator)
        counts[int(x[0]) if num_accepted else next_token] += 1
    assert chi_square_p_value(counts, p) > MIN_P_VALUE, counts


# ------------------------------------------------------------------------------------------------------ sample
def test_sample_converges_to_probs():
    probs = torch.tensor([0.1, 0.0, 0.45, 0.3, 0.15])
    generator = make_generator(15)
    draws = sample(probs.expand(50_000, 5).contiguous(), generator)  # [draws]
    counts = torch.bincount(draws, minlength=5)
    assert counts[1] == 0
    assert chi_square_p_value(counts, probs) > MIN_P_VALUE
    # scale-invariant: unnormalised weights (the wire-rounded q) give the same distribution
    counts = torch.bincount(sample((probs * 3.7).expand(50_000, 5).contiguous(), generator), minlength=5)
    assert chi_square_p_value(counts, probs) > MIN_P_VALUE
    # and the check has teeth
    assert chi_square_p_value(counts, torch.tensor([0.12, 0.0, 0.43, 0.3, 0.15])) < MIN_P_VALUE


def test_chi_square_p_value_helper():
    # gammaincc(dof / 2, x / 2) is the chi-square survival function: 9.4877 is the 0.95 quantile for 4 dof
    assert math.isclose(float(torch.special.gammaincc(torch.tensor(2.0), torch.tensor(9.4877 / 2))), 0.05, rel_tol=1e-3)
    probs = torch.full((5,), 0.2)
    assert chi_square_p_value(torch.full((5,), 100), probs) == pytest.approx(1.0)  # a perfect fit
    assert chi_square_p_value(torch.tensor([140, 90, 90, 90, 90]), probs) < 0.01
    assert chi_square_p_value(torch.tensor([100, 100, 100, 100, 100, 1]), torch.tensor([0.2] * 5 + [0.0])) == 0.0
