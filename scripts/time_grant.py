"""What the verifier's draft budget costs its event loop: the seconds to make one grant (`DraftBudgeter.grants`,
every session together) at several numbers of sessions, on this machine's core. A grant runs between two engine
steps, so against a step of S seconds it costs grant / S of the verifier's time, unless it is reused (a fast
verifier remakes it every ceil(grant / (GRANT_SHARE x S)) steps: verifier_worker/budgeting.py).

    taskset -c 1 python scripts/time_grant.py --sessions 1 4 16 --step-ms 3 300

The sessions have the same acceptance history (half of 4-token blocks accepted), measured turnarounds slower than
the engine's hold (every wait level searched), and a CPU-like cost table of a few ms per step.
"""

from __future__ import annotations

import argparse
import time

from specdec.budget import Load
from verifier_worker.budgeting import GRANT_SHARE, DraftBudgeter


def budgeter(sessions: int) -> DraftBudgeter:
    b = DraftBudgeter(max_gamma=16)
    for tokens in range(1, 65):  # a cost table over every token count a grant prices, ~3 ms a step + 0.3 ms a token
        for _ in range(3):
            b.on_step(0.0027 + 0.0003 * tokens, 1, tokens)
    for i in range(sessions):
        b.open(f"s{i}")
        for _ in range(5):
            b.on_verdict(f"s{i}", 4, 2)
        b.arrives(f"s{i}", 0.01 * (1 + i % 3), 0.0007)
    return b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--step-ms", type=float, nargs="+", default=[3.0, 300.0], help="step times to price the grant against")
    p.add_argument("--repeats", type=int, default=300)
    args = p.parse_args()
    print("| sessions | one grant (ms) | " + " | ".join(f"share of a {s:g} ms step, every step / reused" for s in args.step_ms)
          + " |\n|---|---|" + "---|" * len(args.step_ms))
    for n in args.sessions:
        b = budgeter(n)
        b.grants(Load())
        started = time.perf_counter()
        for _ in range(args.repeats):
            b.grants(Load())
        grant_s = (time.perf_counter() - started) / args.repeats
        shares = []
        for step_ms in args.step_ms:
            every = max(1, -(-grant_s // (GRANT_SHARE * step_ms / 1000)))
            shares.append(f"{100 * grant_s / (step_ms / 1000):.1f}% / {100 * grant_s / (every * step_ms / 1000):.1f}%")
        print(f"| {n} | {1000 * grant_s:.2f} | " + " | ".join(shares) + " |")


if __name__ == "__main__":
    main()
