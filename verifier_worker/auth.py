"""Who may talk to the verifier: a bearer-token server interceptor and the TLS server credentials.

The interceptor runs before any servicer code, so a call without the right token is answered
UNAUTHENTICATED and never opens a session or touches the model. The health service stays open, so load
balancers and `specdec`'s own readiness probes work without the secret. Tokens are compared in
constant time. A refused call's body is never read nor parsed: the refusing handler takes the request as
a stream it never reads, so an unauthenticated caller cannot make the server hold its messages. Wrong
tokens are logged at most once per WARN_INTERVAL_S, with the count of those not logged.
"""

from __future__ import annotations

import hmac
import logging
import time

import grpc

from specdec.tls import AUTH_HEADER, read_file

log = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
WARN_INTERVAL_S = 60.0


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler with `handler`'s response shape that aborts without reading the request.

    It is request-streaming whatever the method (on the wire a unary request is a stream of one message),
    so the server never waits for, buffers or deserialises the body; the bytes stay undecoded.
    """

    async def abort(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming responses need

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(abort, response_serializer=handler.response_serializer)


class ThrottledWarning:
    """log.warning at most once per interval_s; the next one says how many were not logged in between."""

    def __init__(self, interval_s: float = WARN_INTERVAL_S):
        self.interval_s = interval_s
        self._last = -float("inf")
        self.suppressed = 0

    def __call__(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" (and {self.suppressed} more like it in the last {now - self._last:.0f} s)"
        log.warning(message, *args)
        self._last, self.suppressed = now, 0


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._warn_wrong_token = ThrottledWarning()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if sent is None:
            return _abort_handler(handler, "missing auth token: send 'authorization: Bearer <token>' (--auth-token-file)")
        if not hmac.compare_digest(str(sent).encode(), self._expected):
            self._warn_wrong_token("rejected a call to %s with a wrong auth token", handler_call_details.method)
            return _abort_handler(handler, "wrong auth token")
        return handler


def server_credentials(cert_path: str, key_path: str, client_ca_path: str | None = None) -> grpc.ServerCredentials:
    """TLS with the given cert chain and key; with client_ca_path, mutual TLS (clients need a cert it signed)."""
    client_ca = read_file(client_ca_path)
    key_and_chain = [(read_file(key_path), read_file(cert_path))]
    return grpc.ssl_server_credentials(key_and_chain, root_certificates=client_ca, require_client_auth=client_ca is not None)
