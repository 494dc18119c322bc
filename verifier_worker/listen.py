"""Putting a VerifierServicer on a port and taking it off: the gRPC server's options (message bounds, the
HTTP/2 window), the Verifier, health and reflection services behind the optional token check and TLS, and
the graceful drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.specdec.v1 import specdec_pb2 as pb
from specdec.config import VerifierLimits
from verifier_worker.auth import TokenAuthInterceptor
from verifier_worker.validation import generic_handler, max_concurrent_rpcs

if TYPE_CHECKING:
    from verifier_worker.server import VerifierServicer

log = logging.getLogger(__name__)


def server_options(limits: VerifierLimits, vocab_size: int) -> list[tuple[str, int]]:
    """gRPC receives no message over what the model needs (`VerifierLimits.message_bytes`), and each stream's
    HTTP/2 window is fixed at one such message instead of grown by BDP probing.

    With BDP probing the window grows with the traffic, so a flood of oversized calls makes the server buffer
    far more than one message per stream before refusing them; a fixed window of one legal message bounds that
    at streams x message_bytes and still carries the largest proposal in about a round trip (the comparison
    with BDP probing and with gRPC's default 64 KiB window: scripts/measure_window.py).
    """
    message_bytes = limits.message_bytes(vocab_size)
    return [
        ("grpc.max_receive_message_length", message_bytes),
        ("grpc.max_send_message_length", message_bytes),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", message_bytes),
    ]


async def start_server(
    servicer: VerifierServicer,
    host: str = "127.0.0.1",
    port: int = 0,
    credentials: grpc.ServerCredentials | None = None,
    token: str | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve Verifier, health and reflection on host:port (0 = a free port). -> (server, bound port)

    With `credentials` the port speaks TLS only; with `token` every RPC but health needs it (see auth.py).
    """
    interceptors = [TokenAuthInterceptor(token)] if token else []
    server = grpc.aio.server(options=server_options(servicer.limits, servicer.info.vocab_size), interceptors=interceptors,
                             maximum_concurrent_rpcs=max_concurrent_rpcs(servicer.limits))
    server.add_generic_rpc_handlers((generic_handler(servicer),))
    health_servicer = servicer.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = pb.DESCRIPTOR.services_by_name["Verifier"].full_name
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    for name in ("", service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def drain(server: grpc.aio.Server, servicer: VerifierServicer, timeout_s: float) -> int:
    """Graceful shutdown: health NOT_SERVING, new sessions refused (UNAVAILABLE), sessions in flight get up to
    timeout_s to finish, then the server stops. -> the sessions that were still open and got cut."""
    servicer.draining = True
    if servicer.health is not None:
        await servicer.health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while servicer.active_sessions and loop.time() < deadline:
        await asyncio.sleep(0.05)
    cut = servicer.active_sessions
    if cut:
        log.warning("drain timeout (%g s): cutting %d session(s) still open", timeout_s, cut)
    await server.stop(grace=0.5)
    return cut
