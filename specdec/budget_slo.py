"""The latency targets' part of the draft budget's grant (specdec/budget.py, `_grant`): for each total of draft
tokens K, the least budgets meeting every session's target, and when no K can meet them all, the least common
stretch of the targets that some K meets. Pure numpy over the greedy's tables; see budget.py's docstring for the
model ("Latency target")."""

from __future__ import annotations

import heapq

import numpy as np


def least_stretch(table: np.ndarray, caps: np.ndarray, seconds: np.ndarray, slos: np.ndarray) -> float:
    """The least v such that some K meets every slo_i * v: min_K T(K) w(K), with w(K) the least, over
    budgets of K draft tokens, of max_i 1 / (slo_i E_i(gamma_i)), which raising the worst session's gamma
    first attains (each 1 / E_i falls as its gamma grows) until the worst is at its cap."""
    heap = [(-1 / (slo * table[i, 0]), i) for i, slo in enumerate(slos) if np.isfinite(slo)]  # (-1 / (slo E), i)
    heapq.heapify(heap)
    gammas, w = [0] * len(caps), [-heap[0][0]]  # w[K]
    while len(w) < len(seconds) and gammas[heap[0][1]] < caps[heap[0][1]]:
        _, i = heapq.heappop(heap)
        gammas[i] += 1
        heapq.heappush(heap, (-1 / (slos[i] * table[i, gammas[i]]), i))
        w.append(-heap[0][0])
    w += [w[-1]] * (len(seconds) - len(w))
    return float((seconds * np.array(w)).min())


def best_within(table: np.ndarray, caps: np.ndarray, counts: np.ndarray, seconds: np.ndarray,
                 slos: np.ndarray) -> np.ndarray | None:
    """[n] the budgets of the best K whose step meets every SLO (None: no K does), ties to the smaller K. Row K of
    `counts` and `seconds`: the greedy's first K draft tokens and their step; with no SLO the rows are the greedy's
    prefixes whatever they send (`specdec.budget._greedy_counts`), and the best row wins.

    For each K: the floors m_i = the least gamma_i with E_i(gamma_i) >= T(K) / slo_i, then the greedy's
    tokens above them: max(m, counts[P]) for the least prefix P of the greedy that sums to K (the prefix
    holds the largest steps of all, so those above the floors are the largest steps above the floors).
    """
    k = np.arange(len(seconds))  # [K + 1]
    if np.isinf(slos).all():
        budgets, feasible = counts, np.ones(len(k), dtype=bool)  # [K + 1, n]
    else:
        need = seconds[:, None] / slos[None, :] * (1 - 1e-12)  # [K + 1, n] least E_i for T(K) / E_i <= slo_i
        floors = np.stack([np.searchsorted(table[i, : c + 1], need[:, i]) for i, c in enumerate(caps)], axis=1)
        feasible = (floors <= caps).all(axis=1) & (floors.sum(axis=1) <= k)
        if not feasible.any():
            return None
        floors = np.minimum(floors, caps)
        low, high = np.zeros_like(k), np.full_like(k, len(counts) - 1)  # bisection over P, for every K at once
        while (low < high).any():
            mid = (low + high) // 2
            short = np.maximum(floors, counts[mid]).sum(axis=1) < k
            low, high = np.where(short, mid + 1, low), np.where(short, high, mid)
        budgets = np.maximum(floors, counts[low])  # [K + 1, n], summing to K where feasible
    expected = table[np.arange(len(caps))[None, :], budgets].sum(axis=1)  # [K + 1]
    rate = np.where(feasible, expected / seconds, -np.inf)
    best = int(np.argmax(rate >= rate.max() * (1 - 1e-12)))  # the least K within rounding of the best
    return budgets[best]
