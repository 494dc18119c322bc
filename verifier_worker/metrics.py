"""Prometheus metrics of the verifier (`serve-verifier --metrics-port P` serves them at /metrics).

One registry per servicer. Names follow Prometheus conventions (`specdec_verifier_<what>_<unit>`, counters end
in `_total`); the README lists them. Per-step histograms come from the engine's step hook, per-request ones
from the servicer.
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
