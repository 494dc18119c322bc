"""Ray actors of the benchmark: draft workers (placed by the custom resource `draft`) and the verifier.

A DraftWorker holds its draft models (loaded on its own node, never on the driver) and, per emulated RTT,
one router over the verifier replicas (each dialled through a delay proxy in a process of its own when the RTT is
above 0), and runs one request per `run` call, on the replica its router picks: the verifier-only baseline or a
speculative session. It gets the client config (deadline, token, TLS bytes) once, when it is created.
The VerifierActor starts `specdec serve-verifier` on its node (the `verifier` resource, plus GPUs when
asked) and hands back the address; a pool is several of them (orchestrator/pool.py). The same code runs
on one machine and on a `ray up` cluster.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass

import ray

from draft_worker.transport import ClientConfig
from orchestrator.config import RunSpec
from specdec.config import SamplingParams


@dataclass(frozen=True)
class Job:
    spec: RunSpec
    prompt_ids: list[int]
    params: SamplingParams
    prompt_fingerprint: str  # of the tokenizer that made prompt_ids (the n-gram drafter drafts these ids)


@ray.remote(num_cpus=0, max_restarts=2)
class DraftWorker:
    def __init__(self, verifier_addresses: list[str], config: ClientConfig, threads: int | None = None,
                 cpus: list[int] | None = None):
        import torch

        from draft_worker.drafters import DraftModels

        if cpus:  # a local run emulating two machines: this worker gets its own cores
            os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))  # Ray sets OMP_NUM_THREADS=1 in its workers
        self.verifier_addresses = verifier_addresses  # the replicas of the pool
        self.config = config  # deadline, token and TLS material (bytes, so no file needs to exist on this node)
        self._draft_models = DraftModels()
        self._histories: dict = {}  # DrafterSpec -> its acceptance over this worker's requests (gamma rtt/auto)
        self._routers: dict[float, tuple] = {}  # rtt_ms -> (proxies, router)
        self._info = None  # the verifier's InfoReply, fetched once
        self._lock = asyncio.Lock()

    def where(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    async def _router(self, rtt_ms: float):
        async with self._lock:  # concurrent first calls must not each open proxies and channels
            if rtt_ms not in self._routers:
                self._routers[rtt_ms] = await self._open(rtt_ms)
        return self._routers[rtt_ms][1]

    async def _open(self, rtt_ms: float) -> tuple:
        """(delay proxies, started router over the replicas) for one emulated RTT."""
        from draft_worker.delay import DelayProxyProcess  # its own process: the link waits on no drafting
        from draft_worker.router import Router

        proxies = ({a: await DelayProxyProcess(a, rtt_ms).start() for a in self.verifier_addresses}
                   if rtt_ms > 0 else {})
        router = Router(self.verifier_addresses, self.config, dial={a: p.address for a, p in proxies.items()})
        return list(proxies.values()), await router.__aenter__()

    async def _verifier_info(self, router):
        self._info = self._info or await router.info()
        return self._info

    def replicas(self) -> list[dict]:
        """Each replica's health and load and this worker's sessions on it (router.Router.snapshot), per RTT."""
        return [{"rtt_ms": rtt, **r} for rtt, (_, router) in self._routers.items() for r in router.snapshot()]

    async def prepare(self, spec: RunSpec) -> str:
        """Load spec's draft model on this node and check it shares the verifier's tokenizer (VerifierError if
        not), before any request of the run. -> the draft tokenizer's fingerprint."""
        from draft_worker.transport import check_pair

        loaded = await asyncio.to_thread(self._draft_models.load, spec.drafter_spec)
        check_pair(await self._verifier_info(await self._router(0.0)), spec.model, loaded.fingerprint)
        return loaded.fingerprint

    async def run(self, job: Job) -> dict:
        """One request; returns GenerationResult.to_dict() plus when and where it ran. Raises on failure."""
        from draft_worker import client
        from draft_worker.drafters import build_drafter
        from draft_worker.gamma import new_history
        from draft_worker.service import gamma_schedule

        router = await self._router(job.spec.rtt_ms)
        started_at = time.time()
        if job.spec.drafter == "baseline":
            result = await client.generate_baseline(router.route(), job.prompt_ids, job.params, self.config)
        else:
            info = await self._verifier_info(router)
            drafter = build_drafter(job.spec.drafter_spec, self._draft_models, job.prompt_fingerprint)
            history = self._histories.setdefault(job.spec.drafter_spec, new_history())  # what rtt/auto start from
            result = await client.speculate(router.route(), drafter, job.prompt_ids, job.params,
                                            gamma_schedule(job.spec.gamma, history=history),
                                            info, self.config, drafter.fingerprint, mode=job.spec.mode)
        return {**result.to_dict(), "started_at": started_at, "finished_at": time.time(), "worker": self.where()}

    async def close(self) -> None:
        for proxies, router in self._routers.values():
            await router.close()
            for proxy in proxies:
                await proxy.close()
        self._routers.clear()


@ray.remote(num_cpus=0)
class VerifierActor:
    """Owns a `specdec serve-verifier` child process on this node for the length of a benchmark."""

    def __init__(self, model: str, dtype: str, device: str, local: bool, threads: int | None = None,
                 server_args: tuple[str, ...] = (), token: str | None = None, cpus: list[int] | None = None):
        from orchestrator.launch import start_verifier
        from specdec.tls import TOKEN_ENV

        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        cores = len(cpus) if cpus else os.cpu_count() or 1
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or cores)}  # Ray's workers have 1
        if token:
            env[TOKEN_ENV] = token  # in the environment, not on the command line where `ps` shows it
        self.process, self.error = None, None
        try:
            self.process = start_verifier(model, dtype, device, host, extra_args=server_args, env=env, cpus=cpus)
        except RuntimeError as exc:  # kept, so the driver gets the reason rather than a dead actor
            self.error = str(exc)

    def address(self) -> str:
        if self.error:
            raise RuntimeError(self.error)
        return self.process.address

    def stop(self) -> None:
        if self.process:
            self.process.stop()
