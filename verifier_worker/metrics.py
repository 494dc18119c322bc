"""Prometheus metrics of the verifier (`serve-verifier --metrics-port P` serves them at /metrics).

One registry per servicer. Names follow Prometheus conventions (`specdec_verifier_<what>_<unit>`, counters end
in `_total`); the README lists them. Per-step histograms come from the engine's step hook, per-request ones
from the servicer, the draft budget's (`BudgetMetrics`) from the budgeter (verifier_worker/budgeting.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SESSIONS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKENS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048)
BUDGETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)  # draft budgets granted
GAINS = (1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0)  # goodput a grant promises over none


class VerifierMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.sessions_open = Gauge("specdec_verifier_sessions_open", "Open Speculate/Generate sessions", registry=r)
        self.requests = Counter("specdec_verifier_requests_total", "Finished RPCs by method, outcome and status code",
                                ["method", "outcome", "code"], registry=r)
        self.prompt_tokens = Counter("specdec_verifier_prompt_tokens_total", "Prompt tokens of opened sessions", registry=r)
        self.committed = Counter("specdec_verifier_tokens_committed_total", "Tokens committed (accepted + recovered/bonus)",
                                 registry=r)
        self.proposed = Counter("specdec_verifier_tokens_proposed_total", "Draft tokens received for verification", registry=r)
        self.accepted = Counter("specdec_verifier_tokens_accepted_total", "Draft tokens accepted", registry=r)
        self.stale = Counter("specdec_verifier_proposals_stale_total",
                             "Proposals dropped without compute: the prefix they assumed was not committed", registry=r)
        self.step_compute = Histogram("specdec_verifier_step_compute_seconds", "Wall time of one batched engine step",
                                      buckets=SECONDS, registry=r)
        self.step_sessions = Histogram("specdec_verifier_step_batch_sessions", "Sessions in one engine step",
                                       buckets=SESSIONS, registry=r)
        self.step_tokens = Histogram("specdec_verifier_step_batch_tokens", "Tokens one engine step computed",
                                     buckets=TOKENS, registry=r)
        self.queue = Histogram("specdec_verifier_queue_seconds", "Time a request's work waited for its step",
                               buckets=SECONDS, registry=r)

    def step(self, compute_s: float, sessions: int, tokens: int) -> None:
        """The engine's hook, called once per step."""
        self.step_compute.observe(compute_s)
        self.step_sessions.observe(sessions)
        self.step_tokens.observe(tokens)

    def verdict(self, proposed: int, accepted: int, committed: int) -> None:
        self.proposed.inc(proposed)
        self.accepted.inc(accepted)
        self.committed.inc(committed)


def tracked(method: str):
    """Decorate a servicer's streaming RPC (an async generator method): count how each call ended, in
    `self.metrics.requests`, and close the replies promptly when the client goes away."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def handler(self, request, context):
            code = "OK"
            try:
                async with contextlib.aclosing(fn(self, request, context)) as replies:
                    async for reply in replies:
                        yield reply
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except BaseException:
                code = _code_name(context.code) or "UNKNOWN"
                raise
            finally:
                self.metrics.requests.labels(method, "ok" if code == "OK" else "error", code).inc()
        return handler
    return wrap


def _code_name(code: Callable) -> str | None:
    status = code()
    return getattr(status, "name", None)


class BudgetMetrics:
    """Prometheus metrics of the budget (register on the servicer's registry, `VerifierMetrics.registry`)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.granted = Histogram("specdec_verifier_draft_budget_tokens",
                                 "Draft budget granted with each verdict or commit: most draft tokens the next block may carry",
                                 buckets=BUDGETS, registry=r)
        self.cost_per_token = Gauge("specdec_verifier_step_cost_per_token_seconds",
                                    "Fitted step compute seconds per batch token (the cost curve's slope)", registry=r)
        self.cost_fixed = Gauge("specdec_verifier_step_cost_fixed_seconds",
                                "Fitted step compute seconds independent of the batch (the cost curve's intercept)",
                                registry=r)
        self.gain = Histogram("specdec_verifier_draft_budget_predicted_gain",
                              "Per step that grants drafts: the goodput the model expects of the grant over granting "
                              "none", buckets=GAINS, registry=r)
        self.late = Counter("specdec_verifier_late_blocks_total",
                            "Lock-step sessions granted drafts whose block missed the next step (it started without "
                            "them)", registry=r)
        self.shadows = Counter("specdec_verifier_shadow_verdicts_total",
                               "Shadow blocks counted into acceptance: drafted by a client while the verifier decoded "
                               "its session alone, checked against what it committed", registry=r)
        self.calibration = Gauge("specdec_verifier_draft_budget_calibration",
                                 "Accepted draft tokens the granted blocks bought per token their grants promised "
                                 "over every drafter (each drafter's own ratio scales its sessions' estimates before the "
                                 "grant; at most 1)", registry=r)
        self.grant_seconds = Histogram("specdec_verifier_draft_budget_grant_seconds",
                                       "Event-loop seconds spent making one grant for every session (between steps)",
                                       buckets=(1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2), registry=r)
        self.over_budget = Counter("specdec_verifier_draft_tokens_over_budget_total",
                                   "Draft tokens dropped unverified because a block carried more than its budget",
                                   registry=r)
