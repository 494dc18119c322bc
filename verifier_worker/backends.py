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

Backends: `TransformersBackend` (any transformers causal LM, `kv.batched_forward`) and
`verifier_worker.llamacpp_backend.LlamaCppBackend` (a GGUF through llama.cpp). `as_backend` keeps the
engine's callers that pass a torch module working unchanged.
"""

from __future__ import annotations

from typing import Protocol

import torch

from specdec.models import model_vocab_size
from specdec.config import MAX_GAMMA, lookahead
from verifier_worker.kv import Row, SessionKV, batched_forward

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
    """A transformers causal LM with full attention, batched by padding (kv.py)."""

    kv_capacity_tokens = None  # the KV grows with the sessions (torch tensors)
    supports_trees = True  # kv.py's per-row tree masks
    pads_rows = True  # pad-and-stack: one session's 5-token block makes every 1-token row of the step cost 5

    def __init__(self, model: torch.nn.Module):
        layer_types = getattr(getattr(model, "config", None), "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(f"the batching engine supports full-attention models only, this one has {set(layer_types)}")
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = model_vocab_size(model)

    def new_kv(self) -> SessionKV:
        return SessionKV()

    def forward(self, rows: list[Row]) -> list[torch.Tensor | None]:
        """Pad-and-stack costs rows x longest row, so a prefill chunk riding beside verification blocks would
        make every block pay for the chunk's length (a CPU step of 8 sessions with a 256-token chunk took ~20x a
        decoding step); long rows and short rows run as two forwards of the one step instead. Each row's
        result is its own either way (padding is masked)."""
        short = [i for i, row in enumerate(rows) if len(row.token_ids) <= SHORT_ROW]
        long = [i for i, row in enumerate(rows) if len(row.token_ids) > SHORT_ROW]
        groups = [group for group in (short, long) if group]
        logits: list[torch.Tensor | None] = [None] * len(rows)
        for group in groups:
            for i, row_logits in zip(group, batched_forward(self.model, [rows[i] for i in group])):
                logits[i] = row_logits
        return logits


def as_backend(model: torch.nn.Module | Backend) -> Backend:
    """A torch module gets the transformers backend; a backend is used as it is."""
    return TransformersBackend(model) if isinstance(model, torch.nn.Module) else model
