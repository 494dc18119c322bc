"""Interleaved A/B of verifier-only `Generate` and async speculation through an emulated link, on the tiny
seeded pair (a verifier that steps in a few ms, like a GPU): the check behind README's fast-regime notes.

    python -m specdec.tiny /tmp/specdec-tiny
    python scripts/ab_async.py --rtt-ms 25 --max-new-tokens 32 --repeats 4

The verifier is a `specdec serve-verifier` process pinned to --verifier-cpus with one thread; this process
(client, drafts, delay proxy) is pinned to --client-cpus. For each repetition and prompt it runs every arm in
turn (Generate, async with the n-gram draft, async with a draft that proposes nothing), so drift in the
machine's speed hits every arm alike; the first repetition is a warm-up and is not recorded. Prints, per arm,
the median tok/s, the verifier's compute per token and the median ratio to Generate's tok/s on the same
prompt and repetition. To see what a busy draft core does to the verifier, run it beside
`taskset -c 1 python -c 'while True: pass'`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

import torch
from transformers import AutoTokenizer

from draft_worker.client import generate_baseline, speculate
from draft_worker.delay import DelayProxyProcess as DelayProxy  # its own process: the link waits on no drafting
from draft_worker.drafters import Candidates, DraftModels, DrafterSpec, NgramDrafter, build_drafter
from draft_worker.gamma import AutoGamma, new_history
from draft_worker.transport import fetch_info, open_channel
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.config import SamplingParams
from specdec.pubmedqa import default_path, load_items


DRAFTS = DraftModels()


class SilentDrafter(NgramDrafter):
    """Proposes nothing: async mode with it is Generate plus the protocol's own cost."""

    def propose(self, context: list[int], gamma: int) -> Candidates:
        return Candidates([], None)


async def measure(args, address: str, prompts: list[list[int]]) -> dict[str, list[tuple[float, float, float]]]:
    """-> {arm: [(tok/s, verifier compute ms per token, ratio to Generate's tok/s)]}"""
    arms = {"generate": None, "async ngram": NgramDrafter, "async silent": SilentDrafter}
    if args.auto:  # `--gamma auto` under the verifier's draft budget, each drafter's history over the run
        tiny = DrafterSpec(kind="lm", model=args.draft, dtype="fp32")
        histories = {"async ngram auto": new_history(), "async tiny-lm auto": new_history()}
        arms |= {"async ngram auto": NgramDrafter, "async tiny-lm auto": lambda: build_drafter(tiny, DRAFTS)}
    rows: dict[str, list[tuple[float, float, float]]] = {arm: [] for arm in arms}
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    async with DelayProxy(address, args.rtt_ms) as proxy, open_channel(proxy.address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        info = await fetch_info(stub)
        for repeat in range(args.repeats + 1):
            for prompt in prompts:
                base_rate = None
                for arm, drafter in arms.items():
                    if drafter is None:
                        result = await generate_baseline(stub, prompt, params)
                    else:
                        gamma = AutoGamma(history=histories[arm]) if arm.endswith(" auto") else args.gamma
                        result = await speculate(stub, drafter(), prompt, params, gamma, info, mode="async")
                    rate = len(result.token_ids) / result.wall_s
                    base_rate = base_rate or rate
                    if repeat:  # repetition 0 warms up
                        compute_ms = 1000 * result.verifier_compute_s / max(1, len(result.token_ids))
                        rows[arm].append((rate, compute_ms, rate / base_rate))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="/tmp/specdec-tiny/verifier", help="the tiny verifier (python -m specdec.tiny DIR)")
    p.add_argument("--pubmedqa", default=str(default_path()))
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-prompt-tokens", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--rtt-ms", type=float, default=25.0)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--auto", action="store_true", help="also `--gamma auto` arms: the n-gram and the tiny LM draft")
    p.add_argument("--draft", default="/tmp/specdec-tiny/draft", help="the tiny LM draft (with --auto)")
    p.add_argument("--verifier-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    args = p.parse_args()
    os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.verifier)
    items = load_items(args.pubmedqa)[: args.prompts]
    prompts = [tokenizer(item.prompt)["input_ids"][: args.max_prompt_tokens] for item in items]
    verifier = start_verifier(args.verifier, "fp32", "cpu", env={**os.environ, "OMP_NUM_THREADS": "1"},
                              cpus=[int(c) for c in args.verifier_cpus.split(",")])
    try:
        rows = asyncio.run(measure(args, verifier.address, prompts))
    finally:
        verifier.stop()
    print(f"RTT {args.rtt_ms:g} ms, {len(prompts)} prompts x {args.repeats} repetitions, {args.max_new_tokens} tokens")
    print("| arm | tok/s p50 | verifier compute ms/token p50 | x Generate (paired p50) |\n|---|---|---|---|")
    for arm, values in rows.items():
        rate, compute, ratio = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"| {arm} | {rate:.1f} | {compute:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
