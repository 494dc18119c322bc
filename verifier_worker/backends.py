"""The engine's model side: what a backend must do, and the transformers backend.

A backend owns the model and every session's KV memory; the engine owns scheduling, budgets and the
verification math, which are the same code for every backend. Two operations:
- `new_kv()`: an empty KV handle for a new session (`KVHandle`: its cached length, `truncate(n)` to roll
  back to n tokens, `free()` when the session ends, `nbytes` it holds);
- `kv_capacity_tokens`: the most tokens all sessions' KV may hold at once (a fixed cache, e.g. llama.cpp's
  n_ctx cells), or None when memory grows on demand; the engine admits a session only while every open
  session's longest possible KV still fits (`Engine.open` raises `NoRoom`, the server answers RESOURCE_EXHAUSTED),
  so a step never runs out of cells midway;
- `forward(rows)`: ONE forward over a batch of ragged rows (`kv.Row`: a session's KV handle, the tokens to
  append at positions kv.length.., whether their logits are wanted); each row's tokens are cached in its
  handle, and the answer per row is fp32 logits [len(token_ids), vocab] (on `device`) or None.

Backends: `TransformersBackend` (any transformers causal LM, `kv.batched_forward` or `kv.packed_forward`) and
`verifier_worker.llamacpp_backend.LlamaCppBackend` (a GGUF through llama.cpp). `as_backend` keeps the
engine's callers that pass a torch module working unchanged.
"""

from __future__ import annotations

from typing import Protocol

import torch

from specdec.models import model_vocab_size
from specdec.config import MAX_GAMMA, lookahead
from verifier_worker.kv import Row, SessionKV, batched_forward, packed_forward

SHORT_ROW = lookahead(MAX_GAMMA) + 1  # the longest verification block (a tree or async block included), plus its root


class NoRoom(RuntimeError):
    """The backend cannot take another session now (KV cells or sequence ids); a later retry may succeed."""


class KVHandle(Protocol):
    length: int  # tokens cached

    @property
    def nbytes(self) -> int: ...  # memory this session's KV holds

    def truncate(self, length: int) -> None: ...  # keep the first `length` tokens (rollback)

    def keep(self, start: int, rows: list[int]) -> None: ...  # after a token tree: only the accepted path's tokens

    def free(self) -> None: ...  # the session ended: release its memory


class Backend(Protocol):
    device: torch.device  # where the logits are (and verification runs)
    vocab_size: int  # width of the logits
    kv_capacity_tokens: int | None  # tokens all sessions' KV may hold at once; None: unbounded
    supports_trees: bool  # whether forward honours `Row.parents` (token trees, issue 21)
    pads_rows: bool  # whether a forward's short rows cost rows x longest (pad-and-stack), not the sum of their tokens

    def new_kv(self) -> KVHandle: ...

    def forward(self, rows: list[Row]) -> list[torch.Tensor | None]: ...


class TransformersBackend:
    """A transformers causal LM with full attention; each forward padded or packed, whichever computes less (kv.py)."""

    kv_capacity_tokens = None  # the KV grows with the sessions (torch tensors)
    supports_trees = True  # kv.py's per-row tree masks
    # a forward costs about the sum of its rows' tokens: it pads only where that computes less than packing (rows of
    # one length, or a long past beside few new tokens), so one session's 5-token block no longer makes every 1-token
    # row of the step cost 5
    pads_rows = False

    def __init__(self, model: torch.nn.Module):
        layer_types = getattr(getattr(model, "config", None), "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(f"the batching engine supports full-attention models only, this one has {set(layer_types)}")
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = model_vocab_size(model)
        self.token_flops, self.score_flops = forward_flops(model)

    def new_kv(self) -> SessionKV:
        return SessionKV()

    def forward(self, rows: list[Row]) -> list[torch.Tensor | None]:
        """Packed when that computes less than padding (`route_flops`), else padded. Padded costs rows x longest
        row, so a prefill chunk riding beside verification blocks would make every block pay for the chunk's length
        (a CPU step of 8 sessions with a 256-token chunk took ~20x a decoding step); long rows and short rows then
        run as two forwards of the one step. Each row's result is its own either way (padding is masked)."""
        groups = [group for group in ([i for i, row in enumerate(rows) if len(row.token_ids) <= SHORT_ROW],
                                      [i for i, row in enumerate(rows) if len(row.token_ids) > SHORT_ROW]) if group]
        shape = [(len(row.token_ids), row.kv.length) for row in rows]
        padded = sum(route_flops([shape[i] for i in group], False, self.token_flops, self.score_flops)
                     for group in groups)
        if route_flops(shape, True, self.token_flops, self.score_flops) < padded:
            return packed_forward(self.model, rows)
        logits: list[torch.Tensor | None] = [None] * len(rows)
        for group in groups:
            for i, row_logits in zip(group, batched_forward(self.model, [rows[i] for i in group])):
                logits[i] = row_logits
        return logits


def forward_flops(model: torch.nn.Module) -> tuple[float, float]:
    """-> (FLOPs of one token through the weights outside the embeddings, FLOPs of one attention score over every
    layer: q.k and its weight on v, 4 x heads x head_dim each). A shape-level estimate: what it prices is the choice
    between two layouts of the same tokens. The 1.5B: 2.6 GFLOPs a token, 6.1 kFLOPs a score per layer."""
    config = getattr(model, "config", None)
    if not hasattr(config, "num_attention_heads"):  # a model that does not say its shape: priced by its tokens
        return 1.0, 0.0
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)
    return 2.0 * weights, 4.0 * heads * head_dim * config.num_hidden_layers


def route_flops(rows: list[tuple[int, int]], packed: bool, token_flops: float, score_flops: float) -> float:
    """FLOPs of one forward over rows of (new tokens T_b, past L_b) (kv.py's two routes): padded computes B x T_max
    tokens and B x T_max x (L_max + T_max) scores; packed sum T_b = N tokens and N x (sum L_b + N) scores."""
    if packed:
        tokens = sum(t for t, _ in rows)
        return tokens * token_flops + tokens * (sum(past for _, past in rows) + tokens) * score_flops
    longest, past = max(t for t, _ in rows), max(past for _, past in rows)
    return len(rows) * longest * (token_flops + (past + longest) * score_flops)


def as_backend(model: torch.nn.Module | Backend) -> Backend:
    """A torch module gets the transformers backend; a backend is used as it is."""
    return TransformersBackend(model) if isinstance(model, torch.nn.Module) else model
