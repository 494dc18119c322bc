"""The wire codec: SamplingParams and draft probabilities survive the wire, malformed input fails clearly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protos.specdec.v1 import specdec_pb2 as pb
from specdec import codec
from specdec.config import SamplingParams
from specdec.sampling import logits_to_probs

VOCAB = 64
SAMPLING = SamplingParams(temperature=1.0)
TOP_K = SamplingParams(temperature=0.7, top_k=5)


def over_the_wire(proposal: pb.Proposal) -> pb.Proposal:
    return pb.Proposal.FromString(proposal.SerializeToString())


def random_probs(gamma: int, params: SamplingParams, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(gamma, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [gamma, vocab]
    return codec.wire_round(logits_to_probs(logits, params), params)


# --------------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.5, top_k=40, top_p=0.75, seed=1234, max_new_tokens=7, stop_token_ids=(2, 5)),
        SamplingParams(temperature=1.0, seed=0),  # seed 0 is set, not "unset"
        SamplingParams(temperature=1.0, seed=2**64 - 1),
    ],
)
def test_params_round_trip(params):
    msg = pb.SamplingParams.FromString(codec.params_to_proto(params).SerializeToString())
    assert msg.HasField("seed") == (params.seed is not None)
    assert codec.params_from_proto(msg) == params


def test_params_from_proto_defaults():
    params = codec.params_from_proto(pb.SamplingParams())
    assert params.greedy and params.seed is None and params.top_p == 1.0 and params.stop_token_ids == ()


@pytest.mark.parametrize("top_p", [-0.5, math.nan])
def test_invalid_top_p_is_not_silently_turned_off(top_p):
    params = codec.params_from_proto(pb.SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=4))
    with pytest.raises(ValueError, match="top_p must be in"):
        codec.validate_params(params, 16, VOCAB)


def test_validate_params_checks_stop_ids():
    with pytest.raises(ValueError, match=r"stop_token_ids\[1\] = 64 is outside the verifier's vocabulary \[0, 64\)"):
        codec.validate_params(SamplingParams(max_new_tokens=8, stop_token_ids=(3, 64)), 16, VOCAB)
    with pytest.raises(ValueError, match="over this verifier's limit of 16"):
        codec.validate_params(SamplingParams(max_new_tokens=17), 16, VOCAB)


# ---------------------------------------------------------------------------------------------- round trips
def test_sparse_round_trip_is_exact():
    q = random_probs(3, TOP_K)  # [gamma, vocab], 5 nonzero per row
    fields = codec.encode_probs(q, TOP_K)
    assert list(fields) == ["sparse"] and [len(row.ids) for row in fields["sparse"].rows] == [5, 5, 5]
    decoded = codec.decode_probs(over_the_wire(pb.Proposal(draft_ids=[1, 2, 3], **fields)), TOP_K, VOCAB)
    assert torch.equal(decoded, q / q.sum(-1, keepdim=True))
    torch.testing.assert_close(decoded, q)


@pytest.mark.parametrize("dense_dtype, itemsize", [("fp16", 2), ("fp32", 4)])
def test_dense_round_trip_is_bit_exact(dense_dtype, itemsize):
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1)) * 3
    q = logits_to_probs(logits, SAMPLING)  # [gamma, vocab]
    wire = codec.wire_round(q, SAMPLING, dense_dtype)  # what the draft samples from
    fields = codec.encode_probs(wire, SAMPLING, dense_dtype)
    assert list(fields) == ["dense"] and len(fields["dense"].data) == 4 * 1000 * itemsize
    decoded = codec.decode_probs(over_the_wire(pb.Proposal(draft_ids=[0, 1, 2, 3], **fields)), SAMPLING, 1000)
    assert torch.equal(decoded, wire / wire.sum(-1, keepdim=True))
    if dense_dtype == "fp32":
        assert torch.equal(wire, q)
    else:
        assert not torch.equal(wire, q) and torch.equal(wire, q.half().float())


def test_one_hot_ngram_draft_travels_sparse():
    q = codec.one_hot_probs([3, 7, 7], 1000)  # [gamma, vocab]
    fields = codec.encode_probs(q, SAMPLING)  # full-vocabulary params, but a tiny support
    assert list(fields) == ["sparse"]
    assert [(list(r.ids), list(r.probs)) for r in fields["sparse"].rows] == [([3], [1.0]), ([7], [1.0]), ([7], [1.0])]
    decoded = codec.decode_probs(over_the_wire(pb.Proposal(draft_ids=[3, 7, 7], **fields)), SAMPLING, 1000)
    assert torch.equal(decoded, q)


def test_greedy_and_empty_blocks_send_nothing():
    q = random_probs(2, SAMPLING)
    assert codec.encode_probs(q, SamplingParams()) == {}
    assert codec.encode_probs(q[:0], SAMPLING) == {}
    assert codec.decode_probs(pb.Proposal(draft_ids=[1, 2]), SamplingParams(), VOCAB) is None
    assert codec.decode_probs(pb.Proposal(draft_ids=[]), SAMPLING, VOCAB) is None


# ------------------------------------------------------------------------------------------------ malformed
def sparse(*rows: tuple[list[int], list[float]]) -> dict:
    return {"sparse": pb.SparseProbs(rows=[pb.SparseRow(ids=ids, probs=probs) for ids, probs in rows])}


def dense(values, vocab_size: int = VOCAB, dtype=np.float16) -> dict:
    kind = pb.PROB_DTYPE_FLOAT16 if dtype == np.float16 else pb.PROB_DTYPE_FLOAT32
    data = np.asarray(values, dtype=dtype).tobytes()
    return {"dense": pb.DenseProbs(dtype=kind, vocab_size=vocab_size, data=data)}


UNIFORM = [1 / VOCAB] * VOCAB

MALFORMED = {
    "rows count": ([1, 2], sparse(([1], [1.0])), "sparse probabilities have 1 rows for 2 draft tokens"),
    "ids/probs length": ([1], sparse(([1, 2], [1.0])), "sparse row 0 has 2 ids and 1 probs"),
    "empty row": ([1], sparse(([], [])), "sparse row 0 has 0 ids and 0 probs"),
    "out-of-vocab id": ([1], sparse(([1, 64], [0.5, 0.5])), r"sparse row 0 ids\[1\] = 64 is outside .*\[0, 64\)"),
    "negative id": ([1], sparse(([-3], [1.0])), r"sparse row 0 ids\[0\] = -3 is outside"),
    "repeated id": ([1], sparse(([1, 1], [0.5, 0.5])), "sparse row 0 repeats a token id"),
    "NaN": ([1], sparse(([1, 2], [math.nan, 1.0])), "NaN or infinity"),
    "infinity": ([1], dense([math.inf] + UNIFORM[1:]), "NaN or infinity"),
    "negative": ([1], sparse(([1, 2], [-0.5, 1.5])), "negative values"),
    "sum not 1": ([1, 2], sparse(([1], [1.0]), ([1, 2], [0.5, 0.4])), "position 1 sum to 0.900000, not 1"),
    "dense vocab_size": ([1], dense([0.5, 0.5], vocab_size=2), "vocab_size 2, the verifier's is 64"),
    "dense byte length": ([1, 2], dense(UNIFORM), r"hold 128 bytes, expected 256 for \[2, 64\]"),
    "dense fp32 byte length": ([1], dense(UNIFORM[:-1], dtype=np.float32), "hold 252 bytes, expected 256"),
    "dense unknown dtype": ([1], {"dense": pb.DenseProbs(vocab_size=VOCAB, data=b"\0" * 128)}, "unknown dtype 0"),
    "no probs": ([1, 2], {}, r"sampling \(temperature > 0\) needs the draft probabilities"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_probs_raise_value_error(case):
    draft_ids, fields, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message):
        codec.decode_probs(over_the_wire(pb.Proposal(draft_ids=draft_ids, **fields)), SAMPLING, VOCAB)


def test_sums_within_tolerance_are_accepted_and_renormalised():
    decoded = codec.decode_probs(pb.Proposal(draft_ids=[1], **sparse(([1, 2], [0.5, 0.5005]))), SAMPLING, VOCAB)
    assert math.isclose(float(decoded.sum()), 1.0, rel_tol=1e-6)
