"""Token trees and the suffix drafter against chains and n-gram, side by side in one run (issue 21).

    flock /tmp/specdec-bench.lock python scripts/measure_trees.py --prompts 3 --max-new-tokens 40

The verifier is a separate `serve-verifier` process on --verifier-cpus, the drafts run here on --draft-cpus
(as scripts/measure_engine.py pins them); one session at a time, greedy, lock-step, EOS ignored. Prompts go
round-robin over the configurations, so drift hits all alike. The suffix drafter runs cold (no cache of earlier
outputs) and warm (a cache of its own, filled by the earlier prompts' outputs: the first prompt is cold). Per configuration: committed
tokens per verifier step, verified tokens (block rows: the root and every draft node) per committed token,
tok/s, and the verifier's decode compute per committed token. Prints a table; the last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import torch

from draft_worker import client, transport
from draft_worker.drafters import DrafterSpec, DraftModels, build_drafter
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import default_path, load_items


def configs(args) -> dict[str, tuple[DrafterSpec | None, int]]:
    n = args.tree_nodes
    out = {"verifier-only": (None, 0), "ngram g=4": (DrafterSpec(kind="ngram"), 4),
           "suffix cold g=8": (DrafterSpec(kind="suffix", suffix_cache_tokens=0), 8),
           "suffix warm g=8": (DrafterSpec(kind="suffix"), 8),
           f"suffix warm tree={n}": (DrafterSpec(kind="suffix", tree_nodes=n), 8)}
    if args.lm:
        lm = dict(kind="lm", model=args.draft_model, dtype="fp32")
        out |= {"lm g=4": (DrafterSpec(**lm), 4), f"lm tree={n}": (DrafterSpec(**lm, tree_nodes=n), 4)}
    return out


async def run(args) -> dict[str, dict]:
    verifier = start_verifier(args.verifier_model, args.verifier_dtype, "cpu", cpus=[int(args.verifier_cpus)])
    os.sched_setaffinity(0, {int(args.draft_cpus)})
    torch.set_num_threads(1)
    totals: dict[str, dict] = {}
    try:
        tokenizer = models.load_tokenizer(args.verifier_model)
        fingerprint = models.tokenizer_fingerprint(tokenizer)
        prompts = [tokenizer(item.prompt)["input_ids"] for item in load_items(args.pubmedqa)[: args.prompts]]
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        draft_models = {name: DraftModels() for name in configs(args)}  # a suffix cache per configuration
        async with transport.open_channel(verifier.address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            info = await transport.fetch_info(stub)
            await client.generate_baseline(stub, prompts[0][:32], SamplingParams(max_new_tokens=4))  # warm-up
            for i, prompt in enumerate(prompts):
                for name, (spec, gamma) in configs(args).items():
                    if spec is None:
                        result = await client.generate_baseline(stub, prompt, params)
                        steps, verified = len(result.token_ids), len(result.token_ids)
                        decode_s, decoded = sum(result.compute_s[1:]), len(result.token_ids) - 1  # 1st: + prefill
                    else:
                        drafter = build_drafter(spec, draft_models[name], fingerprint)
                        result = await client.speculate(stub, drafter, prompt, params, gamma, info,
                                                        tokenizer_fingerprint=fingerprint, mode="lockstep")
                        steps = len(result.proposed_per_round)
                        verified = steps + sum(result.proposed_per_round)
                        decode_s, decoded = sum(result.compute_s), len(result.token_ids)  # prefill: `opened`
                    t = totals.setdefault(name, dict(tokens=0, steps=0, verified=0, wall_s=0.0, compute_s=0.0,
                                                                decoded=0))
                    t["tokens"] += len(result.token_ids)
                    t["steps"] += steps
                    t["verified"] += verified
                    t["wall_s"] += result.wall_s
                    t["compute_s"] += decode_s
                    t["decoded"] += decoded
                print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    finally:
        verifier.stop()
    return {name: {"committed_per_step": t["tokens"] / t["steps"], "verified_per_committed": t["verified"] / t["tokens"],
                   "tok_s": t["tokens"] / t["wall_s"], "compute_ms_per_token": 1000 * t["compute_s"] / t["decoded"]}
            for name, t in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier-model", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft-model", default="offline:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--verifier-dtype", default="bf16")
    p.add_argument("--pubmedqa", default=default_path() or "/work/shared/data/pubmedqa/pubmedqa_pqal.jsonl")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--tree-nodes", type=int, default=8)
    p.add_argument("--lm", action="store_true", help="also the LM drafter's chain and tree")
    p.add_argument("--verifier-cpus", default="0")
    p.add_argument("--draft-cpus", default="1")
    args = p.parse_args()
    table = asyncio.run(run(args))
    print("| config | committed/step | verified/committed | tok/s | verifier ms/token |\n|---|---|---|---|---|")
    for name, m in table.items():
        print(f"| {name} | {m['committed_per_step']:.2f} | {m['verified_per_committed']:.2f} | {m['tok_s']:.2f} | "
              f"{m['compute_ms_per_token']:.1f} |")
    print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": table}))


if __name__ == "__main__":
    main()
