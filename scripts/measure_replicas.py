"""Two verifier replicas against one, each `serve-verifier` pinned to its own core, and a replica SIGKILLed
mid-run: the check behind README's "A pool of verifiers" figures.

    flock /tmp/specdec-bench.lock python scripts/measure_replicas.py --sessions 4 8 --max-new-tokens 32 --kill

Starts one verifier per --cpus entry (one thread each). For each session count it runs the same prompts
through a router over the first replica alone, then over all of them, alternating --repeats times (the first
round is a warm-up): verifier-only (`Generate`) and n-gram speculation (lock-step), all sessions at once.
Prints aggregate tok/s per arm and the pool's ratio to one replica. With --kill it then runs the largest
session count over the pool twice, the second time SIGKILLing the last replica once a quarter of the tokens
are committed: every request must finish with the same greedy tokens; the time lost is the wall difference.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import statistics
import time

from draft_worker.client import generate_baseline, speculate
from draft_worker.drafters import NgramDrafter
from draft_worker.router import Router
from draft_worker.transport import Backoff, ClientConfig
from orchestrator.launch import start_verifier
from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import default_path, encode, load_items

CONFIG = ClientConfig(timeout_s=900, backoff=Backoff(initial_s=0.1, max_s=1.0))


async def run_arm(addresses: list[str], prompts: list[list[int]], params: SamplingParams, spec: bool,
                  on_commit=None) -> tuple[float, list]:
    """All prompts at once over a router of `addresses` -> (wall s, results)."""
    async with Router(addresses, CONFIG, poll_s=0.2) as router:
        info = await router.info()
        start = time.perf_counter()
        if spec:
            jobs = [speculate(router.route(), NgramDrafter(), p, params, 4, info, CONFIG, on_commit=on_commit)
                    for p in prompts]
        else:
            jobs = [generate_baseline(router.route(), p, params, CONFIG, on_commit) for p in prompts]
        results = await asyncio.gather(*jobs)
        return time.perf_counter() - start, results


async def main(args) -> None:
    tokenizer = models.load_tokenizer(args.model)
    items = load_items(default_path() or args.dataset)
    prompts = [encode(item, tokenizer.encode, args.prompt_tokens)[0] for item in items[: max(args.sessions)]]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    verifiers = [start_verifier(args.model, "bf16", "cpu", cpus=[cpu], env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for cpu in args.cpus]
    try:
        pool = [v.address for v in verifiers]
        for sessions in args.sessions:
            rates: dict[str, list[float]] = {}
            for repeat in range(args.repeats + 1):
                for spec in (False, True):
                    for name, addresses in (("1 replica", pool[:1]), (f"{len(pool)} replicas", pool)):
                        wall, results = await run_arm(addresses, prompts[:sessions], params, spec)
                        if repeat:  # the first round warms up
                            arm = f"{'ngram' if spec else 'verifier-only'} {name}"
                            rates.setdefault(arm, []).append(sum(len(r.token_ids) for r in results) / wall)
                            spread = collections.Counter(r.replicas[-1] for r in results)
                            print(f"sessions={sessions} {arm}: sessions per replica {dict(spread)}", flush=True)
            for arm, values in rates.items():
                print(f"sessions={sessions} {arm}: {statistics.median(values):.2f} tok/s (runs: "
                      f"{', '.join(f'{v:.2f}' for v in values)})", flush=True)
            for kind in ("verifier-only", "ngram"):
                one, many = (statistics.median(rates[f"{kind} {n}"]) for n in ("1 replica", f"{len(pool)} replicas"))
                print(f"sessions={sessions} {kind}: pool/one = {many / one:.2f}x", flush=True)
        if args.kill:
            await kill_run(verifiers, prompts[: max(args.sessions)], params)
    finally:
        for v in verifiers:
            v.stop()


async def kill_run(verifiers, prompts: list[list[int]], params: SamplingParams) -> None:
    pool = [v.address for v in verifiers]
    wall, expected = await run_arm(pool, prompts, params, spec=False)
    _, again = await run_arm(pool, prompts, params, spec=False)  # how deterministic is the pool without a kill?
    committed, at_kill, victim = [0], [0], verifiers[-1]

    def on_commit(ids):
        committed[0] += len(ids)
        if committed[0] >= len(prompts) * params.max_new_tokens // 4 and victim.proc.poll() is None:
            os.kill(victim.proc.pid, signal.SIGKILL)
            at_kill[0] = committed[0]

    killed_wall, results = await run_arm(pool, prompts, params, spec=False, on_commit=on_commit)
    same = sum(r.token_ids == e.token_ids for r, e in zip(results, expected))
    moved = sum(len(set(r.replicas)) > 1 for r in results)
    repeatable = sum(a.token_ids == e.token_ids for a, e in zip(again, expected))
    print(f"without a kill, a second run repeats {repeatable}/{len(prompts)} outputs exactly", flush=True)
    print(f"kill -9 {victim.address} after {at_kill[0]} tokens committed: {len(results)}/{len(prompts)} "
          f"requests finished, {same} identical to the run without the kill, {moved} moved replica, "
          f"{sum(r.new_tokens for r in results)} tokens (expected {sum(e.new_tokens for e in expected)}); "
          f"wall {killed_wall:.1f} s vs {wall:.1f} s: {killed_wall - wall:+.1f} s lost", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--dataset", default="/work/shared/data/pubmedqa/pubmedqa_pqal.jsonl")
    p.add_argument("--cpus", type=int, nargs="+", default=[0, 1], help="one replica per core")
    p.add_argument("--sessions", type=int, nargs="+", default=[4, 8])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--kill", action="store_true")
    asyncio.run(main(p.parse_args()))
