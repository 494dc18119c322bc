"""The open-loop load generator without Ray: arrivals share draft slots, every request is recorded, and
the config expands to one configuration per rate."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from orchestrator import config as bench_config
from orchestrator import openloop


def test_every_arrival_runs_on_a_free_slot_in_order_and_failures_are_recorded():
    in_use: set = set()
    busiest = [0]
    gate = asyncio.Event()
    log: list = []

    async def call(slot, prompt) -> dict:
        assert slot not in in_use  # a slot serves one request at a time
        in_use.add(slot)
        busiest[0] = max(busiest[0], len(in_use))
        await gate.wait()  # hold every request until all have arrived: the later ones must wait for a slot
        in_use.discard(slot)
        if prompt == "p1":
            raise RuntimeError("boom")
        return {"prompt": prompt}

    def done(i, prompt, result, error, timing) -> None:
        log.append((i, prompt, result, error, timing))

    async def main() -> int:
        task = asyncio.create_task(openloop.drive([0.0] * 5, ["p0", "p1", "p2"], ["a", "b"], call, done))
        while len(in_use) < 2:  # both slots taken; the other three arrivals wait
            await asyncio.sleep(0)
        gate.set()
        return await task

    asyncio.run(main())
    assert sorted(i for i, *_ in log) == [0, 1, 2, 3, 4] and busiest[0] == 2
    by_i = {i: (prompt, result, error, timing) for i, prompt, result, error, timing in log}
    assert [by_i[i][0] for i in range(5)] == ["p0", "p1", "p2", "p0", "p1"]  # prompts cycle in arrival order
    assert isinstance(by_i[1][2], RuntimeError) and by_i[1][1] is None and "finished_at" in by_i[1][3]
    assert all(t["scheduled_s"] == 0.0 and t["wait_s"] >= t["dispatch_lag_s"] >= 0 for _, _, _, t in by_i.values())
    assert len({t["pass_started_at"] for *_, t in by_i.values()}) == 1 and by_i[0][3]["pass_requests"] == 5


def test_load_expands_to_one_configuration_per_rate_with_the_same_arrivals():
    cfg = bench_config.from_dict({"drafts": [{"name": "ng", "kind": "ngram"}], "rtt_ms": [0, 25],
                                  "load": {"rates": [1, 2.5], "requests": 7, "seed": 3}, "slo": {"tpot_ms": 50}})
    assert [s.name for s in bench_config.expand(cfg)] == [
        "baseline @1/s", "baseline rtt=25ms @1/s", "ng g=4 @1/s", "ng g=4 rtt=25ms @1/s",
        "baseline @2.5/s", "baseline rtt=25ms @2.5/s", "ng g=4 @2.5/s", "ng g=4 rtt=25ms @2.5/s"]
    times = openloop.arrivals(cfg.load, 2.5, num_prompts=20)
    assert len(times) == 7 and times == openloop.arrivals(cfg.load, 2.5, num_prompts=3)  # the same for every config
    swept = bench_config.override(cfg, **{"concurrency.sessions": [1, 2]})
    with pytest.raises(bench_config.ConfigError, match="sweeps arrival rates"):
        bench_config.expand(swept)
    with pytest.raises(bench_config.ConfigError, match="rates must be > 0"):
        bench_config.from_dict({"drafts": [{"name": "ng", "kind": "ngram"}], "load": {"rates": [1, 0]}})


def test_capacity_configs_load():
    configs = pathlib.Path(__file__).resolve().parents[1] / "configs"
    tiny = bench_config.expand(bench_config.load(configs / "capacity-tiny.yaml"))
    assert len(tiny) == 4 * 3 * 3 and {s.rate for s in tiny} == {4, 8, 16, 32}  # (baseline + 2 drafts) x 3 RTTs x 4 rates
    fine = bench_config.expand(bench_config.load(configs / "capacity-tiny-fine.yaml"))
    assert len(fine) == 6 * 3 * 2 and max(s.rate for s in fine) == 45
    real = bench_config.load(configs / "capacity.yaml")
    assert real.slo.tpot_ms and [s.name for s in bench_config.expand(real)][:2] == ["baseline @0.05/s", "ngram-auto g=auto @0.05/s"]


def test_resume_reruns_a_rate_that_stopped_half_way_even_if_every_prompt_succeeded():
    from orchestrator.bench import Prompt, schedule

    cfg = bench_config.from_dict({"drafts": [{"name": "ng", "kind": "ngram"}],
                                  "load": {"rates": [1, 2], "requests": 6, "seed": 0}})
    specs = bench_config.expand(cfg)  # baseline and ng at 1/s and 2/s
    prompts = [Prompt(i, f"p{i}", [1, 2], False, "yes") for i in range(2)]  # 6 requests cycle 2 prompts

    def rec(config: str, i: int, at: float, status: str = "ok") -> dict:
        return {"config": config, "rate": 1.0, "request": i, "pubid": f"p{i % 2}", "status": status,
                "pass_started_at": at, "pass_requests": 6}

    half = [rec("ng g=4 @1/s", i, 100.0) for i in range(4)]  # crashed after 4 of 6: both prompts succeeded
    whole = [rec("baseline @1/s", i, 100.0, "failed" if i == 3 else "ok") for i in range(6)]  # a failure is recorded
    mixed = [rec("baseline @2/s", i, 100.0) for i in range(3)] + [rec("baseline @2/s", i, 200.0) for i in range(3, 6)]
    legacy = [{k: v for k, v in r.items() if not k.startswith("pass")} for r in whole]
    assert openloop.complete_passes(half + whole + mixed + legacy) == {"baseline @1/s"}  # one pass must hold them all
    done = {(r["config"], r["pubid"]) for r in half + whole + mixed if r["status"] == "ok"}
    todo = [(s.name, len(p)) for s, p, _ in schedule(specs, prompts, done, "grouped", {"baseline @1/s"})]
    assert todo == [("ng g=4 @1/s", 2), ("baseline @2/s", 2), ("ng g=4 @2/s", 2)]  # rerun whole, all prompts
