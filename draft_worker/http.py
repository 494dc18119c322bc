"""`specdec serve-draft`: an OpenAI-compatible HTTP endpoint (FastAPI + uvicorn) in front of one draft side.

Every request shares one draft model and one gRPC channel to the verifier (draft_worker/service.py) and runs
the one session loop of client.py; streaming is that loop's per-verdict callback feeding server-sent events.
Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream true or false), /metrics, /health.
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with an HTTP status that follows
the verifier's gRPC status (down: 503, refused as invalid: 400, at its session limit: 429, ...) and its reason
in the message. Beyond OpenAI's fields every response carries `speculation` (documented in the README).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from draft_worker.http_metrics import DraftMetrics
from draft_worker.service import DraftService
from draft_worker.transport import VerifierError
from specdec.metrics import GenerationResult
from specdec.text import TextStream, encode_prompt

log = logging.getLogger(__name__)
# the verifier's gRPC status -> the HTTP status a client of this endpoint sees
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "CANCELLED": 503, "DEADLINE_EXCEEDED": 504}
_END = object()  # the queue's last item: the request's task is done


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    @classmethod
    def from_verifier(cls, exc: VerifierError) -> APIError:
        return cls(HTTP_STATUS.get(exc.code or "", 502), str(exc), exc.code)  # 502: anything else is the upstream's

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields this server does not use (user, logprobs: off)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's; vLLM's name
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def create_app(service: DraftService, metrics: DraftMetrics | None = None) -> FastAPI:
    """The FastAPI app over one connected DraftService."""
    metrics = metrics or DraftMetrics()
    metrics.watch_replicas(service.router)  # per-replica health, load and sessions (H5, issue 22)
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
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "this server takes one prompt per request", "invalid_request")
        ids = encode_prompt(service.tokenizer, prompts[0])
        return await _respond(service, metrics, request.url.path, body, ids, body.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            ids = encode_prompt(service.tokenizer, messages=[m.model_dump() for m in body.messages])
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_request") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or service.info.limits.max_new_tokens
        return await _respond(service, metrics, request.url.path, body, ids, max_tokens, chat=True)

    return app


class _Request:
    """One request in flight: the session task and the text it has committed so far."""

    def __init__(self, service: DraftService, ids: list[int], params, stop: list[str]):
        self.text = TextStream(service.tokenizer, stop)
        self.prompt_tokens = len(ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(service.run(ids, params, self._commit))
        self.task.add_done_callback(lambda _: self.queue.put_nowait(_END))

    def _commit(self, ids: list[int]) -> bool:
        piece = self.text.push(ids)
        if piece:
            self.queue.put_nowait(piece)
        return self.text.stopped  # a stop string ends the session

    async def result(self) -> GenerationResult:
        try:
            return await self.task
        except VerifierError as exc:
            raise APIError.from_verifier(exc) from None
        except ValueError as exc:  # e.g. a gamma over the verifier's limit
            raise APIError(400, str(exc), "invalid_request") from None

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()


async def _respond(service: DraftService, metrics: DraftMetrics, path: str, body: _Sampling, ids: list[int],
                   max_tokens: int, chat: bool):
    try:
        params = service.params(max_tokens, body.temperature, body.top_k, body.top_p, body.seed, body.ignore_eos)
    except ValueError as exc:
        raise APIError(400, str(exc), "invalid_request") from None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    kind = "chat.completion" if chat else "text_completion"
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.model_name}
    with metrics.in_flight():
        request = _Request(service, ids, params, stop)
        try:
            if not body.stream:
                result = await request.result()
                metrics.observe(result, request.prompt_tokens)
                metrics.count(path, 200)
                choice = _choice(chat, request.text.text, _finish(result, request.text), delta=False)
                return {**meta, "object": kind, "choices": [choice], **_extras(result, request.prompt_tokens, service)}
            first = await request.queue.get()
            if first is _END:
                await request.result()  # an error before any text is a proper HTTP error, not a 200 stream
        except BaseException:
            request.cancel()
            raise
    return StreamingResponse(_events(request, first, meta, f"{kind}.chunk", chat, service, metrics, path),
                             media_type="text/event-stream")


async def _events(request: _Request, first, meta: dict, kind: str, chat: bool, service: DraftService,
                  metrics: DraftMetrics, path: str):
    """Server-sent events: a chunk per verdict with new text, a last chunk with finish_reason, usage and
    speculation, then [DONE]. An error after the first chunk becomes an error event (the status is sent)."""
    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    with metrics.in_flight():
        try:
            if chat:
                yield event({**meta, "object": kind, "choices": [_choice(True, "", None, delta=True, role=True)]})
            item = first
            while item is not _END:
                yield event({**meta, "object": kind, "choices": [_choice(chat, item, None, delta=True)]})
                item = await request.queue.get()
            result = await request.result()
            metrics.observe(result, request.prompt_tokens)
            metrics.count(path, 200)
            last = _choice(chat, request.text.finish(), _finish(result, request.text), delta=True)
            yield event({**meta, "object": kind, "choices": [last], **_extras(result, request.prompt_tokens, service)})
        except APIError as exc:
            metrics.count(path, exc.status)
            yield event(exc.body())
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream, no traceback
            log.exception("streamed request failed")
            metrics.count(path, 500)
            yield event(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").body())
        finally:
            request.cancel()  # the client went away mid-stream: end the verifier session too
        yield "data: [DONE]\n\n"


def _choice(chat: bool, text: str, finish_reason: str | None, delta: bool, role: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    message = {"role": "assistant", "content": text} if role or not delta else {"content": text}
    return {"index": 0, ("delta" if delta else "message"): message, "logprobs": None, "finish_reason": finish_reason}


def _finish(result: GenerationResult, text: TextStream) -> str:
    return "stop" if text.stopped or result.finish_reason == "stop" else "length"


def _extras(result: GenerationResult, prompt_tokens: int, service: DraftService) -> dict:
    """OpenAI's usage block, and this server's `speculation` block."""
    rtt = sorted(result.rtt_s)
    return {
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": result.new_tokens,
                  "total_tokens": prompt_tokens + result.new_tokens},
        "speculation": {
            "drafter": service.spec.model or service.spec.kind if service.spec else "verifier-only",
            "gamma": service.gamma if service.spec else 0,
            "rounds": result.rounds, "proposed": result.proposed, "accepted": result.accepted,
            "acceptance_rate": result.acceptance_rate, "tokens_per_round": result.mean_acceptance_length,
            "rtt_ms_p50": 1000 * rtt[len(rtt) // 2] if rtt else None,
            "rtt_ms_mean": 1000 * sum(rtt) / len(rtt) if rtt else None,
            "ttft_s": result.ttft_s, "wall_s": result.wall_s,
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
