"""The sampling math both workers share: logits -> probs, and greedy / exact speculative verification.

Plain tensors in, plain tensors out; knows nothing about models, tokenizers or the wire. The draft and
the verifier MUST turn logits into probabilities with the same `logits_to_probs`, or the output is no
longer the verifier's distribution. Notation follows Leviathan et al. 2023: p is the target (verifier)
distribution, q the draft distribution, gamma the number of draft tokens in a block.

Two forms of verification: the one-row `verify_block` (`verify_greedy`, `verify_sampling`), the readable
reference, and `verify_batch`, which verifies every block of an engine step in one call over flattened
ragged rows (vLLM's rejection_sampler layout) without a host sync per row. For the same generators the two
give the same result: each row draws from its own generator exactly what the reference draws, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch

from specdec.config import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one session; seeded ones make a session reproducible."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order HF uses). logits: [..., vocab] -> probs [..., vocab] fp32."""
    assert not params.greedy, "greedy decoding works on logits (argmax), not probabilities"
    flat = logits.reshape(-1, logits.shape[-1])  # [n, vocab]
    return probs_per_row(flat, [params] * flat.shape[0]).reshape(logits.shape)


def probs_per_row(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """`logits_to_probs` with each row's own params: logits [n, vocab], params [n] (none greedy) -> probs [n, vocab]
    fp32. Every operation is row-wise, so a row gives the same probabilities alone or in a batch."""
    n, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)  # [n]
    logits = logits.float() / temperature[:, None]  # [n, vocab]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # 0 = off
    if any(top_k):
        k = torch.tensor(top_k, device=device)[:, None]  # [n, 1]
        top = torch.topk(logits, max(top_k), dim=-1).values  # [n, k_max], descending
        kth = top.gather(-1, (k - 1).clamp(min=0)).masked_fill(k == 0, float("-inf"))  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = [p.top_p if 0.0 < p.top_p < 1.0 else float("inf") for p in params]  # inf = off
    if any(p < 1.0 for p in top_p):
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True, stable=True)  # [n, vocab]
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top-1 is always kept)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [n, vocab]
        threshold = torch.tensor(top_p, device=device)[:, None]  # [n, 1]
        sorted_logits = sorted_logits.masked_fill(mass_above >= threshold, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
    return logits.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of probs [..., vocab] -> [...] (exponential race: no host sync, as in gpt-fast).
    The weights need not be normalised: token i wins with probability probs_i / sum(probs)."""
    race = torch.empty_like(probs).exponential_(1, generator=generator)  # [..., vocab]
    return torch.argmax(probs / race, dim=-1)


def verify_greedy(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Accept the longest prefix of draft_ids that matches the verifier's argmax.

    draft_ids: [gamma]; target_logits: [gamma + 1, vocab], row i scores the token after draft position i - 1.
    Returns (num_accepted, next_token): the recovered token after a mismatch, or the bonus token.
    """
    gamma = draft_ids.shape[0]
    target_ids = target_logits.argmax(dim=-1)  # [gamma + 1]
    matches = (draft_ids == target_ids[:gamma]).int()  # [gamma]
    num_accepted = int(matches.cumprod(dim=0).sum()) if gamma else 0
    return num_accepted, int(target_ids[num_accepted])


def verify_sampling(
    draft_ids: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator: torch.Generator
) -> tuple[int, int]:
    """Exact speculative sampling: accept x_i with min(1, p(x_i)/q(x_i)), in order.

    draft_ids: [gamma]; q: draft probs [gamma, vocab]; p: target probs [gamma + 1, vocab].
    On the first rejection the recovered token is drawn from normalize(max(0, p - q)); after a fully
    accepted block the bonus token is drawn from p[gamma]. A token with q(x) = 0 is never accepted
    (the draft could not have sampled it), so there is no division by zero. Random draws, always the
    same whatever the outcome: gamma uniforms, then one exponential race over the vocabulary.
    """
    gamma = draft_ids.shape[0]
    positions = torch.arange(gamma, device=p.device)
    q_x = q[positions, draft_ids]  # [gamma]
    p_x = p[positions, draft_ids]  # [gamma]
    r = torch.rand(gamma, generator=generator, device=p.device)  # [gamma]
    accepted = (q_x > 0) & (r * q_x < p_x)  # r < p/q without dividing
    num_accepted = int(accepted.int().cumprod(dim=0).sum()) if gamma else 0
    if num_accepted == gamma:
        return gamma, int(sample(p[gamma], generator))
    residual = (p[num_accepted] - q[num_accepted]).clamp(min=0)  # [vocab], sampled unnormalised
    # p <= q everywhere only when p == q up to rounding, where a rejection is vanishingly rare: fall back to p
    recovered_probs = residual if bool((residual > 0).any()) else p[num_accepted]
    return num_accepted, int(sample(recovered_probs, generator))


def verify_block(
    draft_ids: torch.Tensor,
    q: torch.Tensor | None,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Verify one block (gamma may be 0: a plain decoding step). Greedy when temperature is 0."""
    if params.greedy:
        return verify_greedy(draft_ids, target_logits)
    p = logits_to_probs(target_logits, params)  # [gamma + 1, vocab]
    if q is None:  # a plain decoding step (gamma = 0) carries no draft probabilities
        assert draft_ids.shape[0] == 0, "sampling needs the draft probabilities"
        q = p[:0]  # [0, vocab]
    return verify_sampling(draft_ids, q, p, generator)


CPU_GROUP_BYTES = 4 << 20  # on a CPU, sampling rows go a few at a time: [tokens, vocab] fp32 stays in cache


def verify_batch(
    draft_ids: torch.Tensor,
    num_draft_tokens: Sequence[int],
    target_logits: torch.Tensor,
    q: Sequence[torch.Tensor | None],
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify_block` for B rows at once, greedy and sampling mixed, each row with its own params and generator.

    draft_ids: [num_draft], every row's draft tokens flattened; num_draft_tokens: gamma_b per row [B] (host ints,
    0 allowed); target_logits: [num_draft + B, vocab], row b's gamma_b + 1 scored positions flattened in row
    order; q: per row its draft probs [gamma_b, vocab], or None (greedy rows, and sampling rows with gamma_b = 0);
    generators: per row, used by sampling rows only. -> (num_accepted [B], next_token [B]), long, on the
    logits' device, with no host sync: the caller reads them once for the whole batch.

    Consecutive rows of one kind (greedy or sampling) are verified together, as slices of the flat tensors
    (no copy); on a CPU, sampling rows in groups of about CPU_GROUP_BYTES of target probabilities, so the
    group's [tokens, vocab] passes (softmax, residual, race) run in cache rather than over the whole step's.
    """
    gammas, device = list(num_draft_tokens), target_logits.device
    starts = [0, *accumulate(gammas)]  # [B + 1] first draft index of each row, then num_draft
    group_bytes = CPU_GROUP_BYTES if device.type == "cpu" else float("inf")
    num_accepted, next_token = [], []
    for first, last in _groups(params, gammas, target_logits.shape[-1], group_bytes):  # rows first..last-1
        drafts = draft_ids[starts[first] : starts[last]]  # [their num_draft]
        logits = target_logits[starts[first] + first : starts[last] + last]  # [their num_draft + rows, vocab]
        rows = _Ragged(gammas[first:last], device)
        if params[first].greedy:
            outcome = _verify_greedy_rows(drafts, rows, logits)
        else:
            q_rows = [q[b] for b in range(first, last) if gammas[b]]
            assert all(row is not None for row in q_rows), "sampling needs the draft probabilities"
            p = probs_per_row(logits, [params[b] for b in range(first, last) for _ in range(gammas[b] + 1)])
            q_flat = torch.cat(q_rows).to(device) if q_rows else None  # [their num_draft, vocab]
            outcome = _verify_sampling_rows(drafts, rows, p, q_flat, generators[first:last])
        num_accepted.append(outcome[0])
        next_token.append(outcome[1])
    return torch.cat(num_accepted), torch.cat(next_token)


def _groups(params: Sequence[SamplingParams], gammas: list[int], vocab: int, group_bytes: float):
    """(first, last): runs of consecutive greedy rows, or of sampling rows cut where their fp32 target
    probabilities [tokens, vocab] would pass group_bytes (a run holds at least one row)."""
    first = 0
    while first < len(gammas):
        last, size = first + 1, (gammas[first] + 1) * vocab * 4
        while last < len(gammas) and params[last].greedy == params[first].greedy:
            size += (gammas[last] + 1) * vocab * 4
            if not params[first].greedy and size > group_bytes:
                break
            last += 1
        yield first, last
        first = last


def _index(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long, device=device)


class _Ragged:
    """The layout of B flattened rows: row b has gamma_b draft tokens, at flat draft indices starts[b] + j, and
    gamma_b + 1 target positions, at flat token indices starts[b] + b + j. Built on the host from the gammas,
    which the caller knows, so indexing with it never waits for the device."""

    def __init__(self, gammas: Sequence[int], device: torch.device):
        self.gammas = list(gammas)
        self.starts = [0, *accumulate(self.gammas)][:-1]  # [B]
        row = [b for b, gamma in enumerate(self.gammas) for _ in range(gamma)]
        self.gamma = _index(self.gammas, device)  # [B]
        self.first_draft = _index(self.starts, device)  # [B]
        self.first_token = _index((start + b for b, start in enumerate(self.starts)), device)  # [B]
        self.draft_row = _index(row, device)  # [num_draft]: the row of each draft token
        self.draft_pos = _index((j for gamma in self.gammas for j in range(gamma)), device)  # [num_draft]: j in its row
        self.draft_token = _index((i + b for i, b in enumerate(row)), device)  # [num_draft]: the position scoring it

    def num_accepted(self, accepted: torch.Tensor) -> torch.Tensor:
        """accepted [num_draft] bool -> [B]: each row's leading accepted drafts (its first rejected position)."""
        first_rejected = torch.where(accepted, self.gamma[self.draft_row], self.draft_pos)  # [num_draft]
        return self.gamma.scatter_reduce(0, self.draft_row, first_rejected, reduce="amin")


def _verify_greedy_rows(
    x: torch.Tensor, rows: _Ragged, target_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify_greedy` over ragged rows: draft tokens x [num_draft], target_logits [num_draft + B, vocab].
    -> (num_accepted [B], next_token [B]): the recovered token (the argmax after a mismatch) or the bonus."""
    target_ids = target_logits.argmax(dim=-1)  # [num_draft + B]
    num_accepted = rows.num_accepted(x == target_ids[rows.draft_token])  # [B]
    return num_accepted, target_ids[rows.first_token + num_accepted]


def _verify_sampling_rows(
    x: torch.Tensor, rows: _Ragged, p: torch.Tensor, q: torch.Tensor | None, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify_sampling` over ragged rows: draft tokens x [num_draft], target probs p [num_draft + B, vocab],
    draft probs q [num_draft, vocab] (None when no row has a draft). -> (num_accepted [B], next_token [B])."""
    device, (batch, vocab), num_draft = p.device, (len(rows.gammas), p.shape[-1]), x.shape[0]
    r = torch.empty(num_draft, device=device)  # [num_draft] uniforms
    race = torch.empty(batch, vocab, device=device)  # [B, vocab] exponentials
    for b, generator in enumerate(generators):  # each row draws what verify_sampling draws, in its order
        r[rows.starts[b] : rows.starts[b] + rows.gammas[b]] = torch.rand(rows.gammas[b], generator=generator, device=device)
        race[b].exponential_(1, generator=generator)
    if q is None:  # gamma_b = 0 everywhere: each row draws its token from p
        return rows.gamma.clone(), torch.argmax(p / race, dim=-1)
    q_x = q[torch.arange(num_draft, device=device), x]  # [num_draft]
    p_x = p[rows.draft_token, x]  # [num_draft]
    num_accepted = rows.num_accepted((q_x > 0) & (r * q_x < p_x))  # [B]; r < p/q without dividing
    p_next = p[rows.first_token + num_accepted]  # [B, vocab]: the bonus distribution where a row accepted all
    q_next = q[(rows.first_draft + num_accepted).clamp(max=num_draft - 1)]  # [B, vocab], unused where it did
    residual = (p_next - q_next).clamp(min=0)  # [B, vocab], sampled unnormalised
    recover = (num_accepted < rows.gamma) & (residual > 0).any(dim=-1)  # [B]; else p, as verify_sampling falls back
    weights = torch.where(recover[:, None], residual, p_next)  # [B, vocab]
    return num_accepted, torch.argmax(weights / race, dim=-1)


def token_logprobs(
    target_logits: torch.Tensor, token_ids: torch.Tensor, params: SamplingParams, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The verifier's log-probabilities of tokens it committed (or of prompt tokens), and the top-k alternatives.

    target_logits: [n, vocab], row i scores token_ids[i]; token_ids: [n]; k >= 0.
    -> (logprobs [n], top_ids [n, k], top_logprobs [n, k]), fp32, best first.
    The distribution is the one the verifier samples position i from: log p with p = logits_to_probs (after
    temperature, top-k and top-p, so a token outside their support gets -inf); greedy: log_softmax of the raw
    logits. A token committed by speculative verification (accepted, recovered or bonus) is distributed as
    that same p, which is why it is the one reported, whatever the draft proposed.
    """
    if params.greedy:
        logp = target_logits.float().log_softmax(dim=-1)  # [n, vocab]
    else:
        logp = logits_to_probs(target_logits, params).log()  # [n, vocab]
    chosen = logp.gather(-1, token_ids.long().to(logp.device)[:, None])[:, 0]  # [n]
    top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)  # values, indices: [n, k]
    return chosen, top.indices, top.values
