"""Who may talk to the verifier: a bearer-token server interceptor and the TLS server credentials.

The interceptor runs before any servicer code, so a call without the right token is answered
UNAUTHENTICATED and never opens a session or touches the model. The health service stays open, so load
balancers and `specdec`'s own readiness probes work without the secret. Tokens are compared in
constant time.
"""

from __future__ import annotations

import hmac
import logging

import grpc

from specdec.tls import AUTH_HEADER, read_file

log = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that only aborts."""

    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator, as streaming responses need

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if sent is None:
            return _abort_handler(handler, "missing auth token: send 'authorization: Bearer <token>' (--auth-token-file)")
        if not hmac.compare_digest(str(sent).encode(), self._expected):
            log.warning("rejected a call to %s with a wrong auth token", handler_call_details.method)
            return _abort_handler(handler, "wrong auth token")
        return handler


def server_credentials(cert_path: str, key_path: str, client_ca_path: str | None = None) -> grpc.ServerCredentials:
    """TLS with the given cert chain and key; with client_ca_path, mutual TLS (clients need a cert it signed)."""
    client_ca = read_file(client_ca_path)
    key_and_chain = [(read_file(key_path), read_file(cert_path))]
    return grpc.ssl_server_credentials(key_and_chain, root_certificates=client_ca, require_client_auth=client_ca is not None)
