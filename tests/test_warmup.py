"""The verifier's warm-up before it serves (verifier_worker/warmup.py): the draft budget prices its first grants by
the block sizes it timed, on the engine's own path, and learns nothing else from them."""

from __future__ import annotations

from specdec.config import SamplingParams
from tests.stubs import FakeLM
from verifier_worker.accounting import StepCost
from verifier_worker.budgeting import DraftBudgeter
from verifier_worker.engine import Engine
from verifier_worker.warmup import REPEATS, SIZES, time_blocks


class _Result:
    finish_reason = None


def _metrics_hook(*_) -> None:
    """Stands for the engine's Prometheus hook (`Engine.on_step`), which the warm-up detaches and puts back."""


class TimedEngine:
    """The engine's interface as time_blocks uses it, each block of n tokens 'taking' seconds(n) (no clock involved)."""

    def __init__(self, budgeter: DraftBudgeter, seconds):
        self.budgeter, self.on_step, self.seconds = budgeter, _metrics_hook, seconds
        self.open_sessions = 0

    def open(self, prompt_ids, params):
        self.open_sessions += 1
        assert self.budgeter is None and self.on_step is None  # detached: the dummy session is nobody's
        return object()

    async def prefill(self, session):
        return StepCost()

    async def verify(self, session, draft_ids, q):
        return _Result(), StepCost(compute_s=self.seconds(1 + len(draft_ids)))

    def close(self, session):
        self.open_sessions -= 1


def _grant_to_a_fresh_session(budgeter: DraftBudgeter) -> int:
    budgeter.open("s", drafter="d")
    for _ in range(3):  # the prompt's and the first decoding steps, as a fresh verifier sees them
        budgeter.on_step(0.5 * 1 + 0.02 * 64, 1, 64, 64)
        budgeter.on_step(0.5, 1, 1)
    return budgeter.budget_for("s")


async def test_a_device_where_a_block_costs_its_tokens_is_granted_no_draft_once_timed():
    """On a CPU where a block of n tokens costs n single steps (the real pair in fp32 on a 2-core AVX2 CPU: 0.52 s,
    0.96 s for 2, 2.03 s for 5), drafts at the prior's acceptance can never pay. Not warmed up, the budget priced
    the unseen block sizes at the fit's prior slope (flat) and granted drafts; timed, it grants none."""
    linear = DraftBudgeter(max_gamma=8)
    assert _grant_to_a_fresh_session(linear) > 0  # what a fresh verifier did before
    linear = DraftBudgeter(max_gamma=8)
    engine = TimedEngine(linear, lambda n: 0.5 * n)
    costs = await time_blocks(engine, vocab_size=32)
    assert costs == {n: 0.5 * n for n in SIZES}
    assert linear.cost.medians() == costs  # every size seen REPEATS times: the table prices by them
    assert engine.budgeter is linear and engine.on_step is _metrics_hook and engine.open_sessions == 0
    assert _grant_to_a_fresh_session(linear) == 0


async def test_a_device_where_blocks_cost_about_one_step_is_still_granted_drafts():
    """Where decoding reads the weights once for a few tokens (a GPU; a CPU running bf16 natively), the timed
    costs are nearly flat and drafts are granted as before."""
    flat = DraftBudgeter(max_gamma=8)
    await time_blocks(TimedEngine(flat, lambda n: 0.5 + 0.01 * n), vocab_size=32)
    assert _grant_to_a_fresh_session(flat) > 0


async def test_the_warmup_runs_on_the_real_engine_and_reports_only_step_costs():
    steps = []
    budgeter = DraftBudgeter(max_gamma=8)
    engine = Engine(FakeLM(32), max_batch_tokens=64, on_step=lambda *a: steps.append(a), budgeter=budgeter)
    costs = await time_blocks(engine, vocab_size=32)
    assert sorted(costs) == list(SIZES) and all(s > 0 for s in costs.values())
    assert sorted(budgeter.cost.medians()) == list(SIZES)
    assert engine.steps == 1 + REPEATS * len(SIZES)  # the dummy prompt's step, then one per block
    assert steps == [] and budgeter._sessions == {} and engine.budgeter is budgeter  # no verdict, no metric
    assert engine.stats().sessions == 0  # the dummy session is closed
    session = engine.open([1, 2, 3], SamplingParams(max_new_tokens=4))  # and the engine serves on
    await engine.prefill(session)
    result, _ = await engine.verify(session, [], None)
    assert len(result.committed) == 1 and len(steps) == 2 and budgeter._sessions
