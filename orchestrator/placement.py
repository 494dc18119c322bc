"""Where a local benchmark's roles run: one box playing two machines, the verifier and the drafts on their own cores.

Knows nothing about Ray or gRPC; `bench` hands the cores to the verifier actor (which pins its
`serve-verifier` process) and to each draft worker (which pins itself).
"""

from __future__ import annotations

import os

from orchestrator.config import BenchConfig


def pin_cores(config: BenchConfig) -> tuple[list[int] | None, list[int] | None]:
    """(verifier cores, draft cores) for a local run, or (None, None) to leave placement to the OS.

    One box plays two machines: without pinning, the draft's forward passes and the verifier's fight for the
    same cores and both look slower than either would on its own machine. The baseline runs on the same
    verifier cores as every speculative configuration.
    """
    if config.cpus == "shared" or config.ray.address is not None:
        return None, None
    available = sorted(os.sched_getaffinity(0))
    if config.cpus == "auto":
        if config.verifier.address is not None or len(available) < 2:
            return None, None
        half = (len(available) + 1) // 2
        return available[:half], available[half:]
    unknown = sorted(set(config.cpus.verifier + config.cpus.draft) - set(available))
    if unknown or not config.cpus.verifier or not config.cpus.draft:
        raise ValueError(f"cpus: give non-empty lists of this machine's cores {available}; not available: {unknown}")
    return list(config.cpus.verifier), list(config.cpus.draft)


def shares_cores(config: BenchConfig, verifier_cpus: list[int] | None, addresses: list[str]) -> bool:
    """The draft workers compute on the verifiers' cores: a local run without pinning (ClientConfig.shared_cores:
    the draft's prefill then waits for the verifier's)."""
    from specdec.tls import all_loopback

    return verifier_cpus is None and config.ray.address is None and all_loopback(addresses)
