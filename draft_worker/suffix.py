"""Suffix decoding (SuffixDecoding, as in ArcticInference's suffix_decoding): draft the most frequent
continuation of the longest matching suffix, over the prompt, the output so far and earlier outputs.

The structure is a depth-bounded suffix trie with counts, stored flat (`SuffixIndex`): a node is a string of
1..depth tokens, keyed by a rolling hash of it, and holds how often each token followed it. Appending a token
at position i adds one count to the nodes of the (at most depth) strings ending at i - 1: O(depth) per token,
never a rebuild; removing it (a rollback, an eviction) takes the same counts away, so an index always equals
the batch build of what it holds. Several indexes answer a lookup as one: their counts add.

One `SuffixCache` per draft process (held by `DraftModels`, one per tokenizer fingerprint) holds the outputs
of its requests, finished and running, bounded in tokens with least-recently-written eviction; every session
reads it and writes its own output into it as it goes (so its output is counted once, there). A session's
prompt lives in its own index. If the cache evicts a running session's output (a cache smaller than the
outputs in flight), that session indexes its output privately from then on and stops publishing.

Drafting (`SuffixDrafter.propose`): match the longest suffix of the context (n tokens), then repeatedly take
the continuation by frequency; stop when the product of the frequencies so far would fall below `min_prob`,
after `ceil(n * spec_factor)` tokens, or at the requested gamma, so a draft is long where the text is
predictable and empty where it is not. Under sampling the token is drawn from the frequencies themselves, and
q is those frequencies (rounded as they travel): a valid draft distribution for the exact verification.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from draft_worker.proposer import Candidates, CommittedContext
from specdec import codec
from specdec.config import SamplingParams
from specdec.sampling import make_generator, sample

_MOD = (1 << 61) - 1  # a Mersenne prime: a collision merges two nodes' counts, which costs acceptance, never exactness
_BASE = 1_000_003


@dataclass(frozen=True)
class SuffixConfig:
    depth: int = 16  # longest suffix matched (the trie's depth); index memory is O(depth) per token
    min_prob: float = 0.1  # stop a draft when the product of its frequencies would fall below this
    spec_factor: float = 1.0  # draft at most ceil(match length x spec_factor) tokens
    cache_tokens: int = 16384  # tokens of outputs the process-wide cache keeps (0 = no cache); ~4 KB each at depth 16

    def __post_init__(self):
        if self.depth < 1 or not 0 <= self.min_prob <= 1 or self.spec_factor <= 0 or self.cache_tokens < 0:
            raise ValueError(f"a suffix drafter needs depth >= 1, min_prob in [0, 1], spec_factor > 0 and "
                             f"cache_tokens >= 0; got {self}")


def suffix_keys(tokens: list[int], end: int, depth: int) -> list[int]:
    """Keys of the strings tokens[end - n : end] for n = 1..min(depth, end), read backwards (rolling hash)."""
    keys, key = [], 0
    for n in range(1, min(depth, end) + 1):
        key = (key * _BASE + tokens[end - n] + 1) % _MOD
        keys.append(key)
    return keys


def shared_prefix(a: list[int], b: list[int]) -> int:
    """len of the longest common prefix, by list comparisons (C speed): O(n) when one extends the other,
    O(n log n) when they diverge, instead of a Python loop over every token each round."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


class SuffixIndex:
    """node key -> {next token: count}: the depth-bounded suffix trie of the positions added, with counts."""

    def __init__(self, depth: int):
        self.depth = depth
        self.nodes: dict[int, dict[int, int]] = {}

    def add(self, tokens: list[int], i: int) -> None:
        """Count tokens[i] as following each string of <= depth tokens that ends at i - 1."""
        token = tokens[i]
        for key in suffix_keys(tokens, i, self.depth):
            node = self.nodes.setdefault(key, {})
            node[token] = node.get(token, 0) + 1

    def remove(self, tokens: list[int], i: int) -> None:
        """Undo `add(tokens, i)` exactly; nodes left empty are dropped."""
        token = tokens[i]
        for key in suffix_keys(tokens, i, self.depth):
            node = self.nodes[key]
            if node[token] > 1:
                node[token] -= 1
            else:
                del node[token]
                if not node:
                    del self.nodes[key]

    def __len__(self) -> int:
        return len(self.nodes)


def longest_match(indexes: list[SuffixIndex], tail: list[int], depth: int) -> tuple[int, dict[int, int]]:
    """(n, counts): the longest suffix of tail, n <= depth tokens, that any index holds, and the counts of what
    followed it in all of them together; (0, {}) when not even the last token recurs. A string's suffixes are
    always held where it is, so the search stops at the first length nobody holds."""
    n, found = 0, []
    for length, key in enumerate(suffix_keys(tail, len(tail), depth), start=1):
        nodes = [index.nodes[key] for index in indexes if key in index.nodes]
        if not nodes:
            break
        n, found = length, nodes
    counts: dict[int, int] = {}
    for node in found:
        for token, count in node.items():
            counts[token] = counts.get(token, 0) + count
    return n, counts


@dataclass
class CacheEntry:
    """One output in the cache: tokens[counted_from:] are counted (the head before them gives their context)."""

    tokens: list[int]
    counted_from: int
    alive: bool = True


class SuffixCache:
    """The outputs of this process's requests, at most max_tokens tokens (heads included), evicting the entry
    written least recently. Thread-safe: sessions draft on worker threads; hold `lock` while reading `index`."""

    def __init__(self, max_tokens: int, depth: int):
        self.max_tokens = max_tokens
        self.index = SuffixIndex(depth)
        self.entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self.size = 0  # tokens held, heads included
        self.lock = threading.RLock()
        self._ids = itertools.count()

    def open(self, head: list[int]) -> tuple[int, CacheEntry]:
        """A new entry whose first counted token will follow `head` (up to depth context tokens, not counted)."""
        with self.lock:
            entry_id, entry = next(self._ids), CacheEntry(list(head), len(head))
            self.entries[entry_id] = entry
            self.size += len(head)
            self._evict()
            return entry_id, entry

    def append(self, entry_id: int, token: int) -> bool:
        """Count token after the entry's tokens; False (and nothing done) if the entry was evicted."""
        with self.lock:
            entry = self.entries.get(entry_id)
            if entry is None:
                return False
            entry.tokens.append(token)
            self.index.add(entry.tokens, len(entry.tokens) - 1)
            self.size += 1
            self.entries.move_to_end(entry_id)  # written now: the most recently used
            self._evict()
            return True

    def pop(self, entry_id: int) -> None:
        """Take back the entry's last counted token (a rollback); nothing if the entry was evicted."""
        with self.lock:
            entry = self.entries.get(entry_id)
            if entry is None:
                return
            assert len(entry.tokens) > entry.counted_from, "only counted tokens are taken back"
            self.index.remove(entry.tokens, len(entry.tokens) - 1)
            entry.tokens.pop()
            self.size -= 1

    def discard(self, entry_id: int) -> None:
        with self.lock:
            entry = self.entries.pop(entry_id, None)
            if entry is not None:
                self._drop(entry)

    def _evict(self) -> None:
        while self.size > self.max_tokens:
            _, entry = self.entries.popitem(last=False)
            self._drop(entry)

    def _drop(self, entry: CacheEntry) -> None:
        for i in range(len(entry.tokens) - 1, entry.counted_from - 1, -1):
            self.index.remove(entry.tokens, i)
        self.size -= len(entry.tokens)
        entry.alive = False


class SuffixDrafter(CommittedContext):
    """Draft by suffix matching over the prompt, the output so far and the process's cache of outputs.

    Syncing to a context is incremental: the tokens it shares with the last context stay indexed, a divergent
    tail is taken back and the rest is added (O(depth) per token).
    """

    def __init__(self, cache: SuffixCache | None, config: SuffixConfig = SuffixConfig(), name: str = "suffix",
                 fingerprint: str = "", dense_dtype: str = "fp16"):
        self.cache = cache
        self.config = config
        self.name = name
        self.fingerprint = fingerprint  # of the tokenizer that made the prompt ids it drafts
        self.dense_dtype = dense_dtype

    def start(self, prompt_ids: list[int], params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.tokens = list(prompt_ids)  # committed (lock-step's CommittedContext)
        self._block: list[int] = []
        self.generator = make_generator(None if params.seed is None else (params.seed + 1) % 2**64, "cpu")
        self.prompt_index = SuffixIndex(self.config.depth)  # positions < boundary
        self.output_index = SuffixIndex(self.config.depth)  # positions >= boundary, once not publishing
        self.boundary = len(prompt_ids)
        self.synced: list[int] = []  # the context indexed so far
        self.entry_id: int | None = None
        self.publishing = self.cache is not None and self.cache.max_tokens > 0
        self._sync(self.tokens)

    # ------------------------------------------------------------------------------------------- the index
    def _published(self) -> bool:
        return self.entry_id is not None and self.cache.entries.get(self.entry_id) is not None

    def _unpublish(self) -> None:
        """The cache evicted this running session's output: match it from a private index from now on."""
        self.publishing, self.entry_id = False, None
        self.output_index = SuffixIndex(self.config.depth)
        for i in range(self.boundary, len(self.synced)):
            self.output_index.add(self.synced, i)

    def _learn(self, i: int) -> None:
        """Index position i, the last of self.synced."""
        if i < self.boundary:
            self.prompt_index.add(self.synced, i)
        elif not self.publishing:
            self.output_index.add(self.synced, i)
        else:
            if self.entry_id is None:
                head = self.synced[max(0, self.boundary - self.config.depth) : self.boundary]
                self.entry_id, _ = self.cache.open(head)
            if not self.cache.append(self.entry_id, self.synced[i]):
                self._unpublish()

    def _forget(self, i: int) -> None:
        """Take back position i, the last of self.synced."""
        if i < self.boundary:
            self.prompt_index.remove(self.synced, i)
        elif not self.publishing:
            self.output_index.remove(self.synced, i)
        elif self.entry_id is not None:
            self.cache.pop(self.entry_id)  # a no-op once evicted: `_unpublish` rebuilds from self.synced

    def _sync(self, context: list[int]) -> None:
        keep = shared_prefix(self.synced, context)
        left_prompt = keep < min(self.boundary, len(self.synced))  # then what follows is output, after a new head
        for i in range(len(self.synced) - 1, keep - 1, -1):
            self._forget(i)
            self.synced.pop()
        if left_prompt:
            self.boundary = keep
            if self.entry_id is not None:
                self.cache.discard(self.entry_id)
                self.entry_id = None
        for i in range(keep, len(context)):
            self.synced.append(context[i])
            self._learn(i)

    # ------------------------------------------------------------------------------------------ drafting
    def _sources(self) -> list[SuffixIndex]:
        if self.publishing and self.entry_id is not None and not self._published():
            self._unpublish()
        if self.publishing:
            return [self.prompt_index, self.cache.index]  # the cache holds this session's output already
        return [self.prompt_index, self.output_index] + ([self.cache.index] if self.cache is not None else [])

    def continuations(self, tail: list[int]) -> tuple[int, dict[int, int]]:
        """(match length, {token: count}) after the longest matched suffix of tail, ids in the vocabulary."""
        n, counts = longest_match(self._sources(), tail, self.config.depth)
        return n, {t: c for t, c in counts.items() if t < self.vocab_size}

    def _frequencies(self, counts: dict[int, int]) -> torch.Tensor:
        """q [vocab]: the counts as a distribution, rounded as it travels (the draft samples from these weights)."""
        q = torch.zeros(self.vocab_size)
        q[torch.tensor(list(counts))] = torch.tensor(list(counts.values()), dtype=torch.float32)
        return codec.wire_round(q / q.sum(), self.params, self.dense_dtype)

    def propose(self, context: list[int], gamma: int) -> Candidates:
        self._sync(context)
        draft_ids: list[int] = []
        rows: list[torch.Tensor] = []
        tail = list(context[-self.config.depth :])
        confidence, limit = 1.0, gamma
        lock = self.cache.lock if self.cache is not None else threading.RLock()
        with lock:
            while len(draft_ids) < limit:
                n, counts = self.continuations(tail)
                if not counts:
                    break
                if not draft_ids:
                    limit = min(gamma, math.ceil(n * self.config.spec_factor))
                total = sum(counts.values())
                best, best_count = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))  # most frequent, then lowest id
                if confidence * best_count / total < self.config.min_prob:
                    break
                if self.params.greedy:
                    token, frequency = best, best_count / total
                else:
                    q = self._frequencies(counts)  # [vocab]
                    token = int(sample(q, self.generator))
                    frequency = float(q[token] / q.sum())
                    rows.append(q)
                confidence *= frequency
                draft_ids.append(token)
                tail = (tail + [token])[-self.config.depth :]
        return Candidates(draft_ids, torch.stack(rows) if rows else None, self.dense_dtype)
