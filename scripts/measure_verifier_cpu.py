"""What each arm costs a saturated verifier's process per committed token (its event loop and gRPC threads included),
against `Generate`, in one verifier process: arms in turn for --passes passes of --seconds each, the medians of each
pass's ratios. Session 16's table in docs/results.md (the tiny pair, 4 sessions, lock-step):

    python scripts/measure_verifier_cpu.py --arms generate ngram-auto ngram-auto-noshadow --passes 12 --seconds 3

An arm is measure_budget.py's (generate, ngram-auto, lm-auto, ngram-g2, ...); a "-noshadow" suffix runs it with its
shadow blocks off (`Shadows.due` patched to False in this process), a "-busy" suffix runs it beside a process spinning
in pure Python on the drafting core (`generate-busy`: what any work there costs the verifier on one box, the control
for the drafters' arms). --pin's cores as measure_budget.py: the verifier on core 0, every session's drafting on
core 1. Linux only (the verifier's CPU from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import torch

import draft_worker.shadow as shadow
from draft_worker.client import generate_baseline
from draft_worker.transport import fetch_info, open_channel
from measure_budget import level, process_cpu_s
from orchestrator.bench import encode_prompts
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import default_path, load_items


BUSY = "import os\nos.sched_setaffinity(0, {1})\nwhile True:\n    pass"  # pure Python on the drafting core, no model


async def one_pass(stub, info, prompts, arm: str, args) -> tuple[float, float]:
    """(tok/s, verifier CPU s per token) of `arm`, its levels run for args.seconds. Suffixes: "-noshadow" (shadow
    blocks off), "-busy" (a process spinning in pure Python on the drafting core meanwhile: what any work there
    costs the verifier's core on this box, a control for the drafters' arms)."""
    due, tokens, wall = shadow.Shadows.due, 0.0, 0.0
    if arm.endswith("-noshadow"):
        shadow.Shadows.due = lambda *a, **k: False
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if arm.endswith("-busy") else None
    try:
        started, cpu = time.perf_counter(), process_cpu_s(args.verifier_pid)
        while time.perf_counter() - started < args.seconds:
            t = time.perf_counter()
            rate = (await level(stub, info, prompts, args.sessions, arm.removesuffix("-noshadow").removesuffix("-busy"),
                                SamplingParams(max_new_tokens=args.max_new_tokens), args))[0]
            tokens, wall = tokens + rate * (time.perf_counter() - t), wall + time.perf_counter() - t
        return tokens / wall, (process_cpu_s(args.verifier_pid) - cpu) / tokens
    finally:
        shadow.Shadows.due = due
        if busy is not None:
            busy.kill()
            busy.wait()


async def run(address: str, prompts, args) -> None:
    async with open_channel(address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        info = await fetch_info(stub)
        await generate_baseline(stub, prompts[0], SamplingParams(max_new_tokens=4))  # warm-up
        passes = [{arm: await one_pass(stub, info, prompts, arm, args) for arm in args.arms} for _ in range(args.passes)]
    print("| arm | tok/s x Generate, median (range) | verifier CPU a token x Generate, median (range) |")
    print("|---|---|---|")
    for arm in args.arms:
        rates = [p[arm][0] / p["generate"][0] for p in passes]
        cpus = [p[arm][1] / p["generate"][1] for p in passes]
        print(f"| {arm} | {statistics.median(rates):.3f} ({min(rates):.2f}-{max(rates):.2f}) | "
              f"{statistics.median(cpus):.3f} ({min(cpus):.2f}-{max(cpus):.2f}) |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", default=["generate", "ngram-auto", "ngram-auto-noshadow"])
    p.add_argument("--verifier", default="/tmp/specdec-tiny/verifier")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--draft", default="/tmp/specdec-tiny/draft", help="the LM drafter's model")
    p.add_argument("--draft-dtype", default="fp32")
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--mode", default="lockstep")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--passes", type=int, default=12)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--verifier-args", default="", help="more `serve-verifier` flags, e.g. '--draft-min-gain 1.0'")
    args = p.parse_args()
    assert "generate" in args.arms, "every ratio is to Generate's"
    args.requests_per_session = 1
    tokenizer = models.load_tokenizer(args.verifier)
    prompts = [x.ids for x in encode_prompts(load_items(default_path())[: args.prompts], tokenizer, args.max_prompt_tokens)]
    os.sched_setaffinity(0, {1})
    torch.set_num_threads(1)
    verifier = start_verifier(args.verifier, args.dtype, "cpu", cpus=[0], extra_args=tuple(args.verifier_args.split()))
    args.verifier_pid = verifier.proc.pid
    print(f"{args.sessions} sessions, {args.mode}, verifier {args.verifier} ({args.dtype}), CPU flags "
          f"{' '.join(models.cpu_matrix_flags()) or 'unknown'}; {args.passes} passes of {args.seconds:g} s per arm")
    try:
        asyncio.run(run(verifier.address, prompts, args))
    finally:
        verifier.stop()


if __name__ == "__main__":
    main()
