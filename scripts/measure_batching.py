"""What batching buys on this machine: one engine step of B sessions x (1 + gamma) tokens over caches of
~L tokens, against B sessions stepped one at a time; and whether batched greedy output equals solo output
(bf16 can differ: padded shapes change the kernels' reduction order).

    python scripts/measure_batching.py --sessions 1 4 8 --gamma 4 --cache 300 --repeats 3 --prompts 4 --max-new-tokens 32

Runs the engine in-process (no gRPC). Prints a markdown table and, as the last line, one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics

import torch

from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import default_path, load_items
from verifier_worker.engine import Engine


async def step_ms(engine: Engine, prompt: list[int], batches: list[int], gamma: int, repeats: int) -> dict[int, list[float]]:
    """Wall time (ms) of one engine step verifying B blocks of 1 + gamma tokens over len(prompt) - 1 cached
    tokens, for each B in `batches`; the batch sizes take turns, so a noisy machine slows them alike."""
    params = SamplingParams(max_new_tokens=(repeats + 1) * (gamma + 1) + 1)
    master = engine.open(prompt, params)
    await engine.prefill(master)
    sessions = {batch: [engine.open(prompt, params) for _ in range(batch)] for batch in batches}
    for session in (s for group in sessions.values() for s in group):  # the same cache everywhere: copy it
        session.kv.append(master.kv.view())
    draft = prompt[-gamma:] if gamma else []  # almost surely rejected: every step also rolls back
    times: dict[int, list[float]] = {batch: [] for batch in batches}
    for repeat in range(repeats + 1):  # the first round warms up
        for batch, group in sessions.items():
            replies = await asyncio.gather(*(engine.verify(s, draft, None) for s in group))
            assert {cost.batch_sessions for _, cost in replies} == {batch}
            if repeat:
                times[batch].append(replies[0][1].compute_s * 1000)
    for session in (master, *(s for group in sessions.values() for s in group)):
        engine.close(session)
    return times


async def greedy(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of all prompts decoded together (one session per prompt)."""
    async def one(prompt: list[int]) -> list[int]:
        session = engine.open(prompt, SamplingParams(max_new_tokens=max_new_tokens))
        await engine.prefill(session)
        decoding = engine.decode(session)
        result = None
        while result is None or result.finish_reason is None:
            result, _ = await decoding.next()
        engine.close(session)
        return session.tokens[len(prompt):]

    return list(await asyncio.gather(*(one(p) for p in prompts)))


async def run(args) -> dict:
    torch.set_num_threads(args.threads)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model, dtype=models.parse_dtype(args.dtype), device=torch.device(args.device))
    engine = Engine(model, max_batch_tokens=max(max(args.sessions) * (args.gamma + 1), args.cache))
    items = load_items(args.pubmedqa)
    text = " ".join(item.prompt for item in items[:5])
    cache_prompt = tokenizer(text)["input_ids"][: args.cache + 1]
    steps = await step_ms(engine, cache_prompt, args.sessions, args.gamma, args.repeats)
    prompts = [tokenizer(item.prompt)["input_ids"][: args.cache] for item in items[: args.prompts]]
    solo = [(await greedy(engine, [p], args.max_new_tokens))[0] for p in prompts]
    together = await greedy(engine, prompts, args.max_new_tokens)
    first_diff = [next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), None) for s, t in zip(solo, together)]
    one = statistics.median(steps[args.sessions[0]])
    print(f"\n{args.model} {args.dtype} on {args.device}, {args.threads} threads, cache {args.cache} tokens, "
          f"blocks of 1 + {args.gamma} tokens, {args.repeats} steps each\n")
    print(f"| sessions | step ms (median) | step ms (min) | vs {args.sessions[0]} session(s) | one at a time (B x median) |")
    print("|---|---|---|---|---|")
    for batch, times in steps.items():
        ms = statistics.median(times)
        print(f"| {batch} | {ms:.0f} | {min(times):.0f} | {ms / one:.2f}x | {batch * one / args.sessions[0]:.0f} |")
    print(f"\nbatched vs solo greedy ({args.prompts} prompts x {args.max_new_tokens} tokens): "
          f"{sum(d is not None for d in first_diff)} prompts differ; first differing position per prompt: {first_diff}")
    return {"config": vars(args) | {"pubmedqa": str(args.pubmedqa)}, "step_ms": steps, "first_diff": first_diff,
            "mismatch_rate": sum(d is not None for d in first_diff) / len(first_diff)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pubmedqa", type=pathlib.Path, default=default_path(), required=default_path() is None,
                   help="PubMedQA JSONL (default: $SPECDEC_PUBMEDQA)")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--cache", type=int, default=300, help="tokens cached per session")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4, help="for the batched-vs-solo greedy comparison")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    print(json.dumps(asyncio.run(run(p.parse_args())), separators=(",", ":")))


if __name__ == "__main__":
    main()
