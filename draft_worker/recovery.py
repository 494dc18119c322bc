"""Draft-side recovery: a request survives its verifier dying or restarting.

The draft holds the truth: every committed token is in the request's GenerationResult. When the verifier
goes away (UNAVAILABLE: the process died, restarts, or drains), the client waits (`Backoff`: exponential
with full jitter) and re-opens the request with the prompt plus every committed token and the rest of
max_new_tokens, until it finishes or its deadline passes. The verifier recomputes the KV of those tokens,
so greedy output equals an uninterrupted run, token for token. (Sampled output stays correctly
distributed, but a re-seeded generator draws a different sequence.) Any other status is the verifier's
answer to this request and is raised at once.

Over a pool of replicas (a `router.Route` in place of the stub) every attempt asks the route for its replica:
the same one while it lives, another healthy one after it went away; `GenerationResult.replicas` lists the
address of each attempt, and giving up names every address tried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from draft_worker.router import NoReplica, Route
from draft_worker.transport import ClientConfig, VerifierError
from specdec.config import SamplingParams
from specdec.metrics import GenerationResult

log = logging.getLogger(__name__)
RETRYABLE = frozenset({"UNAVAILABLE"})  # the verifier is gone or going: another try may reach it

# one try: (prompt ids with the committed tokens, params for the rest, config with the time left, result to extend)
Attempt = Callable[[list[int], SamplingParams, ClientConfig, GenerationResult], Awaitable[None]]


async def with_recovery(attempt: Attempt, prompt_ids: list[int], params: SamplingParams,
                        config: ClientConfig, result: GenerationResult | None = None,
                        route: Route | None = None) -> GenerationResult:
    """Run `attempt` until the request finishes; re-open it after a retryable failure, within config.timeout_s.
    `result`: an empty one to fill (a caller that reads it while it grows, e.g. its logprobs), else a new one.
    With a `route` (the stub the attempt uses, when it is one), each attempt holds a replica of the pool."""
    route = route if isinstance(route, Route) else None
    start = time.perf_counter()
    result = result or GenerationResult(token_ids=[])
    result.started = start
    deadline = start + config.timeout_s
    delays = config.backoff.delays()
    gone_since = None  # when the verifier first went away
    went_away = None  # the last error from a replica itself (not "none is serving")
    while True:
        left = params.max_new_tokens - result.new_tokens
        if left <= 0:  # everything was committed before the verifier went away
            result.finish_reason = result.finish_reason or "length"
            break
        try:
            if route is not None:
                result.replicas.append(await route.acquire())
            await attempt([*prompt_ids, *result.token_ids], dataclasses.replace(params, max_new_tokens=left),
                          dataclasses.replace(config, timeout_s=max(deadline - time.perf_counter(), 1e-3)), result)
            break
        except VerifierError as exc:
            if route is not None:
                route.release(failed=exc.code in RETRYABLE)
            went_away = went_away if isinstance(exc, NoReplica) else exc
            delay, now = next(delays), time.perf_counter()
            gone_since = gone_since or now
            give_up = deadline if config.reconnect_s is None else min(deadline, gone_since + config.reconnect_s)
            if exc.code not in RETRYABLE or now + delay >= give_up:
                if route is not None and exc.code in RETRYABLE:
                    raise VerifierError(f"{went_away or exc} (gave up after {now - start:.1f} s; verifier replicas tried: "
                                        f"{', '.join(dict.fromkeys(route.tried)) or 'none'} of "
                                        f"{', '.join(route.router.addresses)})", exc.code) from None
                raise
            result.reconnects += 1
            log.warning("verifier went away after %d committed tokens (%s); re-opening in %.2f s",
                        result.new_tokens, exc, delay)
            await asyncio.sleep(delay)
        finally:
            if route is not None:
                route.release()  # a no-op after a failure's release
    result.wall_s = time.perf_counter() - start
    return result
