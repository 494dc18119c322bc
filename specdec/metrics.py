"""What one generation request measured, shared by the draft worker, the CLI and the benchmark.

Vocabulary (vLLM's): a draft token is *accepted* or rejected; after a rejection the verifier commits a
*recovered* token, after a fully accepted block a *bonus* token. acceptance rate = accepted / proposed;
mean acceptance length = tokens committed per round, the recovered/bonus token included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids only
    text: str = ""
    wall_s: float = 0.0  # generation time, model loading excluded
    ttft_s: float = 0.0  # time to the first committed token
    finish_reason: str = ""
    rounds: int = 0
    proposed_per_round: list[int] = field(default_factory=list)  # draft tokens verified per verdict or async commit
    accepted_per_round: list[int] = field(default_factory=list)
    rtt_s: list[float] = field(default_factory=list)  # client round trip per round
    service_s: list[float] = field(default_factory=list)  # verifier queue + compute per round
    prefill_service_s: float = 0.0
    # the verifier's engine step each round rode in (one batched forward over many sessions):
    compute_s: list[float] = field(default_factory=list)  # its wall time, the whole batch's
    queue_s: list[float] = field(default_factory=list)  # waiting for it: service_s - compute_s
    batch_size: list[int] = field(default_factory=list)  # sessions in it
    batch_tokens: list[int] = field(default_factory=list)  # tokens it computed, all sessions
    prefill_compute_s: float = 0.0  # wall time of the step(s) the prefill rode in
    # this request's share of verifier compute, prefill included: each step's wall time split across its
    # sessions by their share of the step's tokens, so the requests' shares add up to the verifier's busy time
    verifier_compute_s: float = 0.0
    draft_s: float = 0.0  # time spent drafting
    bytes_sent: int = 0  # protobuf payload bytes, client -> verifier
    bytes_received: int = 0
    reconnects: int = 0  # times the client re-opened the request after the verifier went away
    replicas: list[str] = field(default_factory=list)  # the verifier replica (HOST:PORT) of each attempt, in order
    mode: str = "lockstep"  # specdec.config.SPEC_MODES; async rounds are engine steps, one commit each
    # one entry per proposal sent, in every mode: the schedule's gamma it was drafted at (its draft may be shorter:
    # cut by max_new_tokens or async's look-ahead, a drafter that found fewer, positions committed meanwhile)
    gamma_per_round: list[int] = field(default_factory=list)
    # issue 18: the verifier's draft budget that came with each verdict or commit (and the opening), in order
    # (empty from a verifier that grants none)
    budget_per_round: list[int] = field(default_factory=list)
    stale: int = 0  # proposals the verifier dropped: the prefix they assumed was not committed
    shadows: int = 0  # shadow blocks reported (draft_worker/shadow.py): drafted while the verifier decoded alone
    unsent: int = 0  # async: claims withheld (not sent, or not even drafted), the verifier being past them on arrival
    # when each reply that committed tokens arrived, seconds since the request started, and how many it
    # committed: ITL is per chunk (several tokens arrive per verdict), TTFT the first entry
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    # the verifier's log-probabilities, when the request asked (SamplingParams.logprobs / prompt_logprobs):
    # one (logprob, [(id, logprob), ...] top alternatives) per generated token, and per prompt token from the second
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    started: float = field(default=0.0, repr=False)  # perf_counter() at the request's start (not reported)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def proposed(self) -> int:
        return sum(self.proposed_per_round)

    @property
    def accepted(self) -> int:
        return sum(self.accepted_per_round)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def network_s(self) -> float:
        """Round trip minus verifier service time, summed: network, framing and (de)serialisation."""
        return max(0.0, sum(self.rtt_s) - sum(self.service_s))

    def record_chunk(self, now: float, tokens: int) -> None:
        """A reply committed `tokens` at perf_counter() `now`."""
        if tokens:
            self.chunk_times_s.append(now - self.started)
            self.chunk_tokens.append(tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["started"]
        for name in ("new_tokens", "proposed", "accepted", "acceptance_rate", "mean_acceptance_length",
                     "network_s", "tokens_per_s"):
            out[name] = getattr(self, name)
        out["network_share"] = self.network_s / self.wall_s if self.wall_s > 0 else 0.0
        return out
