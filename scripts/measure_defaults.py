"""Issue 18's first goal: one box, the CLI's defaults, the real pair: `specdec generate` with each drafter against
`specdec generate --baseline`, on held-out PubMedQA prompts, interleaved prompt by prompt.

    flock /tmp/specdec-bench.lock python scripts/measure_defaults.py --prompts 3 --max-new-tokens 32

One `specdec serve-verifier` with no --dtype (the default, auto) on 127.0.0.1; every arm is a fresh `specdec
generate ... --json` process against it (model loading excluded: `wall_s` is the generation's own time), with
only the flags a new user gives: the drafter, the prompt, the token count; and --arm-flags for extra arms (e.g.
"--gamma 4"). Held-out: the prompts come from the end of the file (--first), away from the ones the benchmarks
use. Prints each request's wall, time to first token and tok/s, and per arm the median ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from orchestrator.launch import start_verifier
from specdec.pubmedqa import TEMPLATE, default_path, load_items

DRAFT = "offline:qwen2.5-coder-0.5b-instruct"


def generate(address: str, prompt_file: str, max_new_tokens: int, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "orchestrator.cli", "generate", "--verifier", address, "--prompt-file", prompt_file,
           "--max-new-tokens", str(max_new_tokens), "--json", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--pubmedqa", default=str(default_path()))
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--first", type=int, default=-3, help="index of the first prompt (negative: from the end)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-chars", type=int, default=1200, help="cut each abstract to this many characters")
    p.add_argument("--arm", action="append", default=[], help="extra arm: NAME=FLAGS, e.g. 'lm-g4=--draft ... --gamma 4'")
    args = p.parse_args()
    items = load_items(args.pubmedqa)
    first = args.first % len(items)
    arms = {"baseline": ["--baseline"], "ngram": ["--drafter", "ngram"], "lm": ["--draft", DRAFT]}
    arms.update((name, flags.split()) for name, _, flags in (a.partition("=") for a in args.arm))
    verifier = start_verifier(args.verifier, "auto", "cpu")
    walls: dict[str, list[float]] = {name: [] for name in arms}
    try:
        generate(verifier.address, _prompt_file(items[first]), 4, arms["lm"])  # warm-up: the verifier's first steps
        print("| prompt | arm | wall s | TTFT s | tok/s | x baseline |\n|---|---|---|---|---|---|")
        for item in items[first : first + args.prompts]:
            path = _prompt_file(item, args.max_chars)
            for name, flags in arms.items():
                r = generate(verifier.address, path, args.max_new_tokens, flags)
                walls[name].append(r["wall_s"])
                print(f"| {item.pubid} | {name} | {r['wall_s']:.2f} | {r['ttft_s']:.2f} | {r['tokens_per_s']:.2f} | "
                      f"{walls['baseline'][-1] / r['wall_s']:.2f} |", flush=True)
    finally:
        verifier.stop()
    for name in arms:
        ratios = [b / w for b, w in zip(walls["baseline"], walls[name])]
        print(f"{name}: median {statistics.median(ratios):.2f}x baseline ({', '.join(f'{r:.2f}' for r in ratios)})")


def _prompt_file(item, max_chars: int = 1200) -> str:
    text = TEMPLATE.format(question=item.question, context=" ".join(item.contexts)[:max_chars])
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    return f.name


if __name__ == "__main__":
    main()
