"""Does drafting on one core slow the verifier's steps on another? What `measure_budget.py --pin` cannot rule out.

    python scripts/measure_contention.py --steps 16

The verifier model decodes one token at a time on core 0 (one torch thread), first alone, then while the draft model
decodes on core 1 in another process, then alone again; prints the median step of each phase. Two real machines
(a laptop drafting, a GPU box verifying) share nothing, but the pinned sweep's two "machines" share one box's caches
and memory bandwidth (and, on a VM, maybe one physical core): where the middle figure is above the others, every
arm that drafts is charged for it there and `Generate` is not. Session 14 on a 2-vCPU AMD EPYC (avx2 only), the real
pair in fp32, three runs: alone 0.481 / 0.494 / 0.446 s, beside the 0.5B 0.645 / 0.557 / 0.516 s (+13-34%), alone
again 0.576 / 0.499 / 0.448 s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from specdec import models


def _load(name: str, dtype: str):
    """-> (the model on this process's core, its KV cache after a 64-token prompt)."""
    model = models.load_model(name, dtype=models.parse_dtype(dtype, torch.device("cpu")), device=torch.device("cpu"))
    with torch.no_grad():
        return model, model(_ids(model, 64), use_cache=True).past_key_values


def _ids(model, n: int) -> torch.Tensor:
    """[1, n] random token ids the model knows."""
    return torch.randint(0, min(1000, model.config.vocab_size), (1, n))


def _steps(model, cache, n: int) -> list[float]:
    """n one-token decoding steps on `cache` (kept between 64 and 200 tokens) -> their seconds."""
    seconds = []
    with torch.no_grad():
        for _ in range(n):
            started = time.perf_counter()
            model(_ids(model, 1), past_key_values=cache, use_cache=True)
            seconds.append(time.perf_counter() - started)
            if cache.get_seq_length() > 200:
                cache.crop(64)
    return seconds


def _draft_forever(name: str, dtype: str, ready) -> None:
    os.sched_setaffinity(0, {1})
    torch.set_num_threads(1)
    model, cache = _load(name, dtype)
    ready.put(True)
    while True:
        _steps(model, cache, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="offline:qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    os.sched_setaffinity(0, {0})
    torch.set_num_threads(1)
    model, cache = _load(args.verifier, args.dtype)
    alone = statistics.median(_steps(model, cache, args.steps))
    ready = mp.Queue()
    drafting = mp.Process(target=_draft_forever, args=(args.draft, args.dtype, ready), daemon=True)
    drafting.start()
    try:
        ready.get(timeout=600)
        beside = statistics.median(_steps(model, cache, args.steps))
    finally:
        drafting.terminate()
        drafting.join()
    again = statistics.median(_steps(model, cache, args.steps))
    print(f"CPU flags {' '.join(models.cpu_matrix_flags()) or 'unknown'}; the verifier's one-token step on core 0: "
          f"alone {alone:.3f} s, while the draft decodes on core 1 {beside:.3f} s, alone again {again:.3f} s")


if __name__ == "__main__":
    main()
