"""Drafters: cheap proposers of the next gamma tokens, behind one small interface.

`start(prompt_ids)` begins a request; `propose(context, gamma)` drafts up to gamma tokens continuing
`context` (prompt + committed + any tokens the client guesses will be committed) and, when sampling, their
draft distribution q as the verifier will decode it. A drafter syncs itself to whatever context it is given
(the LM crops its cache to the longest prefix it shares with the context, as HF's candidate generators do),
so drafting ahead of the verifier and resyncing after a divergent commit need nothing else. Lock-step's
`get_candidates(gamma)` / `commit(num_accepted, next_token)` pair is `propose` on the committed tokens.
Nothing here talks to the network. `build_drafter` is the one way to make a drafter from a `DrafterSpec`, for the CLI, the
benchmark's Ray workers and the scripts alike; `DraftModels` loads each draft model once per process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from draft_worker.proposer import Candidates, CommittedContext, Drafter, common_prefix  # noqa: F401 - re-exported
from draft_worker.suffix import SuffixCache, SuffixConfig, SuffixDrafter
from specdec import codec
from specdec.config import MAX_GAMMA, SamplingParams
from specdec.lm import CachedLM
from specdec.sampling import logits_to_probs, make_generator, sample

if TYPE_CHECKING:
    from draft_worker.llamacpp import LlamaCppDraft


@dataclass
class AdaptiveGamma:
    """HF's "heuristic" schedule for gamma: +2 after a fully accepted block, -1 (not below 1) otherwise."""

    gamma: int = 4
    max_gamma: int = MAX_GAMMA

    def update(self, proposed: int, accepted: int, **_) -> None:
        if proposed == 0:  # nothing was drafted (block capped by max_new_tokens, or no n-gram match)
            return
        self.gamma = min(self.gamma + 2, self.max_gamma) if accepted == proposed else max(1, self.gamma - 1)


class LMDrafter(CommittedContext):
    """A small causal LM with a KV cache: gamma forwards per proposal, after cropping the cache to the longest
    prefix it shares with the context (a rejection, a resync) and feeding the rest (a full accept's last draft
    token and the bonus token); a context the cache already holds is never evaluated again.

    The model is a transformers module (run through `CachedLM`) or a llama.cpp GGUF draft
    (`draft_worker.llamacpp.LlamaCppDraft`, whose LM has the same forward/crop/length and fits its
    logits to the verifier's vocabulary); everything below is shared by both.
    """

    def __init__(self, model: torch.nn.Module | LlamaCppDraft, name: str, dense_dtype: str = "fp16", fingerprint: str = ""):
        self.model = model
        self.name = name
        self.dense_dtype = dense_dtype
        self.fingerprint = fingerprint

    def _new_lm(self, vocab_size: int):
        if not isinstance(self.model, torch.nn.Module):
            return self.model.new_lm(vocab_size)
        logits = self.model.get_output_embeddings().weight.shape[0]
        if vocab_size != logits:
            raise ValueError(f"draft model {self.name} has {logits} logits, the verifier {vocab_size}: they must match")
        return CachedLM(self.model)

    def start(self, prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
        self.lm = self._new_lm(vocab_size)
        self.params = params
        self.tokens = list(prompt_ids)
        self.cached: list[int] = []  # the token ids whose KV the LM holds
        # its own stream, derived from the session seed (the verifier uses the seed itself)
        self.generator = make_generator(None if params.seed is None else (params.seed + 1) % 2**64, "cpu")
        self._block: list[int] = []

    def next_logits(self, context: list[int]) -> torch.Tensor:
        """logits [vocab] for the token after `context`, after cropping the cache to the prefix it shares with it."""
        keep = min(common_prefix(self.cached, context), len(context) - 1)  # the last token is fed, for its logits
        if keep < self.lm.length:
            self.lm.crop(keep)
        logits = self.lm.forward(context[keep:], num_logits=1)[0]  # [vocab]
        self.cached = list(context)
        return logits

    def propose(self, context: list[int], gamma: int) -> Candidates:
        draft_ids: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(gamma):
            logits = self.next_logits([*context, *draft_ids])  # feeds only what the cache lacks
            if self.params.greedy:
                token = int(logits.argmax())
            else:
                q = codec.wire_round(logits_to_probs(logits, self.params), self.params, self.dense_dtype)  # [vocab]
                token = int(sample(q, self.generator))
                rows.append(q)
            draft_ids.append(token)
        q_block = torch.stack(rows) if rows else None  # [gamma, vocab]
        return Candidates(draft_ids, q_block, self.dense_dtype)


class NgramDrafter(CommittedContext):
    """Prompt lookup: propose what followed the latest earlier match of the last n tokens (no model).

    Tries n = max_ngram down to min_ngram; proposes nothing when no n-gram recurs, and the round is then
    a plain verifier step. Deterministic, so under sampling q is one-hot on each proposed token.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, name: str = "ngram", fingerprint: str = ""):
        assert 1 <= min_ngram <= max_ngram
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.name = name
        self.fingerprint = fingerprint  # of the tokenizer that made the prompt ids it looks up

    def start(self, prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
        self.tokens = list(prompt_ids)
        self.params = params
        self.vocab_size = vocab_size
        self._block: list[int] = []

    @staticmethod
    def lookup(tokens: list[int], gamma: int, max_ngram: int, min_ngram: int) -> list[int]:
        for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # latest match first, excluding the suffix itself
                if tokens[start : start + n] == suffix:
                    return tokens[start + n : start + n + gamma]
        return []

    def propose(self, context: list[int], gamma: int) -> Candidates:
        draft_ids = self.lookup(context, gamma, self.max_ngram, self.min_ngram) if gamma > 0 else []
        q = None if self.params.greedy or not draft_ids else codec.one_hot_probs(draft_ids, self.vocab_size)
        return Candidates(draft_ids, q)


@dataclass(frozen=True)
class DrafterSpec:
    """What to draft with: the same spec builds the same drafter in the CLI, a Ray worker or a script."""

    kind: str = "lm"  # "lm" | "ngram" | "suffix"
    model: str | None = None  # lm: Hub id, folder, .gguf file or offline: alias
    backend: str = "transformers"  # lm: "transformers" | "llama.cpp" (a .gguf file or offline: alias)
    dtype: str = "auto"  # transformers only, as is device: bf16 where the CPU runs it natively, else fp32
    device: str = "cpu"
    dense_dtype: str = "fp16"  # wire dtype of full-vocabulary q under sampling: fp16 | fp32
    ngram_max: int = 3
    suffix_cache_tokens: int = 16384  # suffix: tokens of earlier outputs the process keeps (draft_worker/suffix.py)
    suffix_min_prob: float = 0.1  # suffix: stop a draft when its frequencies' product falls below this
    tree_nodes: int = 0  # lm, suffix: propose token trees of at most this many nodes (draft_worker/trees.py); 0 = chains


@dataclass(frozen=True)
class LoadedDraft:
    model: torch.nn.Module | LlamaCppDraft
    tokenizer: object  # a transformers tokenizer
    fingerprint: str  # specdec.models.tokenizer_fingerprint(tokenizer)


class DraftModels:
    """Draft models loaded once per process, by (source, backend, dtype, device). Loading raises
    OSError/ValueError, and ImportError for llama.cpp without llama-cpp-python."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str, str, str], LoadedDraft] = {}
        self._suffix_caches: dict[tuple[str, int, int], object] = {}  # suffix drafter: one cache per tokenizer

    def suffix_cache(self, fingerprint: str, max_tokens: int, depth: int):
        """The process's draft_worker.suffix.SuffixCache for prompts of this tokenizer, shared by its sessions."""
        key = (fingerprint, max_tokens, depth)
        if key not in self._suffix_caches:
            self._suffix_caches[key] = SuffixCache(max_tokens, depth)
        return self._suffix_caches[key]

    def load(self, spec: DrafterSpec) -> LoadedDraft:
        from specdec import models

        key = (spec.model, spec.backend, spec.dtype, spec.device)
        if key not in self._loaded:
            if spec.backend == "llama.cpp":
                from draft_worker.llamacpp import load_llamacpp

                model = load_llamacpp(spec.model, n_threads=torch.get_num_threads())  # as many as torch drafts with
                tokenizer = models.load_tokenizer(str(models.gguf_path(spec.model)))  # the tokenizer in that GGUF
            elif spec.backend == "transformers":
                device = models.resolve_device(spec.device)
                dtype = models.parse_dtype(spec.dtype, device)
                tokenizer = models.load_tokenizer(spec.model)
                model = models.load_model(spec.model, dtype=dtype, device=device)
            else:
                raise ValueError(f"unknown draft backend {spec.backend!r}; expected transformers or llama.cpp")
            self._loaded[key] = LoadedDraft(model, tokenizer, models.tokenizer_fingerprint(tokenizer))
        return self._loaded[key]


def build_drafter(spec: DrafterSpec, draft_models: DraftModels | None = None, prompt_fingerprint: str = "") -> Drafter:
    """A fresh drafter for one request. An LM drafter reports its own tokenizer's fingerprint; the n-gram and
    suffix drafters draft the prompt's own ids, so they report the prompt tokenizer's (`prompt_fingerprint`).
    Suffix drafters built with the same `draft_models` share one cache of outputs. With `tree_nodes` the drafter
    proposes token trees (its `tree_nodes` attribute, read by the client loop)."""
    drafter = _build(spec, draft_models, prompt_fingerprint)
    if spec.tree_nodes:
        if spec.kind == "ngram":
            raise ValueError("token trees come from the lm and suffix drafters; the n-gram drafter proposes chains")
        drafter.tree_nodes = spec.tree_nodes
    return drafter


def _build(spec: DrafterSpec, draft_models: DraftModels | None, prompt_fingerprint: str) -> Drafter:
    if spec.kind == "ngram":
        return NgramDrafter(max_ngram=spec.ngram_max, fingerprint=prompt_fingerprint)
    if spec.kind == "suffix":  # like ngram, it drafts the prompt's own ids
        config = SuffixConfig(min_prob=spec.suffix_min_prob, cache_tokens=spec.suffix_cache_tokens)
        cache = (draft_models or DraftModels()).suffix_cache(prompt_fingerprint, config.cache_tokens, config.depth)
        return SuffixDrafter(cache, config, fingerprint=prompt_fingerprint, dense_dtype=spec.dense_dtype)
    if spec.kind != "lm" or not spec.model:
        raise ValueError(f"a drafter is kind 'lm' with a model, or kind 'ngram' or 'suffix'; got {spec}")
    loaded = (draft_models or DraftModels()).load(spec)
    return LMDrafter(loaded.model, spec.model, spec.dense_dtype, loaded.fingerprint)
