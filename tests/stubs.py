"""Deterministic fake models behind the transformers interface the workers use (no weights, no download),
and the `specdec` command line the subprocess tests run.

FakeLM's logits at each position are a pseudo-random function of the WHOLE prefix, so a cache that was
not rolled back correctly produces different tokens: rollback bugs cannot hide. A draft FakeLM built
from the same seed with `noise > 0` agrees with the target often but not always.
"""

from __future__ import annotations

import hashlib
import os
import sys
from types import SimpleNamespace

import torch

CLI = [sys.executable, "-m", "orchestrator.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class FakeCache:
    def __init__(self):
        self.tokens: list[int] = []

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove < 0, "transformers 5.x crop takes a negative count"
        del self.tokens[tokens_to_remove:]

    def get_seq_length(self) -> int:
        return len(self.tokens)


class FakeLM(torch.nn.Module):
    def __init__(self, vocab_size: int = 32, seed: int = 0, noise: float = 0.0, scale: float = 3.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.seed = seed
        self.noise = noise
        self.scale = scale
        self.lm_head = torch.nn.Linear(1, vocab_size, bias=False)  # only for device/vocab discovery
        self.forward_calls = 0

    def get_output_embeddings(self):
        return self.lm_head

    def _logits(self, prefix: list[int]) -> torch.Tensor:
        digest = hashlib.sha256(repr((self.seed, prefix)).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        logits = torch.randn(self.vocab_size, generator=g) * self.scale  # [vocab]
        if self.noise:
            g_noise = torch.Generator().manual_seed(int.from_bytes(digest[8:16], "little"))
            logits = logits + torch.randn(self.vocab_size, generator=g_noise) * self.noise
        return logits

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.forward_calls += 1
        cache = past_key_values if past_key_values is not None else FakeCache()
        rows = []
        for token in input_ids[0].tolist():
            cache.tokens.append(token)
            rows.append(self._logits(cache.tokens))
        logits = torch.stack(rows)  # [n, vocab]
        if torch.is_tensor(logits_to_keep):  # row indices, as specdec.lm passes them
            logits = logits[logits_to_keep]
        elif logits_to_keep:
            logits = logits[-logits_to_keep:]
        return SimpleNamespace(logits=logits[None], past_key_values=cache)  # [1, n, vocab]


def fake_pair(vocab_size: int = 32, noise: float = 1.0) -> tuple[FakeLM, FakeLM]:
    """(draft, target) that agree on most greedy tokens."""
    return FakeLM(vocab_size, seed=0, noise=noise), FakeLM(vocab_size, seed=0)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of observed counts [vocab] under probs [vocab]; 0 if any token outside the support was drawn."""
    counts, probs = counts.double(), probs.double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = counts.sum() * probs[support] / probs[support].sum()  # [support]
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    if dof == 0:  # a single possible token, and only it was drawn
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))
