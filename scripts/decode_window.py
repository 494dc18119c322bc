"""The full-load decode rate of a measure_budget.py trace (`--trace FILE`), per verifier, level and arm: the median
over its passes of its ratio to the same pass's `Generate` (measure_budget.full_load_decoding: output tok/s while all
N sessions were decoding, the level's prefills and its tail left out). For traces written before records carried
`began_s` and `verifier`: each request's start is rebuilt from the walls (N slots, the requests in order, each taking
the first slot free, as the level's semaphore hands them out), and a level smaller than the one before starts the
next verifier's sweep.

    python scripts/decode_window.py TRACE --prompts 4 [--requests-per-session 1]
"""

from __future__ import annotations

import argparse
import heapq
import json
import statistics
from collections import defaultdict

from measure_budget import full_load_decoding


def began(records: list[dict], sessions: int) -> list[float]:
    """Each request's start within its level: recorded, else rebuilt from the walls over N slots."""
    if all("began_s" in r for r in records):
        return [r["began_s"] for r in records]
    slots, starts = [0.0] * sessions, []
    for r in records:
        start = heapq.heappop(slots)
        starts.append(start)
        heapq.heappush(slots, start + r["wall_s"])
    return starts


def passes(path: str, prompts: int, per_session: int) -> dict[tuple[str, int, str], list[float]]:
    """{(verifier, sessions, arm): [full-load decode tok/s of each pass]} in the trace's order."""
    records = [json.loads(line) for line in open(path)]
    verifier, last, groups = 0, 0, defaultdict(list)
    for r in records:
        if "verifier" not in r:  # an older trace: sweeps run their levels in increasing order
            verifier += r["sessions"] < last
            last = r["sessions"]
        groups[(r.get("verifier", str(verifier)), r["sessions"], r["arm"])].append(r)
    rates = {}
    for (label, n, arm), rows in groups.items():
        size = max(per_session * n, prompts)
        rates[(label, n, arm)] = [
            full_load_decoding([(s, r["chunk_times_s"], r["chunk_tokens"])
                                for s, r in zip(began(rows[i : i + size], n), rows[i : i + size])], n)
            for i in range(0, len(rows) - size + 1, size)]
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--prompts", type=int, default=4, help="as the run's --prompts")
    p.add_argument("--requests-per-session", type=int, default=1, help="as the run's")
    args = p.parse_args()
    rates = passes(args.trace, args.prompts, args.requests_per_session)
    print("| verifier | sessions | arm | full-load decode tok/s | x Generate (range) |")
    print("|---|---|---|---|---|")
    for (label, n, arm), values in rates.items():
        ratios = [v / b for v, b in zip(values, rates.get((label, n, "generate"), []))]
        if not ratios:  # no Generate arm at this level, or no full pass
            continue
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"| {label} | {n} | {arm} | {statistics.median(values):.2f} | {statistics.median(ratios):.2f}{spread} |")


if __name__ == "__main__":
    main()
