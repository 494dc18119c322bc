"""Failover across verifier replicas with nothing lost: the tiny pair, two `serve-verifier` processes, one
SIGKILLed once the request has committed some tokens (an event, not a timer). Greedy output equals the
uninterrupted run, through the library and through `serve-draft`'s HTTP endpoint; with every replica
killed the request fails with an error naming the addresses. And a Ray-started pool of two through
`specdec bench` puts sessions on both."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx
import pytest
import yaml

from draft_worker import http
from draft_worker.drafters import DrafterSpec
from draft_worker.router import Router
from draft_worker.service import connect
from draft_worker.transport import Backoff, ClientConfig, VerifierError
from orchestrator.launch import start_verifier
from tests.stubs import CLI, ENV

pytestmark = pytest.mark.slow  # verifier subprocesses (and Ray for the bench)

CONFIG = ClientConfig(timeout_s=60, backoff=Backoff(initial_s=0.05, max_s=0.5), reconnect_s=5)
PROMPT = "Insulin is a peptide hormone produced by the beta cells"


@pytest.fixture(scope="module")
def processes(tiny_dirs):
    """The module's two verifier slots; a test that kills one gets it replaced before the next test."""
    procs: list = [None, None]
    yield procs
    for p in procs:
        if p is not None:
            p.stop()


@pytest.fixture
def pair(processes, tiny_dirs):
    """Two live tiny verifier processes -> {address: VerifierProcess}."""
    for i, p in enumerate(processes):
        if p is None or p.proc.poll() is not None:
            processes[i] = start_verifier(str(tiny_dirs[1]), "fp32", "cpu", env={**ENV, "OMP_NUM_THREADS": "1"})
    return {p.address: p for p in processes}


def kill_busy(router: Router, procs: dict, everything: bool = False) -> list[str]:
    """SIGKILL the replica(s) this router has a session open on (every replica with `everything`)."""
    victims = [r["address"] for r in router.snapshot() if everything or r["open"]]
    for address in victims:
        os.kill(procs[address].proc.pid, signal.SIGKILL)
        procs[address].proc.wait()
    return victims


async def service_over(pair, tiny_dirs, config=CONFIG, baseline=False):
    router = Router(list(pair), config, poll_s=0.2)
    spec = None if baseline else DrafterSpec(kind="lm", model=str(tiny_dirs[0]), dtype="fp32")
    return router, await connect(router, spec, config, 3, str(tiny_dirs[1]))


@pytest.mark.parametrize("baseline", [False, True])
async def test_a_killed_replica_loses_nothing(pair, tiny_dirs, baseline):
    router, service = await service_over(pair, tiny_dirs, baseline=baseline)
    try:
        prompt = service.tokenizer.encode(PROMPT)
        params = service.params(64, ignore_eos=True)
        expected = await service.run(prompt, params)  # uninterrupted
        committed, killed = [], []

        def on_commit(ids):
            committed.extend(ids)
            if len(committed) >= 8 and not killed:
                killed.extend(kill_busy(router, pair))

        result = await service.run(prompt, params, on_commit)
    finally:
        await router.close()
    assert len(killed) == 1 and result.reconnects >= 1
    assert result.token_ids == expected.token_ids and committed == expected.token_ids  # nothing lost or repeated
    assert result.replicas[0] == killed[0] and result.replicas[-1] != killed[0]  # failed over to the other


async def test_every_replica_down_is_a_clear_error_naming_them(pair, tiny_dirs):
    router, service = await service_over(pair, tiny_dirs, ClientConfig(timeout_s=30, reconnect_s=1.0))
    killed = []

    def on_commit(ids):
        if not killed:
            killed.extend(kill_busy(router, pair, everything=True))

    try:
        with pytest.raises(VerifierError) as err:
            await service.run(service.tokenizer.encode(PROMPT), service.params(64, ignore_eos=True), on_commit)
    finally:
        await router.close()
    assert err.value.code == "UNAVAILABLE" and all(address in str(err.value) for address in pair)


async def test_serve_draft_answers_once_through_a_replica_kill(pair, tiny_dirs):
    router, service = await service_over(pair, tiny_dirs)
    server, task, port = await http.start(service, "127.0.0.1", 0)
    body = {"model": service.model_name, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as api:
            expected = (await api.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            text, killed = "", []
            async with api.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    assert "error" not in event, event  # the stream ended in an error event instead of failing over
                    text += event["choices"][0]["text"]
                    if not killed:  # the first chunk arrived: the session is open on one replica
                        killed.extend(kill_busy(router, pair))
            metrics = (await api.get("/metrics")).text
    finally:
        server.should_exit = True
        await task
        await router.close()
    assert len(killed) == 1 and text == expected
    survivor = next(a for a in pair if a not in killed)
    assert f'specdec_draft_replica_up{{replica="{survivor}"}} 1.0' in metrics
    assert f'specdec_draft_replica_up{{replica="{killed[0]}"}} 0.0' in metrics


def test_a_ray_pool_of_two_serves_a_bench_run(tiny_dirs, pubmedqa_path, tmp_path):
    draft, verifier = tiny_dirs
    config = {
        "verifier": {"model": str(verifier), "dtype": "fp32", "device": "cpu", "threads": 1, "replicas": 2},
        "drafts": [{"name": "ngram", "kind": "ngram", "gamma": 3}],
        "max_new_tokens": 8,
        "dataset": {"source": str(pubmedqa_path), "num_prompts": 4, "max_prompt_tokens": 200},
        "concurrency": {"draft_workers": 1, "sessions_per_worker": 2, "draft_threads": 1},
        "ray": {"num_cpus": 2},
    }
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([*CLI, "bench", "--no-progress", "--config", str(tmp_path / "bench.yaml"), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    replicas = json.loads(done.stdout.strip().splitlines()[-1])["replicas"]
    assert len(replicas) == 2 and all(r["sessions"] > 0 for r in replicas)
    records = [json.loads(line) for line in (tmp_path / "run/requests.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" and len(r["replicas"]) == 1 for r in records)
