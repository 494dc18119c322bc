"""Prometheus metrics of the draft endpoint (`serve-draft`'s /metrics), in a registry of their own.

Names follow Prometheus conventions (`specdec_draft_<what>_<unit>`, counters end in `_total`); the README
lists them. Tokens are counted when a request ends, from the same GenerationResult its response reports.
Per verifier replica (label `replica`, HOST:PORT): its health, its load as it last reported it, and the
sessions this endpoint has open on it and ever sent it, read from the router when scraped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from specdec.metrics import GenerationResult

RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DraftMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_open = Gauge("specdec_draft_requests_open", "Requests in flight (one verifier session each)", registry=r)
        self.requests = Counter("specdec_draft_requests_total", "Finished HTTP requests by outcome and status code",
                                ["endpoint", "outcome", "code"], registry=r)
        self.prompt_tokens = Counter("specdec_draft_prompt_tokens_total", "Prompt tokens of finished requests", registry=r)
        self.committed = Counter("specdec_draft_tokens_committed_total", "Tokens the verifier committed", registry=r)
        self.proposed = Counter("specdec_draft_tokens_proposed_total", "Draft tokens proposed", registry=r)
        self.accepted = Counter("specdec_draft_tokens_accepted_total", "Draft tokens the verifier accepted", registry=r)
        self.rounds = Counter("specdec_draft_rounds_total", "Draft/verify rounds", registry=r)
        self.round_trip = Histogram("specdec_draft_round_trip_seconds", "Round trip of one proposal to its verdict",
                                    buckets=RTT_BUCKETS, registry=r)
        self.request_seconds = Histogram("specdec_draft_request_seconds", "Generation time of a finished request",
                                         registry=r)

    def watch_replicas(self, router) -> None:
        """Report `router`'s replicas (draft_worker.router.Router) on every scrape."""
        if not getattr(self, "_watching", False):
            self.registry.register(_ReplicaCollector(router))
            self._watching = True

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        self.requests_open.inc()
        try:
            yield
        finally:
            self.requests_open.dec()

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, "ok" if status < 400 else "error", str(status)).inc()

    def observe(self, result: GenerationResult, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.committed.inc(result.new_tokens)
        self.proposed.inc(result.proposed)
        self.accepted.inc(result.accepted)
        self.rounds.inc(result.rounds)
        for rtt in result.rtt_s:
            self.round_trip.observe(rtt)
        self.request_seconds.observe(result.wall_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ReplicaCollector:
    """The router's view of each replica, read at scrape time (a prometheus_client custom collector)."""

    def __init__(self, router):
        self.router = router

    def collect(self):
        families = {
            "serving": GaugeMetricFamily("specdec_draft_replica_up", "1 while the replica serves new sessions "
                                         "(healthy, not draining)", labels=["replica"]),
            "sessions": GaugeMetricFamily("specdec_draft_replica_load_sessions", "Open sessions the replica last reported "
                                          "(all clients)", labels=["replica"]),
            "queued_tokens": GaugeMetricFamily("specdec_draft_replica_load_queued_tokens", "Tokens waiting in the replica's "
                                               "engine queue, as it last reported", labels=["replica"]),
            "open": GaugeMetricFamily("specdec_draft_replica_sessions_open", "This endpoint's sessions open on the "
                                      "replica", labels=["replica"]),
            "total": CounterMetricFamily("specdec_draft_replica_sessions_routed", "Sessions this endpoint sent the replica "
                                         "(opens and failover re-opens)", labels=["replica"]),
        }
        for replica in self.router.snapshot():
            for key, family in families.items():
                family.add_metric([replica["address"]], float(replica[key]))
        yield from families.values()
