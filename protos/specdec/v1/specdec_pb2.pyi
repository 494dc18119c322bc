from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpeculationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPECULATION_MODE_LOCKSTEP: _ClassVar[SpeculationMode]
    SPECULATION_MODE_ASYNC: _ClassVar[SpeculationMode]

class ProbDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROB_DTYPE_UNSPECIFIED: _ClassVar[ProbDType]
    PROB_DTYPE_FLOAT16: _ClassVar[ProbDType]
    PROB_DTYPE_FLOAT32: _ClassVar[ProbDType]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
SPECULATION_MODE_LOCKSTEP: SpeculationMode
SPECULATION_MODE_ASYNC: SpeculationMode
PROB_DTYPE_UNSPECIFIED: ProbDType
PROB_DTYPE_FLOAT16: ProbDType
PROB_DTYPE_FLOAT32: ProbDType
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_gamma", "max_prompt_tokens", "max_new_tokens", "max_sessions", "max_message_bytes", "max_sessions_per_client", "idle_timeout_s", "max_batch_tokens")
    MAX_GAMMA_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_gamma: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_sessions: int
    max_message_bytes: int
    max_sessions_per_client: int
    idle_timeout_s: float
    max_batch_tokens: int
    def __init__(self, max_gamma: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_sessions_per_client: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ..., max_batch_tokens: _Optional[int] = ...) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_id", "vocab_size", "tokenizer_fingerprint", "dtype", "device", "limits", "server_version", "load")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    vocab_size: int
    tokenizer_fingerprint: str
    dtype: str
    device: str
    limits: Limits
    server_version: str
    load: Load
    def __init__(self, model_id: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., load: _Optional[_Union[Load, _Mapping]] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("sessions", "queued_tokens", "draining")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    queued_tokens: int
    draining: bool
    def __init__(self, sessions: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "max_new_tokens", "stop_token_ids", "logprobs", "prompt_logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: int
    prompt_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("logprobs", "top_k", "top_ids", "top_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprobs: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("prompt_ids", "params", "tokenizer_fingerprint", "client_model_id", "mode", "max_block", "tpot_slo_ms", "server_decodes", "wants")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TPOT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    SERVER_DECODES_FIELD_NUMBER: _ClassVar[int]
    WANTS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    tokenizer_fingerprint: str
    client_model_id: str
    mode: SpeculationMode
    max_block: int
    tpot_slo_ms: float
    server_decodes: bool
    wants: int
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., tokenizer_fingerprint: _Optional[str] = ..., client_model_id: _Optional[str] = ..., mode: _Optional[_Union[SpeculationMode, str]] = ..., max_block: _Optional[int] = ..., tpot_slo_ms: _Optional[float] = ..., server_decodes: _Optional[bool] = ..., wants: _Optional[int] = ...) -> None: ...

class SparseRow(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class SparseProbs(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[SparseRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[SparseRow, _Mapping]]] = ...) -> None: ...

class DenseProbs(_message.Message):
    __slots__ = ("dtype", "vocab_size", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: ProbDType
    vocab_size: int
    data: bytes
    def __init__(self, dtype: _Optional[_Union[ProbDType, str]] = ..., vocab_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("draft_ids", "sparse", "dense", "base_len", "assumed_ids", "parents", "decode_alone", "wants", "draft_s_per_token")
    DRAFT_IDS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    ASSUMED_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ALONE_FIELD_NUMBER: _ClassVar[int]
    WANTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    draft_ids: _containers.RepeatedScalarFieldContainer[int]
    sparse: SparseProbs
    dense: DenseProbs
    base_len: int
    assumed_ids: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    decode_alone: int
    wants: int
    draft_s_per_token: float
    def __init__(self, draft_ids: _Optional[_Iterable[int]] = ..., sparse: _Optional[_Union[SparseProbs, _Mapping]] = ..., dense: _Optional[_Union[DenseProbs, _Mapping]] = ..., base_len: _Optional[int] = ..., assumed_ids: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., decode_alone: _Optional[int] = ..., wants: _Optional[int] = ..., draft_s_per_token: _Optional[float] = ...) -> None: ...

class ShadowVerdict(_message.Message):
    __slots__ = ("drafted", "accepted", "gamma", "wants", "before")
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    WANTS_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    drafted: int
    accepted: int
    gamma: int
    wants: int
    before: _containers.RepeatedCompositeFieldContainer[ShadowCount]
    def __init__(self, drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., gamma: _Optional[int] = ..., wants: _Optional[int] = ..., before: _Optional[_Iterable[_Union[ShadowCount, _Mapping]]] = ...) -> None: ...

class ShadowCount(_message.Message):
    __slots__ = ("drafted", "accepted", "gamma")
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    drafted: int
    accepted: int
    gamma: int
    def __init__(self, drafted: _Optional[int] = ..., accepted: _Optional[int] = ..., gamma: _Optional[int] = ...) -> None: ...

class SpeculateRequest(_message.Message):
    __slots__ = ("open", "proposal", "shadow")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    proposal: Proposal
    shadow: ShadowVerdict
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., proposal: _Optional[_Union[Proposal, _Mapping]] = ..., shadow: _Optional[_Union[ShadowVerdict, _Mapping]] = ...) -> None: ...

class StepCost(_message.Message):
    __slots__ = ("compute_s", "queue_s", "batch_sessions", "batch_tokens", "share_s", "steps", "prefill_tokens")
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARE_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    compute_s: float
    queue_s: float
    batch_sessions: int
    batch_tokens: int
    share_s: float
    steps: int
    prefill_tokens: int
    def __init__(self, compute_s: _Optional[float] = ..., queue_s: _Optional[float] = ..., batch_sessions: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., share_s: _Optional[float] = ..., steps: _Optional[int] = ..., prefill_tokens: _Optional[int] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "prompt_tokens", "service_s", "cost", "prompt_logprobs", "draft_budget", "server_decodes", "takes_shadows")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_S_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SERVER_DECODES_FIELD_NUMBER: _ClassVar[int]
    TAKES_SHADOWS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_tokens: int
    service_s: float
    cost: StepCost
    prompt_logprobs: TokenLogprobs
    draft_budget: int
    server_decodes: bool
    takes_shadows: bool
    def __init__(self, session_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., service_s: _Optional[float] = ..., cost: _Optional[_Union[StepCost, _Mapping]] = ..., prompt_logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., draft_budget: _Optional[int] = ..., server_decodes: _Optional[bool] = ..., takes_shadows: _Optional[bool] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("num_accepted", "next_token", "finished", "finish_reason", "service_s", "round", "cost", "stale", "logprobs", "draft_budget", "accepted_nodes")
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SERVICE_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_NODES_FIELD_NUMBER: _ClassVar[int]
    num_accepted: int
    next_token: int
    finished: bool
    finish_reason: FinishReason
    service_s: float
    round: int
    cost: StepCost
    stale: bool
    logprobs: TokenLogprobs
    draft_budget: int
    accepted_nodes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_accepted: _Optional[int] = ..., next_token: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., service_s: _Optional[float] = ..., round: _Optional[int] = ..., cost: _Optional[_Union[StepCost, _Mapping]] = ..., stale: _Optional[bool] = ..., logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., draft_budget: _Optional[int] = ..., accepted_nodes: _Optional[_Iterable[int]] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("base_len", "token_ids", "verified", "num_accepted", "finished", "finish_reason", "service_s", "cost", "stale", "logprobs", "draft_budget")
    BASE_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SERVICE_S_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    base_len: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    verified: int
    num_accepted: int
    finished: bool
    finish_reason: FinishReason
    service_s: float
    cost: StepCost
    stale: int
    logprobs: TokenLogprobs
    draft_budget: int
    def __init__(self, base_len: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., verified: _Optional[int] = ..., num_accepted: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., service_s: _Optional[float] = ..., cost: _Optional[_Union[StepCost, _Mapping]] = ..., stale: _Optional[int] = ..., logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., draft_budget: _Optional[int] = ...) -> None: ...

class SpeculateReply(_message.Message):
    __slots__ = ("opened", "verdict", "commit")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    verdict: Verdict
    commit: Commit
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt_ids", "params")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ("token_ids", "finished", "finish_reason", "service_s", "cost", "logprobs", "prompt_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SERVICE_S_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: FinishReason
    service_s: float
    cost: StepCost
    logprobs: TokenLogprobs
    prompt_logprobs: TokenLogprobs
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., service_s: _Optional[float] = ..., cost: _Optional[_Union[StepCost, _Mapping]] = ..., logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ..., prompt_logprobs: _Optional[_Union[TokenLogprobs, _Mapping]] = ...) -> None: ...
