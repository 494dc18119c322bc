"""The llama.cpp verifier backend: a GGUF model run natively by llama.cpp behind the engine's model
interface (backends.py), so scheduling, budgets and the verification math stay the engine's.

One llama.cpp context holds every session. A session is a sequence id with its own cells in one KV cache
of n_ctx cells shared by all sequences (`kv_unified`): memory goes to whoever needs it. The cache cannot
grow, so `kv_capacity_tokens` = n_ctx and the engine admits a session only while every open session's
longest KV fits (Engine.open -> NoRoom -> RESOURCE_EXHAUSTED naming --n-ctx): no step runs out of cells,
and llama_decode's "no slot" (1) stays an internal error that should not happen. One engine step is
ONE `llama_decode` of a `llama_batch` holding every row's tokens, each with its session's sequence id and
its position (kv.length + j), logits asked for every token of a verification row (all its verified
positions) and for none of a prefill chunk. Those logits go to the shared `specdec.sampling` functions
unchanged, so the output is exact with respect to THIS model: a quantized GGUF verifier is lossless with
respect to the quantized model, not to the fp16 weights it was made from.

Rollback is llama.cpp's own sequence removal (`llama_memory_seq_rm(seq, n, -1)`), never a re-evaluation.
llama.cpp's context is not thread-safe, and the engine calls `truncate` and `free` from either thread, so
they only change Python state: the removals they imply (a rolled-back tail, a freed sequence's cells) are
applied by the next `forward`, on the compute thread, before it decodes. A freed sequence id is reused by
a later session; its old cells are gone by the time that session's first tokens are decoded.

`llama_cpp` is imported on first load, so the rest of the project runs without the optional extra.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from specdec import models
from verifier_worker.backends import NoRoom
from verifier_worker.kv import Row

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the llama.cpp backend needs llama-cpp-python: pip install 'specdec[llamacpp]' with CMAKE_ARGS for your machine "
    "(README: x86 CPUs CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\", NVIDIA GPUs "
    "\"-DGGML_CUDA=on\", Apple silicon \"-DGGML_METAL=on\")"
)


def import_llama_cpp():
    """The llama_cpp module, or an ImportError whose message says how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return llama_cpp


@dataclass(frozen=True)
class LlamaCppConfig:
    n_ctx: int = 8192  # KV cells shared by all sessions (prompt + generated tokens of every open session)
    n_seq_max: int = 64  # sessions at once (llama.cpp allows at most 256)
    n_batch: int = 512  # most tokens one step decodes: at least the engine's max_batch_tokens
    n_threads: int | None = None  # decoding threads; None: the cores this process may run on
    n_threads_batch: int | None = None  # threads for multi-token batches; None: n_threads
    n_gpu_layers: int = -1  # layers offloaded where the build has a GPU backend (CUDA, Metal); ignored on CPU
    flash_attn: str = "auto"  # "auto" | "on" | "off": llama.cpp's fused attention (auto: where the backend has it)


class LlamaSeqKV:
    """One session's sequence in the shared llama.cpp cache: the first `length` positions are its KV."""

    def __init__(self, backend: LlamaCppBackend, seq_id: int):
        self.backend = backend
        self.seq_id: int | None = seq_id
        self.length = 0  # what the engine counts as cached
        self.cached = 0  # what llama.cpp holds (changed on the compute thread only); > length until a rollback is applied

    @property
    def nbytes(self) -> int:
        return self.length * self.backend.bytes_per_token

    def truncate(self, length: int) -> None:
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length  # llama.cpp drops positions >= length before the next decode

    def keep(self, start: int, rows: list[int]) -> None:
        raise NotImplementedError("the llama.cpp backend verifies chains only (supports_trees = False)")

    def free(self) -> None:
        if self.seq_id is not None:
            self.backend._release(self.seq_id)
        self.seq_id, self.length = None, 0


class LlamaCppBackend:
    """A GGUF verifier in one llama.cpp context; `forward` runs on the engine's compute thread."""

    device = torch.device("cpu")  # logits come back in host memory; verification runs there
    supports_trees = False  # one sequence per session: no tree attention mask (the server refuses trees)
    pads_rows = False  # llama.cpp packs every sequence's tokens into one batch, no padding

    def __init__(self, source: str, config: LlamaCppConfig = LlamaCppConfig()):
        lc = import_llama_cpp()
        if not 1 <= config.n_seq_max <= 256:
            raise ValueError(f"n_seq_max must be 1..256 (llama.cpp's limit), got {config.n_seq_max}")
        self.lc = lc
        self.config = config
        self.path = path = models.gguf_path(source)
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        model_params.n_gpu_layers = config.n_gpu_layers
        self._model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if self._model is None:
            raise ValueError(f"llama.cpp could not load {path}")
        threads = config.n_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        params = lc.llama_context_default_params()
        params.n_ctx = config.n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = min(config.n_batch, 512)
        params.n_seq_max = config.n_seq_max
        params.kv_unified = True  # one pool of n_ctx cells for all sequences, not n_ctx / n_seq_max each
        params.n_threads = threads
        params.n_threads_batch = config.n_threads_batch or threads
        params.no_perf = True
        params.flash_attn_type = {"auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}[config.flash_attn]
        self._ctx = lc.llama_init_from_model(self._model, params)
        if self._ctx is None:
            lc.llama_model_free(self._model)
            raise ValueError(f"llama.cpp could not create a context (n_ctx {config.n_ctx}, n_seq_max {config.n_seq_max})")
        self._memory = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(config.n_batch, 0, 1)
        desc = ctypes.create_string_buffer(128)
        lc.llama_model_desc(self._model, desc, len(desc))
        self.description = desc.value.decode(errors="replace")  # e.g. "qwen2 1.5B Q4_K - Medium"
        self.vocab_size = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        # f16 keys and values (llama.cpp's default cache type) of every layer, per token
        n_layer, n_head = lc.llama_model_n_layer(self._model), lc.llama_model_n_head(self._model)
        kv_width = lc.llama_model_n_embd(self._model) // n_head * lc.llama_model_n_head_kv(self._model)
        self.bytes_per_token = n_layer * 2 * kv_width * 2
        self.reserved_bytes = config.n_ctx * self.bytes_per_token  # allocated up front by llama.cpp
        self.kv_capacity_tokens = config.n_ctx  # the engine admits sessions while their longest KVs fit
        self._lock = threading.Lock()  # guards the two lists below; never held during a decode
        self._free_ids = list(range(config.n_seq_max - 1, -1, -1))
        self._to_clear: list[int] = []
        self.threads = threads
        log.info("llama.cpp verifier %s: %s, n_vocab %d, n_ctx %d (%.0f MiB KV), %d sequences, %d threads",
                 source, path.name, self.vocab_size, config.n_ctx, self.reserved_bytes / 2**20, config.n_seq_max, threads)

    # ---------------------------------------------------------------------------------------- KV handles
    def new_kv(self) -> LlamaSeqKV:
        with self._lock:
            if not self._free_ids:
                raise NoRoom(f"all {self.config.n_seq_max} llama.cpp sequences are in use (--max-sessions, at most 256)")
            return LlamaSeqKV(self, self._free_ids.pop())

    def _release(self, seq_id: int) -> None:
        with self._lock:
            self._to_clear.append(seq_id)
            self._free_ids.append(seq_id)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, rows: list[Row]) -> list[torch.Tensor | None]:
        """One llama_decode over every row. -> per row fp32 logits [len(token_ids), vocab] or None."""
        lc, batch = self.lc, self._batch
        total = sum(len(row.token_ids) for row in rows)
        if total > self.config.n_batch:
            raise ValueError(f"a step of {total} tokens exceeds the llama.cpp batch of {self.config.n_batch}; raise n_batch")
        with self._lock:
            to_clear, self._to_clear = self._to_clear, []
        for seq_id in to_clear:  # freed sessions' cells (their ids may already serve a new session, still empty)
            lc.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        i = 0
        for row in rows:
            kv = row.kv
            assert kv.seq_id is not None, "forward over a freed session"
            if kv.cached > kv.length:  # a rollback: drop positions [length, end)
                lc.llama_memory_seq_rm(self._memory, kv.seq_id, kv.length, -1)
                kv.cached = kv.length
            for j, token in enumerate(row.token_ids):
                batch.token[i] = token
                batch.pos[i] = kv.length + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = kv.seq_id
                batch.logits[i] = row.want_logits
                i += 1
        batch.n_tokens = total
        code = lc.llama_decode(self._ctx, batch)
        if code != 0:
            why = "no KV cells left for the batch: raise --n-ctx" if code == 1 else "see llama.cpp's log"
            raise RuntimeError(f"llama_decode returned {code} ({why})")
        n_out = sum(len(row.token_ids) for row in rows if row.want_logits)
        flat = None
        if n_out:  # [n_out, vocab] in batch order
            flat = torch.from_numpy(np.ctypeslib.as_array(lc.llama_get_logits(self._ctx), shape=(n_out, self.vocab_size)).copy())
        out: list[torch.Tensor | None] = []
        start = 0
        for row in rows:
            row.kv.length += len(row.token_ids)
            row.kv.cached = row.kv.length
            if row.want_logits:
                out.append(flat[start : start + len(row.token_ids)])
                start += len(row.token_ids)
            else:
                out.append(None)
        return out

    def close(self) -> None:
        """Free the context and the model (the backend is unusable afterwards)."""
        if self._ctx is not None:
            self.lc.llama_batch_free(self._batch)
            self.lc.llama_free(self._ctx)
            self.lc.llama_model_free(self._model)
            self._ctx = self._model = None
