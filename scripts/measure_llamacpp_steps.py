"""The cost of one llama_decode by batch shape (sessions x tokens per session), on top of a cached prompt per
session, for a few context settings: what batching sessions and verifying blocks can gain on this hardware.

    flock /tmp/specdec-bench.lock python scripts/measure_llamacpp_steps.py --threads 1 --cpus 0

Shapes: 1x1 (a decoding step), 1x5 (a block of 4 drafts), 4x1 (four sessions decoding), 4x5, and 1x1 without
logits (the output projection skipped). Median ms of --repeats decodes, each rolled back afterwards.
If a step of k tokens costs ~k times one token, neither batching nor speculation can pay on this hardware.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SHAPES = {"1x1": (1, 1, True), "1x5": (1, 5, True), "4x1": (4, 1, True), "4x5": (4, 5, True), "1x1 no logits": (1, 1, False)}
VARIANTS = {  # label: (kv_unified, flash_attn_type, n_ctx)
    "unified KV, flash attention auto (the backend's default)": (True, -1, 8192),
    "unified KV, flash attention off": (True, 0, 8192),
    "per-sequence KV, flash attention auto": (False, -1, 16 * 1024),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpus", default="0", help='cores to run on; "" = any')
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, [int(c) for c in args.cpus.split(",")])
    import llama_cpp as lc

    from specdec import models

    lc.llama_backend_init()
    quiet = lc.llama_log_callback(lambda *_: None)  # kept alive while llama.cpp may call it
    lc.llama_log_set(quiet, None)
    model = lc.llama_model_load_from_file(str(models.gguf_path(args.model)).encode(), lc.llama_model_default_params())
    batch = lc.llama_batch_init(512, 0, 1)
    n = args.prompt_tokens

    def decode(ctx, rows, want: bool) -> float:  # rows: (seq, first position, tokens)
        i = 0
        for seq, pos, count in rows:
            for j in range(count):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = 1 + (7 * j + seq) % 500, pos + j, 1
                batch.seq_id[i][0], batch.logits[i] = seq, want
                i += 1
        batch.n_tokens = i
        start = time.perf_counter()
        assert lc.llama_decode(ctx, batch) == 0
        return time.perf_counter() - start

    print(f"{args.model}, {args.threads} thread(s), cpus {args.cpus or 'any'}, {n} cached tokens per session\n")
    print("| context | " + " | ".join(f"{s} ms" for s in SHAPES) + " |\n" + "|---" * (len(SHAPES) + 1) + "|")
    for label, (unified, flash, n_ctx) in VARIANTS.items():
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, 512, 512, 16
        params.kv_unified, params.flash_attn_type = unified, flash
        params.n_threads = params.n_threads_batch = args.threads
        ctx = lc.llama_init_from_model(model, params)
        memory = lc.llama_get_memory(ctx)
        for seq in range(4):
            decode(ctx, [(seq, 0, n)], False)
        cells = []
        for sessions, tokens, want in SHAPES.values():
            times = []
            for _ in range(args.repeats):
                times.append(decode(ctx, [(seq, n, tokens) for seq in range(sessions)], want))
                for seq in range(sessions):
                    lc.llama_memory_seq_rm(memory, seq, n, -1)
            cells.append(f"{1000 * statistics.median(times):.0f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
        lc.llama_free(ctx)


if __name__ == "__main__":
    main()
