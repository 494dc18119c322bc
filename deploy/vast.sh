#!/usr/bin/env bash
# Rent a Vast.ai GPU, run the specdec verifier image on it over TLS + token, wait until it is healthy,
# and print the address for `specdec bench --verifier` / `specdec generate --verifier`.
#
#   deploy/vast.sh up        search the cheapest matching offer, create the instance, wait, print the address
#   deploy/vast.sh status    show the instance and check health again
#   deploy/vast.sh down      destroy the instance (billing stops)
#
# Needs: `pip install vastai` and `vastai set api-key <key>` run once by you (the CLI keeps the key in its
# own config file; this script never reads, prints or stores it). Certificates and the token come from
# `specdec make-certs --host specdec-verifier --token --out certs` (the cert names a fixed host, so it is
# valid whatever IP Vast assigns; clients pass --tls-server-name specdec-verifier).
# Exposure, honestly: Vast passes environment variables on the `vastai create` call, so the token and the
# server key travel to Vast's API over HTTPS and sit in the instance's config there (and, for a moment, in
# this machine's process list). Make a fresh token and certs per rented box and delete them after `down`.
set -euo pipefail

IMAGE="${SPECDEC_IMAGE:-ghcr.io/your-org/specdec-verifier:latest}"    # the image built from deploy/Dockerfile
MODEL="${SPECDEC_MODEL:-Qwen/Qwen2.5-Coder-1.5B-Instruct}"            # the verifier model (Hub id)
DTYPE="${SPECDEC_DTYPE:-bf16}"                                        # fp32 | bf16 | fp16
QUERY="${VAST_QUERY:-gpu_ram>=16 num_gpus=1 reliability>0.98 inet_down>200 direct_port_count>=1 cuda_vers>=12.8}"
DISK_GB="${VAST_DISK_GB:-40}"                                         # image + model cache
CERTS="${SPECDEC_CERTS:-certs}"                                       # from `specdec make-certs`
STATE="${SPECDEC_VAST_STATE:-.vast-instance}"                         # instance id of the last `up` (gitignored)
TLS_NAME=specdec-verifier                                             # the host name inside the server cert

need() { command -v "$1" >/dev/null || { echo "deploy/vast.sh: needs $1 ($2)" >&2; exit 1; }; }
need vastai "pip install vastai, then: vastai set api-key <your key>"
need specdec "pip install -e . in this repository"

b64() { base64 <"$1" | tr -d '\n'; }

address() {  # public IP and the host port mapped to the container's 50051
    vastai show instance "$1" --raw | python3 -c '
import json, sys
info = json.load(sys.stdin)
ports = (info.get("ports") or {}).get("50051/tcp") or []
if info.get("public_ipaddr") and ports:
    print(info["public_ipaddr"].strip() + ":" + str(ports[0]["HostPort"]))'
}

wait_healthy() {  # poll until the gRPC health check answers SERVING (model download + load take minutes)
    local id="$1" addr=""
    for _ in $(seq 1 90); do   # 90 x 10 s = 15 minutes at most
        addr="$(address "$id" || true)"
        if [[ -n "$addr" ]] && specdec health --verifier "$addr" --tls-ca "$CERTS/ca.pem" \
                --tls-server-name "$TLS_NAME" >/dev/null 2>&1; then
            echo "$addr"
            return 0
        fi
        sleep 10
    done
    echo "deploy/vast.sh: instance $id did not become healthy; see: vastai logs $id" >&2
    return 1
}

up() {
    for f in ca.pem server.pem server.key token.txt; do
        [[ -f "$CERTS/$f" ]] || { echo "missing $CERTS/$f: run specdec make-certs --host $TLS_NAME --token --out $CERTS" >&2; exit 1; }
    done
    offer="$(vastai search offers "$QUERY" -o dph --raw | python3 -c 'import json, sys; o = json.load(sys.stdin); print(o[0]["id"] if o else "")')"
    [[ -n "$offer" ]] || { echo "deploy/vast.sh: no offer matches: $QUERY" >&2; exit 1; }
    # env: the port mapping, the token and the TLS files (base64 PEM); args launch mode keeps the image's
    # entrypoint (specdec-entrypoint), and --args are appended to `specdec serve-verifier`
    env_opts="-p 50051:50051 -e SPECDEC_AUTH_TOKEN=$(tr -d '\n' <"$CERTS/token.txt")"
    env_opts+=" -e SPECDEC_TLS_CERT_B64=$(b64 "$CERTS/server.pem") -e SPECDEC_TLS_KEY_B64=$(b64 "$CERTS/server.key")"
    env_opts+=" -e SPECDEC_TLS_CA_B64=$(b64 "$CERTS/ca.pem") -e SPECDEC_TLS_NAME=$TLS_NAME"
    id="$(vastai create instance "$offer" --image "$IMAGE" --disk "$DISK_GB" --env "$env_opts" --raw \
            --args --model "$MODEL" --dtype "$DTYPE" --device cuda \
          | python3 -c 'import json, sys; print(json.load(sys.stdin)["new_contract"])')"
    echo "$id" >"$STATE"
    echo "created instance $id from offer $offer; waiting for the verifier (model download + load)..." >&2
    addr="$(wait_healthy "$id")"
    echo "verifier ready. Use:" >&2
    echo "  specdec bench --verifier $addr --config configs/pubmedqa.yaml  (with security: tls_ca: $CERTS/ca.pem," >&2
    echo "      tls_server_name: $TLS_NAME, auth_token_file: $CERTS/token.txt in the config)" >&2
    echo "$addr"
}

status() {
    id="$(cat "$STATE")"
    vastai show instance "$id"
    addr="$(address "$id")"
    specdec health --verifier "$addr" --tls-ca "$CERTS/ca.pem" --tls-server-name "$TLS_NAME"
}

down() {
    id="$(cat "$STATE")"
    vastai destroy instance "$id"
    rm -f "$STATE"
    echo "destroyed instance $id" >&2
}

case "${1:-}" in
    up) up ;;
    status) status ;;
    down) down ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
