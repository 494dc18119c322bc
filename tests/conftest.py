"""Shared fixtures: in-process verifier servers on 127.0.0.1:0, the tiny model pair, the PubMedQA path, one
torch thread for the fast tier, and draft-budget grants that take no time."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import grpc
import pytest
import torch

from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.config import VerifierLimits
from specdec.tiny import build_tiny_pair
from verifier_worker.listen import start_server
from verifier_worker.server import ModelInfo, VerifierServicer

PUBMEDQA = pathlib.Path(
    os.environ.get("SPECDEC_PUBMEDQA", pathlib.Path(__file__).resolve().parents[2] / "shared/data/pubmedqa/pubmedqa_pqal.jsonl")
)


class RunningVerifier:
    def __init__(self, servicer, server, port):
        self.servicer, self.server, self.port = servicer, server, port
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = pb_grpc.VerifierStub(self.channel)

    async def close(self):
        await self.channel.close()
        await self.server.stop(grace=None)


@pytest.fixture
async def start_verifier():
    """async factory: await start_verifier(model, vocab_size=..., limits=...) -> RunningVerifier"""
    running: list[RunningVerifier] = []

    async def factory(model, vocab_size: int, fingerprint: str = "fp-test", limits: VerifierLimits = VerifierLimits(),
                      budget: bool = False):
        # the draft budget follows the step times it measures, so on a busy machine it may grant fewer drafts:
        # tests that count drafts run without it; the budget's own tests (test_budget_wiring.py) pass budget=True
        limits = dataclasses.replace(limits, draft_budget=budget)
        info = ModelInfo(model_id="fake-verifier", vocab_size=vocab_size, tokenizer_fingerprint=fingerprint,
                         dtype="float32", device="cpu")
        servicer = VerifierServicer(model, info, limits)
        server, port = await start_server(servicer, "127.0.0.1", 0)
        verifier = RunningVerifier(servicer, server, port)
        running.append(verifier)
        return verifier

    yield factory
    for verifier in running:
        await verifier.close()


@pytest.fixture
def free_grants(monkeypatch):
    """Every draft-budget grant takes 0 s of the clock, so the budgeter remakes it at every step, as on a CPU
    verifier: a test that feeds millisecond steps then asks for a budget must not depend on how fast this machine
    made the last grant (one over GRANT_SHARE of the step would stand for the next). The reuse itself is tested with
    its own fake clock (test_budget.py)."""
    import types

    import verifier_worker.budgeting as budgeting

    monkeypatch.setattr(budgeting, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))


@pytest.fixture
def pubmedqa_path() -> pathlib.Path:
    if not PUBMEDQA.exists():
        pytest.skip(f"PubMedQA not found at {PUBMEDQA}; set SPECDEC_PUBMEDQA")
    return PUBMEDQA


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(draft folder, verifier folder) of the seeded tiny Qwen2 pair, built once per test run."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def one_torch_thread(request):
    """Fast-tier tensors are tiny, so one intra-op thread: with two, every op waits at an OpenMP barrier for
    a second core that other work holds (a softmax over [3, 4] took ~10 ms on a busy 2-core machine).
    `slow` tests (the real pair) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
