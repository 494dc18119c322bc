"""How any client reaches a verifier: connection settings, the gRPC channel, and the verifier's Info.

Shared by the draft worker's session client, `specdec health`, the benchmark's Ray workers and any
other caller; it knows nothing about drafting. TLS material and the token are read from files once, here,
and then travel as bytes, so no file has to exist on the node that dials.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.tls import bearer_metadata, read_file, read_token


class VerifierError(RuntimeError):
    """The verifier refused or failed a request; the message says why, `code` is the gRPC status name."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Backoff:
    """Waits between reconnection attempts: exponential, capped, with full jitter (AWS's "full jitter": a
    uniform draw in [0, cap]), so clients of a restarted verifier do not all come back at the same instant."""

    initial_s: float = 0.25
    max_s: float = 8.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before retry number `attempt` (0-based): uniform in [0, min(max_s, initial_s x multiplier^attempt)]."""
        return (rng or random).uniform(0.0, min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64)))

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        return (self.delay(attempt, rng) for attempt in itertools.count())


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float = 600.0  # deadline for one whole request, reconnections included
    info_timeout_s: float = 10.0
    max_message_bytes: int = 64 * 1024 * 1024
    auth_token: str | None = None  # sent as 'authorization: Bearer <token>' on every call
    tls: bool = False  # TLS; implied by any of the PEM fields below
    tls_root_certs: bytes | None = None  # PEM CA that signed the verifier's cert; None = the system roots
    tls_client_cert: bytes | None = None  # PEM chain, for a verifier that requires mutual TLS
    tls_client_key: bytes | None = None
    tls_server_name: str | None = None  # check the cert against this name instead of the dialled host
    backoff: Backoff = field(default_factory=Backoff)  # between reconnections to a verifier that went away
    reconnect_s: float | None = None  # how long a request keeps trying to reach it again; None = until its deadline
    # the verifier computes on this machine's cores (a loopback address): the draft model's prefill of a prompt
    # waits for the verifier's instead of running beside it, as two prefills on the same cores only slow each other
    shared_cores: bool = False

    @property
    def secure(self) -> bool:
        return self.tls or any((self.tls_root_certs, self.tls_client_cert, self.tls_client_key))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.auth_token)

    def __repr__(self) -> str:  # never print the token or the key
        return f"ClientConfig(timeout_s={self.timeout_s}, secure={self.secure}, auth_token={'set' if self.auth_token else None})"


def load_client_config(*, timeout_s: float = 600.0, auth_token_file: str | None = None, tls: bool = False,
                       tls_ca: str | None = None, client_cert: str | None = None, client_key: str | None = None,
                       tls_server_name: str | None = None, reconnect_s: float | None = None) -> ClientConfig:
    """A ClientConfig from file paths (read now; the token falls back to $SPECDEC_AUTH_TOKEN). OSError/ValueError."""
    if bool(client_cert) != bool(client_key):
        raise ValueError("a client certificate and its key go together (mutual TLS needs both)")
    return ClientConfig(timeout_s=timeout_s, auth_token=read_token(auth_token_file), tls=tls,
                        tls_root_certs=read_file(tls_ca), tls_client_cert=read_file(client_cert),
                        tls_client_key=read_file(client_key), tls_server_name=tls_server_name, reconnect_s=reconnect_s)


def channel_options(config: ClientConfig) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # reconnect to a restarted verifier within a second or so (gRPC's default starts at 1 s and grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 4000),
    ]
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return options


def open_channel(address: str, config: ClientConfig = ClientConfig()) -> grpc.aio.Channel:
    if not config.secure:
        return grpc.aio.insecure_channel(address, options=channel_options(config))
    credentials = grpc.ssl_channel_credentials(config.tls_root_certs, config.tls_client_key, config.tls_client_cert)
    return grpc.aio.secure_channel(address, credentials, options=channel_options(config))


async def fetch_info(stub: pb_grpc.VerifierStub, config: ClientConfig = ClientConfig()) -> pb.InfoReply:
    try:
        return await stub.Info(pb.InfoRequest(), timeout=config.info_timeout_s, metadata=config.metadata)
    except grpc.aio.AioRpcError as exc:
        raise VerifierError(f"verifier Info failed: {exc.code().name}: {exc.details()}", exc.code().name) from exc


def check_pair(info: pb.InfoReply, draft_name: str, draft_fingerprint: str) -> None:
    """Refuse a draft/verifier pair that does not share a tokenizer."""
    if draft_fingerprint != info.tokenizer_fingerprint:
        raise VerifierError(
            f"tokenizer mismatch: draft {draft_name} (fingerprint {draft_fingerprint[:12]}) and verifier "
            f"{info.model_id} (fingerprint {info.tokenizer_fingerprint[:12]}) do not share a tokenizer; "
            "pick a draft model from the verifier's family"
        )


async def wait_serving(address: str, config: ClientConfig = ClientConfig(), wait_s: float = 0.0) -> None:
    """The standard gRPC health check (needs no token), retried until it says SERVING or `wait_s` runs out
    (TimeoutError, saying what the last check found)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + wait_s
    while True:
        async with open_channel(address, config) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                problem = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                problem = exc.code().name if hasattr(exc, "code") else type(exc).__name__
        if time.monotonic() >= deadline:
            raise TimeoutError(problem)
        await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
