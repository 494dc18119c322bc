"""Per-session KV memory and one batched forward over many sessions: the engine's reference route.

Design (pad-and-stack over per-session caches). Each session owns a `SessionKV`: one buffer
[layers, 2, kv_heads, capacity, head_dim] in the model's dtype and a length. Rollback is a length
decrement (vLLM's `num_computed_tokens -= num_rejected`, nanochat's per-row `cache_seqlens`), exact and
free; the buffer grows by doubling and is dropped when the session ends, so idle KV is zero.

A step stacks the sessions' caches into one padded batch for the lifetime of a single forward:
- keys/values [B, kv_heads, L_max, head_dim], row b's L_b real keys first, zeros after (finite, so a
  masked key times a zero weight stays zero);
- new tokens [B, T_max] right-padded, at positions L_b + j (`position_ids` per row, always);
- a boolean 4D mask [B, 1, T_max, L_max + T_max]: query j of row b sees row b's L_b past keys and its own
  new keys 0..j. A padded key is masked, never merely zero. Padded queries see the same causal pattern,
  so nothing is NaN; their outputs are dropped.
After the forward each row's T_b new keys/values are copied into its own buffer and the padded batch is
garbage: memory held between steps is what the sessions' buffers hold, nothing else.

Why this route: it works with any transformers causal LM that takes `position_ids` and a 4D mask (sdpa
attention, CPU and CUDA) and needs no custom kernels; its costs are a copy of the batch's past KV per step
and compute over B x T_max padded positions, which the engine bounds with its token budget. The next
step up is a slot pool with one length per row (no per-step copy); that is an optimisation of this, not a
different contract. transformers' own continuous batching is not used: it samples one token per step and
can neither score given tokens nor roll a request back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from specdec.lm import cache_argument


class SessionKV:
    """One session's cached keys/values: buffer [layers, 2, kv_heads, capacity, head_dim], first `length` valid."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.length = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def view(self) -> torch.Tensor:
        """The valid part, [layers, 2, kv_heads, length, head_dim] (no copy)."""
        assert self.buffer is not None
        return self.buffer[:, :, :, : self.length]

    def append(self, new: torch.Tensor) -> None:
        """Cache new keys/values [layers, 2, kv_heads, n, head_dim] after the valid part."""
        n = new.shape[3]
        needed = self.length + n
        if self.buffer is None or needed > self.buffer.shape[3]:
            capacity = max(needed, 2 * (0 if self.buffer is None else self.buffer.shape[3]), 16)
            grown = new.new_empty((*new.shape[:3], capacity, new.shape[4]))
            if self.length:
                grown[:, :, :, : self.length] = self.view()
            self.buffer = grown
        self.buffer[:, :, :, self.length : needed] = new
        self.length = needed

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (rollback after a rejection)."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length

    def free(self) -> None:
        self.buffer, self.length = None, 0


@dataclass
class Row:
    kv: SessionKV
    token_ids: list[int]  # new tokens, cached after the forward
    want_logits: bool  # a verification block needs logits for every new token; a prefill chunk none


def padded_inputs(lengths: list[int], new: list[list[int]], device: torch.device):
    """-> input_ids [B, T_max], position_ids [B, T_max], bool mask [B, 1, T_max, L_max + T_max] (True = attend)."""
    batch, l_max, t_max = len(new), max(lengths), max(map(len, new))
    input_ids = torch.zeros(batch, t_max, dtype=torch.long)
    for b, ids in enumerate(new):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    past = torch.tensor(lengths)  # [B]
    j = torch.arange(t_max)  # [T_max]
    position_ids = past[:, None] + j[None, :]  # [B, T_max]
    k = torch.arange(l_max + t_max)  # [K]
    sees_past = (k[None, None, :] < past[:, None, None]).expand(batch, t_max, -1)  # [B, T_max, K]
    sees_new = (k[None, :] >= l_max) & (k[None, :] - l_max <= j[:, None])  # [T_max, K], causal among new tokens
    mask = (sees_past | sees_new[None]).unsqueeze(1)  # [B, 1, T_max, K]
    return input_ids.to(device), position_ids.to(device), mask.to(device)


@torch.inference_mode()
def batched_forward(model: torch.nn.Module, rows: list[Row]) -> list[torch.Tensor | None]:
    """One forward over every row; caches each row's new tokens in its SessionKV.

    -> per row: fp32 logits [len(token_ids), vocab] if want_logits, else None.
    """
    assert rows and all(row.token_ids for row in rows)
    device = next(model.parameters()).device
    lengths = [row.kv.length for row in rows]
    l_max = max(lengths)
    input_ids, position_ids, mask = padded_inputs(lengths, [row.token_ids for row in rows], device)
    cache = DynamicCache()
    if l_max:
        template = next(row.kv.buffer for row in rows if row.kv.length)
        layers, _, heads, _, head_dim = template.shape
        past = template.new_zeros((layers, 2, len(rows), heads, l_max, head_dim))  # the padded batch
        for b, row in enumerate(rows):
            if row.kv.length:
                past[:, :, b, :, : row.kv.length] = row.kv.view()
        for layer in range(layers):
            cache.update(past[layer, 0], past[layer, 1], layer)
        del past
    # logits only for the first t_logits positions of every row: a verification block is short (1 + gamma),
    # and a prefill chunk riding in the same step must not cost a [T_max, vocab] LM-head product
    t_logits = max((len(row.token_ids) for row in rows if row.want_logits), default=0)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                logits_to_keep=torch.arange(t_logits, device=device), **{cache_argument(model): cache})
    new = torch.stack([torch.stack((layer.keys[:, :, l_max:], layer.values[:, :, l_max:])) for layer in cache.layers])
    for b, row in enumerate(rows):  # new: [layers, 2, B, kv_heads, T_max, head_dim]
        row.kv.append(new[:, :, b, :, : len(row.token_ids)])
    logits = out.logits  # [B, t_logits, vocab]
    return [logits[b, : len(row.token_ids)].float() if row.want_logits else None for b, row in enumerate(rows)]
