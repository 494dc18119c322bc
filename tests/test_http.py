"""`serve-draft` through the official `openai` client: the tiny pair, an in-process verifier on 127.0.0.1:0, the
HTTP endpoint on 127.0.0.1:0. Streamed text == non-streamed text == `specdec generate --json` (greedy), concurrent
requests, OpenAI-shaped errors for a verifier that is down or refuses, /metrics counters that move by exactly a
request's tokens."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from draft_worker import http, transport
from draft_worker.drafters import DrafterSpec
from draft_worker.router import Router
from draft_worker.service import connect
from orchestrator import cli
from specdec import models
from specdec.config import VerifierLimits

PROMPT = "Insulin is a peptide hormone produced by the beta cells"


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return models.load_model(str(tiny_dirs[1]), dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture
async def endpoint(start_verifier, tiny_dirs, target):
    """async factory: await endpoint(limits=...) -> (verifier, base_url) of a verifier and serve-draft's app, both in
    this event loop; stopped at teardown."""
    running = []

    async def factory(limits=VerifierLimits()):
        draft, verifier_dir = tiny_dirs
        fingerprint = models.tokenizer_fingerprint(models.load_tokenizer(str(verifier_dir)))
        verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target), fingerprint=fingerprint,
                                        limits=limits)
        channel = Router([verifier.address])  # a pool of one (closed like the channel it replaced)
        spec = DrafterSpec(kind="lm", model=str(draft), dtype="fp32")
        service = await connect(channel, spec, transport.ClientConfig(timeout_s=60, reconnect_s=0.5), 3, str(verifier_dir))
        server, task, port = await http.start(service, "127.0.0.1", 0)
        running.append((server, task, channel))
        return verifier, f"http://127.0.0.1:{port}"

    yield factory
    for server, task, channel in running:
        server.should_exit = True
        await task
        await channel.close()


def _client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _metrics(text: str) -> dict[str, float]:
    return {(s.name + str(sorted(s.labels.items())) if s.labels else s.name): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_completions_and_chat_streamed_equal_non_streamed_and_generate(endpoint, tiny_dirs):
    verifier, base_url = await endpoint()
    api = _client(base_url)
    models_list = await api.models.list()
    assert [m.id for m in models_list.data] == ["fake-verifier"]
    args = dict(model="fake-verifier", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    plain = await api.completions.create(prompt=PROMPT, **args)
    streamed = [chunk async for chunk in await api.completions.create(prompt=PROMPT, stream=True, **args)]
    assert plain.choices[0].text and plain.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length" and len(streamed) > 2  # a chunk per verdict
    assert plain.usage.completion_tokens == 20 and plain.usage.prompt_tokens > 0
    spec = plain.model_extra["speculation"]
    assert spec["rounds"] >= 1 and 0 < spec["accepted"] <= spec["proposed"] and spec["rtt_ms_p50"] > 0

    # greedy through the endpoint == `specdec generate --json` (the same CLI code, in this event loop)
    parsed = cli.build_parser().parse_args(["generate", "--verifier", verifier.address, "--draft", str(tiny_dirs[0]),
                                            "--draft-dtype", "fp32", "--prompt", PROMPT, "--max-new-tokens", "20",
                                            "--ignore-eos", "--json", "--gamma", "3"])
    out = await cli._generate(parsed)
    assert out["text"] == plain.choices[0].text and out["new_tokens"] == 20

    messages = [{"role": "user", "content": "What does insulin do?"}]
    chat = await api.chat.completions.create(messages=messages, **args)
    chunks = [c async for c in await api.chat.completions.create(messages=messages, stream=True, **args)]
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    parsed = cli.build_parser().parse_args(["generate", "--verifier", verifier.address, "--draft", str(tiny_dirs[0]),
                                            "--draft-dtype", "fp32", "--prompt", messages[0]["content"], "--chat",
                                            "--max-new-tokens", "20", "--ignore-eos", "--json"])
    assert (await cli._generate(parsed))["text"] == chat.choices[0].message.content


async def test_stop_strings_seed_and_concurrency(endpoint):
    _, base_url = await endpoint()
    api = _client(base_url)
    args = dict(model="m", prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = (await api.completions.create(**args)).choices[0].text
    cut = full[len(full) // 2 : len(full) // 2 + 3]
    stopped = await api.completions.create(stop=[cut], **args)
    assert stopped.choices[0].text == full[: full.index(cut)] and stopped.choices[0].finish_reason == "stop"
    streamed = [c async for c in await api.completions.create(stop=cut, stream=True, **args)]
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text

    sampled = dict(args, temperature=0.9, top_p=0.9, seed=7)
    a, b = [(await api.completions.create(**sampled)).choices[0].text for _ in range(2)]
    assert a == b  # seeded

    prompts = [PROMPT, "The heart pumps blood", "Neurons communicate", "Antibiotic resistance arises"]
    solo = [(await api.completions.create(**dict(args, prompt=p))).choices[0].text for p in prompts]
    together = await asyncio.gather(*(api.completions.create(**dict(args, prompt=p)) for p in prompts))
    assert [r.choices[0].text for r in together] == solo


async def test_errors_are_openai_shaped(endpoint):
    verifier, base_url = await endpoint(VerifierLimits(max_new_tokens=32, max_prompt_tokens=20))
    api = _client(base_url)
    with pytest.raises(openai.BadRequestError) as refused:  # the verifier's limit, its reason in the message
        await api.completions.create(model="m", prompt=PROMPT, max_tokens=100)
    assert "max_new_tokens 100 is over this verifier's limit of 32" in refused.value.message
    for stream in (False, True):  # the verifier refuses (INVALID_ARGUMENT); streamed, still before any text: 400
        with pytest.raises(openai.BadRequestError) as refused:
            await api.completions.create(model="m", prompt=PROMPT * 4, max_tokens=8, stream=stream)
        assert "INVALID_ARGUMENT" in refused.value.message and "over this verifier's limit of 20" in refused.value.message
    with pytest.raises(openai.BadRequestError):
        await api.completions.create(model="m", prompt=PROMPT, temperature=-1)
    async with httpx.AsyncClient(base_url=base_url) as raw:
        reply = await raw.post("/v1/completions", json={"prompt": 3})
        assert reply.status_code == 400 and set(reply.json()["error"]) == {"message", "type", "param", "code"}

    await verifier.server.stop(grace=None)  # the verifier goes down
    with pytest.raises(openai.APIStatusError) as down:
        await asyncio.wait_for(api.completions.create(model="m", prompt=PROMPT, max_tokens=8), 30)
    assert down.value.status_code == 503 and "UNAVAILABLE" in down.value.message
    with pytest.raises(openai.APIStatusError) as down:
        await asyncio.wait_for(api.completions.create(model="m", prompt=PROMPT, max_tokens=8, stream=True), 30)
    assert down.value.status_code == 503 and "Traceback" not in down.value.message


async def test_metrics_count_exactly_one_requests_tokens(endpoint):
    _, base_url = await endpoint()
    api = _client(base_url)
    async with httpx.AsyncClient(base_url=base_url) as raw:
        before = _metrics((await raw.get("/metrics")).text)
        done = await api.completions.create(model="m", prompt=PROMPT, max_tokens=17, temperature=0,
                                            extra_body={"ignore_eos": True})
        after = _metrics((await raw.get("/metrics")).text)
    spec = done.model_extra["speculation"]
    assert after["specdec_draft_tokens_committed_total"] - before["specdec_draft_tokens_committed_total"] == 17
    assert after["specdec_draft_tokens_proposed_total"] - before["specdec_draft_tokens_proposed_total"] == spec["proposed"]
    assert after["specdec_draft_tokens_accepted_total"] - before["specdec_draft_tokens_accepted_total"] == spec["accepted"]
    assert after["specdec_draft_prompt_tokens_total"] - before["specdec_draft_prompt_tokens_total"] == done.usage.prompt_tokens
    assert after["specdec_draft_round_trip_seconds_count"] - before["specdec_draft_round_trip_seconds_count"] == spec["rounds"]
    ok = "specdec_draft_requests_total[('code', '200'), ('endpoint', '/v1/completions'), ('outcome', 'ok')]"
    assert after[ok] - before.get(ok, 0) == 1 and after["specdec_draft_requests_open"] == 0


def test_grpc_codes_map_to_http_statuses():
    assert http.APIError.from_verifier(transport.VerifierError("x", grpc.StatusCode.UNAVAILABLE.name)).status == 503
    assert http.APIError.from_verifier(transport.VerifierError("x", "RESOURCE_EXHAUSTED")).status == 429
    assert http.APIError.from_verifier(transport.VerifierError("x", "UNAUTHENTICATED")).status == 502
