"""The sampling math both workers share: logits -> probs, and greedy / exact speculative verification.

Plain tensors in, plain tensors out; knows nothing about models, tokenizers or the wire. The draft and
the verifier MUST turn logits into probabilities with the same `logits_to_probs`, or the output is no
longer the verifier's distribution. Notation follows Leviathan et al. 2023: p is the target (verifier)
distribution, q the draft distribution, gamma the number of draft tokens in a block.
"""

from __future__ import annotations

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
    logits = logits.float() / params.temperature  # [..., vocab]
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < params.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [..., vocab]
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top-1 is always kept)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., vocab]
        sorted_logits = sorted_logits.masked_fill(mass_above >= params.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
    return logits.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of probs [..., vocab] -> [...] (exponential race: no host sync, as in gpt-fast)."""
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
    (the draft could not have sampled it), so there is no division by zero.
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
    residual = (p[num_accepted] - q[num_accepted]).clamp(min=0)  # [vocab]
    total = residual.sum()
    # p <= q everywhere only when p == q up to rounding, where a rejection is vanishingly rare: fall back to p
    recovered_probs = residual / total if total > 0 else p[num_accepted]
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
