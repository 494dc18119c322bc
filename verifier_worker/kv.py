"""Per-session KV memory and one batched forward over many sessions: the engine's reference route.

Design (pad-and-stack over per-session caches). Each session owns a `SessionKV`: one buffer
[layers, 2, kv_heads, capacity, head_dim] in the model's dtype and a length. Rollback is a length
decrement (vLLM's `num_computed_tokens -= num_rejected`, nanochat's per-row `cache_seqlens`), exact and
free; the buffer grows by doubling and is dropped when the session ends, so idle KV is zero.

A step runs one forward over the sessions' pending tokens, padded into one batch:
- new tokens [B, T_max] right-padded, at positions L_b + j (`position_ids` per row, always);
- a boolean 4D mask [B, 1, T_max, L_max + T_max]: query j of row b sees row b's L_b past keys and its own
  new keys 0..j. A padded key is masked, never merely zero. Padded queries see the same causal pattern,
  so nothing is NaN; their outputs are dropped;
- a token tree's row (issue 21, `Row.parents`: the block is [root, nodes], specdec/tree.py) instead sees, among
  its new keys, the root and its own ancestors (`tree.block_mask`), at positions L_b + depth
  (`tree.block_positions`); a chain's parents give exactly the causal pattern above. After verification the
  session keeps the accepted path's keys only (`SessionKV.keep`);
- keys/values [B, kv_heads, L_max + T_max, head_dim], stacked layer by layer: when layer l asks the cache
  to append the step's keys (`_StepCache.update`), it gathers layer l of every session's buffer (row b's
  L_b keys first, zeros up to L_max: finite, so a masked key times a zero weight stays zero) and the new
  keys after them. The padded batch thus exists one layer at a time, and is garbage once the layer has
  attended; after the forward each row's T_b new keys/values are copied into its own buffer. Memory held
  between steps is what the sessions' buffers hold, nothing else.

Packed (`packed_forward`, vLLM's flattened batch): every row's new tokens in ONE sequence [1, N], N = sum T_b,
no padding; the past is the sessions' KV laid end to end [1, kv_heads, P + N, head_dim] (P = sum L_b), and the mask
[1, 1, N, P + N] lets row b's queries see its own L_b past keys and its own new keys (causal, or its tree's). The
linear layers then compute N tokens instead of B x T_max: on one avx2 core, the 1.5B in fp32 at a 256-token context,
rows of 5, 1, 1, 1 tokens took 2.05 s packed against 3.02 s padded (1.58 s padded for 1, 1, 1, 1;
scripts/measure_packing.py). The price is attention over every row's past, N x (P + N) scores instead of
B x T_max x (L_max + T_max), dense under sdpa's mask: more than the padding saves where rows are of one length, or
the past is long beside the new tokens. So the backend (backends.py) picks the route that computes less for each
forward.

Why this route: it works with any transformers causal LM that takes `position_ids`, a 4D mask and a
`Cache` (sdpa attention, CPU and CUDA), and needs no custom kernels. Its costs: one copy of the batch's
past KV per step (into per-layer buffers the allocator reuses), and compute over B x T_max padded
positions (or N x (P + N) scores packed), which the engine bounds with its token budget. The next step up is a
slot pool with one length per row (no per-step copy) and a varlen attention kernel: an optimisation of this, not a
different contract. transformers' own continuous batching is not used: it samples one token per step and can
neither score given tokens nor roll a request back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicLayer

from specdec.lm import cache_argument
from specdec.tree import block_mask, block_positions


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

    @torch.inference_mode()  # the buffer is an inference tensor (made in batched_forward)
    def keep(self, start: int, rows: list[int]) -> None:
        """After a tree step: keep, from `start` on, the tokens at start + rows[d] (increasing) as start + d; drop the rest."""
        assert self.buffer is not None and start + len(rows) <= self.length, (start, rows, self.length)
        index = torch.tensor(rows, device=self.buffer.device) + start  # [len(rows)]
        self.buffer[:, :, :, start : start + len(rows)] = self.buffer.index_select(3, index)
        self.length = start + len(rows)

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
    parents: list[int] | None = None  # a token tree's block [root, nodes]: each node's parent (-1 = root); None = chain


def padded_inputs(lengths: list[int], new: list[list[int]], device: torch.device,
                  parents: list[list[int] | None] | None = None):
    """-> input_ids [B, T_max], position_ids [B, T_max], bool mask [B, 1, T_max, L_max + T_max] (True = attend).

    parents[b] (optional): row b is a token tree's block [root, nodes] with these parents (tree.py); None: causal."""
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
    mask = sees_past | sees_new[None]  # [B, T_max, K]
    for b, row_parents in enumerate(parents or []):
        if row_parents is not None:  # a tree: its ancestors among the new keys, positions by depth
            n = len(row_parents) + 1  # root + nodes
            row_parents = torch.tensor(row_parents, dtype=torch.long)
            mask[b, :n, l_max : l_max + n] = block_mask(row_parents)
            position_ids[b, :n] = lengths[b] + block_positions(row_parents)
    return input_ids.to(device), position_ids.to(device), mask.unsqueeze(1).to(device)


class _StepCache(Cache):
    """The KV cache one batched forward sees; the model calls `update` once per layer with the new keys."""

    def __init__(self, rows: list[Row], l_max: int):
        super().__init__(layer_class_to_replicate=DynamicLayer)  # never used: update is overridden
        self.sessions = [row.kv for row in rows]
        self.l_max = l_max
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: the step's keys and values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [B, kv_heads, T_max, head_dim] -> padded past + new, [B, kv_heads, L_max + T_max, head_dim] each."""
        assert layer_idx == len(self.new), "layers must update in order, once each"
        self.new.append((key_states, value_states))
        batch, heads, t_max, head_dim = key_states.shape
        kv = key_states.new_empty((2, batch, heads, self.l_max + t_max, head_dim))
        for b, session in enumerate(self.sessions):
            if session.length:
                kv[:, b, :, : session.length] = session.view()[layer_idx]  # [2, kv_heads, L_b, head_dim]
            kv[:, b, :, session.length : self.l_max] = 0
        kv[0, :, :, self.l_max :] = key_states
        kv[1, :, :, self.l_max :] = value_states
        return kv[0], kv[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.l_max


@torch.inference_mode()
def batched_forward(model: torch.nn.Module, rows: list[Row]) -> list[torch.Tensor | None]:
    """One padded forward over every row; caches each row's new tokens in its SessionKV.

    -> per row: fp32 logits [len(token_ids), vocab] if want_logits, else None.
    """
    assert rows and all(row.token_ids for row in rows)
    device = next(model.parameters()).device
    lengths = [row.kv.length for row in rows]
    inputs = padded_inputs(lengths, [row.token_ids for row in rows], device, [row.parents for row in rows])
    # logits only for the first t_logits positions of every row: a verification block is short (1 + gamma),
    # and a prefill chunk riding in the same step must not cost a [T_max, vocab] LM-head product
    t_logits = max((len(row.token_ids) for row in rows if row.want_logits), default=0)
    logits = _run(model, rows, inputs, _StepCache(rows, max(lengths)), torch.arange(t_logits, device=device),
                  [(b, 0) for b in range(len(rows))])  # [B, t_logits, vocab]
    return [logits[b, : len(row.token_ids)].float() if row.want_logits else None for b, row in enumerate(rows)]


def packed_inputs(lengths: list[int], new: list[list[int]], device: torch.device,
                  parents: list[list[int] | None] | None = None):
    """-> input_ids [1, N], position_ids [1, N], bool mask [1, 1, N, P + N] (True = attend): row b's new tokens at
    its offset in the one sequence, its past keys at its offset among the P past keys (module docstring)."""
    sizes = torch.tensor([len(ids) for ids in new])  # [B]
    past = torch.tensor(lengths)  # [B]
    row = torch.repeat_interleave(torch.arange(len(new)), sizes)  # [N]: each new token's row
    first = torch.cumsum(sizes, 0) - sizes  # [B]: each row's offset in the sequence
    i = torch.arange(len(row))  # [N]
    position_ids = past[row] + i - first[row]  # [N]
    past_row = torch.repeat_interleave(torch.arange(len(new)), past)  # [P]: each past key's row
    sees_past = row[:, None] == past_row[None, :]  # [N, P]
    sees_new = (row[:, None] == row[None, :]) & (i[None, :] <= i[:, None])  # [N, N], causal within its row
    for b, row_parents in enumerate(parents or []):
        if row_parents is not None:  # a token tree: its ancestors among its new keys, positions by depth
            own = slice(int(first[b]), int(first[b]) + len(new[b]))
            row_parents = torch.tensor(row_parents, dtype=torch.long)
            sees_new[own, own] = block_mask(row_parents)
            position_ids[own] = lengths[b] + block_positions(row_parents)
    input_ids = torch.tensor([[token for ids in new for token in ids]], dtype=torch.long)
    mask = torch.cat([sees_past, sees_new], dim=1)  # [N, P + N]
    return input_ids.to(device), position_ids[None].to(device), mask[None, None].to(device)


class _PackedCache(_StepCache):
    """The packed forward's cache: the sessions' past keys end to end, then the step's new keys."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [1, kv_heads, N, head_dim] -> past + new, [1, kv_heads, P + N, head_dim] each."""
        assert layer_idx == len(self.new), "layers must update in order, once each"
        self.new.append((key_states, value_states))
        _, heads, total, head_dim = key_states.shape
        kv = key_states.new_empty((2, 1, heads, self.l_max + total, head_dim))  # l_max: here P, every past key
        at = 0
        for session in self.sessions:
            if session.length:
                kv[:, 0, :, at : at + session.length] = session.view()[layer_idx]  # [2, kv_heads, L_b, head_dim]
            at += session.length
        kv[0, :, :, self.l_max :] = key_states
        kv[1, :, :, self.l_max :] = value_states
        return kv[0], kv[1]


@torch.inference_mode()
def packed_forward(model: torch.nn.Module, rows: list[Row]) -> list[torch.Tensor | None]:
    """One forward over every row's new tokens packed into one sequence; as `batched_forward`, without padding."""
    assert rows and all(row.token_ids for row in rows)
    device = next(model.parameters()).device
    lengths = [row.kv.length for row in rows]
    inputs = packed_inputs(lengths, [row.token_ids for row in rows], device, [row.parents for row in rows])
    starts = list(itertools.accumulate((len(row.token_ids) for row in rows[:-1]), initial=0))  # each row's offset
    keep = [starts[b] + j for b, row in enumerate(rows) if row.want_logits for j in range(len(row.token_ids))]
    keep_at = torch.tensor(keep, dtype=torch.long, device=device)
    logits = _run(model, rows, inputs, _PackedCache(rows, sum(lengths)), keep_at,
                  [(0, start) for start in starts])[0]  # [kept, vocab]: the wanted rows' positions, in order
    out, at = [], 0
    for row in rows:
        out.append(logits[at : at + len(row.token_ids)].float() if row.want_logits else None)
        at += len(row.token_ids) if row.want_logits else 0
    return out


def _run(model: torch.nn.Module, rows: list[Row], inputs, cache: _StepCache, keep: torch.Tensor,
         slots: list[tuple[int, int]]) -> torch.Tensor:
    """The model call of either route; caches row b's new keys from batch row slots[b][0], position slots[b][1] on.
    -> the logits of the kept positions, [batch rows, len(keep), vocab]."""
    input_ids, position_ids, mask = inputs
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                logits_to_keep=keep, **{cache_argument(model): cache})
    new = torch.stack([torch.stack(kv) for kv in cache.new])  # [layers, 2, batch rows, kv_heads, T, head_dim]
    for row, (b, start) in zip(rows, slots):
        row.kv.append(new[:, :, b, :, start : start + len(row.token_ids)])
    return out.logits
