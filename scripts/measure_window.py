"""How long a proposal of the largest legal size takes over an emulated link, under the verifier's HTTP/2
window settings (`verifier_worker.listen.server_options`) and under gRPC's defaults: the check behind fixing
each stream's window at one message instead of growing it by BDP probing.

    python scripts/measure_window.py --rtt-ms 50 --vocab 151936

An echo server gets each set of options; a client sends six messages of `VerifierLimits.message_bytes(vocab)`
(the largest the verifier accepts: dense fp32 probabilities for max_gamma tokens) through the userspace delay
proxy, one after another, and the per-call milliseconds are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc

from draft_worker.delay import DelayProxyProcess as DelayProxy  # its own process: the link waits on no drafting
from specdec.config import VerifierLimits
from verifier_worker.listen import server_options


async def per_call_ms(options: list[tuple[str, int]], size: int, rtt_ms: float, calls: int = 6) -> list[float]:
    server = grpc.aio.server(options=options)

    async def echo(request: bytes, context) -> bytes:
        return b"ok"

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"E": grpc.unary_unary_rpc_method_handler(echo)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with DelayProxy(f"127.0.0.1:{port}", rtt_ms) as proxy, \
                grpc.aio.insecure_channel(proxy.address, options=[("grpc.max_send_message_length", -1)]) as channel:
            call = channel.unary_unary("/t.T/E")
            await call(b"x")  # connect
            payload, out = b"x" * size, []
            for _ in range(calls):
                started = time.perf_counter()
                await call(payload)
                out.append(1000 * (time.perf_counter() - started))
            return out
    finally:
        await server.stop(None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rtt-ms", type=float, default=50.0)
    p.add_argument("--vocab", type=int, default=151936, help="the verifier's vocabulary (Qwen2.5: 151936)")
    args = p.parse_args()
    ours = server_options(VerifierLimits(), args.vocab)
    size = dict(ours)["grpc.max_receive_message_length"] - 64 * 1024
    limit = [("grpc.max_receive_message_length", size + 64 * 1024)]
    arms = {"verifier (window = one message)": ours, "gRPC default (BDP probing)": limit,
            "no BDP, default 64 KiB window": [*limit, ("grpc.http2.bdp_probe", 0)]}
    print(f"{size / 1e6:.2f} MB per call over a {args.rtt_ms:g} ms link")
    for name, options in arms.items():
        print(f"{name}: " + " ".join(f"{ms:.0f}" for ms in asyncio.run(per_call_ms(options, size, args.rtt_ms))) + " ms")


if __name__ == "__main__":
    main()
