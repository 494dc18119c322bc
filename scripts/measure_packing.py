"""One engine step's forward, padded against packed (verifier_worker/kv.py), and which one the backend picks.

    python scripts/measure_packing.py --model offline:qwen2.5-coder-1.5b-instruct --repeats 3 --rows 1,1,1,1 5,1,1,1
    python scripts/measure_packing.py --model /tmp/specdec-tiny/verifier

For each shape (the new tokens of each row: a verification block is 1 + its draft tokens), every row gets its own
past of `--context` (+ 7 per row) random tokens, then both routes run the same rows from the same KV `--repeats`
times on one torch thread (pin the process, e.g. `taskset -c 0`); prints the median seconds of each, their ratio and
the route `TransformersBackend.forward` takes (`route_flops`). The first repeat is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec import models
from verifier_worker.backends import forward_flops, route_flops
from verifier_worker.kv import Row, SessionKV, batched_forward, packed_forward


def _sessions(model, contexts: list[int], vocab: int) -> list[SessionKV]:
    g = torch.Generator().manual_seed(0)
    kvs = [SessionKV() for _ in contexts]
    batched_forward(model, [Row(kv, torch.randint(0, vocab, (n,), generator=g).tolist(), False)
                            for kv, n in zip(kvs, contexts)])
    return kvs


def _time(forward, model, kvs: list[SessionKV], new: list[list[int]], repeats: int) -> float:
    """Median seconds of `forward` over the rows, each run from the same KV (the new keys are rolled back)."""
    lengths, seconds = [kv.length for kv in kvs], []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        forward(model, [Row(kv, ids, True) for kv, ids in zip(kvs, new)])
        seconds.append(time.perf_counter() - started)
        for kv, length in zip(kvs, lengths):
            kv.truncate(length)
    return statistics.median(seconds[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", nargs="+", default=["1,1,1,1", "5,1,1,1", "5,5,1,1", "5,5,5,5", "5,1,1,1,1,1,1,1"])
    args = p.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model = models.load_model(args.model, dtype=models.parse_dtype(args.dtype, cpu), device=cpu)
    vocab, (token, score) = models.model_vocab_size(model), forward_flops(model)
    print(f"{args.model} {args.dtype}, past {args.context} (+7 a row), CPU flags {' '.join(models.cpu_matrix_flags())}")
    for shape in args.rows:
        sizes = [int(n) for n in shape.split(",")]
        contexts = [args.context + 7 * i for i in range(len(sizes))]
        kvs = _sessions(model, contexts, vocab)
        g = torch.Generator().manual_seed(1)
        new = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in sizes]
        padded, packed = (_time(forward, model, kvs, new, args.repeats) for forward in (batched_forward, packed_forward))
        rows = list(zip(sizes, contexts))
        picks = "packed" if route_flops(rows, True, token, score) < route_flops(rows, False, token, score) else "padded"
        print(f"rows {shape}: padded {1000 * padded:.1f} ms, packed {1000 * packed:.1f} ms ({packed / padded:.2f}x); "
              f"the backend picks {picks}", flush=True)


if __name__ == "__main__":
    main()
