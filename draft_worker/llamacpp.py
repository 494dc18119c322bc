"""The llama.cpp draft backend: a GGUF model run natively through llama-cpp-python.

`LlamaCppLM` has the three members `LMDrafter` uses of `specdec.lm.CachedLM` (`forward`, `crop`,
`length`), so greedy drafting and sampling (q from the shared `logits_to_probs`, wire-rounded, sampled
from exactly that q) stay one code path in `drafters.py`; this module only moves tokens and logits.
Rollback is llama.cpp's own KV sequence removal (`llama_memory_seq_rm`), never a re-evaluation of the
prefix. Logits are padded with -inf (q = 0, never drafted) or trimmed to the verifier's vocabulary.

One `Llama` holds one context, so a `LlamaCppDraft` serves one session at a time: each `new_lm` takes
the context over (resetting it) and an LM it superseded refuses to run rather than corrupt the cache.
`llama_cpp` is imported on first load, so the rest of the project runs without the optional extra.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from specdec import models

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    'pip install -e ".[llamacpp]" with CMAKE_ARGS set for your machine (see the README: '
    '"-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..." on x86 CPUs, "-DGGML_METAL=on" on Apple silicon)'
)


class LlamaCppLM:
    """One session's view of a llama.cpp context: feed tokens, read the last token's logits, roll back."""

    def __init__(self, draft: LlamaCppDraft, vocab_size: int):
        self.draft = draft
        self.llm = draft.llm
        self.vocab_size = vocab_size  # the verifier's: logits are padded or trimmed to it
        self.llm.n_tokens = 0
        self._seq_rm(0)

    @property
    def length(self) -> int:
        return self.llm.n_tokens  # tokens whose keys/values are in the context

    def _check_owner(self) -> None:
        if self.draft.owner is not self:
            raise RuntimeError(
                f"the llama.cpp context of {self.draft.name} now serves another session; a llama.cpp draft "
                "runs one session at a time (one request in flight per draft worker)"
            )

    def _seq_rm(self, start: int) -> None:
        from llama_cpp import llama_get_memory, llama_memory_seq_rm

        llama_memory_seq_rm(llama_get_memory(self.llm.ctx), 0, start, -1)  # drop positions [start, end)

    def forward(self, token_ids: list[int], num_logits: int = 1) -> torch.Tensor:
        """Append token_ids to the context. -> logits [1, vocab] fp32 of the last token.

        Only the last row is computed (llama.cpp's default), which is all a drafter reads.
        """
        from llama_cpp import llama_get_logits_ith

        assert token_ids, "forward needs at least one token"
        assert num_logits == 1, "the llama.cpp backend returns the last token's logits only"
        self._check_owner()
        if self.length + len(token_ids) > self.draft.n_ctx:
            raise ValueError(
                f"{self.draft.name}: {self.length + len(token_ids)} tokens exceed the llama.cpp context of "
                f"{self.draft.n_ctx}; raise n_ctx"
            )
        self.llm.eval(token_ids)  # decodes in n_batch chunks; logits of each chunk's last token
        n_vocab = self.llm.n_vocab()
        row = np.ctypeslib.as_array(llama_get_logits_ith(self.llm.ctx, -1), shape=(n_vocab,))  # [n_vocab]
        logits = torch.from_numpy(row.copy())[: self.vocab_size]  # [min(n_vocab, vocab)]
        if n_vocab < self.vocab_size:  # ids the GGUF lacks: never drafted
            logits = torch.cat([logits, torch.full((self.vocab_size - n_vocab,), float("-inf"))])
        return logits[None]  # [1, vocab]

    def crop(self, length: int) -> None:
        """Keep the first `length` cached tokens: llama.cpp drops the rest of the sequence's KV."""
        assert 0 <= length <= self.length, (length, self.length)
        self._check_owner()
        if length < self.length:
            self._seq_rm(length)
            self.llm.n_tokens = length


class LlamaCppDraft:
    """A loaded GGUF draft and its llama.cpp context; `LMDrafter` accepts it in place of a torch model."""

    def __init__(self, llm: Llama, name: str, n_ctx: int):
        self.llm = llm
        self.name = name
        self.n_ctx = n_ctx
        self.owner: LlamaCppLM | None = None

    def new_lm(self, vocab_size: int) -> LlamaCppLM:
        """Take the context over for a new session, empty, with logits of vocab_size columns."""
        lm = LlamaCppLM(self, vocab_size)
        self.owner = lm
        return lm


def load_llamacpp(source: str, *, n_threads: int | None = None, n_ctx: int = 8192, n_gpu_layers: int = -1) -> LlamaCppDraft:
    """Load a GGUF draft (a .gguf path or an offline alias) into llama.cpp.

    n_threads defaults to the cores this process may run on (so `taskset` pinning is honoured);
    n_gpu_layers=-1 offloads every layer where the build has a GPU backend (Metal, CUDA) and is
    ignored by CPU builds.
    """
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ImportError(f"the llama.cpp backend needs llama-cpp-python: {INSTALL_HINT}") from exc
    path = models.gguf_path(source)
    threads = n_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    llm = Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        n_gpu_layers=n_gpu_layers, verbose=False,
    )
    logger.info("llama.cpp draft %s: %s, n_vocab %d, n_ctx %d, %d threads", source, path.name, llm.n_vocab(), n_ctx, threads)
    return LlamaCppDraft(llm, source, n_ctx)
