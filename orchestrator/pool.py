"""The benchmark's verifier pool: the running replicas it was given, or N it starts as Ray actors; and what each
replica did, from the request records.

`verifier.address` names running replicas ("a:1,b:2" or a list); otherwise `verifier.replicas` VerifierActors
start, each asking Ray for one `verifier` resource and `num_gpus`, so a cluster with N GPU nodes carrying that
resource gets one replica per node. A local run pins each replica to its own share of the verifier's cores.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

from orchestrator.checks import BenchError
from orchestrator.config import BenchConfig


def configured(config: BenchConfig) -> list[str]:
    """The running replicas the config names ([] = start a pool). BenchError for a bad address."""
    from draft_worker.router import parse_addresses

    try:
        return parse_addresses(config.verifier.address)
    except ValueError as exc:
        raise BenchError(f"verifier.address: {exc}") from None


def split_cores(cpus: list[int] | None, n: int) -> list[list[int] | None]:
    """Each of n replicas' cores: the verifier's cores dealt out in contiguous shares (None: no pinning).
    Fewer cores than replicas: every replica shares them all."""
    if not cpus or n == 1 or len(cpus) < n:
        return [cpus] * n
    share, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        end = start + share + (i < extra)
        out.append(cpus[start:end])
        start = end
    return out


async def start(config: BenchConfig, start_one: Callable[[list[int] | None], Awaitable[tuple]],
                cpus: list[int] | None) -> tuple[list, list[str]]:
    """Start verifier.replicas verifiers with `start_one(cores)` -> (actor, address); -> (actors, addresses).
    Stops the ones that started when another fails."""
    import ray

    n = config.verifier.replicas
    have = ray.cluster_resources().get("verifier", 0)
    if have < n:
        raise BenchError(f"the Ray cluster offers {have:g} of the `verifier` resource, verifier.replicas needs {n}; "
                         "give each verifier node --resources '{\"verifier\": 1}' or pass --verifier HOST:PORT,...")
    started = await asyncio.gather(*(start_one(c) for c in split_cores(cpus, n)), return_exceptions=True)
    failed = [r for r in started if isinstance(r, BaseException)]
    actors = [r[0] for r in started if not isinstance(r, BaseException)]
    if failed:
        await stop(actors)
        raise failed[0]
    return actors, [address for _, address in started]


async def stop(actors: list) -> None:
    async def one(actor):
        try:
            await asyncio.wait_for(actor.stop.remote(), 60)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass

    await asyncio.gather(*(one(a) for a in actors))


async def info(addresses: list[str], client_config):
    """The pool's InfoReply, once every replica answers and all share one tokenizer; BenchError otherwise."""
    import dataclasses

    from draft_worker.router import Router
    from draft_worker.transport import VerifierError

    async with Router(addresses, dataclasses.replace(client_config, info_timeout_s=15)) as router:
        down = [r for r in router.replicas if r.info is None]
        try:
            if down:  # each with its own refusal (unreachable, UNAUTHENTICATED, ...)
                raise VerifierError("; ".join(f"{r.address}: {r.error or 'no answer'}" for r in down))
            return await router.info()
        except VerifierError as exc:
            what = f"reach the verifier at {addresses[0]}" if len(addresses) == 1 else f"use the verifier pool {', '.join(addresses)}"
            raise BenchError(f"cannot {what}: {exc}") from None


def replica_rows(records: list[dict]) -> list[dict]:
    """Per replica: sessions opened on it (attempts), requests that finished there, and sessions moved off it
    after it went away (failovers), from the request records' `replicas` lists."""
    sessions, finished, moved = collections.Counter(), collections.Counter(), collections.Counter()
    for record in records:
        tried = record.get("replicas") or []
        sessions.update(tried)
        if tried and not record.get("error"):
            finished[tried[-1]] += 1
        moved.update(tried[:-1])
    return [{"replica": a, "sessions": sessions[a], "finished": finished[a], "failed_over": moved[a]}
            for a in sorted(sessions)]
