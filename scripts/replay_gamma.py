"""Replay one lock-step session's block sizes on recorded greedy agreements: `--gamma auto` (the client's schedule
under the verifier's budget, both the real code) against fixed gammas, at a cost model of the pair, in seconds.

Greedy, a block is exact to replay: drafted from committed position t, the LM's block of gamma accepts
min(L(t), gamma) tokens, where L(t) is the run of positions from t at which the draft's argmax, fed the verifier's own
answer, is the verifier's next token (one teacher-forced pass of the draft over the answer). The n-gram's block is
its lookup in the prompt and the answer so far, cut to gamma. So one recording prices any schedule, on dozens of
answers in seconds, where the real sweep (scripts/measure_budget.py) takes minutes for four. With --sessions N the
answers are served N at a time, every step carrying each open session's row (`shared`): the concurrency sweep,
replayed. What it leaves out: the real timings' noise, the draft's own prefill, a session missing a step (every open
session rides every step), the messages' cost to the verifier's core, and sampling; the LM's drafting on one shared
core (--one-draft-core) is priced as its sum, but not the shadow blocks' share of that core.

    python scripts/replay_gamma.py record --prompts 24 --out /tmp/agree.jsonl    # the real pair, bf16: ~30 s a prompt
    python scripts/replay_gamma.py replay /tmp/agree.jsonl --drafter lm --gammas 2 3 4
    python scripts/replay_gamma.py replay /tmp/agree.jsonl --drafter ngram --draft-ms 1 --sessions 8

On the real pair's n-gram (24 answers, 270 ms a step + 20 ms a token) it reads what the live sweep reads: `Generate`
2.76 / 4.32 / 6.02 / 7.50 / 8.17 tok/s at 1 / 2 / 4 / 8 / 16 sessions (run EW, live: 2.27 / 3.80 / 6.02 / 7.65 /
8.44), `auto` 1.44 / 1.15 / 1.05 / 0.99 / 0.99x `Generate` and 0.99 / 0.94 / 0.94 / 0.96 / 0.97 of the best fixed
gamma with --no-context, 1.46 / 1.21 / 1.10 / 1.05 / 1.04x and 1.00 / 0.99 / 0.99 / 1.02 / 1.02 with the grant reading
where each block starts (specdec/context.py; docs/results.md, sessions 27-28). It is a model: a change it scored +4% (no
calibration, 2 sessions) read -5% live; the context's +4 points at 4 sessions read +6 live.

The default costs are the real pair's on a 2-vCPU AMD EPYC (avx512_bf16, no AMX), pinned as in measure_budget.py:
a verifier step of 255 ms + 15 ms a token, an LM draft token 145 ms, a prefill 2.6 s.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable

from draft_worker.drafters import NgramDrafter
from draft_worker.gamma import AutoGamma, FixedGamma, new_history
from draft_worker.proposer import common_prefix
from draft_worker.shadow import MISS_BACKOFF, Shadows, shadow_every
from specdec.budget import verifiers_turn
from specdec.context import SuffixIndex
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


class Replayed:
    """One request's replay state: its offers, schedule and key, where it stands, its budget and its shadow block."""

    def __init__(self, offers: list[tuple[int, int]], schedule, key: str, args, text: tuple[list[int], list[int]] = ()):
        self.offers, self.schedule, self.key = offers, schedule, key
        # (prompt, answer): what the verifier reads its suffix bucket from (specdec/context.py), the first token in
        self.text, self.index = text, (SuffixIndex([*text[0], *text[1][:1]]) if text else None)
        self.end, self.t, self.budget, self.alone = min(args.max_new_tokens, len(offers)), 1, 0, 0
        self.last_shadow, self.shadow, self.proposed = -1, None, None  # proposed: None in the verifier's turn
        self.drafter, self.accepted, self.misses = args.drafter, 0, 0

    def row(self, budgeter: DraftBudgeter, draft_s: float, step_s: float) -> int:
        """Decide this step's row (the verifier's turn, or the client's block of `self.proposed` drafts): its tokens."""
        offers, t, end = self.offers, self.t, self.end
        if verifiers_turn(self.budget, self.alone):
            self.proposed = None
            if self.shadow is None and hasattr(self.schedule, "observe") and end - t > 1:
                size = min(Shadows.size(self.schedule, end - t), offers[t][0])
                every = shadow_every(size, draft_s, step_s)
                if size and every is not None and t - self.last_shadow >= every * 2 ** min(self.misses, MISS_BACKOFF):
                    self.shadow, self.last_shadow = (t, size, min(offers[t][1], size)), t
            return 1
        self.shadow, gamma = None, min(self.schedule.gamma, self.budget, end - t)
        if gamma == 0 and hasattr(self.schedule, "rounds_to_probe"):  # the empty block's decode_alone
            rounds = self.schedule.rounds_to_probe()
            self.alone = end - t if rounds is None else min(rounds, end - t)
            budgeter.hold(self.key, self.alone)
        self.proposed = min(gamma, offers[t][0])
        self.accepted = min(offers[t][1], self.proposed)
        return self.proposed + 1

    def arrives(self, budgeter: DraftBudgeter, turnaround_s: float, draft_s: float, rtt_s: float) -> None:
        """The client's block reaches the verifier, `turnaround_s` after its verdict (the engine measures it, split by
        the client's word: Proposal fields), with the client's own gamma (Proposal.wants)."""
        if self.proposed:
            budgeter.arrives(self.key, turnaround_s, 1.0, self.drafter, rtt_s, draft_s)
        budgeter.wants(self.key, self.schedule.gamma if hasattr(self.schedule, "observe") else None)

    def advance(self, budgeter: DraftBudgeter, draft_s: float) -> None:
        """The step committed this row's tokens; in the verifier's turn a shadow block the commits now decide is told."""
        before = self.t
        self.t += 1 if self.proposed is None else self.accepted + 1
        if self.index is not None:
            self.index.extend(self.text[1][before : self.t])
        if self.proposed is not None:
            return
        self.alone = max(0, self.alone - 1)
        if self.shadow is not None and self.t >= self.shadow[0] + min(self.shadow[2] + 1, self.shadow[1]):
            _, size, accepted = self.shadow
            self.schedule.observe(size, accepted, draft_s * size, opening=self.schedule.opens_at(self.shadow[0]))
            self.misses = 0 if accepted else self.misses + 1  # Shadows.decided: misses in a row space the next
            budgeter.on_shadow(self.key, size, accepted, size)
            self.shadow = None

    def verdict(self, budgeter: DraftBudgeter) -> None:
        """The step's verdict on this row (every row's before any budget_for)."""
        if self.proposed is None:
            budgeter.on_verdict(self.key, 0, 0)
        else:
            budgeter.on_verdict(self.key, self.proposed, self.accepted, offered=self.budget)

    def update(self, budgeter: DraftBudgeter, draft_s: float, seconds: float, rtt_s: float) -> None:
        """After every row's verdict: the next budget, and the schedule's update for a round it took part in."""
        self.budget = budgeter.budget_for(self.key)
        if self.proposed is None:
            self.schedule.update(0, 0, draft_s=0.0, service_s=seconds, rtt_s=getattr(self.schedule, "rtt_s", 0.0) or 0.0)
        else:
            self.schedule.update(self.proposed, self.accepted, draft_s=draft_s * self.proposed, service_s=seconds,
                                 rtt_s=rtt_s)


def shared(requests: list[tuple[list[tuple[int, int]], Callable, str, int]], budgeter: DraftBudgeter, args,
           sessions: int = 1) -> float:
    """Seconds to serve `requests` ((offers, its schedule's maker, key, prompt tokens) each, in turn; a schedule is
    made as its request opens, from its drafter's history so far) lock-step, `sessions` at a
    time on one verifier whose steps carry every open session's row: a step costs step_ms + token_ms a token of its
    rows (+ draft_step_ms when any row carries drafts) + prefill_s for each prompt it prefills (a new request's,
    which commits its first token), after the longest turnaround (round trip and drafting) of the clients that sent
    it a block (with --one-draft-core their drafting's sum); the verifier decodes alone when a budget is 0 or a client asked it to (decode_alone), with shadow
    blocks meanwhile (draft_worker/shadow.py). Every open session rides every step (none misses one)."""
    draft_s, step_s, token_s, rtt_s = args.draft_ms / 1e3, args.step_ms / 1e3, args.token_ms / 1e3, args.rtt_ms / 1e3
    waiting, active, clock, by_key = list(requests), [], 0.0, {}
    if getattr(args, "context", True):  # the verifier's view of where each block starts (specdec/context.py)
        budgeter.context = lambda key: by_key[key].index.bucket if key in by_key and by_key[key].index else None
    while waiting or active:
        opening = []
        while waiting and len(active) + len(opening) < sessions:
            offers, make_schedule, key, prompt, *text = waiting.pop(0)
            budgeter.open(key, drafter=args.drafter)
            budgeter.decodes_at_zero(key)  # the verifier decodes alone at budget 0 (server_decodes): a grant idles it
            by_key[key] = Replayed(offers, make_schedule(), key, args, *text)
            opening.append((by_key[key], prompt))
        tokens = [r.row(budgeter, draft_s, step_s + token_s) for r in active]
        prefill = sum(prompt for _, prompt in opening)
        drafting = [draft_s * r.proposed for r in active if r.proposed is not None]  # the clients that send a block
        wait = rtt_s + (sum(drafting) if args.one_draft_core else max(drafting)) if drafting else 0.0
        for r in active:
            if r.proposed is not None:
                r.arrives(budgeter, wait if args.one_draft_core else rtt_s + draft_s * r.proposed, draft_s, rtt_s)
        seconds = len(opening) * args.prefill_s + (step_s + token_s * sum(tokens) if active else 0.0) + (
            args.draft_step_ms / 1e3 if any(n > 1 for n in tokens) else 0.0)
        clock += wait + seconds
        for r in active:
            r.advance(budgeter, draft_s)
        budgeter.on_step(seconds, len(active) + len(opening), sum(tokens) + prefill, prefill)
        for r in active:
            r.verdict(budgeter)
        for r in active:
            r.update(budgeter, draft_s, seconds, rtt_s)
        for r, _ in opening:
            r.budget = budgeter.budget_for(r.key)
        for r in [r for r in active if r.t >= r.end]:
            budgeter.close(r.key)
            active.remove(r)
        active += [r for r, _ in opening]
    return clock


def session(offers: list[tuple[int, int]], schedule, budgeter: DraftBudgeter, key: str, args,
            prompt_tokens: int = 192) -> float:
    """Seconds of one request alone (its prefill commits the first token), lock-step (`shared`)."""
    return shared([(offers, lambda: schedule, key, prompt_tokens)], budgeter, args)


def replay(args) -> None:
    rows = [json.loads(line) for line in open(args.recording)]
    answers = [(blocks(row, args.drafter), len(row["prompt"]), (row["prompt"], row["answer"])) for row in rows]
    seconds = {}
    for arm in ["generate", "auto", *map(str, args.gammas)]:
        history, budgeter = new_history(), DraftBudgeter(max_gamma=16)
        if arm == "generate":  # every session decoded by the verifier alone, as Generate
            budgeter.grants = lambda *_, **__: {key: 0 for key in budgeter._sessions}
        elif arm != "auto":  # the fixed arms run on a verifier without a budget (--no-draft-budget)
            unbudgeted(budgeter)
        for warm, (offers, prompt, text) in enumerate(answers[: args.warmup]):  # the history's first, not timed
            shared([(offers, functools.partial(schedule, arm, history, args), f"warm{warm}", prompt, text)], budgeter,
                   args)
        seconds[arm] = shared([(offers, functools.partial(schedule, arm, history, args), f"{arm}{i}", prompt, text)
                               for i, (offers, prompt, text) in enumerate(answers)], budgeter, args, args.sessions)
    tokens = sum(min(args.max_new_tokens, len(offers)) for offers, _, _ in answers)
    best = min(seconds[arm] for arm in seconds if arm not in ("auto", "generate"))
    print(f"{len(answers)} answers x {args.max_new_tokens} tokens, {args.drafter}, {args.sessions} at a time")
    print("| arm | tok/s | x best fixed | x generate |\n|---|---|---|---|")
    for arm, s in seconds.items():
        print(f"| {arm} | {tokens / s:.3f} | {best / s:.3f} | {seconds['generate'] / s:.3f} |")


def unbudgeted(budgeter: DraftBudgeter) -> DraftBudgeter:
    """Every session granted 16 draft tokens at every step, as a verifier run with --no-draft-budget verifies them."""
    budgeter.grants = lambda *_, **__: {key: 16 for key in budgeter._sessions}
    return budgeter


def schedule(arm: str, history, args):
    if arm != "auto":
        return FixedGamma(0 if arm == "generate" else int(arm), 16)
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
    q.add_argument("--sessions", type=int, default=1, help="requests served at a time, their steps shared")
    q.add_argument("--one-draft-core", action="store_true",
                   help="every session drafts on one core (as measure_budget.py --pin): a step waits for their sum")
    q.add_argument("--draft-step-ms", type=float, default=0.0, help="more for a step where any row carries drafts")
    q.add_argument("--no-context", dest="context", action="store_false",
                   help="the verifier prices blocks without their start's suffix bucket (specdec/context.py)")
    q.add_argument("--prior", type=float, help="the schedule's pseudo-blocks per position (default: AutoGamma's)")
    args = p.parse_args()
    if args.command == "record":
        record(args)
    else:
        replay(args)


if __name__ == "__main__":
    main()
