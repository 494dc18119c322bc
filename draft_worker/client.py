"""The draft worker's gRPC client: drives one Speculate session (or a verifier-only Generate) end to end.

Drafts locally, sends only the new draft tokens (and q when sampling), applies each verdict, and records
what every round cost: client round trip, verifier service time, payload bytes both ways.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from draft_worker.drafters import AdaptiveGamma, Drafter
from protos.specdec.v1 import specdec_pb2 as pb
from protos.specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec import codec
from specdec.config import SamplingParams
from specdec.metrics import GenerationResult
from specdec.tls import bearer_metadata, read_file, read_token

log = logging.getLogger(__name__)
_FINISH_NAMES = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop"}


class VerifierError(RuntimeError):
    """The verifier refused or failed a request; the message says why."""


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float = 600.0  # deadline for one whole request
    info_timeout_s: float = 10.0
    max_message_bytes: int = 64 * 1024 * 1024
    auth_token: str | None = None  # sent as 'authorization: Bearer <token>' on every call
    tls: bool = False  # TLS; implied by any of the PEM fields below
    tls_root_certs: bytes | None = None  # PEM CA that signed the verifier's cert; None = the system roots
    tls_client_cert: bytes | None = None  # PEM chain, for a verifier that requires mutual TLS
    tls_client_key: bytes | None = None
    tls_server_name: str | None = None  # check the cert against this name instead of the dialled host

    @property
    def secure(self) -> bool:
        return self.tls or any((self.tls_root_certs, self.tls_client_cert, self.tls_client_key))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.auth_token)

    def __repr__(self) -> str:  # never print the token or the key
        return f"ClientConfig(timeout_s={self.timeout_s}, secure={self.secure}, auth_token={'set' if self.auth_token else None})"


def load_client_config(timeout_s: float = 600.0, auth_token_file: str | None = None, tls: bool = False,
                       tls_ca: str | None = None, client_cert: str | None = None, client_key: str | None = None,
                       tls_server_name: str | None = None) -> ClientConfig:
    """A ClientConfig from file paths (read now; the token falls back to $SPECDEC_AUTH_TOKEN). OSError/ValueError."""
    if bool(client_cert) != bool(client_key):
        raise ValueError("a client certificate and its key go together (mutual TLS needs both)")
    return ClientConfig(timeout_s=timeout_s, auth_token=read_token(auth_token_file), tls=tls,
                        tls_root_certs=read_file(tls_ca), tls_client_cert=read_file(client_cert),
                        tls_client_key=read_file(client_key), tls_server_name=tls_server_name)


def channel_options(config: ClientConfig) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return options


def open_channel(address: str, config: ClientConfig = ClientConfig()) -> grpc.aio.Channel:
    if not config.secure:
        return grpc.aio.insecure_channel(address, options=channel_options(config))
    credentials = grpc.ssl_channel_credentials(config.tls_root_certs, config.tls_client_key, config.tls_client_cert)
    return grpc.aio.secure_channel(address, credentials, options=channel_options(config))


async def fetch_info(stub: pb_grpc.VerifierStub, config: ClientConfig = ClientConfig()) -> pb.InfoReply:
    try:
        return await stub.Info(pb.InfoRequest(), timeout=config.info_timeout_s, metadata=config.metadata)
    except grpc.aio.AioRpcError as exc:
        raise VerifierError(f"verifier Info failed: {exc.code().name}: {exc.details()}") from exc


def check_pair(info: pb.InfoReply, draft_name: str, draft_fingerprint: str) -> None:
    """Refuse a draft/verifier pair that does not share a tokenizer."""
    if draft_fingerprint != info.tokenizer_fingerprint:
        raise VerifierError(
            f"tokenizer mismatch: draft {draft_name} (fingerprint {draft_fingerprint[:12]}) and verifier "
            f"{info.model_id} (fingerprint {info.tokenizer_fingerprint[:12]}) do not share a tokenizer; "
            "pick a draft model from the verifier's family"
        )


async def speculate(
    stub: pb_grpc.VerifierStub,
    drafter: Drafter,
    prompt_ids: list[int],
    params: SamplingParams,
    gamma: int | AdaptiveGamma,
    info: pb.InfoReply,
    config: ClientConfig = ClientConfig(),
    tokenizer_fingerprint: str = "",
) -> GenerationResult:
    """Generate with speculative decoding over one Speculate stream. Raises VerifierError on a refusal.

    `gamma` is a fixed block size or an AdaptiveGamma schedule, updated after every verdict.
    """
    schedule = gamma if isinstance(gamma, AdaptiveGamma) else None
    first = schedule.gamma if schedule else gamma
    if not 0 <= first <= info.limits.max_gamma:
        raise ValueError(f"gamma must be in [0, {info.limits.max_gamma}] for this verifier, got {first}")
    if schedule:
        schedule.max_gamma = min(schedule.max_gamma, info.limits.max_gamma)
    result = GenerationResult(token_ids=[])
    start = time.perf_counter()
    call = stub.Speculate(timeout=config.timeout_s, metadata=config.metadata)
    try:
        opening = pb.SpeculateRequest(
            open=pb.OpenSession(
                prompt_ids=prompt_ids,
                params=codec.params_to_proto(params),
                tokenizer_fingerprint=tokenizer_fingerprint,
                client_model_id=drafter.name,
            )
        )
        await call.write(opening)
        result.bytes_sent += opening.ByteSize()
        drafter.start(prompt_ids, params, info.vocab_size)
        opened = False
        while True:
            remaining = params.max_new_tokens - result.new_tokens
            t_draft = time.perf_counter()
            # drafting is compute: off the event loop, so other sessions in this process keep moving
            block = schedule.gamma if schedule else gamma
            candidates = await asyncio.to_thread(drafter.get_candidates, min(block, remaining - 1))
            result.draft_s += time.perf_counter() - t_draft
            request = pb.SpeculateRequest(
                proposal=pb.Proposal(
                    draft_ids=candidates.draft_ids,
                    **codec.encode_probs(candidates.q, params, candidates.dense_dtype) if candidates.q is not None else {},
                )
            )
            t_sent = time.perf_counter()
            await call.write(request)
            result.bytes_sent += request.ByteSize()
            if not opened:  # the session was opened while this block was being drafted
                reply = await _read(call)
                result.prefill_service_s = reply.opened.service_s
                result.bytes_received += reply.ByteSize()
                opened = True
            reply = await _read(call)
            result.rtt_s.append(time.perf_counter() - t_sent)
            result.bytes_received += reply.ByteSize()
            verdict = reply.verdict
            next_token = verdict.next_token if verdict.HasField("next_token") else None
            drafter.commit(verdict.num_accepted, next_token)
            if schedule:
                schedule.update(len(candidates.draft_ids), verdict.num_accepted)
            result.token_ids.extend(candidates.draft_ids[: verdict.num_accepted])
            if next_token is not None:
                result.token_ids.append(next_token)
            if result.rounds == 0:
                result.ttft_s = time.perf_counter() - start
            result.rounds += 1
            result.proposed_per_round.append(len(candidates.draft_ids))
            result.accepted_per_round.append(verdict.num_accepted)
            result.service_s.append(verdict.service_s)
            if verdict.finished:
                result.finish_reason = _FINISH_NAMES.get(verdict.finish_reason, "")
                break
        await call.done_writing()
    except grpc.aio.AioRpcError as exc:
        raise VerifierError(f"verifier refused the session: {exc.code().name}: {exc.details()}") from exc
    except asyncio.InvalidStateError:  # the verifier ended the stream while this side was still writing
        raise VerifierError(f"verifier refused the session: {(await call.code()).name}: {await call.details()}") from None
    finally:
        if not call.done():
            call.cancel()
    result.wall_s = time.perf_counter() - start
    return result


async def _read(call) -> pb.SpeculateReply:
    reply = await call.read()
    if reply is grpc.aio.EOF:
        code = await call.code()
        raise VerifierError(f"verifier ended the session early: {code.name}: {await call.details()}")
    return reply


async def generate_baseline(
    stub: pb_grpc.VerifierStub, prompt_ids: list[int], params: SamplingParams, config: ClientConfig = ClientConfig()
) -> GenerationResult:
    """Verifier-only generation (the baseline every speedup is measured against)."""
    result = GenerationResult(token_ids=[])
    request = pb.GenerateRequest(prompt_ids=prompt_ids, params=codec.params_to_proto(params))
    result.bytes_sent = request.ByteSize()
    start = time.perf_counter()
    try:
        async for reply in stub.Generate(request, timeout=config.timeout_s, metadata=config.metadata):
            if not result.token_ids:
                result.ttft_s = time.perf_counter() - start
            result.token_ids.extend(reply.token_ids)
            result.service_s.append(reply.service_s)
            result.bytes_received += reply.ByteSize()
            if reply.finished:
                result.finish_reason = _FINISH_NAMES.get(reply.finish_reason, "")
    except grpc.aio.AioRpcError as exc:
        raise VerifierError(f"verifier refused the request: {exc.code().name}: {exc.details()}") from exc
    result.wall_s = time.perf_counter() - start
    return result
