"""Replay one lock-step session's block sizes on recorded greedy agreements: `--gamma auto` (the client's schedule
under the verifier's budget, both the real code) against fixed gammas, at a cost model of the pair, in seconds.

Greedy, a block is exact to replay: drafted from committed position t, the LM's block of gamma accepts
min(L(t), gamma) tokens, where L(t) is the run of positions from t at which the draft's argmax, fed the verifier's own
answer, is the verifier's next token (one teacher-forced pass of the draft over the answer). The n-gram's block is
its lookup in the prompt and the answer so far, cut to gamma. So one recording prices any schedule, on dozens of
answers in seconds, where the real sweep (scripts/measure_budget.py) takes minutes for four. What it leaves out: the
real timings' noise, the draft's own prefill, sessions beside this one (one session; the budget still prices the
steps), and sampling.

    python scripts/replay_gamma.py record --prompts 24 --out /tmp/agree.jsonl    # the real pair, bf16: ~30 s a prompt
    python scripts/replay_gamma.py replay /tmp/agree.jsonl --drafter lm --gammas 2 3 4
    python scripts/replay_gamma.py replay /tmp/agree.jsonl --drafter ngram --draft-ms 1

The default costs are the real pair's on a 2-vCPU AMD EPYC (avx512_bf16, no AMX), pinned as in measure_budget.py:
a verifier step of 255 ms + 15 ms a token, an LM draft token 145 ms, a prefill 2.6 s.
"""

from __future__ import annotations

import argparse
import json

from draft_worker.drafters import NgramDrafter
from draft_worker.gamma import AutoGamma, FixedGamma, new_history
from draft_worker.proposer import common_prefix
from draft_worker.shadow import Shadows, shadow_every
from specdec.budget import verifiers_turn
from verifier_worker.budgeting import DraftBudgeter


def record(args) -> None:
    import torch

    from orchestrator.bench import encode_prompts
    from specdec import models
    from specdec.pubmedqa import default_path, load_items

    tokenizer = models.load_tokenizer(args.verifier)
    prompts = encode_prompts(load_items(default_path())[: args.prompts], tokenizer, args.max_prompt_tokens)
    dtype, device = models.load_dtype_device(args.dtype, "cpu")
    verifier = models.load_model(args.verifier, dtype=dtype, device=device)
    draft = models.load_model(args.draft, dtype=dtype, device=device)
    with open(args.out, "w") as out, torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt.ids])
            whole = verifier.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                      do_sample=False)
            answer = whole[0, len(prompt.ids):].tolist()
            argmax = draft(whole).logits[0, len(prompt.ids) - 1: -1].argmax(-1).tolist()  # [len(answer)]
            agree = [int(a == b) for a, b in zip(argmax, answer)]
            out.write(json.dumps({"prompt": prompt.ids, "answer": answer, "agree": agree}) + "\n")
            print(f"{prompt.pubid}: the draft agrees at {sum(agree)} of {len(answer)} positions", flush=True)


def blocks(row: dict, drafter: str) -> list[tuple[int, int]]:
    """[answer length] per committed position t: (draft tokens the drafter has to offer, how many of them the verifier
    accepts), the LM offering any number."""
    answer = row["answer"]
    if drafter == "lm":
        runs = [0] * (len(answer) + 1)  # L(t): agreements in a row from t
        for t in range(len(answer) - 1, -1, -1):
            runs[t] = runs[t + 1] + 1 if row["agree"][t] else 0
        return [(10**6, runs[t]) for t in range(len(answer))]
    drafts = [NgramDrafter.lookup(row["prompt"] + answer[:t], 16, 3, 1) for t in range(len(answer))]
    return [(len(drafted), common_prefix(drafted, answer[t:])) for t, drafted in enumerate(drafts)]


def session(offers: list[tuple[int, int]], schedule, budgeter: DraftBudgeter, key: str, args,
            prompt_tokens: int = 192) -> float:
    """Seconds of one request (its prefill commits the first token), lock-step, the verifier deciding alone when its
    budget is 0 or the client asked it to (decode_alone); shadow blocks while it does (draft_worker/shadow.py)."""
    draft_s, step_s, token_s = args.draft_ms / 1e3, args.step_ms / 1e3, args.token_ms / 1e3
    budgeter.open(key, drafter=args.drafter)
    budgeter.decodes_at_zero(key)  # the verifier decodes alone at budget 0 (server_decodes): a grant idles it
    budgeter.on_step(args.prefill_s, 1, prompt_tokens, prompt_tokens)
    budget, t, clock, alone, last_shadow, shadow = budgeter.budget_for(key), 1, args.prefill_s, 0, -1, None
    end = min(args.max_new_tokens, len(offers))
    while t < end:
        if verifiers_turn(budget, alone):
            seconds = step_s + token_s
            if shadow is None and hasattr(schedule, "observe") and end - t > 1:
                size = min(Shadows.size(schedule, end - t), offers[t][0])
                every = shadow_every(size, draft_s, seconds)
                if size and every is not None and t - last_shadow >= every:
                    shadow, last_shadow = (t, size, min(offers[t][1], size)), t
            clock, t, alone = clock + seconds, t + 1, max(0, alone - 1)
            if shadow is not None and t >= shadow[0] + min(shadow[2] + 1, shadow[1]):  # the commits decide it
                _, size, accepted = shadow
                schedule.observe(size, accepted, draft_s * size, opening=schedule.opens_at(shadow[0]))
                budgeter.on_shadow(key, size, accepted, size)
                shadow = None
            budgeter.on_step(seconds, 1, 1)
            budgeter.on_verdict(key, 0, 0)
            budget = budgeter.budget_for(key)
            schedule.update(0, 0, draft_s=0.0, service_s=seconds, rtt_s=getattr(schedule, "rtt_s", 0.0) or 0.0)
            continue
        shadow, gamma = None, min(schedule.gamma, budget, end - t)
        if gamma == 0 and hasattr(schedule, "rounds_to_probe"):  # the empty block's decode_alone
            rounds = schedule.rounds_to_probe()
            alone = end - t if rounds is None else min(rounds, end - t)
            budgeter.hold(key, alone)
        proposed = min(gamma, offers[t][0])
        accepted = min(offers[t][1], proposed)
        seconds = step_s + token_s * (proposed + 1)
        clock, t = clock + draft_s * proposed + seconds + args.rtt_ms / 1e3, t + accepted + 1
        if proposed:  # the engine measures the block's turnaround, split by the client's word (Proposal fields)
            rtt_s = args.rtt_ms / 1e3
            budgeter.arrives(key, rtt_s + draft_s * proposed, 1.0, args.drafter, rtt_s, draft_s)
        budgeter.wants(key, schedule.gamma if hasattr(schedule, "observe") else None)  # Proposal.wants
        budgeter.on_step(seconds, 1, proposed + 1)
        budgeter.on_verdict(key, proposed, accepted, offered=budget)
        budget = budgeter.budget_for(key)
        schedule.update(proposed, accepted, draft_s=draft_s * proposed, service_s=seconds, rtt_s=args.rtt_ms / 1e3)
    budgeter.close(key)
    return clock


def replay(args) -> None:
    rows = [json.loads(line) for line in open(args.recording)]
    answers = [(blocks(row, args.drafter), len(row["prompt"])) for row in rows]
    seconds = {}
    for arm in ["auto", *map(str, args.gammas)]:
        history, budgeter = new_history(), DraftBudgeter(max_gamma=16)
        if arm != "auto":  # the fixed arms run on a verifier without a budget (--no-draft-budget)
            unbudgeted(budgeter)
        for warm, (offers, prompt) in enumerate(answers[: args.warmup]):  # the history's first requests, not timed
            session(offers, schedule(arm, history, args), budgeter, f"warm{warm}", args, prompt)
        seconds[arm] = sum(session(offers, schedule(arm, history, args), budgeter, f"{arm}{i}", args, prompt)
                           for i, (offers, prompt) in enumerate(answers))
    tokens = sum(min(args.max_new_tokens, len(offers)) for offers, _ in answers)
    best = min(seconds[arm] for arm in seconds if arm != "auto")
    print(f"{len(answers)} answers x {args.max_new_tokens} tokens, {args.drafter}")
    print("| arm | tok/s | x best fixed |\n|---|---|---|")
    for arm, s in seconds.items():
        print(f"| {arm} | {tokens / s:.3f} | {best / s:.3f} |")


def unbudgeted(budgeter: DraftBudgeter) -> DraftBudgeter:
    """Every session granted 16 draft tokens at every step, as a verifier run with --no-draft-budget verifies them."""
    budgeter.grants = lambda *_, **__: {key: 16 for key in budgeter._sessions}
    return budgeter


def schedule(arm: str, history, args):
    if arm != "auto":
        return FixedGamma(int(arm), 16)
    s = AutoGamma(history=history, **({"prior": args.prior} if args.prior else {}))
    s.decode_alone = True  # lock-step against a verifier that decodes alone
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record", help="the verifier's greedy answers and the draft's agreement with them")
    r.add_argument("--verifier", default="offline:qwen2.5-coder-1.5b-instruct")
    r.add_argument("--draft", default="offline:qwen2.5-coder-0.5b-instruct")
    r.add_argument("--dtype", default="bf16")
    r.add_argument("--prompts", type=int, default=24)
    r.add_argument("--max-prompt-tokens", type=int, default=192)
    r.add_argument("--max-new-tokens", type=int, default=40)
    r.add_argument("--out", required=True)
    q = sub.add_parser("replay", help="auto against fixed gammas on a recording")
    q.add_argument("recording")
    q.add_argument("--drafter", choices=["lm", "ngram"], default="lm")
    q.add_argument("--gammas", type=int, nargs="+", default=[2, 3, 4])
    q.add_argument("--max-new-tokens", type=int, default=32)
    q.add_argument("--warmup", type=int, default=2, help="answers replayed first to fill the drafter's history")
    q.add_argument("--draft-ms", type=float, default=145.0, help="one draft token")
    q.add_argument("--step-ms", type=float, default=255.0, help="a verifier step, before its tokens")
    q.add_argument("--token-ms", type=float, default=15.0, help="each token of a step")
    q.add_argument("--prefill-s", type=float, default=2.6)
    q.add_argument("--rtt-ms", type=float, default=2.0)
    q.add_argument("--prior", type=float, help="the schedule's pseudo-blocks per position (default: AutoGamma's)")
    args = p.parse_args()
    if args.command == "record":
        record(args)
    else:
        replay(args)


if __name__ == "__main__":
    main()
