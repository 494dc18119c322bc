"""The llama.cpp verifier beside llama.cpp itself, same GGUF, same threads, one process, one run:
llama.cpp's plain greedy decoding (llama-cpp-python's `Llama`), our llama.cpp-backed verifier-only
`Generate`, n-gram speculation on it, and the verifier-only aggregate at --sessions concurrent sessions.

    flock /tmp/specdec-bench.lock python scripts/measure_llamacpp.py --prompts 3 --max-new-tokens 48 --threads 1 \
        --pubmedqa /path/to/pubmedqa_pqal.jsonl

The verifier is served in this process over loopback gRPC (its llama.cpp decode releases the GIL); a
warm-up prompt precedes each mode. Times include the prompt's prefill for every system. Prints a markdown
table and, as the last line, one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time

import numpy as np

from draft_worker import client, transport
from draft_worker.drafters import NgramDrafter
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams, VerifierLimits
from specdec.pubmedqa import default_path, load_items
from verifier_worker.llamacpp_backend import LlamaCppBackend, LlamaCppConfig
from verifier_worker.server import ModelInfo, VerifierServicer, start_server


def plain_llamacpp(llm, prompt: list[int], n: int) -> tuple[list[int], float]:
    """llama.cpp decoding one token per step, greedy (argmax of the last token's logits, the only ones it
    computes), as a CPU user runs it."""
    from llama_cpp import llama_get_logits_ith

    start = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)))))
        llm.eval(out[-1:])
    return out, time.perf_counter() - start


async def measure(args) -> dict:
    from llama_cpp import Llama

    path = models.gguf_path(args.model)
    tokenizer = models.load_tokenizer(str(path))
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    prompts = [tokenizer(item.prompt)["input_ids"] for item in load_items(args.pubmedqa)[: args.prompts + 1]]
    n = args.max_new_tokens
    params = SamplingParams(max_new_tokens=n)  # no stop tokens: exactly n tokens, as plain decoding
    rows: dict[str, dict] = {}

    def record(name: str, tokens: int, wall: float, outputs=None, **extra) -> None:
        rows[name] = {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "outputs": outputs, **extra}
        print(f"{name}: {tokens / wall:.2f} tok/s ({tokens} tokens, {wall:.1f} s) {extra}", file=sys.stderr, flush=True)

    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    plain_llamacpp(llm, prompts[0], 4)  # warm-up
    outs, wall = [], 0.0
    for prompt in prompts[1:]:
        out, s = plain_llamacpp(llm, prompt, n)
        outs.append(out)
        wall += s
    record("llama.cpp plain decoding (Llama, greedy)", n * args.prompts, wall, outs)
    del llm

    backend = LlamaCppBackend(args.model, LlamaCppConfig(n_ctx=8192, n_seq_max=16, n_threads=args.threads))
    info = ModelInfo(args.model, backend.vocab_size, fingerprint, f"gguf {backend.description}", "llama.cpp cpu")
    servicer = VerifierServicer(backend, info, VerifierLimits(max_sessions=16))
    server, port = await start_server(servicer, "127.0.0.1", 0)
    try:
        async with transport.open_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.VerifierStub(channel)
            vinfo = await transport.fetch_info(stub)

            async def timed(name: str, fn) -> None:
                await fn(prompts[0])  # warm-up
                outs, wall = [], 0.0
                for prompt in prompts[1:]:
                    start = time.perf_counter()
                    result = await fn(prompt)
                    wall += time.perf_counter() - start
                    outs.append(result.token_ids)
                record(name, sum(map(len, outs)), wall, outs)

            await timed("specdec llama.cpp verifier-only (Generate)", lambda p: client.generate_baseline(stub, p, params))
            for gamma in args.gamma:
                await timed(f"specdec n-gram speculation, lock-step, gamma {gamma}", lambda p, g=gamma: client.speculate(
                    stub, NgramDrafter(fingerprint=fingerprint), p, params, g, vinfo, tokenizer_fingerprint=fingerprint))
            for sessions in sorted({1, args.sessions}):
                batch = (prompts[1:] * sessions)[:sessions]
                start = time.perf_counter()
                results = await asyncio.gather(*(client.generate_baseline(stub, p, params) for p in batch))
                wall = time.perf_counter() - start
                # decoding alone: tokens after each first one, over the span from the first first token to
                # the last token (conservative: other sessions' prefill chunks still ride in that span)
                span = max(r.chunk_times_s[-1] for r in results) - min(r.chunk_times_s[0] for r in results)
                decode_tok_s = sum(len(r.token_ids) - 1 for r in results) / span
                record(f"specdec llama.cpp verifier-only, {sessions} concurrent session(s), aggregate",
                       sum(len(r.token_ids) for r in results), wall, decode_tok_s=decode_tok_s)
    finally:
        await server.stop(grace=None)
        backend.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct", help=".gguf file or offline: alias")
    p.add_argument("--pubmedqa", type=pathlib.Path, default=default_path())
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gamma", type=int, nargs="+", default=[4])
    p.add_argument("--sessions", type=int, default=4, help="concurrent verifier-only sessions for the aggregate")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.pubmedqa is None:
        p.error("pass --pubmedqa or set SPECDEC_PUBMEDQA")
    rows = asyncio.run(measure(args))
    base_name = "llama.cpp plain decoding (Llama, greedy)"
    base = rows[base_name]
    verifier_only = rows["specdec llama.cpp verifier-only (Generate)"]["outputs"]
    print(f"\n{args.prompts} PubMedQA prompts x {args.max_new_tokens} tokens, {args.model}, {args.threads} thread(s)\n")
    print("| system | tok/s | vs llama.cpp plain | output = verifier-only |\n|---|---|---|---|")
    for name, row in rows.items():
        same = "" if row["outputs"] is None else str(row["outputs"] == verifier_only)
        decode = f" (decoding alone {row['decode_tok_s']:.2f})" if "decode_tok_s" in row else ""
        print(f"| {name} | {row['tok_s']:.2f}{decode} | {row['tok_s'] / base['tok_s']:.2f}x | {same} |")
    agree = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(base["outputs"], verifier_only)]
    summary = {name: {k: v for k, v in row.items() if k != "outputs"} for name, row in rows.items()}
    summary["plain_vs_verifier_only_token_agreement"] = agree
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
