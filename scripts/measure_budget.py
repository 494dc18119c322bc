"""Issue 18's concurrency sweep: `--gamma auto` under the verifier's draft budget against fixed gammas and the
batched verifier-only `Generate`, at several numbers of concurrent sessions, on one box.

    flock /tmp/specdec-bench.lock python scripts/measure_budget.py --sessions 1 2 4 8 16 --prompts 4 \
        --max-new-tokens 32 --max-prompt-tokens 192 --drafters ngram lm --gammas 2 4 --lm-gammas 2 3 --pin

Two verifier processes in turn (`specdec serve-verifier`, the real pair's 1.5B by default): one granting draft
budgets (arms: Generate, auto per drafter, n-gram at --budget-gammas capped by the budget) and one with
--no-draft-budget (arms: Generate, each drafter at each fixed gamma as it is). Each process runs its own Generate,
so every ratio is taken within one process; with --repeats K the arms run K times in turn and the medians are
reported (one pass over 4 prompts moves by a few percent between passes on this class of machine). At each level N: max(R x N, prompts) requests (R: --requests-per-session), N at a time, prompts in
turn. --pin plays two machines: the verifier on core 0, this process (every session's drafting) on core 1, one
torch thread. Prints per (verifier, level, arm): aggregate tok/s (tokens / wall of the level), its ratio to that
process's Generate at the level, verifier compute per committed token (the requests' shares), the mean budget and the mean
number of sessions in the step each round rode in (below the level: lock-step sessions missed steps) and the shadow
blocks each request reported (draft_worker/shadow.py), the draft tokens a round's grant allowed and its block did not
carry ("unsent budget": a grant priced tokens that never came, or the client's own gamma 0), and the mean compute of
the steps where all N sessions
decoded one token each ("plain step ms": the same work in every arm, so where an arm's reads above Generate's, its
drafting slowed the verifier's steps; a mean, since drafting overlaps only some of them: --pin's two "machines"
share one box's caches and memory bandwidth, which two real machines do not), and the verifier process's CPU
seconds per committed token (its event loop and gRPC threads too, which a step's compute leaves out; with its median
ratio to Generate's over the passes: where the verifier's core is saturated, this is what an arm costs it), and the
full-load decode tok/s (`full_load_decoding`: while all N sessions were decoding, the level's prefills and its tail
left out) with its median ratio. --rtt-ms:
every request through a delay proxy of that round trip. The fast regime (a verifier that steps in a few ms, as a GPU would: the tiny pair):

    python scripts/measure_budget.py --verifier /tmp/specdec-tiny/verifier --dtype fp32 --draft /tmp/specdec-tiny/draft \
        --draft-dtype fp32 --sessions 1 4 --rtt-ms 0 25 100 --mode async --prompts 8 --max-prompt-tokens 200 \
        --drafters ngram lm --budget-gammas --repeats 3 --pin --skip-fixed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import torch

from draft_worker.client import generate_baseline, speculate
from draft_worker.delay import DelayProxyProcess as DelayProxy  # its own process: the link waits on no drafting
from draft_worker.drafters import DraftModels, DrafterSpec, NgramDrafter, build_drafter
from draft_worker.gamma import AutoGamma, new_history
from draft_worker.transport import fetch_info, open_channel
from orchestrator.bench import encode_prompts
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams, VerifierLimits
from specdec.pubmedqa import default_path, load_items


DRAFTS = DraftModels()
HISTORIES = {"ngram": new_history(), "lm": new_history()}  # each drafter's acceptance over the requests so far


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (Linux /proc; nan elsewhere): the verifier's whole cost, its
    event loop and gRPC threads included, which its steps' compute_s leaves out."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drafter(name: str, args):
    """'ngram' or 'lm' (args.draft at args.draft_dtype): a fresh drafter for one request."""
    if name == "ngram":
        return NgramDrafter()
    return build_drafter(DrafterSpec(kind="lm", model=args.draft, dtype=args.draft_dtype), DRAFTS)


async def level(stub, info, prompts: list[list[int]], sessions: int, arm: str, params: SamplingParams, args,
                label: str = ""):
    """-> (aggregate tok/s, verifier compute s per token, mean budget or nan, mean batch, shadow blocks per request,
    mean compute s of the plain decoding steps, mean granted draft tokens a round's block left unsent or nan, the
    verifier process's CPU s per token or nan, the full-load decode tok/s or nan) of max(R x sessions, prompts)
    requests."""
    jobs = [prompts[i % len(prompts)] for i in range(max(args.requests_per_session * sessions, len(prompts)))]
    gate = asyncio.Semaphore(sessions)

    async def one(prompt):
        async with gate:
            if arm == "generate":
                return await generate_baseline(stub, prompt, params)
            name, _, gamma = arm.partition("-")  # e.g. "ngram-auto", "lm-g3", "lm-unsaid" (auto, not saying its gamma)
            gamma = AutoGamma(history=HISTORIES[name], says=gamma == "auto") if gamma in ("auto", "unsaid") \
                else int(gamma.removeprefix("g"))
            return await speculate(stub, drafter(name, args), prompt, params, gamma, info, mode=args.mode)

    started, cpu = time.perf_counter(), process_cpu_s(args.verifier_pid)
    results = await asyncio.gather(*(one(p) for p in jobs))
    wall, cpu = time.perf_counter() - started, process_cpu_s(args.verifier_pid) - cpu
    if args.trace:  # every request's rounds, to see why an arm reads what it does
        with open(args.trace, "a") as out:
            for r in results:
                record = {"verifier": label, "sessions": sessions, "arm": arm, "began_s": r.started - started}
                out.write(json.dumps({**record, **r.to_dict()}) + "\n")  # as requests.jsonl, and when it began
    tokens = sum(len(r.token_ids) for r in results)
    budgets = [b for r in results for b in r.budget_per_round]
    batch = [b for r in results for b in r.batch_size]  # sessions in the step each round rode in
    # steps where every row was one token (no draft, no prompt chunk): the same work in every arm at that batch
    plain = [c for r in results for c, n, b in zip(r.compute_s, r.batch_tokens, r.batch_size) if n == b == sessions]
    # budget_per_round[i] (the opening's first) governs the block of proposed_per_round[i]
    unsent = [max(0, b - p) for r in results for b, p in zip(r.budget_per_round, r.proposed_per_round)]
    return tokens / wall, sum(r.verifier_compute_s for r in results) / tokens, (
        statistics.mean(budgets) if budgets else float("nan")), statistics.mean(batch) if batch else float("nan"), \
        statistics.mean(r.shadows for r in results), statistics.mean(plain) if plain else float("nan"), \
        statistics.mean(unsent) if unsent else float("nan"), cpu / tokens, full_load_decoding(
            [(r.started, r.chunk_times_s, r.chunk_tokens) for r in results], sessions)


def full_load_decoding(spans: list[tuple[float, list[float], list[int]]], sessions: int) -> float:
    """Output tok/s while all N sessions were decoding: the tokens committed inside the stretches where N requests
    had their first token and had not yet ended, over those stretches' length (nan: none). spans: per request (its
    start, its chunk_times_s from there, its chunk_tokens). What it leaves out is what a run of N requests at a time
    adds to decoding and a server kept busy does not: the opening burst of prefills (2/3 of the real pair's wall
    at 8 sessions), a new request's prefill mixed into the others' steps, and the tail of a wave, where requests that
    speculation sped up have ended and the last ones decode in smaller steps, which `Generate`'s requests (every
    one 32 tokens, in step) never do. Each stretch's first commit is excluded, its last included."""
    edges = sorted(e for start, times, _ in spans if times for e in ((start + times[0], 1), (start + times[-1], -1)))
    stretches, active, since = [], 0, 0.0
    for t, step in edges:  # ends sort before starts at the same instant
        if active == sessions and t > since:
            stretches.append((since, t))
        active += step
        since = t
    length = sum(b - a for a, b in stretches)
    tokens = sum(n for start, times, counts in spans for c, n in zip(times, counts)
                 if any(a < start + c <= b for a, b in stretches))
    return tokens / length if length > 0 else float("nan")


async def sweep(address: str, prompts, args, arms: list[str], label: str) -> None:
    for rtt_ms in args.rtt_ms:
        if rtt_ms > 0:  # an emulated link (userspace: no netem here), every request through it
            async with DelayProxy(address, rtt_ms) as proxy:
                await sweep_link(proxy.address, prompts, args, arms, f"{label}, RTT {rtt_ms:g} ms")
        else:
            await sweep_link(address, prompts, args, arms, label)


async def sweep_link(address: str, prompts, args, arms: list[str], label: str) -> None:
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    async with open_channel(address) as channel:
        stub = pb_grpc.VerifierStub(channel)
        info = await fetch_info(stub)
        await generate_baseline(stub, prompts[0], SamplingParams(max_new_tokens=4))  # warm-up, and each drafter's
        for name in args.drafters:
            await speculate(stub, drafter(name, args), prompts[0], SamplingParams(max_new_tokens=4), 2, info)
        for n in args.sessions:
            runs = {arm: [] for arm in arms}  # arm -> one row per repeat
            for _ in range(args.repeats):  # interleaved: Generate, then each arm, then again
                for arm in arms:
                    runs[arm].append(await level(stub, info, prompts, n, arm, params, args, label))
            for arm in arms:
                rows = runs[arm]
                ratio = statistics.median(row[0] / base[0] for row, base in zip(rows, runs["generate"]))
                rate, compute, budget, batch, shadows, plain, unsent, cpu, decoding = (statistics.median(c)
                                                                                       for c in zip(*rows))
                cpu_ratio = statistics.median(r[7] / b[7] for r, b in zip(rows, runs["generate"]))
                decoding_ratio = statistics.median(r[8] / b[8] for r, b in zip(rows, runs["generate"]))
                spread = f" ({min(r[0] / b[0] for r, b in zip(rows, runs['generate'])):.2f}-" \
                         f"{max(r[0] / b[0] for r, b in zip(rows, runs['generate'])):.2f})" if len(rows) > 1 else ""
                print(f"| {label} | {n} | {arm} | {rate:.2f} | {ratio:.2f}{spread} | {1000 * compute:.0f} | {budget:.2f} | "
                      f"{batch:.1f} | {shadows:.1f} | {1000 * plain:.2f} | {unsent:.2f} | {1000 * cpu:.2f} "
                      f"({cpu_ratio:.3f}) | {decoding:.2f} ({decoding_ratio:.2f}) |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--dtype", default="auto", help="the verifier's: auto = bf16 where the hardware runs it natively, else fp32")
    p.add_argument("--pubmedqa", default=str(default_path()))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-session", type=int, default=1,
                   help="R: max(R x N, prompts) requests at level N, N at a time; above 1 the level's tail (requests "
                        "finishing unevenly, the last ones running with fewer sessions) weighs 1/R as much")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every level's arms this many times, interleaved, and report medians (the ratio: the "
                        "median of each repeat's ratio to its own Generate, with its range)")
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 4], help="fixed gammas on the verifier without budget")
    p.add_argument("--budget-gammas", type=int, nargs="*", default=[4], help="fixed gammas under the budget")
    p.add_argument("--mode", default="lockstep")
    p.add_argument("--drafters", nargs="+", choices=["ngram", "lm"], default=["ngram"])
    p.add_argument("--draft", default="offline:qwen2.5-coder-0.5b-instruct", help="the LM drafter's model")
    p.add_argument("--draft-dtype", default="auto")
    p.add_argument("--lm-gammas", type=int, nargs="+", default=[2, 3], help="fixed gammas of the LM drafter")
    p.add_argument("--pin", action="store_true", help="verifier on core 0, drafting on core 1 (one torch thread)")
    p.add_argument("--skip-fixed", action="store_true", help="only the budgeted verifier")
    p.add_argument("--unsaid", action="store_true",
                   help="also auto arms whose client does not say its own gamma (Proposal.wants): an older client")
    p.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0],
                   help="emulated round trips (a delay proxy), each a sweep of its own: the fast regime's links")
    p.add_argument("--verifier-args", default="", help="more `serve-verifier` flags, e.g. '--batch-wait-ms 150'")
    p.add_argument("--trace", help="append every request's record (GenerationResult.to_dict: its rounds' gammas, "
                                   "budgets, verdicts, steps) to this JSONL")
    args = p.parse_args()
    tokenizer = models.load_tokenizer(args.verifier)
    prompts = [x.ids for x in encode_prompts(load_items(args.pubmedqa)[: args.prompts], tokenizer, args.max_prompt_tokens)]
    dtype, flags = models.parse_dtype(args.dtype, torch.device("cpu")), " ".join(models.cpu_matrix_flags()) or "unknown"
    print(f"{len(prompts)} prompts x {args.max_new_tokens} tokens, mode {args.mode}, verifier {args.verifier} {dtype} "
          f"({args.dtype}), CPU flags {flags}")
    print("| verifier | sessions | arm | aggregate tok/s | x Generate | verifier compute ms/token | mean budget | "
          "mean batch | shadow blocks per request | plain step ms | unsent budget | verifier CPU ms/token (x Generate) | "
          "full-load decode tok/s (x Generate) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fixed = {"ngram": args.gammas, "lm": args.lm_gammas}
    runs = [("budget", (), ["generate", *(f"{d}-{a}" for d in args.drafters for a in ("auto", "unsaid")[: 1 + args.unsaid]),
                            *(f"ngram-g{g}" for g in args.budget_gammas if "ngram" in args.drafters)])]
    if not args.skip_fixed:
        runs.append(("no budget", ("--no-draft-budget",),
                     ["generate", *(f"{d}-g{g}" for d in args.drafters for g in fixed[d])]))
    limits = VerifierLimits()
    if args.pin:
        os.sched_setaffinity(0, {1})
        torch.set_num_threads(1)
    for label, extra, arms in runs:
        verifier = start_verifier(args.verifier, args.dtype, "cpu", cpus=[0] if args.pin else None,
                                  extra_args=(*extra, "--max-sessions-per-client", str(limits.max_sessions),
                                              *args.verifier_args.split()))
        args.verifier_pid = verifier.proc.pid
        try:
            asyncio.run(sweep(verifier.address, prompts, args, arms, label))
        finally:
            verifier.stop()


if __name__ == "__main__":
    main()
