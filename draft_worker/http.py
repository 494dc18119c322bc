"""`specdec serve-draft`: an OpenAI-compatible HTTP endpoint (FastAPI + uvicorn) in front of one draft side.

Every request shares one draft model and one gRPC channel to the verifier (draft_worker/service.py) and runs
the one session loop of client.py; streaming is that loop's per-verdict callback feeding server-sent events.
Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream true or false), /metrics, /health. Request
shapes and logprob blocks: openai_schema.py. A request with several prompts, or n > 1, runs one session per choice,
concurrently; `logprobs` ask the verifier for them (SamplingParams.logprobs), `echo` adds the prompt's from its
prefill (max_tokens 0 runs a one-token session and returns only the prompt).
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with an HTTP status that follows
the verifier's gRPC status (down: 503, refused as invalid: 400, at its session limit: 429, ...) and its reason
in the message. Beyond OpenAI's fields every response carries `speculation` (documented in the README).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from draft_worker.http_metrics import DraftMetrics
from draft_worker.openai_schema import (
    MAX_CHOICES,
    APIError,
    ChatRequest,
    Pieces,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    invalid,
)
from draft_worker.service import DraftService
from draft_worker.transport import VerifierError
from specdec.metrics import GenerationResult
from specdec.text import TextStream, encode_prompt

log = logging.getLogger(__name__)
_END = object()  # the queue's last item: the request's task is done


def create_app(service: DraftService, metrics: DraftMetrics | None = None) -> FastAPI:
    """The FastAPI app over one connected DraftService."""
    metrics = metrics or DraftMetrics()
    metrics.watch_replicas(service.router)  # per-replica health, load and sessions
    app = FastAPI(title="specdec draft endpoint")
    app.state.service, app.state.metrics = service, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.count(request.url.path, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return await api_error(request, APIError(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # one line, never a traceback
        log.exception("request failed")
        return await api_error(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "specdec"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.max_tokens == 0 and not body.echo:
            raise invalid("max_tokens: 0 generates nothing; it is meant with echo (the prompt's logprobs)")
        prompts = body.prompt_ids(service.tokenizer)
        jobs = [_Job(ids, text if body.echo else None) for text, ids in prompts]
        return await _respond(service, metrics, request.url.path, body, jobs, body.max_tokens, "completion",
                              logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            ids = encode_prompt(service.tokenizer, messages=[m.to_template() for m in body.messages])
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs: needs logprobs: true")
        max_tokens = body.max_completion_tokens or body.max_tokens or service.info.limits.max_new_tokens
        return await _respond(service, metrics, request.url.path, body, [_Job(ids)], max_tokens, "chat",
                              logprobs=(body.top_logprobs or 0) if body.logprobs else None)

    return app


class _Job:
    """One prompt of a request: its ids, and its text when echoed."""

    def __init__(self, ids: list[int], echo: str | None = None):
        self.ids, self.echo = ids, echo


class _Request:
    """One choice in flight: its session task, the text and logprobs it has committed so far. Every commit puts
    (index, text piece, logprob entries) on the request's shared queue, and (index, _END) when the task is done."""

    def __init__(self, service: DraftService, index: int, job: _Job, params, stop: list[str], queue: asyncio.Queue,
                 keep_output: bool):
        self.index, self.job, self.queue, self.keep_output = index, job, queue, keep_output
        self.text = TextStream(service.tokenizer, stop)
        self.prompt_tokens = len(job.ids)
        self.logprobs: list = []  # entries of the ids pushed to `text`
        self.echoed = job.echo is None  # the echoed prompt goes out with the first commit
        self.result_sink = GenerationResult(token_ids=[])  # filled as it runs: its logprobs are read per commit
        self.task = asyncio.create_task(service.run(job.ids, params, self._commit, self.result_sink))
        self.task.add_done_callback(lambda _: self.queue.put_nowait((self.index, _END, None)))

    def prefix(self) -> tuple[str, list[int], list]:
        """The echoed prompt (text, ids, logprob entries: the first token's None), or nothing."""
        if self.job.echo is None:
            return "", [], []
        return self.job.echo, self.job.ids, [None, *self.result_sink.prompt_logprobs]

    def _commit(self, ids: list[int]) -> bool:
        new = self.result_sink.logprobs[len(self.result_sink.token_ids) - len(ids) :]
        piece, out_ids, entries = "", [], []
        if not self.echoed:
            self.echoed = True
            piece, out_ids, entries = self.prefix()
        if self.keep_output and not self.text.stopped:
            piece += self.text.push(ids)
            self.logprobs.extend(new)
            out_ids, entries = [*out_ids, *ids], [*entries, *new]
        self.queue.put_nowait((self.index, piece, (out_ids, entries)))
        return self.text.stopped  # a stop string ends the session

    async def result(self) -> GenerationResult:
        try:
            return await self.task
        except VerifierError as exc:
            raise APIError.from_verifier(exc) from None
        except ValueError as exc:  # e.g. a gamma over the verifier's limit
            raise invalid(str(exc)) from None

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()


def _start(service: DraftService, body, jobs: list[_Job], max_tokens: int | None, logprobs: int | None,
           queue: asyncio.Queue) -> list[_Request]:
    """A session per prompt and choice (choice index = prompt x n + i; with a seed, choice i uses seed + i)."""
    if len(jobs) * body.n > MAX_CHOICES:
        raise invalid(f"{len(jobs)} prompts x n={body.n} is over this server's limit of {MAX_CHOICES} choices")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    echo = any(job.echo is not None for job in jobs)
    try:
        params = [dataclasses.replace(
            service.params(1 if max_tokens == 0 else max_tokens or 16, body.temperature, body.top_k, body.top_p,
                           None if body.seed is None else body.seed + i, body.ignore_eos),
            logprobs=logprobs, prompt_logprobs=logprobs if echo else None) for i in range(body.n)]
    except ValueError as exc:
        raise invalid(str(exc)) from None
    return [_Request(service, j * body.n + i, job, params[i], stop, queue, keep_output=max_tokens != 0)
            for j, job in enumerate(jobs) for i in range(body.n)]


async def _respond(service: DraftService, metrics: DraftMetrics, path: str, body, jobs: list[_Job],
                   max_tokens: int | None, kind: str, logprobs: int | None):
    chat = kind == "chat"
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.model_name, "object": "chat.completion" if chat else "text_completion"}
    shape = _Shape(Pieces(service.tokenizer, body.return_tokens_as_token_ids), chat, logprobs is not None)
    with metrics.in_flight():
        queue: asyncio.Queue = asyncio.Queue()
        requests = _start(service, body, jobs, max_tokens, logprobs, queue)
        try:
            if not body.stream:
                results = [await r.result() for r in requests]
                for r, result in zip(requests, results):
                    metrics.observe(result, r.prompt_tokens)
                metrics.count(path, 200)
                choices = [shape.final(r, result) for r, result in zip(requests, results)]
                return {**meta, "choices": choices, **_extras(results, requests, service)}
            first = await queue.get()
            if first[1] is _END:
                await requests[first[0]].result()  # an error before any text is a proper HTTP error, not a 200 stream
        except BaseException:
            for r in requests:
                r.cancel()
            raise
    meta["object"] += ".chunk"
    return StreamingResponse(_events(requests, queue, first, meta, shape, body.include_usage, service, metrics, path),
                             media_type="text/event-stream")


class _Shape:
    """Choices in OpenAI's shapes, for chat or completions, with logprobs when asked."""

    def __init__(self, piece: Pieces, chat: bool, logprobs: bool):
        self.piece, self.chat, self.logprobs = piece, chat, logprobs
        self.offsets: dict[int, int] = {}  # completions: text_offset reached per choice (streaming)

    def choice(self, index: int, text: str, ids: list[int], entries: list, finish: str | None, delta: bool,
               role: bool = False) -> dict:
        block = None
        wanted = self.logprobs and (ids or not delta)  # a streamed chunk without tokens (role, finish): null
        if wanted and self.chat:
            block = chat_logprobs(self.piece, ids, entries)
        elif wanted:
            block = completion_logprobs(self.piece, ids, entries, self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + sum(len(t) for t in block["tokens"])
        if not self.chat:
            return {"index": index, "text": text, "logprobs": block, "finish_reason": finish}
        message = {"role": "assistant", "content": text} if role or not delta else {"content": text}
        return {"index": index, ("delta" if delta else "message"): message, "logprobs": block, "finish_reason": finish}

    def final(self, r: _Request, result: GenerationResult) -> dict:
        """A non-streamed choice: the echoed prompt, then the completion."""
        text, ids, entries = r.prefix()
        out_ids = r.text.token_ids if r.keep_output else []
        return self.choice(r.index, text + (r.text.text if r.keep_output else ""), [*ids, *out_ids],
                           [*entries, *(r.logprobs if r.keep_output else [])], _finish(result, r.text), delta=False)


async def _events(requests: list[_Request], queue: asyncio.Queue, first, meta: dict, shape: _Shape,
                  include_usage: bool, service: DraftService, metrics: DraftMetrics, path: str):
    """Server-sent events: a chunk per verdict with new text (one choice each), a chunk per choice with its
    finish_reason, usage and speculation on the last one (or, with stream_options.include_usage, on an extra
    last chunk whose choices are empty, as OpenAI sends it), then [DONE]. An error after the first chunk
    becomes an error event (the status is sent)."""
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    with metrics.in_flight():
        try:
            if shape.chat:
                for r in requests:
                    yield event({**meta, "choices": [shape.choice(r.index, "", [], [], None, True, role=True)]})
            item, running, results = first, len(requests), [None] * len(requests)
            while True:
                index, piece, tokens = item
                r = requests[index]
                if piece is _END:
                    results[index] = result = await r.result()
                    metrics.observe(result, r.prompt_tokens)
                    running -= 1
                    last = shape.choice(index, r.text.finish() if r.keep_output else "", [], [],
                                        _finish(result, r.text), True)
                    extras = _extras(results, requests, service) if not running and not include_usage else {}
                    yield event({**meta, "choices": [last], **extras})
                    if not running:
                        break
                elif piece or (shape.logprobs and tokens[1]):
                    yield event({**meta, "choices": [shape.choice(index, piece, *tokens, None, True)]})
                item = await queue.get()
            metrics.count(path, 200)
            if include_usage:
                yield event({**meta, "choices": [], **_extras(results, requests, service)})
        except APIError as exc:
            metrics.count(path, exc.status)
            yield event(exc.body())
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream, no traceback
            log.exception("streamed request failed")
            metrics.count(path, 500)
            yield event(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").body())
        finally:
            for r in requests:
                r.cancel()  # the client went away mid-stream: end the verifier sessions too
        yield "data: [DONE]\n\n"


def _finish(result: GenerationResult, text: TextStream) -> str:
    return "stop" if text.stopped or result.finish_reason == "stop" else "length"


def _extras(results: list[GenerationResult], requests: list[_Request], service: DraftService) -> dict:
    """OpenAI's usage block (each prompt counted once), and this server's `speculation` block over all choices."""
    prompt_tokens = sum(len(job.ids) for job in {id(r.job): r.job for r in requests}.values())
    completion = sum(len(r.text.token_ids) for r in requests if r.keep_output)
    rtt = sorted(s for result in results for s in result.rtt_s)
    proposed, accepted = sum(x.proposed for x in results), sum(x.accepted for x in results)
    rounds = sum(x.rounds for x in results)
    return {
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
        "speculation": {
            "drafter": service.spec.model or service.spec.kind if service.spec else "verifier-only",
            "gamma": service.gamma if service.spec else 0,
            "rounds": rounds, "proposed": proposed, "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "tokens_per_round": sum(x.new_tokens for x in results) / rounds if rounds else 0.0,
            "rtt_ms_p50": 1000 * rtt[len(rtt) // 2] if rtt else None,
            "rtt_ms_mean": 1000 * sum(rtt) / len(rtt) if rtt else None,
            "ttft_s": min(x.ttft_s for x in results), "wall_s": max(x.wall_s for x in results),
        },
    }

async def start(service: DraftService, host: str, port: int, metrics: DraftMetrics | None = None):
    """Start serving on host:port (0 = a free port). -> (uvicorn server, its task, bound port); set
    `server.should_exit = True` and await the task to stop it."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(create_app(service, metrics), log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(600):  # 30 s at most
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    if not server.started:
        server.should_exit = True
        await task  # raises what stopped it, if anything did
        raise OSError(f"the HTTP server did not start on {host}:{port}")
    return server, task, sock.getsockname()[1]


async def serve(service: DraftService, host: str, port: int) -> None:
    """Serve until interrupted; prints `listening on http://HOST:PORT` once it serves."""
    _, task, bound = await start(service, host, port)
    print(f"listening on http://{f'[{host}]' if ':' in host else host}:{bound}", flush=True)
    await task
