"""The wire format: SamplingParams and draft probabilities <-> protobuf messages, with validation.

Both workers import this module, so what the draft samples from is bit-for-bit what the verifier
decodes. Greedy sends no probabilities; top-k/top-p sends the draft's truncated distribution sparsely
(exact: the draft samples from that same truncated distribution); full-vocabulary sampling sends a dense
fp16 (or fp32) block, and the draft samples from the rounded copy (`wire_round`) that the verifier will
decode. Malformed input raises ValueError with a message fit for a gRPC status.
"""

from __future__ import annotations

import numpy as np
import torch

from protos.specdec.v1 import specdec_pb2 as pb
from specdec.config import (
    FINISH_LENGTH,
    FINISH_STOP,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)

DENSE_DTYPES = {"fp16": pb.PROB_DTYPE_FLOAT16, "fp32": pb.PROB_DTYPE_FLOAT32}
_NUMPY_DTYPES = {pb.PROB_DTYPE_FLOAT16: np.dtype("<f2"), pb.PROB_DTYPE_FLOAT32: np.dtype("<f4")}
SUM_TOLERANCE = 1e-2  # a row must sum to 1 within this (fp16 rounding of a 152k-token tail stays far below)
_FINISH_TO_PROTO = {None: pb.FINISH_REASON_UNSPECIFIED, FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
                    FINISH_STOP: pb.FINISH_REASON_STOP}
_FINISH_FROM_PROTO = {value: reason or "" for reason, value in _FINISH_TO_PROTO.items()}


def finish_to_proto(reason: str | None) -> int:
    """A session's finish reason (None while generating) -> pb.FinishReason."""
    return _FINISH_TO_PROTO[reason]


def finish_from_proto(value: int) -> str:
    """pb.FinishReason -> "length" | "stop" | "" (not finished, or a reason this client does not know)."""
    return _FINISH_FROM_PROTO.get(value, "")


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:  # checked before the ids are copied
        raise ValueError(f"stop_token_ids has {len(msg.stop_token_ids)} ids, over the limit of {MAX_STOP_TOKEN_IDS}")
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.top_p != 0 else 1.0,  # only 0 means off; a negative or NaN top_p fails validate()
        seed=msg.seed if msg.HasField("seed") else None,
        max_new_tokens=msg.max_new_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
    )


def check_token_ids(ids, vocab_size: int, what: str, max_len: int | None = None) -> np.ndarray:
    """ids as int64 [n] after checking len(ids) <= max_len (before touching any element) and every id is in
    [0, vocab_size), in one vectorized pass. Raises ValueError naming the first bad position."""
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"{what} has {len(ids)} ids, over the limit of {max_len}")
    arr = np.fromiter(ids, dtype=np.int64, count=len(ids))  # [n]
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what}[{i}] = {int(arr[i])} is outside the verifier's vocabulary [0, {vocab_size})")
    return arr


def wire_round(q: torch.Tensor, params: SamplingParams, dense_dtype: str = "fp16") -> torch.Tensor:
    """The draft weights exactly as they travel: q [..., vocab] rounded to the dense dtype, on the CPU.

    The draft distribution is *defined* as these weights divided by their sum. Sampling is scale-invariant
    (`sampling.sample`), so the draft samples straight from them, and `decode_probs` divides by the same
    sum: both sides use the same distribution, with no rounding between them.
    """
    q = q.float().cpu()
    if params.truncated or dense_dtype == "fp32":
        return q
    return q.to(torch.float16).float()


def encode_probs(q: torch.Tensor, params: SamplingParams, dense_dtype: str = "fp16") -> dict:
    """Keyword arguments for pb.Proposal carrying q [gamma, vocab] (already `wire_round`ed).

    Sparse (ids + fp32 weights) when every row's support is small enough to beat the dense block, as it
    is under a tight top-k/top-p and for one-hot n-gram drafts; dense otherwise, in fp32 when truncated (the
    draft sampled from unrounded weights). So no proposal is over max_gamma x vocab x 4 bytes.
    """
    if params.greedy or q.shape[0] == 0:
        return {}
    q = q.detach().float().cpu()
    dtype = pb.PROB_DTYPE_FLOAT32 if params.truncated else DENSE_DTYPES[dense_dtype]
    vocab_size = q.shape[1]
    support = q > 0  # [gamma, vocab]
    if int(support.sum(dim=1).max()) * 8 < vocab_size * _NUMPY_DTYPES[dtype].itemsize:
        rows = []
        for row, row_support in zip(q, support):  # [vocab]
            ids = torch.nonzero(row_support).flatten()
            rows.append(pb.SparseRow(ids=ids.tolist(), probs=row[ids].tolist()))
        return {"sparse": pb.SparseProbs(rows=rows)}
    data = q.numpy().astype(_NUMPY_DTYPES[dtype]).tobytes()
    return {"dense": pb.DenseProbs(dtype=dtype, vocab_size=vocab_size, data=data)}


def one_hot_probs(draft_ids: list[int], vocab_size: int) -> torch.Tensor:
    """q for a deterministic drafter (n-gram): all mass on the proposed token. -> [gamma, vocab]"""
    q = torch.zeros(len(draft_ids), vocab_size)
    q[torch.arange(len(draft_ids)), torch.tensor(draft_ids, dtype=torch.long)] = 1.0
    return q


def _normalized(q: torch.Tensor) -> torch.Tensor:
    """Check q [gamma, vocab] is a block of probability rows (within SUM_TOLERANCE) and divide by the sums."""
    if not torch.isfinite(q).all():
        raise ValueError("draft probabilities contain NaN or infinity")
    if (q < 0).any():
        raise ValueError("draft probabilities contain negative values")
    sums = q.sum(dim=-1)
    bad = torch.nonzero((sums - 1).abs() > SUM_TOLERANCE).flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"draft probabilities for position {i} sum to {float(sums[i]):.6f}, not 1")
    return q / sums[:, None]


def decode_probs(proposal: pb.Proposal, params: SamplingParams, vocab_size: int) -> torch.Tensor | None:
    """q [gamma, vocab] fp32 on CPU from a proposal, or None for greedy. Raises ValueError if malformed."""
    gamma = len(proposal.draft_ids)
    kind = proposal.WhichOneof("probs")
    if params.greedy or gamma == 0:
        return None
    if kind is None:
        raise ValueError("sampling (temperature > 0) needs the draft probabilities in each proposal")
    if kind == "sparse":
        rows = proposal.sparse.rows
        if len(rows) != gamma:
            raise ValueError(f"sparse probabilities have {len(rows)} rows for {gamma} draft tokens")
        for i, row in enumerate(rows):  # lengths first: no element is read before every row is bounded
            if len(row.ids) != len(row.probs) or not row.ids or len(row.ids) > vocab_size:
                raise ValueError(f"sparse row {i} has {len(row.ids)} ids and {len(row.probs)} probs "
                                 f"(between 1 and the vocabulary's {vocab_size} of each)")
        q = torch.zeros(gamma, vocab_size)  # [gamma, vocab]
        for i, row in enumerate(rows):
            ids = check_token_ids(row.ids, vocab_size, f"sparse row {i} ids")  # [support]
            if np.unique(ids).size != ids.size:
                raise ValueError(f"sparse row {i} repeats a token id")
            q[i, torch.from_numpy(ids)] = torch.from_numpy(np.fromiter(row.probs, dtype=np.float32, count=len(row.probs)))
        return _normalized(q)
    dense = proposal.dense
    if dense.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"dense probabilities have an unknown dtype {dense.dtype}")
    if dense.vocab_size != vocab_size:
        raise ValueError(f"dense probabilities have vocab_size {dense.vocab_size}, the verifier's is {vocab_size}")
    np_dtype = _NUMPY_DTYPES[dense.dtype]
    expected = gamma * vocab_size * np_dtype.itemsize
    if len(dense.data) != expected:
        raise ValueError(f"dense probabilities hold {len(dense.data)} bytes, expected {expected} for [{gamma}, {vocab_size}]")
    raw = torch.from_numpy(np.frombuffer(dense.data, dtype=np_dtype).astype(np.float32).reshape(gamma, vocab_size))
    return _normalized(raw)


def validate_params(params: SamplingParams, max_new_tokens_limit: int, vocab_size: int) -> None:
    params.validate(max_new_tokens_limit)  # bounds len(stop_token_ids) first
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")


# one token's log-probability from the verifier and its top alternatives [(id, logprob), ...], best first
TokenLogprob = tuple[float, list[tuple[int, float]]]


def logprobs_to_proto(logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> pb.TokenLogprobs | None:
    """sampling.token_logprobs' (logprobs [n], top_ids [n, k], top_logprobs [n, k]) -> pb.TokenLogprobs; None
    stays None, so a reply whose request did not ask carries nothing extra."""
    if logprobs is None:
        return None
    chosen, top_ids, top_logprobs = logprobs
    return pb.TokenLogprobs(logprobs=chosen.tolist(), top_k=top_ids.shape[-1], top_ids=top_ids.flatten().tolist(),
                            top_logprobs=top_logprobs.flatten().tolist())


def logprobs_from_proto(msg: pb.TokenLogprobs) -> list[TokenLogprob]:
    """pb.TokenLogprobs -> one (logprob, top alternatives) per token."""
    k = msg.top_k
    return [(lp, list(zip(msg.top_ids[i * k : (i + 1) * k], msg.top_logprobs[i * k : (i + 1) * k])))
            for i, lp in enumerate(msg.logprobs)]
