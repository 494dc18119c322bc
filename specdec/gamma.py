"""The RTT-aware choice of gamma for lock-step speculative decoding: pure math, no state, no network.

One lock-step round drafts gamma tokens (gamma * draft_s), sends them, and waits for the verdict: the
verifier's service time for the block plus the network round trip. It commits the accepted prefix of the
block and one more token (recovered on a rejection, bonus after a full accept). The best gamma maximises
expected committed tokens per second of a round; a longer round trip makes every round dearer, so the
best gamma grows with the delay (delay-adaptive speculation, arXiv 2606.20591). gamma = 0 is a plain
decoding round: one token per verify + round trip, unless the verifier decodes on its own while the client
does not draft (lock-step with server_decodes, `decode_alone`): then one token per verifier step, no round trip,
and a block must beat that. `draft_worker.gamma.RttGamma` estimates the inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

# (fixed_s, per_token_s): the verifier serves a block of gamma draft tokens in fixed_s + gamma * per_token_s
VerifyCost = tuple[float, float]


def verify_seconds(verify_s: VerifyCost, gamma: int) -> float:
    """The verifier's service time of a block of gamma draft tokens (gamma = 0: one plain decoding step).

    A CPU verifier's cost grows with the tokens it scores (per_token_s ~ a step); a GPU's is nearly flat.
    """
    fixed_s, per_token_s = verify_s
    return fixed_s + gamma * per_token_s


def expected_tokens_table(accept: Sequence[float], max_gamma: int) -> list[float]:
    """[max_gamma + 1] expected committed tokens of a block of gamma = 0..max_gamma draft tokens.

    accept[i] = P(draft position i+1 accepted | positions 1..i accepted); needs len(accept) >= max_gamma.
    E(gamma) = 1 + sum_{i=1..gamma} prod_{j<=i} accept[j-1] (the recovered/bonus token included); for a
    constant alpha, (1 - alpha^(gamma+1)) / (1 - alpha). Its steps E(gamma+1) - E(gamma) = P(positions
    1..gamma+1 all accepted) never grow with gamma: each draft token buys at most what the one before did.
    """
    if not 0 <= max_gamma <= len(accept):
        raise ValueError(f"gamma must be in [0, {len(accept)}] (the positions with an acceptance rate), got {max_gamma}")
    table, reach = [1.0], 1.0  # reach = P(positions 1..i all accepted)
    for alpha in accept[:max_gamma]:
        reach *= alpha
        table.append(table[-1] + reach)
    return table


def expected_tokens(accept: Sequence[float], gamma: int) -> float:
    """Expected committed tokens of one block of gamma draft tokens, the recovered/bonus token included
    (see `expected_tokens_table`)."""
    return expected_tokens_table(accept, gamma)[gamma]


def choose_gamma(accept: Sequence[float], draft_s: float, verify_s: VerifyCost, rtt_s: float, max_gamma: int,
                 decode_alone: bool = False) -> int:
    """The gamma in [0, max_gamma] maximising expected_tokens(gamma) / (gamma*draft_s + verify_s(gamma) + rtt_s).

    draft_s: seconds per draft token; verify_s: (fixed_s, per_token_s) of the verifier's service time;
    rtt_s: the network round trip, service excluded. accept: as in `expected_tokens`, at least max_gamma
    positions. decode_alone: gamma 0 means the verifier decodes on its own, so it pays no round trip. Ties go
    to the smaller gamma (less work for the same rate).
    """
    if not 0 <= max_gamma <= len(accept):
        raise ValueError(f"max_gamma must be in [0, {len(accept)}] (the positions with an acceptance rate), "
                         f"got {max_gamma}")
    best_gamma, best_rate = 0, 0.0
    for gamma, expected in enumerate(expected_tokens_table(accept, max_gamma)):
        link_s = 0.0 if decode_alone and gamma == 0 else rtt_s
        seconds = max(gamma * draft_s + verify_seconds(verify_s, gamma) + link_s, 1e-12)  # [s] of one round
        rate = expected / seconds  # committed tokens per second
        if rate > best_rate * (1 + 1e-12):
            best_gamma, best_rate = gamma, rate
    return best_gamma


def budgeted_gamma(budget: int, accept: Sequence[float], draft_s: float, verify_s: VerifyCost, rtt_s: float,
                   max_gamma: int) -> int:
    """The client's side of `--gamma auto`: the smaller of the verifier's budget and the client's own best
    gamma from its draft seconds per token, acceptance, the verifier's service time and the round trip
    (`specdec.gamma.choose_gamma`, what `draft_worker.gamma.RttGamma` estimates). The client's rate is
    single-peaked in gamma (concave tokens over affine seconds), so its best gamma within [0, budget] is
    min(budget, its best gamma); a draft too slow for its verifier gets 0 whatever the budget.
    """
    return choose_gamma(accept, draft_s, verify_s, rtt_s, max(0, min(budget, max_gamma)))


def promised_tokens(accept: Sequence[float], gamma: int) -> float:
    """Accepted draft tokens a block of `gamma` is expected to buy at these rates: E(gamma) - 1 (none: 0)."""
    return expected_tokens_table(accept, gamma)[gamma] - 1 if gamma else 0.0


def first_scaled(accept: list[float], scale: float) -> list[float]:
    """accept with its first position's rate times `scale`: every block's expected accepted tokens times `scale`."""
    return [accept[0] * scale, *accept[1:]] if accept else accept
