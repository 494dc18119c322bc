"""Route draft sessions over a pool of verifier replicas: load-aware, sticky per session, around the unhealthy.

One `Router` per process holds a channel to every replica and polls each (`poll_s`) for its health (the
standard gRPC health service) and its load (`InfoReply.load`: open sessions and queued tokens). Between
polls it counts the sessions it has itself sent to each replica since that replica's last report, so a burst
of new sessions spreads before the next poll.

A request asks for a `Route` (`router.route()`): a stub-like handle that `client.speculate` and
`client.generate_baseline` use as their stub. `recovery.with_recovery` calls `acquire` before each attempt:
the first picks the least-loaded healthy replica; the session then stays there for as long as it lives. Only
when an attempt fails with UNAVAILABLE does the route mark that replica down (until a poll finds it serving
again) and the re-open go to another healthy one. A replica whose health is NOT_SERVING (draining) or that
does not answer gets no new session. Knows nothing about drafting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_worker.transport import ClientConfig, VerifierError, check_pair, fetch_info, open_channel
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class NoReplica(VerifierError):
    """Every replica of the pool is down or draining (code UNAVAILABLE: a later try may find one)."""


def parse_addresses(values: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """HOST:PORT list from 'a:1,b:2', a list of such strings (a flag given several times), or None -> [].
    ValueError for an entry that is not HOST:PORT or a repeated one."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    out = [a.strip() for item in items for a in item.split(",") if a.strip()]
    for address in out:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"verifier address {address!r} is not HOST:PORT")
    if len(set(out)) != len(out):
        raise ValueError(f"a verifier address is given twice: {', '.join(out)}")
    return out


@dataclass(eq=False)
class Replica:
    """One verifier as the router sees it."""

    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.VerifierStub
    health: health_pb2_grpc.HealthStub
    serving: bool = False  # health SERVING and Info answered at the last check (and no failure since)
    sessions: int = 0  # open sessions, as it last reported (all clients)
    queued_tokens: int = 0  # tokens waiting in its engine's queue, as it last reported
    routed: int = 0  # sessions this router sent it since that report
    open: int = 0  # sessions of this router on it now
    total: int = 0  # sessions this router ever sent it (opens and re-opens)
    info: pb.InfoReply | None = None
    error: str = ""  # why the last check failed ("" when it answered)
    code: str = ""  # that failure's gRPC status name

    @property
    def load(self) -> tuple[int, int]:
        """What routing minimises: sessions (reported plus sent since), then queued tokens."""
        return self.sessions + self.routed, self.queued_tokens

    def snapshot(self) -> dict:
        return {"address": self.address, "serving": self.serving, "sessions": self.sessions,
                "queued_tokens": self.queued_tokens, "open": self.open, "total": self.total}


class Router:
    """A pool of verifier replicas shared by every draft session of a process. Use `async with Router(...)`."""

    def __init__(self, addresses: list[str], config: ClientConfig = ClientConfig(), poll_s: float = 0.5,
                 dial: dict[str, str] | None = None):
        """`dial`: the HOST:PORT to connect to for an address, when that differs (a local proxy emulating a link)."""
        if not addresses:
            raise ValueError("a router needs at least one verifier address")
        self.config = config  # one CA and token for the whole pool
        self.poll_s = poll_s
        self.replicas = [self._replica(a, (dial or {}).get(a, a)) for a in addresses]
        self._ties = itertools.count()  # rotates ties between equally loaded replicas
        self._poller: asyncio.Task | None = None

    def _replica(self, address: str, target: str) -> Replica:
        config = self.config
        if target != address and config.secure and not config.tls_server_name:  # the cert names the verifier
            config = dataclasses.replace(config, tls_server_name=address.rpartition(":")[0].strip("[]"))
        channel = open_channel(target, config)
        return Replica(address, channel, pb_grpc.VerifierStub(channel), health_pb2_grpc.HealthStub(channel))

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def start(self) -> None:
        """Check every replica now, then keep polling in the background (until `close`). Idempotent."""
        if self._poller is None:
            await self.poll()
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        for replica in self.replicas:
            await replica.channel.close()

    async def info(self, draft_name: str | None = None, draft_fingerprint: str | None = None) -> pb.InfoReply:
        """The pool's Info (its first serving replica's). Every replica that answered must share the
        tokenizer (and, given a draft fingerprint, the draft's). VerifierError when none answers."""
        await self.start()
        answered = [r for r in self.replicas if r.info is not None]
        if not answered:  # nothing answered: ask once more
            await self.poll()
            answered = [r for r in self.replicas if r.info is not None]
        if not answered:
            why = "; ".join(f"{r.address}: {r.error}" for r in self.replicas)
            raise VerifierError(f"no verifier replica answers: {why}", self.replicas[0].code or "UNAVAILABLE")
        first = answered[0].info
        for replica in answered[1:]:
            if replica.info.tokenizer_fingerprint != first.tokenizer_fingerprint:
                raise VerifierError(f"verifier replicas {answered[0].address} ({first.model_id}) and {replica.address} "
                                    f"({replica.info.model_id}) do not share a tokenizer: one pool serves one model")
        if draft_fingerprint is not None:
            check_pair(first, draft_name or "draft", draft_fingerprint)
        return first

    async def poll(self) -> None:
        """Check every replica's health and load now (concurrently)."""
        await asyncio.gather(*(self._check(r) for r in self.replicas))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.poll()

    async def _check(self, replica: Replica) -> None:
        routed_before = replica.routed  # sessions sent after this point are not in the report
        try:
            status = await replica.health.Check(health_pb2.HealthCheckRequest(), timeout=self.config.info_timeout_s)
            info = await fetch_info(replica.stub, self.config)
        except (grpc.aio.AioRpcError, VerifierError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else exc.code
            error = f"{code}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            if replica.serving:
                log.warning("verifier replica %s is down: %s", replica.address, error)
            replica.serving, replica.error, replica.code = False, error, code
            return
        serving = status.status == health_pb2.HealthCheckResponse.SERVING and not info.load.draining
        if serving != replica.serving:
            log.info("verifier replica %s %s", replica.address, "is serving" if serving else "drains")
        replica.serving, replica.info, replica.error, replica.code = serving, info, "", ""
        replica.sessions, replica.queued_tokens = info.load.sessions, info.load.queued_tokens
        replica.routed = max(0, replica.routed - routed_before)

    def pick(self, avoid: Replica | None = None) -> Replica | None:
        """The least-loaded serving replica, preferring any other than `avoid`; None when none serves."""
        serving = [r for r in self.replicas if r.serving]
        others = [r for r in serving if r is not avoid] or serving
        if not others:
            return None
        turn = next(self._ties)
        n = len(self.replicas)
        return min(others, key=lambda r: (r.load, (self.replicas.index(r) - turn) % n))

    def route(self) -> Route:
        return Route(self)

    def snapshot(self) -> list[dict]:
        """Per-replica health, load and this router's sessions (for metrics and bench summaries)."""
        return [r.snapshot() for r in self.replicas]


@dataclass(eq=False)
class Route:
    """One request's place in the pool; a stand-in for its stub. Sticky: it changes replica only after an
    attempt ended with `release(failed=True)`."""

    router: Router
    replica: Replica | None = None
    tried: list[str] = field(default_factory=list)  # every replica an attempt went to, in order
    _failed: Replica | None = None
    _held: bool = False

    @property
    def address(self) -> str:
        return self.replica.address if self.replica else ""

    async def acquire(self) -> str:
        """Hold a replica for the next attempt: the current one while it has not failed, else the least
        loaded other healthy one; when none looks healthy, every replica is checked again now (the one that
        failed may be back: a restart, or a refusal that was not the replica's death) before giving up.
        -> its address. VerifierError (UNAVAILABLE) naming every address when none serves."""
        if self.replica is None or self._failed is self.replica:
            replica = self.router.pick(avoid=self._failed)
            if replica is None:
                await self.router.poll()
                replica = self.router.pick(avoid=self._failed)
            if replica is None:
                raise NoReplica(f"UNAVAILABLE: no verifier replica is serving (addresses: "
                                f"{', '.join(self.router.addresses)})", "UNAVAILABLE")
            self.replica = replica
            replica.routed += 1
        self.replica.open += 1
        self.replica.total += 1
        self._held = True
        self.tried.append(self.replica.address)
        return self.replica.address

    def release(self, failed: bool = False) -> None:
        """The attempt ended; `failed`: its replica went away, so the next attempt goes elsewhere."""
        if self._held:
            self.replica.open -= 1
            self._held = False
        if failed and self.replica is not None:
            self._failed = self.replica
            if self.replica.serving:
                log.warning("verifier replica %s failed a session; routing around it", self.replica.address)
            self.replica.serving = False  # until a poll finds it serving again

    # the stub interface client.py uses
    def Speculate(self, *args, **kwargs):  # noqa: N802 - gRPC's method names
        return self.replica.stub.Speculate(*args, **kwargs)

    def Generate(self, *args, **kwargs):  # noqa: N802
        return self.replica.stub.Generate(*args, **kwargs)
