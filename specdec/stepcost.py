"""The verifier's step-cost curve T(tokens, sessions, prefill tokens): compute seconds of one engine step, fitted
online from the engine's own steps (the draft budget's price of a draft token, `specdec.budget`). Pure math.

- `StepCostModel`: an affine fit, t = a + b*tokens + c*sessions + d*prefill_tokens (ridge, exponentially weighted).
  It extrapolates, and prices prompt chunks; its slope b is the Prometheus gauge of the cost per token.
- `StepCostTable`: what the budget prices with. A CPU's real step is not affine in tokens: flat while a step
  is bound by reading the weights, then steep (one core, the 1.5B in bf16: 4 tokens 409 ms, 8 451, 12 529,
  16 624, 24 908, 48 1350; a line through them prices a 4-token step 6% low and a 12-token one 6% high, so
  at 2-4 sessions the grant priced the drafts that pay there too dear, and the ones that did not too cheap).
  So the table keeps, for each token count the engine computed in a step without prefill, the median of its
  latest steps, and prices a count it has seen by that median, one between two seen counts by the line
  between their medians, and one outside them from the nearest seen count along the fit's slope.
- Per session count: the table is kept for each number of sessions a step carried, and a grant is priced by the
  steps of its own session count; where that count has no median yet (a wave's tail: 15, 14, ... sessions), by the
  nearest count above it as the same draft tokens over its more rows (an upper bound: more rows, more past), else
  by the nearest below at the same tokens (session counts apart, the old pricing). The same tokens cost
  more over more sessions wherever attention over their pasts is a real part of a step: on one core of an AMX CPU
  (bf16 natively) a step of one token per session runs padded, and any draft token makes the transformers backend
  pack every session's past into one attention (verifier_worker/kv.py), so 8 sessions took 413 ms for 8 tokens and
  522 ms for 17, 16 sessions 442 ms for 16 and 662 ms for 17. Keyed by tokens alone, a 16-session grant was priced
  by the 8-session steps of the same totals (17 tokens: 522 ms where they cost 662). Live, on that CPU, this reads
  within the spread (n-gram `auto` at 16 sessions 0.90-0.94x `Generate` either way): what loses there is elsewhere
  (a one-wave bench's tail; docs/results.md, session 29).
- No step below the fastest seen of fewer tokens (at its session count): a count seen fewer than `min_samples`
  times has no median yet, but its fastest step bounds every larger count from below (a stall only slows a step),
  and above every median the slope runs from the largest count seen at all. So one step that met a staircase
  (the route's jump above; a GPU's next tile of rows) prices the counts above it at once, where interpolation
  from the counts below would have kept granting into it until each count was seen three times.
  Assumptions: within a session count, a step's cost depends on its computed tokens (rows x longest row for a
  padding backend), not on how they split over sessions; prefill chunks add the fit's d per token; samples older
  than `max_age` steps are dropped (contexts grow, so a step of the same tokens slows down over a session). Limit:
  one stalled step of a count seen once (another tenant, a GC pause: ~1% of this CPU's steps ran 1.3x slower)
  prices the counts above it at that session count too dear until it ages out or that count is seen again.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections import deque


class StepCostModel:
    """Online fit of one engine step's compute seconds: t = a + b * tokens + c * sessions + d * prefill_tokens.

    tokens: the step's verify and decode rows' tokens (what a budget adds to); prefill_tokens: its prompt
    chunks', priced apart because they cost a different amount: a chunk is one long row, which a CPU runs as
    one efficient matrix product, so on the real pair (1.5B, bf16, one core) a prefill token cost ~12 ms and a
    verify block's ~28 ms. One slope over both read the prefills' and told the grant drafts cost half what
    they do (at 4 sessions it granted ~3 tokens a block and ran 0.9x verifier-only).

    Exponentially weighted least squares (each step's weight decays by `forget` per later step, so the fit
    follows drift: thermal throttling, another tenant, a KV that grew) with a ridge prior on the slopes
    toward (b0, c0, d0), worth `prior_steps` steps spread over `scales` tokens / sessions / prompt tokens (weak:
    a strong pull toward a slope of 0 would make drafts look cheap and over-grant), which keeps the first
    few steps, or steps that all had the same size, from swinging the slope (after one step, or steps of
    one size: all fixed cost, as `RttGamma.verify_cost` assumes). The intercept's prior is nearly flat: the
    first step sets the level. The prior does not decay: a direction the data never varies (one token count
    for a long time) keeps the prior's slope instead of winding up. Slopes are never negative: a negative
    one is fixed at 0 and the rest refitted.
    """

    FEATURES = 4  # intercept, tokens, sessions, prefill tokens

    def __init__(self, prior: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0), prior_steps: float = 1.0,
                 forget: float = 0.98, scales: tuple[float, float, float] = (4.0, 2.0, 64.0)):
        if not 0 < forget <= 1 or prior_steps <= 0:
            raise ValueError(f"need 0 < forget <= 1 and prior_steps > 0, got {forget}, {prior_steps}")
        self.forget = forget
        self._prior = list(prior)  # theta0 = (a0, b0, c0, d0)
        # the level is pinned by the first step (a near-flat prior); the prior holds the slopes
        self._prior_precision = [1e-3, *(prior_steps * scale ** 2 for scale in scales)]
        self._xx = [[0.0] * self.FEATURES for _ in range(self.FEATURES)]  # [4, 4] decayed sum of x x^T
        self._xy = [0.0] * self.FEATURES  # [4] decayed sum of x * t
        self.steps = 0
        self._coefficients: tuple[float, ...] | None = tuple(self._prior)  # None: refit when next read

    @property
    def coefficients(self) -> tuple[float, ...]:
        """(a, b, c, d) after the latest step, fitted when read: a fast verifier observes a step every few ms and
        reads the fit only when it makes a grant."""
        if self._coefficients is None:
            self._coefficients = self._fit()
        return self._coefficients

    def peek(self) -> tuple[float, ...]:
        """`coefficients` without keeping a fit it solves: for a reader on another thread (a metrics scrape), which
        must not cache a fit of sums the event loop is changing."""
        coefficients = self._coefficients
        return coefficients if coefficients is not None else self._fit()

    def observe(self, compute_s: float, tokens: int, sessions: int, prefill_tokens: int = 0) -> None:
        """One engine step: `compute_s` seconds for `tokens` verify/decode tokens and `prefill_tokens` prompt
        tokens over `sessions` sessions."""
        x = (1.0, float(tokens), float(sessions), float(prefill_tokens))
        for i in range(self.FEATURES):
            self._xy[i] = self.forget * self._xy[i] + x[i] * compute_s
            for j in range(self.FEATURES):
                self._xx[i][j] = self.forget * self._xx[i][j] + x[i] * x[j]
        self.steps += 1
        self._coefficients = None

    def cost(self, tokens: int, sessions: int, prefill_tokens: int = 0) -> float:
        """Predicted compute seconds of a step of `tokens` verify/decode tokens and `prefill_tokens` prompt
        tokens over `sessions` sessions (>= 0)."""
        a, b, c, d = self.coefficients
        return max(a + b * tokens + c * sessions + d * prefill_tokens, 0.0)

    def marginal(self, tokens: int = 0, sessions: int = 1) -> float:
        """Seconds one more batch token adds to a step of `tokens` tokens (constant in this affine model)."""
        return self.cost(tokens + 1, sessions) - self.cost(tokens, sessions)

    def _fit(self) -> tuple[float, ...]:
        """Ridge solution; the slopes (features 1..) are dropped, i.e. fixed at 0, while negative."""
        free = list(range(self.FEATURES))
        while True:
            a = [[self._xx[i][j] + (self._prior_precision[i] if i == j else 0.0) for j in free] for i in free]
            y = [self._xy[i] + self._prior_precision[i] * self._prior[i] for i in free]
            theta = dict(zip(free, _solve(a, y)))
            negative = [i for i in free if i > 0 and theta[i] < 0]
            if not negative:
                return tuple(theta.get(i, 0.0) for i in range(self.FEATURES))
            free.remove(min(negative, key=lambda i: theta[i] * (self._xx[i][i] ** 0.5)))


def _solve(a: list[list[float]], y: list[float]) -> list[float]:
    """x with a x = y for a small symmetric positive-definite a (Gaussian elimination, partial pivoting)."""
    n = len(y)
    m = [row[:] + [y[i]] for i, row in enumerate(a)]  # [n, n+1]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for k in range(col, n + 1):
                m[r][k] -= f * m[col][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


class StepCostTable:
    """The measured step cost: per (sessions, computed tokens), the median of its latest prefill-free steps, on top of
    the affine `StepCostModel` (module docstring). Same interface as the fit: observe, cost, coefficients."""

    def __init__(self, fit: StepCostModel | None = None, window: int = 15, min_samples: int = 3, max_age: int = 2000):
        self.fit = fit or StepCostModel()
        self.window, self.min_samples, self.max_age = window, min_samples, max_age
        self._samples: dict[tuple[int, int], deque[tuple[int, float]]] = {}  # (sessions, tokens) -> [(step, s)]
        self.steps = 0
        self._curves: dict[int | None, _Curve] = {}  # per session count (None: pooled), until the next step
        self._proxies: dict[int, tuple[_Curve, int]] = {}  # _priced_by's, until the next step

    @property
    def coefficients(self) -> tuple[float, ...]:
        return self.fit.coefficients

    def observe(self, compute_s: float, tokens: int, sessions: int, prefill_tokens: int = 0) -> None:
        self.fit.observe(compute_s, tokens, sessions, prefill_tokens)
        self.steps += 1
        self._curves, self._proxies = {}, {}
        if prefill_tokens == 0 and tokens > 0:
            self._samples.setdefault((sessions, tokens), deque(maxlen=self.window)).append((self.steps, compute_s))

    def medians(self, sessions: int | None = None) -> dict[int, float]:
        """{tokens: median seconds} of the counts with at least min_samples steps in the last max_age steps, at
        `sessions` sessions (None: every session count's steps together)."""
        return self._curve(sessions).medians

    def _curve(self, sessions: int | None) -> _Curve:
        if sessions not in self._curves:  # (made when a grant first reads it after a step)
            oldest, fresh = self.steps - self.max_age, {}
            for (s, n), samples in self._samples.items():
                if sessions is None or s == sessions:
                    fresh.setdefault(n, []).extend(t for step, t in samples if step > oldest)
            self._curves[sessions] = _Curve(fresh, self.min_samples)
        return self._curves[sessions]

    def _priced_by(self, sessions: int) -> tuple[_Curve, int]:
        """(the curve a step over `sessions` sessions is priced by, the tokens to add): its own; else the nearest session
        count above it with a median, as the same draft tokens over its more rows (an upper bound: more rows, more
        past); else the nearest below, by the same tokens; else every count's steps together."""
        if sessions not in self._proxies:
            counts = sorted({s for s, _ in self._samples}, key=lambda s: (s < sessions, abs(s - sessions)))
            near = next((s for s in counts if self._curve(s).medians), None)  # itself, then above, then below
            self._proxies[sessions] = (self._curve(None), 0) if near is None else (
                self._curve(near), max(0, near - sessions))
        return self._proxies[sessions]

    def cost(self, tokens: int, sessions: int, prefill_tokens: int = 0) -> float:
        curve, more = self._priced_by(sessions)
        if not curve.medians:
            return self.fit.cost(tokens, sessions, prefill_tokens)
        _, slope, _, per_prefill_token = self.fit.coefficients
        medians, counts, tokens = curve.medians, curve.counts, tokens + more
        i = bisect.bisect_left(counts, tokens)
        if i < len(counts) and counts[i] == tokens:
            seconds = medians[tokens]
        elif 0 < i < len(counts):  # between two seen counts
            lo, hi = counts[i - 1], counts[i]
            seconds = medians[lo] + (medians[hi] - medians[lo]) * (tokens - lo) / (hi - lo)
        elif i == len(counts):  # above every seen count: along the slope, from the largest one seen at all too
            seconds = max(medians[counts[-1]] + slope * (tokens - counts[-1]), curve.beyond(counts[-1], tokens, slope))
        else:  # below them
            seconds = medians[counts[0]] - slope * (counts[0] - tokens)
        return max(seconds, curve.floor(tokens), 0.0) + per_prefill_token * prefill_tokens

    def marginal(self, tokens: int = 0, sessions: int = 1) -> float:
        """Seconds one more batch token adds to a step of `tokens` tokens."""
        return self.cost(tokens + 1, sessions) - self.cost(tokens, sessions)


class _Curve:
    """One session count's (or the pooled) fresh steps: medians of the counts seen min_samples times, and a floor
    from every count seen at all: a step of n tokens costs no less than the fastest step seen of fewer tokens (at one
    session count; a stall only slows a step, so the fastest is the floor)."""

    def __init__(self, fresh: dict[int, list[float]], min_samples: int):
        self.medians = {n: statistics.median(ts) for n, ts in sorted(fresh.items()) if len(ts) >= min_samples}
        self.counts = list(self.medians)
        seen = sorted((n, min(ts)) for n, ts in fresh.items() if ts)
        self._seen, self._fastest = [n for n, _ in seen], [t for _, t in seen]
        self._floors = list(itertools.accumulate((t for _, t in seen), max))  # running max of the fastest steps

    def floor(self, tokens: int) -> float:
        """The dearest of the fastest steps seen of at most `tokens` tokens (0.0: none)."""
        i = bisect.bisect_right(self._seen, tokens)
        return self._floors[i - 1] if i else 0.0

    def beyond(self, top: int, tokens: int, slope: float) -> float:
        """A step of `tokens`, above every median (the largest `top`), extrapolated along `slope` from the largest
        count seen at all in (top, tokens], by its fastest step (0.0: none)."""
        i = bisect.bisect_right(self._seen, tokens) - 1
        if i < 0 or self._seen[i] <= top:
            return 0.0
        return self._fastest[i] + slope * (tokens - self._seen[i])
