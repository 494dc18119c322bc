"""OpenAI's request and response shapes for `serve-draft` (draft_worker/http.py): the pydantic request models,
their reading into token ids, and the log-probability blocks of completions (the legacy shape) and chat.

Requests are read as OpenAI documents them and as real clients send them: chat `content` as a string or a list
of text parts (guidellm), completions `prompt` as a string, a list of strings, a list of token ids or a list of
those (lm-evaluation-harness sends token ids), `n` choices, `echo`, `logprobs` and `stream_options`. Fields this
server does not use are ignored. Knows nothing about gRPC.

Log-probabilities come from the verifier (specdec/sampling.py `token_logprobs`): of each token under the
distribution the verifier samples it from, after temperature, top-k and top-p (greedy: the raw logits'
log_softmax). JSON has no -inf, so a token outside top-k/top-p reads -9999.0, as OpenAI writes it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from transformers.convert_slow_tokenizer import bytes_to_unicode

from specdec.codec import TokenLogprob
from specdec.config import MAX_LOGPROBS
from specdec.text import encode_prompt

MAX_CHOICES = 16  # choices one request may ask for (prompts x n): each is a session on the verifier
LOGPROB_FLOOR = -9999.0  # what -inf reads in JSON
# the verifier's gRPC status -> the HTTP status a client of this endpoint sees
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "CANCELLED": 503, "DEADLINE_EXCEEDED": 504}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    @classmethod
    def from_verifier(cls, exc) -> APIError:
        """A transport.VerifierError as the HTTP status that follows the verifier's gRPC status."""
        return cls(HTTP_STATUS.get(exc.code or "", 502), str(exc), exc.code)  # 502: anything else is the upstream's

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}


def invalid(message: str) -> APIError:
    return APIError(400, message, "invalid_request")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. vLLM's continuous_usage_stats, which guidellm sends
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields this server does not use (user, ...)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0: only with completions' echo (scoring the prompt)
    temperature: float = Field(1.0, ge=0)  # OpenAI's default; 0 = greedy
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's; vLLM's name
    seed: int | None = None  # with n > 1, choice i uses seed + i
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>" (exact, any bytes)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False  # the prompt before the completion (with its logprobs, when asked)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token (legacy shape)

    def prompt_ids(self, tokenizer) -> list[tuple[str, list[int]]]:
        """(text, token ids) of each prompt of the batch."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise invalid("prompt: an empty list; send a string, a list of strings or token ids")
        out = []
        for one in prompt:
            if isinstance(one, str):
                out.append((one, encode_prompt(tokenizer, one)))
            else:
                if not one:
                    raise invalid("prompt: an empty list of token ids")
                out.append((tokenizer.decode(one), list(one)))
        return out


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_template(self) -> dict:
        """The message as a chat template reads it: text parts joined by newlines (as vLLM joins them)."""
        content = self.content or ""
        if not isinstance(content, str):
            other = [part.type for part in content if part.type != "text"]
            if other:
                raise invalid(f"messages: content part type {other[0]!r} is not supported; this endpoint takes "
                              f"text only (parts of type 'text')")
            content = "\n".join(part.text or "" for part in content)
        return {"role": self.role, "content": content, **({"name": self.name} if self.name else {})}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


_BYTE_LEVEL = {ch: b for b, ch in bytes_to_unicode().items()}  # GPT-2's byte-level BPE alphabet -> the byte


class Pieces:
    """A token's name in a logprobs block: its decoded text, or "token_id:<id>" (return_tokens_as_token_ids),
    and its bytes (chat's `bytes`): a token can hold part of a UTF-8 character, whose text decodes to U+FFFD;
    its bytes are the real ones, so a client can join them (byte-level BPE tokenizers; others: the text's)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = "ByteLevel" in repr(decoder)

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tokenizer.decode([token_id])

    def bytes(self, token_id: int) -> list[int]:
        if self.byte_level and token_id not in self.tokenizer.all_special_ids:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if all(ch in _BYTE_LEVEL for ch in piece):
                return [_BYTE_LEVEL[ch] for ch in piece]
        return list(self.tokenizer.decode([token_id]).encode())


def completion_logprobs(piece: Pieces, ids: list[int], entries: list[TokenLogprob | None], offset: int = 0) -> dict:
    """OpenAI's legacy block: tokens, token_logprobs, top_logprobs ({token: logprob}) and text_offset; an entry
    of None (the prompt's first token) reads null."""
    tokens = [piece(i) for i in ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else _floor(e[0]) for e in entries],
        "top_logprobs": [None if e is None else {piece(t): _floor(lp) for t, lp in e[1]} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(piece: Pieces, ids: list[int], entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat block: content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    def one(token_id: int, logprob: float) -> dict:
        return {"token": piece(token_id), "logprob": _floor(logprob), "bytes": piece.bytes(token_id)}

    return {"content": [{**one(i, e[0]), "top_logprobs": [one(t, lp) for t, lp in e[1]]}
                        for i, e in zip(ids, entries)]}

