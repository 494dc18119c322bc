"""Deterministic fake models behind the transformers interface the workers use (no weights, no download),
and the `specdec` command line the subprocess tests run.

FakeLM's logits at each position are a pseudo-random function of the WHOLE prefix it attends to, so a
cache that was not rolled back correctly, or a batch that lets a row see another's keys or padding,
produces different tokens: rollback and batching bugs cannot hide. A draft FakeLM built
from the same seed with `noise > 0` agrees with the target often but not always.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
from types import SimpleNamespace

import torch
from transformers import DynamicCache

CLI = [sys.executable, "-m", "orchestrator.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class FakeLM(torch.nn.Module):
    """Its KV cache is a real transformers DynamicCache whose keys are the token ids (one layer, one head,
    head_dim 1), and each query's logits are a function of exactly the keys its attention mask lets it see,
    in order. So a batched forward with a wrong mask, an unmasked padding key, a wrong position or a cache
    that was not rolled back gives different tokens than a plain one."""

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

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0, attention_mask=None,
                position_ids=None):
        self.forward_calls += 1
        cache = past_key_values if past_key_values is not None else DynamicCache()
        ids = input_ids.float()[:, None, :, None]  # [batch, 1 head, n, head_dim 1]
        keys, _ = cache.update(ids, ids, 0)  # [batch, 1, past + n, 1]
        batch, n = input_ids.shape
        past = keys.shape[2] - n
        if attention_mask is None:  # causal over the whole cache
            attention_mask = torch.ones(n, past + n, dtype=torch.bool).tril(past).expand(batch, 1, n, past + n)
        assert attention_mask.dtype == torch.bool and attention_mask.shape == (batch, 1, n, past + n)
        seen = attention_mask[:, 0]  # [batch, n, past + n]
        if position_ids is not None:  # a token's position is the number of keys it sees before itself
            assert torch.equal(position_ids, seen.sum(-1) - 1), (position_ids, seen.sum(-1) - 1)
        if torch.is_tensor(logits_to_keep):  # row indices, as specdec.lm and the engine pass them
            kept = logits_to_keep.tolist()
        else:
            kept = list(range(n))[-logits_to_keep:] if logits_to_keep else list(range(n))
        rows = [[self._logits(keys[b, 0, seen[b, j], 0].long().tolist()) for j in kept] for b in range(batch)]
        logits = torch.stack([torch.stack(row) for row in rows]) if kept else torch.zeros(batch, 0, self.vocab_size)
        return SimpleNamespace(logits=logits, past_key_values=cache)  # logits [batch, len(kept), vocab]


class GatedLM(FakeLM):
    """A FakeLM whose forward, after its first `free` calls, waits for the test to open the gate: so a step can be
    caught in flight, or held until what the test waits for (a client's word, an async chunk) has reached the event
    loop, however busy the machine (steps run in the engine's worker thread); a gate still shut after `wait_s` fails
    the step. `reset()` closes the gate and counts the calls from 0 again."""

    def __init__(self, *args, free: int = 0, wait_s: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.free, self.wait_s, self.calls = free, wait_s, 0

    def reset(self) -> None:
        self.gate.clear()
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.free:
            self.entered.set()
            assert self.gate.wait(self.wait_s), "the test never opened the gate"
        return super().forward(*args, **kwargs)


async def wait_for(event: threading.Event) -> None:
    for _ in range(500):  # <= 5 s
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine never started the step")


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


def stream_inbox(request_iterator) -> tuple[asyncio.Queue, asyncio.Task]:
    """A stub servicer's inbox: every request of a stream, queued as it arrives (cancel the task when done)."""
    inbox: asyncio.Queue = asyncio.Queue()

    async def read():
        async for request in request_iterator:
            await inbox.put(request)

    return inbox, asyncio.ensure_future(read())
