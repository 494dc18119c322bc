#!/usr/bin/env bash
# Container entrypoint: find TLS files and the token, then exec `specdec serve-verifier` on 0.0.0.0.
#   specdec-entrypoint [serve-verifier args...]   serve (the image's ENTRYPOINT)
#   specdec-entrypoint health                     the HEALTHCHECK: gRPC health on the local port
# TLS files: /certs/server.pem, /certs/server.key and /certs/ca.pem (mounted), or the same base64-encoded in
# SPECDEC_TLS_CERT_B64, SPECDEC_TLS_KEY_B64, SPECDEC_TLS_CA_B64 (e.g. Vast.ai env vars), written to /certs
# with mode 600. Token: SPECDEC_AUTH_TOKEN.
set -euo pipefail

PORT="${SPECDEC_PORT:-50051}"          # port inside the container
CERT=/certs/server.pem
KEY=/certs/server.key

if [[ -n "${SPECDEC_TLS_CERT_B64:-}" && -n "${SPECDEC_TLS_KEY_B64:-}" && ! -f "$CERT" ]]; then
    umask 077
    base64 -d <<<"$SPECDEC_TLS_CERT_B64" >"$CERT"
    base64 -d <<<"$SPECDEC_TLS_KEY_B64" >"$KEY"
    if [[ -n "${SPECDEC_TLS_CA_B64:-}" ]]; then
        base64 -d <<<"$SPECDEC_TLS_CA_B64" >/certs/ca.pem
    fi
fi

tls_args=()
if [[ -f "$CERT" && -f "$KEY" ]]; then
    tls_args=(--tls-cert "$CERT" --tls-key "$KEY")
    if [[ -f /certs/ca.pem && "${SPECDEC_MUTUAL_TLS:-0}" == "1" ]]; then
        tls_args+=(--tls-client-ca /certs/ca.pem)   # clients must present a cert signed by this CA
    fi
fi

if [[ "${1:-}" == "health" ]]; then
    health_args=(--verifier "127.0.0.1:${PORT}")
    if [[ -f "$CERT" && -f /certs/ca.pem ]]; then
        # dialled as 127.0.0.1, so check the cert against the name it was made for (SPECDEC_TLS_NAME)
        health_args+=(--tls-ca /certs/ca.pem --tls-server-name "${SPECDEC_TLS_NAME:-specdec-verifier}")
        if [[ "${SPECDEC_MUTUAL_TLS:-0}" == "1" && -f /certs/client.pem && -f /certs/client.key ]]; then
            health_args+=(--tls-cert /certs/client.pem --tls-key /certs/client.key)  # mutual TLS wants a client cert
        fi
    elif [[ -f "$CERT" ]]; then
        health_args+=(--tls --tls-server-name "${SPECDEC_TLS_NAME:-specdec-verifier}")  # a publicly signed cert
    fi
    exec specdec health "${health_args[@]}"
fi

# the PEM material is on disk now: keep the key out of the server's environment
unset SPECDEC_TLS_CERT_B64 SPECDEC_TLS_KEY_B64 SPECDEC_TLS_CA_B64

# serve-verifier refuses 0.0.0.0 without TLS and SPECDEC_AUTH_TOKEN unless SPECDEC_INSECURE=1 is set
insecure=()
if [[ "${SPECDEC_INSECURE:-0}" == "1" ]]; then
    insecure=(--insecure)
fi
exec specdec serve-verifier --host 0.0.0.0 --port "$PORT" "${tls_args[@]}" "${insecure[@]}" "$@"
