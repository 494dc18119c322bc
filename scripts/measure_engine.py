"""Side-by-side engine measurement on one machine: verifier-only vs speculative over loopback gRPC
(LM drafter, n-gram drafter) vs HF `generate(assistant_model=...)`, same pair, same prompts, one run.

    python scripts/measure_engine.py --prompts 10 --max-new-tokens 64 --gamma 2 4 --out results/engine.json

The verifier runs as a separate `specdec serve-verifier` process; the drafts and the HF runs live in this
one. Every mode generates exactly --max-new-tokens tokens (EOS ignored) after one warm-up prompt each.
Prints a markdown table and, as the last line, one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import time

import torch

from draft_worker import client
from draft_worker.drafters import LMDrafter, NgramDrafter
from orchestrator.launch import start_verifier
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import models
from specdec.config import SamplingParams
from specdec.pubmedqa import default_path, load_items


def hf_generate(model, prompt_ids: list[int], n: int, assistant=None) -> tuple[list[int], float]:
    input_ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, assistant_model=assistant)
    return out[0, len(prompt_ids):].tolist(), time.perf_counter() - start


async def run(args) -> dict:
    torch.set_num_threads(args.threads)
    verifier = start_verifier(args.verifier_model, args.verifier_dtype, "cpu")
    address = verifier.address
    try:
        tokenizer = models.load_tokenizer(args.draft_model)
        fingerprint = models.tokenizer_fingerprint(tokenizer)
        draft = models.load_model(args.draft_model, dtype=models.parse_dtype(args.draft_dtype), device=torch.device("cpu"))
        target = models.load_model(args.verifier_model, dtype=models.parse_dtype(args.verifier_dtype), device=torch.device("cpu"))
        items = load_items(args.pubmedqa)
        prompts = [tokenizer(item.prompt)["input_ids"] for item in items[: args.prompts + 1]]
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        rows: dict[str, list[dict]] = {}
        async with client.open_channel(address) as channel:
            stub = pb_grpc.VerifierStub(channel)
            info = await client.fetch_info(stub)
            modes = {"grpc verifier-only": lambda p: client.generate_baseline(stub, p, params)}
            for gamma in args.gamma:
                modes[f"grpc speculative, LM drafter (gamma={gamma})"] = lambda p, g=gamma: client.speculate(
                    stub, LMDrafter(draft, args.draft_model), p, params, g, info, tokenizer_fingerprint=fingerprint)
            for gamma in args.gamma:
                modes[f"grpc speculative, n-gram drafter (gamma={gamma})"] = lambda p, g=gamma: client.speculate(
                    stub, NgramDrafter(), p, params, g, info, tokenizer_fingerprint=fingerprint)
            for i, prompt in enumerate(prompts):  # prompt 0 is the warm-up, not recorded
                for name, fn in modes.items():
                    result = (await fn(prompt)).to_dict()
                    if i:
                        rows.setdefault(name, []).append(result)
                for name, assistant in (("HF generate verifier-only", None), ("HF generate(assistant_model=draft)", draft)):
                    ids, wall = hf_generate(target, prompt, args.max_new_tokens, assistant)
                    if i:
                        rows.setdefault(name, []).append({"token_ids": ids, "wall_s": wall, "tokens_per_s": len(ids) / wall})
                print(f"prompt {i}/{args.prompts} done", file=sys.stderr, flush=True)
    finally:
        verifier.stop()
    return summarize(rows, args)


def summarize(rows: dict[str, list[dict]], args) -> dict:
    base = rows["grpc verifier-only"]
    hf_base = rows["HF generate verifier-only"]
    summary = {}
    for name, results in rows.items():
        entry = {
            "tok_s_p50": statistics.median(r["tokens_per_s"] for r in results),
            "speedup_vs_grpc_baseline_p50": statistics.median(b["wall_s"] / r["wall_s"] for b, r in zip(base, results)),
            "speedup_vs_hf_baseline_p50": statistics.median(b["wall_s"] / r["wall_s"] for b, r in zip(hf_base, results)),
            "identical_to_grpc_baseline": sum(r["token_ids"] == b["token_ids"] for b, r in zip(base, results)),
        }
        if "acceptance_rate" in results[0] and results[0]["proposed"]:
            entry["acceptance_rate"] = sum(r["accepted"] for r in results) / sum(r["proposed"] for r in results)
            entry["mean_acceptance_length"] = statistics.median(r["mean_acceptance_length"] for r in results)
            entry["network_share_p50"] = statistics.median(r["network_share"] for r in results)
            entry["bytes_per_token_p50"] = statistics.median((r["bytes_sent"] + r["bytes_received"]) / r["new_tokens"] for r in results)
        summary[name] = entry
    print(f"\n{args.prompts} PubMedQA prompts, {args.max_new_tokens} new tokens, verifier {args.verifier_model} "
          f"{args.verifier_dtype}, draft {args.draft_model} {args.draft_dtype}, {args.threads} threads\n")
    print("| mode | tok/s p50 | speedup vs gRPC baseline | speedup vs HF baseline | acceptance | network share | identical |")
    print("|---|---|---|---|---|---|---|")
    for name, e in summary.items():
        acc = f"{e['acceptance_rate']:.2f}" if "acceptance_rate" in e else "-"
        net = f"{e['network_share_p50']:.1%}" if "network_share_p50" in e else "-"
        print(f"| {name} | {e['tok_s_p50']:.2f} | {e['speedup_vs_grpc_baseline_p50']:.2f}x | "
              f"{e['speedup_vs_hf_baseline_p50']:.2f}x | {acc} | {net} | {e['identical_to_grpc_baseline']}/{len(base)} |")
    return {"config": vars(args) | {"pubmedqa": str(args.pubmedqa), "out": str(args.out)}, "summary": summary, "requests": rows}


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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args()
    if args.pubmedqa is None:
        p.error("pass --pubmedqa or set SPECDEC_PUBMEDQA")
    report = asyncio.run(run(args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], separators=(",", ":")))


if __name__ == "__main__":
    main()
