"""The verifier's warm-up for the draft budget: before it serves, time engine steps of one session verifying
blocks of a few sizes, and give the draft budget (budgeting.py) those costs, so its first grants are priced by
measurement on this device rather than guessed.

Why: the budget prices a block of n tokens from the steps it has seen (`specdec.stepcost.StepCostTable`). A fresh
verifier has seen prompt chunks and plain decoding steps only, so every count above 1 was priced along the fit's
prior slope, 0: a block of 5 tokens as cheap as one token. That is nearly true where decoding is bound by reading
the weights (a GPU; a CPU running bf16 natively: 1 x 5 tokens about 1 x 1), and badly false where it is not: on a
2-core AVX2 CPU (no AVX-512) the real pair's 1.5B verifier in fp32 takes 0.52 s for one token, 0.96 s for 2, 1.41 s for
3 and 2.03 s for 5 (a prefill token: 0.06 s). There the first request's opening was granted 16 draft tokens,
and its first block of 4 cost 2.2 s for nothing; there the first grants are now 0.

What: one session with a short dummy prompt, blocks of `sizes` tokens (1 + gamma, gamma random draft tokens,
rejected or not, it does not matter), each size `repeats` times, interleaved (drift lands on every size alike), through
the engine's own path (`Engine.verify`: the backend's forward and the verification, as in serving). Only the steps'
costs reach the budgeter (`DraftBudgeter.on_step`, as the engine reports a step); the dummy session's verdicts do
not (no acceptance is learnt from them), and the metrics do not count its steps. Cost: the sizes' sum times
`repeats` steps: 22.6 s on that AVX2 CPU (the real pair's 1.5B in fp32), ~4 s on one core of an AVX512-bf16 one
(from the step costs in specdec/stepcost.py), well under a second on a GPU or for the tiny test models;
`serve-verifier` prints the costs and the time it took. `serve-verifier --no-warmup` skips it; `--no-draft-budget` has no use for it.
"""

from __future__ import annotations

import random

from specdec.config import SamplingParams
from verifier_worker.engine import Engine

SIZES = (1, 2, 4, 8)  # tokens per block (1 + gamma): a session's usual blocks, and the slope beyond them
REPEATS = 3  # each size's steps: the StepCostTable prices a count once it has seen 3 (its min_samples)
PROMPT_TOKENS = 32


async def time_blocks(engine: Engine, vocab_size: int, sizes: tuple[int, ...] = SIZES, repeats: int = REPEATS,
                    seed: int = 0) -> dict[int, float]:
    """Time `repeats` steps of each block size and report them to `engine.budgeter`. -> {tokens: median seconds}."""
    budgeter, on_step = engine.budgeter, engine.on_step
    if budgeter is None:
        return {}
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=repeats * sum(sizes) + 1)  # room for every draft, should all be accepted
    engine.budgeter = engine.on_step = None  # the dummy session is nobody's: nothing but step costs is reported
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    session = None
    try:
        for _ in range(repeats):
            for n in sizes:
                if session is None:  # (again, should a random model have chosen to end its answer)
                    session = engine.open([rng.randrange(vocab_size) for _ in range(PROMPT_TOKENS)], params)
                    await engine.prefill(session)
                result, cost = await engine.verify(session, [rng.randrange(vocab_size) for _ in range(n - 1)], None)
                budgeter.on_step(cost.compute_s, 1, n, 0)
                seconds[n].append(cost.compute_s)
                if result.finish_reason is not None:
                    engine.close(session)
                    session = None
    finally:
        if session is not None:
            engine.close(session)
        engine.budgeter, engine.on_step = budgeter, on_step
    return {n: sorted(ts)[len(ts) // 2] for n, ts in seconds.items()}
