"""The llama.cpp verifier beside llama.cpp itself, same GGUF, same core, one run: llama.cpp's plain greedy
decoding (llama-cpp-python's `Llama`), our llama.cpp-backed verifier-only `Generate`, n-gram speculation
and LM-draft speculation on it, and the verifier-only aggregate at 1 and --sessions concurrent sessions.

    flock /tmp/specdec-bench.lock python scripts/measure_llamacpp.py --prompts 3 --max-new-tokens 48 --threads 1 \
        --pubmedqa /path/to/pubmedqa_pqal.jsonl

Roles are pinned like scripts/measure_engine.py: llama.cpp's plain decoding runs first in this process on
--verifier-cpus; then the verifier runs as a `serve-verifier --backend llama.cpp` process on --verifier-cpus,
and this process (the client, the n-gram and the LM drafts) moves to --draft-cpus. Every system decodes with
--threads threads; plain decoding asks logits for the last token only (logits_all off), as a user runs it.
A warm-up prompt precedes each mode. Per-request times include the prompt's prefill for every system.
The aggregate rows report tok/s over the whole run (prefill included) and over the window in which every
session is decoding (after the last first token, up to the first last token: prefill excluded).
Prints a markdown table and, as the last line, one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

from draft_worker import client, transport
from draft_worker.drafters import DrafterSpec, DraftModels, build_drafter
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import default_path, load_items

PLAIN = "llama.cpp plain decoding (Llama, greedy)"
VERIFIER_ONLY = "specdec llama.cpp verifier-only (Generate)"


def plain_llamacpp(llm, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """llama.cpp decoding one token per step, greedy (argmax of the last token's logits, the only ones it
    computes), as a CPU user runs it. -> (tokens, seconds in all, seconds from the first token to the last)"""
    from llama_cpp import llama_get_logits_ith

    def argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))

    start = time.perf_counter()
    llm.reset()
    llm.eval(prompt)
    out = [argmax()]
    first = time.perf_counter()
    while len(out) < n:
        llm.eval(out[-1:])
        out.append(argmax())
    end = time.perf_counter()
    return out, end - start, end - first


def decode_rate(results) -> float:
    """Decoding alone, prefill excluded: tokens after each request's first reply over the time from that
    reply to its last, summed over the requests."""
    tokens = sum(sum(r.chunk_tokens[1:]) for r in results)
    return tokens / sum(r.chunk_times_s[-1] - r.chunk_times_s[0] for r in results)


def decoding_window(results, starts: list[float]) -> tuple[float, int]:
    """(seconds, tokens) of the span in which every session decodes: from the last session's first token to
    the first session's last token, the tokens committed inside it (prefill excluded)."""
    times = [[start + t for t in r.chunk_times_s] for r, start in zip(results, starts)]  # perf_counter seconds
    lo, hi = max(t[0] for t in times), min(t[-1] for t in times)
    tokens = sum(c for ts, r in zip(times, results) for t, c in zip(ts, r.chunk_tokens) if lo < t <= hi)
    return hi - lo, tokens


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process (Linux), 0 elsewhere."""
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in text.splitlines() if x.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) * 1024


async def measure(args) -> dict:
    from llama_cpp import Llama

    verifier_cpus, draft_cpus = cpus(args.verifier_cpus), cpus(args.draft_cpus)
    if verifier_cpus:
        os.sched_setaffinity(0, verifier_cpus)  # plain llama.cpp on the verifier's cores
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

    llm = Llama(model_path=str(path), n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    plain_llamacpp(llm, prompts[0], 4)  # warm-up
    outs, wall, decode_s = [], 0.0, 0.0
    for prompt in prompts[1:]:
        out, s, d = plain_llamacpp(llm, prompt, n)
        outs.append(out)
        wall, decode_s = wall + s, decode_s + d
    record(PLAIN, n * args.prompts, wall, outs, decode_tok_s=(n - 1) * args.prompts / decode_s,
           peak_rss_mib=peak_rss_bytes(os.getpid()) / 2**20)
    del llm

    extra = ("--backend", "llama.cpp", "--threads", str(args.threads), "--n-ctx", str(args.n_ctx), *args.verifier_args)
    verifier = start_verifier(args.model, "auto", "cpu", extra_args=extra, cpus=verifier_cpus)
    if draft_cpus:
        os.sched_setaffinity(0, draft_cpus)
    torch.set_num_threads(args.threads)  # the LM draft's threads (the llama.cpp draft takes as many)
    try:
        draft_models = DraftModels()
        async with transport.open_channel(verifier.address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            vinfo = await transport.fetch_info(stub)

            async def timed(name: str, fn) -> None:
                await fn(prompts[0])  # warm-up
                results, wall = [], 0.0
                for prompt in prompts[1:]:
                    start = time.perf_counter()
                    results.append(await fn(prompt))
                    wall += time.perf_counter() - start
                outs = [r.token_ids for r in results]
                record(name, sum(map(len, outs)), wall, outs, decode_tok_s=decode_rate(results),
                       **({"acceptance": sum(r.accepted for r in results) / max(1, sum(r.proposed for r in results))}
                          if any(r.proposed for r in results) else {}))

            def speculative(spec: DrafterSpec, gamma: int):
                return lambda p: client.speculate(stub, build_drafter(spec, draft_models, fingerprint), p, params, gamma,
                                                  vinfo, tokenizer_fingerprint=fingerprint)

            await timed(VERIFIER_ONLY, lambda p: client.generate_baseline(stub, p, params))
            for gamma in args.gamma:
                await timed(f"specdec n-gram speculation, lock-step, gamma {gamma}", speculative(DrafterSpec(kind="ngram"), gamma))
            if args.draft_model:
                spec = DrafterSpec(kind="lm", model=args.draft_model, backend=args.draft_backend)
                for gamma in args.lm_gamma:
                    await timed(f"specdec LM draft ({args.draft_backend}) speculation, lock-step, gamma {gamma}",
                                speculative(spec, gamma))
            for sessions in sorted({1, args.sessions}):
                batch = (prompts[1:] * sessions)[:sessions]

                async def one(p):
                    return time.perf_counter(), await client.generate_baseline(stub, p, params)

                start = time.perf_counter()
                starts, results = zip(*await asyncio.gather(*(one(p) for p in batch)))
                wall = time.perf_counter() - start
                span, tokens = decoding_window(results, starts)
                record(f"specdec llama.cpp verifier-only, {sessions} concurrent session(s), aggregate",
                       sum(len(r.token_ids) for r in results), wall, decode_tok_s=tokens / span)
            rows[VERIFIER_ONLY]["peak_rss_mib"] = peak_rss_bytes(verifier.proc.pid) / 2**20
    finally:
        verifier.stop()
    return rows


def cpus(text: str) -> list[int] | None:
    return [int(c) for c in text.split(",")] if text else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct", help=".gguf file or offline: alias")
    p.add_argument("--draft-model", default="offline:qwen2.5-coder-0.5b-instruct", help='LM draft; "" = none')
    p.add_argument("--draft-backend", choices=["transformers", "llama.cpp"], default="llama.cpp")
    p.add_argument("--pubmedqa", type=pathlib.Path, default=default_path())
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--gamma", type=int, nargs="+", default=[4], help="n-gram block sizes")
    p.add_argument("--lm-gamma", type=int, nargs="+", default=[3], help="LM draft block sizes")
    p.add_argument("--sessions", type=int, default=4, help="concurrent verifier-only sessions for the aggregate")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads of every system and of the draft")
    p.add_argument("--n-ctx", type=int, default=8192)
    p.add_argument("--verifier-cpus", default="0", help='cores of plain llama.cpp and the verifier; "" = any')
    p.add_argument("--draft-cpus", default="1", help='cores of the client and the drafts; "" = any')
    p.add_argument("--verifier-args", nargs=argparse.REMAINDER, default=[], help="more serve-verifier flags (last)")
    args = p.parse_args()
    if args.pubmedqa is None:
        p.error("pass --pubmedqa or set SPECDEC_PUBMEDQA")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows = asyncio.run(measure(args))
    base = rows[PLAIN]
    verifier_only = rows[VERIFIER_ONLY]["outputs"]
    print(f"\n{args.prompts} PubMedQA prompts x {args.max_new_tokens} tokens, {args.model}, {args.threads} thread(s), "
          f"verifier cpus {args.verifier_cpus or 'any'}, draft cpus {args.draft_cpus or 'any'}\n")
    print("| system | tok/s, prefill included | vs plain | tok/s, decoding alone | vs plain | output = verifier-only |\n"
          "|---|---|---|---|---|---|")
    for name, row in rows.items():
        same = "" if row["outputs"] is None else str(row["outputs"] == verifier_only)
        print(f"| {name} | {row['tok_s']:.2f} | {row['tok_s'] / base['tok_s']:.2f}x | {row['decode_tok_s']:.2f} | "
              f"{row['decode_tok_s'] / base['decode_tok_s']:.2f}x | {same} |")
    agree = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(base["outputs"], verifier_only)]
    summary = {name: {k: v for k, v in row.items() if k != "outputs"} for name, row in rows.items()}
    summary["plain_vs_verifier_only_token_agreement"] = agree
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
