"""Side-by-side engine measurement on one machine: verifier-only vs speculative over loopback gRPC
(LM drafter on each --draft-backend, n-gram drafter) vs HF `generate(assistant_model=...)`, same pair,
same prompts, one run.

    python scripts/measure_engine.py --prompts 10 --max-new-tokens 64 --gamma 2 4 \
        --draft-backend transformers llama.cpp --out results/engine.json
    python scripts/measure_engine.py --verifier-backend llama.cpp ...   # the verifier on llama.cpp (issue 20)

The verifier runs as a separate `specdec serve-verifier` process; the drafts and the HF runs live in this
one, pinned to other cores (--verifier-cpus, --draft-cpus: `taskset`'s affinity), so the two do not fight
over them. Every mode generates exactly --max-new-tokens tokens (EOS ignored) after one warm-up prompt each.
Each draft backend is also timed alone: prefill ms per prompt token and decode ms per token.
Each request becomes a record in the benchmark's own format, so the metrics are `orchestrator.report`'s,
computed twice: against the gRPC verifier-only baseline and against HF's verifier-only `generate`.
Prints a markdown table and, as the last line, one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import sys
import time

import pandas as pd
import torch

from draft_worker import client, transport
from draft_worker.drafters import DrafterSpec, DraftModels, LMDrafter, build_drafter
from orchestrator import report
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SPEC_MODES, SamplingParams
from specdec.metrics import GenerationResult
from specdec.pubmedqa import default_path, load_items

GRPC_BASELINE, HF_BASELINE = "grpc verifier-only", "HF generate verifier-only"


def hf_generate(model, prompt_ids: list[int], n: int, assistant=None) -> GenerationResult:
    input_ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, assistant_model=assistant)
    return GenerationResult(token_ids=out[0, len(prompt_ids):].tolist(), wall_s=time.perf_counter() - start)


def draft_cost(draft, prompts: list[list[int]], vocab_size: int, n: int = 16) -> dict:
    """The draft alone, greedy: prefill ms per prompt token and decode ms per token, medians over prompts."""
    prefill, decode = [], []
    for prompt in prompts:
        drafter = LMDrafter(draft, "cost")
        drafter.start(prompt, SamplingParams(max_new_tokens=n + 1), vocab_size)
        start = time.perf_counter()
        drafter.get_candidates(1)  # the whole prompt in one forward
        middle = time.perf_counter()
        drafter.commit(1, None)
        drafter.get_candidates(n)  # n one-token forwards
        prefill.append(1000 * (middle - start) / len(prompt))
        decode.append(1000 * (time.perf_counter() - middle) / n)
    return {"prefill_ms_per_prompt_token_p50": statistics.median(prefill), "decode_ms_per_token_p50": statistics.median(decode)}


def cpus(text: str) -> list[int] | None:
    return [int(c) for c in text.split(",")] if text else None


async def run(args) -> tuple[list[dict], dict[str, dict]]:
    backend_args = ("--backend", args.verifier_backend, *(("--threads", str(args.verifier_threads)) if args.verifier_threads else ()))
    verifier = start_verifier(args.verifier_model, args.verifier_dtype, "cpu", backend_args, cpus=cpus(args.verifier_cpus))
    if args.draft_cpus:
        os.sched_setaffinity(0, cpus(args.draft_cpus))
    args.threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads)  # the llama.cpp draft takes as many
    print(f"verifier on cpus {args.verifier_cpus or 'any'}; drafts and HF on cpus {args.draft_cpus or 'any'}, "
          f"{args.threads} threads", file=sys.stderr)
    try:
        draft_models = DraftModels()
        lms = {b: DrafterSpec(kind="lm", model=args.draft_model, backend=b, dtype=args.draft_dtype) for b in args.draft_backend}
        loaded = {b: draft_models.load(spec) for b, spec in lms.items()}
        first = next(iter(loaded.values()))
        tokenizer, fingerprint = first.tokenizer, first.fingerprint
        target = models.load_model(args.verifier_model, dtype=models.parse_dtype(args.verifier_dtype), device=torch.device("cpu"))
        items = load_items(args.pubmedqa)
        prompts = [tokenizer(item.prompt)["input_ids"] for item in items[: args.prompts + 1]]
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        records: list[dict] = []
        async with transport.open_channel(verifier.address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            info = await transport.fetch_info(stub)

            def speculative(spec: DrafterSpec, gamma: int, mode: str):
                async def one(prompt_ids: list[int]) -> GenerationResult:
                    drafter = build_drafter(spec, draft_models, fingerprint)
                    return await client.speculate(stub, drafter, prompt_ids, params, gamma, info,
                                                  tokenizer_fingerprint=drafter.fingerprint, mode=mode)
                return one

            def hf(assistant=None):
                async def one(prompt_ids: list[int]) -> GenerationResult:
                    return hf_generate(target, prompt_ids, args.max_new_tokens, assistant)
                return one

            modes = {GRPC_BASELINE: ("baseline", 0, lambda p: client.generate_baseline(stub, p, params))}
            for name, spec in [*((f"lm {b}", lm) for b, lm in lms.items()), ("ngram", DrafterSpec(kind="ngram"))]:
                for gamma in args.gamma:
                    for mode in args.modes:
                        label = f"grpc speculative, {name} drafter (gamma={gamma})" + ("" if mode == "lockstep" else f", {mode}")
                        modes[label] = (spec.kind, gamma, speculative(spec, gamma, mode))
            modes[HF_BASELINE] = ("hf", 0, hf())
            if "transformers" in loaded:
                modes["HF generate(assistant_model=draft)"] = ("hf", 0, hf(loaded["transformers"].model))
            for i, prompt in enumerate(prompts):  # prompt 0 is the warm-up, not recorded
                for name, (kind, gamma, fn) in modes.items():
                    started_at = time.time()
                    result = await fn(prompt)
                    result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
                    if i:
                        records.append({**result.to_dict(), "config": name, "drafter": kind, "draft_name": name,
                                        "gamma": gamma, "rtt_ms": 0.0, "pubid": str(i), "prompt_truncated": False,
                                        "status": "ok", "started_at": started_at, "finished_at": time.time()})
                print(f"prompt {i}/{args.prompts} done", file=sys.stderr, flush=True)
            costs = {b: draft_cost(d.model, prompts[1:], info.vocab_size) for b, d in loaded.items()}
    finally:
        verifier.stop()
    return records, costs


def summarize(records: list[dict], costs: dict[str, dict], args) -> dict:
    """report.summarize against each baseline: paired speedups, acceptance, network share, disagreement."""
    frame = pd.DataFrame(records)
    run = {"config": {"prices": {"verifier_per_hour": 0.0, "draft_per_hour": 0.0}, "concurrency": {"draft_workers": 1, "sessions_per_worker": 1}},
           "configurations": list(dict.fromkeys(frame["config"]))}
    vs_grpc = report.summarize(frame, run)
    vs_hf = report.summarize(frame.assign(drafter=frame["config"].map(lambda c: "baseline" if c == HF_BASELINE else "other")), run)
    vs_grpc["speedup_vs_hf_p50"] = vs_hf["speedup_paired_p50"].values
    columns = {"config": "mode", "throughput_tok_s_p50": "tok/s p50", "speedup_paired_p50": "speedup vs gRPC verifier-only",
               "speedup_vs_hf_p50": "speedup vs HF verifier-only", "acceptance_rate": "acceptance",
               "mean_acceptance_length": "tokens/round", "draft_ms_per_drafted_token": "draft ms/drafted token",
               "leviathan_c": "c", "network_share_p50": "network share",
               "disagree_requests": "requests ≠ gRPC verifier-only"}
    print(f"\n{args.prompts} PubMedQA prompts, {args.max_new_tokens} new tokens, verifier {args.verifier_model} "
          f"{args.verifier_dtype}, draft {args.draft_model} {args.draft_dtype}, {args.threads} threads\n")
    print(report.markdown_table(vs_grpc, columns))
    base_ms = 1000 * frame.loc[frame["config"] == GRPC_BASELINE, "wall_s"].div(frame["new_tokens"]).median()
    print(f"\ngRPC verifier-only: {base_ms:.1f} ms/token\n\n| draft backend | prefill ms/prompt token | decode ms/token | "
          "c of decode alone |\n|---|---|---|---|")
    for backend, cost in costs.items():
        cost["c_decode"] = cost["decode_ms_per_token_p50"] / base_ms
        print(f"| {backend} | {cost['prefill_ms_per_prompt_token_p50']:.1f} | {cost['decode_ms_per_token_p50']:.1f} | {cost['c_decode']:.2f} |")
    rows = vs_grpc.drop(columns=["acceptance_by_position"], errors="ignore").to_dict("records")
    return {"modes": {row["config"]: {k: report.json_value(row[k]) for k in columns if k in row and k != "config"} for row in rows},
            "draft_costs": costs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier-model", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft-model", default="offline:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--verifier-dtype", default="bf16")
    p.add_argument("--draft-dtype", default="fp32")
    p.add_argument("--pubmedqa", type=pathlib.Path, default=default_path())
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, nargs="+", default=[2, 4], help="one or more block sizes")
    p.add_argument("--modes", nargs="+", choices=SPEC_MODES, default=["lockstep"],
                   help="session modes of every speculative configuration (issue 10)")
    p.add_argument("--draft-backend", nargs="+", choices=["transformers", "llama.cpp"], default=["transformers"],
                   help="LM draft backends, side by side (llama.cpp: a .gguf file or offline: alias)")
    p.add_argument("--threads", type=int, help="draft and HF threads (default: the draft cpus)")
    p.add_argument("--verifier-backend", choices=["transformers", "llama.cpp"], default="transformers",
                   help="serve-verifier --backend (llama.cpp: --verifier-model is a .gguf file or offline: alias); "
                        "llama.cpp's own plain decoding beside it: scripts/measure_llamacpp.py")
    p.add_argument("--verifier-threads", type=int, help="llama.cpp verifier threads (default: its cpus)")
    p.add_argument("--verifier-cpus", default="0", help='cores of the verifier process, e.g. "0" or "0,1"; "" = any')
    p.add_argument("--draft-cpus", default="1", help='cores of the drafts and HF runs; "" = any')
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()
    if args.pubmedqa is None:
        p.error("pass --pubmedqa or set SPECDEC_PUBMEDQA")
    records, costs = asyncio.run(run(args))
    summary = summarize(records, costs, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = vars(args) | {"pubmedqa": str(args.pubmedqa), "out": str(args.out)}
        args.out.write_text(json.dumps({"config": config, "summary": summary, "requests": records}, indent=1))
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
