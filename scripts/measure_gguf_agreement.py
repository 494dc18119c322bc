"""Greedy agreement between a GGUF run natively by llama.cpp (quantized, e.g. Q4_K_M) and the same file
dequantized to fp32 torch weights by transformers, on PubMedQA prompts: how far "lossless" reaches.

    flock /tmp/specdec-bench.lock python scripts/measure_gguf_agreement.py --prompts 5 --max-new-tokens 32

Speculative decoding is exact with respect to the model the verifier runs. A llama.cpp verifier runs the
quantized model, so its output equals the QUANTIZED model's greedy output, not the fp16/fp32 one's; this
script measures the gap. Two numbers per prompt:
- free-running: both generate greedily; the first position where they differ (-1: none) and the fraction of
  identical positions (after a divergence the continuations differ, so this understates agreement);
- teacher-forced: llama.cpp scores the fp32 model's continuation; the fraction of positions where both
  models' argmax is the same (a per-token agreement, not compounding).
Prints a markdown table and, as the last line, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics

import numpy as np
import torch

from specdec import models
from specdec.pubmedqa import default_path, load_items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct", help=".gguf file or offline: alias")
    p.add_argument("--pubmedqa", type=pathlib.Path, default=default_path())
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    from llama_cpp import Llama

    torch.set_num_threads(args.threads)
    path = models.gguf_path(args.model)
    tokenizer = models.load_tokenizer(str(path))
    prompts = [tokenizer(item.prompt)["input_ids"] for item in load_items(args.pubmedqa)[: args.prompts]]
    n = args.max_new_tokens
    llm = Llama(model_path=str(path), n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads,
                logits_all=True, verbose=False)
    hf = models.load_model(args.model, dtype=torch.float32, device=torch.device("cpu"))
    rows = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        gguf_out: list[int] = []
        for _ in range(n):
            gguf_out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(gguf_out[-1:])
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        fp32_out = out[0, len(prompt):].tolist()
        llm.reset()
        llm.eval(prompt + fp32_out[:-1])  # teacher-forced: llama.cpp's argmax at each of the fp32 model's positions
        forced = [int(np.argmax(llm.scores[len(prompt) - 1 + i])) for i in range(n)]
        first = next((i for i, (a, b) in enumerate(zip(gguf_out, fp32_out)) if a != b), -1)
        rows.append({"prompt_tokens": len(prompt), "first_divergence": first,
                     "free_running_identical": sum(a == b for a, b in zip(gguf_out, fp32_out)) / n,
                     "teacher_forced_agreement": sum(a == b for a, b in zip(forced, fp32_out)) / n})
    print(f"\n{len(prompts)} PubMedQA prompts x {n} tokens, {path.name}: llama.cpp (quantized) vs transformers fp32 "
          "(dequantized), greedy\n\n| prompt | first divergence | identical (free-running) | agreement (teacher-forced) |\n|---|---|---|---|")
    for i, row in enumerate(rows):
        print(f"| {i} | {row['first_divergence']} | {row['free_running_identical']:.2f} | {row['teacher_forced_agreement']:.2f} |")
    summary = {"rows": rows, "teacher_forced_mean": statistics.mean(r["teacher_forced_agreement"] for r in rows),
               "free_running_mean": statistics.mean(r["free_running_identical"] for r in rows)}
    print(f"| mean | | {summary['free_running_mean']:.2f} | {summary['teacher_forced_mean']:.2f} |")
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
