"""Issue 17, client side: one session loop for every mode (draft_worker/loop.py), honouring every gamma schedule.

A stub verifier over real gRPC records the size of every proposal it receives and answers each one at once
(a verdict, or in async mode one commit per proposal), accepting every draft token that matches its fixed
sequence. A perfect drafter proposes that sequence, so every verified block is accepted whole: AdaptiveGamma
then grows by 2 a round and RttGamma (told each round costs the verifier 1 s) drafts long blocks, in every
mode; a fixed gamma never sends more than itself. Nothing depends on timing but the async stub's fallback
(one plain decoding step when no proposal comes for 0.2 s, as at the end of a request).
"""

from __future__ import annotations

import ast
import asyncio
import pathlib

import grpc
import pytest

from draft_worker import loop
from draft_worker.client import speculate
from draft_worker.drafters import AdaptiveGamma, Candidates, CommittedContext
from draft_worker.gamma import RttGamma, new_history
from draft_worker.transport import ClientConfig
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.config import SPEC_MODES, SamplingParams
from tests.stubs import stream_inbox

VOCAB, MAX_NEW, FIRST_GAMMA = 32, 60, 4
STEP_S = 1.0  # the service time the stub reports for every round (it does not wait)


def token_at(position: int) -> int:
    """The verifier's token at generated position `position` (and the perfect drafter's)."""
    return (7 * position + 3) % VOCAB


class PerfectDrafter(CommittedContext):
    name, fingerprint = "perfect", ""

    def start(self, prompt_ids, params, vocab_size) -> None:
        self.prompt_len, self.tokens, self._block = len(prompt_ids), list(prompt_ids), []

    def propose(self, context: list[int], gamma: int) -> Candidates:
        first = len(context) - self.prompt_len
        return Candidates([token_at(first + i) for i in range(gamma)], None)


class RecordingVerifier(pb_grpc.VerifierServicer):
    """Answers every proposal at once with the draft tokens that match `token_at` plus one more token."""

    def __init__(self):
        self.sizes: list[int] = []  # draft tokens of every proposal received
        self.before_opened = None  # an async callable awaited before `opened` is written
        self.opened_sent = False
        self.verifies = True  # False: every proposal is dropped unverified (a plain token committed instead)

    async def Speculate(self, request_iterator, context):
        inbox, reader = stream_inbox(request_iterator)
        try:
            opening = (await inbox.get()).open
            async_mode, max_block = opening.mode == pb.SPECULATION_MODE_ASYNC, opening.max_block or 16
            if self.before_opened is not None:
                await self.before_opened()
            self.opened_sent = True
            yield pb.SpeculateReply(opened=pb.SessionOpened(session_id="s"))
            committed = 0
            while committed < MAX_NEW:
                try:
                    proposal = (await asyncio.wait_for(inbox.get(), 0.2 if async_mode else 30)).proposal
                    self.sizes.append(len(proposal.draft_ids))
                except asyncio.TimeoutError:  # async: nothing came, decode one token
                    proposal = pb.Proposal(base_len=committed)
                start = (proposal.base_len if proposal.HasField("base_len") else committed) + len(proposal.assumed_ids)
                if start > committed and not async_mode:  # its assumed tokens were not committed
                    yield pb.SpeculateReply(verdict=pb.Verdict(stale=True))
                    continue
                draft = list(proposal.draft_ids[committed - start :])[:max_block] \
                    if start <= committed and self.verifies else []
                accepted = next((i for i, t in enumerate(draft) if t != token_at(committed + i)), len(draft))
                new = [token_at(committed + i) for i in range(min(accepted + 1, MAX_NEW - committed))]
                base, committed = committed, committed + len(new)
                finished = committed >= MAX_NEW
                kwargs = dict(finished=finished, finish_reason=pb.FINISH_REASON_LENGTH if finished else 0,
                              service_s=STEP_S)
                if async_mode:
                    yield pb.SpeculateReply(commit=pb.Commit(base_len=base, token_ids=new, verified=len(draft),
                                                             num_accepted=accepted, **kwargs))
                else:
                    next_token = new[-1] if len(new) > accepted else None
                    yield pb.SpeculateReply(verdict=pb.Verdict(num_accepted=min(accepted, len(new)),
                                                               next_token=next_token, **kwargs))
        finally:
            reader.cancel()


@pytest.fixture
async def recording():
    servicer = RecordingVerifier()
    server = grpc.aio.server()
    pb_grpc.add_VerifierServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, pb_grpc.VerifierStub(channel)
    await channel.close()
    await server.stop(None)


@pytest.mark.parametrize("schedule", ["fixed", "adaptive", "rtt"])
@pytest.mark.parametrize("mode", SPEC_MODES)
async def test_every_mode_sends_the_block_sizes_its_gamma_schedule_chooses(recording, mode, schedule):
    servicer, stub = recording
    info = pb.InfoReply(vocab_size=VOCAB, limits=pb.Limits(max_gamma=16, max_new_tokens=1024))
    gamma = {"fixed": FIRST_GAMMA, "adaptive": AdaptiveGamma(FIRST_GAMMA), "rtt": RttGamma(FIRST_GAMMA)}[schedule]
    result = await asyncio.wait_for(speculate(stub, PerfectDrafter(), [1, 2, 3], SamplingParams(max_new_tokens=MAX_NEW),
                                              gamma, info, mode=mode), 60)
    assert result.token_ids == [token_at(i) for i in range(MAX_NEW)] and result.mode == mode
    sent = servicer.sizes
    assert len(result.gamma_per_round) == len(sent)  # one record per proposal: the gamma it was drafted at
    assert max(sent) <= max(result.gamma_per_round) and result.accepted == result.proposed > 0
    if schedule == "fixed":
        assert max(sent) <= FIRST_GAMMA and set(result.gamma_per_round) == {FIRST_GAMMA}
    else:  # every verified block was accepted whole: the schedule grew, and longer blocks went out
        assert max(sent) > FIRST_GAMMA + 1, sent


async def test_an_async_schedule_learns_the_drafting_speed_of_chunks_never_verified(recording):
    """Async, a chunk's drafting time reaches the schedule even when no verdict prices it (`RttGamma.drafted`): here
    the verifier verifies none. Before, the schedule had no draft time for a whole request and kept its gamma."""
    servicer, stub = recording
    servicer.verifies = False
    info = pb.InfoReply(vocab_size=VOCAB, limits=pb.Limits(max_gamma=16, max_new_tokens=1024))
    schedule = RttGamma(FIRST_GAMMA)
    result = await asyncio.wait_for(speculate(stub, PerfectDrafter(), [1, 2, 3], SamplingParams(max_new_tokens=MAX_NEW),
                                              schedule, info, mode="async"), 60)
    assert result.token_ids == [token_at(i) for i in range(MAX_NEW)] and result.proposed == 0
    assert len(servicer.sizes) > 1 and schedule.draft_s is None and schedule._draft_cost() is not None


@pytest.mark.slow  # the stub decodes a token every 0.2 s while no chunk comes
async def test_an_async_request_that_opens_at_gamma_0_keeps_its_first_drafts_prefill_out_of_its_drafting_time(
        recording, monkeypatch):
    """A request opening at gamma 0 (its drafter's last opening) first runs its draft model at a probe: that chunk's
    time holds the draft's prefill of the prompt, and must not price a draft token (it priced an LM's at 15-40 ms
    against 3 ms, and so kept it at 0). The drafting clock is the test's: the first call reads 1 s, every other 1 ms."""
    servicer, stub = recording
    info = pb.InfoReply(vocab_size=VOCAB, limits=pb.Limits(max_gamma=16, max_new_tokens=1024))
    history = new_history()
    history.opening_gamma, history.draft_s = 0, 0.001
    schedule, times, calls = RttGamma(FIRST_GAMMA, history=history), [], []
    drafted = schedule.drafted
    schedule.drafted = lambda s: (times.append(s), drafted(s))

    def timed(fn, *args):  # draft_worker.stream.timed, on the test's clock
        calls.append(fn)
        return fn(*args), 1.0 if len(calls) == 1 else 0.001

    monkeypatch.setattr(loop, "timed", timed)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    result = await asyncio.wait_for(speculate(stub, PerfectDrafter(), [1, 2, 3], params, schedule, info,
                                              mode="async"), 60)
    assert result.token_ids == [token_at(i) for i in range(MAX_NEW)]
    assert len(calls) >= 2 and servicer.sizes  # it probed: the first call, then more
    assert len(times) == len(calls) - 1  # every drafted chunk but the first is timed
    assert max(times) <= 0.001  # and the first's 1 s (>= 62 ms a token over <= 16 tokens) is not among them


@pytest.mark.parametrize("shared_cores", [False, True])
async def test_a_verifier_on_the_same_cores_prefills_before_the_first_block_is_drafted(recording, shared_cores):
    """Remote verifier: the first block is drafted while it prefills (the stub holds `opened` until the drafter
    ran). Same machine (ClientConfig.shared_cores): drafting waits for `opened`, so the two prefills never share
    the cores."""
    servicer, stub = recording
    drafted = asyncio.Event()
    seen_opened: list[bool] = []

    class Watching(PerfectDrafter):
        def propose(self, context, gamma):
            seen_opened.append(servicer.opened_sent)
            drafted.set()  # set from the drafting thread: the stub only polls it
            return super().propose(context, gamma)

    async def until_drafted():
        for _ in range(3000):  # bounded: at most ~30 s
            if drafted.is_set():
                return
            await asyncio.sleep(0.01)

    if not shared_cores:
        servicer.before_opened = until_drafted
    info = pb.InfoReply(vocab_size=VOCAB, limits=pb.Limits(max_gamma=16, max_new_tokens=1024))
    result = await asyncio.wait_for(speculate(stub, Watching(), [1, 2, 3], SamplingParams(max_new_tokens=MAX_NEW),
                                              FIRST_GAMMA, info, ClientConfig(shared_cores=shared_cores)), 60)
    assert result.token_ids == [token_at(i) for i in range(MAX_NEW)]
    assert seen_opened[0] is shared_cores


def test_the_cli_treats_a_loopback_verifier_as_sharing_its_cores():
    from orchestrator.cli import build_parser, client_config

    parse = build_parser().parse_args
    for address, local in [("127.0.0.1:50051", True), ("localhost:1,[::1]:2", True), ("10.0.0.5:50051", False),
                           ("127.0.0.1:1,gpu.example.org:2", False)]:
        args = parse(["generate", "--verifier", address, "--drafter", "ngram", "--prompt", "x"])
        assert client_config(args).shared_cores is local, address


def test_draft_worker_has_no_import_cycle():
    """Modules of draft_worker/ import each other (at module level or inside functions) without a cycle."""
    package = pathlib.Path(__file__).resolve().parents[1] / "draft_worker"
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "draft_worker":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("draft_worker."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("draft_worker.")}
        imports[path.stem] = names - {path.stem}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in imports.get(start, ()))

    assert "loop" in imports and "stream" in imports
    assert [m for m in imports if reaches(m, m, set())] == []
    assert imports["stream"] <= {"transport"}  # the plumbing imports nothing back
