"""A discrete-event simulator of one verifier serving lock-step speculative sessions: capacity for hardware we lack.

The model (every input measured, see orchestrator/plan.py):
- Requests arrive by a seeded Poisson process (serving.poisson_arrivals) and wait for one of `slots` draft
  slots (None: every user drafts on their own machine, no wait).
- The verifier runs one step at a time. A step takes every block waiting at its start (continuous batching)
  and lasts cost(tokens, sessions) seconds (the step-cost curve) plus `prefill_s` per prompt in it; blocks
  arriving meanwhile wait for the next step (the verifier's queue), which, as the engine's, waits a little
  (batch_wait_s, at most a quarter step) for the sessions of the last step to send their next block.
- A speculative session, lock-step: its prompt goes to the verifier (rtt/2), is prefilled and the first token
  comes back (rtt/2). Then each round drafts g = min(gamma, tokens left - 1) tokens (g x draft_s_per_token),
  sends the block (rtt/2), is verified as g + 1 tokens, and commits min(a, g) + 1 tokens when the verdict
  arrives (rtt/2); a, the accepted draft tokens, replays a measured trace, round by round (cycled), each
  request taking the next trace.
- Verifier-only (gamma 0) is Generate: after the prefill the session decodes one token per step at the
  verifier with no round trip between steps; each token reaches the user rtt/2 after its step.
- Draft slots on shared draft cores: when a block is drafted while n requests hold slots on the draft
  worker, drafting costs draft_s_per_token + draft_s_per_token_per_session x (n - 1) per token, both fitted
  to the run's records (orchestrator/plan.py), as 8 LM sessions on one draft core slow each other. With
  unlimited slots (every user drafts on their own machine) n is 1.
Not modelled: drafting while a verdict is in flight (ahead/async modes), the draft worker's own client and
link overhead, network jitter, reconnects.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import serving
from specdec.config import VerifierLimits

StepCostFn = Callable[[int, int], float]  # (tokens in the step, sessions in it) -> seconds
BATCH_WAIT_S = VerifierLimits().batch_wait_s  # the engine's default (serve-verifier --batch-wait-ms)


@dataclass(frozen=True)
class Workload:
    name: str
    gamma: int  # draft tokens per block; 0 = verifier-only generation
    traces: tuple[tuple[int, ...], ...]  # accepted draft tokens per round, one trace per measured request
    draft_s_per_token: float  # uncontended: one request on the draft worker
    new_tokens: int  # generated per request
    prefill_s: float  # verifier time a prompt adds to the step it rides in
    draft_s_per_token_per_session: float = 0.0  # added per other request holding a draft slot meanwhile

    def draft_s(self, tokens: int, sessions: int) -> float:
        """Seconds to draft `tokens` while `sessions` requests (this one included) hold draft slots."""
        return tokens * (self.draft_s_per_token + self.draft_s_per_token_per_session * max(0, sessions - 1))


class _Verifier:
    """Continuous batching as verifier_worker/engine.py does it: a step takes every waiting block; after a step,
    while blocks wait but a session of that step has not sent its next one yet, the next step waits for it,
    at most min(batch_wait_s, a quarter of the last step's time), so lock-step sessions stay in one step.
    done() is called at the step's end."""

    def __init__(self, sim: _Sim, cost: StepCostFn, batch_wait_s: float):
        self.sim, self.cost, self.batch_wait_s = sim, cost, batch_wait_s
        self.waiting: list[tuple] = []  # (tokens, prefill_s, done, session, comes back after this step)
        self.busy, self.gathering, self.expected, self.last_s = False, None, set(), 0.0

    def submit(self, tokens: int, prefill_s: float, done: Callable[[], None], session: int = -1, more: bool = False) -> None:
        self.waiting.append((tokens, prefill_s, done, session, more))
        if not self.busy or (self.gathering is not None and self._all_back()):
            self._step()

    def _all_back(self) -> bool:
        return self.expected <= {w[3] for w in self.waiting}

    def _step(self) -> None:
        self.gathering = None
        batch, self.waiting = self.waiting, []
        self.busy = bool(batch)
        if batch:
            self.last_s = self.cost(sum(w[0] for w in batch), len(batch)) + sum(w[1] for w in batch)
            self.sim.at(self.last_s, lambda: self._end(batch))

    def _end(self, batch: list) -> None:
        self.expected = {w[3] for w in batch if w[4]}
        for w in batch:
            w[2]()
        if not self.waiting or self._all_back():
            self._step()
            return
        self.gathering = token = object()
        self.sim.at(min(self.batch_wait_s, self.last_s / 4), lambda: self.gathering is token and self._step())


class _Sim:
    def __init__(self):
        self.now, self.events, self.seq = 0.0, [], itertools.count()

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (self.now + delay, next(self.seq), fn))

    def run(self) -> None:
        while self.events:
            self.now, _, fn = heapq.heappop(self.events)
            fn()


def simulate(work: Workload, cost: StepCostFn, arrivals: list[float], rtt_s: float, slots: int | None = None,
             batch_wait_s: float = BATCH_WAIT_S) -> list[dict]:
    """One record per request, in the fields serving.request_metrics reads (times in s)."""
    sim = _Sim()
    verifier = _Verifier(sim, cost, batch_wait_s)
    records: list[dict] = [{} for _ in arrivals]
    free = [slots if slots is not None else math.inf]
    queue: list[int] = []
    half = rtt_s / 2

    def start(i: int) -> None:
        free[0] -= 1
        rec = records[i]
        rec.update(request=i, status="ok", scheduled_at=arrivals[i], wait_s=sim.now - arrivals[i], started=sim.now,
                   chunk_times_s=[], chunk_tokens=[], rounds=0, proposed=0, accepted=0)
        trace = itertools.cycle(work.traces[i % len(work.traces)] or (0,)) if work.gamma else None
        state = {"committed": 0, "computed": 0}

        def commit(n: int) -> None:  # a reply carrying n tokens reached the user
            state["committed"] += n
            rec["chunk_times_s"].append(sim.now - rec["started"])
            rec["chunk_tokens"].append(n)
            if state["committed"] >= work.new_tokens:
                rec.update(new_tokens=state["committed"], wall_s=sim.now - rec["started"], finished_at=sim.now)
                free[0] += 1
                if queue:
                    start(queue.pop(0))
            elif work.gamma:
                draft()

        def computed() -> None:  # a step produced this session's next token (the prefill its first)
            state["computed"] += 1
            sim.at(half, lambda: commit(1))
            if not work.gamma and state["computed"] < work.new_tokens:  # Generate: decode on, no round trip
                verifier.submit(1, 0.0, computed, i, state["computed"] + 1 < work.new_tokens)

        def draft() -> None:
            g = min(work.gamma, work.new_tokens - state["committed"] - 1)
            a = min(next(trace), g)
            rec["rounds"] += 1
            rec["proposed"] += g
            rec["accepted"] += a
            drafting = work.draft_s(g, 1 if slots is None else slots - int(free[0]))  # free[0]: slots left
            rec["draft_s"] = rec.get("draft_s", 0.0) + drafting
            more = state["committed"] + a + 1 < work.new_tokens
            sim.at(drafting + half, lambda: verifier.submit(g + 1, 0.0, lambda: sim.at(half, lambda: commit(a + 1)), i, more))

        sim.at(half, lambda: verifier.submit(1, work.prefill_s, computed, i, work.new_tokens > 1))

    def arrive(i: int) -> None:
        if free[0] > 0:
            start(i)
        else:
            queue.append(i)

    for i, t in enumerate(arrivals):
        sim.at(t, lambda i=i: arrive(i))
    sim.run()
    return records


def attainment(work: Workload, cost: StepCostFn, rate: float, rtt_s: float, slo: serving.Slo, requests: int = 200,
               seed: int = 0, slots: int | None = None) -> dict:
    """serving.summarize of a simulated run at `rate`, the first and last 10% of arrivals excluded."""
    records = simulate(work, cost, serving.poisson_arrivals(rate, seed, count=requests), rtt_s, slots)
    edge = requests // 10
    return serving.summarize(serving.measured(records, edge, edge), slo)


def capacity(work: Workload, cost: StepCostFn, rtt_s: float, slo: serving.Slo, requests: int = 200, seed: int = 0,
             slots: int | None = None, steps: int = 12) -> float:
    """The highest arrival rate (req/s) at which >= serving.CAPACITY_ATTAINMENT of requests meet the SLO:
    doubling from a rate one request at a time could sustain until one misses, then bisection. 0 if even a
    lone request misses."""
    def ok(rate: float) -> bool:
        return attainment(work, cost, rate, rtt_s, slo, requests, seed, slots)["slo_attainment"] >= serving.CAPACITY_ATTAINMENT

    lone = simulate(work, cost, [0.0], rtt_s, slots)[0]
    if not serving.request_metrics(lone).meets(slo):
        return 0.0
    lo = 0.1 / lone["wall_s"]
    if not ok(lo):
        return 0.0
    hi = 2 * lo
    for _ in range(30):
        if not ok(hi):
            break
        lo, hi = hi, 2 * hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
