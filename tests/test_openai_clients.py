"""`serve-draft` as clients nobody here wrote call it: requests shaped exactly as guidellm (chat content parts,
stream_options), lm-evaluation-harness `local-completions` (token-id prompts, echo + logprobs for
log-likelihoods) and the `openai` SDK send them, on the tiny pair. Log-probabilities of committed tokens and of
the echoed prompt equal a direct forward of the verifier over the same text, in every session mode."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from draft_worker.router import Router
from draft_worker import http, openai_schema, transport
from draft_worker.drafters import DrafterSpec
from draft_worker.service import connect
from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec, models
from specdec.config import SamplingParams
from specdec.sampling import logits_to_probs, token_logprobs

PROMPT = "Insulin is a peptide hormone produced by the beta cells"
TOL = 1e-4  # fp32: the batched, KV-cached forward against one plain forward


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return models.load_model(str(tiny_dirs[1]), dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return models.load_tokenizer(str(tiny_dirs[1]))


@pytest.fixture
async def endpoint(start_verifier, tiny_dirs, target, tokenizer):
    """async factory: await endpoint(mode=...) -> base_url of serve-draft's app (LM draft, gamma 3) and a verifier."""
    running = []

    async def factory(mode: str = "lockstep", draft: bool = True):
        verifier = await start_verifier(target, vocab_size=models.model_vocab_size(target),
                                        fingerprint=models.tokenizer_fingerprint(tokenizer))
        channel = Router([verifier.address])  # a pool of one
        spec = DrafterSpec(kind="lm", model=str(tiny_dirs[0]), dtype="fp32") if draft else None
        service = await connect(channel, spec, transport.ClientConfig(timeout_s=60, reconnect_s=0.5), 3,
                                str(tiny_dirs[1]), mode=mode)
        server, task, port = await http.start(service, "127.0.0.1", 0)
        running.append((server, task, channel))
        return f"http://127.0.0.1:{port}"

    yield factory
    for server, task, channel in running:
        server.should_exit = True
        await task
        await channel.close()


def _direct(target, ids: list[int], params: SamplingParams, k: int = 0):
    """token_logprobs of ids[1:] from one plain forward of the verifier over ids."""
    with torch.inference_mode():
        logits = target(input_ids=torch.tensor([ids])).logits[0].float()  # [len(ids), vocab]
    return token_logprobs(logits[:-1], torch.tensor(ids[1:]), params, k)


def _sse(text: str) -> list[dict]:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_token_logprobs_math():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, -1.0, 5.0, -2.0]])  # [2, vocab 4]
    chosen, top_ids, top_lp = token_logprobs(logits, torch.tensor([1, 2]), SamplingParams(), 2)
    assert torch.allclose(chosen, logits.log_softmax(-1)[[0, 1], [1, 2]])
    assert top_ids.tolist() == [[0, 1], [2, 0]] and torch.allclose(top_lp[0], logits.log_softmax(-1)[0, :2])
    sampled = SamplingParams(temperature=0.5, top_k=2)
    chosen, _, top_lp = token_logprobs(logits, torch.tensor([2, 2]), sampled, 3)
    assert chosen[0] == float("-inf")  # outside top-k: the processed distribution gives it nothing
    assert torch.allclose(chosen[1], logits_to_probs(logits, sampled)[1, 2].log())
    assert top_lp[0, 2] == float("-inf") and torch.allclose(top_lp[0, :2].exp().sum(), torch.tensor(1.0))
    # the wire: nothing extra when not asked, a round trip when asked
    assert pb.Verdict(num_accepted=1, logprobs=codec.logprobs_to_proto(None)).ByteSize() == \
        pb.Verdict(num_accepted=1).ByteSize()
    back = codec.logprobs_from_proto(codec.logprobs_to_proto(token_logprobs(logits, torch.tensor([1, 2]),
                                                                            SamplingParams(), 2)))
    assert [[t for t, _ in top] for _, top in back] == [[0, 1], [2, 0]]


async def test_guidellm_shapes(endpoint):
    """guidellm's OpenAI HTTP backend: chat with content parts and completions, streamed with include_usage."""
    base_url = await endpoint()
    stream_options = {"include_usage": True, "continuous_usage_stats": True}
    chat = {"model": "fake-verifier", "stream": True, "stream_options": stream_options, "max_completion_tokens": 12,
            "max_tokens": 12, "stop": None, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]}
    completion = {"model": "fake-verifier", "stream": True, "stream_options": stream_options, "max_tokens": 12,
                  "stop": None, "ignore_eos": True, "prompt": PROMPT}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as api:
        for path, body, text_of in (("/v1/chat/completions", chat, lambda c: c["delta"].get("content") or ""),
                                    ("/v1/completions", completion, lambda c: c["text"])):
            response = await api.post(path, json=body)
            assert response.status_code == 200, response.text
            chunks = _sse(response.text)
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
            assert chunks[-1]["speculation"]["rounds"] >= 1
            assert all("usage" not in c for c in chunks[:-1])
            assert "".join(text_of(c) for c in chunks[:-1] for c in c["choices"])  # sampled (no seed): some text
            plain = (await api.post(path, json={**body, "stream": False})).json()
            assert plain["usage"]["completion_tokens"] == 12 and plain["choices"][0]["finish_reason"] == "length"
        image = {**chat, "stream": False, "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}
        refused = await api.post("/v1/chat/completions", json=image)
        assert refused.status_code == 400 and "'image_url'" in refused.json()["error"]["message"]


@pytest.mark.parametrize("max_tokens", [1, 0])
async def test_lm_eval_loglikelihood_shape(endpoint, target, tokenizer, max_tokens):
    """lm-eval local-completions' loglikelihood request (token ids, echo, logprobs 1; max_tokens 1 as it sends
    it, and 0): the prompt's token logprobs are the verifier's, the first is null, a batch answers in order."""
    base_url = await endpoint()
    contexts = [tokenizer(PROMPT)["input_ids"], tokenizer("Is aspirin an anticoagulant? Answer: yes")["input_ids"]]
    body = {"model": "fake-verifier", "prompt": contexts, "temperature": 0, "max_tokens": max_tokens,
            "logprobs": 1, "seed": 1234, "echo": True}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as api:
        response = await api.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(contexts, choices):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens and logprobs["token_logprobs"][0] is None
        assert logprobs["top_logprobs"][0] is None and len(logprobs["text_offset"]) == len(logprobs["tokens"])
        expected, _, top = _direct(target, ids, SamplingParams(), 1)
        got = torch.tensor(logprobs["token_logprobs"][1 : len(ids)])
        assert torch.allclose(got, expected, atol=TOL), (got - expected).abs().max()
        for entry, best in zip(logprobs["top_logprobs"][1 : len(ids)], top[:, 0].tolist()):
            assert len(entry) == 1 and abs(next(iter(entry.values())) - best) < TOL  # what is_greedy reads
        assert choice["text"].startswith(tokenizer.decode(ids))


@pytest.mark.parametrize("mode", ["lockstep", "ahead", "async"])
async def test_committed_logprobs_equal_a_direct_forward(endpoint, target, tokenizer, mode):
    """Accepted, recovered and bonus tokens alike (every committed token, over rounds that accepted drafts),
    greedy and sampled, and greedy text with logprobs on equals the text with them off."""
    api = openai.AsyncOpenAI(base_url=f"{await endpoint(mode)}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=8, top_p=0.9)):
        args = dict(model="fake-verifier", prompt=PROMPT, max_tokens=24, temperature=params.temperature, seed=7,
                    top_p=params.top_p, extra_body={"ignore_eos": True, "top_k": params.top_k})
        out = await api.completions.create(logprobs=3, echo=True, **{
            **args, "extra_body": {**args["extra_body"], "return_tokens_as_token_ids": True}})
        spec = out.model_extra["speculation"]
        # lock-step modes always verify blocks; in async whether a draft arrives before a step is timing, so on
        # a busy machine every token can be a decoding step's (logprobs must hold all the same)
        assert spec["rounds"] > 1 and (spec["accepted"] > 0 or mode == "async")
        lp = out.choices[0].logprobs
        ids = [int(token.removeprefix("token_id:")) for token in lp.tokens]
        assert ids[: len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 24
        expected, top_ids, top_lp = _direct(target, ids, params, 3)
        got = torch.tensor(lp.token_logprobs[1:])
        expected = expected.clamp(min=-9999.0)  # a prompt token outside top-k/top-p: -inf, which JSON reads -9999
        assert torch.allclose(got, expected, atol=TOL), (got - expected).abs().max()
        assert (got[-24:] > -9999).all()  # committed tokens were sampled from that distribution
        assert sorted(lp.top_logprobs[-1].values(), reverse=True) == pytest.approx(top_lp[-1].clamp(min=-9999.0).tolist(), abs=TOL)
        if params.greedy:
            plain = await api.completions.create(**args)
            assert plain.choices[0].text == out.choices[0].text[len(PROMPT):] and plain.choices[0].logprobs is None
            assert tokenizer(plain.choices[0].text, add_special_tokens=False)  # decodable


async def test_openai_sdk_chat_logprobs_batches_and_n(endpoint, tokenizer):
    """The SDK's own shapes: chat logprobs/top_logprobs streamed == not; a prompt batch and n > 1 answer one
    choice per session, in order; streamed completions logprobs add up to the non-streamed ones."""
    api = openai.AsyncOpenAI(base_url=f"{await endpoint()}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "Answer briefly.", "name": "rules"}, {"role": "user", "content": PROMPT}]
    args = dict(model="fake-verifier", messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
    plain = await api.chat.completions.create(**args)
    content = plain.choices[0].logprobs.content
    assert len(content) == plain.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob - TOL for c in content)  # greedy: the token is the best
    chunks = [c async for c in await api.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **args)]
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    # equal up to fp32 rounding: the blocks (and so the forwards) that scored a position may differ between calls
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=TOL)
    assert [t.token for t in streamed] == [t.token for t in content]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    batch = await api.completions.create(model="fake-verifier", prompt=[PROMPT, "Aspirin"], max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
    alone = await api.completions.create(model="fake-verifier", prompt="Aspirin", max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[1].text == alone.choices[0].text
    many = await api.completions.create(model="fake-verifier", prompt=PROMPT, max_tokens=6, n=3, seed=5,
                                        temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 18
    args = dict(model="fake-verifier", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2,
                extra_body={"ignore_eos": True})
    plain = await api.completions.create(**args)
    chunks = [c async for c in await api.completions.create(stream=True, **args)]
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert tokens == plain.choices[0].logprobs.tokens and len(tokens) == 12


async def test_chat_logprob_bytes_are_the_tokens_own(endpoint, tokenizer):
    """OpenAI's chat `bytes` exist for tokens that hold part of a UTF-8 character (their text decodes to U+FFFD):
    they are the token's real bytes, so the tokens' bytes join into the message; a streamed chunk without
    tokens (the role, the finish) has logprobs null."""
    piece = openai_schema.Pieces(tokenizer)
    text = "é – 日本"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # the tiny byte-level vocabulary splits characters
    assert bytes(b for i in ids for b in piece.bytes(i)).decode() == text

    api = openai.AsyncOpenAI(base_url=f"{await endpoint()}/v1", api_key="unused", max_retries=0, timeout=60)
    args = dict(model="fake-verifier", messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0,
                logprobs=True, top_logprobs=1)
    plain = await api.chat.completions.create(**args)
    content = plain.choices[0].logprobs.content
    assert bytes(b for t in content for b in t.bytes).decode(errors="replace") == plain.choices[0].message.content
    assert all(t.top_logprobs[0].bytes == t.bytes for t in content)  # greedy: the best alternative is the token
    chunks = [c async for c in await api.chat.completions.create(stream=True, **args)]
    assert chunks[0].choices[0].logprobs is None and chunks[-1].choices[0].logprobs is None
    assert [t.bytes for c in chunks[1:-1] for t in c.choices[0].logprobs.content] == [t.bytes for t in content]
