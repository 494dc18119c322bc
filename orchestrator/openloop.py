"""Open-loop load for `specdec bench`: requests arrive at seeded Poisson times whether or not the system keeps up.

At one arrival rate, request i arrives at its scheduled time (orchestrator.serving.poisson_arrivals, the
same times for every configuration at that rate), takes prompt i (cycling through the prompts) and waits
for a free draft slot (a session place on a draft worker actor), then runs. Each record carries when it
was scheduled, how late the load generator issued it (`dispatch_lag_s`: the generator's own lateness, which
must stay ~0 for the figures to be honest; a warning names the count above serving.LATE_ARRIVAL_S), how
long it waited for a slot (`wait_s`, counted in its TTFT and E2E), and which pass of the rate it belongs to
(`pass_started_at`, `pass_requests`). A failed request is recorded, not retried: under open load it counts
against goodput. A rate's arrivals cannot resume half-way, so `--resume` reruns a rate whole unless one pass
recorded every one of its requests (complete_passes); the report keeps the latest record per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from orchestrator.serving import LATE_ARRIVAL_S, poisson_arrivals

log = logging.getLogger(__name__)


def arrivals(load, rate: float, num_prompts: int) -> list[float]:
    """The scheduled arrival times (s) at `rate` for a LoadConfig: load.requests arrivals, or those within
    load.duration_s, or one per prompt."""
    if load.duration_s is not None and load.requests is None:
        return poisson_arrivals(rate, load.seed, duration_s=load.duration_s)
    return poisson_arrivals(rate, load.seed, count=load.requests or num_prompts)


def complete_passes(records: list[dict]) -> set[str]:
    """The open-loop configurations one of whose passes recorded every request it scheduled (ok or failed):
    only these are done on --resume. Records from before passes were recorded count as no pass."""
    seen: dict[tuple[str, float], set[int]] = {}
    wanted: dict[tuple[str, float], int] = {}
    for r in records:
        if r.get("rate") is not None and r.get("pass_started_at") is not None and r.get("request") is not None:
            key = (r["config"], r["pass_started_at"])
            seen.setdefault(key, set()).add(int(r["request"]))
            wanted[key] = int(r["pass_requests"])
    return {config for (config, at), got in seen.items() if got >= set(range(wanted[(config, at)]))}


async def drive(times: list[float], prompts: list, slots: list, call: Callable[[object, object], Awaitable[dict]],
                done: Callable[[int, object, dict | None, BaseException | None, dict], None]) -> int:
    """Issue request i at times[i] (s from now) with prompts[i % len(prompts)] on the first free slot:
    call(slot, prompt) -> result dict (raises on failure); done(i, prompt, result or None, error or None,
    timing) once it ends. Returns how many requests the generator issued late."""
    free: asyncio.Queue = asyncio.Queue()
    for slot in slots:
        free.put_nowait(slot)
    t0, t0_wall = time.perf_counter(), time.time()
    late = 0

    async def request(i: int, prompt, scheduled: float) -> None:
        nonlocal late
        lag = time.perf_counter() - t0 - scheduled
        late += lag > LATE_ARRIVAL_S
        slot = await free.get()
        timing = {"request": i, "pass_started_at": t0_wall, "pass_requests": len(times),
                  "scheduled_s": scheduled, "scheduled_at": t0_wall + scheduled,
                  "dispatch_lag_s": lag, "wait_s": time.perf_counter() - t0 - scheduled}
        try:
            result, error = await call(slot, prompt), None
        except Exception as exc:  # noqa: BLE001 - recorded as failed, never fatal
            result, error = None, exc
        finally:
            free.put_nowait(slot)
        done(i, prompt, result, error, {**timing, "finished_at": time.time()} if result is None else timing)

    tasks = []
    for i, at in enumerate(times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(request(i, prompts[i % len(prompts)], at)))
    await asyncio.gather(*tasks)
    if late:
        log.warning("the load generator issued %d of %d requests more than %.0f ms late: it, not the system, "
                    "limited the load (fewer configurations, or a less busy driver)", late, len(times), 1000 * LATE_ARRIVAL_S)
    return late
