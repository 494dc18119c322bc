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
  Assumptions: a step's cost depends on its computed tokens (rows x longest row for a padding backend), not
  on how they split over sessions (one core: 4 x 3 tokens 529 ms, 16 x 1 624 ms, on the same line); prefill
  chunks add the fit's d per token; samples older than `max_age` steps are dropped (contexts grow, so a step
  of the same tokens slows down over a session).
"""

from __future__ import annotations

import bisect
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
    """The measured step cost: per computed-token count, the median of its latest prefill-free steps, on top of
    the affine `StepCostModel` (module docstring). Same interface as the fit: observe, cost, coefficients."""

    def __init__(self, fit: StepCostModel | None = None, window: int = 15, min_samples: int = 3, max_age: int = 2000):
        self.fit = fit or StepCostModel()
        self.window, self.min_samples, self.max_age = window, min_samples, max_age
        self._samples: dict[int, deque[tuple[int, float]]] = {}  # tokens -> [(step, seconds)], newest last
        self.steps = 0
        self._medians: dict[int, float] | None = None  # medians() until the next step (a grant prices hundreds)
        self._counts: list[int] = []  # its keys, sorted

    @property
    def coefficients(self) -> tuple[float, ...]:
        return self.fit.coefficients

    def observe(self, compute_s: float, tokens: int, sessions: int, prefill_tokens: int = 0) -> None:
        self.fit.observe(compute_s, tokens, sessions, prefill_tokens)
        self.steps += 1
        self._medians = None
        if prefill_tokens == 0 and tokens > 0:
            self._samples.setdefault(tokens, deque(maxlen=self.window)).append((self.steps, compute_s))

    def medians(self) -> dict[int, float]:
        """{tokens: median seconds} of the counts with at least min_samples steps in the last max_age steps."""
        if self._medians is None:
            oldest = self.steps - self.max_age
            fresh = {n: [t for step, t in samples if step > oldest] for n, samples in self._samples.items()}
            self._medians = {n: statistics.median(ts) for n, ts in sorted(fresh.items()) if len(ts) >= self.min_samples}
            self._counts = list(self._medians)
        return self._medians

    def cost(self, tokens: int, sessions: int, prefill_tokens: int = 0) -> float:
        medians = self.medians()
        if not medians:
            return self.fit.cost(tokens, sessions, prefill_tokens)
        _, slope, _, per_prefill_token = self.fit.coefficients
        counts = self._counts  # sorted, as medians() left them
        i = bisect.bisect_left(counts, tokens)
        if i < len(counts) and counts[i] == tokens:
            seconds = medians[tokens]
        elif 0 < i < len(counts):  # between two seen counts
            lo, hi = counts[i - 1], counts[i]
            seconds = medians[lo] + (medians[hi] - medians[lo]) * (tokens - lo) / (hi - lo)
        elif i == len(counts):  # above every seen count
            seconds = medians[counts[-1]] + slope * (tokens - counts[-1])
        else:  # below them
            seconds = medians[counts[0]] - slope * (counts[0] - tokens)
        return max(seconds, 0.0) + per_prefill_token * prefill_tokens

    def marginal(self, tokens: int = 0, sessions: int = 1) -> float:
        """Seconds one more batch token adds to a step of `tokens` tokens."""
        return self.cost(tokens + 1, sessions) - self.cost(tokens, sessions)
