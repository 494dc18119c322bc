"""What the verifier accepts off the wire, checked before any work: intact messages, bounded fields, and who
the caller is (its host, for the per-client limit).

Every request is deserialised by `tolerant`, so corrupt bytes become a CorruptMessage that the servicer
answers with INVALID_ARGUMENT instead of a gRPC UNKNOWN (unary) or a silent half-close (Speculate). Every
repeated field is bounded by its length before any element is read, and element checks are vectorized;
decoding a proposal's probabilities (O(gamma x vocab)) runs in a worker thread, off the event loop. Memory
held by requests in flight is capped server-wide: no message over `VerifierLimits.message_bytes`, at most
`max_concurrent_rpcs` calls, and at most INBOX_SIZE + 2 messages held per call (see `inflight_bytes_cap`).
Also what a stream's messages say beside their checks (`said_gamma`), how a finished stream waits for its
client's last writes (`until_half_closed`), and how a task beside a call's own refuses a message (`Refusal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from protos.specdec.v1 import specdec_pb2 as pb
import torch

from specdec import codec, tree
from specdec.config import MAX_HELD_SHADOWS, SamplingParams, VerifierLimits, lookahead
from verifier_worker.session import Claim

SPARE_RPCS = 16  # calls beyond max_sessions (Info, health, refusals) the server takes at once
INBOX_SIZE = 1  # Speculate messages read ahead of the session (a client waits for each reply anyway)
CLOSE_WAIT_S = 2.0  # how long a finished Speculate stream waits for the client to half-close
LOOPBACK = "loopback"


@dataclass(frozen=True)
class CorruptMessage:
    """What `tolerant` deserialises undecodable bytes to; the servicer answers it with INVALID_ARGUMENT."""

    error: str

    @property
    def status(self) -> str:
        return f"the request is not a valid protobuf message ({self.error})"


def tolerant(message_cls):
    """A request deserializer that never raises: corrupt bytes become a CorruptMessage."""

    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return CorruptMessage(str(exc) or type(exc).__name__)

    return deserialize


_HANDLER_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def generic_handler(servicer, service_name: str = "Verifier") -> grpc.GenericRpcHandler:
    """The service's handlers, built from its descriptor, with `tolerant` request deserializers."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        make = _HANDLER_MAKERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=tolerant(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def max_concurrent_rpcs(limits: VerifierLimits) -> int:
    return limits.max_sessions + SPARE_RPCS


def inflight_bytes_cap(limits: VerifierLimits, vocab_size: int) -> int:
    """An upper bound on request bytes the server holds at once: calls x messages held per call x message size."""
    return max_concurrent_rpcs(limits) * (INBOX_SIZE + 2) * limits.message_bytes(vocab_size)


def check_open(prompt_ids, params_msg: pb.SamplingParams, limits: VerifierLimits, vocab_size: int) -> tuple[list[int], SamplingParams]:
    """(prompt ids, sampling params) of an opening request; ValueError with a user-facing message if bad."""
    params = codec.params_from_proto(params_msg)
    codec.validate_params(params, limits.max_new_tokens, vocab_size)
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: a session needs at least one prompt token")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens, over this verifier's limit of {limits.max_prompt_tokens}")
    return codec.check_token_ids(prompt_ids, vocab_size, "prompt_ids").tolist(), params


def max_assumed(limits: VerifierLimits) -> int:
    """Most `assumed_ids` a proposal may carry: the drafts of the blocks it follows, plus a guessed bonus token."""
    return lookahead(limits.max_gamma)


def check_proposal(proposal: pb.Proposal, params: SamplingParams, limits: VerifierLimits, vocab_size: int,
                   trees: bool = True) -> Claim:
    """The claim a proposal makes (draft ids, q [gamma, vocab] or None, base and assumed ids, a tree's parents);
    ValueError if malformed, or if it is a tree and `trees` is False (this backend or mode cannot verify one). A
    tree's nodes count against max_gamma. Run it in a thread."""
    if len(proposal.draft_ids) > limits.max_gamma:
        raise ValueError(f"proposal has {len(proposal.draft_ids)} draft tokens, over this verifier's max_gamma of "
                         f"{limits.max_gamma}")
    if len(proposal.assumed_ids) > max_assumed(limits):
        raise ValueError(f"proposal assumes {len(proposal.assumed_ids)} tokens, over this verifier's limit of "
                         f"{max_assumed(limits)} (2 x max_gamma + 1)")
    if proposal.HasField("draft_s_per_token") and not 0 <= proposal.draft_s_per_token < math.inf:
        raise ValueError(f"proposal: draft_s_per_token must be a finite number >= 0 (seconds per draft token), got "
                         f"{proposal.draft_s_per_token}")
    draft_ids = codec.check_token_ids(proposal.draft_ids, vocab_size, "draft_ids").tolist()
    assumed = codec.check_token_ids(proposal.assumed_ids, vocab_size, "assumed_ids").tolist()
    base_len = proposal.base_len if proposal.HasField("base_len") else None
    q = codec.decode_probs(proposal, params, vocab_size)
    parents = None
    if proposal.parents:
        if not trees:
            raise ValueError("this verifier cannot verify token trees here (its backend has no tree attention, or the "
                             "session is async): send chains (no `parents`), or use lock-step with the transformers "
                             "backend")
        parents_t = torch.tensor(list(proposal.parents[: len(draft_ids) + 1]), dtype=torch.long)
        tree.validate_tree(torch.tensor(draft_ids, dtype=torch.long), parents_t, limits.max_gamma, vocab_size)
        parents = parents_t.tolist()
    return Claim(draft_ids, q, base_len, tuple(assumed), parents)


async def check_proposal_off_loop(proposal, params, limits, vocab_size, trees: bool = True):
    """check_proposal, in a worker thread when the proposal carries probabilities (large), inline otherwise."""
    if proposal.WhichOneof("probs") is None:
        return check_proposal(proposal, params, limits, vocab_size, trees)
    return await asyncio.to_thread(check_proposal, proposal, params, limits, vocab_size, trees)


def check_shadow(shadow: pb.ShadowVerdict, limits: VerifierLimits) -> None:
    """A shadow verdict's counts, and each of the earlier ones it carries (`before`, at most MAX_HELD_SHADOWS), must
    describe a block the session could have sent: 1 <= gamma <= max_gamma and accepted <= drafted <= gamma."""
    if len(shadow.before) > MAX_HELD_SHADOWS:
        raise ValueError(f"shadow verdict: at most {MAX_HELD_SHADOWS} earlier verdicts (before), got {len(shadow.before)}")
    for where, block in [*((f"before[{i}]", b) for i, b in enumerate(shadow.before)), ("", shadow)]:
        if not 1 <= block.gamma <= limits.max_gamma:
            raise ValueError(f"shadow verdict{where and ' ' + where}: gamma must be in [1, {limits.max_gamma}] "
                             f"(max_gamma), got {block.gamma}")
        if not block.accepted <= block.drafted <= block.gamma:
            raise ValueError(f"shadow verdict{where and ' ' + where}: need accepted <= drafted <= gamma, got "
                             f"{block.accepted}, {block.drafted}, {block.gamma}")


def client_host(peer: str) -> str:
    """The host a peer string names, one key per machine for the per-client limit: the port is dropped,
    an IPv4-mapped IPv6 address is its IPv4 address, and every loopback address (127.x, ::1) is LOOPBACK.

    'ipv4:1.2.3.4:5678' -> '1.2.3.4'; 'ipv6:[::ffff:1.2.3.4]:5678' -> '1.2.3.4'; 'ipv6:[::1]:9' -> 'loopback'.
    """
    kind, _, rest = urllib.parse.unquote(peer).partition(":")  # grpc writes IPv6 peers as 'ipv6:%5B::1%5D:port'
    if kind not in ("ipv4", "ipv6"):
        return peer  # unix sockets and the like: the whole string
    host = rest.rsplit(":", 1)[0].strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return LOOPBACK if ip.is_loopback else str(ip)


def said_draft_time(proposal: pb.Proposal) -> float | None:
    """The client's drafting seconds per draft token, as it said it (Proposal.draft_s_per_token, checked by
    `check_proposal`; None: an older client's)."""
    return proposal.draft_s_per_token if proposal.HasField("draft_s_per_token") else None


def said_gamma(message: pb.OpenSession | pb.Proposal | pb.ShadowVerdict) -> int | None:
    """The client's own best gamma, as it said it (OpenSession.wants, Proposal.wants, ShadowVerdict.wants; None: an
    older client's)."""
    return message.wants if message.HasField("wants") else None


class Ended(Exception):
    """What ended an async session from the client's side: a status and its message (code None: its side closed)."""

    def __init__(self, code: grpc.StatusCode | None, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Refusal:
    """A context whose abort raises `Ended`: the checks' answer, read off the call's own task (the server's `_feed`)."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Ended(code, details)


async def until_half_closed(inbox: asyncio.Queue, take: Callable[[pb.SpeculateRequest], Awaitable]) -> None:
    """After a session's last reply, wait (at most CLOSE_WAIT_S) for the client to stop writing before the
    stream ends: a client that pipelines proposals may be writing one right now, and grpcio turns a write
    that races the end of a stream into INTERNAL on the client's side, losing the replies it had not read.
    What arrives meanwhile goes to `take` (a shadow verdict written while the last step ran is still counted)."""
    deadline = time.perf_counter() + CLOSE_WAIT_S
    with contextlib.suppress(asyncio.TimeoutError):
        while (remaining := deadline - time.perf_counter()) > 0:
            request, _ = await asyncio.wait_for(inbox.get(), remaining)
            if request is None:
                return
            if not isinstance(request, CorruptMessage):
                await take(request)
